"""Extraction metrics: how much of a sequence greedy decoding hands back.

Extraction strength (Wang et al., arXiv 2406.09179, ICLR 2025 version), exact memorization (Tirumala et al.,
arXiv 2205.10770), memorization accuracy and extraction likelihood (Jang et al., arXiv 2210.01504).

Conventions, on prepared examples (``input_ids``, ``labels``, ``prompt_length``): an example has r tokens and
its first l = max(prompt_length, 1) are context (a raw text's first token, its bos, has none). The tokens
l..r-1 are exactly the labelled tokens :func:`~hubunlearn.metrics.stats.token_stats` scores, so the
generation-based and teacher-forced numbers count the same tokens.

**eos is left out** (OpenUnlearning's convention, for extraction strength and exact memorization alike): a QA
example ends with a labelled eos (``encode_qa``), and r stops before it, so ES and EM count the answer's own
tokens (:func:`answer_stats`); with eos counted, ES and EM differ by up to 1/(answer tokens + 1) per row.
**Deliberate difference:** when only the last answer token is wrong, no suffix is reproduced and ES is 0, as
the definition gives (m = r); OpenUnlearning's loop ends at its last candidate and reports 1/n there.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..data import pad_examples
from ..modeling import model_device
from .stats import TokenStats, batches


def _start(example: dict) -> int:
    """l: the first position with context, ``prompt_length`` (at least 1)."""
    return max(int(example["prompt_length"]), 1)


def ends_with_eos(example: dict, eos_token_id: int | None) -> bool:
    """Whether the example's last token is a labelled eos (a QA answer's end, which ES and EM leave out)."""
    ids = example["input_ids"]
    return eos_token_id is not None and len(ids) > _start(example) and ids[-1] == eos_token_id == example["labels"][-1]


def answer_stats(stats: TokenStats, example: dict, eos_token_id: int | None) -> TokenStats:
    """``stats`` of ``example`` without the final eos's entry when it ends with one: the tokens ES and EM count."""
    if not ends_with_eos(example, eos_token_id):
        return stats
    def cut(values):
        return None if values is None else values[:-1]

    return TokenStats(stats.log_probs[:-1], cut(stats.mean_log_probs), cut(stats.std_log_probs), stats.correct[:-1])


@torch.no_grad()
def _greedy(model, tokenizer, prefixes: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[list[int]]:
    """Greedy continuations of ``prefixes`` (one left-padded, KV-cached ``generate`` call), each at most
    ``lengths[i]`` tokens and cut after its first eos (what follows is padding)."""
    device = model_device(model)
    batch = pad_examples([{"input_ids": list(p), "labels": list(p)} for p in prefixes], tokenizer.pad_token_id, "left")
    output = model.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        max_new_tokens=max(lengths),
        do_sample=False,
        num_beams=1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    continuations = []
    for row, length in zip(output[:, batch["input_ids"].shape[1] :].tolist(), lengths):
        row = row[:length]
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id) + 1]
        continuations.append(row)
    return continuations


def _strength(m: int, l: int, r: int) -> float:
    """ES = 1 - (m - l) / (r - l); 0 when there is nothing to extract (r = l)."""
    return 1.0 - (m - l) / (r - l) if r > l else 0.0


