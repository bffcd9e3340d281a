"""Forget, retain and evaluation sets: one road from a data spec to padded, answer-masked batches.

A *data spec* names rows the same way everywhere (CLI, recipes, Python)::

    locuslab/TOFU:forget10            Hub dataset id, config, split "train"
    locuslab/TOFU:forget10@train      ... with an explicit split
    ../shared/data/tofu:retain90      local folder laid out like the Hub dataset (CONFIG.json, CONFIG/...)
    my_facts.jsonl                    local JSON / JSONL / CSV / Parquet file

Rows come in two shapes: question-answer pairs (prompt formatted with the tokenizer's chat template,
or ``Question: ...\\nAnswer:`` when it has none; labels cover the answer tokens only) and raw text
(every token is a label; each document chunked to a fixed token length).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import datasets
import numpy as np
import torch

from .errors import UsageError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
PLAIN_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class DataSpec:
    """Where rows come from: a Hub dataset id or local path, an optional config and a split."""

    source: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, spec: "str | DataSpec") -> "DataSpec":
        if isinstance(spec, DataSpec):
            return spec
        spec = str(spec).strip()
        if not spec:
            raise UsageError("empty data spec: give a Hub dataset id (ORG/NAME:CONFIG) or a local file or folder")
        split = "train"
        if "@" in spec and not os.path.exists(spec):
            spec, split = spec.rsplit("@", 1)
        config = None
        if ":" in spec and not os.path.exists(spec):
            spec, config = spec.rsplit(":", 1)
        return cls(spec, config or None, split or "train")

    def __str__(self) -> str:
        text = self.source + (f":{self.config}" if self.config else "")
        return text + (f"@{self.split}" if self.split != "train" else "")

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.source)


def _split_of(path: Path) -> str:
    """The split a data file of a config folder holds: its name before the first dot, less a shard suffix
    (``forget_qa.json``, ``forget_qa-00000-of-00001.parquet``: ``forget_qa``; not ``forget_qa_icl``)."""
    return path.name.split(".")[0].split("-")[0]


def _local_data_files(spec: DataSpec) -> list[Path]:
    path = Path(spec.source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"{path} is neither a data file nor a folder: give a .jsonl, .json, .csv or .parquet file, or a folder of them")
    if spec.config is None:
        candidates = sorted(p for p in path.iterdir() if p.suffix in DATA_FILE_BUILDERS or (p.is_dir() and not p.name.startswith(".")))
        if len(candidates) == 1 and candidates[0].is_file():
            return candidates
        if not candidates:
            raise UsageError(f"folder {path} holds no data: put a .jsonl, .json, .csv or .parquet file in it, or give the file itself")
        names = ", ".join(p.stem for p in candidates)
        raise UsageError(f"folder {path} holds several data sets; name one as {path}:CONFIG (found: {names})")
    for suffix in DATA_FILE_BUILDERS:
        if (path / f"{spec.config}{suffix}").is_file():
            return [path / f"{spec.config}{suffix}"]
    folder = path / spec.config
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix in DATA_FILE_BUILDERS)
        for_split = [p for p in files if _split_of(p) == spec.split]
        if for_split or (files and spec.split == "train"):  # a folder of one set whose files name no split: its rows
            return for_split or files
        if files:
            raise UsageError(f"no split '{spec.split}' in {folder}; choose one of: {', '.join(sorted({_split_of(p) for p in files}))}")
    found = sorted({p.stem for p in path.iterdir() if p.suffix in DATA_FILE_BUILDERS or p.is_dir()})
    raise UsageError(f"no data set '{spec.config}' in {path}; choose one of: {', '.join(found) or 'none'}")


def load_rows(spec: "str | DataSpec") -> datasets.Dataset:
    """Load the rows a spec names, from a local file or folder or from the Hub (once per spec and process); TRL's
    formats get ``question``/``answer`` columns (:func:`with_question_answer`)."""
    return with_question_answer(_load_rows(DataSpec.parse(spec)))


def _turn_text(content: Any) -> str:
    """A message's content: a string, or a list of blocks (``{"type": "text", "text": ...}``) joined."""
    if isinstance(content, str):
        return content
    return "".join(block.get("text") or "" for block in content if isinstance(block, dict))


def _last_turn(messages: list[dict], role: str) -> str:
    turns = [m for m in messages if m.get("role") == role]
    if not turns:
        raise ValueError(f"a conversation has no {role} turn")
    return _turn_text(turns[-1]["content"])


