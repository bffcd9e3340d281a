"""``hubunlearn unlearn``: parse a recipe and flags into a method's config, train, and save the artifact."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .data import load_rows
from .errors import NonFiniteLossError, UsageError, did_you_mean
from .resources import resource_dir
from .modeling import hub_facts, load_model, load_tokenizer
from .trainers import METHODS, UNLEARNING_METHODS, UnlearnConfig, canonical_method
from .trainers import engines
from .trainers.base import UTILITY_FLOOR

logger = logging.getLogger(__name__)

RECIPES = resource_dir("recipes", "trainers")
# What `hubunlearn unlearn` adds to a method's defaults unless --utility_budget or --no_utility_guard is given.
UTILITY_GUARD = {"utility_budget": UTILITY_FLOOR, "utility_metric": "probability", "budget_check_steps": 5}


@dataclass
class UnlearnArguments:
    """What to unlearn from which model: everything that is not a training hyperparameter."""

    method: str = field(default=None, metadata={"help": f"Unlearning method: one of {', '.join(UNLEARNING_METHODS)}."})
    model_name_or_path: str = field(default=None, metadata={"help": "Hub model id or local folder of the model to unlearn from."})
    model_revision: str = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run the model repository's own code (off unless you trust it)."})
    forget: str = field(default=None, metadata={"help": "Forget set: ORG/NAME[:CONFIG][@SPLIT], a local file, or FOLDER:CONFIG."})
    retain: str = field(default=None, metadata={"help": "Retain set, same forms as --forget (needed unless --retain_loss none)."})
    use_lora: bool = field(default=False, metadata={"help": "Unlearn through a LoRA adapter and save the adapter."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names, or 'all-linear'."})
    config: str = field(default=None, metadata={"help": "YAML recipe (a path, or a name from the trainers/ folder); flags override it."})
    utility_guard: bool = field(default=True, metadata={
        "help": "Without --utility_budget and with a retain set: the safety net of the defaults, --utility_budget 0.8 on the "
                "retain answer probability checked every 5 steps (stop and restore the last state within budget, then mix back "
                "to it if the end missed it; --no_utility_guard: off)."})
    summary: bool = field(default=True, metadata={
        "help": "End with a summary: steps, time, final losses, forget and retain answer probability before and after "
                "(--no_summary: skip it; the utility-lost warning and record stay)."})


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES / name_or_path, RECIPES / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    raise UsageError(f"recipe '{name_or_path}' not found: give a YAML path or one of: {', '.join(known)}")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = find_recipe(name_or_path)
    try:
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path} must be a mapping of argument names to values")
    return recipe


def _usage_error(message: str):
    raise UsageError(f"{message} (see hubunlearn unlearn --method METHOD --help)")


def check_deepspeed_config_argument(value: Any) -> None:
    """``--deepspeed`` takes a DeepSpeed JSON config file (or a JSON object): a missing file or broken JSON is said in one
    line before anything imports DeepSpeed."""
    if isinstance(value, dict):
        return
    path = Path(str(value))
    text = path.read_text() if path.is_file() else str(value)
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        what = "is not a JSON object" if path.is_file() else "is neither a file nor a JSON object"
        raise UsageError(f"--deepspeed {value} {what}: give the path of a DeepSpeed JSON config (e.g. ds_zero3.json)")


def parse_unlearn_args(argv: list[str]) -> tuple[UnlearnArguments, UnlearnConfig]:
    """Two passes: find the method (flag or recipe), then parse everything into that method's config."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--method")
    peek.add_argument("--config")
    peek.add_argument("--deepspeed")
    known, _ = peek.parse_known_args(argv)
    recipe = load_recipe(known.config) if known.config else {}
    if known.deepspeed or recipe.get("deepspeed"):
        check_deepspeed_config_argument(known.deepspeed or recipe["deepspeed"])
    method = known.method if known.method is not None else recipe.get("method")
    wants_help = any(a in ("-h", "--help") for a in argv)
    if method is not None and not str(method).strip():
        raise UsageError(f"--method is empty: choose one of {', '.join(UNLEARNING_METHODS)}")
    if method is None and not wants_help:
        for argument in argv:
            if argument.startswith("--") and argument not in ("--method", "--config") and (
                    suggestion := did_you_mean(argument, ["--method", "--config"])):
                raise UsageError(f"unrecognized argument {argument}{suggestion} (see hubunlearn unlearn --help)")
        raise UsageError(f"--method is required: choose one of {', '.join(UNLEARNING_METHODS)}")
    if method is not None:
        method = canonical_method(str(method))
    config_class = UNLEARNING_METHODS[method].config_class if method else UnlearnConfig
    parser = HfArgumentParser((UnlearnArguments, config_class), prog="hubunlearn unlearn", allow_abbrev=False)
    parser.error = _usage_error
    fields = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - fields)
    if unknown:
        raise UsageError(f"recipe {known.config} has unknown keys: {', '.join(unknown)} (see hubunlearn unlearn --method {method} --help)")
    parser.set_defaults(**recipe)
    try:
        arguments, config, unused = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except ImportError as error:  # TrainingArguments needs the DeepSpeed package for --deepspeed
        if "deepspeed" not in str(error).lower():
            raise
        raise UsageError("--deepspeed needs the DeepSpeed package, which is not installed: pip install deepspeed "
                         "(on a machine with GPUs), or drop --deepspeed") from None
    if unused:
        raise UsageError(f"unrecognized argument {unused[0]}{did_you_mean(unused[0], parser)} (see hubunlearn unlearn --method "
                         f"{method or 'METHOD'} --help)")
    arguments.method = method
    for name in ("model_name_or_path", "forget"):
        if getattr(arguments, name) is None:
            raise UsageError(f"--{name} is required (on the command line or in the --config recipe)")
    if "--output_dir" not in argv and "output_dir" not in recipe:
        raise UsageError("--output_dir is required: the folder that will hold the artifact")
    guard = arguments.utility_guard and config.utility_budget is None and arguments.retain and method in METHODS
    if guard and engines.shards_weights(config):
        logger.warning("no utility guard: it mixes whole weights, which FSDP and ZeRO-3 shard (the before/after measurement stays)")
    elif guard:
        config.utility_budget, config.utility_metric = UTILITY_GUARD["utility_budget"], UTILITY_GUARD["utility_metric"]
        if UNLEARNING_METHODS[method].budget_checks_in_training:  # task_vector: calibrated at the end only
            config.budget_check_steps = config.budget_check_steps or UTILITY_GUARD["budget_check_steps"]
    return arguments, config


