"""Publishing artifacts to the Hub in one commit, and loading any artifact back by its ``unlearning.json``."""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import NEVER_SHIPPED, RECORD_NAME, read_record
from .cards import card_for_hub, card_text, hub_id, is_untouched
from .errors import HubUnlearnError, UsageError
from .modeling import hub_facts

logger = logging.getLogger(__name__)
WEIGHTS = {
    "full": ("model.safetensors", "model.safetensors.index.json"),
    "lora": ("adapter_model.safetensors",),
    "eco": ("classifier.safetensors", "classifier/model.safetensors"),
}
# Where an artifact names its base model: (file, read, write).
BASE_REFERENCES = {
    "lora": ("adapter_config.json", lambda c: c.get("base_model_name_or_path"), lambda c, v: c.__setitem__("base_model_name_or_path", v)),
    "eco": ("eco.json", lambda c: c["base_model"]["name_or_path"], lambda c, v: c["base_model"].__setitem__("name_or_path", v)),
}
RETRIES = 3
FIRST_WAIT_S = 1.0


@dataclass
class PushPlan:
    """What a push would upload: files from the folder plus files rewritten for the Hub (card, configs)."""

    folder: Path
    repo_id: str
    files: list[str]
    rewritten: dict[str, bytes]
    record: dict[str, Any]


def plan_push(folder: str | Path, repo_id: str, base_model_id: str | None = None) -> PushPlan:
    """Check an artifact folder and decide what goes into the commit; raises a one-line :class:`UsageError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"invalid repo id '{repo_id}': use ORG/NAME with letters, digits, '-', '_' or '.'") from error
    if "/" not in repo_id:
        raise UsageError(f"repo id '{repo_id}' has no namespace: use ORG/NAME (your user name or an organization)")
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: give the --output_dir of `hubunlearn unlearn`")
    record = read_record(folder)
    kind = record.get("artifact")
    if kind not in WEIGHTS:
        raise UsageError(f"{folder}/{RECORD_NAME} names an unknown artifact kind '{kind}'")
    if not any((folder / name).is_file() for name in WEIGHTS[kind]):
        raise UsageError(f"{folder} has no weights ({' or '.join(WEIGHTS[kind])}): it is not a complete {kind} artifact")

    rewritten: dict[str, bytes] = {}
    local_base = record["base_model"]["name_or_path"]
    if base_model_id is not None:
        if hub_id(base_model_id) is None:
            raise UsageError(f"--base_model_id '{base_model_id}' is not a Hub model id (ORG/NAME)")
        record["base_model"] = {**record["base_model"], "name_or_path": base_model_id, "local_path": local_base,
                                **hub_facts(base_model_id)}
        rewritten[RECORD_NAME] = (json.dumps(record, indent=2) + "\n").encode()
    if kind in BASE_REFERENCES:  # an adapter or a bundle names its base: it must be a Hub id for others to load it
        name, read, write = BASE_REFERENCES[kind]
        content = json.loads((folder / name).read_text())
        base = base_model_id or read(content)
        if hub_id(base) is None:
            raise UsageError(f"the {kind} artifact's base model is the local path '{base}': pass --base_model_id ORG/NAME, "
                             "the Hub id it was loaded from, so that it loads for others")
        if base != read(content):
            write(content, base)
            rewritten[name] = (json.dumps(content, indent=2) + "\n").encode()
    card = folder / "README.md"
    if not card.is_file() or is_untouched(card.read_text()):
        rewritten["README.md"] = card_text(record, repo_id).encode()
    else:  # an edited card is the user's: only what was rendered for the local folder becomes the repo id
        rewritten["README.md"] = card_for_hub(card.read_text(), repo_id, folder).encode()
    files = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith((".", "checkpoint-")) for part in p.relative_to(folder).parts)
        and p.name not in NEVER_SHIPPED
    )
    return PushPlan(folder, repo_id, [f for f in files if f not in rewritten], rewritten, record)


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UsageError("no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access")
    return token


def _network_errors() -> tuple[type[Exception], ...]:
    """Connection-level failures (refused, reset, timed out) of the HTTP libraries ``huggingface_hub`` may use."""
    errors: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            errors += (getattr(importlib.import_module(module), name),)
        except (ImportError, AttributeError):
            continue
    return errors


def _cause(error: BaseException) -> tuple[BaseException, int | None, str | None]:
    """The HTTP or network error inside a client error (LFS uploads come wrapped in RuntimeError), its HTTP
    status, and the file the chain names; the error itself when the chain holds neither."""
    found, path = error, None
    while found is not None and getattr(found, "response", None) is None and not isinstance(found, _network_errors()):
        path = path or next(iter(re.findall(r"uploading '(.+)' to the Hub", str(found))), None)
        found = found.__cause__ or found.__context__
    found = found or error
    return found, getattr(getattr(found, "response", None), "status_code", None), path


def _is_transient(error: BaseException, status: int | None) -> bool:
    return status in (408, 429) or (status or 0) >= 500 or (status is None and isinstance(error, _network_errors()))


def _detail(error: BaseException, status: int | None) -> str:
    text = f"{status} {getattr(error, 'server_message', None) or ''}" if status else f"{type(error).__name__}: {error}"
    return " ".join(text.split())  # one line; never the URL of an HTTP error (LFS upload URLs are signed)


def _failure(error: BaseException, repo_id: str, endpoint: str, attempts: int, created: bool) -> HubUnlearnError:
    """The one line for a push that failed: what happened, that nothing was committed, and what to do."""
    cause, status, path = _cause(error)
    detail = _detail(cause, status)
    kept = f"nothing was committed{f' ({repo_id} was created, empty)' if created else ''}"
    if status == 401:
        return UsageError(f"the Hub refused the token (401); {kept}: run `hf auth login` again or set HF_TOKEN to a valid token")
    if status == 403:
        return UsageError(f"the token may not write to {repo_id} (403); {kept}: use a write token, or a namespace you own")
    if status == 404:
        return UsageError(f"the Hub has no {repo_id} this token can write to ({detail}); {kept}: check that the "
                          "namespace in --repo_id exists and that you belong to it")
    if status == 413:
        what = f"'{path}'" if path else "the commit"
        return HubUnlearnError(f"the Hub refused {what} as too large ({detail}); {kept}: save the model in smaller "
                               "shards (save_pretrained(..., max_shard_size='2GB')) and push again")
    if status is None and isinstance(cause, _network_errors()):
        return HubUnlearnError(f"the Hub at {endpoint} could not be reached after {attempts} attempts ({detail}); {kept}: "
                               "check the connection (and HF_ENDPOINT), then run the same command again")
    if _is_transient(cause, status):
        return HubUnlearnError(f"push to {repo_id} failed after {attempts} attempts ({detail}); {kept}: "
                               "run the same command again later")
    return HubUnlearnError(f"the Hub refused the push to {repo_id} ({detail}); {kept}: fix what it names, "
                           "then push again (the same push would fail the same way)")


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, base_model_id: str | None = None,
         dry_run: bool = False, token: str | None = None):
    """Upload an artifact folder to ``repo_id`` in one commit; returns the ``CommitInfo`` (the plan when ``dry_run``,
    None when the repository already holds these files: then nothing is committed and no pull request opened).

    The repository is created when missing (and the branch, for ``revision``). A 5xx, 408, 429 or network error
    (also inside an LFS upload) is retried ``RETRIES`` times in all, with exponential backoff; the Hub applies a
    commit whole or not at all, so a push that finally fails leaves the repository as it was and raises a one-line
    :class:`HubUnlearnError` (a :class:`UsageError` for a token or repository id the Hub refuses).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    plan = plan_push(folder, repo_id, base_model_id)
    if dry_run:
        return plan
    api = HfApi(token=token or _token())
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name)) for name in plan.files]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in plan.rewritten.items()]
    message = commit_message or f"Upload {plan.record['method']} unlearning {plan.record['artifact']} with hubunlearn"
    created = False  # by this push, so that a failure can say the repository is there, empty
    for attempt in range(1, RETRIES + 1):
        try:
            if not created and not api.repo_exists(repo_id):
                api.create_repo(repo_id, private=private, exist_ok=True)
                created = True
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            head = api.repo_info(repo_id, revision=revision).sha
            commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
        except Exception as error:  # every client failure: HTTP, LFS (wrapped in RuntimeError), network, timeout
            cause, status, _ = _cause(error)
            if not _is_transient(cause, status) or attempt == RETRIES:
                raise _failure(error, repo_id, api.endpoint, attempt, created) from error
            wait = FIRST_WAIT_S * 2 ** (attempt - 1)
            logger.warning("push attempt %d of %d failed (%s); retrying in %.0f s", attempt, RETRIES, _detail(cause, status), wait)
            time.sleep(wait)
            continue
        if commit.oid == head:  # the client skips a commit that would change nothing
            logger.warning("nothing to push: %s already holds these files at %s; nothing was committed%s", repo_id,
                           commit.commit_url, " and no pull request opened" if create_pr else "")
            return None
        return commit
    raise AssertionError("unreachable")


