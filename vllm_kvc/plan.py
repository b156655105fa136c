"""Per-layer rank plan: turns a CompressionConfig and a model's shape into (rank_k, rank_v) per layer.

Plain Python (reads a HF config.json); importable without vLLM or torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_kvc.config import SUPPORTED_ARCHITECTURES, CompressionConfig, ConfigError

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}
SPARSE_PAIR_BYTES = 4  # lexico: one int16 atom index + one fp16 coefficient
FLOAT_LATENTS = ("bfloat16", "float16", "float32")
INT_LATENTS = {"int8": 8, "int4": 4, "int2": 2}


def latent_spec(dtype_k: str, dtype_v: str | None = None, quant_group: int = 0) -> str:
    """Canonical latent dtype spec (what ``LatentLayout.dtype`` holds): ``"bfloat16"``, ``"int8"`` (one scale per
    token, head group and K/V: the original int8 layout), ``"int4"``, ``"int8/int4"`` (K int8, V int4), and any of
    the integer ones with ``"@g32"`` (one scale per 32 latent values) appended."""
    dtype_v = dtype_v or dtype_k
    for d in (dtype_k, dtype_v):
        if d not in FLOAT_LATENTS and d not in INT_LATENTS:
            raise ValueError(f"latent dtype {d!r}: expected one of {list(FLOAT_LATENTS) + list(INT_LATENTS)}")
    if dtype_k in FLOAT_LATENTS or dtype_v in FLOAT_LATENTS:
        if dtype_k != dtype_v:
            raise ValueError(f"K latents {dtype_k} and V latents {dtype_v}: mixed dtypes must both be integer")
        if quant_group:
            raise ValueError("quant_group applies to integer latents only")
        return dtype_k
    s = dtype_k if dtype_k == dtype_v else f"{dtype_k}/{dtype_v}"
    return s + (f"@g{quant_group}" if quant_group else "")


def parse_latent_spec(spec: str) -> tuple[str, str, int]:
    """``spec`` -> (K dtype, V dtype, quant_group); quant_group 0 = one scale per token, head group and K/V."""
    base, _, g = spec.partition("@g")
    qg = int(g) if g else 0
    dk, _, dv = base.partition("/")
    dv = dv or dk
    if latent_spec(dk, dv, qg) != spec:
        raise ValueError(f"latent dtype {spec!r}: expected e.g. 'bfloat16', 'int8', 'int4', 'int8/int4', 'int4@g32'")
    return dk, dv, qg


def latent_part_bytes(groups: int, rank: int, dtype: str, quant_group: int) -> tuple[int, int]:
    """(value bytes, scale count) of one K or V part of a row: integer values are packed 8/bits per byte over
    the part's ``groups * rank`` values (the last byte zero-padded); one fp16 scale per head group (quant_group
    0) or per ``quant_group`` values of each head group's latent."""
    if dtype in FLOAT_LATENTS:
        return groups * rank * _DTYPE_BYTES[dtype], 0
    bits = INT_LATENTS[dtype]
    nvals = groups * rank
    vbytes = (nvals * bits + 7) // 8
    nscales = groups * (-(-rank // quant_group) if quant_group else 1)
    return vbytes, nscales


def latent_row_bytes(groups: int, rank_k: int, rank_v: int, spec: str) -> int:
    """Bytes of one token's latent row of one layer (scales included); the single formula of layout and plan."""
    dk, dv, qg = parse_latent_spec(spec)
    kb, ks = latent_part_bytes(groups, rank_k, dk, qg)
    vb, vs = latent_part_bytes(groups, rank_v, dv, qg)
    return kb + vb + 2 * (ks + vs)


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelShape":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else "<none>"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError("model", f"architecture {arch} is not supported: expected one of "
                                       f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
        return cls(arch, cfg["num_hidden_layers"], cfg["hidden_size"], heads,
                   cfg.get("num_key_value_heads", heads), head_dim, str(dtype))

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelShape":
        p = Path(path) / "config.json"
        if not p.exists():
            raise ConfigError("model", f"{p} not found: expected a Hugging Face checkpoint folder")
        return cls.from_hf_config(json.loads(p.read_text()))


@dataclass(frozen=True)
class CompressionPlan:
    shape: ModelShape
    group_size: int
    latent_dtype: str  # resolved latent spec (see latent_spec): bfloat16 / float16 / float32 / int8 / int4 / int8/int4@g32 ...
    ranks_k: tuple[int, ...]  # per layer, per head group
    ranks_v: tuple[int, ...]
    identity: bool = False  # method "quant": full-rank identity factors (the latent is K / V itself), no rotation
    method: str = "lowrank"  # lowrank | quant | lexico | pod (see config.CompressionConfig.method)
    # lexico: ranks_k / ranks_v hold the non-zero coefficients per KV head of each layer; pod: ranks_k is 0 for the
    # followers (their keys are not cached per token) and head_dim for leads, ranks_v head_dim everywhere

    @property
    def group_dim(self) -> int:
        return self.group_size * self.shape.head_dim

    @property
    def num_groups(self) -> int:
        return self.shape.num_kv_heads // self.group_size

    def layer_bytes_per_token(self, layer: int, tp_size: int = 1) -> int:
        """Bytes one token costs in this layer's cache on one TP rank (scales included)."""
        if self.method == "lexico":
            kv = max(1, self.shape.num_kv_heads // tp_size)
            return kv * (self.ranks_k[layer] + self.ranks_v[layer]) * SPARSE_PAIR_BYTES
        groups = max(1, self.num_groups // tp_size) if self.shape.num_kv_heads >= tp_size else 1
        return latent_row_bytes(groups, self.ranks_k[layer], self.ranks_v[layer], self.latent_dtype)

    @property
    def quantized(self) -> bool:
        return parse_latent_spec(self.latent_dtype)[0] in INT_LATENTS

    @property
    def rotate(self) -> bool:
        """Factors are rotated (Hadamard / random orthogonal) for integer latents, except identity factors."""
        return self.quantized and not self.identity

    def bytes_per_token(self, tp_size: int = 1) -> int:
        return sum(self.layer_bytes_per_token(i, tp_size) for i in range(self.shape.num_layers))

    def baseline_bytes_per_token(self, tp_size: int = 1, dtype_bytes: int | None = None) -> int:
        db = dtype_bytes or _DTYPE_BYTES.get(self.shape.dtype, 2)
        kv = max(1, self.shape.num_kv_heads // tp_size)
        return self.shape.num_layers * 2 * kv * self.shape.head_dim * db

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        return d


def _clip(r: float, full: int) -> int:
    return int(min(full, max(1, round(r))))


def schedule_ranks(ratio: float, num_layers: int, full: int, schedule: str, spread: float) -> list[int]:
    """Rank per layer for a mean rank of ``ratio * full``.

    ``uniform``: every layer the same. ``progressive`` (LoRC): ranks fall linearly with depth, layer 0 keeping
    ``(1+spread)`` and the last ``(1-spread)`` times the mean; what clipping at full rank removes from shallow
    layers is given back to the deepest ones that have room, so the total matches the uniform budget.
    """
    mean = ratio * full
    if schedule == "uniform" or num_layers == 1:
        return [_clip(mean, full)] * num_layers
    if schedule != "progressive":
        raise ConfigError("compression.schedule", f"unknown schedule {schedule!r}")
    weights = [1 + spread - 2 * spread * i / (num_layers - 1) for i in range(num_layers)]
    ranks = [_clip(mean * w, full) for w in weights]
    budget = _clip(mean, full) * num_layers
    # rebalance to the uniform budget: add to the shallowest layers with room, remove from the deepest
    i = 0
    while sum(ranks) < budget and any(r < full for r in ranks):
        if ranks[i % num_layers] < full:
            ranks[i % num_layers] += 1
        i += 1
    j = num_layers - 1
    while sum(ranks) > budget and any(r > 1 for r in ranks):
        if ranks[j % num_layers] > 1:
            ranks[j % num_layers] -= 1
        j -= 1
    return ranks


def pod_default_groups(num_layers: int, followers: int, max_group: int) -> list[list[int]]:
    """Sharing groups used before similarity is measured (only their byte count matters then): ``followers``
    followers in groups of at most ``max_group`` from the deepest layers up."""
    groups, i, left = [], num_layers - 1, followers
    while i >= 0:
        size = min(max_group, left + 1, i + 1)
        groups.insert(0, list(range(i - size + 1, i + 1)))
        left -= size - 1
        i -= size
    return groups


def pod_followers(cfg: CompressionConfig, num_layers: int) -> int:
    pc = cfg.pod
    most = num_layers - -(-num_layers // pc.max_group)
    f = pc.followers if pc.followers is not None else min(num_layers // 2, most)
    if f > most:
        raise ConfigError("compression.pod.followers",
                          f"{f} followers do not fit {num_layers} layers in groups of at most {pc.max_group} "
                          f"(at most {most})")
    return min(f, most)


def check_pod_groups(groups, num_layers: int, max_group: int, field: str = "compression.pod.groups") -> None:
    flat = [i for g in groups for i in g]
    if flat != list(range(num_layers)) or any(not g for g in groups):
        raise ConfigError(field, f"expected non-empty groups of adjacent layers covering 0..{num_layers - 1} in "
                                 f"order, got {groups}")
    if any(len(g) > max_group for g in groups):
        raise ConfigError(field, f"a group is larger than max_group {max_group}")


def _special_plan(cfg: CompressionConfig, shape: ModelShape, pod_groups=None) -> CompressionPlan:
    n, hd = shape.num_layers, shape.head_dim
    dt = shape.dtype if shape.dtype in FLOAT_LATENTS else "bfloat16"
    if cfg.method == "lexico":
        lc = cfg.lexico
        for name, s in (("sparsity_k", lc.sparsity_k), ("sparsity_v", lc.sparsity_v)):
            if s > hd:
                raise ConfigError(f"compression.lexico.{name}", f"{s} is larger than head_dim {hd}")
        if lc.atoms < max(lc.sparsity_k, lc.sparsity_v):
            raise ConfigError("compression.lexico.atoms", f"{lc.atoms} atoms: expected at least the sparsity")
        return CompressionPlan(shape, 1, "float16", (lc.sparsity_k,) * n, (lc.sparsity_v,) * n, method="lexico")
    # pod
    groups = pod_groups if pod_groups is not None else cfg.pod.groups
    if groups is not None:
        check_pod_groups(groups, n, cfg.pod.max_group)
    else:
        groups = pod_default_groups(n, pod_followers(cfg, n), cfg.pod.max_group)
    followers = {i for g in groups for i in g[1:]}
    rk = tuple(0 if i in followers else hd for i in range(n))
    return CompressionPlan(shape, 1, dt, rk, (hd,) * n, method="pod")


def pod_groups_of(plan: CompressionPlan) -> list[list[int]]:
    """The sharing groups of a pod plan (a follower belongs to the nearest lead above it)."""
    groups: list[list[int]] = []
    for i, r in enumerate(plan.ranks_k):
        if r or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    return groups


def build_plan(cfg: CompressionConfig, shape: ModelShape, tp_size: int = 1, pod_groups=None) -> CompressionPlan:
    """The plan of ``cfg`` for ``shape``; ``pod_groups``: method pod's measured sharing groups (without them,
    and without explicit ``pod.groups``, a pod plan has the right bytes but placeholder groups)."""
    if tp_size > 1 and shape.num_kv_heads % tp_size and shape.num_kv_heads > tp_size:
        raise ConfigError("engine.tensor_parallel_size",
                          f"{tp_size} does not divide the model's {shape.num_kv_heads} KV heads")
    if cfg.method in ("lexico", "pod"):
        return _special_plan(cfg, shape, pod_groups)
    gs = cfg.group_size
    if shape.num_kv_heads % gs:
        raise ConfigError("compression.group_size",
                          f"{gs} does not divide the model's {shape.num_kv_heads} KV heads")
    if tp_size > 1:
        if shape.num_kv_heads >= tp_size:
            per_rank = shape.num_kv_heads // tp_size
            if shape.num_kv_heads % tp_size or per_rank % gs:
                raise ConfigError("compression.group_size",
                                  f"{gs} must divide the {per_rank} KV heads each of {tp_size} tensor-parallel "
                                  f"ranks holds, so no head group straddles two ranks")
        elif gs != 1:
            raise ConfigError("compression.group_size",
                              f"with tensor_parallel_size {tp_size} > {shape.num_kv_heads} KV heads each rank "
                              f"holds one replicated KV head: expected group_size 1")
    full = gs * shape.head_dim
    n = shape.num_layers
    if cfg.ranks is not None:
        for kind, lst in (("k", cfg.ranks.k), ("v", cfg.ranks.v)):
            if len(lst) != n:
                raise ConfigError(f"compression.ranks.{kind}",
                                  f"has {len(lst)} entries: expected one per layer ({n})")
            for i, r in enumerate(lst):
                if r > full:
                    raise ConfigError(f"compression.ranks.{kind}[{i}]",
                                      f"rank {r} is larger than the head-group dimension {full} "
                                      f"(group_size {gs} x head_dim {shape.head_dim})")
        rk, rv = list(cfg.ranks.k), list(cfg.ranks.v)
    else:
        rk = schedule_ranks(cfg.k_ratio, n, full, cfg.schedule, cfg.progressive_spread)
        rv = schedule_ranks(cfg.v_ratio, n, full, cfg.schedule, cfg.progressive_spread)
    if cfg.method == "quant":  # KIVI-style per-token-group quantization of K and V themselves: full rank
        rk, rv = [full] * n, [full] * n
        dk = dv = f"int{cfg.bits}"
        qg = cfg.quant_group if cfg.quant_group is not None else 32
    else:
        dt = cfg.latent_dtype
        if dt == "auto":
            dt = shape.dtype if shape.dtype in FLOAT_LATENTS else "bfloat16"
        dk, dv = cfg.latent_dtype_k or dt, cfg.latent_dtype_v or dt
        qg = cfg.quant_group or 0
    try:
        spec = latent_spec(dk, dv, qg)
    except ValueError as e:
        raise ConfigError("compression.latent_dtype", str(e)) from None
    return CompressionPlan(shape, gs, spec, tuple(rk), tuple(rv), identity=cfg.method == "quant")
