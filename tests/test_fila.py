"""FILA: the Fisher-weighted init leaves the model unchanged, and what it exports loads on the unmodified base."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hubunlearn import fila
from hubunlearn.errors import UsageError
from hubunlearn.trainers import IHLTrainer

from .test_trainers import config


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")


def test_fila_factors_are_the_weighted_low_rank_approximation():
    torch.manual_seed(0)
    weight = torch.randn(12, 8)
    importance = torch.rand(12, 8)
    a, b = fila.fila_factors(weight, importance, rank=8, scaling=2.0)
    assert a.shape == (8, 8) and b.shape == (12, 8)
    torch.testing.assert_close(2.0 * b @ a, weight, atol=1e-3, rtol=1e-3)  # full rank: exact (up to ε)
    a, b = fila.fila_factors(weight, importance, rank=2, scaling=2.0)
    rows = importance.sum(1).sqrt()[:, None]
    weighted_error = (rows * (weight - 2.0 * b @ a)).norm()
    exact = torch.linalg.svd(rows * weight)  # the best rank-2 approximation in the row-weighted norm
    torch.testing.assert_close(2.0 * b @ a, (exact.U[:, :2] * exact.S[:2]) @ exact.Vh[:2] / (rows + fila.EPSILON), atol=1e-4, rtol=1e-4)
    plain = torch.linalg.svd(weight)  # the unweighted rank-2 approximation is worse in that norm
    unweighted = plain.U[:, :2] @ torch.diag(plain.S[:2]) @ plain.Vh[:2]
    assert weighted_error < (rows * (weight - unweighted)).norm()


def test_relative_importance():
    forget, retain = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(fila.relative_importance(forget, retain, epsilon=1.0), torch.tensor([[1.0, 0.0]]))


def test_fila_init_leaves_logits_unchanged_and_moves_the_adapter(model, tokenizer, forget_rows, retain_rows, tmp_path):
    inputs = tokenizer([r["question"] for r in forget_rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model.eval()(**inputs).logits
    trainer = IHLTrainer(model=model, args=config(IHLTrainer, tmp_path / "out", lora_init="fila"), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora())
    with torch.no_grad():
        after = trainer.model.eval()(**inputs).logits
    assert (after - before).abs().max() < 1e-4
    layer = fila.lora_layers(trainer.model)["base_model.model.model.layers.0.mlp.down_proj"]
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not PEFT's zero init: the adapter holds part of W


def test_fila_adapter_loads_on_the_unmodified_base_and_forgets(model, tokenizer, forget_rows, retain_rows, world_model_dir,
                                                               mean_answer_probability, tmp_path):
    output = tmp_path / "fila"
    trainer = IHLTrainer(model=model, args=config(IHLTrainer, output, lora_init="fila", learning_rate=1e-3),
                         forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora())
    trainer.train()
    trainer.save_model()
    adapter_config = json.loads((output / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16  # PEFT's rank-2r conversion, same scaling
    record = json.loads((output / "unlearning.json").read_text())
    assert record["hyperparameters"]["lora_init"] == "fila" and "rank 2r" in record["fila"]["exported"]

    inputs = tokenizer([r["question"] for r in forget_rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world_model_dir), output).eval()
        assert (loaded(**inputs).logits - expected).abs().max() < 1e-4
    assert mean_answer_probability(loaded, forget_rows) < 0.6
    assert mean_answer_probability(loaded, retain_rows) > 0.9
    original = AutoModelForCausalLM.from_pretrained(world_model_dir).state_dict()
    for name, layer in fila.lora_layers(trainer.model).items():  # the trainer's base weights are the original ones again
        original_name = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(layer.get_base_layer().weight, original[original_name], atol=1e-5, rtol=0)

def test_fila_forgets_faster_than_the_default_init(world_model_dir, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    """The paper's claim at toy scale: same rank, learning rate and steps, FILA has forgotten and PEFT's init has not."""
    forget = {}
    for init in ("default", "fila"):
        trainer = IHLTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir), args=config(IHLTrainer, tmp_path / init, lora_init=init, learning_rate=1e-3),
                             forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora())
        trainer.train()
        forget[init] = mean_answer_probability(trainer.model, forget_rows)
    assert forget["fila"] < 0.6 < 0.9 < forget["default"], forget


def test_merged_export_is_a_full_checkpoint_with_the_same_function(model, tokenizer, forget_rows, retain_rows, tmp_path):
    output = tmp_path / "merged"
    trainer = IHLTrainer(model=model, args=config(IHLTrainer, output, lora_init="fila", lora_export="merged", learning_rate=1e-3),
                         forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora())
    trainer.train()
    inputs = tokenizer([r["question"] for r in forget_rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = trainer.model.eval()(**inputs).logits
    trainer.save_model()
    assert (output / "model.safetensors").is_file() and not (output / "adapter_config.json").exists()
    record = json.loads((output / "unlearning.json").read_text())
    assert record["artifact"] == "full" and record["hyperparameters"]["lora"]["r"] == 4
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(output).eval()(**inputs).logits - expected).abs().max() < 1e-4


@pytest.mark.parametrize("overrides, peft, retain, message", [
    ({"lora_init": "fila"}, False, True, "lora_init fila initialises a LoRA adapter: add use_lora (or pass peft_config)"),
    ({"lora_export": "merged"}, False, True, "lora_export merged merges a LoRA adapter"),
    ({"lora_init": "fila", "retain_loss": "none"}, True, False, "lora_init fila (its Fisher pass) needs a retain set"),
    ({"lora_init": "pissa"}, True, True, "unknown lora_init 'pissa'"),
])
def test_bad_fila_requests(model, tokenizer, forget_rows, retain_rows, tmp_path, overrides, peft, retain, message):
    """From the Python API the message names the Python arguments, not the command's flags."""
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        IHLTrainer(model=model, args=config(IHLTrainer, tmp_path / "out", **overrides), forget_dataset=forget_rows,
                   retain_dataset=retain_rows if retain else None, processing_class=tokenizer, peft_config=lora() if peft else None)
    assert not (tmp_path / "out").exists()
