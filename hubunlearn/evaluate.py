"""``hubunlearn eval``: a benchmark's sets, per-example statistics, TOFU aggregates, and the reference workflow.

Per-example statistics come first (one batched pass per set and metric family); every reported number is an
aggregate of them, so any eval's ``per_example.json`` can serve later as the reference of another
(``--reference_stats``), and a reference model's statistics are computed once and cached (``--reference``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import RECORD_NAME, read_record, staging_dir
from .data import DataFormat, encode_qa, load_rows
from .errors import UsageError

logger = logging.getLogger(__name__)

TOFU_SPLITS = ("forget01", "forget05", "forget10")
TOFU_SETS = {"forget": "{forget_split}_perturbed", "retain": "retain_perturbed",
             "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
BENCHMARKS = ("tofu", "world")
SET_METRICS = ("probability", "truth_ratio", "rouge", "exact_memorization", "extraction_strength", "extraction_strength_tf")
AGGREGATE_METRICS = ("forget_quality", "model_utility", "mia")
METRICS = SET_METRICS + AGGREGATE_METRICS
DEFAULT_METRICS = ("probability", "truth_ratio", "rouge", "exact_memorization", "extraction_strength_tf", "forget_quality", "model_utility")
EXTRACTION_SETS = ("forget", "retain")  # extraction strength is defined on the unlearning sets (Wang et al.)
OUTPUT_FILES = ("summary.json", "per_example.json")


@dataclass
class EvalConfig:
    """What to evaluate, on which benchmark, with which metrics."""

    model: str
    adapter: str | None = None
    benchmark: str = "tofu"
    forget_split: str = "forget10"
    data: str | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS
    max_examples: int | None = None
    reference: str | None = None
    reference_stats: str | None = None
    holdout: str | None = None
    attacks: tuple[str, ...] = ()
    relearn_steps: int = 10
    relearn_learning_rate: float = 1e-4
    batch_size: int = 32
    max_new_tokens: int = 64
    trust_remote_code: bool = False
    data_format: DataFormat = field(default_factory=lambda: DataFormat(max_length=512))

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise UsageError(f"unknown benchmark '{self.benchmark}': choose one of {', '.join(BENCHMARKS)}")
        if self.benchmark == "tofu" and self.forget_split not in TOFU_SPLITS:
            raise UsageError(f"unknown split '{self.forget_split}': choose one of {', '.join(TOFU_SPLITS)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise UsageError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}")
        from .attacks import ATTACKS

        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise UsageError(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(ATTACKS)}")


def load_sets(config: EvalConfig) -> dict[str, list[dict]]:
    """The benchmark's evaluation sets as rows (question, answer, and where present paraphrased/perturbed answers)."""
    if config.benchmark == "world":
        from .quickstart import QuickstartSettings
        from .world import World

        settings = QuickstartSettings()
        world = World.make(settings.num_people, settings.num_forget, settings.seed)
        sets = {"forget": world.rows("forget"), "retain": world.rows("retain")}
    else:
        source = config.data or "locuslab/TOFU"
        sets = {name: [dict(r) for r in load_rows(f"{source}:{template.format(forget_split=config.forget_split)}")]
                for name, template in TOFU_SETS.items()}
    if config.holdout:
        sets["holdout"] = [dict(r) for r in load_rows(config.holdout)]
    return {name: rows[: config.max_examples] if config.max_examples else rows for name, rows in sets.items()}


