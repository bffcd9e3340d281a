"""``hubunlearn eval``: a benchmark's sets, per-example statistics, TOFU aggregates, and the reference workflow.

Per-example statistics come first (one teacher-forced and one generation pass over all sets: :func:`evaluate_sets`);
every reported number is an aggregate of them, so any eval's ``per_example.json`` can serve later as the reference of
another (``--reference_stats``), and a reference model's statistics are computed once and cached (``--reference``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import KEPT_ON_OVERWRITE, RECORD_NAME, read_record, staging_dir
from .data import DataFormat, load_rows
from .errors import UsageError

logger = logging.getLogger(__name__)

TOFU_SPLITS = ("forget01", "forget05", "forget10")
TOFU_SETS = {"forget": "{forget_split}_perturbed", "retain": "retain_perturbed",
             "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
BENCHMARKS = ("tofu", "world", "muse", "wmdp")
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
    revision: str | None = None  # of a Hub model (branch, tag or commit); the adapter loads at its own default
    benchmark: str = "tofu"
    forget_split: str = "forget10"
    corpus: str | None = None  # MUSE's corpus: news or books (hubunlearn.muse)
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
    device: str = "auto"  # where the model (and the reference model) compute: auto (the accelerator if any), cpu, cuda[:N]
    progress: bool = True  # progress bars of the scoring and generation passes
    data_format: DataFormat = field(default_factory=lambda: DataFormat(max_length=512))
    # lm-evaluation-harness (hubunlearn.harness): the wmdp benchmark's tasks, harness tasks added as utility to any
    # benchmark, and folders or YAML files of harness tasks of one's own (local data)
    wmdp_tasks: tuple[str, ...] = ("wmdp_bio", "wmdp_cyber", "wmdp_chem", "mmlu")
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: tuple[str, ...] = ()

    def harness_tasks(self) -> tuple[str, ...]:
        """The lm-evaluation-harness tasks this eval scores: WMDP's (benchmark wmdp), then ``lm_eval_tasks``."""
        tasks = self.wmdp_tasks if self.benchmark == "wmdp" else ()
        return tuple(dict.fromkeys(tasks + tuple(self.lm_eval_tasks)))

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise UsageError(f"unknown benchmark '{self.benchmark}': choose one of {', '.join(BENCHMARKS)}")
        if self.benchmark == "tofu" and self.forget_split not in TOFU_SPLITS:
            raise UsageError(f"unknown split '{self.forget_split}': choose one of {', '.join(TOFU_SPLITS)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise UsageError(f"--max_examples must be at least 1 (got {self.max_examples}): leave it out to evaluate every row")
        if self.reference and self.reference_stats:
            raise UsageError("give the reference once: --reference MODEL (its statistics are computed and cached) or "
                             "--reference_stats per_example.json, not both")
        from .muse import check_config

        check_config(self)  # --corpus, and MUSE's own metrics and options
        unknown = [m for m in self.metrics if m not in METRICS] if self.benchmark != "muse" else []
        if unknown:
            raise UsageError(f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}")
        from .attacks import ATTACKS

        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise UsageError(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(ATTACKS)}")
        from .modeling import resolve_device

        resolve_device(self.device)  # a device this machine lacks is refused before anything loads
        self._check_harness()

    def _check_harness(self) -> None:
        from .harness import WMDP_TASKS, require_lm_eval

        if self.benchmark == "wmdp":
            unknown = [t for t in self.wmdp_tasks if t not in WMDP_TASKS]
            if unknown or not self.wmdp_tasks:
                raise UsageError(f"unknown --wmdp_tasks {', '.join(unknown) or '(none)'}: choose from {', '.join(WMDP_TASKS)} "
                                 "(any other harness task: --lm_eval_tasks)")
            given = [flag for flag, value in (("--reference", self.reference), ("--reference_stats", self.reference_stats),
                                              ("--holdout", self.holdout), ("--attack", self.attacks)) if value]
            if tuple(self.metrics) not in ((), DEFAULT_METRICS) or given:
                raise UsageError(f"--benchmark wmdp is scored by lm-evaluation-harness (accuracy): "
                                 f"{', '.join(given) or '--metrics'} does not apply to it")
            self.metrics = ()
        if self.lm_eval_include and not self.harness_tasks():
            raise UsageError("--lm_eval_include registers harness tasks: name the ones to run with --lm_eval_tasks")
        for path in self.lm_eval_include:
            if not Path(path).exists():
                raise UsageError(f"--lm_eval_include {path} does not exist: give a folder of harness task YAML files or one such file")
        if self.harness_tasks():
            require_lm_eval()


def load_sets(config: EvalConfig) -> dict[str, list[dict]]:
    """The benchmark's evaluation sets as rows (question, answer, and where present paraphrased/perturbed answers)."""
    if config.benchmark == "wmdp":  # lm-evaluation-harness brings its own data (hubunlearn.harness)
        sets = {}
    elif config.benchmark == "world":
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


def is_eco_bundle(name_or_path: str, revision: str | None = None) -> bool:
    """Whether ``name_or_path`` (a folder, or a Hub repo at ``revision``) is an ECO bundle: it holds ``eco.json``.
    A Hub repo that cannot be read counts as no bundle (loading it as a model then says why)."""
    from .eco.model import BUNDLE_NAME

    if Path(name_or_path).is_dir():
        return (Path(name_or_path) / BUNDLE_NAME).is_file()
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name_or_path, BUNDLE_NAME, revision=revision)
    except Exception:  # not a repo id, no such repo or file, offline without a cached copy
        return False
    return True


