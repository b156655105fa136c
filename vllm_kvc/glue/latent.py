"""Methods ``lowrank`` and ``quant`` in vLLM: each token's latent row (layout.py) in the paged cache; attention
rebuilds keys (then RoPE) and folds ``B_v`` after the weighted sum.

After weight loading, ``kvc_finalize`` swaps the decoder layer's K and V projections for this TP rank's latent
projections ``A_k, A_v`` (its own head groups), fused with Q into one matmul. Per token the layer emits ``q``
(RoPE applied) and the latent row; ``kvc_attend`` writes the rows and computes attention: the Triton kernels on
CUDA tensors (kernels/triton_latent; every latent dtype, checked once in ``kvc_finalize``), the plain-torch
reference (kernels/reference.py) elsewhere.

With ``roped_keys`` (``keys: roped``) the layer keeps the checkpoint's K projection: per token it emits the roped
key's latent ``c = RoPE(k) A_k`` (per head group), and attention scores the cached latents with each query head's
``q B_k^T`` (kernels/reference.py and the Triton kernels, ``roped_keys``): no cached key is rebuilt or rotated.

With ``sink`` (method ``tcode``) the first token of every sequence is also kept exact: the layer computes that
token's K and V with the checkpoint's own projections and keeps them in bf16 in a side pool keyed by the
sequence's first vLLM block (glue/window.py), one row per live sequence outside vLLM's paged bytes; attention
reads position 0 from there (kernels/reference.py ``sink``). On CUDA the pool is a ``SinkTable`` (glue/sink.py:
block id -> page on the device): decode steps read it without host synchronisation (capturable in CUDA graphs) and
the Triton kernels merge it in their split-KV reduce; steps in which a sequence starts write it (one host read of
the first block ids; vLLM runs those steps eagerly, and no write is recorded while a graph is being captured).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from vllm_kvc.calibrate import load_layer_factors
from vllm_kvc.glue.attention import RowAttention
from vllm_kvc.glue.sink import SinkTable
from vllm_kvc.glue.window import RecentPool, attend_windowed
from vllm_kvc.kernels import cpu_latent, reference
from vllm_kvc.layout import LatentLayout


@functools.cache
def _triton_ops():
    try:
        from vllm_kvc.kernels import triton_latent
        return triton_latent
    except Exception:  # triton missing or no GPU backend
        return None


def _rope_inv_freq(rotary_emb, dev: torch.device) -> torch.Tensor | None:
    """The rotary embedding's fp32 inverse frequencies, for the GPU decode kernel's in-kernel cos / sin (None on
    CPU or where the embedding does not expose them). The kernels use them only where they reproduce
    ``cos_sin_cache`` (``triton_latent.angles_match``): scaled variants (YaRN, linear) keep reading the table."""
    if dev.type != "cuda" or not hasattr(rotary_emb, "_compute_inv_freq"):
        return None
    try:
        return rotary_emb._compute_inv_freq(rotary_emb.base).float().to(dev)
    except Exception:  # noqa: BLE001 (a variant with another signature: the table path is always correct)
        return None


def check_kernel_layout(layout: LatentLayout, where: str = "") -> None:
    """On CUDA devices attention runs on the Triton kernels only: a layout they cannot read (or a missing
    Triton) is a configuration error at start-up, never a silent fallback to the plain-torch reference (which
    rebuilds every cached K/V densely each step). Raises ValueError naming the latent dtype."""
    at = f" ({where})" if where else ""
    ops = _triton_ops()
    if ops is None:
        raise ValueError(f"latent dtype {layout.dtype!r}{at}: attention on CUDA needs the Triton kernels "
                         "(vllm_kvc.kernels.triton_latent), which could not be imported")
    try:
        ops.check_supported(layout)
    except NotImplementedError as e:
        raise ValueError(f"latent dtype {layout.dtype!r}{at}: the Triton kernels cannot read this layout "
                         f"(groups={layout.groups}, group_size={layout.group_size}, head_dim={layout.head_dim}, "
                         f"rank_k={layout.rank_k}, rank_v={layout.rank_v}): {e}") from e


class LatentAttention(RowAttention):
    """A vLLM attention layer whose KV cache holds one latent row per token (see layout.py)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, layout: LatentLayout,
                 factors_path=None, cache_config=None, prefix: str = "", sink: bool = False,
                 roped_keys: bool = False, window: int = 0):
        super().__init__(num_heads, head_size, scale, num_kv_heads, layout.row_bytes, layout.cache_dtype,
                         cache_config=cache_config, prefix=prefix)
        self.layout = layout
        self.factors_path = factors_path
        self.sink = sink
        self.roped_keys = roped_keys
        self.window = int(window)  # newest tokens each query reads exactly (method tcode; CPU path)
        self.window_pool: RecentPool | None = None
        self.a_k = self.q_keys = None  # roped keys: [G, gdim, rank_k] and per query head [Hq, hd, rank_k]
        self.w_kv = self.bias_kv = None  # the checkpoint's K/V projections of this rank (sink only)
        self.sink_pool: RecentPool | SinkTable | None = None
        # filled by kvc_finalize() once weights are loaded
        self.b_k = self.b_v = self.bias_k = self.bias_v = self.cos_sin_cache = self.inv_freq = None
        self.is_neox = True

    @torch.no_grad()
    def kvc_finalize(self, layer) -> None:
        """Replace the K/V projections by this rank's latent projections, fused with Q."""
        w = layer.qkv_proj.weight.data
        dt, dev = w.dtype, w.device
        a_k, b_k, a_v, b_v = load_layer_factors(self.factors_path, layer.layer_idx, layer.groups)
        if self.window and dev.type == "cuda":
            raise ValueError(f"{getattr(self, 'layer_name', '')}: compression.tcode.window: exact recent tokens are "
                             "served by the CPU path only; expected window 0 on GPUs")
        if self.sink or self.window:
            if self.roped_keys:
                raise ValueError(f"{getattr(self, 'layer_name', '')}: compression.tcode.sink: the exact first token "
                                 "does not combine with roped keys")
            self.w_kv = w[layer.q_size:].clone()
            if layer.qkv_proj.bias is not None:
                self.bias_kv = layer.qkv_proj.bias.data[layer.q_size:].clone()
        lay = self.layout
        if self.roped_keys:
            # Q and the checkpoint's K projection, then A_v; the K latent is taken after RoPE (kvc_forward)
            kept, kept_bias = w[: layer.q_size + layer.kv_size].float().cpu(), layer.q_size + layer.kv_size
            gdim = lay.group_size * lay.head_dim
            fdt = torch.float32 if dev.type == "cpu" else dt  # the model dtype on GPUs (as B_k / B_v below)
            self.a_k = a_k.float().view(gdim, lay.groups, lay.rank_k).transpose(0, 1).contiguous().to(fdt).to(dev)
            self.q_keys = reference.head_key_views(b_k.float(), lay, self.num_heads).contiguous().to(fdt).to(dev)
        else:
            kept, kept_bias = torch.cat([w[: layer.q_size].float().cpu(), a_k.t()]), layer.q_size
        layer.fused_weight = nn.Parameter(torch.cat([kept, a_v.t()]).to(dt).to(dev), requires_grad=False)
        bias = layer.qkv_proj.bias
        if bias is not None:
            b = bias.data
            zeros = torch.zeros(lay.groups * lay.rank_v + (0 if self.roped_keys else lay.groups * lay.rank_k),
                                dtype=b.dtype, device=dev)
            layer.fused_bias = nn.Parameter(torch.cat([b[:kept_bias], zeros]), requires_grad=False)
            self.bias_k = b[layer.q_size: layer.q_size + layer.kv_size].float().clone()
            self.bias_v = b[layer.q_size + layer.kv_size:].float().clone()
        # rebuild factors are kept in float32 on CPU (reference path) and in the model dtype on GPUs
        fdt = torch.float32 if dev.type == "cpu" else dt
        self.b_k = b_k.to(fdt).to(dev).contiguous()
        self.b_v = b_v.to(fdt).to(dev).contiguous()
        cs = layer.rotary_emb.cos_sin_cache
        self.cos_sin_cache = cs.float().to(dev) if dev.type == "cpu" else cs.to(dev)
        self.is_neox = bool(getattr(layer.rotary_emb, "is_neox_style", True))
        self.inv_freq = _rope_inv_freq(layer.rotary_emb, dev)
        if dev.type == "cuda":
            check_kernel_layout(self.layout, getattr(self, "layer_name", ""))
        del layer.qkv_proj

    def kvc_forward(self, layer, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden_states, layer.fused_weight, layer.fused_bias)
        if self.roped_keys:
            lay = self.layout
            q, k, lat_v = out.split([layer.q_size, layer.kv_size, lay.groups * lay.rank_v], dim=-1)
            q, k = layer.rotary_emb(positions, q.contiguous(), k.contiguous())
            lat_k = torch.einsum("ngd,gdr->ngr", k.view(-1, lay.groups, self.a_k.shape[1]).to(self.a_k.dtype),
                                 self.a_k)
            return self(q, torch.cat([lat_k.flatten(1).to(lat_v.dtype), lat_v], dim=-1))
        q, lat = out.split([layer.q_size, self.layout.width], dim=-1)
        if self.window:  # exact K (roped) / V of every token ride along; kvc_attend keeps the sink and window
            k, v = F.linear(hidden_states, self.w_kv, self.bias_kv).split(layer.kv_size, dim=-1)
            q, k = layer.rotary_emb(positions, q.contiguous(), k.contiguous())
            return self(q, lat.contiguous(), torch.cat([k, v], dim=-1))
        q, _ = layer.rotary_emb(positions, q.contiguous(), None)
        if self.sink:  # exact K/V of every token ride along; kvc_attend keeps those of position 0
            return self(q, lat.contiguous(), F.linear(hidden_states, self.w_kv, self.bias_kv))
        return self(q, lat.contiguous())

    def kvc_attend(self, query, key, value, cache, md, output) -> None:
        layout = self.layout
        n = md.num_actual_tokens
        lat = key[:n]
        q = query[:n]
        if self.roped_keys:  # each query head scores the cached latents directly: q B_k^T
            q = torch.einsum("nhd,hdr->nhr", q.to(self.q_keys.dtype), self.q_keys)
        if q.is_cuda:  # every layout was checked at start-up (kvc_finalize): no fallback here; capturable decode
            sink = self._sink_step_cuda(value[:n], md, cache.shape[0]) if self.sink else None
            _triton_ops().latent_step(
                q, lat, cache, layout, md.slot_mapping, md.block_table, md.seq_lens, md.query_start_loc, self.b_k,
                self.b_v, self.bias_k, self.bias_v, self.cos_sin_cache, self.scale, self.is_neox, out=output[:n],
                inv_freq=self.inv_freq, max_query_len=md.max_query_len, query_start_loc_cpu=md.query_start_loc_cpu,
                roped_keys=self.roped_keys, sink=sink)
            return
        g, rk, rv = layout.groups, layout.rank_k, layout.rank_v
        lat_k = lat[:, : g * rk].reshape(n, g, rk)
        lat_v = lat[:, g * rk: layout.width].reshape(n, g, rv)
        if not cpu_latent.encode_rows(cache, md.slot_mapping[:n], layout, lat_k, lat_v):  # integer rows in C
            reference.write_latents(cache, md.slot_mapping[:n], layout, lat_k, lat_v)
        if self.window:
            self._window_step(query[:n], value[:n], cache, md, output[:n])
            return
        sink = self._sink_step(value[:n], md) if self.sink else None
        if cpu_latent.available(layout, cache, self.roped_keys, sink):  # attention on the C kernels
            cpu_latent.latent_attention(
                q, cache, layout, md.block_table, md.seq_lens_cpu, md.query_start_loc_cpu, self.b_k, self.b_v,
                self.bias_k, self.bias_v, self.cos_sin_cache, self.scale, self.is_neox, out=output[:n],
                q_heads=query[:n])  # long prompts rebuild K/V from the decoded latents for dense SDPA
            return
        reference.latent_attention(
            q, cache, layout, md.block_table, md.seq_lens_cpu, md.query_start_loc_cpu, self.b_k, self.b_v,
            self.bias_k, self.bias_v, self.cos_sin_cache, self.scale, self.is_neox, out=output[:n], sink=sink,
            roped_keys=self.roped_keys)

    def _window_step(self, q, exact, cache, md, out) -> None:
        """Attention with each query's sink and ``window`` newest tokens read exactly (glue/window.py), the rest
        from the latent rows (keys rebuilt, then RoPE; values rebuilt)."""
        n, hkv, hd = q.shape[0], self.num_kv_heads, self.head_size
        if self.window_pool is None:  # one exact row per page: a sequence holds sink + window rows, no more
            self.window_pool = RecentPool(cache.shape[1], (2, hkv, hd), exact.dtype, exact.device, page_rows=1)
        lay = self.layout

        def decode(rows):
            ck, cv = lay.unpack(rows[0], torch.float32)
            k = reference.rebuild_keys(ck, self.b_k.float(), self.bias_k, lay, self.cos_sin_cache, self.is_neox)
            return k[None], reference.rebuild_values(cv, self.b_v.float(), self.bias_v, lay)[None]

        kv = exact.view(n, 2, hkv, hd)
        attend_windowed(self.window_pool, q.view(n, -1, hd), kv[:, 0], kv[:, 1], md.slot_mapping[:n], cache, md,
                        out.view(n, -1, hd), decode, self.window, 1 if self.sink else 0, self.scale)

    def _sink_step(self, exact: torch.Tensor, md):
        """Store the exact K/V of this step's position-0 tokens (keyed by their sequence's first block) and read
        every request's: (k0 [R, Hkv, hd], v0 [R, Hkv, hd], found [R]) in float32."""
        hkv, hd = self.num_kv_heads, self.head_size
        if self.sink_pool is None:
            self.sink_pool = RecentPool(1, (2, hkv, hd), exact.dtype, exact.device)
        pool = self.sink_pool
        pool.begin_step()
        qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
        first = md.block_table[:, 0]
        starts = [r for r in range(len(sls)) if qsl[r + 1] > qsl[r] and sls[r] == qsl[r + 1] - qsl[r]]
        if starts:
            idx = torch.tensor([qsl[r] for r in starts], device=exact.device)
            pool.write(first[starts], exact.index_select(0, idx).view(len(starts), 2, hkv, hd))
        vals, found = pool.read(first, torch.arange(len(sls), device=first.device))
        vals = vals.float()
        return vals[:, 0], vals[:, 1], found

    def _sink_step_cuda(self, exact: torch.Tensor, md, num_blocks: int):
        """:meth:`_sink_step` on CUDA (glue/sink.py ``SinkTable``): (k0, v0, found) of every request, gathered on
        the device; this step's position-0 tokens are stored first (not while a CUDA graph is being captured: the
        host-side page choice would be frozen into it)."""
        hkv, hd = self.num_kv_heads, self.head_size
        if self.sink_pool is None:
            if torch.cuda.is_current_stream_capturing():  # its initial fill would be replayed with every step
                raise RuntimeError(f"{getattr(self, 'layer_name', '')}: compression.tcode.sink: the exact first "
                                   "tokens' table must exist before CUDA-graph capture (vLLM runs an eager "
                                   "warm-up step first); run with --enforce-eager to serve without graphs")
            self.sink_pool = SinkTable(num_blocks, (2, hkv, hd), exact.dtype, exact.device, pages=_sink_pages())
        pool = self.sink_pool
        R = md.block_table.shape[0]
        first = md.block_table[:, 0]
        if not torch.cuda.is_current_stream_capturing():
            qsl, sls = md.query_start_loc_cpu.tolist(), md.seq_lens_cpu.tolist()
            starts = [r for r in range(min(R, len(sls))) if qsl[r + 1] > qsl[r] and sls[r] == qsl[r + 1] - qsl[r]]
            if starts:
                idx = torch.tensor([qsl[r] for r in starts], device=exact.device)
                pool.write(first, starts, exact.index_select(0, idx).view(len(starts), 2, hkv, hd))
        vals, found = pool.read(first)
        return vals[:, 0], vals[:, 1], found


def _sink_pages() -> int:
    """Pages of a layer's SinkTable: twice vLLM's max_num_seqs (every request of a step holds one), 512 without a
    vLLM config."""
    try:
        from vllm.config import get_current_vllm_config
        return 2 * int(get_current_vllm_config().scheduler_config.max_num_seqs)
    except Exception:  # noqa: BLE001
        return 512
