"""Evaluation during training (--eval_forget_quality_every) and --keep_best (hubunlearn/trainers/monitoring.py)."""

import json

import pytest
from transformers import TrainerCallback

from .test_cli import assert_one_error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = 4
TAU = 0.9


@pytest.fixture(scope="module")
def tofu_like(tmp_path_factory, world):
    """The world's rows laid out like locuslab/TOFU (forget01 = the forget people), with paraphrased and perturbed answers."""
    folder = tmp_path_factory.mktemp("tofu-like")
    for name, rows in (("forget01_perturbed", world.rows("forget")), ("retain_perturbed", world.rows("retain")),
                       ("real_authors_perturbed", world.rows("retain")), ("world_facts_perturbed", world.rows("retain"))):
        (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


class SaveEvaluatedStates(TrainerCallback):
    """Saves the weights each evaluation saw, as a normal checkpoint folder, so they can be evaluated on their own."""

    def __init__(self, folder):
        self.folder = folder

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        model.save_pretrained(self.folder / f"step-{state.global_step}")
        processing_class.save_pretrained(self.folder / f"step-{state.global_step}")


@pytest.fixture(scope="module")
def run(world_model_dir, world, tofu_like, tmp_path_factory):
    """GradDiff for 6 steps, evaluated every 2 (and at the start), keeping the lowest forget answer probability within a
    utility budget of 0.9 (this learning rate crosses it between steps 4 and 6); the reference is the original."""
    from hubunlearn.trainers import GradDiffConfig, GradDiffTrainer

    folder = tmp_path_factory.mktemp("eval-during-training")
    config = GradDiffConfig(output_dir=str(folder / "artifact"), max_steps=6, learning_rate=1.5e-3, lr_scheduler_type="constant",
                            per_device_train_batch_size=4, eval_forget_quality_every=2, eval_reference=str(world_model_dir),
                            eval_data=str(tofu_like), eval_forget_split="forget01", eval_examples=EXAMPLES,
                            keep_best="forget_probability", utility_budget=TAU, utility_metric="probability", utility_probe_size=8,
                            report_to="none", disable_tqdm=True, seed=0)
    trainer = GradDiffTrainer(str(world_model_dir), config, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                              callbacks=[SaveEvaluatedStates(folder)])
    trainer.train()
    trainer.save_model()
    logged = {h["step"]: h for h in trainer.state.log_history if "eval_forget_quality" in h}
    return folder, logged, trainer


def cli_eval(run_cli, model, tofu_like, reference, output):
    code, _, err = run_cli("eval", "--model", model, "--data", tofu_like, "--forget_split", "forget01", "--max_examples", EXAMPLES,
                           "--metrics", "probability,truth_ratio,forget_quality", "--reference", reference, "--batch_size", 8,
                           "--output_dir", output)
    assert code == 0, err
    return json.loads((output / "summary.json").read_text()), err


def eval_numbers(summary):
    sets = summary["sets"]
    return {"eval_forget_quality": summary["aggregates"]["forget_quality"]["value"],
            "eval_forget_truth_ratio": sets["forget"]["truth_ratio"], "eval_forget_probability": sets["forget"]["probability"],
            "eval_retain_probability": sets["retain"]["probability"], "eval_retain_truth_ratio": sets["retain"]["truth_ratio"]}


def test_the_logged_numbers_at_a_step_are_those_of_hubunlearn_eval_of_that_state(run, run_cli, world_model_dir, tofu_like, tmp_path):
    folder, logged, trainer = run
    assert sorted(logged) == [0, 2, 4, 6]  # at the start (a --keep_best candidate), every 2 steps
    assert logged[0]["eval_forget_quality"] == 1.0 and logged[2]["eval_forget_quality"] < 1  # the original is its own reference
    summary, err = cli_eval(run_cli, folder / "step-2", tofu_like, world_model_dir, tmp_path / "eval")
    assert "reusing the reference statistics" in err  # the statistics the run cached, under eval's own key
    assert {k: logged[2][k] for k in eval_numbers(summary)} == pytest.approx(eval_numbers(summary), rel=1e-6)


def test_keep_best_restores_the_best_state_within_the_budget(run, run_cli, world_model_dir, tofu_like, tmp_path):
    folder, logged, trainer = run
    within = {step: h for step, h in logged.items() if h["eval_utility_kept"] >= TAU}
    assert within.keys() != logged.keys()  # the budget ruled a state out
    best = min(within, key=lambda step: (within[step]["eval_forget_probability"], step))
    assert best not in (0, max(logged))  # neither the start nor the end: the choice mattered

    record = json.loads((folder / "artifact" / "unlearning.json").read_text())
    kept = record["evaluation_during_training"]["keep_best"]
    assert kept["step"] == best and kept["value"] == logged[best]["eval_forget_probability"] and kept["utility_budget"] == TAU
    assert [h["step"] for h in record["evaluation_during_training"]["history"]] == [0, 2, 4, 6]
    assert record["calibration"]["alpha"] == 1  # the kept state is within the budget: nothing to mix
    assert f"**These weights are the state of step {best}**" in (folder / "artifact" / "README.md").read_text()
    assert f"--keep_best forget_probability: kept step {best} " in trainer.summary()

    summary, _ = cli_eval(run_cli, folder / "artifact", tofu_like, world_model_dir, tmp_path / "eval")
    assert {k: logged[best][k] for k in eval_numbers(summary)} == pytest.approx(eval_numbers(summary), rel=1e-6)


@pytest.fixture(scope="module")
def plain_rows(tmp_path_factory, world):
    """Question-answer rows without paraphrased or perturbed answers."""
    path = tmp_path_factory.mktemp("plain") / "forget.jsonl"
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in world.rows("forget")))
    return path


