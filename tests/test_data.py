"""The data road: specs, file formats, the TOFU folder layout, prompt/answer boundaries, pairing."""

import json

import datasets
import pytest
import torch

from hubunlearn.data import (
    DataFormat,
    DataSpec,
    ForgetRetainCollator,
    ForgetRetainDataset,
    content_hash,
    count_overlap,
    encode_qa,
    load_rows,
    prompt_inputs,
    tokenize_rows,
)
from hubunlearn.errors import UsageError

from .conftest import TOFU

ROWS = [{"question": f"What is fact {i}?", "answer": f"Fact {i} is {i * 7}."} for i in range(5)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("locuslab/TOFU:forget10", DataSpec("locuslab/TOFU", "forget10", "train")),
        ("locuslab/TOFU:forget10@test", DataSpec("locuslab/TOFU", "forget10", "test")),
        ("org/name", DataSpec("org/name", None, "train")),
        ("data/dir:retain90", DataSpec("data/dir", "retain90", "train")),
    ],
)
def test_spec_parsing(text, expected):
    assert DataSpec.parse(text) == expected
    assert DataSpec.parse(str(expected)) == expected


def write(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        dataset = datasets.Dataset.from_list(rows)
        dataset.to_csv(str(path), index=False) if fmt == "csv" else dataset.to_parquet(str(path))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_local_files_of_every_format_give_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"facts.{fmt}"
    write(path, ROWS, fmt)
    rows = load_rows(str(path))
    assert [dict(r) for r in rows] == ROWS
    assert content_hash(rows, ["question", "answer"]) == content_hash(ROWS, ["question", "answer"])


def test_local_folder_in_the_hub_layout(tmp_path):
    write(tmp_path / "forget.jsonl", ROWS[:2], "jsonl")
    (tmp_path / "retain").mkdir()
    write(tmp_path / "retain" / "train-00000.parquet", ROWS[2:], "parquet")
    assert len(load_rows(f"{tmp_path}:forget")) == 2
    assert len(load_rows(f"{tmp_path}:retain")) == 3
    with pytest.raises(UsageError, match="no data set 'nope'.*forget, retain"):
        load_rows(f"{tmp_path}:nope")
    with pytest.raises(UsageError, match="name one as"):
        load_rows(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="folder .*empty holds no data: put a .jsonl"):
        load_rows(str(tmp_path / "empty"))


@pytest.mark.skipif(not TOFU.is_dir(), reason="needs ../shared/data/tofu")
def test_shared_tofu_folder_uses_the_hub_config_names():
    forget = load_rows(f"{TOFU}:forget10")
    assert len(forget) == 400 and set(forget.column_names) == {"question", "answer"}
    assert len(load_rows(f"{TOFU}:retain90")) == 3600
    assert "perturbed_answer" in load_rows(f"{TOFU}:forget10_perturbed").column_names


def test_unreachable_hub_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="cannot load dataset nobody/nothing:cfg: the Hub cannot be reached here .* give a local"):
        load_rows("nobody/nothing:cfg")  # the suite runs with HF_DATASETS_OFFLINE: the message says so, not "check the id"
    with pytest.raises(UsageError, match="neither an existing file or folder nor a Hub dataset id"):
        load_rows("./missing/file.json")


def test_prompt_answer_boundary_loses_and_leaks_nothing(tokenizer, forget_rows):
    for row in forget_rows:
        example = encode_qa(tokenizer, row["question"], row["answer"], 128)
        k = example["prompt_length"]
        prompt = tokenizer.decode(example["input_ids"][:k], skip_special_tokens=True)
        answer = tokenizer.decode([t for t in example["labels"] if t != -100], skip_special_tokens=True)
        assert prompt == f"Question: {row['question']}\nAnswer:"
        assert answer.strip() == row["answer"]
        assert all(label == -100 for label in example["labels"][:k])
        assert example["labels"][k:] == example["input_ids"][k:]
        assert example["input_ids"][-1] == tokenizer.eos_token_id  # the model learns to stop


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = "{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    example = encode_qa(chat, "Where was Kalo born?", "Kalo was born in Tamira.", 128)
    k = example["prompt_length"]
    assert chat.decode(example["input_ids"][:k]) == "<s>[user] Where was Kalo born?\n[assistant] "
    assert chat.decode(example["input_ids"][k:], skip_special_tokens=True) == "Kalo was born in Tamira."
    assert example["input_ids"].count(chat.bos_token_id) == 1  # no second bos from add_special_tokens


def test_rendered_prompts_are_tokenised_with_one_bos_with_or_without_a_chat_template(tokenizer):
    chat = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    for tok in (tokenizer, chat):
        batch = prompt_inputs(tok, ["Where was Kalo born?", "Who?"], padding=True, padding_side="left")
        for ids in batch["input_ids"]:
            assert ids.count(tok.bos_token_id) == 1, tok.decode(ids)  # a chat template renders its own bos
    assert chat.decode(prompt_inputs(chat, ["Who?"])["input_ids"][0]).endswith("[user] Who?\n[assistant] ")


