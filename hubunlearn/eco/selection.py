"""Which prompt tokens ECO corrupts (Liu et al., arXiv 2406.07933, Section 3.2).

``all_but_last``: every real prompt token but the last, whose position the next token is read from; ``all``: every
real prompt token; ``names``: only the tokens of name-like spans (capitalised words that do not open a sentence or
a line, e.g. "Takashi Nakamura", "Nobel Prize"), the entities a forget request is usually about, so the rest of the
prompt reaches the model intact. A flagged prompt with no name-like span falls back to ``all_but_last``.
"""

from __future__ import annotations

import re

import torch

TOKEN_RULES = ("all_but_last", "all", "names")
_CAPITALISED_RUN = re.compile(r"\b[A-Z][\w'\-]*(?:[ \t]+[A-Z][\w'\-]*)*")
_WORD = re.compile(r"\S+")


def name_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the name-like words of ``text``; a run's first word is dropped when it opens a sentence."""
    spans = []
    for match in _CAPITALISED_RUN.finditer(text):
        before = text[: match.start()].rstrip(" \t")
        words = [(w.start() + match.start(), w.end() + match.start()) for w in _WORD.finditer(match.group())]
        if not before or before[-1] in ".?!:\n\"'>":
            words = words[1:]
        spans.extend(words)
    return spans


def name_token_mask(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the real tokens that overlap a name-like span of their row's decoded text."""
    mask = torch.zeros(attention_mask.shape, dtype=torch.bool)
    for row, (ids, keep) in enumerate(zip(input_ids.tolist(), attention_mask.bool().tolist())):
        positions = [t for t, k in enumerate(keep) if k]
        pieces = [tokenizer.decode([ids[t]]) for t in positions]
        spans = name_spans("".join(pieces))
        start = 0
        for t, piece in zip(positions, pieces):
            end = start + len(piece)
            mask[row, t] = any(s < end and start < e for s, e in spans)
            start = end
    return mask.to(attention_mask.device)


def selected_positions(attention_mask: torch.Tensor, flags: torch.Tensor, rule: str, names: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` bool: the prompt tokens of flagged rows to corrupt, whatever the padding side. ``names`` (from
    ``name_token_mask``) is needed by the ``names`` rule."""
    selected = attention_mask.bool() & flags.to(attention_mask.device)[:, None]
    if rule == "all":
        return selected
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)
    selected[torch.arange(len(last)), last] = False
    if rule == "names":
        named = selected & names
        has_name = named.any(dim=1, keepdim=True)
        selected = torch.where(has_name, named, selected)
    return selected
