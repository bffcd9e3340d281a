"""Every method forgets (forget likelihood drops, retain holds), and what it saves loads the ordinary way."""

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback

from hubunlearn.benchmarking import REQUIRED_SETTINGS
from hubunlearn.errors import NonFiniteLossError, UsageError
from hubunlearn.trainers import METHODS, IHLConfig, IHLTrainer, NPOConfig, NPOTrainer


def config(trainer_class, output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), learning_rate=3e-4, max_steps=12, lr_scheduler_type="constant",
                    per_device_train_batch_size=8, logging_steps=4, disable_tqdm=True, use_cpu=True, seed=1)
    return trainer_class.config_class(**{**settings, **overrides})


REPRESENTATION_SETTINGS = {"learning_rate": 1e-2}  # only a few layers train: KUDA and RMU take larger steps
# GA and NPO's forget terms are unbounded or push likelihood down everywhere: at 3e-4 they sit at the edge of collapse
# on this toy model (measured with transformers 5.24 / torch 2.13: forget 0.32, retain 0.84 after 12 steps; at 2.75e-4
# forget 0.44, retain 0.92), so they take a slightly smaller step; the bounded methods keep 3e-4.
METHOD_SETTINGS = {"kuda": REPRESENTATION_SETTINGS, "rmu": REPRESENTATION_SETTINGS,
                   "ga": {"learning_rate": 2.75e-4}, "npo": {"learning_rate": 2.75e-4},
                   # KL to the original over every real retain token (issue 16) holds the shared template tokens in place:
                   # at 3e-4 the forget set barely moves on this toy model (0.995 -> 0.988 after 12 steps)
                   "kl": {"learning_rate": 1e-3},
                   # UNDIAL at β = 10 has a sharp edge on this toy model (12 steps: 1.5e-4 forget 0.70 / retain 0.97; 1.75e-4
                   # forget 0.48 / retain 0.92; 2e-4 forget 0.31 / retain 0.82); task vectors need a fine-tune that moves a model
                   # already at p ≈ 0.995 (lr 7e-4 and w = 3: forget 0.26 / retain 0.89; lr 1.5e-3 and w = 1: 0.44 / 0.85)
                   "undial": {"learning_rate": 1.75e-4}, "task_vector": {"learning_rate": 7e-4, "negation_weight": 3.0},
                   # SatImp's weight p^5·(1 − p) is ~0.005 on this over-confident model (p ≈ 0.995): next to a retain NLL
                   # term the forget term barely moves it (12 steps at 3e-4: 0.995 -> 0.993), so it runs alone, as GA does,
                   # at 4e-4 (3e-4: forget 0.66, retain 0.98; 4e-4: 0.42, 0.95)
                   "satimp": {"retain_loss": "none", "learning_rate": 4e-4},
                   # CE-U's bounded push (p − q on the logits) moves the shared answer template too: alone at 3e-4 the retain
                   # set falls to 0.10; with a strong retain NLL it forgets (0.28) and keeps the retain set (0.93)
                   "ceu": {"retain_loss": "nll", "retain_weight": 30},
                   # PDU: the forget term (a squared logit gap, ~200 at the start) outweighs λ = 100 times a retain NLL of
                   # 0.005 until the retain set is damaged (retain 0.42 at 3e-4); λ starts at 1000 and ε bounds the retain
                   # NLL at 0.1 (the world model's is ~0.005): forget 0.25, retain 0.94
                   "pdu": {"retain_epsilon": 0.1, "initial_multiplier": 1000, "learning_rate": 2e-4},
                   # The refusal methods learn new text, which takes larger steps on this toy model; IdkDPO with three short
                   # refusals: the built-in ones are long in this tokenizer, so DPO's margin is met by raising them while
                   # the answer barely moves (measured: lr 3e-3, 12 steps, forget 0.68, retain 0.94; with these, 0.16 and 0.97)
                   "idknll": {"learning_rate": 1e-3},
                   "idkdpo": {"learning_rate": 2e-3, "alternate_answers": str(Path(__file__).parent / "short_refusals.txt")}}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_forgets_the_forget_set_and_keeps_the_retain_set(method, model, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    trainer_class = METHODS[method]
    forget_before, retain_before = mean_answer_probability(model, forget_rows), mean_answer_probability(model, retain_rows)
    assert forget_before > 0.9 and retain_before > 0.9  # the model knows the world
    overrides = {**REQUIRED_SETTINGS.get(method, {}), **METHOD_SETTINGS.get(method, {})}
    trainer = trainer_class(model=model, args=config(trainer_class, tmp_path / "out", **overrides), forget_dataset=forget_rows,
                            retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    forget_after, retain_after = mean_answer_probability(trainer.model, forget_rows), mean_answer_probability(trainer.model, retain_rows)
    assert forget_after < 0.6, f"{method} did not forget: {forget_before:.3f} -> {forget_after:.3f}"
    assert retain_before - retain_after < (forget_before - forget_after) / 5, f"{method} hurt the retain set: {retain_before:.3f} -> {retain_after:.3f}"
    logged = [h for h in trainer.state.log_history if "forget_loss" in h]
    assert logged and ("retain_loss" in logged[-1]) == (trainer.args.retain_loss != "none")


def test_lora_adapter_loads_with_peft_and_matches_the_in_memory_model(model, tokenizer, forget_rows, retain_rows, world_model_dir, mean_answer_probability, tmp_path):
    output = tmp_path / "adapter"
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = IHLTrainer(model=model, args=config(IHLTrainer, output, learning_rate=1e-2), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model()
    assert (output / "adapter_model.safetensors").is_file() and not (output / "model.safetensors").exists()
    assert not (output / "training_args.bin").exists()  # no pickles in an artifact
    record = json.loads((output / "unlearning.json").read_text())
    assert record["artifact"] == "lora" and record["method"] == "IHL" and record["hyperparameters"]["lora"]["r"] == 8
    assert record["base_model"]["name_or_path"] == str(world_model_dir)
    assert record["data"]["forget"]["num_rows"] == len(forget_rows) and len(record["data"]["forget"]["sha256"]) == 64
    assert "unlearning" in (output / "README.md").read_text()

    inputs = tokenizer([r["question"] for r in forget_rows[:4]], return_tensors="pt", padding=True)
    in_memory = trainer.model.eval()
    with torch.no_grad():
        expected = in_memory(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(world_model_dir)
        for loaded in (PeftModel.from_pretrained(base, output), AutoPeftModelForCausalLM.from_pretrained(output)):
            assert torch.equal(loaded.eval()(**inputs).logits, expected)
    assert mean_answer_probability(AutoPeftModelForCausalLM.from_pretrained(output), forget_rows) < 0.6


def test_full_checkpoint_loads_with_auto_model(model, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    output = tmp_path / "full"
    trainer = NPOTrainer(model=model, args=config(NPOTrainer, output), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    loaded = AutoModelForCausalLM.from_pretrained(output)
    inputs = tokenizer(["Where was Kalo born?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, trainer.model.eval()(**inputs).logits)
    assert json.loads((output / "unlearning.json").read_text())["hyperparameters"]["beta"] == 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # no staging folder left beside it


def test_kl_and_npo_reference_is_the_frozen_original(model, tokenizer, forget_rows, retain_rows, tmp_path):
    original = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = NPOTrainer(model=model, args=config(NPOTrainer, tmp_path / "o", retain_loss="kl"), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    reference = trainer.ref_model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in original.items())
    assert not all(torch.equal(trainer.model.state_dict()[k], v) for k, v in original.items())


class _PoisonAt(TrainerCallback):
    """Makes the model's weights NaN right after a given optimiser step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_names_the_step(model, tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = IHLTrainer(model=model, args=config(IHLTrainer, tmp_path / "o"), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer, callbacks=[_PoisonAt(3)])
    with pytest.raises(NonFiniteLossError, match="at step 4; .* state after step 3"):
        trainer.train()
    assert trainer.state.global_step == 3


def test_bad_trainer_inputs(model, tokenizer, forget_rows, retain_rows, tmp_path, caplog):
    args = config(IHLTrainer, tmp_path / "o")
    with pytest.raises(UsageError, match="needs a retain set"):
        IHLTrainer(model=model, args=args, forget_dataset=forget_rows, processing_class=tokenizer)
    with pytest.raises(UsageError, match="retain_loss='kl' needs a retain set"):
        NPOTrainer(model=model, args=config(NPOTrainer, tmp_path / "o", retain_loss="kl"), forget_dataset=forget_rows, processing_class=tokenizer)
    with pytest.raises(UsageError, match="forget set is empty"):
        IHLTrainer(model=model, args=args, forget_dataset=[], retain_dataset=retain_rows, processing_class=tokenizer)
    with pytest.raises(UsageError, match="no module matches target modules.*q_proj"):
        IHLTrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer,
                   peft_config=LoraConfig(target_modules=["attention_dense"], task_type="CAUSAL_LM"))
    with caplog.at_level(logging.WARNING, logger="hubunlearn"):
        IHLTrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows + forget_rows[:2], processing_class=tokenizer)
    assert "2 forget examples also appear in the retain set" in caplog.text
    (tmp_path / "o" / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="not empty.*overwrite_output_dir"):
        IHLTrainer(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows, processing_class=tokenizer)
    with pytest.raises(UsageError, match="unknown retain_loss"):
        IHLConfig(output_dir=str(tmp_path / "x"), retain_loss="mse")


def test_tokenizer_without_pad_token_gets_eos_and_a_warning(model, tokenizer, forget_rows, retain_rows, tmp_path, caplog):
    bare = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    bare.pad_token = None
    with caplog.at_level(logging.WARNING, logger="hubunlearn"):
        trainer = NPOTrainer(model=model, args=config(NPOTrainer, tmp_path / "o", max_steps=1), forget_dataset=forget_rows,
                             retain_dataset=retain_rows, processing_class=bare)
    assert bare.pad_token == bare.eos_token and "no pad token" in caplog.text
    trainer.train()


def test_tags_and_paper_feed_the_card(model, tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = NPOTrainer(model=model, args=config(NPOTrainer, tmp_path / "o", max_steps=1), forget_dataset=forget_rows,
                         retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "o" / "README.md").read_text()
    assert "- npo" in card and "- unlearning" in card and "arXiv:2404.05868" in card and "| `beta` | `0.1` |" in card
    assert "base_model" not in card.split("---")[1]  # a local base path never goes into the Hub metadata
    assert "| `lr_scheduler_type` | `constant` |" in card and "Libraries: hubunlearn" in card
    assert "summed log-likelihood of each forget answer, computed once before the first step" in card
    assert "No reference model was held in memory" in card and trainer.ref_model is None  # NPO's reference: cached statistics


def test_a_retain_set_without_a_retain_loss_is_measured_not_trained_on(model, tokenizer, forget_rows, retain_rows, tmp_path, caplog):
    trainer_class = METHODS["ga"]
    with caplog.at_level(logging.WARNING, logger="hubunlearn"):
        trainer = trainer_class(model=model, args=config(trainer_class, tmp_path / "o", max_steps=1), forget_dataset=forget_rows,
                                retain_dataset=retain_rows, processing_class=tokenizer)
    assert "the retain set is not trained on, only measured" in caplog.text
    assert "retain" not in trainer.train_dataset[0]
    trainer.train()
    assert trainer.record_extras["utility"]["examples"]["retain"] == 32 and "retain_kept" in trainer.record_extras["utility"]


def test_raw_text_forget_set(model, tokenizer, forget_rows, retain_rows, tmp_path):
    """The text road: documents chunked, every token trained on; their likelihood falls, the retain QA holds."""
    from hubunlearn.data import DataFormat, tokenize_rows
    from hubunlearn.metrics import answer_probabilities

    documents = [{"text": " ".join(r["answer"] for r in forget_rows[i : i + 5])} for i in range(0, len(forget_rows), 5)]
    chunks = list(tokenize_rows(documents, tokenizer, DataFormat(max_length=24)))

    def text_probability(m):
        values = answer_probabilities(m, chunks, tokenizer.pad_token_id)
        return sum(values) / len(values)

    before = text_probability(model)
    trainer_class = METHODS["graddiff"]
    trainer = trainer_class(model=model, args=config(trainer_class, tmp_path / "o", max_length=24), forget_dataset=documents,
                            retain_dataset=retain_rows, processing_class=tokenizer)
    trainer.train()
    assert len(trainer.train_dataset) == len(chunks) > len(documents)
    assert text_probability(trainer.model) < 0.8 * before