def _trl_question_answer(row: dict) -> dict[str, str]:
    if row.get("messages") is not None:  # conversational language modelling: the last assistant turn answers
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is None:
            raise ValueError("a conversation has no assistant turn")
        return {"question": _last_turn(messages[:last], "user"), "answer": _turn_text(messages[last]["content"])}
    prompt, completion = row["prompt"], row["completion"]
    return {"question": prompt if isinstance(prompt, str) else _last_turn(prompt, "user"),
            "answer": completion if isinstance(completion, str) else _last_turn(completion, "assistant")}


def with_question_answer(rows: datasets.Dataset) -> datasets.Dataset:
    """TRL's dataset formats, as they are, given ``question``/``answer`` columns (the originals are kept): standard
    or conversational ``prompt``/``completion`` (the last user turn of the prompt is the question, the completion's
    last assistant turn the answer), and conversational ``messages`` (the last assistant turn is the answer, the
    user turn before it the question). Rows that already have ``question``/``answer`` or ``text`` pass unchanged.
    Raises a one-line :class:`UsageError` for a conversation without a user or an assistant turn."""
    columns = set(rows.column_names)
    if {"question", "answer"} <= columns or "text" in columns or not ({"prompt", "completion"} <= columns or "messages" in columns):
        return rows
    try:
        return datasets.Dataset.from_list([{**row, **_trl_question_answer(row)} for row in rows])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot read TRL-format rows ({error}): each needs a user turn and an assistant answer") from error


@functools.lru_cache(maxsize=16)
def looks_like_repo_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub repository id, ``ORG/NAME`` (not a relative or absolute path)."""
    return source.count("/") == 1 and not source.startswith(("/", "."))


def _load_rows(spec: DataSpec) -> datasets.Dataset:
    if spec.is_local:
        files = [f for f in _local_data_files(spec) if f.stat().st_size > 0]
        if not files:
            return datasets.Dataset.from_dict({})
        builders = {DATA_FILE_BUILDERS[f.suffix] for f in files}
        if len(builders) != 1:
            raise UsageError(f"{spec} mixes file formats ({', '.join(sorted(builders))}); keep one format per data set")
        try:
            return datasets.load_dataset(builders.pop(), data_files=[str(f) for f in files], split="train")
        except Exception as error:  # datasets raises many kinds for unreadable files
            raise UsageError(f"cannot read {spec}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not looks_like_repo_id(spec.source):
        raise UsageError(f"data '{spec.source}' is neither an existing file or folder nor a Hub dataset id (ORG/NAME)")
    from .muse import MUSE_REVISIONS  # unlearning reads the MUSE corpora at the commit their eval reads

    try:
        return datasets.load_dataset(spec.source, spec.config, split=spec.split, revision=MUSE_REVISIONS.get(spec.source))
    except Exception as error:
        from .gated import gated_message, hub_unreachable

        gated = gated_message(spec.source, error, spec.config)
        if gated:
            raise UsageError(gated) from error
        if hub_unreachable(error):
            raise UsageError(f"cannot load dataset {spec}: the Hub cannot be reached here (offline: HF_HUB_OFFLINE / "
                             "HF_DATASETS_OFFLINE, or no network); run once online to cache it, or give a local file or "
                             "folder") from error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot load dataset {spec} from the Hub ({first_line}); check the id, config and split") from error


def content_hash(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """SHA-256 over the named columns of every row, stable across file formats."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row[c] for c in columns], ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class DataFormat:
    """How rows become training examples."""

    question_key: str = "question"
    answer_key: str = "answer"
    text_key: str = "text"
    max_length: int = 512

    def shape_of(self, column_names: Sequence[str], name: str = "data") -> str:
        """``"qa"`` or ``"text"``, or a one-line error naming the columns that exist."""
        if self.question_key in column_names and self.answer_key in column_names:
            return "qa"
        if self.text_key in column_names:
            return "text"
        raise UsageError(
            f"{name} has columns [{', '.join(column_names)}]; expected '{self.question_key}' and "
            f"'{self.answer_key}' (set --question_key/--answer_key), '{self.text_key}' (set --text_key), or TRL's "
            "'prompt'/'completion' or 'messages'"
        )

    def columns(self, shape: str) -> list[str]:
        return [self.question_key, self.answer_key] if shape == "qa" else [self.text_key]


def format_prompt(tokenizer, question: str) -> str:
    """The prompt text for a question: the tokenizer's chat template if it has one, else the plain template."""
    if uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return PLAIN_PROMPT.format(question=question)


