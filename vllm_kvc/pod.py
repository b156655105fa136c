"""Method ``pod`` (proximal tokens over distant tokens): the math and the planning, plain torch + transformers.

Adjacent layers attend to *distant* tokens alike. Layers are partitioned into contiguous groups; the first layer
of a group is its lead, the others are followers. The lead caches its keys and values as usual. A follower caches
only its own values; for a query at position ``i`` it scores

- sink tokens (``j < sinks``) and recent tokens (``0 <= i - j < window``) exactly, with its own query and keys;
- every other (distant) token with the *lead's* query and key of the same query head (``q_lead_h . k_lead_j``);

then takes one softmax over all those logits and the weighted sum of its own values. Followers thus drop their
per-token keys (half of their KV bytes); the sink/window keys live in a fixed-size side pool.

This module holds:

- :func:`pod_logits` / :func:`pod_attention`: the reference attention of one sequence (the vLLM glue's oracle);
- :func:`layer_similarity`: how well each (lead, follower) pair works, measured with the HF checkpoint;
- :func:`plan_groups`: the exact dynamic programme that chooses the groups from those scores;
- :class:`PodPlan` and :func:`build_pod_plan`: the plan, cached under ``$VLLM_KVC_CACHE/pod/``.

Importable without vLLM.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_kvc.settings import CalibrationConfig

log = logging.getLogger("vllm_kvc")

POD_FORMAT = 1
DEFAULT_SIMILARITY_TOKENS = 2048  # calibration tokens layer_similarity reads unless told otherwise
_BLOCK_ELEMS = 1 << 24  # logits per query block in pod_attention (bounds its memory for long sequences)


# ----------------------------------------------------------------------------------------------------------------
# attention


def pod_masks(q_positions: torch.Tensor, num_keys: int, window: int, sinks: int, causal: bool = True):
    """``(visible, exact)``, both bool ``[T, S]``: key ``j`` is visible to the query at ``q_positions[t]`` when
    ``j <= i`` (always if not causal); it is scored exactly (own query and key) when ``j < sinks`` or
    ``0 <= i - j < window``, with the lead's query and key otherwise."""
    i = q_positions.to(torch.long).reshape(-1, 1)
    j = torch.arange(num_keys, device=i.device).reshape(1, -1)
    diff = i - j
    visible = diff >= 0 if causal else torch.ones(i.shape[0], num_keys, dtype=torch.bool, device=i.device)
    exact = (j < sinks) | ((diff >= 0) & (diff < window))
    return visible, exact


