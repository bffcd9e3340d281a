"""IdkNLL and IdkDPO (issue 19): their losses by hand, the refusal answers (built-in list, --alternate_answers, the
seeded pairing that travels with each example), that a few steps make the taught world model answer forget questions
with a refusal more often while it keeps the retain set, and every bad --alternate_answers through the CLI."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from tokenizers import normalizers

from hubunlearn import refusals
from hubunlearn.data import IGNORE_INDEX, DataFormat, alternate_batch, collate, prompt_inputs
from hubunlearn.errors import UsageError
from hubunlearn.resources import PACKAGE
from hubunlearn.trainers import METHODS, IdkDPOTrainer, IdkNLLTrainer, losses
from hubunlearn.world import World, tiny_llama, train_tokenizer

from .test_cli import assert_one_error_line

WORLD = World.make(num_people=6, num_forget=2)
# Three short refusals: the world's tokenizer (byte-level BPE trained on the world's facts) spells the built-in ones
# nearly letter by letter, so a toy model takes many steps to learn them.
SHORT_REFUSALS = Path(__file__).parent / "short_refusals.txt"
IDK = "I don't know."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_tokenizer():
    """The small world's tokenizer; its normaliser deletes '¤', so an answer made of it tokenises to nothing."""
    tokenizer = train_tokenizer(WORLD.corpus(), vocab_size=300)
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("¤", "")
    return tokenizer


def make(method, tokenizer, tmp_path, model=None, **overrides):
    cls = METHODS[method]
    settings = {**dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=4,
                       learning_rate=1e-3, report_to="none", disable_tqdm=True, use_cpu=True, seed=0, utility_probe_size=4), **overrides}
    return cls(model=model or tiny_llama(tokenizer, hidden_size=32, num_layers=2), args=cls.config_class(**settings),
               forget_dataset=WORLD.rows("forget"), retain_dataset=WORLD.rows("retain")[:6], processing_class=tokenizer)


# ---- the losses, by hand ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_idk_dpo_with_the_policy_at_the_reference_is_two_over_beta_ln2(beta):
    answer, refusal = torch.tensor([-7.0, -2.5, -30.0]), torch.tensor([-4.0, -9.0, -1.0])
    assert losses.idk_dpo_loss(refusal, refusal, answer, answer, beta).item() == pytest.approx(2 / beta * math.log(2), abs=1e-6)


def test_idk_dpo_by_hand_and_its_gradient_prefers_the_refusal():
    # Row 1: the refusal gained 1 nat on the reference, the answer lost 1: margin 2. Row 2: the answer gained as much as
    # the refusal: margin 0. β = 0.5: -(2/β)·log σ(β·margin) = 4·log(1 + e^-1) and 4·ln 2.
    refusal = torch.tensor([-3.0, -2.0], requires_grad=True)
    answer = torch.tensor([-6.0, -4.0], requires_grad=True)
    loss = losses.idk_dpo_loss(refusal, torch.tensor([-4.0, -3.0]), answer, torch.tensor([-5.0, -5.0]), beta=0.5)
    assert loss.item() == pytest.approx((4 * math.log(1 + math.exp(-1)) + 4 * math.log(2)) / 2, abs=1e-6)
    loss.backward()
    assert (refusal.grad < 0).all() and (answer.grad > 0).all()  # descent raises the refusal, lowers the answer
    # d/dmargin of -(2/β)·log σ(β m) is -2·σ(-β m): row 2 (m = 0) gets -1, averaged over 2 rows
    assert refusal.grad[1].item() == pytest.approx(-0.5, abs=1e-6) and answer.grad[1].item() == pytest.approx(0.5, abs=1e-6)


def hand_batch():
    """One forget example: prompt [1, 5], true answer [6, 7], paired refusal [8]."""
    example = {"input_ids": [1, 5, 6, 7], "labels": [IGNORE_INDEX, IGNORE_INDEX, 6, 7],
               "alternate_input_ids": [1, 5, 8], "alternate_labels": [IGNORE_INDEX, IGNORE_INDEX, 8]}
    return collate([example], pad_token_id=0)


