"""Runs one real vLLM engine in a child process for the tests (engines never share a process).

    python tests/engine_child.py SPEC.json OUT.json

SPEC: {"engine": {...LLM kwargs...}, "prompts_first": [...], "prompts": [...], "max_tokens": N, "inspect": bool}
OUT: generated token ids and texts, KV capacity, and (inspect) each attention layer's cache shape/dtype and the
decode requests the CPU kernel for roped keys served.
"""
import json
import os
import sys


def layer_caches(worker):
    ctx = worker.model_runner.compilation_config.static_forward_context
    out = {}
    for name, layer in ctx.items():
        kv = getattr(layer, "kv_cache", None)
        if kv is None or not hasattr(kv, "shape"):
            continue
        out[name] = {"shape": list(kv.shape), "dtype": str(kv.dtype),
                     "row_bytes": kv.shape[-1] * kv.element_size(),
                     "layout": str(getattr(layer, "layout", None))}
    return out


def cpu_kernel_decodes(worker):
    """Decode requests the C kernel for roped keys served in this worker (kernels/cpu_latent.py)."""
    from vllm_kvc.kernels import cpu_latent
    return cpu_latent.DECODES[0]


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    from vllm import LLM, SamplingParams

    llm = LLM(**spec["engine"])
    res = {}
    cc = llm.llm_engine.vllm_config.cache_config
    res["kv_capacity_tokens"] = int(cc.num_gpu_blocks) * int(cc.block_size)
    res["block_size"] = int(cc.block_size)
    res["num_blocks"] = int(cc.num_gpu_blocks)
    sp = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 32), ignore_eos=True)
    if spec.get("prompts_first"):  # an earlier wave (e.g. to populate the prefix cache)
        outs = llm.generate(spec["prompts_first"], sp, use_tqdm=False)
        res["token_ids_first"] = [list(o.outputs[0].token_ids) for o in outs]
    if spec.get("prompts"):
        outs = llm.generate(spec["prompts"], sp, use_tqdm=False)
        res["texts"] = [o.outputs[0].text for o in outs]
        res["token_ids"] = [list(o.outputs[0].token_ids) for o in outs]
    if not spec["engine"].get("disable_log_stats", True):
        res["metrics"] = {}
        for m in llm.get_metrics():
            if hasattr(m, "value"):
                res["metrics"][m.name] = res["metrics"].get(m.name, 0) + m.value
    if spec.get("inspect"):
        res["layers"] = llm.collective_rpc(layer_caches)[0]
        res["cpu_kernel_decodes"] = llm.collective_rpc(cpu_kernel_decodes)[0]
    json.dump(res, open(out_path, "w"))
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