def load_for_eval(name_or_path: str, adapter: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
                  device: str | None = "auto"):
    """Model (at ``revision`` of a Hub repo; with an adapter applied when given, or wrapped by an ECO bundle when
    ``name_or_path`` is one, local or on the Hub) and tokenizer, checked against each other. The model is placed on
    ``device`` (:func:`~hubunlearn.modeling.resolve_device`: ``auto`` is the GPU when there is one), in eval mode."""
    from .modeling import load_model, load_tokenizer, place

    if is_eco_bundle(name_or_path, revision):
        from .eco import ECOModel

        if adapter:
            raise UsageError(f"{name_or_path} is an ECO bundle: it wraps its base model and takes no --adapter")
        tokenizer = load_tokenizer(name_or_path, revision, trust_remote_code=trust_remote_code)  # a bundle carries its tokenizer
        return place(ECOModel.from_pretrained(name_or_path, tokenizer=tokenizer, revision=revision), device).eval(), tokenizer

    tokenizer = load_tokenizer(name_or_path, revision, trust_remote_code=trust_remote_code)
    model = load_model(name_or_path, revision, trust_remote_code=trust_remote_code)
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
    return place(model, device).eval(), tokenizer


def evaluate_sets(model, tokenizer, sets: dict[str, list[dict]], config: EvalConfig) -> dict[str, list[dict]]:
    """Per-example statistics of every set: the rows' text, the generation, and one number per metric.

    Two model passes serve every metric: one teacher-forced :func:`~hubunlearn.metrics.stats.token_stats` pass over
    every set's answers, paraphrased and perturbed answers together (an answer's statistics feed its probability,
    exact memorization, truth ratio, teacher-forced extraction strength and MIA scores alike), and one
    :func:`~hubunlearn.metrics.likelihood.greedy_answers` pass over every set's prompts (ROUGE); each sorts its
    examples by length into batches of ``config.batch_size`` and puts the results back in order. Only generative
    extraction strength makes calls of its own. Every number equals the one a batch of one gives, to float rounding.
    The passes run where the model is (each batch is moved to its first parameter's device; the results come back as
    Python numbers and strings): place it first (:func:`load_for_eval` does, by ``config.device``).
    """
    from .metrics.likelihood import greedy_answers
    from .metrics.stats import split, token_stats
    from .metrics.tofu import qa_examples, qa_row_statistics, rouge_l

    metrics = set(config.metrics)
    encoded = {name: qa_examples(tokenizer, rows, config.data_format) for name, rows in sets.items()}
    every_row = [row for name in sets for row in encoded[name]]
    pool = [e for row in every_row for e in row.examples or []]
    scored = token_stats(model, pool, tokenizer.pad_token_id, config.batch_size, "scoring answers" if config.progress else None, spread="mia" in metrics) if pool else []
    stats = dict(zip(sets, split(split(scored, [len(row.examples or []) for row in every_row]), [len(rows) for rows in sets.values()])))
    fitting = {name: [i for i, row in enumerate(encoded[name]) if row.examples is not None] for name in sets}  # the others keep None values
    examples = {name: [encoded[name][i].examples[0] for i in fitting[name]] for name in sets}  # each fitting row's answer
    if "rouge" in metrics or "model_utility" in metrics:
        answers = greedy_answers(model, tokenizer, [e for name in sets for e in examples[name]], config.max_new_tokens,
                                 config.batch_size, "generating answers" if config.progress else None)
        generations = dict(zip(sets, split(answers, [len(examples[name]) for name in sets])))
    per_example = {}
    for name, all_rows in sets.items():
        all_results = [{"question": r["question"], "answer": r["answer"], **qa_row_statistics(row, row_stats, tokenizer.eos_token_id)}
                       for r, row, row_stats in zip(all_rows, encoded[name], stats[name])]
        rows, results = [all_rows[i] for i in fitting[name]], [all_results[i] for i in fitting[name]]
        answer_stats_ = [stats[name][i][0] for i in fitting[name]]
        if "truth_ratio" in metrics and results and "truth_ratio" not in results[0]:
            logger.warning("the %s set has no paraphrased and perturbed answers: its truth ratio is skipped", name)
        if "rouge" in metrics or "model_utility" in metrics:
            for result, generation, rouge in zip(results, generations[name], rouge_l(generations[name], [r["answer"] for r in rows])):
                result.update(generation=generation, rouge_recall=rouge["recall"], rouge_f1=rouge["f1"])
        if "extraction_strength_tf" in metrics:
            from .metrics.extraction import answer_stats, teacher_forced_extraction_strength

            for result, example, s in zip(results, examples[name], answer_stats_):
                result["extraction_strength_tf"] = teacher_forced_extraction_strength(answer_stats(s, example, tokenizer.eos_token_id))
        if "extraction_strength" in metrics and name in EXTRACTION_SETS:
            from .metrics.extraction import extraction_strength

            for result, value in zip(results, extraction_strength(model, tokenizer, examples[name], config.batch_size, f"extraction ({name})")):
                result["extraction_strength"] = value
        if "mia" in metrics:
            from .metrics.mia import mia_scores

            for result, scores in zip(results, _rows_of(mia_scores(answer_stats_, [r["answer"] for r in rows]))):  # stats cover the answer
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
    return {"config": _config_dict(config), "sets": sets, "examples": {name: len(results) for name, results in per_example.items()},
            "aggregates": aggregates, "conventions": conventions()}