def load_for_eval(name_or_path: str, adapter: str | None = None, trust_remote_code: bool = False):
    """Model (with an adapter applied when given, or wrapped by an ECO bundle when ``name_or_path`` is one) and
    tokenizer, checked against each other."""
    from .eco.model import BUNDLE_NAME
    from .modeling import load_model, load_tokenizer

    if (Path(name_or_path) / BUNDLE_NAME).is_file():
        from .eco import ECOModel

        if adapter:
            raise UsageError(f"{name_or_path} is an ECO bundle: it wraps its base model and takes no --adapter")
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        return ECOModel.from_pretrained(name_or_path, tokenizer=tokenizer).eval(), tokenizer

    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = load_model(name_or_path, trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load adapter '{adapter}' on {name_or_path}: {str(error).splitlines()[0]}") from error
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UsageError(f"the tokenizer ({len(tokenizer)} tokens) does not match the model ({embeddings} embeddings): "
                         "use the tokenizer saved with the model")
    return model.eval(), tokenizer


def evaluate_sets(model, tokenizer, sets: dict[str, list[dict]], config: EvalConfig) -> dict[str, list[dict]]:
    """Per-example statistics of every set: the rows' text, the generation, and one number per metric."""
    from .metrics.likelihood import greedy_answers
    from .metrics.stats import token_stats
    from .metrics.tofu import qa_statistics, rouge_l

    metrics, per_example = set(config.metrics), {}
    for name, all_rows in sets.items():
        statistics_ = qa_statistics(model, tokenizer, all_rows, config.data_format, config.batch_size)
        all_results = [{"question": r["question"], "answer": r["answer"], **s} for r, s in zip(all_rows, statistics_)]
        encoded = [encode_qa(tokenizer, r["question"], r["answer"], config.data_format.max_length) for r in all_rows]
        fitting = [i for i, e in enumerate(encoded) if e is not None]  # prompts longer than max_length keep None values
        rows, examples, results = [all_rows[i] for i in fitting], [encoded[i] for i in fitting], [all_results[i] for i in fitting]
        if "truth_ratio" in metrics and results and "truth_ratio" not in results[0]:
            logger.warning("the %s set has no paraphrased and perturbed answers: its truth ratio is skipped", name)
        if "rouge" in metrics or "model_utility" in metrics:
            generations = greedy_answers(model, tokenizer, examples, config.max_new_tokens, config.batch_size, f"generating ({name})")
            for result, generation, rouge in zip(results, generations, rouge_l(generations, [r["answer"] for r in rows])):
                result.update(generation=generation, rouge_recall=rouge["recall"], rouge_f1=rouge["f1"])
        if "extraction_strength_tf" in metrics:
            from .metrics.extraction import teacher_forced_extraction_strength

            for result, stats in zip(results, token_stats(model, examples, tokenizer.pad_token_id, config.batch_size)):
                result["extraction_strength_tf"] = teacher_forced_extraction_strength(stats)
        if "extraction_strength" in metrics and name in EXTRACTION_SETS:
            from .metrics.extraction import extraction_strength

            for result, value in zip(results, extraction_strength(model, tokenizer, examples, config.batch_size, f"extraction ({name})")):
                result["extraction_strength"] = value
        if "mia" in metrics:
            from .metrics.mia import mia_scores

            stats = token_stats(model, examples, tokenizer.pad_token_id, config.batch_size)
            for result, scores in zip(results, _rows_of(mia_scores(stats, [r["answer"] for r in rows]))):  # stats cover the answer
                result["mia"] = scores
        per_example[name] = all_results
    return per_example


def _rows_of(columns: dict[str, list]) -> list[dict]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize_set(name: str, results: list[dict]) -> dict[str, float]:
    """Set-level numbers, aggregated as TOFU does: real authors and world facts use the probability normalised
    against their perturbed answers; the forget truth ratio is mean(min(R, 1/R)), the others mean(max(0, 1 - R))."""
    from .metrics.tofu import forget_truth_ratio_score, retain_truth_ratio_score

    def column(key):
        return [r[key] for r in results if r.get(key) is not None]

    normalised = name in ("real_authors", "world_facts") and column("normalised_probability")
    summary = {"probability": _mean(column("normalised_probability") if normalised else column("probability"))}
    if column("truth_ratio"):
        score = forget_truth_ratio_score if name == "forget" else retain_truth_ratio_score
        summary["truth_ratio"] = score(column("truth_ratio"))
    for key in ("rouge_recall", "rouge_f1", "exact_memorization", "extraction_strength", "extraction_strength_tf"):
        if column(key):
            summary[key] = _mean(column(key))
    return summary


def summarize(per_example: dict[str, list[dict]], config: EvalConfig, reference: dict[str, list[dict]] | None) -> dict[str, Any]:
    """Set means and the aggregates; an aggregate that cannot be computed says why and how to get it."""
    from .metrics.tofu import forget_quality, model_utility

    sets = {name: summarize_set(name, results) for name, results in per_example.items()}
    aggregates: dict[str, Any] = {}
    if "forget_quality" in config.metrics:
        if reference is None:
            aggregates["forget_quality"] = {"value": None, "unavailable": "no reference model: add --reference MODEL "
                                            "(a model trained without the forget set) or --reference_stats per_example.json"}
        else:
            ratios, reference_ratios = (_truth_ratios(p["forget"]) for p in (per_example, reference))
            aggregates["forget_quality"] = {"value": forget_quality(ratios, reference_ratios)} if ratios and reference_ratios else \
                {"value": None, "unavailable": "the forget set has no perturbed answers, so no truth ratios to compare"}
    if "model_utility" in config.metrics:
        values = {f"{s}/{m}": sets.get(s, {}).get(k) for s in ("retain", "real_authors", "world_facts")
                  for m, k in (("probability", "probability"), ("rouge_recall", "rouge_recall"), ("truth_ratio", "truth_ratio"))}
        missing = [k for k, v in values.items() if v is None]
        aggregates["model_utility"] = {"value": model_utility(values)} if not missing else \
            {"value": None, "unavailable": f"needs retain, real_authors and world_facts (missing: {', '.join(missing)})"}
    if "mia" in config.metrics:
        aggregates["mia"] = _mia_summary(per_example, reference)
    return {"config": _config_dict(config), "sets": sets, "aggregates": aggregates}


def _truth_ratios(results: list[dict]) -> list[float]:
    return [r["truth_ratio"] for r in results if r.get("truth_ratio") is not None]


def _mia_summary(per_example: dict, reference: dict | None) -> dict[str, Any]:
    from .metrics.mia import auc, privleak

    if "holdout" not in per_example:
        return {"value": None, "unavailable": "membership inference needs a holdout set of unseen rows: add --holdout SPEC"}

    def aucs(results):
        forget, holdout = results["forget"], results.get("holdout")
        if not holdout or "mia" not in forget[0]:
            return None
        return {attack: auc([r["mia"][attack] for r in forget], [r["mia"][attack] for r in holdout]) for attack in forget[0]["mia"]}

    own, ref = aucs(per_example), aucs(reference) if reference else None
    summary = {"auc": own}
    if ref:
        summary["privleak"] = {attack: privleak(own[attack], ref[attack]) for attack in own}
    return summary


def _config_dict(config: EvalConfig) -> dict[str, Any]:
    values = asdict(config)
    values.pop("data_format")
    return values


# ---- the reference workflow ------------------------------------------------------------------------------------

def reference_cache_path(config: EvalConfig) -> Path:
    from .quickstart import cache_root

    key = json.dumps([config.reference, config.benchmark, config.forget_split, config.data, config.max_examples,
                      sorted(set(config.metrics) - {"forget_quality", "model_utility"}), config.holdout])
    return cache_root() / "reference-stats" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def reference_statistics(config: EvalConfig, sets: dict[str, list[dict]]) -> dict[str, list[dict]] | None:
    """The reference model's per-example statistics: from ``--reference_stats``, from the cache, or computed and cached."""
    if config.reference_stats:
        path = Path(config.reference_stats)
        if not path.is_file():
            raise UsageError(f"--reference_stats {path} does not exist: give a per_example.json from an earlier eval")
        reference = json.loads(path.read_text())
    elif config.reference:
        path = reference_cache_path(config)
        if path.is_file():
            logger.info("reusing the reference statistics cached in %s", path)
            reference = json.loads(path.read_text())
        else:
            model, tokenizer = load_for_eval(config.reference, trust_remote_code=config.trust_remote_code)
            reference = evaluate_sets(model, tokenizer, sets, config)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(reference))
            logger.info("cached the reference statistics in %s (reuse them with --reference_stats)", path)
    else:
        return None
    questions = [r["question"] for r in sets["forget"]]
    if [r["question"] for r in reference.get("forget", [])] != questions:
        raise UsageError("the reference statistics were computed on other forget questions: rerun with --reference, "
                         "or pass the per_example.json of an eval with the same benchmark, split and --max_examples")
    return reference


