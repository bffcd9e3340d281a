"""Unlearning with Control: mixing endpoints, calibration to a budget, likelihood capping, early stopping."""

import json

import pytest
import torch
from peft import LoraConfig

from hubunlearn.controls import ModelMixer, calibrate, mix_state_dicts
from hubunlearn.errors import UsageError
from hubunlearn.trainers import GradDiffTrainer, IHLTrainer
from hubunlearn.trainers.losses import capped_gradient_ascent_loss, gradient_ascent_loss

from .test_trainers import config


def logits_of(model, tokenizer, rows):
    inputs = tokenizer([r["question"] for r in rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_mixing_endpoints_full_and_lora(model, tokenizer, forget_rows, retain_rows, world_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(world_model_dir)
    expected_original = logits_of(original, tokenizer, forget_rows)
    # LoRA on an embedding too: its delta lives in lora_embedding_B, which baking must scale as well
    for peft in (None, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"], task_type="CAUSAL_LM")):
        trainer = GradDiffTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir), args=config(GradDiffTrainer, tmp_path / "out"),
                                  forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=peft)
        trainer.train()
        unlearned = logits_of(trainer.model, tokenizer, forget_rows)
        assert (unlearned - expected_original).abs().max() > 1e-2
        mixer = ModelMixer(trainer.model, None if peft else original.state_dict())
        mixer.set_alpha(0.0)
        torch.testing.assert_close(logits_of(trainer.model, tokenizer, forget_rows), expected_original, atol=1e-4, rtol=0)
        mixer.set_alpha(1.0)
        torch.testing.assert_close(logits_of(trainer.model, tokenizer, forget_rows), unlearned, atol=1e-4, rtol=0)
        mixer.set_alpha(0.5)
        half = logits_of(trainer.model, tokenizer, forget_rows)
        mixer.bake()  # the adapter (or weights) now encode alpha = 0.5 for good
        torch.testing.assert_close(logits_of(trainer.model, tokenizer, forget_rows), half, atol=1e-4, rtol=0)


def test_mixing_refuses_different_architectures():
    a = {"w": torch.zeros(2, 2), "b": torch.zeros(2)}
    with pytest.raises(UsageError, match="different architectures: w is \\(2, 2\\) in one and \\(3, 2\\)"):
        mix_state_dicts(a, {"w": torch.zeros(3, 2), "b": torch.zeros(2)}, 0.5)
    with pytest.raises(UsageError, match="appear in only one"):
        mix_state_dicts(a, {"w": torch.zeros(2, 2)}, 0.5)
    torch.testing.assert_close(mix_state_dicts(a, {"w": torch.ones(2, 2), "b": torch.ones(2)}, 0.25)["w"], torch.full((2, 2), 0.25))


def test_calibrate_finds_the_largest_alpha_within_budget():
    metric = lambda alpha: 1.0 - alpha ** 2  # noqa: E731  retain metric falls as alpha grows; original 1.0
    alpha, curve = calibrate(metric, 1.0, tau=0.9, iterations=12)
    assert metric(alpha) >= 0.9 and metric(alpha + 2 ** -11) < 0.9 and alpha == pytest.approx(0.1 ** 0.5, abs=1e-3)
    assert [a for a, _ in curve] == sorted(a for a, _ in curve) and (1.0, 0.0) in curve
    assert calibrate(lambda alpha: 1.0, 1.0, tau=0.9) == (1.0, [(1.0, 1.0)])  # no cost: keep the unlearned model


def test_calibrate_returns_the_original_when_nothing_meets_the_budget(caplog):
    alpha, curve = calibrate(lambda alpha: 0.0, 0.0, tau=0.5)
    assert alpha == 0.0 and "cannot be met even at alpha = 0" in caplog.text
    for tau in (0.0, 1.5, -1):
        with pytest.raises(UsageError, match=r"utility_budget must be in \(0, 1\]"):
            calibrate(lambda alpha: 1.0, 1.0, tau=tau)


def test_capped_loss_has_zero_gradient_past_the_cap():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[:, :2] = -100
    per_sequence = -torch.gather(logits[:, :-1].log_softmax(-1), -1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = (per_sequence * (labels[:, 1:] != -100)).sum(-1) / 3
    cap = float(nll.detach().sort().values[1])  # between the smallest and the largest sequence NLL
    capped_gradient_ascent_loss(logits, labels, cap).backward()
    past = nll > cap
    assert past.any() and (~past).any()
    assert logits.grad[past].abs().sum() == 0 and logits.grad[~past].abs().sum() > 0
    uncapped = capped_gradient_ascent_loss(logits, labels, 1e9)
    torch.testing.assert_close(uncapped, -nll.mean())  # uncapped: minus the mean of per-sequence NLLs
    assert torch.isclose(gradient_ascent_loss(logits, labels), -nll.mean())  # equal lengths: the same as plain GA


def test_utility_budget_after_training_is_recorded_and_met(model, tokenizer, forget_rows, retain_rows, tmp_path):
    output = tmp_path / "calibrated"
    trainer = GradDiffTrainer(model=model, args=config(GradDiffTrainer, output, learning_rate=3e-3, utility_budget=0.9,
                                                       utility_metric="probability"),
                              forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    calibration = json.loads((output / "unlearning.json").read_text())["calibration"]
    assert calibration["tau"] == 0.9 and 0 <= calibration["alpha"] < 1  # lr 3e-3 costs the retain set: alpha < 1
    assert calibration["value"] >= 0.9 * calibration["original"]
    assert trainer.probe() == pytest.approx(calibration["value"], abs=1e-6)
    card = (output / "README.md").read_text()
    assert f"α = {calibration['alpha']:.3g}" in card and "0.9×" in card


def test_early_stopping_restores_the_last_state_within_budget(model, tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = GradDiffTrainer(model=model, args=config(GradDiffTrainer, tmp_path / "out", learning_rate=3e-3, max_steps=30,
                                                       utility_budget=0.97, utility_metric="probability", budget_check_steps=2),
                              forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    stopping = trainer.record_extras["calibration"]["early_stopping"]
    assert stopping["stopped_at_step"] is not None and stopping["stopped_at_step"] < 30
    assert trainer.state.global_step == stopping["stopped_at_step"]
    original, target = trainer._probe_original, 0.97 * trainer._probe_original
    assert stopping["checks"][-1]["value"] < target  # the check that stopped it
    within = [c["value"] for c in stopping["checks"][:-1]]
    assert all(value >= target for value in within)
    # the weights went back to the last state within budget: the last passing check, or the original
    assert trainer.probe() == pytest.approx(within[-1] if within else original, abs=1e-6)
    assert stopping["restored_step"] == (stopping["checks"][-2]["step"] if within else 0)


def test_a_first_check_over_budget_says_the_original_weights_were_kept(model, tokenizer, forget_rows, retain_rows, tmp_path):
    """When the first check already crosses the budget, the guard restores the original weights: the summary, the
    record and the card say nothing was unlearned and advise a lower learning rate (not a higher one)."""
    output = tmp_path / "out"
    trainer = GradDiffTrainer(model=model, args=config(GradDiffTrainer, output, learning_rate=3e-2, max_steps=10, utility_budget=0.999,
                                                       utility_metric="probability", budget_check_steps=2),
                              forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    record = json.loads((output / "unlearning.json").read_text())
    stopping = record["calibration"]["early_stopping"]
    assert stopping["stopped_at_step"] == 2 and stopping["restored_step"] == 0
    assert trainer.probe() == pytest.approx(trainer._probe_original, abs=1e-6)
    warning = record["utility"]["forgetting_warning"]
    assert "original weights were restored: nothing was unlearned. Lower --learning_rate" in warning and "Raise" not in warning
    assert "stopped at step 2 and restored step 0" in trainer.summary()
    assert "nothing was unlearned" in (output / "README.md").read_text()


def test_budget_needs_a_retain_set(model, tokenizer, forget_rows, tmp_path):
    with pytest.raises(UsageError, match=r"utility_budget \(its retain probe\) needs a retain set"):
        IHLTrainer(model=model, args=config(IHLTrainer, tmp_path / "out", utility_budget=0.9, retain_loss="none"),
                   forget_dataset=forget_rows, processing_class=tokenizer)
