"""Model cards rendered from an artifact's ``unlearning.json`` through the templates in ``model_cards/``."""

from __future__ import annotations

import os
import re
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .resources import resource_dir

TEMPLATES = resource_dir("model_cards", "model_cards")
PLACEHOLDER_REPO = "PATH_OR_REPO_ID"
STAGE_ORDER = ("reference", "original", "before", "after")
LIBRARY = {"full": "transformers", "lora": "peft", "eco": "hubunlearn"}
LOADING = {
    "full": '''from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}")
tokenizer = AutoTokenizer.from_pretrained("{repo}")''',
    "lora": '''from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # fetches the base model {base}
tokenizer = AutoTokenizer.from_pretrained("{repo}")''',
    "eco": '''from hubunlearn import ECOModel

model = ECOModel.from_pretrained("{repo}")  # wraps the base model {base}''',
}


def hub_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it reads as a Hub repo id rather than a local path."""
    if not name_or_path or os.path.exists(name_or_path) or os.path.isabs(name_or_path) or name_or_path.startswith("."):
        return None
    return name_or_path if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) else None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def data_table(record: dict) -> str:
    rows = []
    for name, d in record["data"].items():
        source = f"[`{d['id']}`](https://huggingface.co/datasets/{d['id']})" if d.get("id") else ("local file" if d.get("path") else "in-memory rows")
        rows.append([name, source, d.get("config") or "", d.get("split") or "", d["num_rows"], f"`{d['sha256'][:16]}…`"])
    return _table(["set", "source", "config", "split", "rows", "SHA-256 of the rows"], rows)


def metrics_table(record: dict) -> str:
    """Rows ``set / metric``, one column per stage (reference model, before, after) present in the record."""
    metrics = record.get("metrics") or {}
    stages = sorted({stage for per_set in metrics.values() for stage in per_set}, key=lambda s: (s not in STAGE_ORDER, STAGE_ORDER.index(s) if s in STAGE_ORDER else 0, s))
    rows = []
    for set_name, per_stage in metrics.items():
        names = sorted({m for values in per_stage.values() for m in values})
        rows += [[set_name, name.replace("_", " ")] + [_number(per_stage.get(stage, {}).get(name, "–")) for stage in stages] for name in names]
    if not rows:
        return "No evaluation was recorded for this artifact yet (see `hubunlearn eval`)."
    return _table(["set", "metric", *stages], rows)


def eval_results(record: dict) -> list[EvalResult] | None:
    """The ``model-index`` entries: every metric of the unlearned model (the ``after`` stage)."""
    forget = record["data"].get("forget") or {}
    results = [
        EvalResult(task_type="text-generation", dataset_type=forget.get("id") or "local", dataset_name=f"{set_name} set",
                   dataset_config=forget.get("config") if set_name == "forget" else None,
                   metric_type=name, metric_name=name.replace("_", " "), metric_value=value)
        for set_name, per_stage in (record.get("metrics") or {}).items()
        for name, value in (per_stage.get("after") or {}).items()
        if isinstance(value, (int, float))
    ]
    return results or None


def hyperparameter_table(record: dict) -> str:
    rows = [[f"`{k}`", f"`{v}`"] for k, v in record["hyperparameters"].items() if not isinstance(v, dict)]
    for group, values in ((k, v) for k, v in record["hyperparameters"].items() if isinstance(v, dict)):
        rows += [[f"`{group}.{k}`", f"`{v}`"] for k, v in values.items()]
    return _table(["hyperparameter", "value"], rows)


def training_summary(record: dict) -> str:
    training, hardware = record.get("training") or {}, record.get("hardware") or {}
    runtime = training.get("train_runtime_s")
    device = hardware.get("accelerator") or hardware.get("device") or training.get("device") or "unknown device"
    parts = [f"{training.get('global_steps', '?')} optimiser steps",
             f"on {hardware.get('num_processes', 1)} × {device}",
             f"in {runtime:.1f} s" if isinstance(runtime, (int, float)) else None]
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items())
    stopped = record.get("stopped")
    text = " ".join(p for p in parts if p) + "."
    if stopped:
        text += f" **Training stopped early at step {stopped['step']} ({stopped['reason']}); these are the last good weights.**"
    return text + (f"\n\nLibraries: {versions}." if versions else "")


def bibtex(paper: dict | None) -> str:
    hubunlearn = "@software{hubunlearn,\n  title = {hubunlearn: machine unlearning for causal language models on the Hugging Face Hub},\n  year = {2026}\n}"
    if not paper or "id" not in paper:
        return hubunlearn
    key = f"{paper.get('authors', 'anonymous').split(' and ')[0].split()[-1].lower()}{paper.get('year', '')}"
    entry = (f"@article{{{key},\n  title = {{{paper['title']}}},\n  author = {{{paper.get('authors', '')}}},\n"
             f"  journal = {{arXiv preprint arXiv:{paper['id']}}},\n  year = {{{paper.get('year', '')}}}\n}}")
    return entry + "\n\n" + hubunlearn


def card_data(record: dict, title: str) -> ModelCardData:
    kind = record["artifact"]
    base = hub_id(record["base_model"]["name_or_path"])
    datasets = sorted({d["id"] for d in record["data"].values() if d.get("id")})
    return ModelCardData(
        base_model=base,
        base_model_relation=None if base is None else ("adapter" if kind == "lora" else "finetune"),
        library_name=LIBRARY[kind],
        tags=sorted(set(record.get("tags") or []) | {"unlearning", "hubunlearn", record["method"].lower()}),
        datasets=datasets or None,
        license=record["base_model"].get("license"),
        model_name=title,
        eval_results=eval_results(record),
    )


def render_card(record: dict, repo_id: str | None = None) -> ModelCard:
    """The card for an artifact: ``repo_id`` goes into the title and the loading snippet."""
    kind = record["artifact"]
    repo = repo_id or PLACEHOLDER_REPO
    title = repo.split("/")[-1]
    base_name = record["base_model"]["name_or_path"]
    base = hub_id(base_name)
    paper = record.get("paper")
    return ModelCard.from_template(
        card_data(record, title),
        template_path=str(TEMPLATES / f"{kind}.md"),
        title=title,
        repo_id=repo,
        method=record["method"],
        paper_ref=f" ([{paper['title']}](https://arxiv.org/abs/{paper['id']}))" if paper else "",
        base_link=f"[`{base}`](https://huggingface.co/{base})" if base else f"`{base_name}`",
        base_model_id=base or base_name,
        data_table=data_table(record),
        metrics_table=metrics_table(record),
        plots=record.get("plots") or [],
        loading_snippet=LOADING[kind].format(repo=repo, base=base or base_name),
        method_description=record.get("method_description") or f"{record['method']}: see the paper cited below.",
        hyperparameter_table=hyperparameter_table(record),
        training_summary=training_summary(record),
        bibtex=bibtex(paper),
    )
