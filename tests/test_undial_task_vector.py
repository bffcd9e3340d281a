"""UNDIAL (self-distillation on adjusted logits) and task-vector negation (issue 19): each loss by hand, the original
read from the same reference as the retain KL, and a negated fine-tune that is exactly θ₀ − w·Δ, as a full checkpoint
and as a LoRA adapter that loads on the unmodified base. Full-model forgetting on the world model is covered for both
methods by tests/test_trainers.py (parametrised over METHODS)."""

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback

from hubunlearn.errors import UsageError
from hubunlearn.trainers import METHODS, TaskVectorTrainer, UNDIALTrainer, canonical_method, losses
from hubunlearn.world import tiny_llama


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(output_dir, **overrides):
    return {**dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                   lr_scheduler_type="constant", disable_tqdm=True, use_cpu=True, seed=1, report_to="none", utility_probe_size=8),
            **overrides}


def lora(r=4):
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")


# ---- UNDIAL's loss ---------------------------------------------------------------------------------------------


def test_undial_target_and_loss_by_hand():
    """Vocabulary of 3, gold token 1: the original's logits (1, 2, 0) become (1, 2 − β, 0) with β = 1, i.e. (1, 1, 0);
    the target is (e, e, 1)/(2e + 1); a policy with probabilities (1/4, 1/2, 1/4) has cross-entropy −Σ q·log p."""
    e = math.e
    q = [e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)]
    reference = torch.tensor([[[1.0, 2.0, 0.0], [5.0, -3.0, 2.0]]])
    target = losses.undial_target(reference[:, :1], torch.tensor([[1]]), beta=1.0)
    torch.testing.assert_close(target, torch.tensor([[q]]))
    policy = torch.tensor([[[0.0, math.log(2.0), 0.0], [9.0, 9.0, -9.0]]])  # position 1 predicts nothing labelled
    labels = torch.tensor([[-100, 1]])  # position 0 predicts token 1
    expected = -(q[0] * math.log(0.25) + q[1] * math.log(0.5) + q[2] * math.log(0.25))
    assert losses.undial_loss(policy, reference, labels, beta=1.0).item() == pytest.approx(expected, abs=1e-6)
    # β = 0: the target is the original's own distribution
    torch.testing.assert_close(losses.undial_target(reference, torch.tensor([[1, 0]]), 0.0), reference.softmax(-1))


def test_undial_gradient_is_zero_at_the_original_with_beta_zero_and_chunks_change_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = -100
    labels[1, 5:] = -100

    def value_and_grad(beta, reference, chunk_positions=None):
        policy = logits.clone().requires_grad_()
        loss = losses.undial_loss(policy, reference, labels, beta, chunk_positions=chunk_positions)
        loss.backward()
        return loss.detach(), policy.grad

    _, grad = value_and_grad(0.0, logits.clone())
    assert grad.abs().max() < 1e-7  # the model is the original and β = 0: nothing to learn
    loss, grad = value_and_grad(10.0, logits.clone())
    assert grad.abs().max() > 1e-2 and loss > 0  # β > 0 pushes the gold tokens down
    targets, mask = losses.next_token_targets(labels)
    gold = grad.gather(-1, targets[..., None]).squeeze(-1)
    assert (gold[mask] > 0).all() and (grad[~mask] == 0).all()  # descent lowers each gold logit; unlabelled positions untouched
    chunked_loss, chunked_grad = value_and_grad(10.0, logits.clone(), chunk_positions=2)
    assert chunked_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(chunked_grad, grad)


# ---- UNDIAL's reference ----------------------------------------------------------------------------------------