def _gqa_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, d], k [S, Hkv, d] -> scale * q.k as [Hkv, G, T, S] (q head h = kv head h // G, G = Hq/Hkv)."""
    t, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(t, hkv, hq // hkv, d).permute(1, 2, 0, 3)  # [Hkv, G, T, d]
    kt = k.permute(1, 2, 0).unsqueeze(1)  # [Hkv, 1, d, S]
    return torch.matmul(qg, kt) * scale


def _check_shapes(q_own, k_own, v_own, q_lead, k_lead, q_positions):
    t, hq, d = q_own.shape
    s, hkv, _ = k_own.shape
    if q_lead.shape != q_own.shape:
        raise ValueError(f"q_lead {tuple(q_lead.shape)} and q_own {tuple(q_own.shape)} differ")
    if k_lead.shape != k_own.shape or v_own.shape[:2] != k_own.shape[:2]:
        raise ValueError(f"k_own {tuple(k_own.shape)}, v_own {tuple(v_own.shape)} and k_lead "
                         f"{tuple(k_lead.shape)} must share [S, Hkv]")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if q_positions.numel() != t:
        raise ValueError(f"q_positions has {q_positions.numel()} entries for {t} queries")


def pod_logits(q_own, k_own, q_lead, k_lead, scale: float, window: int, sinks: int, q_positions,
               causal: bool = True) -> torch.Tensor:
    """POD attention logits of one sequence, float32 ``[Hq, T, S]``: own ``q . k`` where exact, the lead's where
    distant, ``-inf`` where not visible (see :func:`pod_masks`). Shapes as in :func:`pod_attention`."""
    _check_shapes(q_own, k_own, k_own, q_lead, k_lead, torch.as_tensor(q_positions))
    t, hq, _ = q_own.shape
    s, hkv, _ = k_own.shape
    q_positions = torch.as_tensor(q_positions, device=q_own.device)
    visible, exact = pod_masks(q_positions, s, window, sinks, causal)
    own = _gqa_logits(q_own.float(), k_own.float(), scale)
    lead = _gqa_logits(q_lead.float(), k_lead.float(), scale)
    return _combine(own, lead, exact, visible).reshape(hq, t, s)


def _combine(own: torch.Tensor, lead: torch.Tensor | None, exact: torch.Tensor, visible: torch.Tensor):
    """Where ``exact`` the own logits, elsewhere the lead's, ``-inf`` where not visible (masks [T, S])."""
    x = own if lead is None else torch.where(exact, own, lead)
    return x.masked_fill(~visible, float("-inf"))


def pod_attention(q_own, k_own, v_own, q_lead, k_lead, scale: float, window: int, sinks: int, q_positions,
                  causal: bool = True) -> torch.Tensor:
    """Reference POD attention of one sequence.

    ``q_own, q_lead [T, Hq, d]``, ``k_own, v_own, k_lead [S, Hkv, d]`` (q/k already RoPE'd; keys at positions
    ``0..S-1``), ``q_positions [T]`` the queries' positions. Query head ``h`` uses KV head ``h // (Hq / Hkv)``, for
    the lead as for the follower. Sink and recent keys (:func:`pod_masks`) are scored with ``q_own . k_own``, the
    distant ones with ``q_lead . k_lead`` (same head index); one softmax (times ``scale``) over every visible
    key, then the sum of ``v_own``. With ``q_lead, k_lead == q_own, k_own`` it is plain (causal) attention.
    Computed in float32 over blocks of queries (bounded memory); returns ``[T, Hq, d]`` in ``q_own``'s dtype.
    """
    _check_shapes(q_own, k_own, v_own, q_lead, k_lead, torch.as_tensor(q_positions))
    t, hq, d = q_own.shape
    s, hkv, _ = k_own.shape
    g = hq // hkv
    pos = torch.as_tensor(q_positions, device=q_own.device).to(torch.long).reshape(-1)
    ko, kl, vo = k_own.float(), k_lead.float(), v_own.float()
    vt = vo.permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, S, d]
    out = torch.empty(t, hq, d, dtype=torch.float32, device=q_own.device)
    block = max(1, _BLOCK_ELEMS // max(1, hq * s))
    for a in range(0, t, block):
        b = min(t, a + block)
        p = pos[a:b]
        visible, exact = pod_masks(p, s, window, sinks, causal)
        # the lead is needed only if some visible key is distant; the own logits only if some is exact
        need_lead = bool((visible & ~exact).any())
        need_own = bool((visible & exact).any())
        own = _gqa_logits(q_own[a:b].float(), ko, scale) if need_own or not need_lead else None
        lead = _gqa_logits(q_lead[a:b].float(), kl, scale) if need_lead else None
        if own is None:
            logits = lead.masked_fill(~visible, float("-inf"))
        else:
            logits = _combine(own, lead, exact, visible)
        probs = torch.softmax(logits, dim=-1)  # [Hkv, G, Tb, S]
        o = torch.matmul(probs, vt)  # [Hkv, G, Tb, d]
        out[a:b] = o.permute(2, 0, 1, 3).reshape(b - a, hq, d)
    return out.to(q_own.dtype)


# ----------------------------------------------------------------------------------------------------------------
# measured similarity of (lead, follower) pairs


def _load_model(model_dir: str):
    from vllm_kvc.artifacts import load_hf_model

    return load_hf_model(model_dir, dtype=torch.float32)


def _rope_fn(model):
    """The checkpoint's own ``apply_rotary_pos_emb`` (Llama, Mistral and Qwen2 modules all define one)."""
    mod = sys.modules[type(model.model.layers[0].self_attn).__module__]
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
    return fn


def capture_qkv(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run ``model`` (an HF Llama / Mistral / Qwen2 causal LM) on one sequence ``ids [T]`` and return, per layer,
    its post-RoPE queries ``[T, Hq, d]``, keys and values ``[T, Hkv, d]`` (float32). Captured with forward hooks
    on ``q_proj/k_proj/v_proj`` (biases included) and on ``model.model.rotary_emb`` (its cos/sin), then rotated
    with the model's own ``apply_rotary_pos_emb``."""
    attn = [layer.self_attn for layer in model.model.layers]
    cfg = model.config
    hd = getattr(attn[0], "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    got: dict = {}
    hooks = []

    def keep(name):
        def hook(mod, args, out):
            got[name] = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        return hook

    for i, a in enumerate(attn):
        for kind in ("q", "k", "v"):
            hooks.append(getattr(a, f"{kind}_proj").register_forward_hook(keep((i, kind))))
    hooks.append(model.model.rotary_emb.register_forward_hook(keep("rope")))
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            # only the decoder stack: the LM head is not needed
            model.model(input_ids=ids.reshape(1, -1).to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    cos, sin = got["rope"]
    rope = _rope_fn(model)
    t = ids.numel()
    out = []
    for i in range(len(attn)):
        q = got[(i, "q")].float().reshape(1, t, -1, hd).transpose(1, 2)  # [1, H, T, d]
        k = got[(i, "k")].float().reshape(1, t, -1, hd).transpose(1, 2)
        q, k = rope(q, k, cos.float(), sin.float())
        v = got[(i, "v")].float().reshape(t, -1, hd)
        out.append((q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(), v))
    return out


def _pair_valid(lead: int, follower: int, max_group: int) -> bool:
    return 0 < follower - lead < max_group


def layer_similarity(model_dir: str, calib: CalibrationConfig, window: int, sinks: int, max_group: int,
                     max_tokens: int | None = None) -> torch.Tensor:
    """Score ``[L, L]`` (float64) of every (lead ``a``, follower ``m``) pair with ``0 < m - a < max_group``; NaN
    elsewhere.

    ``score[a, m] = 1 - mean TV``: the total-variation distance ``0.5 * sum_j |p_j - p'_j|`` between follower
    ``m``'s true attention distribution ``p`` over the visible keys and the POD one ``p'`` (its own logits for the
    sink and recent keys, lead ``a``'s for the distant ones: :func:`pod_logits`), averaged over query heads and
    over the queries that have distant keys (positions ``>= sinks + window``). It is in ``[0, 1]``, 1 when the
    approximation is exact, and bounds the attention output's error: ``|o - o'| <= 2 TV max_j |v_j|``.

    Measured with the HF checkpoint (float32) on the first ``min(calib.tokens, max_tokens)`` calibration tokens
    (``max_tokens`` None: at most ``DEFAULT_SIMILARITY_TOKENS``), in chunks of ``calib.seq_len`` tokens. Sliding
    window attention (Mistral) is ignored: chunks are assumed shorter than the window.
    """
    from vllm_kvc.corpus import load_text, token_chunks

    if max_group < 1:
        raise ValueError(f"max_group {max_group}: expected >= 1")
    n_tokens = _similarity_tokens(calib, max_tokens)
    seq_len = min(calib.seq_len, n_tokens)
    if seq_len <= sinks + window:
        raise ValueError(f"calibration.seq_len {seq_len} leaves no distant tokens with window {window} and sinks "
                         f"{sinks}: expected seq_len > window + sinks")
    t0 = time.time()
    tok, model = _load_model(model_dir)
    chunks = token_chunks(tok, load_text(calib.corpus, "calibration"), n_tokens, seq_len)
    attn = [layer.self_attn for layer in model.model.layers]
    nl = len(attn)
    scale = float(attn[0].scaling)
    tv_sum = torch.zeros(nl, nl, dtype=torch.float64)
    count = 0
    log.info("pod similarity: %d layers, %d chunks of %d tokens, window %d, sinks %d, max_group %d",
             nl, len(chunks), seq_len, window, sinks, max_group)
    from vllm_kvc.artifacts import progress

    for c, ids in enumerate(progress(chunks, "pod: layer similarity", unit="chunk")):
        qkv = capture_qkv(model, torch.tensor(ids))
        t = len(ids)
        dev = qkv[0][0].device
        visible, exact = pod_masks(torch.arange(t, device=dev), t, window, sinks, causal=True)
        distant_q = (visible & ~exact).any(-1)  # [T] queries with distant keys
        nq = int(distant_q.sum())
        exact_d = exact[distant_q]
        logits: dict[int, torch.Tensor] = {}  # the last max_group layers' logits of the distant queries
        with torch.no_grad():
            for m in range(nl):
                q, k, _ = qkv[m]
                logits[m] = _combine(_gqa_logits(q[distant_q], k, scale), None, exact_d, visible[distant_q])
                logits.pop(m - max_group, None)
                if m == 0 or max_group < 2:
                    continue
                p_true = torch.softmax(logits[m], dim=-1)  # [Hkv, G, nq, S]
                for a in range(max(0, m - max_group + 1), m):
                    p_pod = torch.softmax(torch.where(exact_d, logits[m], logits[a]), dim=-1)
                    tv = 0.5 * (p_true - p_pod).abs().sum(-1)  # [Hkv, G, nq]
                    tv_sum[a, m] += tv.double().sum().item()
        count += nq * qkv[0][0].shape[1]
        del qkv, logits
        log.info("pod similarity: chunk %d/%d (%.1f s)", c + 1, len(chunks), time.time() - t0)
    score = torch.full((nl, nl), float("nan"), dtype=torch.float64)
    for m in range(nl):
        for a in range(max(0, m - max_group + 1), m):
            score[a, m] = 1.0 - tv_sum[a, m] / count
    del model
    log.info("pod similarity done in %.1f s", time.time() - t0)
    return score


# ----------------------------------------------------------------------------------------------------------------
# planning


def max_followers(num_layers: int, max_group: int) -> int:
    """Most followers ``num_layers`` layers allow in contiguous groups of at most ``max_group`` layers."""
    return num_layers - -(-num_layers // max_group)


def plan_groups(score: torch.Tensor, followers: int, max_group: int) -> list[list[int]]:
    """Partition layers ``0..L-1`` into ``L - followers`` contiguous groups of at most ``max_group`` layers that
    maximizes ``sum score[lead, follower]`` over every follower (the lead is its group's first layer).

    Exact dynamic programme over (layers covered, groups used): ``O(L * groups * max_group)``. Only entries
    ``score[a, m]`` with ``0 < m - a < max_group`` are read; they must be finite. Raises ValueError naming
    ``pod.followers`` / ``pod.max_group`` when no such partition exists.
    """
    score = torch.as_tensor(score, dtype=torch.float64)
    if score.dim() != 2 or score.shape[0] != score.shape[1] or score.shape[0] < 1:
        raise ValueError(f"score must be a square [L, L] matrix, got {tuple(score.shape)}")
    nl = score.shape[0]
    if max_group < 1:
        raise ValueError(f"pod.max_group {max_group}: expected >= 1")
    most = max_followers(nl, max_group)
    if not 0 <= followers <= most:
        raise ValueError(f"pod.followers {followers}: {nl} layers in groups of at most {max_group} allow between "
                         f"0 and {most} followers")
    s = score.tolist()
    for m in range(nl):
        for a in range(max(0, m - max_group + 1), m):
            if not math.isfinite(s[a][m]):
                raise ValueError(f"score[{a}, {m}] is {s[a][m]}: every pair within max_group must be scored")
    ngroups = nl - followers
    # value of group [a, e): sum of score[a, m], a < m < e
    neg = float("-inf")
    best = [[neg] * (ngroups + 1) for _ in range(nl + 1)]
    back = [[0] * (ngroups + 1) for _ in range(nl + 1)]
    best[0][0] = 0.0
    for e in range(1, nl + 1):
        for g in range(1, min(e, ngroups) + 1):
            for size in range(1, min(max_group, e) + 1):
                a = e - size
                prev = best[a][g - 1]
                if prev == neg:
                    continue
                val = prev + sum(s[a][m] for m in range(a + 1, e))
                if val > best[e][g]:
                    best[e][g], back[e][g] = val, size
    if best[nl][ngroups] == neg:  # unreachable given the check above
        raise ValueError(f"pod.followers {followers}: no partition of {nl} layers into {ngroups} groups")
    groups, e, g = [], nl, ngroups
    while e > 0:
        size = back[e][g]
        groups.insert(0, list(range(e - size, e)))
        e, g = e - size, g - 1
    return groups


def groups_score(score: torch.Tensor, groups) -> float:
    """Sum of ``score[lead, follower]`` over the followers of ``groups``."""
    return float(sum(float(score[g[0], m]) for g in groups for m in g[1:]))


@dataclass(frozen=True)
class PodPlan:
    """Sharing groups of adjacent layers (first = lead) and the follower's exact window/sinks."""

    groups: tuple[tuple[int, ...], ...]
    window: int = 64
    sinks: int = 4

    def __post_init__(self):
        groups = tuple(tuple(int(i) for i in g) for g in self.groups)
        flat = [i for g in groups for i in g]
        if not groups or any(not g for g in groups) or flat != list(range(len(flat))):
            raise ValueError(f"pod groups: expected non-empty groups of adjacent layers covering 0..L-1 in order, "
                             f"got {[list(g) for g in groups]}")
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"pod window {self.window} / sinks {self.sinks}: expected >= 0")
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "_lead", tuple(g[0] for g in groups for _ in g))

    @property
    def num_layers(self) -> int:
        return len(self._lead)

    @property
    def leads(self) -> tuple[int, ...]:
        return tuple(g[0] for g in self.groups)

    @property
    def followers(self) -> int:
        return self.num_layers - len(self.groups)

    @property
    def max_group(self) -> int:
        return max(len(g) for g in self.groups)

    def lead_of(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")
        return self._lead[layer]

    def is_follower(self, layer: int) -> bool:
        return self.lead_of(layer) != layer

    def kv_bytes_per_token(self, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> list[int]:
        """Paged-cache bytes one token costs in each layer: K and V for a lead, V only for a follower (the
        follower's sink/window keys live in a fixed-size side pool, not per token)."""
        row = num_kv_heads * head_dim * dtype_bytes
        return [row if self.is_follower(i) else 2 * row for i in range(self.num_layers)]

    def to_json(self) -> dict:
        return {"method": "pod", "groups": [list(g) for g in self.groups], "window": self.window,
                "sinks": self.sinks}

    @classmethod
    def from_json(cls, data: dict | str) -> "PodPlan":
        if isinstance(data, str):
            data = json.loads(data)
        if data.get("method", "pod") != "pod":
            raise ValueError(f"not a pod plan: method {data.get('method')!r}")
        return cls(groups=data["groups"], window=int(data["window"]), sinks=int(data["sinks"]))


# ----------------------------------------------------------------------------------------------------------------
# building (cached)


def _similarity_tokens(calib: CalibrationConfig, max_tokens: int | None) -> int:
    cap = DEFAULT_SIMILARITY_TOKENS if max_tokens is None else max_tokens
    return max(1, min(calib.tokens, cap))


def similarity_path(model_dir: str, cfg, max_tokens: int | None = None) -> Path:
    from vllm_kvc.artifacts import cache_key, cache_root, checkpoint_fingerprint

    pc = cfg.pod
    key = cache_key("pod-similarity", POD_FORMAT, checkpoint_fingerprint(model_dir), cfg.calibration.model_dump(),
               _similarity_tokens(cfg.calibration, max_tokens), pc.window, pc.sinks, pc.max_group)
    return cache_root() / "pod" / f"{key}.safetensors"


def _num_layers(model_dir: str) -> int:
    p = Path(model_dir) / "config.json"
    if p.exists():
        cfg = json.loads(p.read_text())
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir).to_dict()
    return int(cfg["num_hidden_layers"])


def load_or_compute_similarity(model_dir: str, cfg, max_tokens: int | None = None) -> torch.Tensor:
    """:func:`layer_similarity` of this checkpoint and settings, from the cache or computed once (file lock)."""
    from vllm_kvc.artifacts import cached_tensors, file_lock, save_tensors_atomic

    path = similarity_path(model_dir, cfg, max_tokens)
    if (t := cached_tensors(path)) is not None:
        return t["score"].double()
    with file_lock(path):
        if (t := cached_tensors(path)) is not None:
            return t["score"].double()
        pc = cfg.pod
        score = layer_similarity(model_dir, cfg.calibration, pc.window, pc.sinks, pc.max_group, max_tokens)
        meta = {"format": str(POD_FORMAT), "window": str(pc.window), "sinks": str(pc.sinks),
                "max_group": str(pc.max_group), "calibration": json.dumps(cfg.calibration.model_dump())}
        save_tensors_atomic({"score": score.float().contiguous()}, path, metadata=meta)
        log.info("pod similarity written to %s", path)
        return score


def build_pod_plan(model_dir: str, cfg) -> PodPlan:
    """The POD plan of this checkpoint: ``cfg.pod.groups`` if given, otherwise the groups of :func:`plan_groups`
    over the (cached) measured similarity, with ``cfg.pod.followers`` followers (default: half of the layers,
    clipped to what ``max_group`` allows). The plan is also written as JSON next to the similarity file."""
    from vllm_kvc.artifacts import cached_json, write_text_atomic

    pc = cfg.pod
    nl = _num_layers(model_dir)
    if pc.groups is not None:
        plan = PodPlan(pc.groups, pc.window, pc.sinks)
        if plan.num_layers != nl:
            raise ValueError(f"pod.groups cover {plan.num_layers} layers, the checkpoint has {nl}")
        if plan.max_group > pc.max_group:
            raise ValueError(f"pod.groups: a group of {plan.max_group} layers is larger than max_group {pc.max_group}")
        if pc.followers is not None and pc.followers != plan.followers:
            raise ValueError(f"pod.followers {pc.followers} disagrees with pod.groups ({plan.followers} followers)")
        return plan
    most = max_followers(nl, pc.max_group)
    followers = min(nl // 2, most) if pc.followers is None else pc.followers
    if not 0 <= followers <= most:
        raise ValueError(f"pod.followers {followers}: {nl} layers in groups of at most {pc.max_group} allow at "
                         f"most {most} followers")
    if followers == 0:
        return PodPlan([[i] for i in range(nl)], pc.window, pc.sinks)
    score = load_or_compute_similarity(model_dir, cfg)
    groups = plan_groups(score, followers, pc.max_group)
    plan = PodPlan(groups, pc.window, pc.sinks)
    total = groups_score(score, groups)
    out = similarity_path(model_dir, cfg).with_suffix(f".f{followers}.json")
    if cached_json(out) is not None:  # the record of these very groups (same key, same followers): written once
        return plan
    record = dict(plan.to_json(), followers=followers, max_group=pc.max_group, score_sum=total,
                  scores={str(m): float(score[g[0], m]) for g in groups for m in g[1:]})
    write_text_atomic(json.dumps(record, indent=1), out)
    log.info("pod plan: %d followers in groups %s (mean score %.4f), written to %s", followers,
             [list(g) for g in plan.groups if len(g) > 1], total / max(1, followers), out)
    return plan


def cached_pod_plan(model_dir: str, cfg) -> PodPlan | None:
    """:func:`build_pod_plan` if it needs no measurement (explicit groups, or a cached similarity), else None."""
    pc = cfg.pod
    if pc.groups is not None or pc.followers == 0 or similarity_path(model_dir, cfg).exists():
        return build_pod_plan(model_dir, cfg)
    return None
