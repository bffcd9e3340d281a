"""`hubunlearn unlearn` end to end, its recipes, and every bad input: one line, the right exit code, nothing left behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hubunlearn.trainers import UNLEARNING_METHODS, canonical_method
from hubunlearn.unlearn import RECIPES, parse_unlearn_args

from .conftest import REPO, TOFU

RECIPE_FILES = sorted((REPO / "trainers").glob("*-tofu.yaml"))  # the other benchmarks' recipes (MUSE, WMDP): their own tests


@pytest.fixture(scope="module")
def data_files(tmp_path_factory, world):
    folder = tmp_path_factory.mktemp("data")
    for name in ("forget", "retain"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.rows(name)))
    (folder / "empty.jsonl").write_text("")
    (folder / "shapeless.jsonl").write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    return folder


def assert_one_error_line(err: str, message: str):
    """The error is the last line, said once; anything before it is progress bars, never a traceback."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("hubunlearn: error: ") and message in last, err
    assert err.count("error") == 1 and "Traceback" not in err, err


def unlearn_args(model_dir, data, output, *extra):
    return ["unlearn", "--model_name_or_path", model_dir, "--forget", data / "forget.jsonl", "--retain", data / "retain.jsonl",
            "--output_dir", output, "--max_steps", "2", "--disable_tqdm", "true", *extra]


def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "hubunlearn.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("unlearn", "eval", "push", "quickstart"):
        assert f"  {command} " in result.stdout
    console = shutil.which("hubunlearn", path=str(REPO / ".venv" / "bin")) or shutil.which("hubunlearn")
    assert console and "unlearn" in subprocess.run([console, "unlearn", "--method", "ihl", "--help"], capture_output=True, text=True).stdout
    from importlib.metadata import version

    assert subprocess.run([console, "--version"], capture_output=True, text=True, check=True).stdout.strip() == f"hubunlearn {version('hubunlearn')}"


def test_unlearn_with_lora_writes_the_adapter_and_record(run_cli, world_model_dir, data_files, tmp_path):
    output = tmp_path / "ihl"
    code, out, err = run_cli(*unlearn_args(world_model_dir, data_files, output, "--method", "ihl", "--use_lora", "--lora_r", "4"))
    assert code == 0, err
    assert "saved the ihl LoRA adapter" in out
    record = json.loads((output / "unlearning.json").read_text())
    assert record["method"] == "IHL" and record["artifact"] == "lora" and record["hyperparameters"]["lora"]["r"] == 4
    assert record["data"]["forget"]["path"] == str(data_files / "forget.jsonl") and record["training"]["global_steps"] == 2
    assert (output / "adapter_model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in [output, *output.rglob("*")]:  # readable by others (a serving container), as any file the user writes
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path


def test_a_merged_export_says_it_saved_a_checkpoint(run_cli, world_model_dir, data_files, tmp_path):
    output = tmp_path / "merged"
    code, out, err = run_cli(*unlearn_args(world_model_dir, data_files, output, "--method", "ihl", "--use_lora", "--lora_r", "4",
                                           "--lora_export", "merged"))
    assert code == 0, err
    assert "saved the ihl checkpoint" in out and (output / "model.safetensors").is_file()


@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[r.stem for r in RECIPE_FILES])
def test_every_recipe_parses_into_its_method_config(recipe):
    arguments, config = parse_unlearn_args(["--config", str(recipe)])
    assert arguments.method in recipe.stem and arguments.forget == "locuslab/TOFU:forget10"
    assert type(config) is UNLEARNING_METHODS[arguments.method].config_class
    assert config.learning_rate > 0 and config.output_dir.startswith("outputs/")


def test_recipes_are_found_by_name_too():
    assert RECIPES == REPO / "trainers"
    arguments, config = parse_unlearn_args(["--config", "npo-tofu", "--beta", "0.5", "--output_dir", "x"])
    assert arguments.method == "npo" and config.beta == 0.5 and config.output_dir == "x"  # flags override the recipe


def test_fila_with_a_utility_budget_from_the_command_line(run_cli, world_model_dir, data_files, tmp_path):
    output = tmp_path / "fila"
    code, out, err = run_cli(*unlearn_args(world_model_dir, data_files, output, "--method", "ihl", "--use_lora", "--lora_r", "4",
                                           "--lora_init", "fila", "--learning_rate", "1e-3", "--utility_budget", "0.9"))
    assert code == 0, err
    record = json.loads((output / "unlearning.json").read_text())
    assert json.loads((output / "adapter_config.json").read_text())["r"] == 8  # converted for the unmodified base
    assert record["hyperparameters"]["lora_init"] == "fila" and record["calibration"]["tau"] == 0.9
    retain_rows = len((data_files / "retain.jsonl").read_text().splitlines())
    assert record["calibration"]["probe_size"] == min(32, retain_rows) > 3  # rows, not a slice's column count
    assert record["calibration"]["value"] >= 0.9 * record["calibration"]["original"]


