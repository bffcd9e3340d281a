"""Per-token statistics of labelled tokens from one batched forward pass: the raw material of most metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import IGNORE_INDEX, pad_examples
from ..modeling import model_device
from ..trainers.head import final_hidden_states
from ..trainers.losses import default_chunk_positions, shift


@dataclass
class TokenStats:
    """Statistics of one example's labelled tokens (answer tokens for QA, every token for raw text)."""

    log_probs: list[float]  # log p(y_t | y_<t) of each labelled token
    mean_log_probs: list[float] | None  # E_{z ~ p_t}[log p_t(z)] at the same positions (Min-k%++); None: not computed
    std_log_probs: list[float] | None  # its standard deviation under p_t; None: not computed
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


def longest_first(lengths: Sequence, batch_size: int, description: str | None = None):
    """Batches of indices into ``lengths`` (numbers, or tuples compared in order), longest first: rows of similar
    length share a batch, so padding stays small (and a batch that does not fit in memory fails at once). Callers
    put each result back at its index, so the order never shows."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    yield from batches(order, batch_size, description)


def split(values: Sequence, sizes: Sequence[int]) -> list[list]:
    """``values`` cut into consecutive runs of ``sizes`` (which sum to ``len(values)``)."""
    runs, start = [], 0
    for size in sizes:
        runs.append(list(values[start : start + size]))
        start += size
    if start != len(values):
        raise ValueError(f"sizes sum to {start}, not to the {len(values)} values")
    return runs


def _statistics(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, spread: bool,
                weight: torch.Tensor | None = None) -> list[list[list]]:
    """Per-row lists of (log p, argmax correct[, mean, std]) at the ``mask``ed positions of ``logits`` (rows, positions,
    vocabulary) predicting ``targets`` (rows, positions): only those positions are read, in float32, and
    ``log p(y) = logit(y) - logsumexp(logits)`` never materialises the log-softmax unless ``spread`` asks for it.

    With the output layer's ``weight`` (vocabulary, hidden), ``logits`` are the final hidden states (rows, positions,
    hidden) and the logits of the masked positions are made a chunk of positions at a time
    (:func:`~hubunlearn.trainers.losses.default_chunk_positions`): nothing of vocabulary size is held for all of them."""
    selected, targets = logits[mask], targets[mask]  # (labelled tokens, vocabulary or hidden), (labelled tokens,)
    size = max(1, len(selected) if weight is None else default_chunk_positions(1, weight.shape[0], selected.device))
    columns: list[list[torch.Tensor]] = [[] for _ in range(4 if spread else 2)]
    for part, part_targets in zip(selected.split(size), targets.split(size)):
        part = (part if weight is None else F.linear(part, weight)).float()
        normaliser = part.logsumexp(-1)
        values = [torch.gather(part, -1, part_targets.unsqueeze(-1)).squeeze(-1) - normaliser, part.argmax(-1) == part_targets]
        if spread:
            log_softmax = part - normaliser.unsqueeze(-1)
            probs = log_softmax.exp()
            mean = (probs * log_softmax).sum(-1)
            # E[(log p - mean)^2], not E[(log p)^2] - mean^2: near-uniform rows (mean ≈ -log V) lose the variance to cancellation
            values += [mean, (probs * (log_softmax - mean.unsqueeze(-1)).square()).sum(-1).sqrt()]
        for column, value in zip(columns, values):
            column.append(value)
    counts = mask.sum(-1).tolist()
    joined = [torch.cat(c).tolist() if c else [] for c in columns]
    return [list(row) for row in zip(*(split(c, counts) for c in joined))]


def _stats_of(values: list[list]) -> TokenStats:
    chosen, correct, mean, std = (*values, None, None)[:4]
    return TokenStats(chosen, mean, std, correct)


def _prompt_of(example: dict) -> tuple[int, ...] | None:
    """The unlabelled prompt an example's labelled continuation follows, when it has one (else None)."""
    length = int(example.get("prompt_length") or 0)
    if length < 1 or any(label != IGNORE_INDEX for label in example["labels"][:length]):
        return None
    return tuple(example["input_ids"][:length])