def _truth_ratios(results: list[dict]) -> list[float]:
    return [r["truth_ratio"] for r in results if r.get("truth_ratio") is not None]


def _mia_summary(per_example: dict, reference: dict | None) -> dict[str, Any]:
    from .metrics.mia import PRIVLEAK_CONVENTION, auc, privleak

    if "holdout" not in per_example:
        return {"value": None, "unavailable": "membership inference needs a holdout set of unseen rows: add --holdout SPEC"}

    def aucs(results):
        forget, holdout = results["forget"], results.get("holdout")
        if not holdout or "mia" not in forget[0]:
            return None
        return {attack: auc([r["mia"][attack] for r in forget], [r["mia"][attack] for r in holdout]) for attack in forget[0]["mia"]}

    own, ref = aucs(per_example), aucs(reference) if reference else None
    summary = {"auc": own}
    if ref:  # in percent; undefined (None) where the reference's AUC is 1
        summary["reference_auc"] = ref
        summary["privleak"] = {attack: privleak(own[attack], ref[attack]) if ref[attack] < 1 else None for attack in own}
        summary["privleak_convention"] = PRIVLEAK_CONVENTION
        undefined = [attack for attack in own if ref[attack] >= 1]
        if undefined:
            summary["privleak_unavailable"] = (f"the reference separates forget from holdout rows perfectly (AUC 1) with "
                                               f"{', '.join(undefined)}: privleak divides by 1 − that AUC, so it is undefined "
                                               "there; use a reference that never saw the forget set, or more holdout rows")
    else:
        summary["privleak_unavailable"] = "no reference: add --reference MODEL or --reference_stats per_example.json"
    return summary


