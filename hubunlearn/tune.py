"""``hubunlearn tune``: search a method's hyperparameters for the setting that forgets most within a utility budget.

An Optuna study (TPE sampler, seeded; SQLite storage, so a study resumes) over the method's search space
(:mod:`hubunlearn.search_spaces`: learning rate, steps, retain weight, the method's own parameters, the LoRA rank).
Each trial writes the recipe it runs, trains with the ``unlearn`` pipeline (:func:`hubunlearn.unlearn.run_unlearn`,
the model reloaded from its folder or the Hub cache), and evaluates the saved artifact with the TOFU evaluation
(forget quality against the reference's cached statistics, model utility), as ``hubunlearn eval`` would.

The objective (forget quality by default) is maximised (or minimised) subject to ``model utility ≥ τ × the
original's``. Out-of-budget trials keep their true objective value and are recorded as **infeasible**: the constraint
``τ − utility kept`` goes to Optuna's constrained TPE (``constraints_func``), and the best trial is the best feasible
one. During training, every ``budget_check_steps`` steps the share of the original's retain answer probability kept
(the trainer's probe, a proxy of model utility) is reported to the trial; a trial whose share falls below ``τ`` is
pruned (Optuna's ``ThresholdPruner``) and recorded as pruned, without the evaluation. Checks start at half the trial's steps:
on TOFU-mini, NPO at lr 3e-4 fell to 0.21 of the retain probability at step 18 and was back at 0.92 at step 60.

Outputs (per method; with several methods, in one folder each, plus a comparison table): ``trials.json`` /
``trials.csv``, ``pareto.png``, ``importance.png`` and ``best.yaml``, a recipe that ``hubunlearn unlearn --config``
runs as is (:mod:`hubunlearn.tune_report`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainerCallback

from .errors import NonFiniteLossError, UsageError
from .search_spaces import describe, method_space, restrict

logger = logging.getLogger(__name__)

# Objective name -> (direction, what it is). Each is read from the TOFU evaluation of the trial's artifact.
OBJECTIVES = {
    "forget_quality": ("maximize", "forget quality: KS-test p-value of the forget truth ratios against the reference's"),
    "forget_truth_ratio": ("maximize", "forget truth ratio score, mean(min(R, 1/R))"),
    "forget_probability": ("minimize", "mean answer probability on the forget set"),
    "forget_rouge": ("minimize", "ROUGE-L recall of greedy answers on the forget set"),
    "forget_extraction_strength": ("minimize", "teacher-forced extraction strength on the forget set"),
}
TUNE_FILES = ("study.db", "trials.json", "trials.csv", "pareto.png", "importance.png", "best.yaml", "comparison.json",
              "comparison.csv")
BEST_MODEL = "best-model"  # best.yaml's output_dir, beside it: running it leaves the folder resumable
TRIAL_FLAGS = ["--disable_tqdm", "true", "--no_summary"]  # how trials run; not part of the recipe (no effect on results)


def require_optuna():
    """Import Optuna, or say in one line how to install it."""
    try:
        import optuna
    except ImportError:
        raise UsageError("hubunlearn tune needs Optuna, which is not installed: pip install 'hubunlearn[tune]'") from None
    return optuna


@dataclass
class TuneConfig:
    """What to search, for which objective and budget, and where the results go.

    ``unlearn_args`` are ``hubunlearn unlearn`` flags (model, data, fixed hyperparameters) applied to every trial;
    ``recipe`` a recipe YAML (path or name) read first. ``space`` restricts or re-ranges the method's search space
    (``NAME[=LOW:HIGH|A|B],...``). Evaluation: a TOFU-layout ``data`` folder (or the Hub dataset), its
    ``forget_split``, and the reference (``reference`` model or ``reference_stats`` file) that forget quality needs.
    """

    method: str
    output: str
    trials: int = 20
    utility_budget: float = 0.9
    objective: str = "forget_quality"
    recipe: str | None = None
    unlearn_args: list[str] = field(default_factory=list)
    space: str | None = None
    study: str | None = None  # SQLite file; default OUTPUT/study.db
    seed: int = 0
    budget_check_steps: int = 5  # 0: no pruning
    timeout: float | None = None  # seconds per method's study in this run
    save_best: str | None = None
    data: str | None = None
    forget_split: str = "forget10"
    reference: str | None = None
    reference_stats: str | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 64

    def __post_init__(self):
        from .controls import check_budget

        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective '{self.objective}': choose one of {', '.join(OBJECTIVES)}")
        check_budget(self.utility_budget)
        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1; got {self.trials}")
        if self.budget_check_steps < 0 or (self.timeout is not None and self.timeout <= 0):
            raise UsageError("--budget_check_steps must be at least 0 (0: no pruning) and --timeout positive")
        if self.objective == "forget_quality" and not (self.reference or self.reference_stats):
            raise UsageError("the forget_quality objective compares with a reference model: add --reference MODEL (a model "
                             "trained without the forget set) or --reference_stats per_example.json (of an earlier eval), "
                             "or choose another --objective")
        for flag in ("--output_dir", "--utility_budget", "--budget_check_steps", "--seed"):
            if any(a == flag or a.startswith(flag + "=") for a in self.unlearn_args):
                raise UsageError(f"{flag} is not an unlearn flag of tune: "
                                 + {"--output_dir": "trials write to temporary folders, results go to --output",
                                    "--seed": "tune's --seed seeds the sampler and every trial"}.get(
                                     flag, "tune's own flag is the budget of model utility (set the trainer's in --config)"))


@dataclass
class MethodSearch:
    """One method's search: its space, the recipe every trial starts from, and the study's identity."""

    method: str
    space: dict
    settings: dict  # recipe + flags, without the searched parameters and output_dir
    directory: Path
    base_model: str
    base_revision: str | None


# ---- the settings and recipes ------------------------------------------------------------------------------------


def _methods(name: str) -> list[str]:
    from .trainers import METHODS, UNLEARNING_METHODS, canonical_method

    if name == "all":
        return list(METHODS)
    methods = [canonical_method(part.strip()) for part in name.split(",") if part.strip()]
    if not methods:
        raise UsageError(f"--method is empty: choose one of {', '.join(METHODS)}, a comma-separated list, or all")
    for method in methods:
        if method not in METHODS:
            raise UsageError(f"{method} trains no weights (its strength is set by its own search): tune one of "
                             f"{', '.join(METHODS)}" if method in UNLEARNING_METHODS else f"unknown method '{method}'")
    return list(dict.fromkeys(methods))


def _plain(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _settings(method: str, config: TuneConfig) -> tuple[dict, Any, Any]:
    """The recipe's keys and the flags given, as one recipe mapping (values as parsed), and the parsed pair."""
    from transformers import HfArgumentParser

    from .trainers import UNLEARNING_METHODS
    from .unlearn import UnlearnArguments, load_recipe, parse_unlearn_args

    recipe = load_recipe(config.recipe) if config.recipe else {}
    argv = (["--config", config.recipe] if config.recipe else []) + ["--method", method, *config.unlearn_args, "--seed", str(config.seed)]
    arguments, parsed = parse_unlearn_args(argv + ["--output_dir", "unused"])
    parser = HfArgumentParser((UnlearnArguments, UNLEARNING_METHODS[method].config_class))
    dests = {option: action.dest for action in parser._actions for option in action.option_strings}
    settings = {key: value for key, value in recipe.items() if key != "output_dir"}
    for token in argv:
        dest = dests.get(token.split("=")[0]) if token.startswith("--") else None
        if dest and dest not in ("config", "output_dir"):
            settings[dest] = _plain(getattr(arguments, dest) if hasattr(arguments, dest) else getattr(parsed, dest))
    settings["method"] = method
    return settings, arguments, parsed