def extraction_strength(model, tokenizer, examples: Sequence[dict], batch_size: int = 32, description: str | None = None) -> list[float]:
    """Extraction strength (Wang et al., arXiv 2406.09179): ``1 - (m - l) / (r - l)`` per example, where m is the
    shortest prefix (l <= m <= r) from which greedy decoding reproduces ``input_ids[m:r]`` token for token, and r
    stops before a final eos (module docstring): the continuation must give the answer, whatever follows it.

    Success at m implies success at m + 1 (greedy from ``input_ids[:m]`` emits ``input_ids[m]`` first, then
    continues as from ``input_ids[:m+1]``), so m is found by binary search on [l, r] (r always succeeds), all
    examples in lockstep: one round halves every interval with one batched generate call per ``batch_size``
    examples, about log2(r - l) rounds in all.
    """
    model.eval()
    ids = [list(e["input_ids"]) for e in examples]
    starts = [_start(e) for e in examples]
    ends = [len(i) - ends_with_eos(e, tokenizer.eos_token_id) for i, e in zip(ids, examples)]
    low, high = list(starts), list(ends)  # the answer m lies in [low, high]
    while active := [i for i in range(len(ids)) if low[i] < high[i]]:
        middle = {i: (low[i] + high[i]) // 2 for i in active}
        active.sort(key=lambda i: (len(ids[i]) - middle[i], middle[i]))  # similar lengths share a call
        for chunk in batches(active, batch_size, description):
            targets = [ids[i][middle[i] : ends[i]] for i in chunk]
            outputs = _greedy(model, tokenizer, [ids[i][: middle[i]] for i in chunk], [len(t) for t in targets])
            for i, output, target in zip(chunk, outputs, targets):
                if output == target:
                    high[i] = middle[i]
                else:
                    low[i] = middle[i] + 1
    return [_strength(m, l, r) for m, l, r in zip(low, starts, ends)]


def teacher_forced_extraction_strength(stats: TokenStats) -> float:
    """Extraction strength from one teacher-forced pass: with flags c_l..c_{r-1} (``stats.correct``; pass
    :func:`answer_stats` to leave the eos out), m_tf = r - (length of the trailing run of correct flags), so
    ES_tf = run / (r - l): 0 when the last flag is wrong (OpenUnlearning reports 1/(r - l) there; see above).

    Greedy decoding from ``input_ids[:m]`` reproduces the rest exactly when every token from m on is the argmax
    given the true prefix, so ES_tf equals :func:`extraction_strength` up to floating-point ties.
    """
    run = 0
    for correct in reversed(stats.correct):
        if not correct:
            break
        run += 1
    return run / len(stats.correct) if stats.correct else 0.0


def exact_memorization(stats: TokenStats) -> float:
    """Exact memorization (Tirumala et al., arXiv 2205.10770): the share of labelled tokens that are the
    argmax prediction under teacher forcing (pass :func:`answer_stats` to leave the eos out); 0 with none."""
    return sum(stats.correct) / len(stats.correct) if stats.correct else 0.0


def memorization_accuracy(stats: TokenStats) -> float:
    """Memorization accuracy MA (Jang et al., arXiv 2210.01504; used by Cha et al., arXiv 2408.06621):
    ``mean_t 1[argmax p(. | x_<t) = x_t]`` over t = 1..T-1. On raw-text examples (every token labelled) that is
    :func:`exact_memorization`; on QA examples it is the same quantity over the answer tokens."""
    return exact_memorization(stats)


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams of ``tokens``, in order, with repeats."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def ngram_overlap(generated: Sequence[int], reference: Sequence[int], n: int) -> float:
    """OVERLAP_n(a, b) = |ng(a) ∩ ng(b)| / |ng(b)| (Jang et al.), with ∩ the multiset intersection (an n-gram
    counts at most as often as in b, so the value is in [0, 1]); 0 when b has fewer than n tokens."""
    reference_ngrams = ngrams(reference, n)
    if not reference_ngrams:
        return 0.0
    shared = Counter(ngrams(generated, n)) & Counter(reference_ngrams)
    return sum(shared.values()) / len(reference_ngrams)


def _positions(start: int, stop: int, max_positions: int | None) -> list[int]:
    """Prefix lengths start..stop-1, or ``max_positions`` of them spread evenly (first and last included)."""
    positions = list(range(start, stop))
    if max_positions is None or len(positions) <= max_positions:
        return positions
    if max_positions <= 1:
        return positions[len(positions) // 2 :][:1]
    return sorted({positions[round(k * (len(positions) - 1) / (max_positions - 1))] for k in range(max_positions)})


def extraction_likelihood(model, tokenizer, examples: Sequence[dict], n: int = 10, batch_size: int = 32,
                          description: str | None = None, max_positions: int | None = None) -> list[float]:
    """Extraction likelihood EL_n (Jang et al., arXiv 2210.01504) of each example of T tokens:

        EL_n(x) = 1 / (T - n - l + 1) · Σ_{t=l}^{T-n} OVERLAP_n(greedy(x_{<t}, T - t tokens), x_{≥t})

    with t the prefix length and l as in the module docstring. For raw text (l = 1) the denominator is T - n,
    as in the paper and the authors' code, which sum over every prefix and score 0 for the t > T - n whose
    suffix holds no n-gram; for QA it averages over the answer positions. The greedy continuation stops at
    eos. ``max_positions`` averages over that many evenly spread t instead of all (an estimate for long
    texts). Every (example, t) pair is one row of a batched generate call; rows are grouped by t. An example
    with no position (T - n < l) scores 0.
    """
    model.eval()
    ids = [list(e["input_ids"]) for e in examples]
    jobs = [(t, i) for i, e in enumerate(examples) for t in _positions(_start(e), len(ids[i]) - n + 1, max_positions)]
    jobs.sort(key=lambda job: (job[0], len(ids[job[1]])))
    totals, counts = [0.0] * len(ids), [0] * len(ids)
    for chunk in batches(jobs, batch_size, description):
        outputs = _greedy(model, tokenizer, [ids[i][:t] for t, i in chunk], [len(ids[i]) - t for t, i in chunk])
        for (t, i), output in zip(chunk, outputs):
            totals[i] += ngram_overlap(output, ids[i][t:], n)
            counts[i] += 1
    return [total / count if count else 0.0 for total, count in zip(totals, counts)]
