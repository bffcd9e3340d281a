"""`hubunlearn tune` on the tiny world model: the study's outputs, a best recipe that reruns to the same metrics, pruning,
resuming, the saved best artifact, every method's search space, and bad input."""

import json
import math
import re

import pytest

from hubunlearn.search_spaces import Choice, Float, Int, method_space, restrict
from hubunlearn.trainers import METHODS, UnlearnConfig
from hubunlearn.unlearn import UnlearnArguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = "learning_rate=2e-3:2e-2,max_steps=1:3,beta"  # NPO: a few steps, the learning rate and β


@pytest.fixture(scope="module")
def tofu_like(tmp_path_factory, world):
    """The world as a TOFU-layout folder (forget01, retain, real authors, world facts, with perturbed answers) and
    its training sets as JSONL files."""
    folder = tmp_path_factory.mktemp("tofu-like")
    forget, retain = world.rows("forget"), world.rows("retain")
    known = [{**r, "paraphrased_answer": r["answer"]} for r in retain]  # the world's paraphrases were never taught: truth ratios of
    sets = {"forget01_perturbed": forget, "retain_perturbed": known[:20], "real_authors_perturbed": known[20:30],  # 1 + zero utility
            "world_facts_perturbed": known[30:40], "forget": forget, "retain": retain}
    for name, rows in sets.items():
        (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tune_args(model, data, reference, output, *extra):
    return ["tune", "--model_name_or_path", model, "--forget", data / "forget.json", "--retain", data / "retain.json",
            "--data", data, "--forget_split", "forget01", "--reference", reference, "--output", output,
            "--per_device_train_batch_size", "4", "--eval_batch_size", "64", "--max_new_tokens", "16", *extra]


@pytest.fixture(scope="module")
def tuned(world_model_dir, world_reference_dir, tofu_like, tmp_path_factory):
    """A 3-trial NPO tune whose best trial is saved as an artifact."""
    from hubunlearn.cli import main

    root = tmp_path_factory.mktemp("tune")
    code = main([str(a) for a in tune_args(world_model_dir, tofu_like, world_reference_dir, root / "out", "--method", "npo",
                                            "--trials", "3", "--utility_budget", "0.5", "--space", SPACE, "--seed", "3",
                                            "--budget_check_steps", "0", "--save_best", root / "best-artifact")])
    assert code == 0
    return root


def test_a_tune_writes_the_table_both_plots_and_a_recipe_that_reruns_to_the_same_metrics(run_cli, tuned, world_model_dir,
                                                                                          world_reference_dir, tofu_like):
    import csv

    from matplotlib.image import imread

    output = tuned / "out"
    table = json.loads((output / "trials.json").read_text())
    assert [r["state"] for r in table["trials"]] == ["complete"] * 3 and table["space"]["beta"] == "0.01:1 (log)"
    assert len({json.dumps(r["params"], sort_keys=True) for r in table["trials"]}) == 3  # three different settings
    for row in table["trials"]:
        assert set(row["params"]) == {"learning_rate", "max_steps", "beta"} and 1 <= row["params"]["max_steps"] <= 3
        assert row["steps"] == row["params"]["max_steps"] and row["seconds"] > 0
        assert row["utility_kept"] == pytest.approx(row["model_utility"] / table["original"]["model_utility"])
        assert row["feasible"] == (row["utility_kept"] >= 0.5) and row["objective"] == row["forget_quality"]
    rows = list(csv.DictReader((output / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2] and float(rows[1]["beta"]) == pytest.approx(table["trials"][1]["params"]["beta"])
    if len({r["objective"] for r in table["trials"]}) > 1:  # fANOVA importances of the searched parameters, summing to 1
        assert set(table["importance"]) == {"learning_rate", "max_steps", "beta"} and sum(table["importance"].values()) == pytest.approx(1)
    else:
        assert "different results" in table["importance"]
    for name in ("pareto.png", "importance.png"):
        assert (output / name).read_bytes().startswith(PNG) and imread(output / name).shape[0] > 300

    best = table["best_trial"]
    feasible = [r for r in table["trials"] if r["feasible"]]
    assert best == max(feasible, key=lambda r: r["objective"])["number"]
    trial = table["trials"][best]
    code, _, err = run_cli("unlearn", "--config", output / "best.yaml", "--output_dir", tuned / "rerun", "--disable_tqdm", "true")
    assert code == 0, err
    code, _, err = run_cli("eval", "--model", tuned / "rerun", "--data", tofu_like, "--forget_split", "forget01", "--reference",
                           world_reference_dir, "--metrics", "probability,truth_ratio,rouge,forget_quality,model_utility",
                           "--max_new_tokens", "16", "--output_dir", tuned / "rerun-eval")
    assert code == 0, err
    aggregates = json.loads((tuned / "rerun-eval" / "summary.json").read_text())["aggregates"]
    assert aggregates["forget_quality"]["value"] == pytest.approx(trial["forget_quality"], rel=1e-6)
    assert aggregates["model_utility"]["value"] == pytest.approx(trial["model_utility"], rel=1e-6)

    # --save_best: the same setting rerun, with its evaluation and the search on its record and card.
    record = json.loads((tuned / "best-artifact" / "unlearning.json").read_text())
    assert record["search"]["trials"] == 3 and record["search"]["best_trial"] == best and record["search"]["utility_budget"] == 0.5
    assert record["metrics"]["tofu"]["after"]["forget_quality"] == pytest.approx(trial["forget_quality"], rel=1e-6)
    assert record["metrics"]["tofu"]["before"]["model_utility"] == pytest.approx(table["original"]["model_utility"])
    card = (tuned / "best-artifact" / "README.md").read_text()
    assert "Hyperparameter search" in card and "3 trials" in card and "beta" in card


def test_resuming_adds_trials_and_a_study_of_another_method_is_refused(run_cli, tuned, world_model_dir, world_reference_dir, tofu_like):
    import optuna

    output = tuned / "out"
    # A trial left running by a killed process, and best.yaml run as its header says (into OUTPUT/best-model):
    optuna.load_study(study_name="npo", storage=f"sqlite:///{output / 'study.db'}").ask()
    (output / "best-model").mkdir()
    code, _, err = run_cli(*tune_args(world_model_dir, tofu_like, world_reference_dir, output, "--method", "npo", "--trials", "1",
                                      "--utility_budget", "0.5", "--space", SPACE, "--seed", "3", "--budget_check_steps", "0"))
    assert code == 0, err
    trials = json.loads((output / "trials.json").read_text())["trials"]
    assert [r["number"] for r in trials] == [0, 1, 2, 3, 4] and trials[4]["params"] not in [r["params"] for r in trials[:3]]
    assert [r["state"] for r in trials] == ["complete"] * 3 + ["fail", "complete"]  # the stale trial: failed, not running

    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    for change, message in ((["--method", "graddiff", "--space", "learning_rate,max_steps"], "holds the search of method npo, not graddiff"),
                            (["--method", "npo", "--utility_budget", "0.7"], "was made for another utility budget of npo"),
                            (["--method", "npo", "--space", "learning_rate=1e-3:1e-2,max_steps=1:3,beta"], "another space of npo")):
        args = {"--trials": "1", "--utility_budget": "0.5", "--space": SPACE, "--seed": "3", **dict(zip(change[::2], change[1::2]))}
        code, _, err = run_cli(*tune_args(world_model_dir, tofu_like, world_reference_dir, output, *[x for kv in args.items() for x in kv]))
        assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before  # nothing written


def test_a_trial_below_the_budget_at_a_check_is_pruned(run_cli, world_model_dir, world_reference_dir, tofu_like, tmp_path):
    # Gradient ascent at a high learning rate loses retain probability at once: below a budget of all of it.
    code, out, err = run_cli(*tune_args(world_model_dir, tofu_like, world_reference_dir, tmp_path / "out", "--method", "ga",
                                        "--trials", "1", "--utility_budget", "1.0", "--budget_check_steps", "1",
                                        "--space", "learning_rate=1e-2:2e-2,max_steps=3:4"))
    assert code == 0, err
    table = json.loads((tmp_path / "out" / "trials.json").read_text())
    (trial,) = table["trials"]
    assert trial["state"] == "pruned" and trial["pruned_at_step"] == math.ceil(trial["params"]["max_steps"] / 2) and trial["utility_kept"] < 1.0
    assert trial["forget_quality"] is None and not trial["feasible"] and table["best_trial"] is None
    assert not (tmp_path / "out" / "best.yaml").exists() and "no trial kept model utility within the budget" in out
    assert (tmp_path / "out" / "pareto.png").read_bytes().startswith(PNG)
    assert not list((tmp_path / "out").glob(".trial-*"))  # the pruned trial's folder is gone


def test_every_method_declares_its_search_space():
    names = {f for f in UnlearnConfig.__dataclass_fields__} | set(UnlearnArguments.__dataclass_fields__)
    common = set(UnlearnConfig.search_space)
    for method, trainer in METHODS.items():
        config = trainer.config_class
        space = method_space(config, use_lora=True)
        assert set(space) <= names | set(config.__dataclass_fields__), method
        assert {"max_steps", "lora_r"} <= set(space) and {"learning_rate", "relative_step"} & set(space), method
        for dimension in space.values():
            assert isinstance(dimension, (Float, Int, Choice))
            if not isinstance(dimension, Choice):
                assert dimension.low < dimension.high and (dimension.low > 0 or not dimension.log), method
        own = [f.name for f in config.__dataclass_fields__.values()
               if f.name not in UnlearnConfig.__dataclass_fields__ and f.type == "float" and f.default is not None]
        if own:  # a method with numbers of its own searches at least one of them
            assert set(config.search_space) - common, f"{method} declares no search space of its own ({', '.join(own)})"


def test_every_value_of_every_search_space_is_one_its_method_accepts(tmp_path):
    """Each dimension at both ends of its range builds the method's config (a trial never fails on a setting its own
    space chose: PDU refuses --retain_weight, so its space searches the dual variable's start instead)."""
    from hubunlearn.benchmarking import REQUIRED_SETTINGS

    for method, trainer in METHODS.items():
        config = trainer.config_class
        for name, dimension in method_space(config).items():
            for value in ((dimension.low, dimension.high) if not isinstance(dimension, Choice) else dimension.choices):
                config(output_dir=str(tmp_path), **REQUIRED_SETTINGS.get(method, {}), **{name: value})


def test_a_space_is_restricted_and_re_ranged_by_name():
    from hubunlearn.errors import UsageError

    space = method_space(METHODS["npo"].config_class)
    chosen = restrict(space, "beta=0.05:0.5,learning_rate")
    assert chosen == {"beta": Float(0.05, 0.5, log=True), "learning_rate": space["learning_rate"]}
    assert "retain_weight" not in method_space(METHODS["ga"].config_class)  # GA trains no retain term
    for text, message in (("gamma", "unknown search-space parameter 'gamma' in space: choose from learning_rate, max_steps, retain_weight, beta"),
                          ("beta=1:0.1", "the range 1:0.1 is empty"), ("max_steps=a:b", "is not a range"),
                          ("learning_rate=0:1", "a log-scale range must start above 0"),
                          ("beta= ,learning_rate", "space beta= gives no range: write beta=LOW:HIGH (or choices A|B), or beta alone"),
                          ("beta=1:inf", "'1:inf' is not a range: write LOW:HIGH (finite float values)"),
                          ("beta=nan:1", "'nan:1' is not a range"), ("beta=1:2,beta=3:4", "space names beta twice")):
        with pytest.raises(UsageError, match=re.escape(message)):
            restrict(space, text)


@pytest.mark.parametrize("change, message", [
    ({"--objective": "forget_qualty"}, "unknown objective 'forget_qualty': choose one of forget_quality, forget_truth_ratio"),
    ({"--space": "learning_rate,gamma"}, "unknown search-space parameter 'gamma' in --space: choose from learning_rate, max_steps, retain_weight, beta"),
    ({"--utility_budget": "0"}, "--utility_budget must be in (0, 1]"),
    ({"--utility_budget": "1.5"}, "--utility_budget must be in (0, 1]"),
    ({"--reference": None}, "the forget_quality objective compares with a reference model: add --reference MODEL"),
    ({"--trials": "0"}, "--trials must be at least 1; got 0"),
    ({"--trials": "-2"}, "--trials must be at least 1; got -2"),
    ({"--method": "forgetful"}, "unknown method 'forgetful': choose one of ga, "),
    ({"--method": "eco"}, "eco trains no weights"),
    ({"--output_dir": "x"}, "--output_dir is not an unlearn flag of tune"),
    ({"--beta": "0.2"}, "--beta is searched: drop the flag, or leave beta out of --space"),
    ({"--learning_rat": "1e-4"}, "unrecognized argument --learning_rat: did you mean --learning_rate?"),
    ({"--trails": "3"}, "unrecognized argument --trails: did you mean --trials? (see hubunlearn tune --help)"),
    ({"--study": "{tmp}/not-a-study.db"}, "is not an Optuna study file"),
    ({"--output": "{tmp}/foreign"}, "holds other files (notes.txt, ...): choose an empty folder or an earlier tune's"),
    ({"--model_name_or_path": "{tmp}/no-model"}, "--model_name_or_path {tmp}/no-model is neither a model folder nor a Hub id"),
    ({"--reference": "{tmp}/no-reference"}, "--reference {tmp}/no-reference is neither a model folder nor a Hub id"),
    ({"--save_best": "{tmp}/foreign"}, "--save_best {tmp}/foreign already exists and is not an empty folder: choose a new one"),
])
def test_bad_tune_input_is_one_line_exit_2_and_nothing_written(run_cli, world_model_dir, tofu_like, tmp_path, change, message):
    (tmp_path / "not-a-study.db").write_text("hello")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    flags = {"--method": "npo", "--model_name_or_path": world_model_dir, "--forget": tofu_like / "forget.json",
             "--retain": tofu_like / "retain.json", "--data": tofu_like, "--reference": "nobody/never-loaded",
             "--output": tmp_path / "never", "--trials": "3"}
    flags.update({k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in change.items()})
    code, _, err = run_cli("tune", *[part for flag, value in flags.items() if value is not None for part in (flag, value)])
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hubunlearn: error: ") and message.format(tmp=tmp_path) in last and "Traceback" not in err, err
    assert not (tmp_path / "never").exists() and (tmp_path / "not-a-study.db").read_text() == "hello"
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]


def test_several_methods_get_a_study_each_and_a_comparison(run_cli, world_model_dir, world_reference_dir, tofu_like, tmp_path):
    code, out, err = run_cli(*tune_args(world_model_dir, tofu_like, world_reference_dir, tmp_path / "out", "--method", "GradAscent,npo",
                                        "--trials", "1", "--utility_budget", "0.3", "--budget_check_steps", "0",
                                        "--space", "learning_rate=1e-3:3e-3,max_steps=1:2"))
    assert code == 0, err
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["method"] for r in comparison["methods"]] == ["ga", "npo"] and "| ga | 1 (0) |" in out
    for row in comparison["methods"]:
        trials = json.loads((tmp_path / "out" / row["method"] / "trials.json").read_text())
        assert trials["method"] == row["method"] and len(trials["trials"]) == 1
        assert row["objective"] == (trials["trials"][0]["objective"] if trials["trials"][0]["feasible"] else None)
    from hubunlearn.tune import require_optuna

    assert sorted(require_optuna().get_all_study_names(f"sqlite:///{tmp_path / 'out' / 'study.db'}")) == ["ga", "npo"]


def test_without_optuna_the_command_says_how_to_install_it(run_cli, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets when it is not installed
    code, _, err = run_cli("tune", "--method", "npo", "--output", tmp_path / "never")
    assert code == 2 and err.strip().splitlines()[-1] == ("hubunlearn: error: hubunlearn tune needs Optuna, which is not installed: "
                                                          "pip install 'hubunlearn[tune]'")
    assert not (tmp_path / "never").exists()


def test_bench_tuned_rows_are_the_best_trial_of_a_search_measured_like_the_others(run_cli, world_model_dir, world_reference_dir,
                                                                                  tofu_like, tmp_path):
    from transformers import AutoModelForCausalLM

    from hubunlearn.bench import BENCH_BEGIN, BENCH_END, results_path, table

    mini = tmp_path / "mini"  # the world as a built TOFU-mini (`bench run --tofu_mini`): its data, target and reference
    (mini / "data").mkdir(parents=True)
    for source in tofu_like.glob("*.json"):
        (mini / "data" / source.name.replace("forget.json", "forget01.json")).write_text(source.read_text())
    (mini / "target").symlink_to(world_model_dir)
    (mini / "reference").symlink_to(world_reference_dir)
    (mini / "tofu_mini.json").write_text(json.dumps({"settings": {"forget_split": "forget01"},
                                                     "parameter_count": AutoModelForCausalLM.from_pretrained(world_model_dir).num_parameters()}))
    results_dir, readme = tmp_path / "results", tmp_path / "README.md"
    results_dir.mkdir()
    readme.write_text(f"# x\n{BENCH_BEGIN}\nold\n{BENCH_END}\n")
    common = ["--tofu_mini", mini, "--split", "forget01", "--steps", "3", "--max_eval_examples", "8", "--no_scaling",
              "--results_dir", results_dir, "--tau", "0.5"]
    code, _, err = run_cli("bench", "run", "--methods", "eco", *common)
    assert code == 0, err
    tuned = ["--methods", "npo", "--tune_trials", "2", "--tune_eval_examples", "4", "--no_shared"]
    code, out, err = run_cli("bench", "run", *tuned, "--readme", readme, *common)
    assert code == 0, err
    results = json.loads(results_path(results_dir, "cpu").read_text())
    assert [(r["method"], r["tau"], "tuned" in r) for r in results["runs"]] == [("npo", None, True), ("eco", None, False)]
    row, search = results["runs"][0], results["runs"][0]["tuned"]
    assert search["trials"] == 2 and len(search["history"]) == 2 and search["eval_examples"] == 4
    assert search["params"] is not None, search  # half the utility: the world model keeps it at these settings
    # the row is trained again with the best trial's setting and measured on all 8 rows per set; on the search's 4 it
    # reproduces the search's numbers, and the next 4 (rows the search never saw) are measured alike
    assert row["steps"] == search["params"]["max_steps"]
    check = row["held_out"]
    searched = {key: check["searched"][key] for key in ("forget_quality", "utility_kept")}
    assert check["rows"] == 4 and searched == pytest.approx({"forget_quality": search["search_forget_quality"],
                                                                       "utility_kept": search["search_utility_kept"]}, rel=1e-3)
    assert 0 <= check["held_out"]["forget_quality"] <= 1 and check["held_out"]["utility_kept"] > 0
    assert all(0 <= check[part]["original_forget_quality"] <= 1 for part in ("searched", "held_out"))
    text = table(results)
    assert "Tuned: each method at the best of its `hubunlearn tune` trials" in text and "| npo | 2 (" in text and "orders" in text
    assert "(4 rows each) |" in text
    assert f"{BENCH_BEGIN}\n{text}\n{BENCH_END}" in readme.read_text() and text in out
    assert (results_dir / "pareto_cpu.png").read_bytes().startswith(PNG)
    # --reuse_searches: the row is trained and measured again at the file's search's setting, with no new trial
    code, _, err = run_cli("bench", "run", *tuned, "--reuse_searches", *common)
    assert code == 0 and "the file's search (2 trials), trained and measured again" in err, err
    again = json.loads(results_path(results_dir, "cpu").read_text())["runs"][0]
    assert again["tuned"] == search
    assert all(again["held_out"][part] == pytest.approx(check[part], rel=1e-3) for part in ("searched", "held_out"))
    assert again["forget_quality"] == pytest.approx(row["forget_quality"], rel=1e-3)


def test_random_startup_trials_are_a_third_of_the_study_three_to_ten():
    from hubunlearn.tune import startup_trials

    assert [startup_trials(n) for n in (1, 8, 9, 20, 30, 31, 200)] == [3, 3, 3, 6, 10, 10, 10]
