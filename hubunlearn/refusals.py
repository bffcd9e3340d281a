"""Alternate (refusal) answers for IdkNLL and IdkDPO: where they come from and which forget row gets which.

``--alternate_answers`` takes:

- nothing (the default): the package's own list of refusal sentences (``hubunlearn/refusals.txt``, one per line,
  written for hubunlearn: :func:`builtin_refusals`);
- a ``.txt`` file: one answer per line (blank lines skipped);
- any data spec of :mod:`hubunlearn.data` (``ORG/NAME[:CONFIG][@SPLIT]``, a JSON/JSONL/CSV/Parquet file, ``FOLDER:CONFIG``):
  one answer per row, read from its ``--answer_key`` column (``answer`` by default), else its ``text`` column, else
  its only column;
- ``column:NAME``: the forget set's own column ``NAME``, one alternate answer per forget row (no pairing needed).

A list of answers is paired with the forget rows by the run's seed (:func:`pair_answers`): the same seed gives the same
pairing, another seed another one. Each forget row keeps its answer for the whole run (TOFU's code draws a new one
each time a row is read; a fixed pairing lets IdkDPO cache the original's likelihood of it and keeps runs repeatable).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import datasets

from .data import ALTERNATE, DataFormat, DataSpec, encode_qa, load_rows
from .errors import UsageError
from .resources import PACKAGE

REFUSALS_FILE = PACKAGE / "refusals.txt"
COLUMN_PREFIX = "column:"
logger = logging.getLogger(__name__)


def builtin_refusals() -> list[str]:
    """The package's refusal sentences ("I don't know"-style, varied wording and length), in file order."""
    return _lines(REFUSALS_FILE)


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"--alternate_answers {path} is not UTF-8 text ({error.reason} at byte {error.start}): save it as "
                         "UTF-8, one answer per line") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def describe_source(spec: str | None) -> str:
    """What the record and the card say about where the answers came from."""
    return "the built-in refusal list" if spec is None else f"--alternate_answers {spec}"


def load_answers(spec: str | None, forget_rows: datasets.Dataset, data_format: DataFormat) -> tuple[list[str], bool]:
    """``(answers, per_row)``: the alternate answers ``spec`` names and whether they are already one per forget row
    (``column:NAME``). Raises a one-line :class:`UsageError` for an empty spec, a missing column, an unreadable source,
    no answers, or a blank or non-text answer."""
    if spec is None:
        return builtin_refusals(), False
    spec = str(spec).strip()
    if not spec:
        raise UsageError("--alternate_answers is empty: give a .txt file (one answer per line), a data set with one answer "
                         "per row, or column:NAME (a column of the forget set); leave it out for the built-in refusals")
    if spec.startswith(COLUMN_PREFIX) and not Path(spec).exists():
        name = spec[len(COLUMN_PREFIX):]
        if name not in forget_rows.column_names:
            raise UsageError(f"--alternate_answers {spec}: the forget set has no column '{name}' "
                             f"(its columns: {', '.join(forget_rows.column_names)})")
        return _checked(forget_rows[name], spec), True
    if Path(spec).suffix == ".txt" and Path(spec).is_file():
        answers = _lines(Path(spec))
    else:
        rows = load_rows(DataSpec.parse(spec))
        column = next((c for c in (data_format.answer_key, data_format.text_key) if c in rows.column_names), None)
        if column is None and len(rows.column_names) == 1:
            column = rows.column_names[0]
        if column is None:
            raise UsageError(f"--alternate_answers {spec}: no column to read answers from (columns: "
                             f"{', '.join(rows.column_names) or 'none'}); give it an '{data_format.answer_key}' or "
                             f"'{data_format.text_key}' column, or a single column")
        answers = list(rows[column])
    if not answers:
        raise UsageError(f"--alternate_answers {spec} holds no answers: give at least one (one per line or row)")
    return _checked(answers, spec), False


def _checked(answers: list, spec: str) -> list[str]:
    for number, answer in enumerate(answers, 1):
        if not isinstance(answer, str) or not answer.strip():
            raise UsageError(f"--alternate_answers {spec}: answer {number} is {'blank' if isinstance(answer, str) else 'not text'} "
                             f"({answer!r}); every alternate answer must be non-empty text")
    return [answer.strip() for answer in answers]


def pair_answers(num_rows: int, num_answers: int, seed: int) -> list[int]:
    """Which answer each of ``num_rows`` forget rows gets: ``permutation[i % num_answers]`` for one permutation of the
    answers seeded by ``seed``, so rows get distinct answers while there are enough and the pairing is repeatable."""
    permutation = list(range(num_answers))
    random.Random(seed).shuffle(permutation)
    return [permutation[i % num_answers] for i in range(num_rows)]


def with_alternates(rows: datasets.Dataset, answers: list[str], per_row: bool, tokenizer, data_format: DataFormat,
                    seed: int, spec: str | None = None) -> datasets.Dataset:
    """Forget examples (``input_ids``, ``labels``, ``prompt_length`` of the true answer, as :func:`~hubunlearn.data.tokenize_rows`
    makes them) that also carry their paired alternate completion as ``alternate_input_ids``/``alternate_labels`` (the
    same prompt, the alternate answer labelled): the pairing then survives shuffling and sharding.

    Needs question-answer rows. A row whose prompt does not fit ``max_length`` is left out (as ``tokenize_rows`` does);
    an alternate answer that tokenises to nothing is a one-line :class:`UsageError`."""
    shape = data_format.shape_of(rows.column_names, "the forget set") if "input_ids" not in rows.column_names else "tokens"
    if shape != "qa":
        raise UsageError(f"alternate answers replace the answer of question-answer rows: give a forget set with "
                         f"'{data_format.question_key}' and '{data_format.answer_key}' columns (not raw text or token ids)")
    for answer in dict.fromkeys(answers):
        if not tokenizer(answer, add_special_tokens=False)["input_ids"]:
            raise UsageError(f"{describe_source(spec)}: {answer!r} tokenises to nothing; give answers with text")
    paired = list(range(len(rows))) if per_row else pair_answers(len(rows), len(answers), seed)
    examples, skipped = [], 0
    for row, index in zip(rows, paired):
        question = str(row[data_format.question_key])
        true = encode_qa(tokenizer, question, str(row[data_format.answer_key]), data_format.max_length)
        alternate = encode_qa(tokenizer, question, answers[index], data_format.max_length)
        if true is not None and alternate is not None:
            examples.append({**true, f"{ALTERNATE}input_ids": alternate["input_ids"], f"{ALTERNATE}labels": alternate["labels"],
                             f"{ALTERNATE}answer": answers[index]})
        else:
            skipped += 1
    if skipped:
        logger.warning("%d forget prompts are longer than max_length=%d and were left out", skipped, data_format.max_length)
    if not examples:
        raise UsageError(f"no usable forget example: every prompt is longer than --max_length {data_format.max_length}")
    return datasets.Dataset.from_list(examples)
