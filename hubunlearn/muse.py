"""``hubunlearn eval --benchmark muse``: MUSE's sets (Hub or a local folder in its layout), run on a model.

MUSE (Shi et al., arXiv 2407.06460) measures unlearning of copyrighted text on ``muse-bench/MUSE-News`` and
``muse-bench/MUSE-Books``: verbatim memorisation (``verbmem_f``), knowledge memorisation of the forget and the retain
QA (``knowmem_f``; ``knowmem_r`` is the utility) and privacy leakage (``privleak``, against a retrained reference).
The metric definitions are pure functions in :mod:`hubunlearn.metrics.muse`; this module loads the data, runs the
model (batched greedy generation, batched teacher-forced token log-probs) and writes the eval's output like TOFU's.

Dataset revision: the split names changed between revisions of the Hub datasets (older: ``retain2_qa``,
``retain2_qa_icl`` and a privleak ``retain2``; newer: ``retain_qa``, ``retain_qa_icl``, ``retain``). The loader
targets the newer layout and accepts the older names, and ``summary.json`` records which splits it read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from .errors import UsageError

logger = logging.getLogger(__name__)

CORPORA = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
# The Hub datasets' pinned commits, each corpus its own. Taken from a public OpenUnlearning reproduction's provenance
# record (2026), not looked up on the Hub from here (no network); the loader also accepts the older split names
# (SET_SPLITS), so a revision of either layout reads the same sets.
MUSE_REVISIONS = {"muse-bench/MUSE-News": "506bd5b150b92814d45e4404a82f120ab2d748bf",
                  "muse-bench/MUSE-Books": "051ba90319e920d410d87cfdbd61f25843c1b892"}
METRICS = ("verbmem_f", "knowmem_f", "knowmem_r", "privleak")
SET_SPLITS = {  # evaluated set -> (config, the split names it may have, newest layout first)
    "verbmem_forget": ("verbmem", ("forget",)),
    "knowmem_forget": ("knowmem", ("forget_qa",)),
    "knowmem_forget_icl": ("knowmem", ("forget_qa_icl",)),
    "knowmem_retain": ("knowmem", ("retain_qa", "retain2_qa")),
    "knowmem_retain_icl": ("knowmem", ("retain_qa_icl", "retain2_qa_icl")),
    "privleak_forget": ("privleak", ("forget",)),
    "privleak_holdout": ("privleak", ("holdout",)),
}
METRIC_SETS = {"verbmem_f": ("verbmem_forget",), "knowmem_f": ("knowmem_forget", "knowmem_forget_icl"),
               "knowmem_r": ("knowmem_retain", "knowmem_retain_icl"), "privleak": ("privleak_forget", "privleak_holdout")}
COLUMNS = {"verbmem": ("prompt", "gt"), "knowmem": ("question", "answer"), "privleak": ("text",)}
PRIVLEAK_SETS = METRIC_SETS["privleak"]


def check_config(config) -> None:
    """Validate the MUSE parts of an :class:`~hubunlearn.evaluate.EvalConfig` (called by its ``__post_init__``):
    ``--corpus`` only with ``--benchmark muse``, which needs one; MUSE's metrics (the TOFU default becomes all four);
    TOFU-only options refused. Raises :class:`UsageError`."""
    from .evaluate import DEFAULT_METRICS, METRICS as TOFU_METRICS

    if config.benchmark != "muse":
        if config.corpus is not None:
            raise UsageError(f"--corpus applies to --benchmark muse only (this is --benchmark {config.benchmark})")
        return
    if config.corpus is None:
        raise UsageError(f"--benchmark muse needs --corpus: choose one of {', '.join(CORPORA)}")
    if config.corpus not in CORPORA:
        raise UsageError(f"unknown corpus '{config.corpus}': choose one of {', '.join(CORPORA)}")
    if tuple(config.metrics) == DEFAULT_METRICS:
        config.metrics = METRICS
    tofu_only = [m for m in config.metrics if m in TOFU_METRICS]
    if tofu_only:
        raise UsageError(f"{', '.join(tofu_only)} {'is a TOFU metric' if len(tofu_only) == 1 else 'are TOFU metrics'}: "
                         f"--benchmark muse measures {', '.join(METRICS)}")
    unknown = [m for m in config.metrics if m not in METRICS]
    if unknown or not config.metrics:
        raise UsageError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}: --benchmark muse measures {', '.join(METRICS)}")
    refused = {"--holdout": config.holdout and "MUSE's privleak config has its own holdout texts",
               "--attack": config.attacks and "the attacks probe TOFU-style question sets",
               "--forget_split": config.forget_split != "forget10" and "MUSE's sets are chosen by --corpus",
               "--max_new_tokens": config.max_new_tokens != 64 and "MUSE fixes 128 new tokens for VerbMem and 32 for KnowMem"}
    for flag, why in refused.items():
        if why:
            raise UsageError(f"{flag} does not apply to --benchmark muse: {why}")


# ---- data --------------------------------------------------------------------------------------------------------

def _hub_rows(source: str, config_name: str, split: str) -> list[dict]:
    import datasets

    try:
        rows = datasets.load_dataset(source, config_name, split=split, revision=MUSE_REVISIONS.get(source))
    except Exception as error:  # an unknown split (the caller tries the older name); offline, unknown repo or config, gated
        if isinstance(error, ValueError) and str(error).startswith("Unknown split"):
            raise KeyError(split) from error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"cannot load {source}:{config_name}@{split} from the Hub ({first_line}): check the network, "
                         "or pass --data FOLDER holding a copy in the MUSE layout") from error
    return [dict(r) for r in rows]


def _local_rows(folder: Path, config_name: str, split: str) -> list[dict]:
    from .data import load_rows

    if not (folder / config_name).is_dir():
        raise UsageError(f"the MUSE folder {folder} has no '{config_name}' config: expected a folder {folder / config_name} "
                         f"(MUSE's layout: verbmem/, knowmem/, privleak/, raw/)")
    try:
        return [dict(r) for r in load_rows(f"{folder}:{config_name}@{split}")]
    except UsageError as error:
        if str(error).startswith("no split "):
            raise KeyError(split) from error
        raise


def load_muse_sets(config) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The sets ``config.metrics`` need, as rows, and where they came from (``{"source", "revision", "splits":
    {set: "config@split"}}``). ``--data`` is a folder in MUSE's layout (``verbmem/forget.json``,
    ``knowmem/forget_qa.json``, ...) or a Hub id; by default the Hub dataset of ``--corpus`` at its commit in :data:`MUSE_REVISIONS`.
    ``--max_examples`` cuts every evaluated set, never the in-context examples. One-line errors name a missing
    config and its folder, a missing split (both names of a renamed one) and missing columns."""
    source = config.data or CORPORA[config.corpus]
    local = Path(source).is_dir()
    if not local and (Path(source).exists() or source.count("/") != 1):
        raise UsageError(f"--data {source} is neither a folder in the MUSE layout nor a Hub dataset id (ORG/NAME)")
    names = [name for metric in config.metrics for name in METRIC_SETS[metric]]
    sets, splits = {}, {}
    for name in names:
        config_name, candidates = SET_SPLITS[name]
        for split in candidates:
            try:
                rows = _local_rows(Path(source), config_name, split) if local else _hub_rows(source, config_name, split)
                break
            except KeyError:
                continue
        else:
            raise UsageError(f"{source} has no split {' or '.join(repr(s) for s in candidates)} in its '{config_name}' config")
        missing = [c for c in COLUMNS[config_name] if not rows or c not in rows[0]]
        if missing:
            raise UsageError(f"{source}:{config_name}@{split} has {'no rows' if not rows else 'no ' + ', '.join(missing) + ' column'}: "
                             f"MUSE's {config_name} rows hold {', '.join(COLUMNS[config_name])}")
        cut = config.max_examples and not name.endswith("_icl")
        sets[name], splits[name] = (rows[: config.max_examples] if cut else rows), f"{config_name}@{split}"
    return sets, {"source": source, "revision": None if local else MUSE_REVISIONS.get(source), "splits": splits}