def _config_dict(config: EvalConfig) -> dict[str, Any]:
    values = asdict(config)
    values.pop("data_format")
    return values


# ---- the reference workflow ------------------------------------------------------------------------------------

STATISTICS_FORMAT = 2  # bump when per-example statistics change meaning: cache entries of another format are never read
NOT_THE_MODEL = ("README.md", RECORD_NAME)  # a card and a record describe a model; editing them changes nothing it computes


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _file_hashes(paths: list[Path]) -> list[str]:
    """SHA-256 of each file's bytes, remembered in the cache by (path, inode, size, mtime, ctime): writing, copying
    or renaming a file sets its ctime, which no user can set back, so a remembered hash is always the content's.
    As git does with racily clean files, a file changed in the last 2 s is hashed but not remembered (timestamps
    are coarse). Hashing runs at about 1-2 GB/s: tens of seconds for a 7B model in float32."""
    from .quickstart import cache_root

    memo_path = cache_root() / "file-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo, hashes = memo if isinstance(memo, dict) else {}, []
    for path in paths:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
        hashes.append(memo.get(key) or _sha256(path))
        if time.time_ns() - stat.st_ctime_ns > 2_000_000_000:
            memo[key] = hashes[-1]
    _write_atomically(memo_path, memo)
    return hashes


def _linked_base(folder: Path) -> tuple[str, str | None] | None:
    """The base model (name or path, revision) that an ECO bundle or a PEFT adapter folder loads, if it is one."""
    from .eco.model import BUNDLE_NAME

    if (folder / BUNDLE_NAME).is_file():
        base = json.loads((folder / BUNDLE_NAME).read_text())["base_model"]
        return base["name_or_path"], base.get("revision")
    if (folder / "adapter_config.json").is_file():
        config = json.loads((folder / "adapter_config.json").read_text())
        return config["base_model_name_or_path"], config.get("revision")
    return None


