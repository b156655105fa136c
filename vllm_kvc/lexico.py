"""Method ``lexico``: keys and values as sparse codes over a per-layer universal dictionary (Lexico, sparse coding
of the KV cache with orthogonal matching pursuit). Plain torch; importable without vLLM.

Each decoder layer has two dictionaries ``D_k`` and ``D_v`` (``[atoms, head_dim]`` float32, unit-norm rows),
shared by all KV heads of the layer (so tensor-parallel ranks that hold different heads load the same ones).
Every token's key of each KV head (the ``k_proj`` output, bias included, *before* RoPE) is approximated by
``sparsity_k`` atoms found by orthogonal matching pursuit (:func:`omp`), its value by ``sparsity_v`` atoms.

Cache row of one token in one layer (:class:`SparseLayout`), ``num_kv_heads * (sparsity_k + sparsity_v) * 4``
bytes::

    [ head 0: sparsity_k K pairs, sparsity_v V pairs | head 1: ... | ... ]
    pair = int16 atom index (little endian) , fp16 coefficient (little endian)      (4 bytes)

Dictionaries are learned once per checkpoint from K/V collected on calibration text (:func:`collect_kv`,
:func:`learn_dictionary`) and cached in one safetensors file (:func:`build_dictionaries`) with tensors
``k.{layer}`` and ``v.{layer}``.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("vllm_kvc")

LEXICO_FORMAT = 1
# rows (tokens x KV heads) one dictionary is learned from, a deterministic subsample of the calibration K/V. On
# SmolLM2-135M, 16384 rows gave held-out errors within ~2% of 32768 rows' (layers 0 and 15, sparsity 4..16) in half
# the time (about 5 s of one CPU core per layer and side).
LEARN_MAX_ROWS = 16384
_DEP_NORM = 3e-3  # OMP: an atom (unit norm) closer than this to the span of the atoms picked before it: coef 0


# --------------------------------------------------------------------------------------------------------------
# sparse coding
# --------------------------------------------------------------------------------------------------------------
def _omp_chunk(x: torch.Tensor, dt: torch.Tensor, dictionary: torch.Tensor, s: int):
    """OMP of x [m, d] over dictionary [N, d] (dt = its transpose, contiguous). Returns (idx [m, s], coef [m, s]).

    Least squares on the picked atoms is kept exact through an orthonormal basis ``Q`` of their span, grown by one
    vector per step (Gram-Schmidt, re-orthogonalized once: "CGS2"): the residual ``x - Q Q^T x`` after each step is
    the least-squares residual on all atoms picked so far. ``R`` (upper triangular, ``D_I = R^T Q``) holds the
    atoms in that basis, and the coefficients are ``R^-1 Q^T x``, one batched triangular solve at the end.
    An atom whose distance to the span of the earlier ones is below ``_DEP_NORM`` gets a zero basis vector and an
    identity column in ``R``: coefficient 0, the others solved exactly as without it. Each step is a fixed number
    of batched tensor operations (no loop over rows), which also keeps GPU kernel launches few.
    """
    m, d = x.shape
    dev = x.device
    idx = torch.empty(m, s, dtype=torch.long, device=dev)
    q_basis = torch.zeros(m, s, d, dtype=torch.float32, device=dev)
    r_tri = torch.zeros(m, s, s, dtype=torch.float32, device=dev)
    z = torch.empty(m, s, dtype=torch.float32, device=dev)
    res = x.clone()
    for k in range(s):
        corr = torch.mm(res, dt).abs_()
        if k:
            corr.scatter_(1, idx[:, :k], -1.0)  # never the same atom twice
        j = corr.argmax(dim=1)
        del corr
        idx[:, k] = j
        a = dictionary.index_select(0, j).unsqueeze(1)  # [m, 1, d]
        if k:
            qk = q_basis[:, :k]  # [m, k, d]
            p = torch.bmm(qk, a.transpose(1, 2))  # [m, k, 1]: the atom in the basis
            q = torch.baddbmm(a, p.transpose(1, 2), qk, alpha=-1)  # a - Q^T p
            p2 = torch.bmm(qk, q.transpose(1, 2))  # second pass (CGS2): what float32 rounding left
            q = torch.baddbmm(q, p2.transpose(1, 2), qk, alpha=-1)
            p = p.add_(p2).squeeze(2)
        else:
            q = a
        nrm = q.norm(dim=2)  # [m, 1]
        keep = (nrm > _DEP_NORM).float()
        q = q.mul_((keep / nrm.clamp_min(_DEP_NORM)).unsqueeze(2)).squeeze(1)  # [m, d]
        if k:
            r_tri[:, :k, k] = p.mul_(keep)
        r_tri[:, k, k] = nrm.mul(keep).add_(1.0 - keep).squeeze(1)
        q_basis[:, k] = q
        zk = (q * res).sum(dim=1, keepdim=True)  # = q . x: res is orthogonal to the earlier basis vectors
        z[:, k] = zk.squeeze(1)
        if k + 1 < s:
            res.addcmul_(zk, q, value=-1.0)
    coef = torch.linalg.solve_triangular(r_tri, z.unsqueeze(2), upper=True).squeeze(2)
    return idx, coef


def omp(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int, chunk: int = 8192):
    """Batched orthogonal matching pursuit.

    ``x`` [M, d], ``dictionary`` [N, d] with unit-norm rows. Each of ``sparsity`` steps picks, for every row, the
    atom with the largest absolute correlation with the current residual (never an atom already picked), then
    re-solves least squares on all picked atoms (exactly: an incrementally orthogonalized basis of the picked atoms,
    see ``_omp_chunk``; an atom numerically in the span of the earlier ones, picked only once the residual is ~0 or
    when ``sparsity > d``, gets coefficient 0 instead of an ill-conditioned solve, so no ridge is needed). Rows are
    processed in chunks of ``chunk`` to bound memory (``chunk * (N + sparsity * (d + sparsity))`` floats).
    Deterministic. Runs on ``x``'s device.

    Returns (idx int64 [M, sparsity], coef float32 [M, sparsity]) in the order the atoms were picked.
    """
    if x.dim() != 2 or dictionary.dim() != 2 or x.shape[1] != dictionary.shape[1]:
        raise ValueError(f"omp: x {tuple(x.shape)} and dictionary {tuple(dictionary.shape)}: expected [M, d], [N, d]")
    n_atoms = dictionary.shape[0]
    if not 1 <= sparsity <= n_atoms:
        raise ValueError(f"omp: sparsity {sparsity} with {n_atoms} atoms")
    dev = x.device
    dic = dictionary.to(device=dev, dtype=torch.float32).contiguous()
    dt = dic.t().contiguous()
    xf = x.to(torch.float32)
    m = xf.shape[0]
    idx = torch.empty(m, sparsity, dtype=torch.long, device=dev)
    coef = torch.empty(m, sparsity, dtype=torch.float32, device=dev)
    chunk = max(1, int(chunk))
    with torch.no_grad():
        for a in range(0, m, chunk):
            b = min(m, a + chunk)
            idx[a:b], coef[a:b] = _omp_chunk(xf[a:b], dt, dic, sparsity)
    return idx, coef


def sparse_decode(idx: torch.Tensor, coef: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """sum_j coef[..., j] * dictionary[idx[..., j]]: idx / coef [..., s] -> float32 [..., d]."""
    dic = dictionary.to(device=coef.device, dtype=torch.float32)
    lead, s = idx.shape[:-1], idx.shape[-1]
    p = idx.numel() // s if s else 0
    atoms = dic.index_select(0, idx.reshape(-1).to(coef.device)).view(p, s, dic.shape[1])  # [P, s, d]
    out = torch.bmm(coef.reshape(p, 1, s).to(torch.float32), atoms).squeeze(1)
    return out.view(*lead, dic.shape[1])


def reconstruction_error(x: torch.Tensor, dictionary: torch.Tensor, sparsity: int) -> float:
    """Relative Frobenius error ||x - OMP_s(x)|| / ||x|| of x [M, d] coded with ``sparsity`` atoms."""
    x = x.to(torch.float32)
    idx, coef = omp(x, dictionary, sparsity)
    err = (x - sparse_decode(idx, coef, dictionary.to(x.device))).norm()
    return float(err / x.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------
# dictionary learning
# --------------------------------------------------------------------------------------------------------------
def _normalize_rows(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = d.norm(dim=1)
    return d / n.clamp_min(1e-12).unsqueeze(1), n


def learn_dictionary(x: torch.Tensor, atoms: int, sparsity: int, iters: int, seed: int = 0, progress=None,
                     max_rows: int | None = LEARN_MAX_ROWS) -> torch.Tensor:
    """Learn ``atoms`` unit-norm atoms [atoms, d] that code the rows of ``x`` [M, d] with ``sparsity`` atoms each.

    Recipe (deterministic for a given ``seed``):

    1. if ``max_rows`` is set and ``M > max_rows``, a uniformly random subset of ``max_rows`` rows is used
       (bounds the time: each round is one OMP pass, about ``sparsity * rows * atoms * d`` multiply-adds);
    2. init: ``atoms`` distinct random non-zero rows, normalized (if there are fewer rows, random Gaussian atoms
       complete the set);
    3. ``iters`` rounds of:

       a. sparse codes ``G`` of all rows with :func:`omp` at ``sparsity``;
       b. method of optimal directions (MOD): ``D = argmin ||X - G D||_F``, i.e. ``(G^T G + eps I) D = G^T X``
          (``G^T G`` and ``G^T X`` accumulated from the sparse codes, one ``atoms x atoms`` Cholesky solve;
          ``eps`` a tiny ridge relative to the mean diagonal);
       c. renormalize the atoms to unit norm;
       d. atoms used by no row, with (numerically) zero norm, or nearly duplicating an earlier atom
          (``|cos| > 0.99``) are replaced by the normalized residuals of the worst-represented rows (largest
          residual norm in step a), one row per replaced atom.

    ``iters = 0`` returns the initialization. ``progress(round, rel_err)`` is called after each round's codes
    with the relative Frobenius error of the rows before that round's update. Runs on ``x``'s device.
    """
    x = x.detach().to(torch.float32)
    if x.dim() != 2:
        raise ValueError(f"learn_dictionary: x {tuple(x.shape)}: expected [M, d]")
    dev = x.device
    d = x.shape[1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = x[x.norm(dim=1) > 0]
    if max_rows is not None and x.shape[0] > max_rows:
        sel = torch.randperm(x.shape[0], generator=g)[:max_rows].sort().values
        x = x[sel.to(dev)]
    m = x.shape[0]
    if m == 0:
        raise ValueError("learn_dictionary: no non-zero rows to learn from")
    perm = torch.randperm(m, generator=g)[:atoms].to(dev)
    dic, _ = _normalize_rows(x[perm].clone())
    if dic.shape[0] < atoms:
        extra = torch.randn(atoms - dic.shape[0], d, generator=g).to(dev)
        dic = torch.cat([dic, _normalize_rows(extra)[0]])
    s = min(sparsity, atoms)
    xnorm = x.norm().clamp_min(1e-30)
    for it in range(iters):
        idx, coef = omp(x, dic, s)
        res = x - sparse_decode(idx, coef, dic)
        if progress is not None:
            progress(it, float(res.norm() / xnorm))
        # MOD update: (G^T G) D = G^T X from the sparse codes G (rows: idx/coef)
        gtx = torch.zeros(atoms, d, dtype=torch.float32, device=dev)
        gtx.index_add_(0, idx.reshape(-1), (coef.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, d))
        pair = (idx.unsqueeze(2) * atoms + idx.unsqueeze(1)).reshape(-1)
        gtg = torch.zeros(atoms * atoms, dtype=torch.float64, device=dev)
        gtg.index_add_(0, pair, (coef.unsqueeze(2) * coef.unsqueeze(1)).reshape(-1).double())
        gtg = gtg.view(atoms, atoms)
        diag = gtg.diagonal()
        ridge = 1e-6 * float(diag.mean().clamp_min(1e-12))
        gtg += ridge * torch.eye(atoms, dtype=torch.float64, device=dev)
        chol, info = torch.linalg.cholesky_ex(gtg)
        if int(info) == 0:
            new = torch.cholesky_solve(gtx.double(), chol).float()
        else:  # not expected with the ridge; fall back to a pseudo-inverse solve
            new = torch.linalg.lstsq(gtg, gtx.double()).solution.float()
        used = torch.zeros(atoms, dtype=torch.bool, device=dev)
        used[idx[coef != 0]] = True
        new, nrm = _normalize_rows(new)
        bad = ~used | (nrm < 1e-8)
        cos = torch.mm(new, new.t()).abs_().triu_(diagonal=1)
        bad |= (cos > 0.99).any(dim=0)  # atom j nearly duplicates an earlier atom i < j
        nbad = int(bad.sum())
        if nbad:
            worst = res.norm(dim=1).argsort(descending=True)[:nbad]
            repl, rn = _normalize_rows(res[worst])
            if repl.shape[0] < nbad or bool((rn < 1e-8).any()):  # rows already exact: random directions instead
                rnd = _normalize_rows(torch.randn(nbad, d, generator=g).to(dev))[0]
                rnd[: repl.shape[0]] = torch.where((rn >= 1e-8).unsqueeze(1), repl, rnd[: repl.shape[0]])
                repl = rnd
            new[bad.nonzero().squeeze(1)] = repl
        dic = new
    return dic.contiguous()


# --------------------------------------------------------------------------------------------------------------
# cache rows
# --------------------------------------------------------------------------------------------------------------
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class SparseLayout:
    """Bytes of one layer's cache row (one token): see the module docstring."""

    num_kv_heads: int  # KV heads on this rank
    head_dim: int
    sparsity_k: int
    sparsity_v: int

    def __post_init__(self):
        if self.num_kv_heads < 1 or self.head_dim < 1 or self.sparsity_k < 1 or self.sparsity_v < 1:
            raise ValueError(f"SparseLayout{(self.num_kv_heads, self.head_dim, self.sparsity_k, self.sparsity_v)}: "
                             "expected positive sizes")
        if sys.byteorder != "little":  # the int16/fp16 views below assume the row's little-endian byte order
            raise RuntimeError("SparseLayout needs a little-endian machine")

    @property
    def pairs(self) -> int:
        """(index, coefficient) pairs per head: sparsity_k + sparsity_v."""
        return self.sparsity_k + self.sparsity_v

    @property
    def row_bytes(self) -> int:
        return self.num_kv_heads * self.pairs * 4

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def row_elems(self) -> int:
        """Last dimension of the cache tensor (uint8 elements)."""
        return self.row_bytes

    def dense_row_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes per token of the uncompressed K and V of the same heads."""
        return 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def pack(self, idx_k: torch.Tensor, coef_k: torch.Tensor, idx_v: torch.Tensor,
             coef_v: torch.Tensor) -> torch.Tensor:
        """idx/coef [N, H, sparsity_k] (K) and [N, H, sparsity_v] (V) -> uint8 rows [N, row_bytes]."""
        n, h = idx_k.shape[0], self.num_kv_heads
        exp_k, exp_v = (n, h, self.sparsity_k), (n, h, self.sparsity_v)
        if tuple(idx_k.shape) != exp_k or tuple(coef_k.shape) != exp_k or tuple(idx_v.shape) != exp_v \
                or tuple(coef_v.shape) != exp_v:
            raise ValueError(f"pack: K {tuple(idx_k.shape)}/{tuple(coef_k.shape)}, V {tuple(idx_v.shape)}/"
                             f"{tuple(coef_v.shape)}: expected {exp_k} and {exp_v}")
        idx = torch.cat([idx_k, idx_v], dim=2)
        if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > 32767):
            raise ValueError("pack: atom indices must lie in 0..32767 (int16)")  # (not checked on GPUs: a sync)
        coef = torch.cat([coef_k, coef_v], dim=2).to(torch.float32).clamp(-_FP16_MAX, _FP16_MAX)
        pairs = torch.stack([idx.to(torch.int16), coef.to(torch.float16).view(torch.int16)], dim=3)
        return pairs.contiguous().view(torch.uint8).reshape(n, self.row_bytes)

    def unpack(self, rows: torch.Tensor):
        """uint8 rows [..., row_bytes] (any view, e.g. a gather from the paged cache) ->
        (idx_k int64 [..., H, sk], coef_k float32, idx_v int64 [..., H, sv], coef_v float32)."""
        if rows.shape[-1] != self.row_bytes or rows.dtype != torch.uint8:
            raise ValueError(f"unpack: rows {tuple(rows.shape)} {rows.dtype}: expected [..., {self.row_bytes}] uint8")
        lead = rows.shape[:-1]
        pairs = rows.contiguous().view(torch.int16).view(*lead, self.num_kv_heads, self.pairs, 2)
        idx = pairs[..., 0].to(torch.int64)
        coef = pairs[..., 1].view(torch.float16).to(torch.float32)
        sk = self.sparsity_k
        return idx[..., :sk], coef[..., :sk], idx[..., sk:], coef[..., sk:]

    def encode(self, k: torch.Tensor, v: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor) -> torch.Tensor:
        """k, v [N, H, head_dim] (keys before RoPE) -> uint8 rows [N, row_bytes] (OMP over d_k / d_v)."""
        n, h, d = k.shape[0], self.num_kv_heads, self.head_dim
        if tuple(k.shape) != (n, h, d) or tuple(v.shape) != (n, h, d):
            raise ValueError(f"encode: k {tuple(k.shape)}, v {tuple(v.shape)}: expected [N, {h}, {d}]")
        if max(d_k.shape[0], d_v.shape[0]) > 32768:
            raise ValueError("encode: at most 32768 atoms fit int16 indices")
        ik, ck = omp(k.reshape(n * h, d), d_k, self.sparsity_k)
        iv, cv = omp(v.reshape(n * h, d), d_v, self.sparsity_v)
        sk, sv = self.sparsity_k, self.sparsity_v
        return self.pack(ik.view(n, h, sk), ck.view(n, h, sk), iv.view(n, h, sv), cv.view(n, h, sv))

    def decode(self, rows: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor):
        """uint8 rows [..., row_bytes] -> (k, v) float32 [..., H, head_dim] (keys before RoPE)."""
        ik, ck, iv, cv = self.unpack(rows)
        return sparse_decode(ik, ck, d_k), sparse_decode(iv, cv, d_v)


# --------------------------------------------------------------------------------------------------------------
# calibration: K/V of a checkpoint, dictionaries and their cache file
# --------------------------------------------------------------------------------------------------------------
def collect_kv(model_dir: str, calib, max_rows: int | None = None, seed: int = 0):
    """Per decoder layer, (K [R, head_dim], V [R, head_dim]) float32 on the CPU: the ``k_proj`` / ``v_proj``
    outputs (bias included, before RoPE) of every calibration token and KV head (``R = tokens * num_kv_heads``,
    rows ordered token-major then head). ``max_rows``: keep at most that many rows per layer and side, a
    deterministic random subset drawn chunk by chunk (the same rows for K and V), so memory stays bounded."""
    from vllm_kvc.artifacts import attn_modules, load_hf_model, progress
    from vllm_kvc.corpus import load_text, token_chunks

    tok, model = load_hf_model(model_dir)
    chunks = token_chunks(tok, load_text(calib.corpus, "calibration"), calib.tokens, calib.seq_len)
    attn = attn_modules(model)
    hkv = model.config.num_key_value_heads
    total = sum(len(c) for c in chunks) * hkv
    g = torch.Generator(device="cpu").manual_seed(seed)
    keep: dict[str, torch.Tensor | None] = {"sel": None}
    out = [([], []) for _ in attn]
    hooks = []
    for i, a in enumerate(attn):
        for side, proj in ((0, a.k_proj), (1, a.v_proj)):
            def hook(mod, args, output, i=i, side=side):
                y = output.detach().to(torch.float32).cpu()
                y = y.reshape(-1, y.shape[-1] // hkv)  # [T * Hkv, d]
                if keep["sel"] is not None:
                    y = y[keep["sel"]]
                out[i][side].append(y)
            hooks.append(proj.register_forward_hook(hook))
    dev = next(model.parameters()).device
    t0 = time.time()
    try:
        with torch.no_grad():
            taken = 0
            for n, ids in enumerate(progress(chunks, "lexico: calibration K/V", unit="chunk")):
                rows = len(ids) * hkv
                if max_rows is not None and max_rows < total:
                    # quota of this chunk so that the chunks share max_rows evenly
                    quota = (max_rows * (taken + rows) + total - 1) // total - (max_rows * taken + total - 1) // total
                    keep["sel"] = torch.randperm(rows, generator=g)[:quota].sort().values
                taken += rows
                model(torch.tensor([ids], device=dev))
                log.debug("lexico: K/V of %d/%d chunks (%.0f s)", n + 1, len(chunks), time.time() - t0)
    finally:
        for h in hooks:
            h.remove()
    res = [(torch.cat(k), torch.cat(v)) for k, v in out]
    log.info("lexico: collected K/V of %d layers, %d rows each (%.1f s)", len(res), res[0][0].shape[0],
             time.time() - t0)
    del model
    return res


def dictionaries_path(model_dir: str, cfg) -> Path:
    from vllm_kvc.artifacts import cache_key, cache_root, checkpoint_fingerprint

    lc = cfg.lexico
    key = cache_key("lexico", LEXICO_FORMAT, checkpoint_fingerprint(model_dir), cfg.calibration.model_dump(),
               lc.atoms, lc.train_sparsity, lc.iters, LEARN_MAX_ROWS)
    return cache_root() / "lexico" / f"{key}.safetensors"


def build_dictionaries(model_dir: str, cfg) -> Path:
    """Learn (or find in the cache) every layer's ``D_k`` / ``D_v`` for this checkpoint, calibration and lexico
    settings; returns the safetensors file (tensors ``k.{layer}``, ``v.{layer}``). Built once under a file lock,
    so concurrent processes (tensor-parallel workers) wait for the first one."""
    from vllm_kvc.artifacts import Parts, cached_tensors, file_lock, progress, save_tensors_atomic

    out = dictionaries_path(model_dir, cfg)
    if cached_tensors(out) is not None:
        return out
    with file_lock(out):
        if cached_tensors(out) is not None:
            return out
        lc = cfg.lexico
        t0 = time.time()
        kv = collect_kv(model_dir, cfg.calibration, max_rows=LEARN_MAX_ROWS)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tensors = {}
        parts = Parts(out)  # each layer's dictionaries as it finishes: a killed build resumes at the next layer
        for i, (k, v) in enumerate(progress(kv, "lexico: dictionaries", unit="layer")):
            done = parts.get(f"layer{i}")
            if done is not None:
                tensors.update(done)
                log.info("lexico: layer %d/%d dictionaries from an interrupted build", i + 1, len(kv))
                continue
            t1 = time.time()
            errs = {}
            for side, x, s in (("k", k, lc.train_sparsity), ("v", v, lc.train_sparsity)):
                last = []
                d = learn_dictionary(x.to(dev), lc.atoms, s, lc.iters, seed=i,
                                     progress=lambda it, e, last=last: last.append(e))
                tensors[f"{side}.{i}"] = d.float().cpu().contiguous()
                errs[side] = last[-1] if last else float("nan")
            parts.put(f"layer{i}", {f"k.{i}": tensors[f"k.{i}"], f"v.{i}": tensors[f"v.{i}"]})
            log.info("lexico: layer %d/%d dictionaries (%d atoms; rel. error while learning K %.3f, V %.3f; %.1f s)",
                     i + 1, len(kv), lc.atoms, errs["k"], errs["v"], time.time() - t1)
        meta = {"format": str(LEXICO_FORMAT), "atoms": str(lc.atoms), "train_sparsity": str(lc.train_sparsity),
                "iters": str(lc.iters), "layers": str(len(kv))}
        save_tensors_atomic(tensors, out, metadata=meta)
        parts.clear()
        log.info("lexico: dictionaries of %d layers written to %s (%.1f s)", len(kv), out, time.time() - t0)
        return out


def load_dictionaries(path: str | Path, layer: int):
    """(D_k, D_v) float32 [atoms, head_dim] of one layer from a :func:`build_dictionaries` file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(f"k.{layer}").float(), f.get_tensor(f"v.{layer}").float()
