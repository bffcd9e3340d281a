"""lm-evaluation-harness tasks on the model as hubunlearn serves it: WMDP, MMLU, or any harness task as a utility.

WMDP (Li et al., "The WMDP Benchmark", arXiv 2403.03218) is scored the way everyone reports it: by
lm-evaluation-harness (EleutherAI, the optional extra ``pip install 'hubunlearn[lm-eval]'``), tasks ``wmdp_bio``,
``wmdp_cyber``, ``wmdp_chem`` (zero-shot four-choice questions, each letter scored by log-likelihood, metric
``acc``; chance is 0.25) with ``mmlu`` accuracy as the utility. The harness's ``HFLM`` wraps the model
:func:`~hubunlearn.evaluate.load_for_eval` loaded, so a full checkpoint, a base model with its LoRA adapter and an
ECO bundle are scored exactly as they are served (:class:`ServedLM`). Every number in the output is the harness's
own, under the harness's names (task, then metric as ``acc`` or ``metric,filter``).

lm_eval is imported only here and only when a harness task is asked for.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import UsageError

logger = logging.getLogger(__name__)

EXTRA = "pip install 'hubunlearn[lm-eval]'"
WMDP_TASKS = ("wmdp_bio", "wmdp_cyber", "wmdp_chem", "mmlu")  # the benchmark's knowledge tasks, then its utility
LOCAL_DATA_HINT = ("write a task YAML with `dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}` under "
                   "the same task name and pass its folder with --lm_eval_include")


def require_lm_eval():
    """The ``lm_eval`` module; :class:`UsageError` (one line, which extra to install) when it is not installed."""
    try:
        import lm_eval
    except ImportError as error:
        raise UsageError(f"lm-evaluation-harness is not installed (needed for --benchmark wmdp and --lm_eval_tasks): "
                         f"{EXTRA}") from error
    return lm_eval


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


@functools.lru_cache(maxsize=16)
def _as_folder(path: Path) -> str:
    """An include path as the harness indexes it: a folder as is; a single task YAML (which the harness's
    ``TaskManager`` does not index on its own) linked into a folder of its own, removed when the process ends."""
    if not path.is_file():
        return str(path)
    folder = Path(tempfile.mkdtemp(prefix="hubunlearn-lm-eval-task-"))
    atexit.register(shutil.rmtree, folder, True)
    (folder / path.name).symlink_to(path)
    return str(folder)


def task_manager(names: tuple[str, ...], include: tuple[str, ...] = ()):
    """A harness ``TaskManager`` that knows every task in ``names``: the tasks of the ``include`` folders or YAML
    files alone when they define them all (indexing the harness's own ~15,000 task files takes seconds), else
    those and the harness's own, the included ones taking precedence. Raises :class:`UsageError` naming an unknown
    task and its closest matches, or a missing include path."""
    require_lm_eval()
    include = tuple(_as_folder(Path(p).resolve()) for p in include)
    if include:
        local = _task_manager(include, False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = _task_manager(include, True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "list them with `lm_eval ls tasks`"
        raise UsageError(f"unknown lm-eval task '{unknown[0]}': {hint} (a task of your own: pass its YAML's folder with --lm_eval_include)")
    return manager


def load_error(name: str, dataset: str | None, error: BaseException) -> UsageError:
    """One line for a harness task whose data cannot be loaded: gated (how to get access), unreachable (offline: how
    to give it local data), or the error's first line."""
    from .gated import gated_message, hub_unreachable

    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    where = f"its data set {dataset}" if dataset else "its data"
    gated = gated_message(dataset, error) if dataset else None
    if gated:
        return UsageError(f"lm-eval task '{name}': {gated}")
    if hub_unreachable(error):
        return UsageError(f"lm-eval task '{name}' needs {where} from the Hub, which cannot be reached here (offline: "
                          f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network): run once online to cache it, or {LOCAL_DATA_HINT}")
    return UsageError(f"cannot load lm-eval task '{name}' ({where}): {first}")


def check_tasks(names: tuple[str, ...], include: tuple[str, ...] = ()):
    """Load every task once (its data set included), so that a task that cannot run is refused in one line before
    any model loads; returns the ``TaskManager``."""
    manager = task_manager(names, include)
    for name in names:
        entry = manager.task_index.get(name)
        dataset = (entry.cfg or {}).get("dataset_path") if entry is not None else None
        try:
            manager.load([name])
        except UsageError:
            raise
        except Exception as error:  # datasets and the harness raise many kinds: name the task and what to do
            raise load_error(name, dataset, error) from error
    return manager


def served_lm(model, tokenizer, batch_size: int = 32):
    """The harness's ``HFLM`` over an already loaded model (plain, PEFT or :class:`~hubunlearn.eco.ECOModel`)."""
    require_lm_eval()
    return _served_class()(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


@functools.cache
def _served_class():
    import torch
    from lm_eval.models.huggingface import HFLM

    class ServedLM(HFLM):
        """``HFLM`` on a loaded model. For an ECO bundle, each scoring call hands the bundle what serving hands it:
        the prompt's text for its classifier (the harness's context string, as a user would send it), an attention
        mask over the real tokens (the harness pads on the right without one) and the prompt's length, so that the
        corruption touches the prompt's embeddings only and its last token stays clean. Other models run
        unchanged through the harness's own call."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._eco = getattr(self.model, "classifies_prompts", False)
            self._contexts: dict[tuple[int, ...], tuple[str, int]] = {}

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if self._eco:  # the exact inputs _model_call will see -> (context text, context tokens among them)
                self._contexts = {}
                for (context, _), context_enc, continuation_enc in requests:
                    whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
                    prompt_tokens = max(0, len(whole) - len(continuation_enc))
                    text = context if context is not None else self.tokenizer.decode(context_enc, skip_special_tokens=True)
                    self._contexts[tuple(whole[:-1])] = (text, prompt_tokens)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._contexts = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            if not self._eco or not self._contexts:
                return super()._model_call(inps, attn_mask, labels)
            prompts, lengths, prompt_lengths = [], [], []
            for row in inps.tolist():
                trailing = len(row) - len(bytes(min(t, 1) for t in row).rstrip(b"\0"))  # padding zeros (or real 0 tokens)
                for length in range(len(row), len(row) - trailing - 1, -1):
                    found = self._contexts.get(tuple(row[:length]))
                    if found is not None:
                        break
                else:
                    raise RuntimeError("an input of the harness matches none of its requests")
                prompts.append(found[0])
                lengths.append(length)
                prompt_lengths.append(found[1])
            positions = torch.arange(inps.shape[1], device=inps.device)
            mask = (positions < torch.tensor(lengths, device=inps.device).unsqueeze(1)).long()
            with torch.no_grad():
                return self.model(inps, attention_mask=mask, prompts=prompts, prompt_length=prompt_lengths).logits

    return ServedLM


class _LoadedModelNotice(logging.Filter):
    """Drops HFLM's warnings about being handed a loaded model instead of a name: that is what serving means here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "`pretrained` model kwarg is not of type" not in message and "already-initialized model" not in message


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    """The harness's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}`` as ``{"acc": 0.5, "acc_stderr": 0.1}``
    (the filter kept in the name where it is not ``none``)."""
    out = {}
    for key, value in result.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name == "none" else key] = float(value)
    return out


def run_tasks(model, tokenizer, names: tuple[str, ...], include: tuple[str, ...] = (), limit: int | None = None,
              batch_size: int = 32, manager=None) -> dict[str, Any]:
    """Score ``names`` with ``lm_eval.simple_evaluate`` on the in-memory model; ``limit`` is the harness's (the first
    N documents of each task, of each MMLU subject). Returns ``{"tasks": {name: {"acc": ..., "acc_stderr": ...,
    "samples": n, "dataset": {"id", "config"}}}, "subtasks": {...}, "n_shot": {...}, "lm_eval_version", "limit"}``:
    ``tasks`` holds the tasks asked for (a group such as ``mmlu`` with the harness's aggregate), ``subtasks`` the
    members of groups. Raises :class:`UsageError` as :func:`check_tasks` does."""
    lm_eval = require_lm_eval()
    manager = manager or check_tasks(names, include)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines
    wrapper_log = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _LoadedModelNotice) for f in wrapper_log.filters):
        wrapper_log.addFilter(_LoadedModelNotice())
    results = lm_eval.simple_evaluate(model=served_lm(model, tokenizer, batch_size), tasks=list(names), task_manager=manager,
                                      limit=limit, log_samples=True, bootstrap_iters=1000)
    samples = results.get("n-samples") or {}
    configs = results.get("configs") or {}

    def entry(name):
        values = _numbers(results["results"].get(name, {}))
        count = samples.get(name, {}).get("effective")
        if count is None:  # a group: its members' documents
            count = sum(samples[t]["effective"] for t in results.get("group_subtasks", {}).get(name, []) if t in samples) or None
        config = configs.get(name) or {}
        dataset = {"id": config.get("dataset_path"), "config": config.get("dataset_name")} if config else None
        if dataset is None:
            index = manager.task_index.get(name)
            cfg = (index.cfg or {}) if index is not None else {}
            dataset = {"id": cfg.get("dataset_path"), "config": cfg.get("dataset_name")}
        return {**values, "samples": count, "dataset": dataset}

    tasks = {name: entry(name) for name in names}
    subtasks = {name: entry(name) for name in results["results"] if name not in tasks}
    return {"tasks": tasks, "subtasks": subtasks, "n_shot": {k: v for k, v in (results.get("n-shot") or {}).items() if k in tasks},
            "lm_eval_version": lm_eval.__version__, "limit": limit, "per_example": per_example(results.get("samples") or {})}


