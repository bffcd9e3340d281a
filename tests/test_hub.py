"""Push to a Hub (the loopback server of hubunlearn.testing), download, load: the same model comes back."""

import hashlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import httpx2
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, set_client_factory, snapshot_download
from huggingface_hub.utils import _http as client_http
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

import hubunlearn
from hubunlearn import hub as hub_module
from hubunlearn.errors import UsageError
from hubunlearn.testing import HubServer
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


def test_an_edited_local_card_is_pushed_naming_the_repo(run_cli, hub_token, model, tokenizer, forget_rows, retain_rows, tmp_path):
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "npo-run")
    readme = tmp_path / "npo-run" / "README.md"
    local = ModelCard(readme.read_text())
    assert "PATH_OR_REPO_ID" not in str(local) and local.text.lstrip().startswith("# npo-run\n")
    assert local.data.to_dict()["model-index"][0]["name"] == "npo-run" and f'from_pretrained("{tmp_path / "npo-run"}")' in local.text
    readme.write_text(readme.read_text().replace("## Limitations", "## Limitations\n\n- Checked by hand on our own prompts."))
    code, _, err = run_cli("push", tmp_path / "npo-run", "--repo_id", "tester/npo-edited")
    assert code == 0, err
    pushed = ModelCard.load("tester/npo-edited")
    assert "Checked by hand on our own prompts." in pushed.text and pushed.text.lstrip().startswith("# npo-edited\n")
    assert pushed.data.to_dict()["model-index"][0]["name"] == "npo-edited"
    assert 'from_pretrained("tester/npo-edited")' in pushed.text and str(tmp_path) not in str(pushed) and "npo-run" not in str(pushed)

    readme.write_text(readme.read_text() + f"\nThe weights are in {tmp_path / 'npo-run'}.\n")  # a mention push cannot tell from prose
    code, _, err = run_cli("push", tmp_path / "npo-run", "--repo_id", "tester/npo-edited")
    assert code == 2 and err.count("\n") == 1 and f"still names the local folder where the Hub repo belongs ({tmp_path / 'npo-run'})" in err


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
    train(NPOTrainer, model, tokenizer, forget_rows, retain_rows, tmp_path / "auto", push_to_hub=True, hub_model_id="tester/auto-push",
          bf16=True)
    files = HfApi().list_repo_files("tester/auto-push")
    assert {"model.safetensors", "unlearning.json", "README.md"} <= set(files)
    card = ModelCard.load("tester/auto-push")
    assert 'from_pretrained("tester/auto-push")' in card.text and "NPO" in card.text
    record = json.loads(open(snapshot_download("tester/auto-push") + "/unlearning.json").read())
    assert record["training"]["precision"] == {"mixed": "bf16", "tf32": None, "weights": "float32"}  # --bf16 is recorded
    assert "in bf16 mixed precision (weights in float32)." in card.text


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


@pytest.fixture(scope="module")
def trained(world_model_dir, tokenizer, forget_rows, retain_rows, tmp_path_factory):
    """One NPO artifact for the tests below, trained once; each pushes a copy of it."""
    folder = tmp_path_factory.mktemp("trained") / "npo"
    train(NPOTrainer, AutoModelForCausalLM.from_pretrained(world_model_dir), tokenizer, forget_rows, retain_rows, folder)
    return folder


@pytest.fixture()
def artifact(trained, tmp_path):
    folder = tmp_path / "artifact"
    shutil.copytree(trained, folder)
    return folder