def prepare_search(method: str, config: TuneConfig, directory: Path) -> MethodSearch:
    """Check everything about one method's search before anything runs: its settings parse, its space, and no flag
    fixes a searched parameter."""
    from .trainers import UNLEARNING_METHODS

    settings, arguments, parsed = _settings(method, config)
    space = restrict(method_space(UNLEARNING_METHODS[method].config_class, arguments.use_lora, parsed.retain_loss), config.space)
    fixed = [name for name in space if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in config.unlearn_args)]
    if fixed:
        raise UsageError(f"--{fixed[0]} is searched: drop the flag, or leave {fixed[0]} out of --space")
    if arguments.forget is None or arguments.model_name_or_path is None:
        raise UsageError("--model_name_or_path and --forget are required (as flags or in the --config recipe)")
    search = MethodSearch(method, space, settings, directory, arguments.model_name_or_path, arguments.model_revision)
    with tempfile.TemporaryDirectory() as scratch:  # the trials' recipe parses (each trial adds its parameters)
        parse_recipe(write_recipe(Path(scratch) / "recipe.yaml", recipe_for(search, {})), Path(scratch) / "unused")
    return search


def recipe_for(search: MethodSearch, params: dict, output_dir: str | None = None) -> dict:
    """The recipe of a trial: the fixed settings, the trial's parameters, no utility guard (the search keeps the
    budget), and ``output_dir`` when given."""
    recipe = {**search.settings, **params}
    if recipe.get("utility_budget") is None:
        recipe["utility_guard"] = False
    if output_dir is not None:
        recipe["output_dir"] = output_dir
    return recipe


