"""Which tokens KUDA works on: the forget tokens it deviates, and the ones causal tracing noises and restores."""

from __future__ import annotations

import torch

from ..data import IGNORE_INDEX

TOKEN_RULES = ("answer", "subject", "prompt")


def token_positions(batch: dict[str, torch.Tensor], rule: str, tokenizer, prompt_only: bool = True) -> torch.Tensor:
    """``[B, T]`` bool. ``answer``: the positions the answer is read off; ``prompt``: the question's tokens;
    ``subject``: the question's name-like tokens (capitalised words not opening a sentence, as ECO's ``names``
    rule), where ROME-style recall looks the subject up, or the whole row's with ``prompt_only=False`` (answers
    often repeat the name); a row without any falls back to its question's tokens."""
    if rule == "answer":
        from ..trainers.losses import answer_positions  # not at the top: the trainers import this module

        return answer_positions(batch["labels"])
    prompt = (batch["labels"] == IGNORE_INDEX) & batch["attention_mask"].bool()
    if rule == "prompt":
        return prompt
    from ..eco.selection import name_token_mask

    names = name_token_mask(tokenizer, batch["input_ids"].cpu(), batch["attention_mask"].cpu()).to(prompt.device)
    if prompt_only:
        names &= prompt
    return names | (prompt & ~names.any(-1, keepdim=True))


def span_ends(mask: torch.Tensor) -> torch.Tensor:
    """The last token of each run of True in ``mask`` (ROME restores the subject's last token)."""
    following = torch.zeros_like(mask)
    following[:, :-1] = mask[:, 1:]
    return mask & ~following