EVALUATING = {"--eval_forget_quality_every": "2", "--eval_reference": "{model}"}


@pytest.mark.parametrize("change, message", [
    ({"--keep_best": "loss", **EVALUATING}, "unknown --keep_best 'loss'; choose one of: forget_quality, forget_truth_ratio, "
                                            "forget_probability, model_utility"),
    ({"--keep_best": "forget_probability"}, "--keep_best forget_probability picks among the evaluations during training: add "
                                            "--eval_forget_quality_every N"),
    ({"--keep_best": "forget_quality", **EVALUATING, "--utility_budget": "1.5"}, "--utility_budget must be in (0, 1]"),
    ({"--keep_best": "forget_quality", **EVALUATING, "--utility_budget": "0"}, "--utility_budget must be in (0, 1]"),
    ({"--eval_forget_quality_every": "2"}, "--eval_forget_quality_every: forget quality needs a reference: add --eval_reference MODEL"),
    ({"--eval_strategy": "steps", "--eval_steps": "2", "--keep_best": "forget_quality"},
     "--keep_best forget_quality: forget quality needs a reference: add --eval_reference MODEL"),
    ({"--eval_forget_quality_every": "2", "--eval_reference_stats": "{data}/missing.json"}, "--eval_reference_stats"),
    ({**EVALUATING, "--eval_reference_stats": "{data}/forget.jsonl"}, "give one of --eval_reference and --eval_reference_stats"),
    ({**EVALUATING, "--eval_model_utility": True}, "model utility needs the real_authors and world_facts sets: give --eval_data"),
    ({**EVALUATING, "--eval_forget_quality_every": "-1"}, "--eval_forget_quality_every must be at least 0"),
    ({**EVALUATING, "--eval_data": "{data}", "--eval_forget_split": "forget99"}, "unknown split 'forget99'"),
    ({**EVALUATING, "--keep_best": "forget_truth_ratio", "--forget": "{plain}"},
     "--keep_best forget_truth_ratio needs truth ratios, and the forget rows of the run's own forget and retain rows have no"),
    ({**EVALUATING, "--method": "task_vector"}, "evaluation during training does not apply to TaskVector, which makes its artifact"),
    ({**EVALUATING, "--method": "eco"}, "evaluation during training does not apply to ECO, which trains no weights"),
])
def test_bad_input_is_one_line_exit_2_and_no_output_folder(run_cli, world_model_dir, data_files, plain_rows, tmp_path, change, message):
    output = tmp_path / "never"
    flags = {"--method": "graddiff", "--model_name_or_path": world_model_dir, "--forget": data_files / "forget.jsonl",
             "--retain": data_files / "retain.jsonl", "--output_dir": output, "--max_steps": 2}
    flags.update({k: v.format(data=data_files, model=world_model_dir, plain=plain_rows) if isinstance(v, str) else v for k, v in change.items()})
    args = [part for flag, value in flags.items() if value is not None for part in ((flag,) if value is True else (flag, value))]
    code, _, err = run_cli("unlearn", *args)
    assert code == 2
    assert_one_error_line(err, message)
    assert not output.exists() and not list(tmp_path.glob(".never*"))