def write_recipe(path: Path, recipe: dict, header: str = "") -> Path:
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(recipe, sort_keys=False)
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    temporary.replace(path)
    return path


def parse_recipe(path: Path, output_dir: Path, extra: list[str] = ()):
    from .unlearn import parse_unlearn_args

    return parse_unlearn_args(["--config", str(path), "--output_dir", str(output_dir), *extra])


# ---- evaluation ------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The TOFU evaluation every trial gets: its sets, the reference's statistics, the original's metrics."""

    config: Any  # EvalConfig
    sets: dict
    reference: dict | None
    reference_source: dict | None
    original: dict | None = None
    original_summary: dict | None = None


def make_evaluation(config: TuneConfig, model: str) -> Evaluation:
    from .evaluate import EvalConfig, load_sets, reference_statistics

    metrics = ["probability", "truth_ratio", "rouge", "model_utility"]
    if config.reference or config.reference_stats:
        metrics.append("forget_quality")
    if config.objective == "forget_extraction_strength":
        metrics.append("extraction_strength_tf")
    eval_config = EvalConfig(model=model, data=config.data, forget_split=config.forget_split, metrics=tuple(metrics),
                             max_examples=config.max_eval_examples, reference=config.reference,
                             reference_stats=config.reference_stats, batch_size=config.eval_batch_size,
                             max_new_tokens=config.max_new_tokens)
    sets = load_sets(eval_config)
    missing = [name for name in ("forget", "retain", "real_authors", "world_facts") if not sets.get(name)]
    if missing:
        raise UsageError(f"the evaluation data has no {', '.join(missing)} rows: give --data a folder laid out like locuslab/TOFU")
    reference, source = reference_statistics(eval_config, sets)
    return Evaluation(eval_config, sets, reference, source)


def metrics_of(summary: dict) -> dict[str, float | None]:
    """The numbers a trial records, from an evaluation summary."""
    forget, aggregates = summary["sets"].get("forget", {}), summary["aggregates"]
    return {"forget_quality": (aggregates.get("forget_quality") or {}).get("value"),
            "model_utility": (aggregates.get("model_utility") or {}).get("value"),
            "forget_truth_ratio": forget.get("truth_ratio"), "forget_probability": forget.get("probability"),
            "forget_rouge": forget.get("rouge_recall"), "forget_extraction_strength": forget.get("extraction_strength_tf"),
            "retain_probability": summary["sets"].get("retain", {}).get("probability")}


