"""Gated data on the Hub: one line that says how to get access, never a traceback.

The WMDP bio forget corpus (``cais/wmdp-bio-forget-corpus``; the public ``cais/wmdp-corpora`` holds the cyber
corpora and the bio retain corpus only) is released on request: the Hub serves it only to accounts whose access
request was granted, and text derived from it may not be redistributed (Li et al., arXiv 2403.03218).
"""

from __future__ import annotations

GATED_DATASETS = {"cais/wmdp-bio-forget-corpus": "the WMDP bio forget corpus"}
MOVED = {("cais/wmdp-corpora", "bio-forget-corpus"): "cais/wmdp-bio-forget-corpus"}  # (repo, config) -> where it is


def gated_message(repo_id: str | None, error: BaseException | None = None, config: str | None = None) -> str | None:
    """How to get access to ``repo_id`` when it is gated (a known gated data set, or ``error`` says so), else None."""
    moved = MOVED.get((repo_id, config))
    if moved:
        return (f"{repo_id} has no '{config}': {GATED_DATASETS[moved]} is the gated data set {moved}; "
                + _how(moved))
    text = " ".join(str(e) for e in error_chain(error)).lower()
    names = {type(e).__name__ for e in error_chain(error)}
    if repo_id in GATED_DATASETS or "GatedRepoError" in names or "gated" in text:
        what = GATED_DATASETS.get(repo_id, "this data set")
        return f"{repo_id} ({what}) is gated on the Hub: " + _how(repo_id)
    return None


def _how(repo_id: str) -> str:
    return (f"request access at https://huggingface.co/datasets/{repo_id}, then log in (`hf auth login` or HF_TOKEN) "
            "and run online once; or give the rows as a local file")


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it came from (``__cause__``, else ``__context__``), outermost first."""
    seen, chain = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def hub_unreachable(error: BaseException) -> bool:
    """Whether ``error`` (or one it came from) says the Hub could not be reached (offline mode or no network)."""
    chain = error_chain(error)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "TimeoutException"}) \
        or "couldn't reach" in text or "offline" in text
