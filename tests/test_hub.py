"""Push to a Hub (the loopback server of hubunlearn.testing), download, load: the same model comes back."""

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import hubunlearn
from hubunlearn import hub as hub_module
from hubunlearn.errors import UsageError
from hubunlearn.trainers import IHLTrainer, NPOTrainer

from .conftest import HUB_TOKEN, OTHER_TOKEN

BASE_REPO = "tester/world-base"


def logits(model, tokenizer, texts=("Where was Kalo born?", "Question: Who was the mentor of Ori?")):
    inputs = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.fixture(scope="module")
def base_on_hub(world_model_dir):
    """The world model published as a base model with a license on its card, as real bases are."""
    api = HfApi(token=HUB_TOKEN)
    api.create_repo(BASE_REPO, exist_ok=True)
    api.upload_folder(folder_path=str(world_model_dir), repo_id=BASE_REPO, ignore_patterns=["README.md"])
    api.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# world base\n", path_in_repo="README.md", repo_id=BASE_REPO)
    return BASE_REPO


def train(trainer_class, model, tokenizer, forget_rows, retain_rows, output, **kwargs):
    lora = kwargs.pop("lora", False)
    args = trainer_class.config_class(output_dir=str(output), max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3 if lora else 3e-4,
                                      disable_tqdm=True, use_cpu=True, seed=1, **kwargs)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM") if lora else None
    trainer = trainer_class(model=model, args=args, forget_dataset=forget_rows, retain_dataset=retain_rows,
                            processing_class=tokenizer, peft_config=peft)
    trainer.train()
    trainer.unlearning_metrics = {"forget": {"before": {"answer_probability": 0.99}, "after": {"answer_probability": 0.2}}}
    trainer.save_model()
    return trainer


def test_full_checkpoint_round_trip(run_cli, hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "npo")
    code, out, err = run_cli("push", tmp_path / "npo", "--repo_id", "tester/npo-full")
    assert code == 0, err
    assert re.search(r"pushed .* to tester/npo-full: http://127\.0\.0\.1:\d+/tester/npo-full/commit/[0-9a-f]{40}", out)
    assert len(HfApi().list_repo_commits("tester/npo-full")) == 2  # the repo's initial commit + one push

    local = snapshot_download("tester/npo-full")
    expected = logits(trainer.model, tokenizer)
    for loaded in (AutoModelForCausalLM.from_pretrained(local), AutoModelForCausalLM.from_pretrained("tester/npo-full"),
                   hubunlearn.load("tester/npo-full")):
        assert torch.equal(logits(loaded, tokenizer), expected)
    assert not any(name.endswith(".bin") for name in HfApi().list_repo_files("tester/npo-full"))


def test_adapter_round_trip_card_and_snippet(run_cli, hub_token, base_on_hub, model, tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = train(IHLTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "ihl", lora=True)
    code, _, err = run_cli("push", tmp_path / "ihl", "--repo_id", "tester/ihl-lora")
    assert code == 2 and "pass --base_model_id" in err  # a local base path would not load for anyone else
    code, _, err = run_cli("push", tmp_path / "ihl", "--repo_id", "tester/ihl-lora", "--base_model_id", base_on_hub)
    assert code == 0, err

    expected = logits(trainer.model, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_on_hub)
    with_transformers = AutoModelForCausalLM.from_pretrained(base_on_hub)
    with_transformers.load_adapter("tester/ihl-lora")
    for loaded in (PeftModel.from_pretrained(base, "tester/ihl-lora"), AutoPeftModelForCausalLM.from_pretrained("tester/ihl-lora"),
                   with_transformers, hubunlearn.load("tester/ihl-lora")):
        assert torch.equal(logits(loaded, tokenizer), expected)

    card = ModelCard.load("tester/ihl-lora")
    data = card.data.to_dict()
    assert data["base_model"] == base_on_hub and data["base_model_relation"] == "adapter" and data["library_name"] == "peft"
    assert {"unlearning", "hubunlearn", "ihl"} <= set(data["tags"]) and data["license"] == "mit"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.2
    assert "arXiv:2408.06621" in card.text and forget_rows[0]["answer"] not in card.text  # never the forget data
    record = json.loads(open(snapshot_download("tester/ihl-lora") + "/unlearning.json").read())
    assert record["base_model"]["name_or_path"] == base_on_hub and record["base_model"]["license"] == "mit"

    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    namespace = {}
    exec(snippet, namespace)  # the card's own loading code, against the loopback Hub
    assert torch.equal(logits(namespace["model"], namespace["tokenizer"]), expected)


def test_trainer_push_to_hub_goes_the_same_way(hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path):
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "auto", push_to_hub=True, hub_model_id="tester/auto-push")
    files = HfApi().list_repo_files("tester/auto-push")
    assert {"model.safetensors", "unlearning.json", "README.md"} <= set(files)
    card = ModelCard.load("tester/auto-push")
    assert 'from_pretrained("tester/auto-push")' in card.text and "NPO" in card.text