def evaluate_model(evaluation: Evaluation, model: str, adapter: str | None = None, revision: str | None = None) -> dict:
    """The TOFU summary of ``model`` (with ``adapter``), as ``hubunlearn eval`` computes it."""
    from .evaluate import evaluate_sets, load_for_eval, summarize

    loaded, tokenizer = load_for_eval(model, adapter, revision=revision, device=evaluation.config.device)
    per_example = evaluate_sets(loaded, tokenizer, evaluation.sets, evaluation.config)
    summary = summarize(per_example, evaluation.config, evaluation.reference)
    if evaluation.reference is not None:
        from .evaluate import summarize_set

        summary["reference"] = {name: summarize_set(name, results) for name, results in evaluation.reference.items()}
        summary["reference_source"] = evaluation.reference_source
    return summary


def evaluate_artifact(evaluation: Evaluation, folder: Path, search: MethodSearch) -> dict:
    from .artifacts import read_record

    if read_record(folder)["artifact"] == "lora":
        return evaluate_model(evaluation, search.base_model, adapter=str(folder), revision=search.base_revision)
    return evaluate_model(evaluation, str(folder))


# ---- the study -----------------------------------------------------------------------------------------------------


def _signature(search: MethodSearch, config: TuneConfig) -> dict:
    """What makes trials comparable: a study file made with another of these is refused, never mixed."""
    return {"method": search.method, "space": describe(search.space), "objective": config.objective,
            "utility_budget": config.utility_budget, "settings": search.settings,
            "evaluation": {"data": config.data, "forget_split": config.forget_split, "max_examples": config.max_eval_examples,
                           "reference": config.reference, "reference_stats": config.reference_stats}}


def storage_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def check_study_file(path: Path, searches: list[MethodSearch], config: TuneConfig) -> None:
    """An existing study file must hold only studies of these methods, each made for the same search."""
    optuna = require_optuna()
    if not path.exists():
        return
    if not path.is_file():
        raise UsageError(f"--study {path} is not a file: give the SQLite file of an earlier tune, or a new path")
    try:
        storage = optuna.storages.RDBStorage(storage_url(path), skip_table_creation=True)
        summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    except Exception:  # not SQLite, or not Optuna's tables
        raise UsageError(f"--study {path} is not an Optuna study file: give the file of an earlier tune, or a new path") from None
    wanted = {search.method: search for search in searches}
    others = sorted(set(summaries) - set(wanted))
    if others:
        raise UsageError(f"--study {path} holds the search of method {', '.join(others)}, not {', '.join(wanted)}: give "
                         "another --study file (or --output folder); studies are never mixed")
    for name, summary in summaries.items():
        stored = summary.user_attrs.get("hubunlearn") or {}
        expected = _signature(wanted[name], config)
        differs = [key for key in expected if stored.get(key) != expected[key]]
        if differs:
            key = differs[0]
            raise UsageError(f"--study {path} was made for another {key.replace('_', ' ')} of {name} ({_short(stored.get(key))}; "
                             f"here {_short(expected[key])}): give another --study file (or --output folder), or the same "
                             "settings to resume it; studies are never mixed")


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_output(output: Path) -> None:
    """``--output`` is new, empty, or an earlier tune's folder; anything else is refused (nothing is overwritten)."""
    from .trainers import METHODS

    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file: give a folder")
    if output.is_dir():
        foreign = [p.name for p in output.iterdir() if p.name not in TUNE_FILES and p.name not in METHODS and not p.name.startswith(".trial-")
                   and p.name != BEST_MODEL]
        if foreign:
            raise UsageError(f"--output {output} holds other files ({foreign[0]}, ...): choose an empty folder or an earlier tune's")


