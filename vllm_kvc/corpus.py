"""English text for calibration and evaluation, from a registry package installed at run time.

Nothing third-party is committed. The built-in corpora come from Debian's ``python3.11-doc`` package (the Python
documentation's reStructuredText sources, Python Software Foundation License), turned into plain prose
(code samples, directives and markup removed). Calibration and evaluation use disjoint parts of it:

- ``calibration``: the HOWTOs and the FAQ;
- ``eval`` (the default of ``vllm-kvc eval``): the tutorial;
- ``heldout``: "What's New" documents, for a second opinion;
- ``validation``: the library reference, for quality modes that measure a rise while choosing a setting
  (``vllm-kvc allocate --method tcode --max-rise``): neither calibration nor any evaluation text.

Any plain-text file can be used instead (``--corpus FILE.txt``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
DEBIAN_PACKAGE = "python3.11-doc"
BUILTIN = {
    "calibration": ("howto", "faq"),
    "eval": ("tutorial",),
    "heldout": ("whatsnew",),
    "validation": ("library",),
}

_ROLE = re.compile(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]*)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_UNDERLINE = re.compile(r"^\s*([=\-~^*+#\"'`.:_])\1{3,}\s*$")


def rst_to_prose(text: str) -> str:
    out: list[str] = []
    skip_indent: int | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        stripped = line.strip()
        if stripped.startswith(".."):
            skip_indent = indent  # directive and its indented body
            continue
        if stripped.startswith((">>>", "...", "$ ")) or _UNDERLINE.match(line):
            continue
        if stripped.endswith("::"):
            line = line[:-1] if not stripped == "::" else ""
            skip_indent = indent
        line = _ROLE.sub(r"\1", line)
        line = _LINK.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line).replace("**", "").replace("\\", "")
        out.append(line.strip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    # join wrapped lines into paragraphs
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paras if len(p) > 40)


def ensure_docs_installed() -> Path:
    if DOC_ROOT.exists():
        return DOC_ROOT
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], env=env, check=False,
                       stdout=subprocess.DEVNULL)
        if not DOC_ROOT.exists():
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", DEBIAN_PACKAGE], env=env, check=True,
                           stdout=subprocess.DEVNULL)
    if not DOC_ROOT.exists():
        raise FileNotFoundError(f"built-in corpora need Debian's {DEBIAN_PACKAGE} "
                                f"(apt-get install {DEBIAN_PACKAGE}); or pass --corpus FILE.txt")
    return DOC_ROOT


def builtin_text(name: str) -> str:
    if name not in BUILTIN:
        raise ValueError(f"corpus {name!r}: expected one of {sorted(BUILTIN)} or a .txt path")
    root = ensure_docs_installed()
    parts = []
    for sub in BUILTIN[name]:
        for f in sorted((root / sub).glob("*.rst.txt")):
            parts.append(rst_to_prose(f.read_text(errors="replace")))
    return "\n\n".join(p for p in parts if p)


def load_text(corpus: str, role: str = "eval") -> str:
    """``corpus``: 'default' (the built-in corpus of that role), a built-in name, or a text file path."""
    if corpus == "default":
        return builtin_text(role)
    if corpus in BUILTIN:
        return builtin_text(corpus)
    p = Path(corpus)
    if not p.is_file():
        raise FileNotFoundError(f"corpus {corpus!r}: no such file (expected a plain-text file or one of "
                                f"'default', {', '.join(repr(b) for b in BUILTIN)})")
    return p.read_text(errors="replace")


def spread_chunks(tokenizer, text: str, n_chunks: int, seq_len: int) -> list[list[int]]:
    """``n_chunks`` chunks of ``seq_len`` token ids from evenly spaced places of the whole text (a long, varied
    text sampled throughout rather than its first documents); each starts at the first paragraph break after its
    place, and only a window of text there is tokenized."""
    out, window = [], 16 * seq_len  # characters: several per token
    for j in range(n_chunks):
        at = len(text) * j // n_chunks
        brk = text.find("\n\n", at)
        at = brk + 2 if 0 <= brk < at + window else at
        ids = tokenizer(text[at:at + window], add_special_tokens=False)["input_ids"]
        if len(ids) < seq_len:
            raise ValueError(f"corpus: {len(ids)} tokens after character {at}: need a chunk of {seq_len}")
        out.append(ids[:seq_len])
    return out


def token_chunks(tokenizer, text: str, n_tokens: int, seq_len: int) -> list[list[int]]:
    """Consecutive chunks of ``seq_len`` token ids covering the first ``n_tokens`` tokens of the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(n_tokens, len(ids)) // seq_len * seq_len
    if n == 0:
        raise ValueError(f"corpus has {len(ids)} tokens: need at least one chunk of {seq_len}")
    return [ids[i:i + seq_len] for i in range(0, n, seq_len)]
