"""Cards for every artifact kind, rendered from a record alone."""

import pytest
from huggingface_hub import ModelCard

from hubunlearn.cards import card_text, is_untouched, metrics_table

RECORD = {
    "method": "IHL",
    "method_description": "Inverted Hinge Loss.",
    "paper": {"id": "2408.06621", "title": "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs",
              "authors": "Sungmin Cha and Sungjun Cho and Dasol Hwang and Moontae Lee", "year": 2024},
    "tags": ["hubunlearn", "ihl", "unlearning"],
    "base_model": {"name_or_path": "org/base-7b", "revision": "a" * 40, "license": "apache-2.0"},
    "hyperparameters": {"learning_rate": 1e-4, "lora": {"r": 8}},
    "data": {
        "forget": {"id": "locuslab/TOFU", "path": None, "config": "forget10", "split": "train", "num_rows": 400, "sha256": "f" * 64},
        "retain": {"id": None, "path": "/data/retain.jsonl", "config": None, "split": None, "num_rows": 10, "sha256": "e" * 64},
    },
    "training": {"global_steps": 60, "train_runtime_s": 123.4},
    "hardware": {"device": "cuda", "accelerator": "NVIDIA H100", "num_processes": 2},
    "metrics": {"forget": {"reference": {"truth_ratio": 0.61}, "before": {"truth_ratio": 0.12}, "after": {"truth_ratio": 0.58}}},
    "versions": {"hubunlearn": "0.1.0"},
}


@pytest.mark.parametrize("kind, library, relation, words", [
    ("full", "transformers", "finetune", "AutoModelForCausalLM.from_pretrained"),
    ("lora", "peft", "adapter", "merge_and_unload"),
    ("eco", "hubunlearn", "adapter", "knowledge stays in the weights"),
])
def test_every_kind_renders_a_card_that_parses(kind, library, relation, words):
    text = card_text({**RECORD, "artifact": kind}, "org/forgetful")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["library_name"] == library and data["base_model"] == "org/base-7b" and data["base_model_relation"] == relation
    assert data["license"] == "apache-2.0" and data["datasets"] == ["locuslab/TOFU"]
    assert data["model-index"][0]["results"][0]["metrics"][0] == {"type": "truth_ratio", "value": 0.58, "name": "truth ratio"}
    assert words in card.text and "2 × NVIDIA H100 in 123.4 s" in card.text and "author = {Sungmin Cha and" in card.text
    assert "| forget | locuslab/TOFU" not in card.text and "[`locuslab/TOFU`](https://huggingface.co/datasets/locuslab/TOFU)" in card.text


def test_metrics_table_puts_the_reference_model_first():
    table = metrics_table(RECORD).splitlines()
    assert table[0] == "| set | metric | reference | before | after |"
    assert table[2] == "| forget | truth ratio | 0.61 | 0.12 | 0.58 |"


def test_edited_cards_are_recognised():
    text = card_text({**RECORD, "artifact": "full"})
    assert is_untouched(text)
    assert not is_untouched(text.replace("Limitations", "Caveats"))
    assert not is_untouched("# my own card\n")


def test_the_card_says_where_reference_statistics_came_from():
    from hubunlearn.evaluate import conventions

    source = {"reference": "org/retain90", "commit": "c" * 40, "cached": True, "cache_file": "/cache/x.json"}
    record = {**RECORD, "artifact": "full", "evaluation": {"benchmark": "tofu", "reference_source": source, "conventions": conventions()}}
    text = ModelCard(card_text(record)).text
    assert "Reference statistics: org/retain90 (commit cccccccccccc, cached statistics)." in text
    assert "privleak: MUSE (Shi et al., arXiv 2407.06460), in percent" in text and "min k: k = 0.4" in text
    stats = {"reference_stats": "eval/ref/per_example.json", "sha256": "d" * 64}
    text = card_text({**record, "evaluation": {"reference_source": stats}})
    assert "Reference statistics: eval/ref/per_example.json (sha256 dddddddddddddddd…)." in text and "Conventions" not in text