def test_undial_reads_the_original_as_the_retain_kl_does(tokenizer, forget_rows, retain_rows, tmp_path):
    """Full fine-tuning: a frozen copy, on the CPU when asked, with the same loss; LoRA: the adapter-off base, no copy,
    and --reference_device refused in one line naming why."""
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    rows = dict(forget_dataset=forget_rows[:8], retain_dataset=retain_rows[:8], processing_class=tokenizer)
    same = UNDIALTrainer(model=copy.deepcopy(model), args=UNDIALTrainer.config_class(**settings(tmp_path / "s")), **rows)
    cpu = UNDIALTrainer(model=copy.deepcopy(model), args=UNDIALTrainer.config_class(**settings(tmp_path / "c", reference_device="cpu")), **rows)
    assert same.reference_usage() == {"kind": "model", "device": "cpu"} and cpu.reference_on_cpu
    batch = next(iter(same.get_train_dataloader()))
    for trainer in (same, cpu):
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.01)
    assert cpu.compute_loss(cpu.model, batch).item() == pytest.approx(same.compute_loss(same.model, batch).item(), abs=1e-6)
    adapter = UNDIALTrainer(model=copy.deepcopy(model), args=UNDIALTrainer.config_class(**settings(tmp_path / "l")), peft_config=lora(), **rows)
    assert adapter.ref_model is None and adapter.reference_usage() == {"kind": "adapter_off_base", "device": "cpu"}
    with pytest.raises(UsageError, match="holds none \\(it switches the LoRA adapter off for the original.s logits\\)"):
        UNDIALTrainer(model=copy.deepcopy(model), args=UNDIALTrainer.config_class(**settings(tmp_path / "x", reference_device="cpu")),
                      peft_config=lora(), **rows)


