"""Per-example answer likelihoods and greedy answers, computed in batches on prepared examples."""

from __future__ import annotations

from typing import Sequence

import torch
from ..data import pad_examples
from .stats import batches, token_stats


def answer_probabilities(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 32, description: str | None = None) -> list[float]:
    """Length-normalised answer probability ``exp(mean log p(answer token))`` of each example."""
    return [s.probability for s in token_stats(model, examples, pad_token_id, batch_size, description)]


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 48, batch_size: int = 32, description: str | None = None) -> list[str]:
    """Greedy continuation of each example's prompt (its first ``prompt_length`` tokens), decoded."""
    model.eval()
    device = next(model.parameters()).device
    answers = []
    for chunk in batches(list(examples), batch_size, description):
        prompts = [{"input_ids": e["input_ids"][: e["prompt_length"]], "labels": e["input_ids"][: e["prompt_length"]]} for e in chunk]
        batch = pad_examples(prompts, tokenizer.pad_token_id, padding_side="left")
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def exact_recall(generations: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Whether each greedy answer starts with the whole reference answer (whitespace-normalised)."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    return [norm(g).startswith(norm(r)) for g, r in zip(generations, references)]