def model_identity(name_or_path: str, revision: str | None = None) -> dict[str, str] | None:
    """What pins a model's weights. A local folder: ``{"fingerprint": sha256}`` over the relative name and SHA-256
    of every file in it (weights, config, tokenizer, an ECO bundle's classifier; hidden files, trainer checkpoints,
    the card and the record left out) and the identity of the base model an adapter or ECO bundle loads. A Hub id:
    ``{"repo": id, "commit": sha}`` that ``revision`` resolves to. None when a Hub id cannot be resolved (offline).
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        from huggingface_hub import HfApi

        try:
            return {"repo": name_or_path, "commit": HfApi().model_info(name_or_path, revision=revision).sha}
        except Exception as error:  # offline, unknown, gated: loading says which
            logger.warning("cannot resolve %s on the Hub (%s): its statistics are computed and not cached",
                           name_or_path, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return None
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in NOT_THE_MODEL
             and not any(part.startswith((".", *KEPT_ON_OVERWRITE)) for part in p.relative_to(folder).parts)]
    digest = hashlib.sha256()
    for path, file_hash in zip(files, _file_hashes(files)):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_hash}\n".encode())
    base = _linked_base(folder)
    if base is not None:
        base_identity = model_identity(*base)
        if base_identity is None:
            return None
        digest.update(json.dumps(base_identity, sort_keys=True).encode())
    return {"fingerprint": digest.hexdigest()}


def conventions() -> dict[str, str]:
    """How each metric is computed where the field's implementations differ (summary.json states it)."""
    from .metrics.mia import MIN_K, PRIVLEAK_CONVENTION
    from .metrics.tofu import TRUTH_RATIO_EPSILON

    return {
        "extraction_strength": "eos left out of the answer (OpenUnlearning), generated and teacher-forced alike; 0 when only "
                               "the last answer token is wrong (deliberate: OpenUnlearning reports 1/n there)",
        "exact_memorization": "eos left out of the answer (OpenUnlearning)",
        "truth_ratio": f"R = P(perturbed) / (P(paraphrased) + {TRUTH_RATIO_EPSILON:g}); forget set mean(min(R, 1/(R + "
                       f"{TRUTH_RATIO_EPSILON:g}))) (OpenUnlearning)",
        "min_k": f"k = {MIN_K} for Min-k% and Min-k%++ (MUSE, OpenUnlearning)",
        "mia_auc": "forget rows as members: 1 when they look far likelier than the holdout rows (OpenUnlearning)",
        "privleak": PRIVLEAK_CONVENTION,
    }


def reference_cache_key(identity: dict[str, str], config: EvalConfig, sets: dict[str, list[dict]]) -> dict[str, Any]:
    """Everything the reference's per-example statistics depend on: the weights, the rows of every set (as
    evaluated, after ``--max_examples``), the metrics, generation and tokenisation settings, and the conventions."""
    return {"format": STATISTICS_FORMAT, "model": identity, "rows": _json_sha256(sets), "metrics": sorted(config.metrics),
            "max_new_tokens": config.max_new_tokens, "data_format": asdict(config.data_format), "conventions": conventions()}


def reference_cache_path(key: dict[str, Any]) -> Path:
    from .quickstart import cache_root

    return cache_root() / "reference-stats" / f"{_json_sha256(key)[:32]}.json"


def _json_sha256(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys): the cache's rows hash, entry name and entry checksum."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def covers_sets(reference: Any, sets: dict[str, list[dict]]) -> bool:
    """Whether ``reference`` holds per-example statistics of exactly these sets: the same questions, in order."""
    return isinstance(reference, dict) and all(
        isinstance(reference.get(name), list) and len(reference[name]) == len(rows)
        and all(isinstance(r, dict) and _row_key(r) == _row_key(row) for r, row in zip(reference[name], rows))
        for name, rows in sets.items())


def _row_key(row: dict) -> Any:
    """What identifies a row across evals: its question (QA rows) or its text (raw-text rows, MUSE's privleak)."""
    return row.get("question", row.get("text"))


def _read_cache(path: Path, key: dict[str, Any], sets: dict[str, list[dict]]) -> dict[str, list[dict]] | None:
    """The cached statistics when ``path`` holds a whole, unaltered entry made for exactly ``key`` and ``sets``,
    else None (and a warning saying why)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key:
            logger.warning("the cache entry %s was made for other settings: recomputing the reference statistics", path)
        elif entry.get("checksum") != _json_sha256(entry["per_example"]) or not covers_sets(entry["per_example"], sets):
            logger.warning("the cache entry %s is damaged: recomputing the reference statistics", path)
        else:
            return entry["per_example"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("the cache entry %s is unreadable (%s): recomputing the reference statistics", path, error)
    return None


def _write_atomically(path: Path, value: Any) -> None:
    """Write JSON to a temporary sibling and rename it into place: readers see the old entry or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".partial", delete=False) as file:
        try:
            json.dump(value, file)
        except BaseException:
            Path(file.name).unlink(missing_ok=True)
            raise
    os.replace(file.name, path)


