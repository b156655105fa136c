"""Passkey retrieval prompts (RULER / landmark-attention style) for ``vllm-kvc bench pareto``.

Perplexity averages over every token and hides the failure users meet first: a fact stated once, thousands of
tokens back, that the compressed cache no longer brings back. Each case hides a random number (5-7 digits) in
filler prose from the evaluation corpus (``corpus.load_text(..., "eval")``) at a given depth of a prompt of a
given length, and asks for it at the end; greedy decoding of a few tokens; the case is correct when the number
appears in the output. Everything is seeded: the same tokenizer, text and arguments give the same token ids.

Plain Python and a tokenizer: no vLLM here (``evaluate._child`` runs the prompts).
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

# ~1k to ~7k tokens (SmolLM2's context is 8k) x three depths; the default set is 3 x 3 x 2 = 18 prompts
LENGTHS = (1024, 4096, 7168)
DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_CASES = 9  # one per length x depth cell (on CPU a compressed engine answers 9 in ~20 min)
MAX_NEW_TOKENS = 12
FORMATS = ("chat", "plain")
DEFAULT_FORMAT = "chat"

# "pass key" collides with the corpus (the Python tutorial explains ``pass`` and dictionary keys: SmolLM2 then
# answers with a definition); a "secret number" does not
INSTRUCTION = ("There is a secret number hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will ask you for the secret number.")
NEEDLE = "The secret number is {key}. Remember it. {key} is the secret number."
QUESTION = "What is the secret number?"
ANSWER_PREFIX = "The secret number is"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class Case:
    prompt_ids: list[int]
    answer: str
    length: int          # target prompt length (tokens)
    depth: float         # target depth of the needle (fraction of the filler before it)
    needle_token: int    # index of the needle's first token in prompt_ids
    needle_depth: float  # its position as a fraction of the prompt

    def to_json(self) -> dict:
        return asdict(self)


def is_correct(output: str, answer: str) -> bool:
    """The number appears in the output as a whole number (digit grouping commas and spaces ignored)."""
    text = re.sub(r"(?<=\d)[, ](?=\d)", "", output)
    return re.search(rf"(?<!\d){re.escape(answer)}(?!\d)", text) is not None


def sentences(text: str) -> list[str]:
    """The corpus as sentences (paragraphs split at sentence ends), whitespace normalized."""
    out = []
    for para in text.split("\n\n"):
        out += [s for s in (" ".join(x.split()) for x in _SENTENCE_END.split(para)) if s]
    return out


def grid(n: int, lengths=LENGTHS, depths=DEPTHS) -> list[tuple[int, float]]:
    """``n`` (length, depth) cells; the first ``len(lengths)`` cover every length and, when there are as many
    depths, every depth; ``len(lengths) * len(depths)`` cover every cell once; then round after round."""
    cells_per_round = len(lengths) * len(depths)
    out = []
    for k in range(n):
        j = k % cells_per_round
        li = j % len(lengths)
        di = (li + j // len(lengths)) % len(depths)
        out.append((lengths[li], depths[di]))
    return out


def _frame(tokenizer, fmt: str) -> tuple[str, str]:
    """Text before and after the haystack for the format (the chat template's turns around the user message)."""
    marker = "\x00HAYSTACK\x00"
    user = f"{INSTRUCTION}\n\n{marker}\n\n{QUESTION}"
    if fmt == "chat":
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        text += ANSWER_PREFIX
    elif fmt == "plain":
        text = f"{user} {ANSWER_PREFIX}"
    else:
        raise ValueError(f"retrieval format {fmt!r}: expected one of {FORMATS}")
    before, after = text.split(marker)
    return before, after


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_cases(tokenizer, text: str, n: int = DEFAULT_CASES, lengths=LENGTHS, depths=DEPTHS, seed: int = 0,
                fmt: str = DEFAULT_FORMAT, digits=(5, 7)) -> list[Case]:
    """``n`` passkey prompts (token ids) from the corpus ``text``; see :func:`grid` for the cells.

    Each case draws its number (``digits`` long) and where its filler starts in the corpus from one seeded
    generator; filler sentences are added until the prompt reaches its target length (to within one
    sentence, no more than the target), and the needle sentence goes between the sentences at the target
    depth of the filler."""
    if n <= 0:
        return []
    sents = sentences(text)
    lens = [len(_encode(tokenizer, " " + s)) for s in sents]
    before, after = _frame(tokenizer, fmt)
    has_bos = tokenizer.bos_token_id is not None and fmt == "plain"
    frame_tokens = len(_encode(tokenizer, before)) + len(_encode(tokenizer, after)) + int(has_bos)
    rng = random.Random(seed)
    cases = []
    for length, depth in grid(n, lengths, depths):
        nd = rng.randint(*digits)
        key = str(rng.randint(10 ** (nd - 1), 10 ** nd - 1))
        needle = NEEDLE.format(key=key)
        budget = length - frame_tokens - len(_encode(tokenizer, " " + needle))
        start = rng.randrange(len(sents))
        chosen, used = [], 0
        for i in range(len(sents)):  # wraps around the corpus
            j = (start + i) % len(sents)
            if used + lens[j] > budget:
                if used == 0:
                    continue
                break
            chosen.append(j)
            used += lens[j]
        cut, acc = 0, 0  # the sentence boundary nearest the target depth
        while cut < len(chosen) and acc + lens[chosen[cut]] / 2 < depth * used:
            acc += lens[chosen[cut]]
            cut += 1
        chosen = [sents[j] for j in chosen]
        head = " ".join(chosen[:cut])
        tail = " ".join(chosen[cut:])
        pre = before + (head + " " if head else "")
        ids_pre = ([tokenizer.bos_token_id] if has_bos else []) + _encode(tokenizer, pre)
        body = needle + (" " + tail if tail else "") + after
        ids = ids_pre + _encode(tokenizer, body)
        cases.append(Case(ids, key, length, depth, len(ids_pre), len(ids_pre) / len(ids)))
    return cases


def load_cases(model_dir: str, corpus: str = "default", n: int = DEFAULT_CASES, **kw) -> list[Case]:
    """:func:`build_cases` with the checkpoint's tokenizer and the corpus's evaluation text."""
    from transformers import AutoTokenizer

    from vllm_kvc.corpus import load_text

    return build_cases(AutoTokenizer.from_pretrained(model_dir), load_text(corpus, "eval"), n, **kw)


def summarize(cases: list[dict]) -> dict:
    """Accuracy overall and per (length, depth) cell from per-case rows with ``length``, ``depth``, ``correct``."""
    cells: dict[str, list[int]] = {}
    for c in cases:
        cells.setdefault(f"{c['length']}@{c['depth']:g}", []).append(int(c["correct"]))
    return {"acc": sum(int(c["correct"]) for c in cases) / len(cases) if cases else None,
            "cells": {k: sum(v) / len(v) for k, v in cells.items()}}