@pytest.mark.skipif(not TOFU.is_dir(), reason="needs ../shared/data/tofu")
@pytest.mark.parametrize("recipe", RECIPE_FILES, ids=[r.stem for r in RECIPE_FILES])
def test_every_recipe_runs_on_local_tofu_data(run_cli, world_model_dir, tmp_path, recipe):
    output = tmp_path / "out"
    reference = ["--eco_reference", world_model_dir] if recipe.stem.startswith("eco") else []  # the recipe names a Hub model
    code, _, err = run_cli("unlearn", "--config", recipe, "--model_name_or_path", world_model_dir,
                           "--forget", f"{TOFU}:forget01", "--retain", f"{TOFU}:retain99", "--output_dir", output,
                           "--max_steps", "1", "--gradient_accumulation_steps", "1", "--disable_tqdm", "true", *reference)
    assert code == 0, err
    record = json.loads((output / "unlearning.json").read_text())
    settings = parse_unlearn_args(["--config", str(recipe)])[0]
    assert canonical_method(record["method"]) == settings.method  # GradAscent, CE-U, ...
    assert record["artifact"] == ("eco" if settings.method == "eco" else "lora" if settings.use_lora else "full")
    assert record["data"]["forget"]["config"] == "forget01" and record["data"]["forget"]["num_rows"] == 40
    if settings.method != "eco":  # ECO trains no weights
        assert record["hyperparameters"]["weight_decay"] == 0.01  # from the recipe


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--method": "forgetful"}, f"unknown method 'forgetful': choose one of {', '.join(UNLEARNING_METHODS)}"),
        ({"--model_name_or_path": "nobody/no-such-model"}, "model 'nobody/no-such-model' not found"),
        ({"--model_name_or_path": "/no/such/folder"}, "model '/no/such/folder' not found"),
        ({"--forget": "{data}/empty.jsonl"}, "forget set is empty"),
        ({"--forget": "{data}/shapeless.jsonl"}, "expected 'question' and 'answer'"),
        ({"--forget": "{data}/missing.jsonl"}, "neither an existing file or folder nor a Hub dataset id"),
        ({"--method": "npo", "--retain": None}, "needs a retain set: pass --retain SPEC (or --retain_loss none)"),
        ({"--method": "pdu", "--retain_epsilon": "0.3", "--retain": None}, "PDU with retain_loss='nll' needs a retain set: pass --retain SPEC"),
        ({"--use_lora": True, "--lora_target_modules": "dense,fc1"}, "no module matches target modules ['dense', 'fc1']"),
        ({"--retain_loss": "mse"}, "invalid choice: 'mse'"),
        ({"--learning_rate": "fast"}, "invalid float value: 'fast'"),
        ({"--config": "no-such-recipe"}, "recipe 'no-such-recipe' not found"),
        ({"--method": None}, "--method is required"),
        ({"--method": ""}, "--method is empty: choose one of ga, "),
        ({"--lora_init": "fila"}, "--lora_init fila initialises a LoRA adapter: add --use_lora"),
        ({"--use_lora": True, "--lora_init": "pissa"}, "invalid choice: 'pissa'"),
        ({"--use_lora": True, "--lora_init": "fila", "--retain": None, "--retain_loss": "none"}, "--lora_init fila (its Fisher pass) needs a retain set"),
        ({"--utility_budget": "1.5"}, "--utility_budget must be in (0, 1]"),
        ({"--utility_budget": "0"}, "--utility_budget must be in (0, 1]"),
        ({"--method": "ga", "--nll_cap": "-1"}, "--nll_cap must be a positive NLL"),
        ({"--fp16": True}, "--fp16 needs a GPU: on the CPU use --bf16"),
        ({"--bf16": True, "--fp16": True}, "--fp16 needs a GPU"),
        ({"--lr_scheduler_type": "reduce_lr_on_plateau"}, "reduce_lr_on_plateau requires an eval strategy"),
        ({"--warmup_steps": "-1"}, "warmup_steps >= 0"),
        ({"--method": "Grad-Descent"}, "unknown method 'Grad-Descent'"),
        ({"--retian": "x"}, "unrecognized argument --retian: did you mean --retain?"),
        ({"--forget": "/dev/null"}, "/dev/null is neither a data file nor a folder"),
        ({"--learning_rate": "-1"}, "--learning_rate must not be negative"),
        ({"--max_steps": "-1", "--num_train_epochs": "0"}, "nothing to train: give --num_train_epochs above 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output_folder(run_cli, world_model_dir, data_files, tmp_path, change, message):
    output = tmp_path / "never"
    flags = {"--method": "ihl", "--model_name_or_path": world_model_dir, "--forget": data_files / "forget.jsonl",
             "--retain": data_files / "retain.jsonl", "--output_dir": output, "--max_steps": 2}
    flags.update({k: v.format(data=data_files) if isinstance(v, str) else v for k, v in change.items()})
    args = [part for flag, value in flags.items() if value is not None for part in ((flag,) if value is True else (flag, value))]
    code, _, err = run_cli("unlearn", *args)
    assert code == 2
    assert_one_error_line(err, message)
    assert not output.exists() and not list(tmp_path.glob(".never*"))


@pytest.mark.parametrize("spelling, method", [("grad_diff", "graddiff"), ("GradDiff", "graddiff"), ("GradAscent", "ga"),
                                             ("grad_ascent", "ga"), ("NPO", "npo"), ("SimNPO", "simnpo"), ("RMU", "rmu"), ("ECO", "eco"),
                                             ("IdkNLL", "idknll"), ("idk", "idknll"), ("IdkDPO", "idkdpo")])
def test_the_fields_method_spellings_are_accepted_and_recorded_canonically(spelling, method, tmp_path):
    arguments, config = parse_unlearn_args(["--method", spelling, "--model_name_or_path", "m", "--forget", "f", "--output_dir", str(tmp_path)])
    assert arguments.method == method
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: {spelling}\nmodel_name_or_path: m\nforget: f\noutput_dir: {tmp_path}\n")
    assert parse_unlearn_args(["--config", str(recipe)])[0].method == method


def test_bf16_without_a_gpu_trains_in_bf16_on_the_cpu(run_cli, world_model_dir, data_files, tmp_path):
    code, out, err = run_cli(*unlearn_args(world_model_dir, data_files, tmp_path / "bf16", "--method", "grad_diff", "--bf16"))
    assert code == 0 and "Traceback" not in err, err
    assert "training in bf16 on the CPU" in err
    record = json.loads((tmp_path / "bf16" / "unlearning.json").read_text())
    assert record["method"] == "GradDiff" and (tmp_path / "bf16" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, suggestion", [
    (["unlearn", "--method", "ihl", "--model_name_or_path", "m", "--forget", "f", "--output_dir", "o", "--retian", "r"], "--retain"),
    (["eval", "--model", "m", "--refrence", "r"], "--reference"),
    (["push", "folder", "--repo_id", "a/b", "--privte"], "--private"),
    (["bench", "run", "--stpes", "3"], "--steps"),
    (["trace", "--model", "m", "--forget", "f", "--windw", "2"], "--window"),
    (["space", "--unlearned", "a/b", "--prot", "7860"], "--port"),
    (["quickstart", "--output_dri", "o"], "--output_dir"),
    (["push", "folder", "--repo-id", "a/b"], "--repo_id"),  # a misspelled required flag is named as such, not as missing
    (["eval", "--modle", "m"], "--model"),
    (["unlearn", "--methd", "ga", "--model_name_or_path", "m"], "--method"),
    (["unlearn", "--method", "ga", "--model_name_or_path", "m", "--forget", "f", "--output_dir", "o", "--learning_rat", "1"],
     "--learning_rate"),  # never silently taken as an abbreviation
    (["bench", "build-tofu", "--autors", "3"], "--authors"),
])
def test_a_misspelled_flag_is_one_line_with_the_closest_flag(run_cli, argv, suggestion):
    code, _, err = run_cli(*argv)
    assert code == 2
    assert_one_error_line(err, f"did you mean {suggestion}?")


