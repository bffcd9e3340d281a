"""The training core at scale (issue 18): NPO's reference as cached statistics, one forward pass for forget and
retain, forward passes counted per step, and where the frozen reference model lives. Tiny models built from a
config (random weights: the equalities hold for any weights), on the world's rows and tokenizer."""

import copy

import pytest
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hubunlearn.benchmarking import REQUIRED_SETTINGS
from hubunlearn.cards import training_summary
from hubunlearn.errors import UsageError
from hubunlearn.trainers import METHODS, KLTrainer, KUDATrainer, NPOTrainer, losses
from hubunlearn.world import tiny_llama

LOGIT_METHODS = [m for m in METHODS if m not in ("kuda", "rmu")]  # KUDA and RMU read activations (representation.py)
READS_REFERENCE = ("kl", "undial")  # the retain KL and UNDIAL's forget term read the original's logits every step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(world):
    """The world's tokenizer, trained on its corpus (no taught model needed: these models are random)."""
    from transformers import PreTrainedTokenizerFast

    from hubunlearn.world import train_tokenizer

    tokenizer = train_tokenizer(world.corpus())
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and tokenizer.pad_token_id is not None
    return tokenizer


@pytest.fixture(scope="module")
def few(forget_rows, retain_rows):
    """A few forget and retain rows (each trainer tokenizes and measures them: kept small, the tests stay cheap)."""
    return forget_rows[:8], retain_rows[:12]