@pytest.fixture()
def flaky_hub(hub, monkeypatch):
    """The loopback Hub for failure tests: with hubunlearn's and the client's own back-off waits cut short (the
    client retries each upload 5 times over 23 s), and the injected failures a test leaves unused dropped."""
    monkeypatch.setattr(hub_module, "FIRST_WAIT_S", 0.01)
    monkeypatch.setattr(client_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    yield hub
    hub.clear_failures()


def new_lfs_file(folder) -> str:
    """Write a file the Hub has never seen, which the next push uploads through LFS; returns its upload path."""
    content = os.urandom(1 << 16)
    (folder / "extra.bin").write_bytes(content)
    return f"/__lfs/upload/{hashlib.sha256(content).hexdigest()}"


def state(repo):
    """Every branch and pull request of ``repo`` with its commit (None when there is no such repository)."""
    return HfApi().list_repo_refs(repo, include_pull_requests=True) if HfApi().repo_exists(repo) else None


def one_line_failure(code, err, retries=0):
    """The push failed with one error line (after ``retries`` retry warnings), no traceback and no token."""
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err and HUB_TOKEN not in err, err
    assert lines[-1].startswith("hubunlearn: error: ") and "nothing was committed" in lines[-1], err
    assert len(lines) == retries + 1 and all("retrying in" in line for line in lines[:-1]), err
    return lines[-1]


def test_lfs_failures_are_retried_a_bounded_number_of_times(run_cli, flaky_hub, hub_token, artifact):
    assert run_cli("push", artifact, "--repo_id", "tester/lfs-flaky")[0] == 0
    before = state("tester/lfs-flaky")
    upload = new_lfs_file(artifact)
    start = len(flaky_hub.requests)
    flaky_hub.fail_next("PUT", upload, 500, times=100)
    code, _, err = run_cli("push", artifact, "--repo_id", "tester/lfs-flaky")
    line = one_line_failure(code, err, retries=hub_module.RETRIES - 1)
    assert f"push to tester/lfs-flaky failed after {hub_module.RETRIES} attempts (500 " in line and "run the same command again" in line
    uploads = [path for method, path in flaky_hub.requests[start:] if method == "PUT" and path == upload]
    assert len(uploads) % hub_module.RETRIES == 0 and hub_module.RETRIES < len(uploads) <= 6 * hub_module.RETRIES  # client x push
    assert state("tester/lfs-flaky") == before

    flaky_hub.clear_failures()
    flaky_hub.fail_next("PUT", upload, 500, times=len(uploads) // hub_module.RETRIES)  # all of one push attempt
    code, out, err = run_cli("push", artifact, "--repo_id", "tester/lfs-flaky")
    assert code == 0 and err.count("retrying in") == 1 and "pushed" in out, err
    assert "extra.bin" in HfApi().list_repo_files("tester/lfs-flaky")


@pytest.mark.parametrize("method, path, status, repo, code, says", [
    ("PUT", "{upload}", 413, "tester/refused", 1, "the Hub refused 'extra.bin' as too large (413"),
    ("PUT", "{upload}", 403, "tester/refused", 2, "the token may not write to tester/refused (403)"),
    ("PUT", "{upload}", 401, "tester/refused", 2, "the Hub refused the token (401)"),
    ("POST", "/commit/", 422, "tester/refused", 1, "the Hub refused the push to tester/refused (422 Injected failure"),
    ("POST", "/api/repos/create", 404, "no-such-org/model", 2, "the Hub has no no-such-org/model this token can write to (404"),
])
def test_permanent_refusals_are_not_retried(run_cli, flaky_hub, hub_token, artifact, method, path, status, repo, code, says):
    HfApi().create_repo("tester/refused", exist_ok=True)
    before = state(repo)
    path = path.format(upload=new_lfs_file(artifact))
    start = len(flaky_hub.requests)
    flaky_hub.fail_next(method, path, status)
    exit_code, _, err = run_cli("push", artifact, "--repo_id", repo)
    line = one_line_failure(exit_code, err)
    assert exit_code == code and says in line and "run the same command again" not in line, line
    assert sum(m == method and path in p for m, p in flaky_hub.requests[start:]) == 1  # neither push nor client retried
    assert state(repo) == before


def test_an_unreachable_hub_ends_in_one_line(run_cli, flaky_hub, hub_token, artifact, tmp_path, monkeypatch):
    with HubServer(tmp_path / "gone") as gone:
        url = gone.url  # nobody listens there any more
    monkeypatch.setattr(constants, "ENDPOINT", url)
    start = len(flaky_hub.requests)
    code, _, err = run_cli("push", artifact, "--repo_id", "tester/unreachable")
    line = one_line_failure(code, err, retries=hub_module.RETRIES - 1)
    assert f"the Hub at {url} could not be reached after {hub_module.RETRIES} attempts (ConnectError: " in line
    assert "check the connection" in line and len(flaky_hub.requests) == start


@pytest.fixture()
def short_timeout():
    """A timeout for the client (it has none by default: a stalled Hub hangs a push), set the way users set it."""
    def client():
        session = client_http.default_client_factory()
        session.timeout = httpx2.Timeout(2.0)
        return session

    set_client_factory(client)
    yield
    set_client_factory(client_http.default_client_factory)


def test_a_stalled_hub_times_out_and_is_retried(run_cli, flaky_hub, hub_token, artifact, short_timeout):
    flaky_hub.fail_next("POST", "/api/repos/create", 0, times=hub_module.RETRIES, stall_s=4)
    code, _, err = run_cli("push", artifact, "--repo_id", "tester/stalled")
    line = one_line_failure(code, err, retries=hub_module.RETRIES - 1)
    assert f"could not be reached after {hub_module.RETRIES} attempts (ReadTimeout: " in line
    assert not HfApi().repo_exists("tester/stalled")

    flaky_hub.fail_next("POST", "/api/repos/create", 0, times=1, stall_s=4)
    code, out, err = run_cli("push", artifact, "--repo_id", "tester/stalled")
    assert code == 0 and err.count("ReadTimeout") == 1 and "retrying in" in err and "pushed" in out, err


def test_a_failed_push_says_it_created_the_repository_empty(run_cli, flaky_hub, hub_token, artifact):
    flaky_hub.fail_next("POST", "/commit/", 500, times=hub_module.RETRIES)
    code, _, err = run_cli("push", artifact, "--repo_id", "tester/born-empty")
    line = one_line_failure(code, err, retries=hub_module.RETRIES - 1)
    assert "nothing was committed (tester/born-empty was created, empty)" in line
    assert [c.title for c in HfApi().list_repo_commits("tester/born-empty")] == ["initial commit"]


def test_pushing_what_is_there_commits_nothing(run_cli, hub_token, artifact):
    assert run_cli("push", artifact, "--repo_id", "tester/same")[0] == 0
    sha = HfApi().model_info("tester/same").sha
    code, out, err = run_cli("push", artifact, "--repo_id", "tester/same")
    assert code == 0 and "pushed" not in out and "nothing to push: tester/same already holds these files at " in err
    assert f"/commit/{sha}; nothing was committed" in err
    code, out, err = run_cli("push", artifact, "--repo_id", "tester/same", "--create_pr")
    assert code == 0 and "pushed" not in out and "nothing was committed and no pull request opened" in err
    assert HfApi().list_repo_refs("tester/same", include_pull_requests=True).pull_requests == []
    assert HfApi().model_info("tester/same").sha == sha and len(HfApi().list_repo_commits("tester/same")) == 2


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