def test_non_empty_output_folder_needs_overwrite_and_is_left_untouched(run_cli, world_model_dir, data_files, tmp_path):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    code, _, err = run_cli(*unlearn_args(world_model_dir, data_files, output, "--method", "graddiff"))
    assert code == 2 and "pass --overwrite_output_dir" in err
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    code, _, err = run_cli(*unlearn_args(world_model_dir, data_files, output, "--method", "graddiff", "--overwrite_output_dir"))
    assert code == 0, err
    assert (output / "model.safetensors").is_file() and not (output / "notes.txt").exists()


def test_overlap_and_missing_pad_token_are_warned_about(run_cli, world_model_dir, data_files, tmp_path):
    model_copy = tmp_path / "model"
    shutil.copytree(world_model_dir, model_copy)
    tokenizer_config = json.loads((model_copy / "tokenizer_config.json").read_text())
    tokenizer_config.pop("pad_token", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    code, _, err = run_cli("unlearn", "--method", "graddiff", "--model_name_or_path", model_copy, "--forget", data_files / "forget.jsonl",
                           "--retain", data_files / "forget.jsonl", "--output_dir", tmp_path / "out", "--max_steps", "1", "--disable_tqdm", "true")
    assert code == 0, err
    assert "hubunlearn: warning: the tokenizer has no pad token; padding with its eos token '</s>'" in err
    assert "15 forget examples also appear in the retain set" in err


def test_non_finite_loss_stops_names_the_step_and_keeps_the_last_good_state(run_cli, world_model_dir, data_files, tmp_path):
    output = tmp_path / "exploded"
    code, _, err = run_cli("unlearn", "--method", "ga", "--model_name_or_path", world_model_dir, "--forget", data_files / "forget.jsonl",
                           "--output_dir", output, "--learning_rate", "1e3", "--max_grad_norm", "0", "--max_steps", "30", "--disable_tqdm", "true")
    assert code == 1
    assert_one_error_line(err, f"to {output}")
    record = json.loads((output / "unlearning.json").read_text())
    step = int(err.split("at step ")[1].split(";")[0])
    assert record["stopped"] == {"reason": "non-finite loss", "step": step} and record["training"]["global_steps"] == step - 1
    assert all(torch.isfinite(t).all() for t in load_file(output / "model.safetensors").values())


def test_trace_names_its_own_column_flags_before_loading_the_model(run_cli, data_files, tmp_path):
    code, _, err = run_cli("trace", "--model", "nobody/never-loaded", "--forget", data_files / "shapeless.jsonl", "--output", tmp_path / "t.png")
    assert code == 2
    assert_one_error_line(err, "has columns [input, output]; tracing needs question-answer rows: 'question' and 'answer' (set --question_key/--answer_key)")
    assert "--text_key" not in err  # a flag trace lacks
    code, _, err = run_cli("trace", "--model", "nobody/never-loaded", "--forget", data_files / "shapeless.jsonl", "--question_key", "input",
                           "--answer_key", "output", "--output", tmp_path / "t.png")
    assert code == 2 and "model 'nobody/never-loaded' not found" in err  # the columns were accepted; the model is loaded next


def test_errors_name_the_python_argument_in_the_api_and_the_flag_in_a_command(run_cli, world_model_dir, tmp_path):
    from hubunlearn.errors import UsageError, python_names
    from hubunlearn.evaluate import EvalConfig, reference_statistics

    with pytest.raises(UsageError) as error:
        reference_statistics(EvalConfig(model="m", reference_stats="/no/such.json"), {"forget": []})
    assert str(error.value).startswith("reference_stats /no/such.json does not exist")
    code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--reference_stats", "/no/such.json",
                           "--output_dir", tmp_path / "e")
    assert code == 2 and "hubunlearn: error: --reference_stats /no/such.json does not exist" in err
    assert python_names("--attack bribe; num_authors (--authors) too big; add --retain or --no_null_space") == \
        "attacks bribe; num_authors too big; add retain_dataset or null_space=False"
    quoted = "push it first (hubunlearn push FOLDER --repo_id ORG/NAME) and pass its id to --unlearned"
    assert python_names(quoted) == quoted.replace("to --unlearned", "to unlearned")  # a command line stays as typed


def test_sigterm_landing_in_a_finaliser_is_sent_again_until_it_unwinds():
    """A stop whose exit Python swallows (raised inside a ``__del__``: "Exception ignored") still ends the command: the
    unraisable hook sends SIGTERM again, and the second exit unwinds. Without it, the loop below runs to its end."""
    import signal
    import sys
    import time

    from hubunlearn.artifacts import sigterm_unwinds

    handler, hook = signal.getsignal(signal.SIGTERM), sys.unraisablehook

    class StoppedWhileFinalised:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the finaliser

    with pytest.raises(SystemExit) as stopped:
        with sigterm_unwinds():
            StoppedWhileFinalised()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == (handler, hook)  # both given back