# ---- running and recording ---------------------------------------------------------------------------------------

def check_eval_output(output_dir: Path) -> None:
    """An eval folder may be reused; anything else that is not empty is refused (never overwrite an artifact)."""
    if output_dir.is_dir() and any(p.name not in OUTPUT_FILES for p in output_dir.iterdir()):
        raise UsageError(f"output folder {output_dir} holds other files: choose an empty or earlier eval --output_dir")


def run_eval(config: EvalConfig, output_dir: str | Path) -> dict[str, Any]:
    """Evaluate, write ``summary.json`` and ``per_example.json`` atomically, and return the summary."""
    from .attacks import run_attacks

    output_dir = Path(output_dir)
    check_eval_output(output_dir)
    sets = load_sets(config)
    reference = reference_statistics(config, sets)
    model, tokenizer = load_for_eval(config.model, config.adapter, config.trust_remote_code)
    per_example = evaluate_sets(model, tokenizer, sets, config)
    summary = summarize(per_example, config, reference)
    if reference is not None:
        summary["reference"] = {name: summarize_set(name, results) for name, results in reference.items()}
    if config.attacks:
        summary["attacks"] = run_attacks(model, tokenizer, sets["forget"], config)
    with staging_dir(output_dir) as staging:
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "per_example.json").write_text(json.dumps(per_example, indent=1) + "\n")
    return summary


