"""Defaults that never silently wreck a model (issue 16.3) and the output a person reads at the end of a run (issue 17).

Every run measures the forget and retain answer probability before and after; one that keeps less than 0.8x of the
retain one ends with a warning and a non-zero "utility lost" in unlearning.json and on the card; the CLI's utility
guard stops and mixes back before that. Checked on three small Llamas of other shapes than the world model's.
"""

import json

import pytest
import torch

from hubunlearn.benchmarking import REQUIRED_SETTINGS
from hubunlearn.trainers import METHODS, KUDAConfig, KUDATrainer, RMUConfig, RMUTrainer
from hubunlearn.trainers.base import UTILITY_FLOOR
from hubunlearn.trainers.representation import RELATIVE_STEP

SHAPES = {"h32x1": (32, 1), "h64x3": (64, 3), "h48x6": (48, 6)}  # (hidden size, layers): none is the world model's


def shaped_model(tokenizer, shape):
    from hubunlearn.world import tiny_llama

    hidden, layers = SHAPES[shape]
    return tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, seed=0)


def test_defaults_keep_the_retain_set_or_say_so_on_three_shapes(tokenizer, forget_rows, retain_rows, tmp_path, caplog):
    """Each method at its defaults (two steps) on one of three tiny Llamas of other shapes (in turn), and on each shape
    a run that wrecks it on purpose: every run records its before/after figures, and those below 0.8x of the retain
    answer probability end with the warning, the utility-lost figure, and the card's warning."""
    shapes = list(SHAPES)
    runs = [(shapes[i % 3], method, {"max_steps": 2}) for i, method in enumerate(METHODS)]
    runs += [(shape, "ga", {"max_steps": 4, "learning_rate": 3e-2}) for shape in shapes]
    for index, (shape, method, settings) in enumerate(runs):
        caplog.clear()
        trainer_class = METHODS[method]
        extra = {"trace_examples": 4} if method == "kuda" else {}  # tracing's cost, not its defaults, is under test elsewhere
        args = trainer_class.config_class(output_dir=str(tmp_path / str(index)), use_cpu=True, disable_tqdm=True, report_to="none",
                                          utility_probe_size=8, **extra, **REQUIRED_SETTINGS.get(method, {}), **settings)
        trainer = trainer_class(model=shaped_model(tokenizer, shape), args=args, forget_dataset=forget_rows[:8],
                                retain_dataset=retain_rows[:8], processing_class=tokenizer)
        trainer.train()
        utility = trainer.record_extras["utility"]
        kept = utility["retain"]["after"] / utility["retain"]["before"]
        assert utility["retain_kept"] == pytest.approx(kept) and utility["utility_lost"] == pytest.approx(max(0.0, 1 - kept))
        warned = "keeps only" in caplog.text
        assert warned == ("warning" in utility) == (kept < UTILITY_FLOOR), (shape, method, kept)
        if "learning_rate" not in settings:
            continue
        assert warned and utility["utility_lost"] > 1 - UTILITY_FLOOR, f"GA at lr 3e-2 kept {kept:.2f} of the retain set on {shape}"
        assert "WARNING: utility lost" in trainer.summary()
        trainer.save_model()
        card = (tmp_path / str(index) / "README.md").read_text()
        assert f"utility lost: {utility['utility_lost']:.1%}" in card and "**Warning: the unlearned model keeps only" in card