def tiny_gpt2(tokenizer):
    """A second architecture: learned absolute positions instead of rotary ones (dropout off, as Llama's)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


SHAPES = {"llama-32x2": lambda tok: tiny_llama(tok, hidden_size=32, num_layers=2),
          "llama-48x3": lambda tok: tiny_llama(tok, hidden_size=48, num_layers=3, seed=1),
          "gpt2-32x2": tiny_gpt2}


def make(trainer_class, model, tokenizer, few, tmp_path, **overrides):
    forget_rows, retain_rows = few
    settings = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
                    per_device_eval_batch_size=3, disable_tqdm=True, use_cpu=True, seed=1, utility_probe_size=4,
                    report_to="none", **overrides)
    peft_config = settings.pop("peft_config", None)
    method = next((name for name, cls in METHODS.items() if cls is trainer_class), None)
    settings = {**REQUIRED_SETTINGS.get(method, {}), **settings}
    return trainer_class(model=model, args=trainer_class.config_class(**settings), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer, peft_config=peft_config)


def first_batch(trainer):
    """The first training batch, with forget and retain of different widths (so one pass must pad one of them)."""
    for batch in trainer.get_train_dataloader():
        if batch["forget"]["input_ids"].shape[1] != batch["retain"]["input_ids"].shape[1]:
            return batch
    raise AssertionError("no batch whose forget and retain widths differ")


def loss_and_gradients(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", ["llama-32x2", "gpt2-32x2"])
def test_npo_cached_statistics_give_the_reference_models_loss_and_gradients(shape, tokenizer, few, tmp_path):
    model = SHAPES[shape](tokenizer)
    original = copy.deepcopy(model).eval()
    trainer = make(NPOTrainer, model, tokenizer, few, tmp_path, retain_loss="none")
    assert trainer.ref_model is None  # no reference model is loaded or copied for NPO
    trainer.cache_reference_statistics()
    assert trainer.ref_model is None and "reference_log_prob" in trainer.pairs.forget.column_names
    with torch.no_grad():  # training moved the policy away from the original
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    forget = next(iter(trainer.get_train_dataloader()))["forget"]
    assert forget["reference_log_prob"].shape == (4,)

    def npo(reference_log_prob):
        model.zero_grad()
        policy, _ = losses.sequence_log_prob(trainer.logits(model, forget), forget["labels"])
        loss = losses.npo_loss(policy, reference_log_prob, trainer.args.beta)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    with torch.no_grad():
        from_model, _ = losses.sequence_log_prob(trainer.logits(original, forget), forget["labels"])
    cached_loss, cached_grads = npo(forget["reference_log_prob"])
    model_loss, model_grads = npo(from_model)
    assert (cached_loss - model_loss).abs() < 1e-5 and abs(cached_loss.item() - 2 / 0.1 * 0.6931) > 1e-2  # moved off ln 2
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(cached_grads, model_grads))
    assert trainer.forget_loss_from_logits(trainer.logits(model, forget), forget).item() == pytest.approx(cached_loss.item(), abs=1e-6)


def test_reference_statistics_come_from_a_given_reference_model(tokenizer, few, tmp_path):
    model, other = tiny_llama(tokenizer, hidden_size=32, num_layers=2), tiny_llama(tokenizer, hidden_size=32, num_layers=2, seed=5)
    trainer = NPOTrainer(model=model, args=NPOTrainer.config_class(output_dir=str(tmp_path / "o"), use_cpu=True, retain_loss="none",
                                                                   per_device_eval_batch_size=5, report_to="none"),
                         forget_dataset=few[0], processing_class=tokenizer, ref_model=other)
    trainer.cache_reference_statistics()
    rows = [trainer.pairs.forget[i] for i in range(len(trainer.pairs.forget))]
    with torch.no_grad():
        for row in rows[:3]:
            ids = torch.tensor([row["input_ids"]])
            expected, _ = losses.sequence_log_prob(other(input_ids=ids).logits, torch.tensor([row["labels"]]))
            assert row["reference_log_prob"] == pytest.approx(expected.item(), abs=1e-4)
    assert trainer.ref_model is None  # it served the statistics only
    assert trainer.reference_usage()["statistics"]["computed_with"] == "the reference model given"


class CountForwards(TrainerCallback):
    """Forward calls of each watched module within training steps (between on_step_begin and on_step_end)."""

    def __init__(self, modules: dict):
        self.calls = {name: 0 for name in modules}
        self.per_step: list[dict] = []
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda *_, name=name: self.calls.__setitem__(name, self.calls[name] + 1))

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = dict(self.calls)

    def on_step_end(self, args, state, control, **kwargs):
        self.per_step.append({name: self.calls[name] - self.start[name] for name in self.calls})


@pytest.mark.parametrize("method, overrides, expected", [
    *[(m, {}, {"policy": 1, "reference": 1 if m in READS_REFERENCE else 0}) for m in LOGIT_METHODS],
    ("npo", {"retain_loss": "kl"}, {"policy": 1, "reference": 1}),
    ("ga", {"retain_loss": "nll", "nll_cap": 3.0}, {"policy": 1, "reference": 0}),
    ("kl", {"peft_config": LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")}, {"base": 2}),  # adapter on, then off
    ("npo", {"peft_config": LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")}, {"base": 1}),
    ("undial", {"peft_config": LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")}, {"base": 2}),
])
def test_one_policy_forward_per_step_and_one_reference_forward_only_for_kl(method, overrides, expected, tokenizer, few, tmp_path):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    trainer = make(METHODS[method], model, tokenizer, few, tmp_path, **overrides)
    watched = {"base": model} if "peft_config" in overrides else {"policy": model}
    if trainer.ref_model is not None:
        watched["reference"] = trainer.ref_model
    counter = CountForwards(watched)
    trainer.add_callback(counter)
    trainer.train()
    assert len(counter.per_step) == 2 and all(step == counter.per_step[0] for step in counter.per_step)
    assert counter.per_step[0] == {name: expected.get(name, 0) for name in watched}
    assert (trainer.ref_model is None) == (expected.get("reference", 0) == 0)  # NPO holds no reference model


# Every logits method on one shape; NLL and NPO's sequence sums (which padding would shift first), and the chunked
# whole-vocabulary forget terms of CE-U and PDU, on the others too. task_vector trains no retain term (its fine-tune's
# update is negated): nothing to join.
ONE_PASS_CASES = ([("llama-32x2", m, {}) for m in LOGIT_METHODS if m != "task_vector"] + [("llama-32x2", "npo", {"retain_loss": "kl"})]
                  + [(shape, m, {}) for shape in SHAPES if shape != "llama-32x2" for m in ("graddiff", "npo", "ceu", "pdu")])


@pytest.mark.parametrize("shape, method, overrides", ONE_PASS_CASES)
def test_one_pass_and_two_passes_give_the_same_loss_and_gradients(shape, method, overrides, tokenizer, few, tmp_path):
    trainer = make(METHODS[method], SHAPES[shape](tokenizer), tokenizer, few, tmp_path,
                   **({"retain_loss": "nll"} if METHODS[method].config_class.retain_loss == "none" else {}), **overrides)
    batch = first_batch(trainer)  # the loader caches the original's statistics first (NPO)
    assert ("reference_log_prob" in batch["forget"]) == bool(METHODS[method].reference_statistics)  # NPO, IdkDPO
    with torch.no_grad():  # then away from the original, so KL and NPO have gradients
        for parameter in trainer.model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    assert trainer.one_pass
    one_loss, one_grads = loss_and_gradients(trainer, batch)
    trainer.one_pass = False
    two_loss, two_grads = loss_and_gradients(trainer, batch)
    assert abs(one_loss.item() - two_loss.item()) < 1e-5 and one_grads.keys() == two_grads.keys() and one_grads
    worst = max(((one_grads[n] - two_grads[n]).abs().max() / two_grads[n].abs().max().clamp(min=1e-8)).item() for n in one_grads)
    assert worst < 1e-5, f"gradients differ by {worst:.2e} (relative to each tensor's largest)"


def test_kl_reference_on_the_cpu_gives_the_same_loss(tokenizer, few, tmp_path):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    same = make(KLTrainer, copy.deepcopy(model), tokenizer, few, tmp_path / "same")
    cpu = make(KLTrainer, copy.deepcopy(model), tokenizer, few, tmp_path / "cpu", reference_device="cpu")
    assert all(p.device.type == "cpu" for p in cpu.ref_model.parameters()) and cpu.reference_on_cpu and not same.reference_on_cpu
    batch = first_batch(same)
    for trainer in (same, cpu):
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.01)
    assert cpu.compute_loss(cpu.model, batch).item() == pytest.approx(same.compute_loss(same.model, batch).item(), abs=1e-6)
    assert cpu.reference_usage() == {"kind": "model", "device": "cpu"}
    assert "a frozen copy of the original on the cpu" in training_summary({"reference": cpu.reference_usage()})


def test_reference_device_where_no_reference_model_is_held_is_a_one_line_error(tokenizer, few, tmp_path):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    lora = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    for method, overrides, reason in (("npo", {}, "caches the original's forget answer likelihoods"), ("graddiff", {}, "needs no reference model"),
                                      ("kl", {"peft_config": lora}, "switches the LoRA adapter off for the original.s logits")):
        with pytest.raises(UsageError, match=f"holds none \\(it {reason}\\): drop (--)?reference_device") as error:
            make(METHODS[method], model, tokenizer, few, tmp_path, reference_device="cpu", **overrides)
        assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="KUDA reads the reference model's activations on the training device"):
        make(KUDATrainer, model, tokenizer, few, tmp_path, reference_device="cpu", layers="1")
    with pytest.raises(UsageError, match="unknown (--)?reference_device 'gpu'"):
        KLTrainer.config_class(output_dir=str(tmp_path / "x"), reference_device="gpu")


def test_the_record_and_card_say_how_the_reference_was_used(tokenizer, few, tmp_path):
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=2)
    lora = LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")
    npo = make(NPOTrainer, model, tokenizer, few, tmp_path / "npo")
    assert npo.reference_usage() == {"kind": "statistics", "device": None, "statistics": {
        "parts": ["forget"], "value": "summed answer log-likelihood", "computed_with": "the starting weights"}}
    assert "cached statistics of the frozen original (its summed log-likelihood of each forget answer" in training_summary({"reference": npo.reference_usage()})
    assert make(KLTrainer, model, tokenizer, few, tmp_path / "kl").reference_usage() == {"kind": "model", "device": "cpu"}
    lora_kl = make(KLTrainer, copy.deepcopy(model), tokenizer, few, tmp_path / "lora", peft_config=lora)
    assert lora_kl.reference_usage() == {"kind": "adapter_off_base", "device": "cpu"}
    assert "the base model with the LoRA adapter switched off" in training_summary({"reference": lora_kl.reference_usage()})
    assert make(METHODS["graddiff"], model, tokenizer, few, tmp_path / "gd").reference_usage() == {"kind": "none", "device": None}
    assert "reference" not in training_summary({"reference": {"kind": "none", "device": None}}).lower()
