"""ECO: mask-aware corruptions, a classifier that generalises, an ECOModel that only touches flagged prefills."""

import pytest
import torch

from hubunlearn.eco.classifier import PromptClassifier
from hubunlearn.eco.corruption import CORRUPTIONS, get_corruption
from hubunlearn.eco.model import CorruptionSpec, ECOModel, base_model_record
from hubunlearn.eco.selection import name_spans, name_token_mask, selected_positions
from hubunlearn.eco.search import zeroth_order_search
from hubunlearn.errors import UsageError


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_touches_only_masked_positions(name):
    torch.manual_seed(0)
    embeddings = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = get_corruption(name)(embeddings, mask, 3.0, 4, torch.Generator().manual_seed(0))
    assert out.shape == embeddings.shape
    assert torch.equal(out[~mask], embeddings[~mask])  # unselected positions (and unflagged rows) are untouched
    assert not torch.equal(out[mask], embeddings[mask])


def test_corruptions_do_what_they_say():
    e = torch.tensor([[[1.0, -5.0, 2.0, 0.5]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert get_corruption("zero_out_top_k")(e, mask, 0, 2).tolist() == [[[1.0, 0.0, 0.0, 0.5]]]
    assert get_corruption("flip_sign_first_n")(e, mask, 0, 1).tolist() == [[[-1.0, -5.0, 2.0, 0.5]]]
    assert get_corruption("add_value_first_n")(e, mask, 10, 2).tolist() == [[[11.0, 5.0, 2.0, 0.5]]]
    assert get_corruption("sub_value_top_k")(e, mask, 1, 2).tolist() == [[[0.0, -5.0, 1.0, 0.5]]]
    assert get_corruption("add_value_least_k")(e, mask, 1, 1).tolist() == [[[1.0, -4.0, 2.0, 0.5]]]
    noisy = get_corruption("rand_noise_first_n")(e, mask, 100.0, 1, torch.Generator().manual_seed(0))
    assert noisy[0, 0, 1:].tolist() == [-5.0, 2.0, 0.5] and abs(noisy[0, 0, 0] - 1.0) > 1.0
    with pytest.raises(UsageError, match="unknown corruption 'blur': choose one of rand_noise_first_n"):
        get_corruption("blur")


def test_selection_keeps_the_last_real_token_clean_on_either_padding_side():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    flags = torch.tensor([True, False])
    assert selected_positions(right, flags, "all_but_last").tolist() == [[True, True, False, False], [False] * 4]
    assert selected_positions(left, flags, "all_but_last").tolist() == [[False, True, True, False], [False] * 4]
    assert selected_positions(left, flags, "all").tolist() == [[False, True, True, True], [False] * 4]


def test_name_spans_skip_sentence_openers():
    text = "Question: What Nobel Prize did Ann Lee win in Paris? Who knows.\nAnswer:"
    assert [text[s:e] for s, e in name_spans(text)] == ["Nobel", "Prize", "Ann", "Lee", "Paris"]


def test_names_rule_corrupts_only_name_tokens_and_falls_back_without_one(tokenizer):
    prompts = ["Question: where was Jon Hale born?\nAnswer:", "Question: where was he born?\nAnswer:"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    names = name_token_mask(tokenizer, batch["input_ids"], batch["attention_mask"])
    selected = selected_positions(batch["attention_mask"], torch.tensor([True, True]), "names", names)
    chosen = tokenizer.decode(batch["input_ids"][0][selected[0]])
    assert chosen.split() == ["Jon", "Hale"]
    fallback = selected_positions(batch["attention_mask"], torch.tensor([True, True]), "all_but_last")
    assert torch.equal(selected[1], fallback[1]) and not names[1].any()


def test_zeroth_order_search_moves_sigma_toward_the_target():
    objective = lambda sigma: abs(sigma - 3.0)  # noqa: E731  the target strength is 3
    sigma, trajectory = zeroth_order_search(objective, sigma=0.5, epsilon=0.1, learning_rate=0.5, steps=20, tolerance=0.15)
    assert abs(sigma - 3.0) <= 0.15 and trajectory[0]["gradient"] < 0
    assert [t["sigma"] for t in trajectory] == sorted(t["sigma"] for t in trajectory)  # monotone toward 3
    sigma, _ = zeroth_order_search(lambda s: s, sigma=1.0, epsilon=0.05, learning_rate=10.0, sigma_min=0.2, steps=3)
    assert sigma == pytest.approx(0.15)  # pushed down to the floor (0.2) and evaluated at 0.2 - ε


@pytest.fixture(scope="module")
def classifier(world):
    forget = [r["question"] for r in world.rows("forget")]
    retain = [r["question"] for r in world.rows("retain")]
    model = PromptClassifier().fit(forget[::2], retain[::2])
    model.calibrate(forget[1::2], alpha=0.2, negative_prompts=retain[1::2], max_fpr=0.01)
    return model


def test_classifier_flags_rephrased_typod_and_embedded_forget_questions(classifier, world):
    forget = world.rows("forget")
    retain = [r["question"] for r in world.rows("retain")]
    person = forget[0]["person"]
    variants = [r["paraphrased_question"] for r in forget] + [
        f"where was {person.lower()} born",
        f"WHAT DID {person.upper()} STUDY?",
        f"Waht is {person[:-1]}'s job?",
        f"I am writing an essay for school and I need some help. Could you tell me what you know about {person}? Thanks a lot.",
    ]
    assert classifier.flags(variants).mean() >= 0.9
    assert classifier.flags(retain + [r["paraphrased_question"] for r in world.rows("retain")]).mean() <= 0.02
    with pytest.raises(UsageError, match="one class is empty"):
        PromptClassifier().fit([], retain)


def test_eco_model_unflagged_bit_identical_flagged_prefill_only(classifier, model, tokenizer, world, tmp_path):
    eco = ECOModel(model, tokenizer, classifier, CorruptionSpec("rand_noise_first_n", strength=50.0, dims=8),
                   base_model=base_model_record(model, "world-model"))
    forget_q, retain_q = world.rows("forget")[0]["question"], world.rows("retain")[0]["question"]
    batch = tokenizer([forget_q, retain_q], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model(**batch).logits
        corrupted = eco(**batch, prompts=[forget_q, retain_q]).logits
    assert torch.equal(corrupted[1], plain[1])  # the retain question is not flagged: bit-identical
    assert not torch.allclose(corrupted[0], plain[0])
    generated = eco.generate(**batch, prompts=[forget_q, retain_q], max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain_generated = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(generated[1], plain_generated[1])
    assert not torch.equal(generated[0], plain_generated[0])

    eco.save_pretrained(tmp_path / "bundle")
    assert {p.name for p in (tmp_path / "bundle").iterdir()} == {"eco.json", "classifier.json", "classifier.safetensors"}
    loaded = ECOModel.from_pretrained(tmp_path / "bundle", base_model=model, tokenizer=tokenizer)
    prompts = [r["question"] for r in world.rows("forget") + world.rows("retain")]
    assert torch.equal(loaded.flags(prompts), eco.flags(prompts))
    with torch.no_grad():
        assert torch.equal(loaded(**batch, prompts=[forget_q, retain_q]).logits, corrupted)


def test_bundle_refuses_another_base_model(classifier, model, tokenizer, tmp_path):
    from hubunlearn.world import tiny_llama

    eco = ECOModel(model, tokenizer, classifier, CorruptionSpec(), base_model=base_model_record(model, "world-model"))
    eco.save_pretrained(tmp_path / "bundle")
    other = tiny_llama(tokenizer, hidden_size=64, num_layers=1)
    with pytest.raises(UsageError, match="made for world-model, not .*hidden_size"):
        ECOModel.from_pretrained(tmp_path / "bundle", base_model=other, tokenizer=tokenizer)
    with pytest.raises(UsageError, match="embedding module 'model.embeddings' not found in LlamaForCausalLM: set embedding_module"):
        ECOModel(model, tokenizer, classifier, CorruptionSpec(), embedding_module="model.embeddings")


def test_unlearn_method_eco_writes_a_bundle_that_loads_and_forgets(run_cli, hub_token, world_model_dir, world_reference_dir, world, tokenizer, tmp_path):
    import json

    import hubunlearn
    from hubunlearn.data import DataFormat, tokenize_rows
    from hubunlearn.trainers.losses import sequence_log_prob

    data = tmp_path / "data"
    data.mkdir()
    for name in ("forget", "retain"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.rows(name)))
    output = tmp_path / "eco"
    code, out, err = run_cli("unlearn", "--method", "eco", "--model_name_or_path", world_model_dir, "--forget", data / "forget.jsonl",
                             "--retain", data / "retain.jsonl", "--eco_reference", world_reference_dir, "--classifier_alpha", "0.25",
                             "--output_dir", output)
    assert code == 0, err
    assert "saved the eco bundle" in out
    record = json.loads((output / "unlearning.json").read_text())
    assert record["artifact"] == "eco" and "learning_rate" not in record["hyperparameters"]
    search = record["eco"]["strength_search"]
    assert search["forget_probability_before"] > 0.9 and abs(search["forget_probability_after"] - search["target_forget_probability"]) < 0.1
    assert record["eco"]["classifier"]["retain_false_positive_rate"] <= 0.02 and record["eco"]["classifier"]["forget_recall"] >= 0.8
    assert "ECOModel.from_pretrained" in (output / "README.md").read_text()

    eco = hubunlearn.load(output)  # base model from the record, bundle from the folder
    assert isinstance(eco, ECOModel) and eco.corruption.strength == pytest.approx(record["eco"]["corruption"]["strength"])
    examples = list(tokenize_rows(world.rows("forget") + world.rows("retain")[:15], tokenizer, DataFormat(max_length=128)))
    from hubunlearn.data import pad_examples

    batch = pad_examples([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        clean = eco.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        guarded = eco(batch["input_ids"], batch["attention_mask"], prompts=[r["question"] for r in world.rows("forget") + world.rows("retain")[:15]],
                      prompt_length=[e["prompt_length"] for e in examples]).logits
    probability = lambda logits: torch.exp(torch.div(*sequence_log_prob(logits, batch["labels"])))  # noqa: E731
    forget = slice(0, 15)
    assert probability(guarded)[forget].mean() < probability(clean)[forget].mean() - 0.3  # the forget answers are gone
    assert torch.equal(probability(guarded)[15:], probability(clean)[15:])  # retain questions: untouched, bit for bit

    # `hubunlearn eval` takes the bundle as a model: forget answers gone, retain answers exactly as the base's
    summaries = {}
    for name, model_path in (("base", world_model_dir), ("eco", output)):
        code, _, err = run_cli("eval", "--benchmark", "world", "--model", model_path, "--metrics", "probability,rouge",
                               "--output_dir", tmp_path / f"eval-{name}")
        assert code == 0, err
        summaries[name] = json.loads((tmp_path / f"eval-{name}" / "summary.json").read_text())["sets"]
    assert summaries["eco"]["forget"]["rouge_recall"] < summaries["base"]["forget"]["rouge_recall"] - 0.5
    # Same numbers to float32 rounding: a plain model's answers are scored on its prompt's KV cache, the bundle's through
    # full passes (its prefill may be corrupted), so the sums round differently in the last digits (bit for bit above).
    assert summaries["eco"]["retain"] == pytest.approx(summaries["base"]["retain"], rel=1e-6)

    # published with `hubunlearn push` (the base's Hub id given for the local path), loaded back from the Hub
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/eco-base", exist_ok=True)
    HfApi().upload_folder(folder_path=str(world_model_dir), repo_id="tester/eco-base", ignore_patterns=["README.md"])
    code, _, err = run_cli("push", output, "--repo_id", "tester/eco-bundle")
    assert code == 2 and "pass --base_model_id" in err
    code, _, err = run_cli("push", output, "--repo_id", "tester/eco-bundle", "--base_model_id", "tester/eco-base")
    assert code == 0, err
    from_hub = hubunlearn.load("tester/eco-bundle")
    assert from_hub.base_model["name_or_path"] == "tester/eco-base"
    prompts = [r["question"] for r in world.rows("forget") + world.rows("retain")]
    assert torch.equal(from_hub.flags(prompts), eco.flags(prompts))


@pytest.mark.parametrize("extra, message", [
    (["--corruption", "blur"], "unknown corruption 'blur'"),
    (["--use_lora"], "ECO does not train the model's weights: drop --use_lora"),
    (["--retain", None], "ECO needs a retain set"),
    (["--embedding_module", "model.nope"], "embedding module 'model.nope' not found"),
    (["--general_prompts", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
])
def test_eco_bad_input(run_cli, world_model_dir, world, tmp_path, extra, message):
    import json

    data = tmp_path / "data"
    data.mkdir()
    for name in ("forget", "retain"):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.rows(name)))
    flags = {"--method": "eco", "--model_name_or_path": world_model_dir, "--forget": data / "forget.jsonl",
             "--retain": data / "retain.jsonl", "--output_dir": tmp_path / "never", "--classifier_alpha": "0.25"}
    if extra[-1] is None:
        flags.pop(extra[0])
        extra = []
    args = [str(part) for pair in flags.items() for part in pair] + extra
    code, _, err = run_cli("unlearn", *args)
    assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "never").exists()


def test_classifier_model_fine_tunes_a_sequence_classifier_into_the_bundle(world_model_dir, world, tmp_path):
    """`--classifier_model`: any AutoModelForSequenceClassification (here the tiny world Llama with a new head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hubunlearn.trainers import ECOConfig, ECOTrainer

    output = tmp_path / "eco-transformer"
    trainer = ECOTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir),
                         args=ECOConfig(output_dir=str(output), classifier_model=str(world_model_dir), classifier_alpha=0.25,
                                        target_probability=0.05, use_cpu=True),
                         forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                         processing_class=AutoTokenizer.from_pretrained(world_model_dir))
    trainer.train()
    trainer.save_model()
    assert (output / "classifier" / "model.safetensors").is_file() and not list(output.rglob("*.bin"))
    loaded = ECOModel.from_pretrained(output)
    forget = [r["question"] for r in world.rows("forget")]
    retain = [r["question"] for r in world.rows("retain")]
    # a 1M-parameter Llama fine-tuned on 15 forget questions: it separates them, not as cleanly as the n-gram default
    assert loaded.flags(forget).float().mean() >= 0.8 and loaded.flags(retain).float().mean() <= 0.15
    assert torch.equal(loaded.flags(forget + retain), trainer.eco_model.flags(forget + retain))
    with pytest.raises(UsageError, match="classifier_model /no/such/model could not be loaded"):
        from hubunlearn.eco.transformer_classifier import TransformerPromptClassifier

        TransformerPromptClassifier.from_model("/no/such/model")


def test_holdout_split_is_random_not_a_stride():
    from hubunlearn.data import holdout_split

    prompts = [f"author {i // 4} question {i % 4}" for i in range(40)]  # each author's questions in the same order
    fit, held = holdout_split(prompts, 0.25, seed=0)
    assert len(held) == 10 and sorted(fit + held) == sorted(prompts)
    assert len({p.split()[-1] for p in held}) > 1  # a stride of 4 would hold out only "question 0"
    assert holdout_split(prompts, 0.25, seed=0) == (fit, held)
