"""The local Hub (``hubunlearn.testing.HubServer``) against the real, unmodified ``huggingface_hub`` client.

Each scenario runs the client in a fresh Python process: ``huggingface_hub`` reads ``HF_ENDPOINT`` at import time,
and this file must not depend on how the rest of the test session configured it.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from hubunlearn.testing import HubServer

TOKEN, OTHER = "hf_test_token", "hf_other_token"
BIG = 12 * 1024 * 1024

PRELUDE = """
import json, os, sys
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
args = json.loads(sys.stdin.read())
api = HfApi()
result = {}

def error_of(call):
    try:
        call()
    except Exception as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        return {"classes": [c.__name__ for c in type(error).__mro__], "status": status, "text": str(error)}
    return None
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubServer(tmp_path_factory.mktemp("hub"), tokens={TOKEN: "tester", OTHER: "other"}) as server:
        yield server


def run_client(hub, home, code: str, token: str | None = TOKEN, **args) -> dict:
    """Run ``code`` after PRELUDE in a fresh Python pointed at ``hub``; return the ``result`` dict it filled."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.client_env(token=token), HF_HOME=str(home))
    script = PRELUDE + textwrap.dedent(code) + "\nprint('RESULT=' + json.dumps(result))\n"
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(args), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(next(line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT=")))


@pytest.fixture()
def client(hub, tmp_path):
    """``client(code, token=TOKEN, **args)``: :func:`run_client` with a fresh ``HF_HOME``."""
    return lambda code, token=TOKEN, **args: run_client(hub, tmp_path / "hf_home", code, token, **args)


def http(hub, method: str, path: str, body: bytes | None = None, token: str | None = None, headers=None):
    """A raw request to the server: ``(status, headers, body)``, errors included."""
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(hub.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def main_sha(hub, repo: str, token: str = TOKEN) -> str:
    status, _, body = http(hub, "GET", f"/api/models/{repo}", token=token)
    assert status == 200
    return json.loads(body)["sha"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    (folder / "model.safetensors").write_bytes(os.urandom(BIG))
    (folder / "config.json").write_text('{"hidden_size": 8}\n')
    (folder / "nested").mkdir()
    (folder / "nested" / "notes.txt").write_text("small text file\n")
    return folder


@pytest.fixture(scope="module")
def pushed(hub, model_folder, tmp_path_factory):
    """``tester/round-trip``, created and filled by one ``upload_folder``; what the client saw along the way."""
    hub.requests.clear()
    result = run_client(hub, tmp_path_factory.mktemp("hf_home"), """
        repo = "tester/round-trip"
        api.create_repo(repo)
        before = api.model_info(repo).sha
        commit = api.upload_folder(repo_id=repo, folder_path=args["folder"], commit_message="weights")
        info = api.model_info(repo, files_metadata=True)
        meta = get_hf_file_metadata(hf_hub_url(repo, "config.json"))
        result.update(
            before=before, oid=commit.oid, commit_url=commit.commit_url, sha=info.sha, header_commit=meta.commit_hash,
            lfs={s.rfilename: s.lfs is not None for s in info.siblings},
            sizes={s.rfilename: s.size for s in info.siblings},
            files=api.list_repo_files(repo),
            titles=[c.title for c in api.list_repo_commits(repo)],
            snapshot=snapshot_download(repo),
            single=hf_hub_download(repo, "nested/notes.txt"),
        )
    """, folder=str(model_folder))
    return result, list(hub.requests)


def test_round_trip_is_byte_identical(pushed, model_folder):
    result, _ = pushed
    for name in ("model.safetensors", "config.json", "nested/notes.txt"):
        downloaded = os.path.join(result["snapshot"], name)
        assert open(downloaded, "rb").read() == (model_folder / name).read_bytes(), name
    assert open(result["single"], "rb").read() == (model_folder / "nested" / "notes.txt").read_bytes()


def test_upload_folder_is_one_commit_and_the_sha_matches_downloads(pushed):
    result, requests = pushed
    assert result["titles"] == ["weights", "initial commit"]
    assert result["oid"] != result["before"]
    assert result["sha"] == result["oid"] == result["header_commit"]
    assert result["snapshot"].endswith(result["sha"])
    assert result["commit_url"].endswith(f"/tester/round-trip/commit/{result['oid']}")
    assert sum(1 for method, path in requests if method == "POST" and "/commit/" in path) == 1


def test_lfs_for_big_binary_files_regular_for_small_text(pushed, model_folder):
    result, requests = pushed
    assert sorted(result["files"]) == [".gitattributes", "config.json", "model.safetensors", "nested/notes.txt"]
    assert result["lfs"] == {".gitattributes": False, "config.json": False, "model.safetensors": True,
                             "nested/notes.txt": False}
    assert result["sizes"]["model.safetensors"] == BIG
    puts = [path for method, path in requests if method == "PUT"]
    assert puts == ["/__lfs/upload/" + hashlib.sha256((model_folder / "model.safetensors").read_bytes()).hexdigest()]
    assert ("POST", "/tester/round-trip.git/info/lfs/objects/batch") in requests


def test_whoami_and_a_bad_token(client):
    result = client("""
        result["name"] = api.whoami()["name"]
        result["whoami"] = error_of(lambda: HfApi(token="hf_wrong").whoami())
        result["info"] = error_of(lambda: HfApi(token="hf_wrong").model_info("tester/round-trip"))
    """)
    assert result["name"] == "tester"
    for key in ("whoami", "info"):
        assert "HfHubHTTPError" in result[key]["classes"] and result[key]["status"] == 401
    assert "RepositoryNotFoundError" not in result["info"]["classes"]  # a bad token is not a missing repo


def test_missing_repo_file_and_revision_raise_the_clients_errors(client, pushed):
    result = client("""
        result["repo"] = error_of(lambda: api.model_info("tester/no-such-repo"))
        result["repo_download"] = error_of(lambda: hf_hub_download("tester/no-such-repo", "config.json"))
        result["file"] = error_of(lambda: hf_hub_download("tester/round-trip", "missing.json"))
        result["revision"] = error_of(lambda: hf_hub_download("tester/round-trip", "config.json", revision="nope"))
        result["exists"] = [api.repo_exists("tester/round-trip"), api.repo_exists("tester/no-such-repo"),
                            api.file_exists("tester/round-trip", "config.json"),
                            api.file_exists("tester/round-trip", "missing.json")]
    """)
    assert "RepositoryNotFoundError" in result["repo"]["classes"]
    assert "RepositoryNotFoundError" in result["repo_download"]["classes"]
    assert "EntryNotFoundError" in result["file"]["classes"] and result["file"]["status"] == 404
    assert "RevisionNotFoundError" in result["revision"]["classes"]
    assert result["exists"] == [True, False, True, False]


def test_space_with_an_sdk(client):
    result = client("""
        url = api.create_repo("tester/demo", repo_type="space", space_sdk="gradio")
        result["url"], result["type"] = str(url), url.repo_type
        result["sdk"] = api.space_info("tester/demo").sdk
        result["again"] = error_of(lambda: api.create_repo("tester/demo", repo_type="space", space_sdk="gradio"))
        result["exist_ok"] = str(api.create_repo("tester/demo", repo_type="space", space_sdk="gradio", exist_ok=True))
        api.upload_file(path_or_fileobj=b"import gradio\\n", path_in_repo="app.py", repo_id="tester/demo",
                        repo_type="space")
        result["app"] = open(hf_hub_download("tester/demo", "app.py", repo_type="space")).read()
        result["as_model"] = error_of(lambda: api.model_info("tester/demo"))
    """)
    assert result["url"].endswith("/spaces/tester/demo") and result["type"] == "space"
    assert result["sdk"] == "gradio"
    assert result["again"]["status"] == 409 and result["exist_ok"] == result["url"]
    assert result["app"] == "import gradio\n"
    assert "RepositoryNotFoundError" in result["as_model"]["classes"]


def test_create_pr_leaves_main_alone(client, hub):
    http(hub, "POST", "/api/repos/create", json.dumps({"name": "pr-repo"}).encode(), TOKEN)
    main_before = main_sha(hub, "tester/pr-repo")
    result = client("""
        commit = api.upload_file(path_or_fileobj=b"{}", path_in_repo="proposal.json", repo_id="tester/pr-repo",
                                 create_pr=True)
        result.update(pr_url=commit.pr_url, pr_revision=commit.pr_revision, oid=commit.oid,
                      main=api.list_repo_files("tester/pr-repo"),
                      pr=api.list_repo_files("tester/pr-repo", revision=commit.pr_revision),
                      pr_sha=api.model_info("tester/pr-repo", revision=commit.pr_revision).sha,
                      prs=[r.ref for r in api.list_repo_refs("tester/pr-repo", include_pull_requests=True)
                           .pull_requests])
    """)
    assert result["pr_url"].endswith("/tester/pr-repo/discussions/1") and result["pr_revision"] == "refs/pr/1"
    assert main_sha(hub, "tester/pr-repo") == main_before
    assert "proposal.json" in result["pr"] and "proposal.json" not in result["main"]
    assert result["pr_sha"] == result["oid"] and result["prs"] == ["refs/pr/1"]


def test_branch_revision(client, hub):
    result = client("""
        api.create_repo("tester/branchy")
        api.create_branch("tester/branchy", branch="ablation")
        api.create_branch("tester/branchy", branch="ablation", exist_ok=True)
        api.upload_file(path_or_fileobj=b"b", path_in_repo="only-on-branch.txt", repo_id="tester/branchy",
                        revision="ablation")
        result["branches"] = sorted(b.name for b in api.list_repo_refs("tester/branchy").branches)
        result["main"] = api.list_repo_files("tester/branchy")
        result["text"] = open(hf_hub_download("tester/branchy", "only-on-branch.txt", revision="ablation")).read()
        result["on_main"] = error_of(lambda: hf_hub_download("tester/branchy", "only-on-branch.txt"))
    """)
    assert result["branches"] == ["ablation", "main"]
    assert result["main"] == [".gitattributes"] and result["text"] == "b"
    assert "EntryNotFoundError" in result["on_main"]["classes"]


def test_injected_commit_failure_changes_nothing(client, hub, model_folder):
    http(hub, "POST", "/api/repos/create", json.dumps({"name": "flaky"}).encode(), TOKEN)

    def state():
        return main_sha(hub, "tester/flaky"), http(hub, "GET", "/api/models/tester/flaky/tree/main?recursive=1")[2]

    before = state()
    hub.fail_next(method="POST", path_contains="/commit/", status=500)
    commits_seen = len([r for r in hub.requests if "/commit/" in r[1]])
    result = client("""
        result["error"] = error_of(lambda: api.upload_folder(repo_id="tester/flaky", folder_path=args["folder"]))
    """, folder=str(model_folder))
    assert result["error"]["status"] == 500 and "HfHubHTTPError" in result["error"]["classes"]
    assert len([r for r in hub.requests if "/commit/" in r[1]]) == commits_seen + 1
    assert state() == before
    retried = client("""result["oid"] = api.upload_folder(repo_id="tester/flaky", folder_path=args["folder"]).oid""",
                     folder=str(model_folder))
    assert main_sha(hub, "tester/flaky") == retried["oid"] != before[0]


def test_a_commit_applies_whole_or_not_at_all(hub):
    http(hub, "POST", "/api/repos/create", json.dumps({"name": "atomic"}).encode(), TOKEN)
    before = main_sha(hub, "tester/atomic")
    lines = [{"key": "header", "value": {"summary": "half"}},
             {"key": "file", "value": {"path": "ok.txt", "content": "aGk=", "encoding": "base64"}},
             {"key": "lfsFile", "value": {"path": "w.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 3}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, _ = http(hub, "POST", "/api/models/tester/atomic/commit/main", body, TOKEN)
    assert status == 422 and main_sha(hub, "tester/atomic") == before
    stale = [{"key": "header", "value": {"summary": "stale", "parentCommit": "f" * 40}}, lines[1]]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in stale)
    assert http(hub, "POST", "/api/models/tester/atomic/commit/main", body, TOKEN)[0] == 412
    assert main_sha(hub, "tester/atomic") == before


def test_private_repo_is_invisible_to_others(client, hub, tmp_path):
    result = client("""
        api.create_repo("tester/secret", private=True)
        api.create_repo("tester/public")
        api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="tester/secret")
        result["owner"] = open(hf_hub_download("tester/secret", "s.txt")).read()
        anonymous, other = HfApi(token=False), HfApi(token=args["other"])
        result["anonymous_info"] = error_of(lambda: anonymous.model_info("tester/secret"))
        result["anonymous_download"] = error_of(  # a fresh cache: the client would serve the owner's copy
            lambda: hf_hub_download("tester/secret", "s.txt", token=False, cache_dir=args["cache"]))
        result["other_info"] = error_of(lambda: other.model_info("tester/secret"))
        result["other_write"] = error_of(lambda: other.upload_file(path_or_fileobj=b"x", path_in_repo="x",
                                                                   repo_id="tester/public"))
    """, other=OTHER, cache=str(tmp_path / "anonymous-cache"))
    assert result["owner"] == "s"
    assert "RepositoryNotFoundError" in result["anonymous_info"]["classes"]
    assert "RepositoryNotFoundError" in result["anonymous_download"]["classes"]
    assert "RepositoryNotFoundError" in result["other_info"]["classes"] and result["other_info"]["status"] == 404
    assert result["other_write"]["status"] == 403
    status, headers, _ = http(hub, "HEAD", "/tester/secret/resolve/main/s.txt")
    assert status == 401 and headers["X-Error-Code"] == "RepoNotFound"


def test_fail_next_counts_and_records(hub):
    hub.fail_next(method="GET", path_contains="/api/whoami", status=503, times=2)
    statuses = [http(hub, "GET", "/api/whoami-v2", token=TOKEN)[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert hub.requests[-3:] == [("GET", "/api/whoami-v2")] * 3