def uses_chat_template(tokenizer) -> bool:
    """Whether prompts are rendered by the tokenizer's chat template, which writes its own special tokens (BOS
    included): text rendered by it is tokenised with ``add_special_tokens=False``, or BOS would appear twice."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_inputs(tokenizer, questions: Sequence[str], **kwargs):
    """The rendered prompts of ``questions`` tokenised for ``generate`` or a forward pass: special tokens added once
    (by the chat template, or by the tokenizer for the plain template). ``kwargs`` go to the tokenizer (e.g.
    ``return_tensors="pt", padding=True, padding_side="left"``); returns its ``BatchEncoding``."""
    return tokenizer([format_prompt(tokenizer, q) for q in questions], add_special_tokens=not uses_chat_template(tokenizer), **kwargs)


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> dict[str, list[int]] | None:
    """Token ids of prompt + answer with labels on the answer tokens only.

    The boundary is found on characters: a token belongs to the answer when it ends after the answer's
    first character, so a token that straddles the boundary counts as answer and no answer character is
    ever part of the prompt. Returns None when the prompt alone does not fit in ``max_length``.
    """
    chat = uses_chat_template(tokenizer)
    prompt = format_prompt(tokenizer, question)
    answer_text = (answer if chat else " " + answer.lstrip()) + (tokenizer.eos_token or "")
    if tokenizer.is_fast:
        encoded = tokenizer(prompt + answer_text, add_special_tokens=not chat, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        is_answer = [end > len(prompt) for _, end in encoded["offset_mapping"]]
        prompt_length = is_answer.index(True) if any(is_answer) else len(ids)
    else:
        prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
        ids = prompt_ids + tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        prompt_length = len(prompt_ids)
    if prompt_length >= max_length:
        return None
    ids = ids[:max_length]
    labels = [IGNORE_INDEX] * prompt_length + ids[prompt_length:]
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length}


def encode_text(tokenizer, text: str, chunk_length: int) -> list[dict[str, list[int]]]:
    """One document as chunks of ``chunk_length`` tokens, every token a label."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    chunks = [ids[i : i + chunk_length] for i in range(0, len(ids), chunk_length)]
    return [{"input_ids": c, "labels": list(c), "prompt_length": 0} for c in chunks if len(c) >= 2]


def tokenize_rows(rows: datasets.Dataset | list[dict], tokenizer, data_format: DataFormat, name: str = "data") -> datasets.Dataset:
    """Prepared examples (``input_ids``, ``labels``, ``prompt_length``) from raw rows of either shape.

    Rows that already carry ``input_ids`` and ``labels`` pass through unchanged.
    """
    if isinstance(rows, list):
        rows = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    if len(rows) == 0:
        raise UsageError(f"the {name} set is empty: give at least one row")
    if {"input_ids", "labels"} <= set(rows.column_names):
        return rows
    shape = data_format.shape_of(rows.column_names, f"the {name} set")
    examples, skipped = [], 0
    for row in rows:
        if shape == "qa":
            example = encode_qa(tokenizer, str(row[data_format.question_key]), str(row[data_format.answer_key]), data_format.max_length)
            skipped += example is None
            examples.extend([example] if example else [])
        else:
            examples.extend(encode_text(tokenizer, str(row[data_format.text_key]), data_format.max_length))
    if skipped:
        logger.warning("%d %s prompts are longer than max_length=%d and were left out", skipped, name, data_format.max_length)
    if not examples:
        raise UsageError(f"no usable {name} example: every prompt is longer than --max_length {data_format.max_length}")
    return datasets.Dataset.from_list(examples)


def describe(spec: "str | DataSpec | None", rows: datasets.Dataset, data_format: DataFormat) -> dict[str, Any]:
    """What an artifact records about a data set: where it came from, its size and a content hash."""
    columns = [c for c in data_format.columns(data_format.shape_of(rows.column_names)) if c in rows.column_names]
    parsed = DataSpec.parse(spec) if spec is not None else None
    return {
        "id": parsed.source if parsed and not parsed.is_local else None,
        "path": os.path.abspath(parsed.source) if parsed and parsed.is_local else None,
        "config": parsed.config if parsed else None,
        "split": parsed.split if parsed else None,
        "num_rows": len(rows),
        "sha256": content_hash(rows, columns),
    }


def count_overlap(forget: datasets.Dataset, retain: datasets.Dataset, columns: Sequence[str]) -> int:
    """How many forget rows also appear (same values in ``columns``) in the retain set."""
    def key(row):
        return json.dumps([row[c] for c in columns], ensure_ascii=False, default=str)

    retain_keys = {key(row) for row in retain}
    return sum(key(row) in retain_keys for row in forget)