def _shared_prompt_units(examples: Sequence[dict], indices: Sequence[int], batch_size: int):
    """Batches of (prompt, example indices) units, each unit the examples of one prompt (at most ``batch_size`` of
    them), a batch at most ``batch_size`` examples, longest units first."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(_prompt_of(examples[i]), []).append(i)
    units = [(prompt, members[k : k + batch_size]) for prompt, members in groups.items() for k in range(0, len(members), batch_size)]
    units.sort(key=lambda u: (max(len(examples[i]["input_ids"]) for i in u[1]), len(u[1])), reverse=True)
    batch, rows = [], 0
    for unit in units:
        if batch and rows + len(unit[1]) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(unit)
        rows += len(unit[1])
    if batch:
        yield batch


def _shared_prompt_stats(model, examples: Sequence[dict], units, pad_token_id: int, spread: bool, device) -> dict[int, TokenStats] | None:
    """One batch of :func:`_shared_prompt_units`: each distinct prompt runs once (left-padded, with the KV cache),
    its cache is repeated for the examples that continue it, and their continuations run on it (right-padded,
    positions continuing the prompt's). The first continuation token is scored by the prompt's last logits."""
    prompts = [list(prompt) for prompt, _ in units]
    owner = torch.tensor([u for u, (_, members) in enumerate(units) for _ in members], device=device)
    members = [i for _, unit_members in units for i in unit_members]
    first = pad_examples([{"input_ids": p, "labels": p} for p in prompts], pad_token_id, "left")
    prompt_mask = first["attention_mask"].to(device)
    with final_hidden_states(model) as head:  # hidden states where the logits were: the statistics make the logits a chunk at a time
        output = model(input_ids=first["input_ids"].to(device), attention_mask=prompt_mask, use_cache=True,
                       position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0))  # positions from 0 at each prompt's first token, as generate
    cache_name = "cache" if getattr(output, "cache", None) is not None else "past_key_values"  # transformers >= 5.24 calls it cache
    cache, last_logits = getattr(output, cache_name, None), output.logits[:, -1:, :]
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None  # a model that returns no selectable cache: the caller scores these examples the plain way
    cache.batch_select_indices(owner)  # one copy of its prompt's keys and values per continuation
    continuations = pad_examples([{"input_ids": examples[i]["input_ids"][len(prompts[u]) :], "labels": examples[i]["labels"][len(prompts[u]) :]}
                                  for i, u in zip(members, owner.tolist())], pad_token_id)
    ids, labels, mask = (continuations[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
    positions = prompt_mask.sum(-1)[owner].unsqueeze(-1) + torch.arange(ids.shape[1], device=device)
    with final_hidden_states(model) as head:
        logits = model(input_ids=ids, attention_mask=torch.cat([prompt_mask[owner], mask], dim=-1), position_ids=positions,
                       use_cache=False, **{cache_name: cache}).logits
    logits = torch.cat([last_logits[owner], logits[:, :-1, :]], dim=1)  # position t's logits predict continuation token t
    valid = labels != IGNORE_INDEX
    rows = _statistics(logits, labels.masked_fill(~valid, 0), valid, spread, None if head is None else head.weight)
    return {i: _stats_of(row) for i, row in zip(members, rows)}


@torch.no_grad()
def token_stats(model, examples: Sequence[dict], pad_token_id: int, batch_size: int = 32, description: str | None = None,
                spread: bool = True, share_prompts: bool = True) -> list[TokenStats]:
    """:class:`TokenStats` of each prepared example (``input_ids``, ``labels``), in order, from batched forward passes.

    Examples are batched by length (:func:`longest_first`; right padding), and only the labelled positions' logits
    are read, in float32: ``log p(y_t) = logit(y_t) - logsumexp(logits)`` and the argmax, without materialising the
    log-softmax; ``spread=False`` skips the mean and standard deviation of ``log p`` under ``p`` (Min-k%++ only;
    they are then None), the one statistic that needs the whole distribution. Where the output layer allows it
    (:func:`~hubunlearn.trainers.head.final_hidden_states`) the model returns its final hidden states and the
    labelled positions' logits are made a chunk at a time (32 MiB of float32 on the CPU, 128 MiB on accelerators):
    no ``batch × length × vocabulary`` tensor is ever held. Otherwise the model's logits are, plus about
    ``labelled tokens × vocabulary × 4`` bytes (× 3 with ``spread``).

    ``share_prompts``: examples that continue the same unlabelled prompt (``prompt_length`` tokens: a question's
    answer, paraphrased and perturbed answers) share one forward pass of it through the KV cache, so each prompt
    runs once per batch, not once per answer; examples without such a prompt (raw text) and models that read the
    prompt themselves (ECO) take the plain path. Each example's numbers are those of a batch of one, to float
    rounding (tests check 1e-5).
    """
    model.eval()
    device = model_device(model)
    results: list[TokenStats | None] = [None] * len(examples)
    shared = share_prompts and not getattr(model, "classifies_prompts", False)
    plain = [i for i in range(len(examples)) if not shared or _prompt_of(examples[i]) is None]
    if len(plain) < len(examples):
        plain_set = set(plain)
        batches_ = list(_shared_prompt_units(examples, [i for i in range(len(examples)) if i not in plain_set], batch_size))
        for units in tqdm(batches_, desc=description, disable=description is None, leave=False):
            scored = _shared_prompt_stats(model, examples, units, pad_token_id, spread, device)
            if scored is None:  # no usable cache: every remaining example takes the plain path
                plain = [i for i in range(len(examples)) if results[i] is None]
                break
            for i, stats in scored.items():
                results[i] = stats
    for chunk_indices in longest_first([len(examples[i]["input_ids"]) for i in plain], batch_size, description):
        indices = [plain[k] for k in chunk_indices]
        chunk = [examples[i] for i in indices]
        batch = {k: v.to(device) for k, v in pad_examples(chunk, pad_token_id).items()}
        extra = {}
        if getattr(model, "classifies_prompts", False) and all("prompt_length" in e for e in chunk):
            extra["classify_lengths"] = [int(e["prompt_length"]) for e in chunk]  # an ECO model's classifier reads the prompts
        with final_hidden_states(model) as head:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        logits, targets, mask = shift(logits, batch["labels"])
        for i, row in zip(indices, _statistics(logits, targets, mask, spread, None if head is None else head.weight)):
            results[i] = _stats_of(row)
    return results
