"""TOFU-mini: a tiny TOFU target model and its retain-only reference, trained here from scratch, offline.

TOFU (Maini et al., "TOFU: A Task of Fictitious Unlearning for LLMs", arXiv 2401.06121) fine-tunes a 7B chat
model on question-answer pairs about 200 fictitious authors, asks a method to unlearn a forget split, and
measures forget quality against a *reference* model trained without the forget authors. TOFU-mini keeps the
benchmark's own data and protocol at toy scale: a ~5M-parameter Llama learns the first ``num_authors``
authors, the forget split's authors and the real-author and world-fact sets; its reference learns the same
minus the forget authors. That gives the reference-model workflow (``hubunlearn eval --reference``) and
end-to-end benchmark runs something to work on without downloading a 7B model or a GPU.

The result is a cached folder with ``data/`` (a TOFU-layout folder that ``load_rows("…/data:CONFIG")`` and
``hubunlearn eval --data`` read), ``target/`` and ``reference/`` (model + tokenizer) and ``tofu_mini.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import staging_dir
from .data import DATA_FILE_BUILDERS, DataFormat, encode_qa, load_rows, looks_like_repo_id, tokenize_rows
from .errors import UsageError

TOFU_MINI_VERSION = 1
INFO_NAME = "tofu_mini.json"
ROWS_PER_AUTHOR = 20  # TOFU: 20 question-answer pairs per author, in author order in `full`
FORGET_SPLITS = ("forget01", "forget05", "forget10")
# Training recipe shared by the target and the reference (tuned to memorise TOFU answers on a CPU).
VOCAB_SIZE = 4096
LEARNING_RATE = 1e-3
BATCH_SIZE = 8
WARMUP_STEPS = 20
MAX_LENGTH = 256
DEFAULT_EPOCHS = 30


@dataclass
class TofuMini:
    """A built TOFU-mini: its folders and what ``tofu_mini.json`` records."""

    root: Path
    data_dir: Path
    target_dir: Path
    reference_dir: Path
    forget_split: str
    info: dict

    @classmethod
    def load(cls, root: str | Path) -> "TofuMini":
        root = Path(root)
        info = json.loads((root / INFO_NAME).read_text())
        return cls(root, root / "data", root / "target", root / "reference", info["settings"]["forget_split"], info)

    def spec(self, config: str) -> str:
        """The data spec of one of its sets, e.g. ``spec("retain_perturbed")``."""
        return f"{self.data_dir}:{config}"


def _needed_configs(forget_split: str) -> list[str]:
    return ["full", forget_split, f"{forget_split}_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]


def _config_files(folder: Path, config: str) -> list[Path]:
    """The files of one config in a Hub-layout folder (``CONFIG.json`` or ``CONFIG/...``), as :func:`load_rows` finds them."""
    for suffix in DATA_FILE_BUILDERS:
        if (folder / f"{config}{suffix}").is_file():
            return [folder / f"{config}{suffix}"]
    if (folder / config).is_dir():
        return sorted(p for p in (folder / config).rglob("*") if p.suffix in DATA_FILE_BUILDERS)
    return []


def _check_inputs(data_dir: Path, forget_split: str) -> dict[str, list[Path]]:
    if forget_split not in FORGET_SPLITS:
        raise UsageError(f"unknown forget split '{forget_split}': choose one of {', '.join(FORGET_SPLITS)}")
    if not data_dir.is_dir():
        raise UsageError(f"TOFU data folder {data_dir} does not exist: give the folder of locuslab/TOFU's files (full.json, forget10.json, ...)")
    files = {}
    for config in _needed_configs(forget_split):
        files[config] = _config_files(data_dir, config)
        if not files[config]:
            raise UsageError(f"TOFU data folder {data_dir} has no '{config}' set ({config}.json); TOFU-mini needs "
                             f"{', '.join(_needed_configs(forget_split))}")
    return files


def _key(row: dict) -> tuple[str, str]:
    return row["question"], row["answer"]  # a question alone is not unique in `full` ("What is the full name of the author?")


def tofu_data_folder(source: str | Path, forget_split: str = "forget10") -> Path:
    """A local folder of TOFU's files: ``source`` itself when it is a folder, else the Hub dataset ``source``
    (e.g. ``locuslab/TOFU``), of which only the configs TOFU-mini needs are downloaded."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or not looks_like_repo_id(str(source)):
        raise UsageError(f"TOFU data {source} is neither a folder nor a Hub dataset id (ORG/NAME): give the folder of "
                         "locuslab/TOFU's files (full.json, forget10.json, ...) or the dataset id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = [pattern for config in _needed_configs(forget_split) for pattern in (f"{config}.*", f"{config}/*")]
    try:
        return Path(snapshot_download(str(source), repo_type="dataset", allow_patterns=patterns))
    except RepositoryNotFoundError as error:
        raise UsageError(f"dataset {source} was not found on the Hub: give a folder with --data or a dataset id you can read") from error
    except (HfHubHTTPError, LocalEntryNotFoundError) as error:
        raise UsageError(f"could not download dataset {source} ({str(error).splitlines()[0]}): check the connection, "
                         "or give a local copy with --data") from error


def _forget_start(full: list[dict], forget: list[dict], forget_split: str) -> int:
    """Index in ``full`` of the forget split's first row; the split must be a run of whole authors in ``full``."""
    position = {}
    for index, row in enumerate(full):
        position.setdefault(_key(row), index)
    start = position.get(_key(forget[0])) if forget else None
    if start is None or start % ROWS_PER_AUTHOR or [_key(r) for r in full[start : start + len(forget)]] != [_key(r) for r in forget]:
        raise UsageError(f"{forget_split} is not a run of whole authors of `full`: this is not TOFU's data")
    return start


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))  # JSON Lines, as TOFU's files


def _training_examples(rows: list[dict], tokenizer) -> list[dict]:
    """Examples with every token a label (question and answer: it memorises far faster from scratch than the
    answer-only loss TOFU uses on a pretrained model) and a ``length`` for length-grouped batches."""
    examples = []
    for row in rows:
        example = encode_qa(tokenizer, row["question"], row["answer"], MAX_LENGTH)
        examples.append({**example, "labels": list(example["input_ids"]), "length": len(example["input_ids"])})
    return examples


def _mean_answer_probability(model, tokenizer, rows: list[dict]) -> float:
    from .metrics import answer_probabilities

    examples = list(tokenize_rows(rows, tokenizer, DataFormat(max_length=MAX_LENGTH)))
    values = answer_probabilities(model, examples, tokenizer.pad_token_id)
    return round(sum(values) / len(values), 4)


def build_tofu_mini(data_dir: str | Path, num_authors: int = 20, forget_split: str = "forget10", hidden_size: int = 256,
                    num_layers: int = 4, epochs: int = DEFAULT_EPOCHS, seed: int = 0, cache_dir: Path | None = None,
                    learning_rate: float = LEARNING_RATE) -> TofuMini:
    """Build (or read from the cache) TOFU-mini from a folder of TOFU's files.

    ``num_authors``: how many of `full`'s first authors are retain authors (1 to the first forget author);
    ``forget_split``: TOFU's forget split, whose (last) authors are the forget authors; ``cache_dir``: the parent
    folder of the build (default :func:`hubunlearn.quickstart.cache_root`), named by a hash of the settings and
    the data. The first call trains the target and the reference (minutes on a CPU); later calls return the
    cached build.
    """
    from .quickstart import cache_root

    data_dir = Path(data_dir)
    files = _check_inputs(data_dir, forget_split)
    settings = {"num_authors": num_authors, "forget_split": forget_split, "hidden_size": hidden_size, "num_layers": num_layers,
                "epochs": epochs, "seed": seed, "vocab_size": VOCAB_SIZE, "learning_rate": learning_rate,
                "batch_size": BATCH_SIZE, "warmup_steps": WARMUP_STEPS}
    digest = hashlib.sha256(json.dumps([TOFU_MINI_VERSION, settings], sort_keys=True).encode())
    for config in sorted(files):
        for path in files[config]:
            digest.update(path.read_bytes())
    root = Path(cache_dir or cache_root()) / f"tofu-mini-{digest.hexdigest()[:12]}"
    if (root / INFO_NAME).is_file():
        return TofuMini.load(root)

    sets = {config: [dict(row) for row in load_rows(f"{data_dir}:{config}")] for config in files}
    full, forget = sets["full"], sets[forget_split]
    forget_start = _forget_start(full, forget, forget_split)
    max_authors = forget_start // ROWS_PER_AUTHOR
    if not isinstance(num_authors, int) or not 1 <= num_authors <= max_authors:
        raise UsageError(f"num_authors (--authors) must be between 1 and {max_authors} for {forget_split} (its forget authors start at "
                         f"author {max_authors + 1} of `full`); got {num_authors}")
    retain = [{"question": r["question"], "answer": r["answer"]} for r in full[: num_authors * ROWS_PER_AUTHOR]]
    retain_keys = {_key(r) for r in retain}
    # TOFU's retain_perturbed holds the first 20 authors of `full`, so it covers the retain authors up to 20.
    retain_perturbed = [r for r in sets["retain_perturbed"] if _key(r) in retain_keys]
    if not retain_perturbed:
        raise UsageError(f"retain_perturbed in {data_dir} has none of the first {num_authors} authors' questions: this is not TOFU's data")
    real_authors, world_facts = sets["real_authors_perturbed"], sets["world_facts_perturbed"]
    general = [{"question": r["question"], "answer": r["answer"]} for r in real_authors + world_facts]
    forget_rows = [{"question": r["question"], "answer": r["answer"]} for r in forget]

    with staging_dir(root) as staging:
        data = staging / "data"
        data.mkdir()
        written = {forget_split: forget_rows, f"{forget_split}_perturbed": sets[f"{forget_split}_perturbed"], "retain": retain,
                   "retain_perturbed": retain_perturbed, "real_authors_perturbed": real_authors, "world_facts_perturbed": world_facts}
        for config, rows in written.items():
            _write_rows(data / f"{config}.json", rows)

        texts = ["Question: Answer:"]
        for row in [*retain, *retain_perturbed, *sets[f"{forget_split}_perturbed"], *real_authors, *world_facts]:
            texts += [row["question"], row["answer"], *([row["paraphrased_answer"]] if "paraphrased_answer" in row else []),
                      *row.get("perturbed_answer", [])]
        tokenizer = _train_tokenizer(texts)
        info: dict[str, Any] = {
            "version": TOFU_MINI_VERSION,
            "settings": settings,
            "data": {"source": str(data_dir.resolve()), "sha256": digest.hexdigest()},
            "authors": {"retain": num_authors, "forget": len(forget) // ROWS_PER_AUTHOR},
            "rows": {**{config: len(rows) for config, rows in written.items()},
                     "target_training": len(retain) + len(forget_rows) + len(general),
                     "reference_training": len(retain) + len(general)},
            "vocab_size": len(tokenizer),
            "training_seconds": {},
            "training_threads": _threads(),
            "answer_probability": {},
        }
        measured = {"forget": forget_rows, "retain": retain, "real_authors": real_authors, "world_facts": world_facts}
        for name, rows in (("target", retain + forget_rows + general), ("reference", retain + general)):
            model, seconds = _train(tokenizer, rows, hidden_size, num_layers, epochs, learning_rate, seed, staging / f"{name}-trainer")
            info["parameter_count"] = sum(p.numel() for p in model.parameters())
            info["training_seconds"][name] = round(seconds, 1)
            info["answer_probability"][name] = {split: _mean_answer_probability(model, tokenizer, split_rows) for split, split_rows in measured.items()}
            model.save_pretrained(staging / name)
            tokenizer.save_pretrained(staging / name)
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return TofuMini.load(root)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _train_tokenizer(texts: list[str]):
    from .world import train_tokenizer

    return train_tokenizer(texts, VOCAB_SIZE)


def _train(tokenizer, rows: list[dict], hidden_size: int, num_layers: int, epochs: int, learning_rate: float, seed: int, output_dir: Path):
    from .world import teach, tiny_llama

    model = tiny_llama(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    start = time.perf_counter()
    teach(model, tokenizer, _training_examples(rows, tokenizer), output_dir, epochs=epochs, learning_rate=learning_rate,
          batch_size=BATCH_SIZE, seed=seed, max_length=MAX_LENGTH, warmup_steps=WARMUP_STEPS,
          train_sampling_strategy="group_by_length", logging_steps=10_000)
    seconds = time.perf_counter() - start
    shutil.rmtree(output_dir, ignore_errors=True)
    return model, seconds