def lora_config(arguments: UnlearnArguments):
    from peft import LoraConfig

    targets = arguments.lora_target_modules
    return LoraConfig(
        r=arguments.lora_r,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        task_type="CAUSAL_LM",
    )


def run_unlearn(arguments: UnlearnArguments, config: UnlearnConfig, prepare=None) -> Path:
    """Train and save; on a non-finite loss save the last good state (marked as stopped) and re-raise. ``prepare``
    (optional) is called with the trainer before it trains (``hubunlearn tune`` adds its pruning callback there)."""
    from .artifacts import check_output_dir

    output_dir = Path(config.output_dir)
    check_output_dir(output_dir, config.overwrite_output_dir)
    existed = output_dir.exists()
    trainer = None
    try:
        for name, spec in (("forget", arguments.forget), ("retain", arguments.retain)):
            if spec:  # check the data before loading a possibly large model
                rows = load_rows(spec)
                if len(rows) == 0:
                    raise UsageError(f"the {name} set is empty: give at least one row")
                config.data_format.shape_of(rows.column_names, f"the {name} set")
        tokenizer = load_tokenizer(arguments.model_name_or_path, arguments.model_revision, arguments.trust_remote_code)
        with engines.whole_weights_at_load():  # ZeRO-3 partitions them when training starts
            model = load_model(arguments.model_name_or_path, arguments.model_revision, arguments.trust_remote_code)
        trainer = UNLEARNING_METHODS[arguments.method](
            model=model,
            args=config,
            forget_dataset=arguments.forget,
            retain_dataset=arguments.retain,
            processing_class=tokenizer,
            peft_config=lora_config(arguments) if arguments.use_lora else None,
        )
        trainer.base_model_facts = hub_facts(arguments.model_name_or_path, arguments.model_revision)
        if prepare is not None:
            prepare(trainer)
        trainer.train()
    except NonFiniteLossError as error:
        if trainer is None:
            raise
        trainer.record_extras["stopped"] = {"reason": "non-finite loss", "step": error.step}
        trainer.save_model()
        raise NonFiniteLossError(error.step, error.what, error.value, saved_to=output_dir) from None
    except BaseException:
        if not existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            shutil.rmtree(output_dir)
        raise
    trainer.save_model()
    if arguments.summary and "utility" in trainer.record_extras and trainer.is_world_process_zero():
        print(trainer.summary())
    return output_dir
