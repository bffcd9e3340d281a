"""``hubunlearn quickstart``: the built-in example, fully offline.

Builds the fictitious world, teaches it to a tiny Llama (cached, so a second run skips this), unlearns a
few people with IHL through a LoRA adapter, and prints what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .artifacts import RECORD_NAME, staging_dir
from .data import DataFormat, tokenize_rows
from .errors import UsageError
from .metrics import answer_probabilities, exact_recall, greedy_answers
from .world import World, teach, tiny_llama, train_tokenizer

logger = logging.getLogger(__name__)

WORLD_VERSION = 1


@dataclass
class QuickstartSettings:
    num_people: int = 30
    num_forget: int = 3
    seed: int = 0
    teach_epochs: int = 40
    unlearn_epochs: int = 8
    learning_rate: float = 5e-3
    lora_r: int = 8


def cache_root() -> Path:
    """``$HUBUNLEARN_CACHE``, else ``$XDG_CACHE_HOME/hubunlearn``, else ``~/.cache/hubunlearn``."""
    if os.environ.get("HUBUNLEARN_CACHE"):
        return Path(os.environ["HUBUNLEARN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hubunlearn"


def world_model(settings: QuickstartSettings, cache: Path | None = None) -> Path:
    """The folder of a tiny Llama that knows the world: taught once, then read from the cache."""
    key = json.dumps([WORLD_VERSION, settings.num_people, settings.seed, settings.teach_epochs]).encode()
    folder = (cache or cache_root()) / f"world-model-{hashlib.sha256(key).hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Two processes sharing the cache (two quickstarts, parallel test workers) teach it once: the second waits.
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if (folder / "config.json").is_file():
            return folder
        logger.info("teaching the tiny model the world, first run only (it is cached in %s)", folder.parent)
        world = World.make(settings.num_people, settings.num_forget, settings.seed)
        tokenizer = train_tokenizer(world.corpus())
        model = tiny_llama(tokenizer, seed=settings.seed)
        with staging_dir(folder) as staging:
            teach(model, tokenizer, world.rows(), staging / "trainer", epochs=settings.teach_epochs, seed=settings.seed)
            shutil.rmtree(staging / "trainer")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return folder


def measure(model, tokenizer, rows: list[dict]) -> dict[str, Any]:
    """Mean answer probability and exact-recall rate of greedy answers, plus the answers themselves."""
    examples = list(tokenize_rows(rows, tokenizer, DataFormat(max_length=128)))
    probabilities = answer_probabilities(model, examples, tokenizer.pad_token_id)
    answers = greedy_answers(model, tokenizer, examples, max_new_tokens=32)
    recalled = exact_recall(answers, [r["answer"] for r in rows])
    return {
        "answer_probability": sum(probabilities) / len(probabilities),
        "exact_recall": sum(recalled) / len(recalled),
        "answers": answers,
    }


@dataclass
class Example:
    """The world's forget and retain rows with the folder and tokenizer of the model that knows them."""

    forget_rows: list[dict]
    retain_rows: list[dict]
    model_dir: Path
    tokenizer: Any

    @classmethod
    def load(cls, settings: QuickstartSettings) -> "Example":
        from transformers import AutoTokenizer

        world = World.make(settings.num_people, settings.num_forget, settings.seed)
        folder = world_model(settings)
        return cls(world.rows("forget"), world.rows("retain"), folder, AutoTokenizer.from_pretrained(folder))

    def model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.model_dir)

    def measure(self, model) -> dict[str, dict[str, Any]]:
        """:func:`measure` on the forget and the retain rows."""
        return {"forget": measure(model, self.tokenizer, self.forget_rows), "retain": measure(model, self.tokenizer, self.retain_rows)}


def _check_output(output_dir: Path) -> None:
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return
    record = output_dir / RECORD_NAME
    if not (record.is_file() and json.loads(record.read_text()).get("example") == "quickstart"):
        raise UsageError(f"output folder {output_dir} is not empty and is not an earlier quickstart result: choose another --output_dir")


def run_quickstart(output_dir: str | Path = "quickstart-output", settings: QuickstartSettings | None = None) -> dict[str, Any]:
    """Run the example end to end; returns the before/after measurements and writes the adapter to ``output_dir``."""
    from peft import LoraConfig

    from .trainers import IHLConfig, IHLTrainer

    settings = settings or QuickstartSettings()
    output_dir = Path(output_dir)
    _check_output(output_dir)
    example = Example.load(settings)
    forget_rows, retain_rows = example.forget_rows, example.retain_rows
    model = example.model()
    before = example.measure(model)

    args = IHLConfig(
        output_dir=str(output_dir),
        overwrite_output_dir=True,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.unlearn_epochs,
        per_device_train_batch_size=4,
        logging_steps=5,
        seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = IHLTrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows,
                         processing_class=example.tokenizer, peft_config=lora)
    trainer.train()
    after = example.measure(trainer.model)

    summary = {
        split: {stage: {k: v for k, v in result[split].items() if k != "answers"} for stage, result in (("before", before), ("after", after))}
        for split in ("forget", "retain")
    }
    trainer.unlearning_metrics = summary
    forget_people = sorted({r["person"] for r in forget_rows})
    trainer.record_extras = {"example": "quickstart", "quickstart": {**asdict(settings), "forget_people": forget_people},
                             "examples": {"forget": [r["question"] for r in forget_rows[:3]], "retain": [r["question"] for r in retain_rows[:3]]}}
    trainer.save_model()
    sample = {"question": forget_rows[0]["question"], "before": before["forget"]["answers"][0], "after": after["forget"]["answers"][0]}
    return {"summary": summary, "sample": sample, "forget_people": forget_people, "output_dir": str(output_dir)}


def format_report(result: dict[str, Any]) -> str:
    """The before/after table and one sample answer."""
    rows = ["", f"Unlearned {', '.join(result['forget_people'])} with IHL on a LoRA adapter.", "",
            f"{'':<18}{'answer probability':>22}{'exact recall':>18}",
            f"{'':<18}{'before':>11}{'after':>11}{'before':>9}{'after':>9}"]
    for split, label in (("forget", "forget people"), ("retain", "retained people")):
        s = result["summary"][split]
        rows.append(f"{label:<18}{s['before']['answer_probability']:>11.3f}{s['after']['answer_probability']:>11.3f}"
                    f"{s['before']['exact_recall']:>9.0%}{s['after']['exact_recall']:>9.0%}")
    sample = result["sample"]
    rows += ["", f"Q: {sample['question']}", f"  before: {sample['before']}", f"  after:  {sample['after']}", "",
             f"Adapter and unlearning.json written to {result['output_dir']}/"]
    return "\n".join(rows)
