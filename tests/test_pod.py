"""Method pod's math and planning (vllm_kvc/pod.py): reference attention, similarity, group DP, plan, cache."""
import json
import math
import shutil

import pytest
import torch

from vllm_kvc import pod
from vllm_kvc.config import CalibrationConfig, CompressionConfig
from vllm_kvc.methods.pod import PodConfig
from vllm_kvc.pod import PodPlan, layer_similarity, plan_groups, pod_attention, pod_logits


def _rand(t, s, hq, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return r(t, hq, d), r(s, hkv, d), r(s, hkv, d), r(t, hq, d), r(s, hkv, d)


def _naive(q_own, k_own, v_own, q_lead, k_lead, scale, window, sinks, pos, causal=True):
    """Loops straight from the definition (float64)."""
    t, hq, d = q_own.shape
    s, hkv, _ = k_own.shape
    rep = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    for ti in range(t):
        i = int(pos[ti])
        for h in range(hq):
            kh = h // rep
            logits, vals = [], []
            for j in range(s):
                if causal and j > i:
                    continue
                if j < sinks or 0 <= i - j < window:
                    x = q_own[ti, h].double() @ k_own[j, kh].double()
                else:
                    x = q_lead[ti, h].double() @ k_lead[j, kh].double()
                logits.append(x * scale)
                vals.append(v_own[j, kh].double())
            p = torch.softmax(torch.stack(logits), 0)
            out[ti, h] = (p[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("t,s,hq,hkv,window,sinks", [
    (9, 9, 4, 2, 3, 1), (5, 12, 6, 3, 4, 2), (1, 17, 2, 2, 0, 0), (16, 16, 3, 1, 64, 4), (7, 20, 4, 4, 1, 0)])
def test_lead_equals_own_is_causal_attention(t, s, hq, hkv, window, sinks):
    q, k, v, _, _ = _rand(t, s, hq, hkv, 8, seed=t * s)
    pos = torch.arange(s - t, s)
    scale = 8 ** -0.5
    out = pod_attention(q, k, v, q, k, scale, window, sinks, pos)
    mask = torch.arange(s)[None, :] <= pos[:, None]  # [T, S]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1).repeat_interleave(hq // hkv, 0),
        v.transpose(0, 1).repeat_interleave(hq // hkv, 0), attn_mask=mask, scale=scale).transpose(0, 1)
    assert out.shape == (t, hq, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the logits are the plain causal ones
    lg = pod_logits(q, k, q, k, scale, window, sinks, pos)
    plain = torch.einsum("thd,shd->hts", q, k.repeat_interleave(hq // hkv, 1)) * scale
    torch.testing.assert_close(lg, plain.masked_fill(~mask[None], float("-inf")))


def test_window_covering_everything_ignores_the_lead():
    q, k, v, ql, kl = _rand(11, 11, 6, 2, 16, seed=1)
    pos = torch.arange(11)
    own = pod_attention(q, k, v, q, k, 0.25, 11, 0, pos)
    for window, sinks in ((11, 0), (64, 4), (5, 11)):  # every visible key exact: by window or by sinks
        torch.testing.assert_close(pod_attention(q, k, v, ql, kl, 0.25, window, sinks, pos), own)


def test_distant_logits_come_only_from_the_lead():
    q, k, v, ql, kl = _rand(10, 10, 4, 2, 8, seed=2)
    pos = torch.arange(10)
    base = pod_attention(q, k, v, ql, kl, 0.3, 0, 0, pos)
    # window 0, sinks 0: every key distant, own q/k unused
    torch.testing.assert_close(pod_attention(torch.randn_like(q), torch.randn_like(k), v, ql, kl, 0.3, 0, 0, pos),
                               base)
    assert not torch.allclose(pod_attention(q, k, v, ql, torch.randn_like(kl), 0.3, 0, 0, pos), base)
    assert not torch.allclose(pod_attention(q, k, v, torch.randn_like(ql), kl, 0.3, 0, 0, pos), base)
    assert not torch.allclose(pod_attention(q, k, v * 2, ql, kl, 0.3, 0, 0, pos), base)  # values: own
    # window 3, sinks 2: own keys matter only at exact positions, the lead's only at distant ones
    w, sk = 3, 2
    base = pod_attention(q, k, v, ql, kl, 0.3, w, sk, pos)
    torch.testing.assert_close(base, _naive(q, k, v, ql, kl, 0.3, w, sk, pos).float(), atol=1e-5, rtol=1e-5)
    k2, kl2 = k.clone(), kl.clone()
    k2[4] += 5.0  # distant for queries 7..9, exact for 4..6: only those change
    kl2[1] += 5.0  # a sink: never read from the lead
    out = pod_attention(q, k2, v, ql, kl2, 0.3, w, sk, pos)
    torch.testing.assert_close(out[7:], base[7:])
    torch.testing.assert_close(out[:4], base[:4])
    assert not torch.allclose(out[4:7], base[4:7])


@pytest.mark.parametrize("causal", [True, False])
def test_matches_naive_definition_and_blocks(monkeypatch, causal):
    q, k, v, ql, kl = _rand(6, 13, 6, 2, 4, seed=3)
    pos = torch.tensor([7, 8, 9, 10, 11, 12])
    ref = _naive(q, k, v, ql, kl, 0.5, 4, 3, pos, causal).float()
    torch.testing.assert_close(pod_attention(q, k, v, ql, kl, 0.5, 4, 3, pos, causal), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(pod, "_BLOCK_ELEMS", 6 * 13 * 2)  # query blocks of 2
    torch.testing.assert_close(pod_attention(q, k, v, ql, kl, 0.5, 4, 3, pos, causal), ref, atol=1e-5, rtol=1e-5)
    out16 = pod_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), ql.bfloat16(), kl.bfloat16(), 0.5, 4, 3, pos,
                          causal)
    assert out16.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- planning


def _partitions(n, max_group):
    if n == 0:
        yield []
        return
    for size in range(1, min(max_group, n) + 1):
        for rest in _partitions(n - size, max_group):
            yield [size] + rest


def _groups_of(sizes):
    out, a = [], 0
    for s in sizes:
        out.append(list(range(a, a + s)))
        a += s
    return out


@pytest.mark.parametrize("max_group", [2, 3])
def test_plan_groups_is_the_brute_force_optimum(max_group):
    n = 6
    for seed in range(4):
        score = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for f in range(0, pod.max_followers(n, max_group) + 1):
            groups = plan_groups(score, f, max_group)
            assert [i for g in groups for i in g] == list(range(n))
            assert all(1 <= len(g) <= max_group for g in groups) and len(groups) == n - f
            brute = max(pod.groups_score(score, _groups_of(p)) for p in _partitions(n, max_group)
                        if len(p) == n - f)
            assert pod.groups_score(score, groups) == pytest.approx(brute, abs=1e-12)


def test_plan_groups_infeasible_and_bad_scores():
    score = torch.rand(6, 6)
    assert pod.max_followers(6, 2) == 3 and pod.max_followers(7, 3) == 4 and pod.max_followers(30, 2) == 15
    for f, mg in ((4, 2), (5, 3), (-1, 2), (1, 1)):
        with pytest.raises(ValueError, match="pod.followers"):
            plan_groups(score, f, mg)
    assert plan_groups(score, 0, 1) == [[i] for i in range(6)]
    bad = score.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"score\[2, 3\]"):
        plan_groups(bad, 3, 2)
    bad[0, 5] = float("nan")  # outside max_group: never read
    assert plan_groups(score.masked_fill(torch.ones(6, 6).triu(3).bool(), float("nan")), 2, 3)
    # forced choice: only pairs (0, 1) and (3, 4) are good
    s = torch.zeros(6, 6)
    s[0, 1] = s[3, 4] = 1.0
    assert plan_groups(s, 2, 2) == [[0, 1], [2], [3, 4], [5]]


def test_pod_plan_bytes_and_json():
    plan = PodPlan([[0, 1], [2], [3, 4, 5]], window=32, sinks=2)
    assert plan.groups == ((0, 1), (2,), (3, 4, 5))
    assert plan.num_layers == 6 and plan.followers == 3 and plan.leads == (0, 2, 3) and plan.max_group == 3
    assert [plan.lead_of(i) for i in range(6)] == [0, 0, 2, 3, 3, 3]
    assert [plan.is_follower(i) for i in range(6)] == [False, True, False, False, True, True]
    row = 3 * 64 * 2
    assert plan.kv_bytes_per_token(3, 64) == [2 * row, row, 2 * row, 2 * row, row, row]
    assert plan.kv_bytes_per_token(3, 64, dtype_bytes=4)[1] == 3 * 64 * 4
    js = plan.to_json()
    assert js == {"method": "pod", "groups": [[0, 1], [2], [3, 4, 5]], "window": 32, "sinks": 2}
    assert PodPlan.from_json(js) == plan and PodPlan.from_json(json.dumps(js)) == plan
    with pytest.raises(IndexError):
        plan.lead_of(6)
    for bad in ([[0, 2], [1]], [[1, 2]], [], [[0], []]):
        with pytest.raises(ValueError):
            PodPlan(bad)


# ---------------------------------------------------------------------------------------------- tiny checkpoints


def _tiny_model(arch, layers=2, seed=0, vocab=300):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    cfg = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
           "MistralForCausalLM": transformers.MistralConfig}[arch](**common)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # Qwen2's q/k/v biases
    return model


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"])
def test_captured_qkv_reproduce_the_models_attention(arch):
    """capture_qkv's post-RoPE q/k (and v) through pod_attention(lead = own) give what each layer's o_proj sees."""
    model = _tiny_model(arch)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda mod, args, i=i: seen.__setitem__(i, args[0].detach())) for i, layer in enumerate(model.model.layers)]
    qkv = pod.capture_qkv(model, ids)
    for h in hooks:
        h.remove()
    assert len(qkv) == 2
    for i, (q, k, v) in enumerate(qkv):
        assert q.shape == (40, 4, 16) and k.shape == v.shape == (40, 2, 16)
        out = pod_attention(q, k, v, q, k, model.model.layers[i].self_attn.scaling, 8, 2, torch.arange(40))
        torch.testing.assert_close(out.reshape(40, -1), seen[i][0], atol=1e-4, rtol=1e-4)
    # and a wrong rotation would not: keys at shifted positions change the attention
    q, k, v = qkv[0]
    out = pod_attention(q, k.roll(1, 0), v, q, k.roll(1, 0), model.model.layers[0].self_attn.scaling, 8, 2,
                        torch.arange(40))
    assert not torch.allclose(out.reshape(40, -1), seen[0][0], atol=1e-3)


@pytest.fixture
def tiny_llama(tmp_path, model_dir):
    d = tmp_path / "tiny-llama"
    _tiny_model("LlamaForCausalLM", layers=4, vocab=49152, seed=1).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{model_dir}/{f}", d / f)
    words = ("the of and to in is that for it as with was on be by at this are from or which an have not but "
             "python module function class object value list string file error program code data").split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=g).tolist())
    corpus = tmp_path / "calib.txt"
    corpus.write_text(text)
    return str(d), str(corpus)