# ---- running the model -------------------------------------------------------------------------------------------

def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, description: str) -> list[str]:
    """Greedy continuations of raw-text prompts (special tokens added, as MUSE tokenises them; no chat template)."""
    from .metrics.likelihood import greedy_answers

    examples = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        examples.append({"input_ids": ids, "prompt_length": len(ids)})
    return greedy_answers(model, tokenizer, examples, max_new_tokens, batch_size, description, strip=False)


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def min_k_of_texts(model, tokenizer, texts: list[str], batch_size: int, description: str | None = None) -> list[dict]:
    """``{"text", "tokens", "min_k"}`` of each text: Min-K% (k = 0.4) of its whole token sequence (special tokens
    added; every token after the first scored), in one batched teacher-forced pass. A text longer than the model's
    positions is cut to them (with a warning); one of fewer than two tokens gets ``min_k`` None."""
    from .metrics.muse import min_k_scores
    from .metrics.stats import token_stats

    limit, cut = _max_positions(model), 0
    examples, kept = [], []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if limit and len(ids) > limit:
            ids, cut = ids[:limit], cut + 1
        if len(ids) >= 2:
            examples.append({"input_ids": ids, "labels": ids, "prompt_length": 0})
            kept.append(i)
    if cut:
        logger.warning("%d privleak texts are longer than the model's %d positions: each is scored on its first %d tokens", cut, limit, limit)
    scores = dict(zip(kept, min_k_scores(token_stats(model, examples, tokenizer.pad_token_id, batch_size, description, spread=False))))
    return [{"text": text, "tokens": len(examples[kept.index(i)]["input_ids"]) if i in scores else 0, "min_k": scores.get(i)}
            for i, text in enumerate(texts)]