def describe_reference(source: dict[str, Any]) -> str:
    """One line naming where reference statistics came from: path or id, and fingerprint, commit or file hash."""
    if "reference_stats" in source:
        return f"{source['reference_stats']} (sha256 {source['sha256'][:16]}…)"
    if "published" in source:  # MUSE's published reference AUC
        return source["published"]
    pin = (f"weights sha256 {source['fingerprint'][:16]}…" if "fingerprint" in source else
           f"commit {source['commit'][:12]}" if "commit" in source else "unpinned")
    return f"{source['reference']} ({pin}, {'cached statistics' if source['cached'] else 'statistics computed now'})"


def reference_statistics(config: EvalConfig, sets: dict[str, list[dict]],
                         compute: Callable[[Any, Any], dict[str, list[dict]]] | None = None,
                         covers: Callable[[dict], bool] | None = None,
                         covered: str = "statistics of these forget questions",
                         same: str = "the same benchmark, split and --max_examples",
                         ) -> tuple[dict[str, list[dict]] | None, dict[str, Any] | None]:
    """The reference model's per-example statistics and where they came from: ``--reference_stats`` (the file and
    its SHA-256), or the cache entry for exactly these weights, rows and settings, or computed and cached.

    ``compute(model, tokenizer)`` evaluates the reference (default: :func:`evaluate_sets` on ``sets``); ``covers``
    tells whether a ``--reference_stats`` file holds what is needed (default: the forget set's rows), ``covered``
    and ``same`` say what, in the error when it does not. ``(None, None)`` without a reference."""
    if config.reference_stats:
        path = Path(config.reference_stats)
        if not path.is_file():
            raise UsageError(f"--reference_stats {path} does not exist: give a per_example.json from an earlier eval")
        try:
            reference = json.loads(path.read_text())
        except ValueError as error:
            raise UsageError(f"--reference_stats {path} is not JSON ({error}): give a per_example.json from an earlier eval") from error
        if not (covers(reference) if covers else covers_sets(reference, {"forget": sets["forget"]})):
            raise UsageError(f"--reference_stats {path} holds no {covered}: pass the per_example.json "
                             f"of an eval with {same}, or use --reference MODEL")
        source = {"reference_stats": str(path), "sha256": _sha256(path)}
    elif config.reference:
        identity = model_identity(config.reference)
        key = reference_cache_key(identity, config, sets) if identity else None
        path = reference_cache_path(key) if key else None
        reference = _read_cache(path, key, sets) if path else None
        source = {"reference": config.reference, **{k: v for k, v in (identity or {}).items() if k != "repo"},
                  "cached": reference is not None, "cache_file": str(path) if path else None}
        if reference is not None:
            logger.info("reusing the reference statistics of %s cached in %s", describe_reference(source), path)
        else:
            model, tokenizer = load_for_eval(config.reference, trust_remote_code=config.trust_remote_code, revision=source.get("commit"),
                                             device=config.device)
            reference = compute(model, tokenizer) if compute else evaluate_sets(model, tokenizer, sets, config)
            del model
            if path:
                _write_atomically(path, {"key": key, "reference_source": source, "per_example": reference,
                                         "checksum": _json_sha256(reference)})
                logger.info("computed the reference statistics of %s and cached them in %s (reuse them with --reference_stats)",
                            describe_reference(source), path)
    else:
        return None, None
    return reference, source


# ---- running and recording ---------------------------------------------------------------------------------------

def check_eval_output(output_dir: Path) -> None:
    """An eval folder may be reused; anything else that is not empty is refused (never overwrite an artifact)."""
    if output_dir.is_dir() and any(p.name not in OUTPUT_FILES for p in output_dir.iterdir()):
        raise UsageError(f"output folder {output_dir} holds other files: choose an empty or earlier eval --output_dir")