def test_layer_similarity_scores_and_build_plan_cached(tiny_llama, tmp_path, monkeypatch):
    model_dir, corpus = tiny_llama
    monkeypatch.setenv("VLLM_KVC_CACHE", str(tmp_path / "cache"))
    calib = CalibrationConfig(corpus=corpus, tokens=256, seq_len=128)
    window, sinks = 16, 2
    score = layer_similarity(model_dir, calib, window, sinks, max_group=3)
    assert score.shape == (4, 4)
    for a in range(4):
        for m in range(4):
            if 0 < m - a < 3:
                assert 0.0 <= float(score[a, m]) <= 1.0
            else:
                assert math.isnan(float(score[a, m]))
    assert float(score[0, 1]) < 1.0  # random layers differ

    # one chunk: the score is 1 - mean TV of pod_logits' distribution, recomputed here from the public API
    one = CalibrationConfig(corpus=corpus, tokens=128, seq_len=128)
    s1 = layer_similarity(model_dir, one, window, sinks, max_group=2)
    from vllm_kvc.corpus import load_text, token_chunks
    from vllm_kvc.pod import _load_model

    tok, model = _load_model(model_dir)
    ids = token_chunks(tok, load_text(corpus), 128, 128)[0]
    qkv = pod.capture_qkv(model, torch.tensor(ids))
    scale = model.model.layers[0].self_attn.scaling
    pos = torch.arange(128)
    for a, m in ((0, 1), (2, 3)):
        (qm, km, _), (qa, ka, _) = qkv[m], qkv[a]
        p_true = torch.softmax(pod_logits(qm, km, qm, km, scale, window, sinks, pos), -1)
        p_pod = torch.softmax(pod_logits(qm, km, qa, ka, scale, window, sinks, pos), -1)
        tv = 0.5 * (p_true - p_pod).abs().sum(-1)[:, window + sinks:]  # queries with distant keys
        assert float(s1[a, m]) == pytest.approx(1 - float(tv.mean()), abs=1e-5)
    assert math.isnan(float(s1[0, 2]))

    # build_pod_plan: computed once, cached, the DP's groups, plan JSON next to the similarity
    cfg = CompressionConfig(method="pod", calibration=calib, pod=PodConfig(window=window, sinks=sinks, max_group=3))
    plan = pod.build_pod_plan(model_dir, cfg)
    path = pod.similarity_path(model_dir, cfg)
    assert path.exists() and path.parent == tmp_path / "cache" / "pod"
    cached = pod.load_or_compute_similarity(model_dir, cfg)
    torch.testing.assert_close(cached, score.float().double(), equal_nan=True)
    assert plan.followers == 2 and plan.window == window and plan.sinks == sinks
    assert [list(g) for g in plan.groups] == plan_groups(cached, 2, 3)
    saved = json.loads(path.with_suffix(".f2.json").read_text())
    assert PodPlan.from_json(saved) == plan

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(pod, "layer_similarity", boom)
    assert pod.build_pod_plan(model_dir, cfg) == plan
    assert pod.build_pod_plan(model_dir, cfg.model_copy(update={"pod": PodConfig(
        window=window, sinks=sinks, max_group=3, followers=1)})).followers == 1
    # explicit groups need no measurement; impossible settings name the field
    explicit = cfg.model_copy(update={"pod": PodConfig(groups=[[0], [1, 2], [3]], max_group=3)})
    assert pod.build_pod_plan(model_dir, explicit).groups == ((0,), (1, 2), (3,))
    with pytest.raises(ValueError, match="pod.followers"):
        pod.build_pod_plan(model_dir, cfg.model_copy(update={"pod": PodConfig(followers=3, max_group=2)}))
    with pytest.raises(ValueError, match="seq_len"):
        layer_similarity(model_dir, CalibrationConfig(corpus=corpus, tokens=128, seq_len=16), 16, 2, 2)