def evaluate_muse(model, tokenizer, sets: dict[str, list[dict]], batch_size: int = 32) -> dict[str, list[dict]]:
    """Per-example results of every evaluated set in ``sets``: VerbMem (``prompt``, ``gt``, ``reference``: gt cut to
    128 tokens, ``generation``, ``rouge_l_f1``), KnowMem (``question``, ``answer``, ``generation`` cut at the first
    stop string, ``rouge_l_f1``) and the privleak texts (:func:`min_k_of_texts`). The model should be placed and in
    eval mode (:func:`~hubunlearn.evaluate.load_for_eval`)."""
    from .metrics.muse import (KNOWMEM_NEW_TOKENS, VERBMEM_NEW_TOKENS, cut_at_stop, knowmem_prompt, rouge_l_f1,
                               truncate_to_tokens)

    per_example = {}
    if "verbmem_forget" in sets:
        rows = sets["verbmem_forget"]
        generations = _generate(model, tokenizer, [r["prompt"] for r in rows], VERBMEM_NEW_TOKENS, batch_size, "VerbMem")
        references = [truncate_to_tokens(tokenizer, r["gt"], VERBMEM_NEW_TOKENS) for r in rows]
        per_example["verbmem_forget"] = [{"prompt": r["prompt"], "gt": r["gt"], "reference": ref, "generation": g, "rouge_l_f1": f1}
                                         for r, ref, g, f1 in zip(rows, references, generations, rouge_l_f1(generations, references))]
    for name in ("knowmem_forget", "knowmem_retain"):
        if name in sets:
            rows, icl = sets[name], [(r["question"], r["answer"]) for r in sets[f"{name}_icl"]]
            prompts = [knowmem_prompt(icl, r["question"]) for r in rows]
            answers = [cut_at_stop(g) for g in _generate(model, tokenizer, prompts, KNOWMEM_NEW_TOKENS, batch_size, f"KnowMem ({name[8:]})")]
            per_example[name] = [{"question": r["question"], "answer": r["answer"], "generation": a, "rouge_l_f1": f1}
                                 for r, a, f1 in zip(rows, answers, rouge_l_f1(answers, [r["answer"] for r in rows]))]
    for name in PRIVLEAK_SETS:
        if name in sets:
            per_example[name] = min_k_of_texts(model, tokenizer, [r["text"] for r in sets[name]], batch_size, f"Min-K% ({name[9:]})")
    return per_example