def run_eval(config: EvalConfig, output_dir: str | Path) -> dict[str, Any]:
    """Evaluate, write ``summary.json`` and ``per_example.json`` atomically, and return the summary."""
    from .attacks import run_attacks
    from .modeling import model_device

    if config.benchmark == "muse":
        from .muse import run_muse_eval

        return run_muse_eval(config, output_dir)
    output_dir = Path(output_dir)
    check_eval_output(output_dir)
    manager = None
    if config.harness_tasks():  # every harness task and its data checked before any model loads
        from .harness import check_tasks

        manager = check_tasks(config.harness_tasks(), config.lm_eval_include)
    sets = load_sets(config)
    reference, source = reference_statistics(config, sets)
    model, tokenizer = load_for_eval(config.model, config.adapter, config.trust_remote_code, config.revision, config.device)
    per_example = evaluate_sets(model, tokenizer, sets, config) if sets else {}
    summary = summarize(per_example, config, reference)
    if manager is not None:
        from .harness import run_tasks

        summary["lm_eval"] = run_tasks(model, tokenizer, config.harness_tasks(), config.lm_eval_include, config.max_examples,
                                       config.batch_size, manager)
        per_example.update(summary["lm_eval"].pop("per_example"))  # each harness task's questions, under the task's name
    summary["device"] = str(model_device(model))  # where the model computed (config.device says what was asked)
    if reference is not None:
        summary["reference"] = {name: summarize_set(name, results) for name, results in reference.items()}
        summary["reference_source"] = source
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
    muse = summary["config"]["benchmark"] == "muse"  # MUSE records its four named numbers (under "muse"), not set means
    for name, values in ({} if muse else summary["sets"]).items():
        metrics.setdefault(name, {})[stage] = values
    for name, values in summary.get("reference", {}).items():
        metrics.setdefault(name, {})["reference"] = values
    aggregates = {k: v["value"] for k, v in summary["aggregates"].items() if isinstance(v, dict) and isinstance(v.get("value"), float)}
    if aggregates:
        metrics.setdefault("muse" if muse else "tofu", {})[stage] = aggregates
    if muse and "privleak" in summary["aggregates"]:
        metrics["muse"][stage]["privleak_auc"] = summary["aggregates"]["privleak"]["auc"]
        metrics["muse"]["reference"] = {"privleak_auc": summary["aggregates"]["privleak"]["reference_auc"]}
    for name, values in (summary.get("lm_eval") or {}).get("tasks", {}).items():  # the harness's own names
        from .harness import headline

        metrics.setdefault(name, {})[stage] = headline(values)
    privleak = {f"privleak_{attack}": v for attack, v in (summary["aggregates"].get("mia") or {}).get("privleak", {}).items() if v is not None}
    if privleak:
        metrics.setdefault("mia", {})[stage] = privleak
    previous = record.get("evaluation") or {}
    record["evaluation"] = {"benchmark": summary["config"]["benchmark"],
                            **({"corpus": summary["config"]["corpus"], "datasets": {"muse": {"id": None if summary["data"]["revision"] is None
                                else summary["data"]["source"]}}} if muse else
                               {"forget_split": summary["config"]["forget_split"]} if summary["config"]["benchmark"] == "tofu" else {}),
                            **({"revision": summary["config"]["revision"]} if summary["config"].get("revision") else {}),
                            "reference_source": summary.get("reference_source"), "conventions": summary["conventions"]}
    mia = summary["aggregates"].get("mia") or {}
    recorded = {"examples": summary.get("examples"), "mia": {k: mia[k] for k in ("auc", "privleak") if mia.get(k)},
                "attacks": summary.get("attacks"),
                "lm_eval": {k: v for k, v in (summary.get("lm_eval") or {}).items() if k != "subtasks"}}
    for key, value in recorded.items():  # per stage (for the card), keeping the other stages' earlier records
        stages = {s: v for s, v in (previous.get(key) or {}).items() if s != stage}
        if value:
            stages[stage] = value
        if key == "mia" and mia.get("reference_auc"):
            stages["reference"] = {"auc": mia["reference_auc"]}
        if stages:
            record["evaluation"][key] = stages
    card = artifact / "README.md"
    temporary = artifact / f".{RECORD_NAME}.partial"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.replace(artifact / RECORD_NAME)
    if not card.exists() or is_untouched(card.read_text()):
        card.write_text(card_text(record, folder=artifact))
    return artifact / RECORD_NAME