TRL_ROWS = {
    "standard prompt-completion": {"prompt": "Where was Kalo born?", "completion": "Kalo was born in Tamira."},
    "conversational prompt-completion": {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Kalo born?"}],
                                         "completion": [{"role": "assistant", "content": "Kalo was born in Tamira."}]},
    "conversational messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                             {"role": "user", "content": "Where was Kalo born?"},
                                             {"role": "assistant", "content": "Kalo was born in Tamira."}]},
}


@pytest.mark.parametrize("kind", list(TRL_ROWS))
def test_trl_dataset_formats_are_read_as_they_are(kind, tokenizer, tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps(TRL_ROWS[kind]) + "\n")
    rows = load_rows(str(path))
    assert (rows[0]["question"], rows[0]["answer"]) == ("Where was Kalo born?", "Kalo was born in Tamira.")
    example = tokenize_rows(rows, tokenizer, DataFormat())[0]
    k = example["prompt_length"]
    assert tokenizer.decode(example["input_ids"][k:], skip_special_tokens=True).strip() == "Kalo was born in Tamira."


def test_a_conversation_without_an_assistant_turn_is_refused_in_one_line(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Where was Kalo born?"}]}) + "\n")
    with pytest.raises(UsageError, match="no assistant turn"):
        load_rows(str(path))


def test_truncation_keeps_the_prompt_and_drops_prompts_that_do_not_fit(tokenizer):
    long_answer = "word " * 200
    example = encode_qa(tokenizer, "Short question?", long_answer, 32)
    assert len(example["input_ids"]) == 32 and example["prompt_length"] < 32
    assert encode_qa(tokenizer, "very long question " * 50, "answer", 32) is None


def test_raw_text_is_chunked_with_every_token_a_label(tokenizer):
    rows = [{"text": " ".join(["Kalo was born in Tamira."] * 20)}]
    examples = tokenize_rows(rows, tokenizer, DataFormat(max_length=16))
    assert len(examples) > 3
    assert all(len(e["input_ids"]) <= 16 and e["labels"] == e["input_ids"] for e in examples)


def test_empty_or_shapeless_sets_are_refused(tokenizer):
    with pytest.raises(UsageError, match="forget set is empty"):
        tokenize_rows([], tokenizer, DataFormat(), "forget")
    with pytest.raises(UsageError, match=r"columns \[input, output\]; expected 'question' and 'answer'"):
        tokenize_rows([{"input": "a", "output": "b"}], tokenizer, DataFormat(), "forget")


def test_overlap_is_counted():
    assert count_overlap(datasets.Dataset.from_list(ROWS[:3]), datasets.Dataset.from_list(ROWS[2:]), ["question", "answer"]) == 1


def test_each_step_pairs_forget_with_retain_and_ranks_draw_different_retain_samples():
    forget = datasets.Dataset.from_list([{"input_ids": [i, i], "labels": [i, i]} for i in range(8)])
    retain = datasets.Dataset.from_list([{"input_ids": [100 + i], "labels": [100 + i]} for i in range(20)])
    pairs = ForgetRetainDataset(forget, retain, seed=3)
    seen = {}
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(pairs, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen[rank] = [pairs[i]["retain_index"] for i in sampler]
    assert len(seen[0]) == len(seen[1]) == 4
    assert not set(seen[0]) & set(seen[1])
    first_epoch = [pairs[i]["retain_index"] for i in range(8)]
    pairs.set_epoch(1)
    second_epoch = [pairs[i]["retain_index"] for i in range(8)]
    assert not set(first_epoch) & set(second_epoch)  # the walk goes on through the retain set

    batch = ForgetRetainCollator(pad_token_id=0)([pairs[0], pairs[5]])
    assert batch["forget"]["input_ids"].shape == (2, 2) and batch["retain"]["input_ids"].shape == (2, 1)
    assert batch["forget"]["attention_mask"].sum() == 4


@pytest.mark.parametrize("n_forget, n_retain", [(40, 120), (8, 20), (30, 7)])
def test_the_retain_walk_draws_every_retain_row_equally_often(n_forget, n_retain):
    """Sampling without replacement: after any number of steps' worth of epochs, draw counts differ by at most one,
    where OpenUnlearning's independent draws (``torch.randint`` per item) leave some rows unseen and others repeated."""
    forget = datasets.Dataset.from_list([{"input_ids": [i], "labels": [i]} for i in range(n_forget)])
    retain = datasets.Dataset.from_list([{"input_ids": [i], "labels": [i]} for i in range(n_retain)])
    pairs = ForgetRetainDataset(forget, retain, seed=0)
    counts = [0] * n_retain
    for epoch in range(5):
        pairs.set_epoch(epoch)
        for index in torch.randperm(n_forget).tolist():  # the Trainer's sampler shuffles the forget order
            counts[pairs[index]["retain_index"]] += 1
        assert max(counts) - min(counts) <= 1, f"epoch {epoch}: {counts}"
    assert sum(counts) == 5 * n_forget
