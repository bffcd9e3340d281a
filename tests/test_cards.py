"""Cards for every artifact kind, rendered from a record alone."""

import json
import re

import pytest
from huggingface_hub import ModelCard

from hubunlearn.cards import PLACEHOLDER_REPO, card_for_hub, card_text, is_untouched, metrics_table
from hubunlearn.errors import UsageError

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
    text = card_text({**RECORD, "artifact": "full"}, folder="runs/npo")
    assert is_untouched(text)
    assert not is_untouched(text.replace("Limitations", "Caveats"))
    assert not is_untouched("# my own card\n")


def test_the_card_says_where_reference_statistics_came_from():
    from hubunlearn.evaluate import conventions

    source = {"reference": "org/retain90", "commit": "c" * 40, "cached": True, "cache_file": "/cache/x.json"}
    record = {**RECORD, "artifact": "full", "evaluation": {"benchmark": "tofu", "reference_source": source, "conventions": conventions()}}
    text = ModelCard(card_text(record, "org/forgetful")).text
    assert "Reference statistics: org/retain90 (commit cccccccccccc, cached statistics)." in text
    assert "privleak: MUSE (Shi et al., arXiv 2407.06460), in percent" in text and "min k: k = 0.4" in text
    stats = {"reference_stats": "eval/ref/per_example.json", "sha256": "d" * 64}
    text = card_text({**record, "evaluation": {"reference_source": stats}}, "org/forgetful")
    assert "Reference statistics: eval/ref/per_example.json (sha256 dddddddddddddddd…)." in text and "Conventions" not in text


@pytest.mark.parametrize("kind", ["full", "lora", "eco"])
def test_a_local_card_names_its_folder_and_a_push_names_the_repo_even_when_edited(kind, tmp_path):
    folder = tmp_path / "runs" / "npo-tofu"
    text = card_text({**RECORD, "artifact": kind}, folder=folder)
    card = ModelCard(text)
    assert PLACEHOLDER_REPO not in text and card.text.lstrip().startswith("# npo-tofu\n")
    assert card.data.to_dict()["model-index"][0]["name"] == "npo-tofu"
    assert f'from_pretrained("{folder}")' in text  # the snippet loads the folder as it is

    edited = text.replace("## Limitations", "## Limitations\n\nOur own note: checked by hand.")
    assert not is_untouched(edited)
    for pushed_from in (folder, tmp_path / "moved"):  # the folder may have moved since: the card's stamp says what it named
        pushed = card_for_hub(edited, "org/forgetful", pushed_from)
        card = ModelCard(pushed)
        assert "Our own note: checked by hand." in pushed and card.text.lstrip().startswith("# forgetful\n")
        assert card.data.to_dict()["model-index"][0]["name"] == "forgetful" and card.data.base_model == "org/base-7b"
        assert 'from_pretrained("org/forgetful")' in pushed and str(tmp_path) not in pushed and "npo-tofu" not in pushed


def test_a_relative_folder_reads_as_a_path_and_an_unreplaceable_mention_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = card_text({**RECORD, "artifact": "full"}, folder="runs/npo")
    assert 'from_pretrained("./runs/npo")' in text and '<!-- generated by hubunlearn for "./runs/npo"' in text
    prose = text.replace("## Limitations", "## Limitations\n\nThe weights in ./runs/npo. Beware.")
    with pytest.raises(UsageError, match=r"still names the local folder where the Hub repo belongs \(\./runs/npo\): replace it with org/x"):
        card_for_hub(prose, "org/x", "runs/npo")


def test_an_edited_card_of_an_older_version_loses_its_placeholders():
    old = card_text({**RECORD, "artifact": "full"}, "PATH_OR_REPO_ID").replace("Limitations", "Caveats")
    pushed = card_for_hub(old, "org/forgetful", "/somewhere/else")
    assert PLACEHOLDER_REPO not in pushed and "# forgetful\n" in pushed and 'from_pretrained("org/forgetful")' in pushed
    assert ModelCard(pushed).data.to_dict()["model-index"][0]["name"] == "forgetful"
    with pytest.raises(UsageError, match="metadata does not parse"):
        card_for_hub("---\n- a list, not a mapping\n---\n# card\n", "org/x", "/somewhere")


def hyperparameter_names(text: str) -> set[str]:
    return set(re.findall(r"^\| `([\w.]+)` \|", text, re.M))