def auc_of(per_example: dict[str, list[dict]]) -> float:
    """MUSE's privleak AUC (:func:`~hubunlearn.metrics.muse.muse_auc`) from per-example Min-K% of both privleak sets."""
    from .metrics.muse import muse_auc

    forget, holdout = ([r["min_k"] for r in per_example[name] if r.get("min_k") is not None] for name in PRIVLEAK_SETS)
    return muse_auc(forget, holdout)


# ---- the reference -----------------------------------------------------------------------------------------------

def reference_auc(config, sets: dict[str, list[dict]]) -> tuple[float, dict[str, Any]]:
    """The retrained reference's privleak AUC (MUSE's orientation) and where it came from: ``--reference_stats``
    (a ``per_example.json`` of an earlier MUSE eval, and its SHA-256), ``--reference`` (its Min-K% statistics cached
    by weights, rows and settings, as TOFU's reference statistics are), or MUSE's published constant for
    ``--corpus``. Raises :class:`UsageError` when the AUC is 0 or 1 (PrivLeak undefined)."""
    from . import evaluate as ev
    from .metrics.muse import PUBLISHED_REFERENCE_AUC

    privleak_sets = {name: sets[name] for name in PRIVLEAK_SETS}
    reference, source = ev.reference_statistics(
        replace(config, metrics=("privleak",)), privleak_sets,
        compute=lambda model, tokenizer: evaluate_muse(model, tokenizer, privleak_sets, config.batch_size),
        covers=lambda stats: ev.covers_sets(stats, privleak_sets) and all("min_k" in r for name in PRIVLEAK_SETS for r in stats[name]),
        covered="Min-K% statistics of these privleak texts", same="the same --corpus, --data and --max_examples (a muse eval)")
    if reference is None:
        value = PUBLISHED_REFERENCE_AUC[config.corpus]
        source = {"published": f"MUSE's published AUC of the model retrained without the {config.corpus} forget set ({value})"}
        if config.data:
            logger.warning("--data %s with no --reference: PrivLeak is taken against MUSE's published %s reference AUC, which "
                           "holds for MUSE's own privleak texts only", config.data, config.corpus)
    value = auc_of(reference) if reference is not None else value
    if not 0 < value < 1:
        raise UsageError(f"the reference's privleak AUC is {value:g} ({ev.describe_reference(source)}): it tells forget from holdout "
                         "texts perfectly, so PrivLeak (relative to that AUC) is undefined; use a model retrained without the "
                         "forget texts, more privleak texts, or leave privleak out of --metrics")
    return value, source


# ---- summary and output ------------------------------------------------------------------------------------------

def conventions() -> dict[str, str]:
    """How each MUSE number is computed (summary.json and the card state it)."""
    from .metrics.muse import PRIVLEAK_CONVENTION

    return {"verbmem_f": "ROUGE-L F1 (no stemming), 0-1, of the greedy 128-token continuation against the ground truth cut to its "
                         "first 128 tokens (special tokens counted, as MUSE does)",
            "knowmem": "ROUGE-L F1 (no stemming), 0-1, of the greedy 32-token answer after the in-context examples, cut at the "
                       "first '\\n\\n', '\\nQuestion' or 'Question:'",
            "min_k": "k = 0.4 over each whole text (at least one token)", "privleak": PRIVLEAK_CONVENTION}


