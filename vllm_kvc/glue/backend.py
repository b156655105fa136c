"""vLLM v1 attention backend over compressed KV rows (any method): backend / metadata builder / impl.

The layer hands the impl this step's new K/V in whatever form its method caches (latents in the ``key`` slot
of vLLM's attention op, or the projections themselves); the impl passes them, the layer's paged cache and the
metadata to the layer's ``kvc_attend`` (glue/attention.py), which writes the rows at ``slot_mapping`` and
computes attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

# Blocks of (a multiple of) the decode kernels' 64-token tiles: at ratio 0.25 on an H100 the decode kernel is 3-5%
# faster on 64-token blocks than on vLLM's default 16 (benchmarks/RESULTS.md, GPU kernels). The cost: up to 63
# tokens of a request's last block unused (15 with 16-token blocks) and prefix caching in 64-token steps.
GPU_BLOCK_SIZE = 64


class LatentAttentionBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return LatentAttentionImpl

    @staticmethod
    def get_builder_cls():
        return LatentMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """The block size vLLM uses when ``--block-size`` is not given: at least GPU_BLOCK_SIZE tokens on GPUs,
        where the Triton decode kernel then reads each 64-token tile from one block (one block id, contiguous
        rows), else vLLM's default. Any block size still works."""
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            return max(default_block_size, GPU_BLOCK_SIZE)
        return default_block_size

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


# Set by glue/setup.py when a model is built with a compression config (same process, before vLLM asks the
# builder): whether that method's CUDA path is capturable (``Method.cuda_graphs``). Kept here, not looked up, so
# that the backend imports nothing of the methods (they import the glue).
CUDA_GRAPHS = {"enabled": False}


def cudagraph_support() -> AttentionCGSupport:
    if CUDA_GRAPHS["enabled"]:
        return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    return AttentionCGSupport.NEVER


@dataclass
class LatentMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    host_seq_lens: torch.Tensor | None = None

    @property
    def seq_lens_cpu(self) -> torch.Tensor:
        """The cached lengths on the host, copied on first use (the CUDA path of lowrank / quant never reads them,
        so its decode steps do not synchronise)."""
        if self.host_seq_lens is None:
            self.host_seq_lens = self.seq_lens.cpu()
        return self.host_seq_lens

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class LatentMetadataBuilder(AttentionMetadataBuilder[LatentMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        """Single-token decode batches are captured in CUDA graphs where the deployment's method declares its CUDA
        path capturable (``Method.cuda_graphs``: no host reads or Python branches on tensor values in decode);
        other methods, and engines without a compression config, keep eager attention."""
        return cudagraph_support()

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LatentMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        return LatentMetadata(
            num_actual_tokens=m.num_actual_tokens,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc[: n + 1],
            query_start_loc_cpu=m.query_start_loc_cpu[: n + 1],
            seq_lens=m.seq_lens[:n],
            host_seq_lens=m.seq_lens[:n] if m.seq_lens.device.type == "cpu" else None,
            block_table=m.block_table_tensor[:n],
            slot_mapping=m.slot_mapping,
        )


class LatentAttentionImpl(AttentionImpl[LatentMetadata]):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs):
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError("latent KV attention supports plain causal decoder attention only")
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError("KV sharing across layers is not supported with latent KV")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None):
        assert output is not None
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by latent KV attention")
        if attn_metadata is None:  # profiling / dummy run: no cache to touch
            return output.fill_(0)
        cache = kv_cache.select(1, 0) if kv_cache.dim() == 4 else kv_cache  # [B, 1, N, C] -> [B, N, C]
        # the layer's method writes its rows and computes attention (glue/attention.py: RowAttention)
        layer.kvc_attend(query, key, value, cache, attn_metadata, output)
        return output