def test_the_card_lists_only_the_hyperparameters_that_apply():
    settings = {"learning_rate": 1e-5, "num_train_epochs": 5.0, "max_steps": -1, "retain_loss": "nll", "retain_weight": 1.0,
                "lora_init": "default", "lora_export": "adapter", "utility_budget": None, "utility_metric": "extraction_strength",
                "utility_probe_size": 32, "budget_check_steps": 0, "record_examples": 3, "beta": 0.1}
    full = hyperparameter_names(card_text({**RECORD, "artifact": "full", "hyperparameters": settings}, "org/x"))
    assert full == {"learning_rate", "num_train_epochs", "retain_loss", "retain_weight", "utility_probe_size", "beta"}
    lora = {**settings, "lora": {"r": 8}, "max_steps": 40, "retain_loss": "none", "utility_budget": 0.9, "budget_check_steps": 5}
    names = hyperparameter_names(card_text({**RECORD, "artifact": "lora", "hyperparameters": lora}, "org/x"))
    assert names == {"learning_rate", "max_steps", "retain_loss", "lora_init", "lora_export", "utility_budget", "utility_metric",
                     "utility_probe_size", "budget_check_steps", "beta", "lora.r"}


def test_the_card_names_local_data_files_by_path_and_states_the_precision():
    record = {**RECORD, "artifact": "full", "training": {**RECORD["training"], "precision": {"mixed": "bf16", "tf32": None, "weights": "float32"}}}
    text = card_text(record, "org/x")
    assert "| retain | local file `/data/retain.jsonl` |" in text
    assert "2 × NVIDIA H100 in 123.4 s, in bf16 mixed precision (weights in float32)." in text
    plain = {**record, "training": {**record["training"], "precision": {"mixed": None, "tf32": True, "weights": "bfloat16"}}}
    assert "without mixed precision (weights in bfloat16, TF32 matmuls)." in card_text(plain, "org/x")


def eco_record(achieved: float) -> dict:
    eco = {"classifier": {"kind": "char-ngram-logistic", "threshold": 0.3, "alpha": 0.05, "forget_recall": 0.98,
                          "retain_false_positive_rate": 0.004, "held_out_forget_recall": 0.95, "held_out_false_positive_rate": 0.0125},
           "corruption": {"name": "rand_noise_first_n", "strength": 12.3456, "dims": 64, "tokens": "all_but_last"},
           "strength_search": {"target_forget_probability": 0.05, "target_from": "org/retain90", "forget_probability_before": 0.97,
                               "forget_probability_after": achieved, "trajectory": [{"step": 0, "sigma": 1.0}]}}
    return {**RECORD, "artifact": "eco", "method": "ECO", "eco": eco, "training": {"global_steps": 0}}


def test_an_eco_card_shows_recall_false_flags_and_sigma_and_warns_when_the_search_missed():
    met = ModelCard(card_text(eco_record(0.052), "org/eco")).text
    assert "flags 95.0% of held-out forget prompts (recall; 98.0% of all forget prompts)" in met
    assert "1.2% of held-out retain prompts (false flags; 0.4% of all retain prompts)" in met and "σ = 12.35" in met
    assert "from 0.97 to 0.052 (target 0.05, the reference model's)" in met and "Warning" not in met and "optimiser steps" not in met
    missed = ModelCard(card_text(eco_record(0.31), "org/eco")).text
    assert "**Warning: the σ search missed its target by 0.26 (more than 0.01): the bundle forgets less than intended" in missed


def test_recorded_evaluations_show_their_sizes_membership_inference_and_attacks(run_cli, world_model_dir, world, tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "unlearning.json").write_text(json.dumps({**RECORD, "artifact": "full", "metrics": {}}))
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in world.rows("retain")[-4:]))
    code, _, err = run_cli("eval", "--model", world_model_dir, "--benchmark", "world", "--metrics", "probability,mia",
                           "--holdout", holdout, "--attack", "prefix", "--max_examples", "4", "--max_new_tokens", "8",
                           "--output_dir", tmp_path / "e", "--record_to", artifact)
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    card = (artifact / "README.md").read_text()
    assert f"Evaluated on {', '.join(f'{n} {name}' for name, n in summary['examples'].items())} examples." in card
    assert summary["examples"]["holdout"] == 4 and "| attack | AUC (after) |" in card and "{" not in card.split("## Results")[1].split("##")[0]
    for attack, value in summary["aggregates"]["mia"]["auc"].items():
        assert re.search(rf"^\| {re.escape(attack.replace('_plus_plus', '++').replace('_', '-'))} \| {value:.3f} \|$", card, re.M)
    prefix = summary["attacks"]["prefix"]
    assert (f"| prefix | after | probability | {prefix['clean']['probability']:.3f} | {prefix['attacked']['probability']:.3f} | "
            f"{prefix['recovered']['probability']:.3f} |") in card
