"""Per-example answer likelihoods and greedy answers, computed in batches on prepared examples."""

from __future__ import annotations

from typing import Sequence

import torch
from ..data import pad_examples
from ..modeling import model_device
from .stats import longest_first, token_stats


def answer_probabilities(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 32, description: str | None = None) -> list[float]:
    """Length-normalised answer probability ``exp(mean log p(answer token))`` of each example."""
    return [s.probability for s in token_stats(model, examples, pad_token_id, batch_size, description, spread=False)]


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 48, batch_size: int = 32, description: str | None = None,
                   strip: bool = True) -> list[str]:
    """Greedy continuation of each example's prompt (its first ``prompt_length`` tokens), decoded (special tokens
    left out; surrounding whitespace too unless ``strip=False``), in order.

    Batched for speed without changing an answer: rows are grouped by the length of their reference answer, then
    of their prompt (:func:`~hubunlearn.metrics.stats.longest_first`), so a batch's rows tend to finish together;
    prompts are left-padded and ``generate`` decodes with its KV cache, stops each row at the model's eos and the
    batch when every row has stopped. Each answer is the one a batch of one gives (tests check it).
    """
    model.eval()
    device = model_device(model)
    answers: list[str | None] = [None] * len(examples)
    lengths = [(len(e["input_ids"]) - e["prompt_length"], e["prompt_length"]) for e in examples]
    for indices in longest_first(lengths, batch_size, description):
        prompts = [{"input_ids": examples[i]["input_ids"][: examples[i]["prompt_length"]],
                    "labels": examples[i]["input_ids"][: examples[i]["prompt_length"]]} for i in indices]
        batch = pad_examples(prompts, tokenizer.pad_token_id, padding_side="left")
        output = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        for i, answer in zip(indices, tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)):
            answers[i] = answer.strip() if strip else answer
    return answers


def exact_recall(generations: Sequence[str], references: Sequence[str]) -> list[bool]:
    """Whether each greedy answer starts with the whole reference answer (whitespace-normalised)."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    return [norm(g).startswith(norm(r)) for g, r in zip(generations, references)]