class UtilityProbePruning(TrainerCallback):
    """Reports the share of the original's retain answer probability the model keeps (the trainer's probe on
    ``--utility_probe_size`` retain examples) to the Optuna ``trial`` every ``every`` steps from half its steps on, and prunes the trial
    (raises ``optuna.TrialPruned``) when Optuna's pruner says so: below the budget ``tau``."""

    def __init__(self, trial, trainer, every: int, tau: float):
        self.trial, self.trainer, self.every, self.tau = trial, trainer, every, tau
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        before = getattr(self.trainer, "_before", None) or {}  # the trainer's measurement before the first step
        if state.global_step % self.every or not before.get("retain") or 2 * state.global_step < state.max_steps:
            return  # from half the trial's steps on: an early dip that the retain term repairs later is no reason to prune
        after = self.trainer.measure()
        share = after["retain"] / before["retain"]
        self.history.append({"step": state.global_step, "retain_kept": share, "forget_probability": after["forget"]})
        self.trial.report(share, state.global_step)
        if self.trial.should_prune():
            for key, value in (("probe", self.history), ("pruned_at_step", state.global_step), ("utility_kept", share),
                               ("constraint", self.tau - share)):
                self.trial.set_user_attr(key, value)
            raise require_optuna().TrialPruned(f"retain probe kept {share:.3g} of the original's at step {state.global_step}")


def _objective(search: MethodSearch, config: TuneConfig, evaluation: Evaluation, say):
    optuna = require_optuna()

    def objective(trial) -> float:
        params = {name: dimension.suggest(trial, name) for name, dimension in search.space.items()}
        folder = trial_folder(search, trial.number)
        shutil.rmtree(folder, ignore_errors=True)
        holder: dict[str, Any] = {}

        def prepare(trainer):
            holder["trainer"] = trainer
            if config.budget_check_steps:
                holder["pruning"] = UtilityProbePruning(trial, trainer, config.budget_check_steps, config.utility_budget)
                trainer.add_callback(holder["pruning"])

        from .unlearn import run_unlearn

        try:
            with tempfile.TemporaryDirectory() as scratch:
                recipe = write_recipe(Path(scratch) / "recipe.yaml", recipe_for(search, params))
                arguments, unlearn_config = parse_recipe(recipe, folder, TRIAL_FLAGS)
                try:
                    run_unlearn(arguments, unlearn_config, prepare=prepare)
                except NonFiniteLossError as error:
                    trial.set_user_attr("error", str(error).split(" (")[0])
                    say(f"  trial {trial.number}: failed ({trial.user_attrs['error']})")
                    raise
                except optuna.TrialPruned as pruned:
                    say(f"  trial {trial.number}: pruned ({pruned}) {_params_text(params)}")
                    raise
            trainer = holder["trainer"]
            trial.set_user_attr("steps", trainer.state.global_step)
            if "pruning" in holder:
                trial.set_user_attr("probe", holder["pruning"].history)
            metrics = metrics_of(evaluate_artifact(evaluation, folder, search))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        original = evaluation.original["model_utility"]
        kept = metrics["model_utility"] / original if metrics["model_utility"] is not None and original else None
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("utility_kept", kept)
        trial.set_user_attr("constraint", config.utility_budget - kept if kept is not None else 1.0)
        value = metrics[config.objective]
        if value is None or not math.isfinite(value):
            raise UsageError(f"the evaluation gave no {config.objective}: check --data (TOFU layout with perturbed answers)")
        feasible = kept is not None and kept >= config.utility_budget
        say(f"  trial {trial.number}: {config.objective} {value:.4g}, model utility {metrics['model_utility']:.4g} "
            f"({kept:.3f}× the original's{'' if feasible else ', over budget'}) {_params_text(params)}")
        return value

    return objective


def _params_text(params: dict) -> str:
    return "(" + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items()) + ")"


def _constraints(trial) -> tuple[float]:
    return (trial.user_attrs.get("constraint", 1.0),)