class ForgetRetainDataset(torch.utils.data.Dataset):
    """Pairs each forget example with a retain example.

    Its length is the forget set's, so the Trainer's (distributed) sampler shards forget indices across
    ranks; the retain partner of forget index ``i`` in epoch ``e`` is ``perm[(e * n_forget + i) % n_retain]``
    for one seeded permutation, so distinct forget indices (hence distinct ranks) draw distinct retain
    examples within an epoch, and successive epochs walk on through the retain set.
    """

    def __init__(self, forget: datasets.Dataset, retain: datasets.Dataset | None = None, seed: int = 0):
        self.forget, self.retain = forget, retain
        self.epoch = 0
        self.permutation = list(range(len(retain))) if retain is not None else []
        random.Random(seed).shuffle(self.permutation)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.forget)

    def retain_index(self, index: int) -> int:
        return self.permutation[(self.epoch * len(self.forget) + index) % len(self.permutation)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"forget": self.forget[index], "forget_index": index}
        if self.retain is not None:
            retain_index = self.retain_index(index)
            item.update(retain=self.retain[retain_index], retain_index=retain_index)
        return item


def holdout_split(items: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """(fit, held out): a seeded random ``fraction`` held out. Random, not every k-th row: datasets like TOFU list
    each author's questions in the same order, so a stride would hold out one kind of question entirely."""
    held = np.zeros(len(items), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(items))[: max(1, round(fraction * len(items)))]] = True
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def pad_examples(examples: Sequence[dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Stack examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for example in examples:
        pad = width - len(example["input_ids"])
        for key, values, filler in (
            ("input_ids", list(example["input_ids"]), pad_token_id),
            ("attention_mask", [1] * len(example["input_ids"]), 0),
            ("labels", list(example["labels"]), IGNORE_INDEX),
        ):
            batch[key].append(values + [filler] * pad if padding_side == "right" else [filler] * pad + values)
    return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def concatenate_batches(batches: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batches (:func:`pad_examples`) as one: each widened to the widest one's width (``input_ids``
    with ``pad_token_id``, ``attention_mask`` with 0, ``labels`` with ``IGNORE_INDEX``), then stacked along the batch
    axis in order. Other keys are left out. A causal LM gives every real token of a row the same logits either way
    (right padding: padded positions come after the real ones and are masked), so one forward pass over the result
    serves all the batches: split its logits by rows with ``torch.split`` (never slice them: see
    ``UnlearnTrainer.joint_logits``)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fillers = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=filler) for b in batches])
            for key, filler in fillers.items()}


# Prefix of the columns (and batch keys) holding a second completion of an example's prompt: IdkNLL and IdkDPO's
# paired refusal (``alternate_input_ids``, ``alternate_labels``; in batches also ``alternate_attention_mask``).
ALTERNATE = "alternate_"
# Per-example figures a trainer stores beside the tokens (a column of the examples) and reads off the batch: the frozen
# original's summed answer log-likelihood, cached before training for methods that need nothing else from it (NPO), and
# of the alternate completion (IdkDPO).
EXAMPLE_STATISTICS = ("reference_log_prob", f"{ALTERNATE}reference_log_prob")


def completion(example: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An example's completion as ``{"input_ids", "labels"}``: its own (``prefix=""``) or the alternate one (``ALTERNATE``)."""
    return {"input_ids": example[f"{prefix}input_ids"], "labels": example[f"{prefix}labels"]}


def alternate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The alternate completions a collated batch carries (``alternate_*`` keys), as a batch of their own
    (``input_ids``, ``attention_mask``, ``labels``, and ``reference_log_prob`` once cached)."""
    return {key[len(ALTERNATE):]: value for key, value in batch.items() if key.startswith(ALTERNATE)}


def collate(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """:func:`pad_examples` (right padding), the alternate completions the examples carry padded the same way (as
    ``alternate_input_ids``, ``alternate_attention_mask``, ``alternate_labels``, at their own width), and each
    :data:`EXAMPLE_STATISTICS` column the examples carry as a float32 ``(batch,)`` tensor."""
    batch = pad_examples(examples, pad_token_id)
    if f"{ALTERNATE}input_ids" in examples[0]:
        alternate = pad_examples([completion(e, ALTERNATE) for e in examples], pad_token_id)
        batch.update({f"{ALTERNATE}{key}": value for key, value in alternate.items()})
    for key in EXAMPLE_STATISTICS:
        if key in examples[0]:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


@dataclass
class ForgetRetainCollator:
    """Collates :class:`ForgetRetainDataset` items into ``{"forget": batch, "retain": batch, ...}`` (:func:`collate`)."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            "forget": collate([i["forget"] for i in items], self.pad_token_id),
            "forget_index": torch.tensor([i["forget_index"] for i in items]),
        }
        if "retain" in items[0]:
            batch["retain"] = collate([i["retain"] for i in items], self.pad_token_id)
            batch["retain_index"] = torch.tensor([i["retain_index"] for i in items])
        return batch