def per_example(samples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The harness's logged samples as ``per_example.json`` rows, per task (the members of a group each under their
    own name): ``doc_id``, the document (``doc``: question, choices, answer as the task's data holds them), ``target``,
    ``responses`` (for a multiple-choice task the log-likelihood of each choice, in order) and each metric (``acc``:
    1.0 when the likeliest choice is the target)."""
    def row(sample: dict) -> dict:
        responses = [r[0] if isinstance(r, (list, tuple)) else r for r in sample.get("filtered_resps", [])]
        return {"doc_id": sample.get("doc_id"), "doc": sample.get("doc"), "target": sample.get("target"),
                "responses": [float(r) if isinstance(r, (int, float)) else r for r in responses],
                **{metric: sample.get(metric) for metric in sample.get("metrics", [])}}

    return {task: sorted((row(s) for s in rows), key=lambda r: r["doc_id"] if isinstance(r["doc_id"], int) else 0)
            for task, rows in samples.items()}


def headline(values: dict[str, Any]) -> dict[str, float]:
    """A task's metrics without their standard errors and counts: what the card and ``model-index`` show."""
    return {k: v for k, v in values.items() if isinstance(v, float) and "_stderr" not in k}


def format_lines(harness: dict[str, Any]) -> list[str]:
    """Summary-table rows: ``task  acc 0.2500 ± 0.1637 (8 questions)`` per asked task."""
    lines = []
    for name, values in harness["tasks"].items():
        shown = ", ".join(f"{k} {v:.4f}" + (f" ± {values[k + '_stderr']:.4f}" if isinstance(values.get(k + "_stderr"), float) else "")
                          for k, v in headline(values).items())
        lines.append(f"{name:<24}{shown or 'no numbers'}" + (f" ({values['samples']} examples)" if values.get("samples") else ""))
    return lines
