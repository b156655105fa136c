"""The package's structure (docs/ARCHITECTURE.md): no import cycles, methods named only inside methods/, the
math importable without vLLM, and the method interface complete for every registered method."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "vllm_kvc"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """Every vllm_kvc module ``path`` imports, at module level or inside functions."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n and n != me and n.startswith("vllm_kvc"):
                out.add(n)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    # a package's own __init__ importing its submodules is how registration works, not a cycle through them
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# string constants equal to a method name that are not about that method (module: (name, reason))
_NOT_DISPATCH = {
    "vllm_kvc.allocate": ("quant", "a tag inside the sensitivity cache key: the latent quantizer's version"),
}


def test_no_method_named_outside_methods():
    """A method's name appears only in vllm_kvc/methods/ and in the modules that implement that method alone
    (``Method.modules``); everything else goes through ``methods.get_method``."""
    from vllm_kvc.methods import all_methods

    owner = {mod: m.name for m in all_methods() for mod in m.modules}
    names = {m.name for m in all_methods()}
    found = []
    for mod, path in _modules().items():
        if mod.startswith("vllm_kvc.methods"):
            continue
        rel = path.relative_to(PKG.parent).as_posix()
        allowed = {owner.get(mod), _NOT_DISPATCH.get(mod, (None,))[0]}
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names - allowed and id(node) not in docstrings:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "method names outside vllm_kvc/methods/ (dispatch through methods.get_method): " + \
        ", ".join(found)


@pytest.mark.parametrize("module", ["vllm_kvc.config", "vllm_kvc.methods", "vllm_kvc.plan", "vllm_kvc.layout",
                                    "vllm_kvc.factorize", "vllm_kvc.lexico", "vllm_kvc.pod", "vllm_kvc.allocate",
                                    "vllm_kvc.calibrate", "vllm_kvc.artifacts", "vllm_kvc.kernels.reference",
                                    "vllm_kvc.kivi", "vllm_kvc.tcode", "vllm_kvc.bitalloc"])
def test_math_and_settings_import_without_vllm(module):
    code = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
            "sys.exit('imported ' + ', '.join(bad[:5]) if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_every_method_implements_the_interface():
    from vllm_kvc.config import CompressionConfig
    from vllm_kvc.methods import all_methods, build_plan
    from vllm_kvc.methods.base import Method
    from vllm_kvc.plan import ModelShape, Plan

    shape = ModelShape("LlamaForCausalLM", 4, 256, 4, 2, 64)
    for m in all_methods():
        assert type(m).plan is not Method.plan and type(m).attention is not Method.attention, m.name
        assert type(m).emulate is not Method.emulate, m.name
        cfg = CompressionConfig(method=m.name)
        plan = build_plan(cfg, shape)
        assert isinstance(plan, Plan) and plan.method == m.name
        assert plan.bytes_per_token() == sum(plan.layer_bytes_per_token(i) for i in range(4)) > 0
        ranks_k, ranks_v = plan.reported_ranks()
        assert len(ranks_k) == len(ranks_v) == 4
        d = m.describe(plan)
        assert "latent_dtype" in d and "group_size" in d, m.name
        assert m.rank_meaning and m.summary.startswith(m.name)


def test_cuda_graph_support_follows_the_method():
    """The latent backend lets vLLM capture single-token decode batches in CUDA graphs exactly for the methods
    whose CUDA path is capturable (Method.cuda_graphs: lowrank, quant, tcode; kernels.triton_latent.latent_step and
    tcode's sink table, checked under a real capture and replay by the GPU tests in test_kernels.py); other methods,
    and engines without a compression config, stay eager. The flag is set where the model reads its compression config."""
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_kvc.glue import setup
    from vllm_kvc.glue.backend import LatentMetadataBuilder
    from vllm_kvc.methods import all_methods

    def support(method):
        setup.CUDA_GRAPHS["enabled"] = False
        if method is not None:  # what compression_setup does once the config is parsed
            setup.CUDA_GRAPHS["enabled"] = setup.get_method(method).cuda_graphs
        return LatentMetadataBuilder.get_cudagraph_support(None, None)

    try:
        assert support(None) == AttentionCGSupport.NEVER
        assert support("lowrank") == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        assert support("quant") == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        assert support("tcode") == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        assert support("pod") == AttentionCGSupport.NEVER
        assert {m.name for m in all_methods() if m.cuda_graphs} == {"lowrank", "quant", "tcode"}
    finally:
        setup.CUDA_GRAPHS["enabled"] = False