def test_kuda_and_rmu_defaults_follow_the_models_depth_and_scale(tokenizer, forget_rows, retain_rows, tmp_path):
    """The learning rate is a share of the trained weights' RMS, RMU's layer a third of the depth and its steering
    coefficient 4x the activation norm there, KUDA's window one layer per 8: all move with the model, none is fixed."""
    from hubunlearn.world import tiny_llama

    def rmu(model):
        return RMUTrainer(model=model, args=RMUConfig(output_dir=str(tmp_path / "rmu"), use_cpu=True, report_to="none"),
                          forget_dataset=forget_rows, retain_dataset=retain_rows[:10], processing_class=tokenizer)

    shallow, deep = tiny_llama(tokenizer, hidden_size=32, num_layers=3), tiny_llama(tokenizer, hidden_size=32, num_layers=12)
    runs = {"shallow": rmu(shallow), "deep": rmu(deep)}
    assert (runs["shallow"].layer, runs["shallow"].trainable_layers) == (1, [0, 1])
    assert (runs["deep"].layer, runs["deep"].trainable_layers) == (4, [2, 3, 4])
    # the same model with every residual contribution 3x larger: activations, coefficient and down-projections scale
    louder = tiny_llama(tokenizer, hidden_size=32, num_layers=12)
    with torch.no_grad():
        for name, parameter in louder.named_parameters():
            if name.endswith(("embed_tokens.weight", "o_proj.weight", "down_proj.weight")):
                parameter.mul_(3)
    runs["louder"] = rmu(louder)
    coefficient = {name: trainer.record_extras["rmu"]["steering_coefficient"] for name, trainer in runs.items()}
    assert coefficient["louder"] == pytest.approx(3 * coefficient["deep"], rel=1e-3)
    for name, trainer in runs.items():
        trained = [p for p in trainer.model.parameters() if p.requires_grad]
        rms = float(torch.cat([p.detach().flatten() for p in trained]).pow(2).mean().sqrt())
        assert trainer.args.learning_rate == pytest.approx(RELATIVE_STEP["RMU"] * rms), name
    assert runs["louder"].args.learning_rate > 1.5 * runs["deep"].args.learning_rate

    for model, window in ((shallow, 1), (deep, 2)):
        args = KUDAConfig(output_dir=str(tmp_path / "kuda"), use_cpu=True, report_to="none", trace_examples=4, trace_samples=1)
        trainer = KUDATrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows[:10], processing_class=tokenizer)
        assert len(trainer.layers) == window and trainer.layers == list(range(trainer.layers[0], trainer.layers[0] + window))
        down = torch.cat([trainer.ffn.downs[i].weight.detach().flatten() for i in trainer.layers])
        assert trainer.args.learning_rate == pytest.approx(RELATIVE_STEP["KUDA"] * float(down.pow(2).mean().sqrt()))
        assert trainer.record_extras["learning_rate"]["chosen_by"] == "relative_step × weight RMS"
    explicit = RMUTrainer(model=shallow, args=RMUConfig(output_dir=str(tmp_path / "x"), use_cpu=True, learning_rate=1e-3),
                          forget_dataset=forget_rows, retain_dataset=retain_rows[:10], processing_class=tokenizer)
    assert explicit.args.learning_rate == 1e-3 and "learning_rate" not in explicit.record_extras  # an explicit rate is kept


def test_unlearn_ends_with_a_summary_and_guards_utility(run_cli, world_model_dir, data_files, tmp_path):
    """No dict per step; a summary at the end (--no_summary: none); the CLI's guard stops a run that would wreck the
    retain set, and without it (--no_utility_guard) the run ends with the warning and the utility-lost figure."""
    common = ["unlearn", "--model_name_or_path", world_model_dir, "--forget", data_files / "forget.jsonl",
              "--retain", data_files / "retain.jsonl"]
    wreck = ["--method", "ga", "--learning_rate", "1e-2", "--max_steps", "10", "--lr_scheduler_type", "constant"]
    code, out, err = run_cli(*common, *wreck, "--output_dir", tmp_path / "guarded")
    assert code == 0, err
    assert "{'loss'" not in out + err and "'train_runtime'" not in out + err  # no dict per step, nor the final one
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("answer probability")))
    assert lines[header - 1].startswith("GradAscent: ") and " steps in " in lines[header - 1] and "final loss: forget" in lines[header - 1]
    assert lines[header + 1].split()[:3] == ["forget", "(15", "ex.)"] and lines[header + 2].split()[:3] == ["retain", "(32", "ex.)"]
    record = json.loads((tmp_path / "guarded" / "unlearning.json").read_text())
    calibration, utility = record["calibration"], record["utility"]
    assert calibration["tau"] == 0.8 and calibration["metric"] == "retain probability"
    assert calibration["early_stopping"]["stopped_at_step"] is not None or calibration["alpha"] < 1  # the guard acted
    assert utility["retain_kept"] >= 0.8 and "warning" not in utility and "keeps only" not in err
    assert lines[header + 3].startswith("utility budget 0.8× (retain probability): ")

    code, out, err = run_cli(*common, *wreck, "--no_utility_guard", "--no_summary", "--output_dir", tmp_path / "unguarded")
    assert code == 0, err
    record = json.loads((tmp_path / "unguarded" / "unlearning.json").read_text())
    assert "calibration" not in record and record["utility"]["utility_lost"] > 0.2
    assert "warning: the unlearned model keeps only" in err and "answer probability" not in out and "GradAscent:" not in out
    card = (tmp_path / "unguarded" / "README.md").read_text()
    assert f"utility lost: {record['utility']['utility_lost']:.1%}" in card and "**Warning: the unlearned model keeps only" in card