@pytest.mark.parametrize("peft_config", [None, lora()], ids=["full", "lora"])
def test_undial_with_beta_zero_has_no_gradient_at_the_start(peft_config, tokenizer, forget_rows, tmp_path):
    """The trainer's reference is the original itself: at β = 0 the policy already matches its target."""
    trainer = UNDIALTrainer(model=tiny_llama(tokenizer, hidden_size=32, num_layers=2),
                            args=UNDIALTrainer.config_class(**settings(tmp_path / "o", beta=0.0, retain_loss="none")),
                            forget_dataset=forget_rows[:8], processing_class=tokenizer, peft_config=peft_config)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    grads = [p.grad.abs().max().item() for p in trainer.model.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-8, max(grads)
    trainer.model.zero_grad()
    trainer.args.beta = 10.0
    trainer.compute_loss(trainer.model, batch).backward()
    assert max(p.grad.abs().max().item() for p in trainer.model.parameters() if p.grad is not None) > 1e-5


def test_undial_forgets_through_lora(model, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    forget_before, retain_before = mean_answer_probability(model, forget_rows), mean_answer_probability(model, retain_rows)
    trainer = UNDIALTrainer(model=model, args=UNDIALTrainer.config_class(**settings(tmp_path / "o", max_steps=12, per_device_train_batch_size=8,
                                                                                       learning_rate=LORA_UNDIAL_LR)),
                            forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora(8))
    trainer.train()
    forget_after, retain_after = mean_answer_probability(trainer.model, forget_rows), mean_answer_probability(trainer.model, retain_rows)
    assert forget_after < 0.6, f"UNDIAL (LoRA) did not forget: {forget_before:.3f} -> {forget_after:.3f}"
    assert retain_before - retain_after < (forget_before - forget_after) / 5, f"retain {retain_before:.3f} -> {retain_after:.3f}"


LORA_UNDIAL_LR = 1.3e-3  # measured: 1.2e-3 forgets little (0.69), 1.5e-3 costs the retain set (0.80)


# ---- task-vector negation --------------------------------------------------------------------------------------


class _Snapshot(TrainerCallback):
    """The fine-tuned weights, as training ends (before the negation in ``finish_training``)."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def fine_tune_and_negate(model, tokenizer, rows, output, peft_config=None, retain_rows=None, **overrides):
    snapshot = _Snapshot()
    trainer = TaskVectorTrainer(model=model, args=TaskVectorTrainer.config_class(**settings(output, **{"learning_rate": 1e-2, **overrides})),
                                forget_dataset=rows, retain_dataset=retain_rows, processing_class=tokenizer, peft_config=peft_config,
                                callbacks=[snapshot])
    trainer.train()
    trainer.save_model()
    return trainer, snapshot.state


@pytest.mark.parametrize("shape", [(32, 2), (48, 3)])
def test_full_task_vector_artifact_is_the_original_minus_w_times_the_update(shape, tokenizer, forget_rows, tmp_path):
    hidden, layers = shape
    model = tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, seed=layers)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = tokenizer([r["question"] for r in forget_rows[:3]], return_tensors="pt", padding=True)
    negated = {}
    for weight in ((1.0, 2.0) if layers == 2 else (1.5,)):
        trainer, fine_tuned = fine_tune_and_negate(copy.deepcopy(model), tokenizer, forget_rows[:8], tmp_path / str(weight), negation_weight=weight)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(weight)).eval()
        by_hand = copy.deepcopy(model).eval()
        by_hand.load_state_dict({k: original[k] - weight * (fine_tuned[k] - original[k]) for k in original})
        assert any(not torch.equal(fine_tuned[k], original[k]) for k in original)  # the fine-tune moved the weights
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, by_hand(**inputs).logits, atol=1e-5, rtol=1e-5)
        negated[weight] = loaded.state_dict()
        record = json.loads((tmp_path / str(weight) / "unlearning.json").read_text())
        assert record["method"] == "TaskVector" and record["artifact"] == "full" and record["hyperparameters"]["negation_weight"] == weight
        assert record["task_vector"] == {"negation_weight": weight, "delta": "full weights"} and record["paper"]["id"] == "2212.04089"
        assert f"θ = θ₀ − w·Δ with w = {weight:g}" in (tmp_path / str(weight) / "README.md").read_text()
    if 2.0 in negated:  # the same fine-tune (same seed), subtracted twice as far
        for k in original:
            if original[k].is_floating_point():
                torch.testing.assert_close(negated[2.0][k] - original[k], 2 * (negated[1.0][k] - original[k]), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("lora_init", ["default", "fila"])
def test_lora_task_vector_adapter_loads_on_the_unmodified_base_and_really_subtracts(lora_init, tokenizer, forget_rows, retain_rows, tmp_path):
    """The saved adapter is a plain LoRA adapter whose delta is −w times what the fine-tune changed in each weight (a
    single adapter merged with a negative weight through PEFT's add_weighted_adapter comes out un-negated: peft issue
    3004). With FILA the fine-tuned weight is the modified base plus the adapter; the artifact is still for the
    unmodified base (rank 2r)."""
    from peft.tuners.lora import LoraLayer

    weight = 1.5
    base = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    original = copy.deepcopy(base)
    output = tmp_path / "adapter"
    trainer, fine_tuned = fine_tune_and_negate(base, tokenizer, forget_rows[:8], output, peft_config=lora(), negation_weight=weight,
                                               lora_init=lora_init, retain_rows=retain_rows[:8] if lora_init == "fila" else None)
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
    assert json.loads((output / "adapter_config.json").read_text())["r"] == (8 if lora_init == "fila" else 4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), output).eval()
    by_hand = copy.deepcopy(original).eval()
    layers = {name.removeprefix("base_model.model."): m for name, m in loaded.named_modules() if isinstance(m, LoraLayer)}
    assert layers
    with torch.no_grad():
        for key, layer in layers.items():
            prefix = f"base_model.model.{key}"
            a, b = fine_tuned[f"{prefix}.lora_A.default.weight"], fine_tuned[f"{prefix}.lora_B.default.weight"]
            update = fine_tuned[f"{prefix}.base_layer.weight"] + 2.0 * b @ a - original.get_submodule(key).weight  # lora(): alpha/r = 2
            assert update.abs().max() > 0
            torch.testing.assert_close(layer.get_delta_weight("default"), -weight * update, atol=1e-6, rtol=1e-4)  # subtracted, w times
            by_hand.get_submodule(key).weight.sub_(weight * update)
        inputs = tokenizer([r["question"] for r in forget_rows[:3]], return_tensors="pt", padding=True)
        expected = by_hand(**inputs).logits
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(trainer.model.eval()(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((output / "unlearning.json").read_text())["task_vector"]["delta"] == "lora adapter"


def test_task_vector_forgets_and_the_utility_budget_scales_the_weight(model, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    """On the world model (which knows the forget set): the negated LoRA fine-tune's forget answer probability falls
    far below the original's; the utility budget mixes back to α, which scales w to α·w (recorded, and on the card)."""
    forget_before = mean_answer_probability(model, forget_rows)
    trainer = TaskVectorTrainer(model=model, args=TaskVectorTrainer.config_class(**settings(
        tmp_path / "o", max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2, negation_weight=3.0, utility_budget=0.5,
        utility_metric="probability", utility_probe_size=32)), forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer,
        peft_config=lora(8))
    trainer.train()
    forget_after = mean_answer_probability(trainer.model, forget_rows)
    utility, calibration = trainer.record_extras["utility"], trainer.record_extras["calibration"]
    assert forget_after < 0.5 * forget_before and utility["forget"]["after"] < 0.5 * utility["forget"]["before"]
    assert 0 < calibration["alpha"] < 1 and utility["retain_kept"] >= 0.5 and "early_stopping" not in calibration
    trainer.save_model()
    card = (tmp_path / "o" / "README.md").read_text()
    assert f"α·w = {calibration['alpha'] * 3.0:.3g}" in card


# ---- names and bad input ---------------------------------------------------------------------------------------


def test_the_fields_names_and_python_refusals(tokenizer, forget_rows, retain_rows, tmp_path):
    assert canonical_method("UNDIAL") == "undial" and METHODS["undial"] is UNDIALTrainer
    assert {canonical_method(name) for name in ("task_vector", "TaskVector", "task-vector", "TV")} == {"task_vector"}
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    for peft_config, what in ((LoraConfig(r=2, target_modules="all-linear", use_dora=True), "use_dora"),
                              (LoraConfig(r=2, target_modules="all-linear", bias="all"), "bias='all'")):
        with pytest.raises(UsageError, match=f"which {what} adds to: use a plain LoRA config"):
            TaskVectorTrainer(model=model, args=TaskVectorTrainer.config_class(**settings(tmp_path / "o")), forget_dataset=forget_rows[:4],
                              processing_class=tokenizer, peft_config=peft_config)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, flags, message", [
    ("task_vector", ["--negation_weight", "0"], "--negation_weight must be above 0 and at most 100 (θ = θ₀ − w·Δ; task arithmetic"),
    ("task_vector", ["--negation_weight", "-1"], "--negation_weight must be above 0 and at most 100"),
    ("task_vector", ["--negation_weight", "1e300"], "--negation_weight must be above 0 and at most 100"),
    ("task_vector", ["--negation_weight", "nan"], "--negation_weight must be a finite number; got nan"),
    ("task_vector", ["--retain_loss", "nll"], "task_vector trains no retain term"),
    ("task_vector", ["--utility_budget", "0.9", "--budget_check_steps", "5"], "--budget_check_steps probes the model during training"),
    ("undial", ["--beta", "-1"], "--beta must be a finite number ≥ 0"),
    # every method's own numbers must be finite (an infinite one only failed at the first step, leaving a folder)
    ("pdu", ["--retain_epsilon", "inf"], "--retain_epsilon must be a finite number; got inf"),
    ("pdu", ["--retain_epsilon", "0.1", "--initial_multiplier", "inf"], "--initial_multiplier must be a finite number; got inf"),
    ("idkdpo", ["--beta", "inf"], "--beta must be a finite number; got inf"),
    ("wga", ["--beta", "nan"], "--beta must be a finite number; got nan"),
    ("npo", ["--retain_weight", "inf"], "--retain_weight must be a finite number; got inf"),
], ids=["w-zero", "w-negative", "w-overflowing", "w-nan", "tv-retain-loss", "tv-budget-checks", "undial-negative-beta",
        "pdu-infinite-epsilon", "pdu-infinite-multiplier", "idkdpo-infinite-beta", "wga-nan-beta", "npo-infinite-retain-weight"])