def open_study(search: MethodSearch, config: TuneConfig, study_path: Path):
    """Create or load the method's study (named after the method) in the SQLite file, sampler seeded by ``--seed`` and
    the number of trials already run (a resumed study draws new points, not the first session's again)."""
    optuna = require_optuna()

    storage = storage_url(study_path)
    direction = OBJECTIVES[config.objective][0]
    existing = optuna.load_study(study_name=search.method, storage=storage) if search.method in optuna.get_all_study_names(storage) else None
    done = len(existing.trials) if existing else 0
    with warnings.catch_warnings():  # constraints_func is marked experimental; its use here is the documented one
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=config.seed + done, constraints_func=_constraints,
                                             n_startup_trials=startup_trials(done + config.trials))
    pruner = (optuna.pruners.ThresholdPruner(lower=config.utility_budget) if config.budget_check_steps
              else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=search.method, storage=storage, direction=direction, sampler=sampler, pruner=pruner,
                                load_if_exists=True)
    if existing is None:
        study.set_user_attr("hubunlearn", _signature(search, config))
    fail_running_trials(study, search)  # left by a run killed mid-trial (trials run one at a time)
    return study


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the results: a third of the study's ``trials`` (a resumed study's earlier ones
    count), 3 to 10 (Optuna's default, 10, would leave a short search random throughout)."""
    return max(3, min(10, trials // 3))


def fail_running_trials(study, search: MethodSearch) -> None:
    """Record the study's running trials as failed and remove their folders: a trial stopped mid-way (Ctrl-C, SIGTERM,
    a killed process) never stays ``running``."""
    optuna = require_optuna()

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        shutil.rmtree(trial_folder(search, trial.number), ignore_errors=True)


def trial_folder(search: MethodSearch, number: int) -> Path:
    """Where trial ``number`` of the method's study saves its artifact while it is evaluated."""
    return search.directory / f".trial-{number}"


def best_trial(study, tau: float):
    """The best complete trial within the budget (``None`` when none is)."""
    optuna = require_optuna()

    feasible = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("constraint", 1.0) <= 0]
    if not feasible:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(feasible, key=lambda t: (sign * t.value, -t.number))


@dataclass
class TuneResult:
    """What a tune produced: per method, its study and output files; the comparison (several methods); the saved best."""

    studies: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    comparison: list | None = None
    skipped: dict = field(default_factory=dict)
    saved: Path | None = None


def run_tune(config: TuneConfig, progress=None) -> TuneResult:
    """Run the search(es) ``config`` asks for; write the tables, plots and best recipes; return what was made.

    Raises ``UsageError`` (before anything is written) for a bad objective, budget, trial count, space, method, study
    file of another search, or a forget-quality objective without a reference."""
    optuna = require_optuna()
    from . import tune_report

    say = progress or (lambda text: print(text, flush=True))
    output = Path(config.output)
    study_path = Path(config.study) if config.study else output / "study.db"
    check_output(output)
    methods = _methods(config.method)
    several = len(methods) > 1
    searches, skipped = [], {}
    for method in methods:
        try:
            searches.append(prepare_search(method, config, output / method if several else output))
        except UsageError as error:
            if config.method != "all":
                raise
            skipped[method] = str(error)
    if not searches:
        raise UsageError(f"no method can run with these settings (e.g. {next(iter(skipped))}: {next(iter(skipped.values()))})")
    check_study_file(study_path, searches, config)
    if config.save_best and Path(config.save_best).exists() and (not Path(config.save_best).is_dir() or any(Path(config.save_best).iterdir())):
        raise UsageError(f"--save_best {config.save_best} already exists and is not an empty folder: choose a new one")
    from .data import looks_like_repo_id

    for flag, model in (("--model_name_or_path", searches[0].base_model), ("--reference", config.reference)):
        if model and not Path(model).exists() and not looks_like_repo_id(str(model)):  # before minutes of reference statistics
            raise UsageError(f"{flag} {model} is neither a model folder nor a Hub id (ORG/NAME)")
    say(f"evaluating the reference's statistics (cached) and the original model {searches[0].base_model}")
    evaluation = make_evaluation(config, searches[0].base_model)
    evaluation.original_summary = evaluate_model(evaluation, searches[0].base_model, revision=searches[0].base_revision)
    evaluation.original = metrics_of(evaluation.original_summary)
    evaluation.config.progress = False  # from here on, a line per trial is the progress
    if not evaluation.original["model_utility"]:
        why = "not measurable" if evaluation.original["model_utility"] is None else "0, so no share of it can be kept"
        raise UsageError(f"the original model's utility on this data is {why}: check --data (TOFU layout: retain, real "
                         "authors and world facts with paraphrased and perturbed answers)")
    created = not output.exists()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is said in one line here and kept in the table
    result = TuneResult(skipped=skipped)
    try:
        output.mkdir(parents=True, exist_ok=True)
        study_path.parent.mkdir(parents=True, exist_ok=True)
        for search in searches:
            search.directory.mkdir(parents=True, exist_ok=True)
            study = open_study(search, config, study_path)
            say(f"{search.method}: {config.trials} trial{'' if config.trials == 1 else 's'} over {', '.join(f'{k} {v}' for k, v in describe(search.space).items())}")
            try:
                study.optimize(_objective(search, config, evaluation, say), n_trials=config.trials, timeout=config.timeout,
                               catch=(NonFiniteLossError,))
            except BaseException:  # SIGTERM (SystemExit) or Ctrl-C: the trial under way is recorded as failed
                fail_running_trials(study, search)
                raise
            result.studies[search.method] = study
            result.files[search.method] = tune_report.write_reports(study, search, config, evaluation, best_trial(study, config.utility_budget))
    except UsageError:
        if created:  # a setting only the trainer could refuse, in the first trial: leave nothing behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    if several:
        result.comparison = tune_report.write_comparison(result.studies, config, evaluation, output)
    if config.save_best:
        result.saved = save_best(result, searches, config, evaluation, say)
    return result


def save_best(result: TuneResult, searches: list[MethodSearch], config: TuneConfig, evaluation: Evaluation, say) -> Path | None:
    """Rerun the best trial's recipe (same seed) into ``config.save_best`` as a normal artifact, evaluate it, and record
    the evaluation and the search in its ``unlearning.json`` and card."""
    from .artifacts import read_record, write_record
    from .cards import card_text, is_untouched
    from .evaluate import record_into_artifact
    from .unlearn import run_unlearn

    sign = 1 if OBJECTIVES[config.objective][0] == "maximize" else -1
    candidates = [(search, best_trial(result.studies[search.method], config.utility_budget)) for search in searches]
    candidates = [(s, t) for s, t in candidates if t is not None]
    if not candidates:
        say(f"no trial kept model utility within the budget ({config.utility_budget}× the original's): nothing to save")
        return None
    search, trial = max(candidates, key=lambda pair: sign * pair[1].value)
    target = Path(config.save_best)
    say(f"saving the best trial ({search.method} trial {trial.number}) to {target}")
    arguments, unlearn_config = parse_recipe(search.directory / "best.yaml", target, TRIAL_FLAGS)
    run_unlearn(arguments, unlearn_config)
    summary = evaluate_artifact(evaluation, target, search)
    record_into_artifact(evaluation.original_summary, target, "before")
    record_into_artifact(summary, target, "after")
    record = read_record(target)
    study = result.studies[search.method]
    states = [t.state.name.lower() for t in study.trials]
    record["search"] = {"tool": "optuna", "sampler": "TPE (constrained)", "objective": config.objective,
                        "direction": OBJECTIVES[config.objective][0], "utility_budget": config.utility_budget,
                        "space": describe(search.space), "trials": len(states),
                        "states": {state: states.count(state) for state in sorted(set(states))},
                        "best_trial": trial.number, "best_params": trial.params, "trial_metrics": trial.user_attrs.get("metrics"),
                        "original_model_utility": evaluation.original["model_utility"]}
    write_record(target, record)
    card = target / "README.md"
    if not card.exists() or is_untouched(card.read_text()):
        card.write_text(card_text(record, folder=target))
    return target