def test_under_two_processes_the_main_one_evaluates_and_both_restore_the_same_state(world_model_dir, tmp_path):
    from .test_accelerate import launch

    ranks = launch(world_model_dir, tmp_path / "ddp", tmp_path / "records", script="ddp_eval_during_training.py")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [h["step"] for h in ranks[0]["logged"]] == [0, 2]
    # every evaluation pass (and the reference's, unless an earlier run cached it) on the main process only
    assert ranks[0]["passes"] - 2 in (0, 1) and ranks[1]["passes"] == 0
    assert ranks[1]["logged"] == ranks[0]["logged"] and ranks[1]["kept"] == ranks[0]["kept"]  # the same numbers reach every process
    assert ranks[0]["kept"]["step"] > 0 and ranks[1]["weights"] == ranks[0]["weights"]
    record = json.loads((tmp_path / "ddp" / "unlearning.json").read_text())
    assert record["evaluation_during_training"]["keep_best"]["step"] == ranks[0]["kept"]["step"]


def test_rows_without_perturbed_answers_log_what_they_can_and_say_so_once(world_model_dir, world, plain_rows, tmp_path, caplog):
    """The Trainer's own --eval_strategy runs the same evaluation; without a reference and without paraphrased and
    perturbed forget answers, the answer probabilities (and the retain truth ratio) are logged, the rest said once."""
    from hubunlearn.data import load_rows
    from hubunlearn.trainers import GradDiffConfig, GradDiffTrainer

    config = GradDiffConfig(output_dir=str(tmp_path / "out"), max_steps=2, eval_strategy="steps", eval_steps=1, eval_examples=2,
                            per_device_train_batch_size=2, report_to="none", disable_tqdm=True)
    trainer = GradDiffTrainer(str(world_model_dir), config, forget_dataset=load_rows(str(plain_rows)), retain_dataset=world.rows("retain"))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "eval_forget_probability" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert all({k for k in h if k.startswith("eval_")} == {"eval_forget_probability", "eval_retain_probability",
                                                             "eval_retain_truth_ratio"} for h in logged)
    said = [r.getMessage() for r in caplog.records if "evaluation during training: no forget_truth_ratio" in r.getMessage()]
    assert len(said) == 1 and "have no paraphrased_answer/perturbed_answer" in said[0]
    assert trainer.record_extras["evaluation_during_training"]["reference"] is None


def test_keeping_the_starting_weights_is_said(world_model_dir, world, tofu_like, tmp_path, caplog):
    """A learning rate of zero leaves every state equal to the start: ties keep step 0, and the run says nothing was unlearned."""
    from hubunlearn.trainers import GradDiffConfig, GradDiffTrainer

    config = GradDiffConfig(output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=0.0, eval_forget_quality_every=1,
                            eval_reference=str(world_model_dir), eval_data=str(tofu_like), eval_forget_split="forget01",
                            eval_examples=4, keep_best="forget_quality", per_device_train_batch_size=2, report_to="none",
                            disable_tqdm=True)
    trainer = GradDiffTrainer(str(world_model_dir), config, forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"))
    trainer.train()
    assert trainer.record_extras["evaluation_during_training"]["keep_best"]["step"] == 0
    assert any("kept the starting weights (step 0)" in r.getMessage() for r in caplog.records)