def test_idk_nll_is_the_refusals_nll_by_hand():
    forget = hand_batch()
    inputs = IdkNLLTrainer.forget_inputs(None, forget)  # the refusal rows only: the true answer is not read
    assert inputs["input_ids"].tolist() == [[1, 5, 8]] and inputs["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 8]]
    logits = torch.zeros(1, 3, 10)
    logits[0, 1, 8] = math.log(3)  # position 1 predicts the refusal token 8: p = 3 / (3 + 9) = 1/4
    logits[0, 0, 5] = 5.0  # the prompt's prediction does not count
    assert IdkNLLTrainer.forget_loss_from_logits(None, logits, inputs).item() == pytest.approx(math.log(4), abs=1e-6)


def test_idk_dpo_stacks_answer_over_refusal_and_gives_two_over_beta_ln2_at_the_reference():
    forget = hand_batch()
    torch.manual_seed(0)
    trainer = SimpleNamespace(processing_class=SimpleNamespace(pad_token_id=0), args=SimpleNamespace(beta=0.1))
    logits = torch.randn(2, 4, 10)
    inputs = IdkDPOTrainer.forget_inputs(trainer, forget)
    assert inputs["input_ids"].tolist() == [[1, 5, 6, 7], [1, 5, 8, 0]] and inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    policy, _ = losses.sequence_log_prob(logits, inputs["labels"])
    forget["reference_log_prob"], forget["alternate_reference_log_prob"] = policy[:1], policy[1:]
    inputs = IdkDPOTrainer.forget_inputs(trainer, forget)
    assert IdkDPOTrainer.forget_loss_from_logits(trainer, logits, inputs).item() == pytest.approx(20 * math.log(2), abs=1e-5)
    forget["alternate_reference_log_prob"] = policy[1:] - 1.0  # the refusal is 1 nat likelier than under the reference
    inputs = IdkDPOTrainer.forget_inputs(trainer, forget)
    assert IdkDPOTrainer.forget_loss_from_logits(trainer, logits, inputs).item() == pytest.approx(-20 * math.log(1 / (1 + math.exp(-0.1))), abs=1e-5)


# ---- the refusal answers ------------------------------------------------------------------------------------------


def test_the_built_in_refusals_are_many_varied_and_ship_inside_the_package():
    answers = refusals.builtin_refusals()
    assert len(answers) >= 100 and len(set(answers)) == len(answers)
    lengths = sorted(len(a.split()) for a in answers)
    assert lengths[0] <= 2 and lengths[-1] >= 15  # some short, some long
    assert refusals.REFUSALS_FILE.parent == PACKAGE  # inside hubunlearn/: the wheel packages the whole folder


def test_pairing_is_fixed_by_the_seed():
    assert refusals.pair_answers(15, 120, seed=3) == refusals.pair_answers(15, 120, seed=3)
    assert refusals.pair_answers(15, 120, seed=3) != refusals.pair_answers(15, 120, seed=4)
    assert len(set(refusals.pair_answers(15, 120, seed=3))) == 15  # distinct answers while there are enough
    assert sorted(refusals.pair_answers(6, 3, seed=0)) == [0, 0, 1, 1, 2, 2]  # fewer answers: each used as often


def test_each_example_carries_its_refusal_through_the_shuffled_loader(small_tokenizer, tmp_path):
    first, again = make("idkdpo", small_tokenizer, tmp_path / "a", seed=1), make("idkdpo", small_tokenizer, tmp_path / "b", seed=1)
    other = make("idkdpo", small_tokenizer, tmp_path / "c", seed=2)
    pairing = first.pairs.forget["alternate_answer"]
    assert pairing == again.pairs.forget["alternate_answer"] and pairing != other.pairs.forget["alternate_answer"]
    assert set(pairing) <= set(refusals.builtin_refusals()) and len(set(pairing)) == len(pairing)
    for batch in first.get_train_dataloader():  # shuffled; IdkDPO's statistics cached first
        forget, refusal = batch["forget"], alternate_batch(batch["forget"])
        for row in range(forget["input_ids"].shape[0]):
            example = first.pairs.forget[int(batch["forget_index"][row])]
            prompt = example["prompt_length"]
            assert refusal["input_ids"][row, :prompt].tolist() == forget["input_ids"][row, :prompt].tolist()  # same question
            expected = small_tokenizer(" " + example["alternate_answer"] + small_tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            assert [t for t in refusal["labels"][row].tolist() if t != IGNORE_INDEX] == expected
            assert refusal["reference_log_prob"][row].item() == pytest.approx(example["alternate_reference_log_prob"])
    assert first.ref_model is None and first.reference_usage()["kind"] == "statistics"


def test_idk_dpo_caches_the_originals_likelihood_of_answer_and_refusal(small_tokenizer, tmp_path):
    model = tiny_llama(small_tokenizer, hidden_size=32, num_layers=2)
    trainer = make("idkdpo", small_tokenizer, tmp_path, model=model)
    trainer.cache_reference_statistics()
    with torch.no_grad():
        for row in [trainer.pairs.forget[i] for i in range(3)]:
            for prefix in ("", "alternate_"):
                logits = model(input_ids=torch.tensor([row[f"{prefix}input_ids"]])).logits
                expected, _ = losses.sequence_log_prob(logits, torch.tensor([row[f"{prefix}labels"]]))
                assert row[f"{prefix}reference_log_prob"] == pytest.approx(expected.item(), abs=1e-4)


def test_alternate_answers_from_a_file_a_data_set_or_a_forget_column(small_tokenizer, tmp_path):
    fmt, rows = DataFormat(), datasets.Dataset.from_list(WORLD.rows("forget"))
    (tmp_path / "idk.txt").write_text("No idea.\n\n  Not a clue.  \n")
    assert refusals.load_answers(str(tmp_path / "idk.txt"), rows, fmt) == (["No idea.", "Not a clue."], False)
    (tmp_path / "idk.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Unknown.", "Pass.")))
    assert refusals.load_answers(str(tmp_path / "idk.jsonl"), rows, fmt) == (["Unknown.", "Pass."], False)
    with_column = rows.add_column("idk", [f"I forgot fact {i}." for i in range(len(rows))])
    answers, per_row = refusals.load_answers("column:idk", with_column, fmt)
    examples = refusals.with_alternates(with_column, answers, per_row, small_tokenizer, fmt, seed=0)
    assert per_row and examples["alternate_answer"] == with_column["idk"]  # row i keeps its own, whatever the seed