def _named_numbers(values: dict[str, float | None], digits: int) -> str:
    """``"loss 0.912, zlib 0.887"``: each number rounded; a missing one shown as "n/a"."""
    return ", ".join(f"{name} {'n/a' if value is None else f'{value:.{digits}f}'}" for name, value in values.items())


def _mia_lines(mia: dict[str, Any]) -> list[str]:
    """The membership-inference block as table rows: AUCs per attack, the reference's, privleak in percent."""
    if mia.get("value", 0) is None:
        return [f"{'mia':<24}unavailable: {mia['unavailable']}"]
    lines = [f"{'mia auc':<24}{_named_numbers(mia['auc'], 3)}"] if mia.get("auc") else []
    if mia.get("reference_auc"):
        lines.append(f"{'mia auc (reference)':<24}{_named_numbers(mia['reference_auc'], 3)}")
    if mia.get("privleak"):
        lines.append(f"{'privleak (%)':<24}{_named_numbers(mia['privleak'], 1)}")
    if mia.get("privleak_unavailable"):
        lines.append(f"{'privleak':<24}{'partly ' if mia.get('privleak') else ''}unavailable: {mia['privleak_unavailable']}")
    return lines


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table: one row per metric, one column per set (4 decimals; "-" where a set has no such
    number); then the aggregates, the membership-inference block (AUCs 3 decimals, privleak in percent, 1
    decimal), the reference's source and the attacks. MUSE's summary has its own table
    (:func:`~hubunlearn.muse.format_muse_summary`)."""
    if summary["config"]["benchmark"] == "muse":
        from .muse import format_muse_summary

        return format_muse_summary(summary)
    sets = summary["sets"]
    keys = [k for k in ("probability", "truth_ratio", "rouge_recall", "rouge_f1", "exact_memorization",
                        "extraction_strength", "extraction_strength_tf") if any(k in v for v in sets.values())]
    lines = [f"{'metric':<24}" + "".join(f"{name:>14}" for name in sets)] if sets else []
    for key in keys:
        lines.append(f"{key:<24}" + "".join(f"{sets[name][key]:>14.4f}" if sets[name].get(key) is not None else f"{'-':>14}"
                                            for name in sets))
    for name, value in summary["aggregates"].items():
        if name == "mia":
            lines += _mia_lines(value)
        else:
            shown = f"{value['value']:.4g}" if value["value"] is not None else f"unavailable: {value['unavailable']}"
            lines.append(f"{name:<24}{shown}")
    if summary.get("lm_eval"):
        from .harness import format_lines

        lines += format_lines(summary["lm_eval"])
    if summary.get("reference_source"):
        lines.append(f"{'reference':<24}{describe_reference(summary['reference_source'])}")
    for name, result in summary.get("attacks", {}).items():
        if "unavailable" in result:
            lines.append(f"{'attack ' + name:<24}unavailable: {result['unavailable']}")
            continue
        change = ", ".join(f"{k} {result['clean'][k]:.3f} -> {result['attacked'][k]:.3f}" for k in result["clean"])
        lines.append(f"{'attack ' + name:<24}{change} (clean -> attacked)")
    return "\n".join(lines)