def summarize_muse(per_example: dict[str, list[dict]], config, reference: tuple[float, dict] | None,
                   data: dict[str, Any]) -> dict[str, Any]:
    """Set means, MUSE's four numbers (``aggregates``, each ``{"value": ...}``; privleak with its AUC, the
    reference AUC and which reference), the data source and the conventions."""
    from .evaluate import _config_dict, _mean, describe_reference
    from .metrics.muse import privleak

    sets = {name: {key: _mean([r[key] for r in results]) for key in ("rouge_l_f1", "min_k") if results and key in results[0]}
            for name, results in per_example.items()}
    aggregates: dict[str, Any] = {}
    for metric, name in (("verbmem_f", "verbmem_forget"), ("knowmem_f", "knowmem_forget"), ("knowmem_r", "knowmem_retain")):
        if metric in config.metrics:
            aggregates[metric] = {"value": sets[name]["rouge_l_f1"]}
    if "privleak" in config.metrics:
        auc = auc_of(per_example)
        reference_value, source = reference
        aggregates["privleak"] = {"value": privleak(auc, reference_value), "auc": auc, "reference_auc": reference_value,
                                  "reference": describe_reference(source)}
    summary = {"config": _config_dict(config), "data": data, "sets": sets, "examples": {n: len(r) for n, r in per_example.items()},
               "aggregates": aggregates, "conventions": conventions()}
    if reference is not None:
        summary["reference_source"] = reference[1]
    return summary


def run_muse_eval(config, output_dir: str | Path) -> dict[str, Any]:
    """Evaluate ``config.model`` on MUSE; write ``summary.json`` and ``per_example.json`` atomically; return the summary."""
    from .artifacts import staging_dir
    from .evaluate import check_eval_output, load_for_eval
    from .modeling import model_device

    output_dir = Path(output_dir)
    check_eval_output(output_dir)
    sets, data = load_muse_sets(config)
    reference = reference_auc(config, sets) if "privleak" in config.metrics else None
    model, tokenizer = load_for_eval(config.model, config.adapter, config.trust_remote_code, config.revision, config.device)
    per_example = evaluate_muse(model, tokenizer, sets, config.batch_size)
    summary = summarize_muse(per_example, config, reference, data)
    summary["device"] = str(model_device(model))
    with staging_dir(output_dir) as staging:
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (staging / "per_example.json").write_text(json.dumps(per_example, indent=1) + "\n")
    return summary


def format_muse_summary(summary: dict[str, Any]) -> str:
    """MUSE's numbers as a table: each metric, its value (ROUGE 4 decimals, PrivLeak in percent with 1), and what it
    is; then the data source and the reference."""
    what = {"verbmem_f": "VerbMem on forget: ROUGE-L F1 of 128-token continuations (lower = forgot more)",
            "knowmem_f": "KnowMem on forget QA: ROUGE-L F1 (lower = forgot more)",
            "knowmem_r": "KnowMem on retain QA: ROUGE-L F1 (utility; higher = kept more)"}
    lines = [f"{'metric':<16}{'value':>10}  meaning"]
    for name, value in summary["aggregates"].items():
        if name == "privleak":
            lines.append(f"{'privleak (%)':<16}{value['value']:>10.1f}  Min-40% AUC {value['auc']:.4f} against the reference's "
                         f"{value['reference_auc']:.4f} (0 ideal, -100 memorised; MUSE's sign convention)")
        else:
            lines.append(f"{name:<16}{value['value']:>10.4f}  {what[name]}")
    data = summary["data"]
    lines.append(f"{'data':<16}{data['source']}" + (f" (revision {data['revision']})" if data.get("revision") else "")
                 + ": " + ", ".join(f"{name} = {split}" for name, split in data["splits"].items()))
    if "privleak" in summary["aggregates"]:
        lines.append(f"{'reference':<16}{summary['aggregates']['privleak']['reference']}")
    return "\n".join(lines)