def record_into_artifact(summary: dict[str, Any], artifact: str | Path, stage: str = "after") -> Path:
    """Put an eval's set means and aggregates into an artifact's ``unlearning.json`` (and its card, if untouched)."""
    from .cards import card_text, is_untouched

    artifact = Path(artifact)
    record = read_record(artifact)
    metrics = record.setdefault("metrics", {})
    for name, values in summary["sets"].items():
        metrics.setdefault(name, {})[stage] = values
    for name, values in summary.get("reference", {}).items():
        metrics.setdefault(name, {})["reference"] = values
    aggregates = {k: v["value"] for k, v in summary["aggregates"].items() if isinstance(v, dict) and isinstance(v.get("value"), float)}
    if aggregates:
        metrics.setdefault("tofu", {})[stage] = aggregates
    record["evaluation"] = {"benchmark": summary["config"]["benchmark"], "forget_split": summary["config"]["forget_split"]}
    card = artifact / "README.md"
    temporary = artifact / f".{RECORD_NAME}.partial"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(artifact / RECORD_NAME)
    if not card.exists() or is_untouched(card.read_text()):
        card.write_text(card_text(record))
    return artifact / RECORD_NAME


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table: one row per metric, one column per set; then the aggregates."""
    sets = summary["sets"]
    keys = [k for k in ("probability", "truth_ratio", "rouge_recall", "rouge_f1", "exact_memorization",
                        "extraction_strength", "extraction_strength_tf") if any(k in v for v in sets.values())]
    lines = [f"{'metric':<24}" + "".join(f"{name:>14}" for name in sets)]
    for key in keys:
        lines.append(f"{key:<24}" + "".join(f"{sets[name].get(key, float('nan')):>14.4f}" for name in sets))
    for name, value in summary["aggregates"].items():
        if isinstance(value, dict) and "value" in value:
            shown = f"{value['value']:.4g}" if value["value"] is not None else f"unavailable: {value['unavailable']}"
            lines.append(f"{name:<24}{shown}")
        else:
            lines.append(f"{name:<24}{json.dumps(value)}")
    for name, result in summary.get("attacks", {}).items():
        if "unavailable" in result:
            lines.append(f"{'attack ' + name:<24}unavailable: {result['unavailable']}")
            continue
        change = ", ".join(f"{k} {result['clean'][k]:.3f} -> {result['attacked'][k]:.3f}" for k in result["clean"])
        lines.append(f"{'attack ' + name:<24}{change} (clean -> attacked)")
    return "\n".join(lines)