def test_bad_input_is_one_line_exit_2_and_no_output_folder(run_cli, world_model_dir, data_files, tmp_path, method, flags, message):
    output = tmp_path / "never"
    code, _, err = run_cli("unlearn", "--method", method, "--model_name_or_path", world_model_dir, "--forget", data_files / "forget.jsonl",
                           "--retain", data_files / "retain.jsonl", "--output_dir", output, "--max_steps", "2", *flags)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("hubunlearn: error: ") and message in last and "Traceback" not in err, err
    assert not output.exists() and not list(tmp_path.glob(".never*"))


def test_the_cli_guard_calibrates_a_task_vector_at_the_end_only(run_cli, world_model_dir, data_files, tmp_path):
    """With a retain set the utility guard applies (τ = 0.8 on the retain probability) without its in-training checks,
    which would probe the fine-tuned model."""
    output = tmp_path / "tv"
    code, out, err = run_cli("unlearn", "--method", "TaskVector", "--model_name_or_path", world_model_dir, "--forget", data_files / "forget.jsonl",
                             "--retain", data_files / "retain.jsonl", "--output_dir", output, "--max_steps", "2", "--use_lora",
                             "--learning_rate", "1e-2", "--disable_tqdm", "true")
    assert code == 0, err
    record = json.loads((output / "unlearning.json").read_text())
    assert record["method"] == "TaskVector" and record["artifact"] == "lora" and record["hyperparameters"]["budget_check_steps"] == 0
    assert record["calibration"]["tau"] == 0.8 and "early_stopping" not in record["calibration"]
    assert "task arithmetic" in (output / "README.md").read_text()