def load(repo_or_dir: str, revision: str | None = None, **kwargs):
    """Load any hubunlearn artifact (local folder or Hub repo) as the right object, by its ``unlearning.json``:
    a ``transformers`` model for full checkpoints, a ``peft`` model (base + adapter) for LoRA adapters, an
    :class:`~hubunlearn.eco.ECOModel` (base + classifier) for ECO bundles."""
    folder = Path(repo_or_dir)
    if folder.is_dir():
        record = read_record(folder)
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            record = json.loads(Path(hf_hub_download(repo_or_dir, RECORD_NAME, revision=revision)).read_text())
        except RepositoryNotFoundError as error:
            raise UsageError(f"'{repo_or_dir}' is neither a local folder nor a Hub repository you can read") from error
        except EntryNotFoundError as error:
            raise UsageError(f"{repo_or_dir} has no {RECORD_NAME}: it is not a hubunlearn artifact") from error
    kind = record.get("artifact")
    if kind == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(repo_or_dir, revision=revision, **kwargs)
    if kind == "lora":
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(repo_or_dir, revision=revision, **kwargs)
    if kind == "eco":
        from .eco import ECOModel

        return ECOModel.from_pretrained(repo_or_dir, revision=revision, **kwargs)
    raise UsageError(f"{repo_or_dir} holds a '{kind}' artifact, which this version of hubunlearn cannot load: upgrade hubunlearn")
