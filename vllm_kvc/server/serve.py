"""``vllm-kvc serve --config DEPLOYMENT.yaml``: vLLM's own OpenAI server with this deployment's settings.

The deployment and every vLLM argument are validated, then the method's calibration artifacts are built
(cached), before the engine starts; then vLLM's own ``run_server`` takes over, with the compression passed
through ``--additional-config`` and the plugin's route and metrics through ``--middleware``. Extra arguments
after the config go to vLLM unchanged.
"""
from __future__ import annotations

import json
import logging

from vllm_kvc.config import ADDITIONAL_CONFIG_KEY
from vllm_kvc.server.app import MIDDLEWARE
from vllm_kvc.validate import Checked

log = logging.getLogger("vllm_kvc")


def vllm_cli_args(checked: Checked, host: str | None, port: int | None) -> list[str]:
    """The equivalent ``vllm serve`` command line (documented, and used to seed vLLM's parser)."""
    dep = checked.deployment
    args = ["--model", checked.model_dir,
            "--host", host or dep.server.host, "--port", str(port or dep.server.port),
            "--middleware", MIDDLEWARE]
    if dep.served_model_name:
        args += ["--served-model-name", dep.served_model_name]
    if dep.compression is not None:
        args += ["--additional-config",
                 json.dumps({ADDITIONAL_CONFIG_KEY: dep.compression.model_dump(mode="json")})]
    return args


def serve(checked: Checked, host: str | None = None, port: int | None = None, extra: list[str] | None = None):
    import uvloop

    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvc.artifacts import free_accelerator_memory
    from vllm_kvc.methods import get_method, prepare

    dep = checked.deployment
    explicit = "kv_cache_memory_bytes" in dep.engine or any(
        x.replace("_", "-").split("=")[0] == "--kv-cache-memory-bytes" for x in extra or [])
    if not explicit:  # an explicit KV budget in bytes is vLLM's; VLLM_CPU_KVCACHE_SPACE would override it
        _default_cpu_kv_space()
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vllm-kvc serve"))
    argv = vllm_cli_args(checked, host, port)
    args = parser.parse_args(argv)
    defaults = get_method(dep.compression.method).engine_defaults(dep.compression) if dep.compression else {}
    for key, value in {**defaults, **dep.engine}.items():  # engine args by their EngineArgs field names
        setattr(args, key, value)
    if extra:
        args = parser.parse_args(argv + list(extra), namespace=args)
    validate_parsed_serve_args(args)
    if dep.compression is not None:  # every argument is valid: now the method's calibration artifacts (cached)
        prepare(checked.model_dir, dep.compression, checked.plan.shape, int(args.tensor_parallel_size or 1))
        free_accelerator_memory()
    log.info("vllm-kvc: equivalent command: vllm serve %s", " ".join(_quote(a) for a in argv))
    uvloop.run(run_server(args))


def _default_cpu_kv_space(gib: str = "2") -> None:
    """On CPU, vLLM otherwise reserves 92% of the NUMA node's memory and refuses to start when other processes
    use some of it; a fixed KV budget (override with VLLM_CPU_KVCACHE_SPACE) starts anywhere."""
    import os

    import torch

    if not torch.cuda.is_available() and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = gib
        log.info("vllm-kvc: CPU KV cache budget %s GiB (set VLLM_CPU_KVCACHE_SPACE to change it)", gib)


def _quote(a: str) -> str:
    return f"'{a}'" if any(c in a for c in " {}\"") else a
