"""Per-token statistics of labelled tokens from one batched forward pass: the raw material of most metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data import pad_examples
from ..trainers.losses import shift


@dataclass
class TokenStats:
    """Statistics of one example's labelled tokens (answer tokens for QA, every token for raw text)."""

    log_probs: list[float]  # log p(y_t | y_<t) of each labelled token
    mean_log_probs: list[float]  # E_{z ~ p_t}[log p_t(z)] at the same positions (Min-k%++)
    std_log_probs: list[float]  # its standard deviation under p_t
    correct: list[bool]  # whether the argmax prediction is y_t (teacher-forced)

    @property
    def num_tokens(self) -> int:
        return len(self.log_probs)

    @property
    def mean_log_prob(self) -> float:
        return sum(self.log_probs) / max(self.num_tokens, 1)

    @property
    def probability(self) -> float:
        """Length-normalised probability ``exp(mean log p)``."""
        return math.exp(self.mean_log_prob)


def batches(items: Sequence, batch_size: int, description: str | None = None):
    """Consecutive slices of ``items``, with a progress bar when ``description`` is given."""
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, desc=description, disable=description is None, leave=False):
        yield items[start : start + batch_size]


@torch.no_grad()
def token_stats(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 32, description: str | None = None) -> list[TokenStats]:
    """:class:`TokenStats` of each prepared example (``input_ids``, ``labels``), in batched forward passes."""
    model.eval()
    device = next(model.parameters()).device
    results = []
    for chunk in batches(list(examples), batch_size, description):
        batch = {k: v.to(device) for k, v in pad_examples(chunk, pad_token_id).items()}
        extra = {}
        if getattr(model, "classifies_prompts", False) and all("prompt_length" in e for e in chunk):
            extra["classify_lengths"] = [int(e["prompt_length"]) for e in chunk]  # an ECO model's classifier reads the prompts
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        logits, targets, mask = shift(logits, batch["labels"])
        log_softmax = logits.float().log_softmax(-1)
        chosen = torch.gather(log_softmax, -1, targets.unsqueeze(-1)).squeeze(-1)
        probs = log_softmax.exp()
        mean = (probs * log_softmax).sum(-1)
        std = ((probs * log_softmax.square()).sum(-1) - mean.square()).clamp(min=0).sqrt()
        correct = log_softmax.argmax(-1) == targets
        for i in range(len(chunk)):
            keep = mask[i]
            results.append(TokenStats(chosen[i][keep].tolist(), mean[i][keep].tolist(), std[i][keep].tolist(), correct[i][keep].tolist()))
    return results