def test_branches_pull_requests_and_dry_runs(run_cli, hub, hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path):
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "a")
    assert run_cli("push", tmp_path / "a", "--repo_id", "tester/branchy")[0] == 0
    main_sha = HfApi().model_info("tester/branchy").sha
    (tmp_path / "a" / "notes.md").write_text("what changed")
    code, out, _ = run_cli("push", tmp_path / "a", "--repo_id", "tester/branchy", "--revision", "experiment", "--commit_message", "try")
    assert code == 0 and "notes.md" in HfApi().list_repo_files("tester/branchy", revision="experiment")
    assert HfApi().list_repo_commits("tester/branchy", revision="experiment")[0].title == "try"
    code, out, _ = run_cli("push", tmp_path / "a", "--repo_id", "tester/branchy", "--create_pr")
    assert code == 0 and re.search(r"/discussions/\d+$", out.strip())
    assert HfApi().model_info("tester/branchy").sha == main_sha and "notes.md" not in HfApi().list_repo_files("tester/branchy")

    before = len(hub.requests)
    code, out, _ = run_cli("push", tmp_path / "a", "--repo_id", "tester/never-created", "--dry_run")
    assert code == 0 and "model.safetensors" in out and "README.md" in out
    assert not any(method != "GET" and method != "HEAD" for method, _ in hub.requests[before:])


def test_failure_mid_push_leaves_the_repo_as_it_was(run_cli, hub, hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module, "FIRST_WAIT_S", 0.01)
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "v1")
    assert run_cli("push", tmp_path / "v1", "--repo_id", "tester/fragile")[0] == 0
    info = HfApi().model_info("tester/fragile", files_metadata=True)
    snapshot = {s.rfilename: (s.size, getattr(s.lfs, "sha256", None) if s.lfs else s.blob_id) for s in info.siblings}

    (tmp_path / "v1" / "unlearning.json").write_text((tmp_path / "v1" / "unlearning.json").read_text().replace('"NPO"', '"NPO "'))
    (tmp_path / "v1" / "notes.txt").write_text("new file")
    hub.fail_next(method="POST", path_contains="/commit/", status=500, times=hub_module.RETRIES)
    code, _, err = run_cli("push", tmp_path / "v1", "--repo_id", "tester/fragile")
    assert code == 1 and "nothing was committed" in err and f"after {hub_module.RETRIES} attempt" in err
    after = HfApi().model_info("tester/fragile", files_metadata=True)
    assert after.sha == info.sha
    assert {s.rfilename: (s.size, getattr(s.lfs, "sha256", None) if s.lfs else s.blob_id) for s in after.siblings} == snapshot

    hub.fail_next(method="POST", path_contains="/commit/", status=0, times=hub_module.RETRIES)  # the network drops
    code, _, err = run_cli("push", tmp_path / "v1", "--repo_id", "tester/fragile")
    assert code == 1 and "nothing was committed" in err and HfApi().model_info("tester/fragile").sha == info.sha

    hub.fail_next(method="POST", path_contains="/commit/", status=503, times=1)  # one transient failure: retried
    code, _, err = run_cli("push", tmp_path / "v1", "--repo_id", "tester/fragile")
    assert code == 0 and "retrying" in err and "notes.txt" in HfApi().list_repo_files("tester/fragile")


def test_bad_push_inputs(run_cli, hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path, monkeypatch):
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "ok")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ok", broken)
    (broken / "model.safetensors").unlink()
    bare = tmp_path / "bare"
    bare.mkdir()
    cases = [
        ((tmp_path / "ok", "--repo_id", "not a repo"), "invalid repo id"),
        ((tmp_path / "ok", "--repo_id", "no-namespace"), "has no namespace"),
        ((broken, "--repo_id", "tester/x"), "has no weights"),
        ((bare, "--repo_id", "tester/x"), "has no unlearning.json"),
        ((tmp_path / "missing", "--repo_id", "tester/x"), "is not a folder"),
    ]
    for args, message in cases:
        code, _, err = run_cli("push", *args)
        assert code == 2 and message in err.strip().splitlines()[-1], err
    HfApi(token=OTHER_TOKEN).create_repo("alice/hers", exist_ok=True)
    code, _, err = run_cli("push", tmp_path / "ok", "--repo_id", "alice/hers")
    assert code == 2 and "may not write to alice/hers (403)" in err
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    code, _, err = run_cli("push", tmp_path / "ok", "--repo_id", "tester/x")
    assert code == 2 and "refused the token (401)" in err
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli("push", tmp_path / "ok", "--repo_id", "tester/x")
    assert code == 2 and "run `hf auth login` or set HF_TOKEN" in err
    assert "hf_wrong" not in err and hub_token not in err


def test_load_refuses_what_it_cannot_load(hub_token, tmp_path):
    with pytest.raises(UsageError, match="neither a local folder nor a Hub repository"):
        hubunlearn.load("tester/does-not-exist")
    HfApi().create_repo("tester/plain-model", exist_ok=True)
    HfApi().upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="tester/plain-model")
    with pytest.raises(UsageError, match="not a hubunlearn artifact"):
        hubunlearn.load("tester/plain-model")