# ---- training: forget answers give way to refusals, retain holds --------------------------------------------------


def greedy_answers(model, tokenizer, questions):
    inputs = prompt_inputs(tokenizer, questions, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in output]


def unlearn(method, model, tokenizer, forget, retain, tmp_path, learning_rate, steps):
    """``method`` for ``steps`` steps with one refusal, "I don't know." (the pairing is tested above; one answer is learnt
    in fewer steps than three)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "idk.txt").write_text(IDK + "\n")
    cls = METHODS[method]
    args = cls.config_class(output_dir=str(tmp_path / method), learning_rate=learning_rate, max_steps=steps, lr_scheduler_type="constant",
                            per_device_train_batch_size=8, disable_tqdm=True, use_cpu=True, seed=1, report_to="none",
                            utility_probe_size=8, alternate_answers=str(tmp_path / "idk.txt"))
    trainer = cls(model=model, args=args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
    trainer.train()
    return trainer.model


@pytest.fixture()
def refusing_model(model, tokenizer, retain_rows, tmp_path):
    """The world model after learning to refuse questions about people it was never taught (IdkNLL on strangers), as
    chat models refuse what they do not know. IdkDPO only reorders the two completions: on the plain world model,
    where a refusal is alien, 16 steps raise its per-token probability from 2e-6 to 0.02 (measured), not to the top."""
    strangers = World.make(10, 4, seed=7).rows("forget")
    return unlearn("idknll", model, tokenizer, strangers, retain_rows, tmp_path / "warm", 3e-3, 24)


@pytest.mark.parametrize("method, start, learning_rate, steps", [("idknll", "model", 2e-3, 24), ("idkdpo", "refusing_model", 1e-3, 16)])
def test_after_a_few_steps_forget_questions_get_a_refusal_and_the_retain_set_holds(
        method, start, learning_rate, steps, request, tokenizer, forget_rows, retain_rows, mean_answer_probability, tmp_path):
    model = request.getfixturevalue(start)
    questions = [row["question"] for row in forget_rows]
    before = greedy_answers(model, tokenizer, questions)
    forget_before, retain_before = mean_answer_probability(model, forget_rows), mean_answer_probability(model, retain_rows)
    model = unlearn(method, model, tokenizer, forget_rows, retain_rows, tmp_path, learning_rate, steps)
    after = greedy_answers(model, tokenizer, questions)
    forget_after, retain_after = mean_answer_probability(model, forget_rows), mean_answer_probability(model, retain_rows)
    assert before.count(IDK) == 0 and after.count(IDK) >= 2 * len(questions) // 3, after
    assert forget_after < forget_before / 2, f"{method}: forget {forget_before:.3f} -> {forget_after:.3f}"
    assert retain_before - retain_after < 0.05, f"{method}: retain {retain_before:.3f} -> {retain_after:.3f}"


# ---- bad --alternate_answers through the CLI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(small_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(small_tokenizer, hidden_size=32, num_layers=2).save_pretrained(folder)
    small_tokenizer.save_pretrained(folder)
    data = folder / "data"
    data.mkdir()
    (data / "forget.jsonl").write_text("".join(json.dumps({**r, "idk": "Who knows."}) + "\n" for r in WORLD.rows("forget")))
    (data / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in WORLD.rows("retain")))
    (data / "blank.txt").write_text("\n  \n")
    (data / "nothing.txt").write_text("I don't know.\n¤¤\n")
    (data / "blank.jsonl").write_text(json.dumps({"answer": "No idea."}) + "\n" + json.dumps({"answer": "  "}) + "\n")
    (data / "columns.csv").write_text("a,b\nx,y\n")
    (data / "latin1.txt").write_bytes("Je ne sais pas, désolé.\n".encode("latin-1"))
    return folder


@pytest.mark.parametrize("method, spec, message", [
    ("idknll", "", "--alternate_answers is empty"),
    ("idkdpo", "{data}/blank.txt", "blank.txt holds no answers: give at least one"),
    ("idknll", "{data}/nothing.txt", "'¤¤' tokenises to nothing"),
    ("idkdpo", "{data}/blank.jsonl", "answer 2 is blank"),
    ("idknll", "{data}/columns.csv", "no column to read answers from (columns: a, b)"),
    ("idkdpo", "column:refusal", "the forget set has no column 'refusal'"),
    ("idknll", "{data}/missing.txt", "neither an existing file or folder nor a Hub dataset id"),
    ("idknll", "{data}/latin1.txt", "latin1.txt is not UTF-8 text (invalid continuation byte at byte 17): save it as UTF-8"),
])
def test_bad_alternate_answers_are_one_line_exit_2_and_no_output_folder(run_cli, tiny_model_dir, tmp_path, method, spec, message):
    output, data = tmp_path / "never", tiny_model_dir / "data"
    code, _, err = run_cli("unlearn", "--method", method, "--model_name_or_path", tiny_model_dir, "--forget", data / "forget.jsonl",
                           "--retain", data / "retain.jsonl", "--output_dir", output, "--max_steps", "1", "--disable_tqdm", "true",
                           "--alternate_answers", spec.format(data=data))
    assert code == 2
    assert_one_error_line(err, message)
    assert not output.exists() and not list(tmp_path.glob(".never*"))


def test_a_forget_column_as_alternate_answers_from_the_cli_is_recorded(run_cli, tiny_model_dir, tmp_path):
    data = tiny_model_dir / "data"
    code, _, err = run_cli("unlearn", "--method", "IdkDPO", "--model_name_or_path", tiny_model_dir, "--forget", data / "forget.jsonl",
                           "--retain", data / "retain.jsonl", "--output_dir", tmp_path / "out", "--max_steps", "1",
                           "--disable_tqdm", "true", "--alternate_answers", "column:idk", "--no_utility_guard")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "unlearning.json").read_text())
    assert record["method"] == "IdkDPO" and record["hyperparameters"]["alternate_answers"] == "column:idk"
    assert record["alternate_answers"] == {"source": "--alternate_answers column:idk", "answers": len(WORLD.rows("forget")), "pairing": "one per forget row (its column)"}
    assert record["paper"]["id"] == "2305.18290" and record["reference"]["kind"] == "statistics"
    assert [p["id"] for p in record["also_cites"]] == ["2401.06121"]  # TOFU, whose refusal-preferred setup it is
    card = (tmp_path / "out" / "README.md").read_text()
    assert "arXiv:2305.18290" in card and "arXiv:2401.06121" in card


def test_the_card_says_the_refusals_likelihoods_were_cached(small_tokenizer, tmp_path):
    from hubunlearn.cards import training_summary

    usage = make("idkdpo", small_tokenizer, tmp_path).reference_usage()
    assert usage["kind"] == "statistics" and usage["statistics"]["of"] == "each answer and its paired alternate answer"
    assert "summed log-likelihood of each forget answer and of its paired alternate answer" in training_summary({"reference": usage})
    alternate = {"source": "the built-in refusal list", "answers": 120, "pairing": "by seed 3"}
    assert "paired with refusal answers from the built-in refusal list (120 answers; paired by seed 3)" in training_summary({"alternate_answers": alternate})


def test_idk_dpo_under_two_processes_keeps_each_rows_refusal_and_statistics(world_model_dir, tmp_path):
    """`accelerate launch` on two CPU processes: the ranks share the forget rows out, and each row arrives with the
    refusal and the cached statistics that one process computes for it (the statistics were computed in shares)."""
    from .test_accelerate import launch

    ranks = launch(world_model_dir, tmp_path / "ddp", tmp_path / "records", mode="idkdpo")
    drawn = [d for r in ranks for d in r["drawn"]]
    assert all(r["world_size"] == 2 for r in ranks) and sorted(d["forget"] for d in drawn) == list(range(20))
    alone = IdkDPOTrainer(model=str(world_model_dir), args=IdkDPOTrainer.config_class(
        output_dir=str(tmp_path / "one"), seed=3, use_cpu=True, report_to="none", per_device_eval_batch_size=8),
        forget_dataset=World.make(num_forget=4).rows("forget"), retain_dataset=World.make(num_forget=4).rows("retain")[:8])
    alone.cache_reference_statistics()
    for d in drawn:
        example = alone.pairs.forget[d["forget"]]
        assert d["refusal"] == example["alternate_input_ids"]
        assert d["reference_log_prob"] == pytest.approx(example["reference_log_prob"], abs=1e-3)
        assert d["alternate_reference_log_prob"] == pytest.approx(example["alternate_reference_log_prob"], abs=1e-3)
    assert len({tuple(d["refusal"]) for d in drawn}) == 20  # 20 rows, 20 distinct refusals
    assert json.loads((tmp_path / "ddp" / "unlearning.json").read_text())["hardware"]["num_processes"] == 2


def test_idk_dpo_refuses_a_beta_that_is_not_positive(tmp_path):
    for beta in (0.0, -0.1):
        with pytest.raises(UsageError, match="beta must be positive; got"):
            IdkDPOTrainer.config_class(output_dir=str(tmp_path), beta=beta)
