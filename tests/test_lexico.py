"""Method lexico's math: OMP, dictionary learning, the sparse cache row, and the dictionary file. No vLLM."""
import json
import shutil
import struct

import pytest
import torch

from vllm_kvc import lexico
from vllm_kvc.config import CalibrationConfig, CompressionConfig
from vllm_kvc.methods.lexico import LexicoConfig
from vllm_kvc.lexico import (SparseLayout, learn_dictionary, omp, reconstruction_error, sparse_decode)


@pytest.fixture(autouse=True)
def _one_thread():
    """These small problems run fastest on one thread, and far faster than on two on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dictionary(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _sparse_signals(dic, m, s, seed=1):
    """m signals that are exactly s-sparse in dic: (x, support [m, s], coefficients [m, s])."""
    g = torch.Generator().manual_seed(seed)
    n = dic.shape[0]
    support = torch.stack([torch.randperm(n, generator=g)[:s] for _ in range(m)])
    sign = torch.randint(0, 2, (m, s), generator=g) * 2 - 1
    coef = sign * (0.5 + torch.rand(m, s, generator=g))  # |c| in [0.5, 1.5]
    return sparse_decode(support, coef, dic), support, coef


def _sparse_plus_noise(m, d, n_true, s, noise, seed=2):
    """Rows that are s-sparse in a hidden dictionary of n_true atoms, plus Gaussian noise."""
    hidden = _dictionary(n_true, d, seed=seed)
    x, _, _ = _sparse_signals(hidden, m, s, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    return x + noise * torch.randn(m, d, generator=g)


def _low_rank_plus_noise(m, d, rank, seed=3):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g)
    scales = torch.logspace(0, -1.5, rank)
    return (torch.randn(m, rank, generator=g) * scales) @ basis + 0.02 * torch.randn(m, d, generator=g)


# ----- OMP -----
def test_omp_recovers_truly_sparse_vectors():
    dic = _dictionary(256, 64)
    x, support, _ = _sparse_signals(dic, 300, 4)
    idx, coef = omp(x, dic, 4)
    assert idx.dtype == torch.int64 and coef.dtype == torch.float32 and idx.shape == coef.shape == (300, 4)
    err = (x - sparse_decode(idx, coef, dic)).norm(dim=1) / x.norm(dim=1)
    assert float(err.max()) < 1e-4
    # the right atoms, not just some that happen to fit
    assert torch.equal(idx.sort(dim=1).values, support.sort(dim=1).values)


@pytest.mark.parametrize("d,n,s", [(64, 256, 16), (8, 32, 12)])  # the second: more atoms than dimensions
def test_omp_never_repeats_an_atom_and_stays_finite(d, n, s):
    dic = _dictionary(n, d, seed=4)
    x = torch.randn(500, d, generator=torch.Generator().manual_seed(5))
    idx, coef = omp(x, dic, s)
    assert all(len(set(row.tolist())) == s for row in idx)
    assert torch.isfinite(coef).all()
    # every coefficient fits fp16 with room to spare (no blown-up cancelling pairs)
    assert float(coef.abs().max()) < 100 * float(x.norm(dim=1).max())
    if s > d:  # more atoms than dimensions: exact
        assert float(((x - sparse_decode(idx, coef, dic)).norm(dim=1) / x.norm(dim=1)).max()) < 1e-3


def test_omp_coefficients_are_least_squares_on_the_picked_atoms():
    dic = _dictionary(512, 64, seed=6)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float()
    idx, coef = omp(x, dic, 8)
    res = x - sparse_decode(idx, coef, dic)
    for r in range(x.shape[0]):
        a = dic[idx[r]].double()  # [8, 64]
        ref = torch.linalg.lstsq(a.t(), x[r].double().unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(coef[r].double(), ref, atol=1e-4, rtol=1e-4)
        # the residual is orthogonal to every picked atom
        assert float((a @ res[r].double()).abs().max()) < 1e-4 * float(x[r].norm())


def test_omp_greedy_first_pick_is_the_best_correlated_atom():
    dic = _dictionary(300, 32, seed=8)
    x = torch.randn(100, 32, generator=torch.Generator().manual_seed(9))
    idx, _ = omp(x, dic, 3)
    assert torch.equal(idx[:, 0], (x @ dic.t()).abs().argmax(dim=1))


def test_omp_chunking_and_repeats_give_the_same_codes():
    dic = _dictionary(256, 32, seed=10)
    x = torch.randn(1000, 32, generator=torch.Generator().manual_seed(11))
    i1, c1 = omp(x, dic, 6)
    i2, c2 = omp(x, dic, 6, chunk=77)
    i3, c3 = omp(x, dic, 6)
    assert torch.equal(i1, i3) and torch.equal(c1, c3)
    assert torch.equal(i1, i2) and torch.allclose(c1, c2, atol=1e-5)


def test_omp_empty_and_bad_input():
    dic = _dictionary(64, 16)
    idx, coef = omp(torch.zeros(0, 16), dic, 4)
    assert idx.shape == (0, 4) and coef.shape == (0, 4)
    with pytest.raises(ValueError):
        omp(torch.zeros(3, 8), dic, 4)
    with pytest.raises(ValueError):
        omp(torch.zeros(3, 16), dic, 65)


def test_sparse_decode_any_leading_dims():
    dic = _dictionary(128, 16)
    g = torch.Generator().manual_seed(12)
    idx = torch.randint(0, 128, (2, 3, 5, 4), generator=g)
    coef = torch.randn(2, 3, 5, 4, generator=g)
    out = sparse_decode(idx, coef.half(), dic)
    assert out.shape == (2, 3, 5, 16) and out.dtype == torch.float32
    ref = torch.einsum("abcs,abcsd->abcd", coef.half().float(), dic[idx])
    assert torch.allclose(out, ref, atol=1e-5)


# ----- reconstruction error and dictionary learning -----
def test_error_decreases_strictly_with_sparsity():
    x = _low_rank_plus_noise(2000, 32, 12)
    dic = _dictionary(256, 32, seed=13)
    errs = [reconstruction_error(x, dic, s) for s in (1, 2, 4, 8, 16)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 1.0 and errs[-1] > 0.0


def test_learned_dictionary_beats_a_random_one():
    x = _sparse_plus_noise(6000, 32, n_true=96, s=3, noise=0.02)
    train, test = x[:4000], x[4000:]
    seen = []
    learned = learn_dictionary(train, 128, 3, 8, seed=0, progress=lambda it, e: seen.append(e))
    assert learned.shape == (128, 32)
    assert torch.allclose(learned.norm(dim=1), torch.ones(128), atol=1e-5)
    assert len(seen) == 8 and seen[-1] < seen[0]
    rnd = _dictionary(128, 32, seed=14)
    rows = learn_dictionary(train, 128, 3, 0, seed=0)  # iters=0: the init, normalized random data rows
    assert torch.allclose(rows.norm(dim=1), torch.ones(128), atol=1e-5)
    e_learned = reconstruction_error(test, learned, 3)
    e_rows = reconstruction_error(test, rows, 3)
    e_rnd = reconstruction_error(test, rnd, 3)
    assert e_learned < 0.5 * e_rnd and e_learned < 0.5 * e_rows, (e_learned, e_rows, e_rnd)
    # deterministic for a seed
    assert torch.equal(learned, learn_dictionary(train, 128, 3, 8, seed=0))


def test_learning_with_fewer_rows_than_atoms_keeps_unit_norm_atoms():
    x = _low_rank_plus_noise(40, 16, 4)
    d = learn_dictionary(x, 64, 2, 3)
    assert d.shape == (64, 16) and torch.isfinite(d).all()
    assert torch.allclose(d.norm(dim=1), torch.ones(64), atol=1e-5)


# ----- the cache row -----
def _codes(n, h, s, atoms, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, atoms, (n, h, s), generator=g), torch.randn(n, h, s, generator=g) * 3


def test_sparse_layout_bytes_match_the_plan():
    from vllm_kvc.plan import ModelShape
    from vllm_kvc.methods import build_plan

    lay = SparseLayout(num_kv_heads=3, head_dim=64, sparsity_k=8, sparsity_v=6)
    assert lay.row_bytes == lay.row_elems == 3 * 14 * 4 == 168
    assert lay.cache_dtype == torch.uint8
    assert lay.dense_row_bytes() == 2 * 3 * 64 * 2
    shape = ModelShape("LlamaForCausalLM", 4, 576, 9, 3, 64)
    cfg = CompressionConfig(method="lexico", lexico=LexicoConfig(sparsity_k=8, sparsity_v=6))
    assert build_plan(cfg, shape).layer_bytes_per_token(0) == lay.row_bytes


def test_pack_unpack_round_trip_and_byte_order():
    lay = SparseLayout(num_kv_heads=2, head_dim=64, sparsity_k=3, sparsity_v=2)
    ik, ck = _codes(5, 2, 3, 32768, 15)
    iv, cv = _codes(5, 2, 2, 32768, 16)
    ik[0, 0, 0], iv[1, 1, 1] = 32767, 0
    ck[2, 1, 0], cv[3, 0, 1] = 1e6, -1e6  # beyond fp16: clamped
    rows = lay.pack(ik, ck, iv, cv)
    assert rows.dtype == torch.uint8 and rows.shape == (5, lay.row_bytes)
    uk, uck, uv, ucv = lay.unpack(rows)
    assert uk.dtype == uv.dtype == torch.int64 and uck.dtype == ucv.dtype == torch.float32
    assert torch.equal(uk, ik) and torch.equal(uv, iv)
    assert torch.equal(uck, ck.clamp(-65504, 65504).half().float())
    assert torch.equal(ucv, cv.clamp(-65504, 65504).half().float())
    assert float(uck[2, 1, 0]) == 65504.0 and float(ucv[3, 0, 1]) == -65504.0
    # documented bytes: per head, K pairs then V pairs; a pair = little-endian int16 index, fp16 coefficient
    raw = bytes(rows[4].tolist())
    per_head = (3 + 2) * 4
    for h in range(2):
        for j in range(3):
            assert struct.unpack_from("<he", raw, h * per_head + 4 * j) == (int(ik[4, h, j]), float(uck[4, h, j]))
        for j in range(2):
            off = h * per_head + 4 * (3 + j)
            assert struct.unpack_from("<he", raw, off) == (int(iv[4, h, j]), float(ucv[4, h, j]))


def test_unpack_of_non_contiguous_gathered_rows():
    lay = SparseLayout(num_kv_heads=3, head_dim=16, sparsity_k=4, sparsity_v=4)
    ik, ck = _codes(24, 3, 4, 1024, 17)
    iv, cv = _codes(24, 3, 4, 1024, 18)
    rows = lay.pack(ik, ck, iv, cv)
    # a paged cache [blocks, block_size, row] inside a wider buffer, read through a strided view
    buf = torch.zeros(6, 4, lay.row_bytes + 8, dtype=torch.uint8)
    cache = buf[..., 8:]
    cache.copy_(rows.view(6, 4, lay.row_bytes))
    view = cache.transpose(0, 1)[:, ::2]  # [4, 3, row], non-contiguous
    assert not view.is_contiguous()
    uk, uck, uv, ucv = lay.unpack(view)
    assert uk.shape == (4, 3, 3, 4)
    sel = torch.arange(24).view(6, 4).t()[:, ::2]  # token index of each gathered row
    assert torch.equal(uk, ik[sel]) and torch.equal(uv, iv[sel])
    assert torch.equal(uck, ck[sel].half().float()) and torch.equal(ucv, cv[sel].half().float())
    k, v = lay.decode(view, _dictionary(1024, 16, 1), _dictionary(1024, 16, 2))
    assert k.shape == v.shape == (4, 3, 3, 16) and k.dtype == torch.float32


def test_encode_decode_error_matches_reconstruction_error():
    h, d, n = 2, 32, 400
    kx = _low_rank_plus_noise(n * h, d, 10, seed=19)
    vx = _sparse_plus_noise(n * h, d, n_true=64, s=3, noise=0.05, seed=20)
    d_k, d_v = _dictionary(256, d, seed=21), _dictionary(256, d, seed=22)
    lay = SparseLayout(num_kv_heads=h, head_dim=d, sparsity_k=6, sparsity_v=4)
    rows = lay.encode(kx.view(n, h, d), vx.view(n, h, d), d_k, d_v)
    assert rows.shape == (n, lay.row_bytes) and rows.dtype == torch.uint8
    k, v = lay.decode(rows, d_k, d_v)
    assert k.shape == v.shape == (n, h, d)
    ek = float((k.reshape(-1, d) - kx).norm() / kx.norm())
    ev = float((v.reshape(-1, d) - vx).norm() / vx.norm())
    rk, rv = reconstruction_error(kx, d_k, 6), reconstruction_error(vx, d_v, 4)
    assert 0 < rk < 1 and 0 < rv < 1
    assert abs(ek - rk) < 0.01 * rk + 1e-3 and abs(ev - rv) < 0.01 * rv + 1e-3, (ek, rk, ev, rv)
    # empty batch (a step with no new tokens)
    empty = lay.encode(torch.zeros(0, h, d), torch.zeros(0, h, d), d_k, d_v)
    assert empty.shape == (0, lay.row_bytes)
    assert lay.decode(empty, d_k, d_v)[0].shape == (0, h, d)


# ----- calibration K/V and the dictionary file -----
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, model_dir):
    import transformers

    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{f}", d / f)
    assert json.load(open(d / "config.json"))["architectures"] == ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)
    words = "the cache of keys and values grows with every token a model reads so memory runs out".split()
    text = " ".join(words[i] for i in torch.randint(0, len(words), (2000,), generator=g).tolist())
    (d / "calib.txt").write_text(text)
    return str(d)


def test_collect_kv_returns_pre_rope_projections(tiny_llama):
    import transformers

    from vllm_kvc.corpus import load_text, token_chunks

    calib = CalibrationConfig(corpus=f"{tiny_llama}/calib.txt", tokens=256, seq_len=128)
    kv = lexico.collect_kv(tiny_llama, calib)
    assert len(kv) == 2
    assert all(k.shape == v.shape == (256 * 2, 16) for k, v in kv)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    ids = token_chunks(tok, load_text(calib.corpus, "calibration"), 256, 128)[0]
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([ids])))
        k_ref = model.model.layers[0].self_attn.k_proj(h).reshape(-1, 16)
        v_ref = model.model.layers[0].self_attn.v_proj(h).reshape(-1, 16)
    assert torch.allclose(kv[0][0][: 128 * 2], k_ref, atol=1e-5)
    assert torch.allclose(kv[0][1][: 128 * 2], v_ref, atol=1e-5)
    # a bounded subsample: the same rows of K and V
    sub = lexico.collect_kv(tiny_llama, calib, max_rows=100)
    assert sub[1][0].shape == (100, 16)
    kfull = {tuple(r.tolist()) for r in kv[1][0]}
    assert all(tuple(r.tolist()) in kfull for r in sub[1][0])


def test_build_dictionaries_is_cached(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_KVC_CACHE", str(tmp_path / "cache"))
    calls = []
    real = lexico.collect_kv
    monkeypatch.setattr(lexico, "collect_kv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = CompressionConfig(method="lexico", calibration=CalibrationConfig(
        corpus=f"{tiny_llama}/calib.txt", tokens=256, seq_len=128),
        lexico=LexicoConfig(atoms=32, sparsity_k=4, sparsity_v=3, iters=2))
    path = lexico.build_dictionaries(tiny_llama, cfg)
    assert path.exists() and path.parent == tmp_path / "cache" / "lexico" and path.suffix == ".safetensors"
    assert len(calls) == 1
    mtime = path.stat().st_mtime_ns
    assert lexico.build_dictionaries(tiny_llama, cfg) == path
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    for layer in (0, 1):
        d_k, d_v = lexico.load_dictionaries(path, layer)
        assert d_k.shape == d_v.shape == (32, 16) and d_k.dtype == torch.float32
        assert torch.allclose(d_k.norm(dim=1), torch.ones(32), atol=1e-5)
        assert torch.allclose(d_v.norm(dim=1), torch.ones(32), atol=1e-5)
    # the dictionaries code the calibration K better than the random rows they started from
    k0 = real(tiny_llama, cfg.calibration)[0][0]
    d_k, _ = lexico.load_dictionaries(path, 0)
    init = learn_dictionary(k0, 32, 4, 0, seed=0)
    assert reconstruction_error(k0, d_k, 4) < reconstruction_error(k0, init, 4)
    # one dictionary serves every runtime sparsity: same file, nothing rebuilt
    same = cfg.model_copy(update={"lexico": cfg.lexico.model_copy(update={"sparsity_k": 2, "sparsity_v": 3})})
    assert lexico.build_dictionaries(tiny_llama, same) == path and len(calls) == 1
    # other learning settings: another file
    other = cfg.model_copy(update={"lexico": LexicoConfig(atoms=32, train_sparsity=2, iters=2)})
    path2 = lexico.build_dictionaries(tiny_llama, other)
    assert path2 != path and path2.exists() and len(calls) == 2
