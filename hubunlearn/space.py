"""The side-by-side demo: the same prompt to the original and the unlearned model (a Gradio Blocks app).

One set of weights in memory where possible: an adapter's original is a plain model sharing the adapter model's
base tensors, an ECO bundle's base model answers unguarded for the original; only a full checkpoint needs two
models. Nothing is switched globally: no adapter toggle, and ECO's corruption is selected per call (a context
variable), so concurrent requests (the queue runs ``CONCURRENCY`` at once) each get exactly the answer their model
gives alone. Prompt length, new tokens and concurrency are capped; errors reach the page as messages, never as
stack traces.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import RECORD_NAME, read_record
from .data import looks_like_repo_id
from .errors import UsageError

MAX_PROMPT_CHARS = 1000
MAX_NEW_TOKENS = 256
CONCURRENCY = 2


@dataclass
class SideBySide:
    """What the app compares: the unlearned artifact and its original, loaded once. Safe to call from many threads."""

    record: dict
    tokenizer: Any
    unlearned: Any
    original: Any  # a model of its own, the adapter's base tensors without the adapter, or an ECO bundle's base
    kind: str
    plots: list[Path]

    @classmethod
    def load(cls, unlearned: str, original: str | None = None, device: str | None = "auto") -> "SideBySide":
        """Both models on ``device`` (:func:`~hubunlearn.modeling.resolve_device`: ``auto`` is the GPU when there
        is one; a bad value or a missing GPU is a one-line :class:`UsageError` before anything loads)."""
        from .hub import load
        from .modeling import base_model_view, load_model, load_tokenizer, place, resolve_device

        resolve_device(device)

        folder = Path(unlearned)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import RepositoryNotFoundError

            try:
                folder = Path(snapshot_download(unlearned, allow_patterns=[RECORD_NAME, "README.md", "*.png"]))
            except RepositoryNotFoundError as error:
                raise UsageError(f"--unlearned {unlearned} is neither a local folder nor a Hub repository you can read "
                                 "(check the path, the repo id, and HF_TOKEN for private repositories)") from error
        record = read_record(folder)
        kind = record["artifact"]
        model = place(load(unlearned), device)
        tokenizer = load_tokenizer(unlearned)  # every artifact folder carries its tokenizer
        if kind == "full" or original:
            other = place(load_model(original or record["base_model"]["name_or_path"]), device).eval()
        elif kind == "lora":
            other = base_model_view(model)  # on the adapter model's device
        else:  # an ECO bundle's base model: its hook corrupts only the calls made through the bundle
            other = model.model
        plots = [folder / name for name in record.get("plots") or [] if (folder / name).is_file()]
        return cls(record, tokenizer, model.eval(), other, kind, plots)

    def flag(self, prompt: str) -> tuple[bool, float] | None:
        """For an ECO bundle: whether its classifier flags the prompt, and the score."""
        if self.kind != "eco":
            return None
        score = float(self.unlearned.classifier.scores([prompt])[0])
        return score >= self.unlearned.classifier.threshold, score

    def stream(self, which: str, prompt: str, max_new_tokens: int, temperature: float):
        """Yield the growing answer of ``which`` ("original" or "unlearned")."""
        from transformers import TextIteratorStreamer

        from .data import prompt_inputs
        from .modeling import model_device

        if which not in ("original", "unlearned"):
            raise ValueError(f"which must be 'original' or 'unlearned', not {which!r}")
        inputs = prompt_inputs(self.tokenizer, [prompt], return_tensors="pt")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        settings = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=pad)
        if temperature > 0:
            settings["temperature"] = temperature
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if which == "original":
            model, extra = self.original, {}
        else:
            model = self.unlearned
            extra = {"prompts": [prompt]} if self.kind == "eco" else {}
        inputs = {key: value.to(model_device(model)) for key, value in inputs.items()}  # where the model computes
        errors = []

        def run():
            try:
                with torch.no_grad():
                    model.generate(**inputs, streamer=streamer, **settings, **extra)
            except Exception as error:  # shown on the page; the worker must not die silently
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=run)
        worker.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield answer
        worker.join()
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")


EXAMPLE_GROUPS = {  # the record's example prompts, by set: what a visitor should expect of each
    "forget": "Forget-set questions: the unlearned model should no longer know these",
    "retain": "Retain-set questions: both models should still answer these",
}
ERROR_SECONDS = 8  # an error message closes itself, so a stale one never sits beside a later answer
CLOSE_MESSAGES_JS = "() => { document.querySelectorAll('[data-testid=\"toast-close\"]').forEach((button) => button.click()); }"


def examples(record: dict) -> dict[str, list[str]]:
    """The record's example prompts by group (``"forget"``, ``"retain"``), empty groups left out."""
    recorded = record.get("examples") or {}
    return {name: list(recorded[name]) for name in EXAMPLE_GROUPS if recorded.get(name)}


def model_name(name_or_path: str) -> str:
    """How the page names a model: its Hub id (also for a path into the Hub cache, ``…/models--ORG--NAME/
    snapshots/…``), else the local folder's name; never a whole cache path."""
    import re

    from .cards import hub_id

    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", name_or_path)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    return hub_id(name_or_path) or Path(name_or_path.rstrip("/\\")).name or name_or_path


def fill_prompt_js(prompts: list[str]) -> str:
    """Browser-side handler of a click on an example: the clicked sample's index (a ``gr.Dataset``'s value) to its
    prompt. No server round trip, so a click followed at once by "Ask both" always sends the example (on a fresh
    server the round trip of ``gr.Examples`` could arrive after the question, which then read an empty prompt)."""
    return f"(index) => {json.dumps(prompts)}[index]"


def build_demo(models: SideBySide, gpu=None):
    """The Blocks app: prompt, two streamed answers, settings, the ECO flag, and the card's metrics table.
    ``gpu``: a decorator for the generation function (``spaces.GPU`` on ZeroGPU hardware)."""
    try:
        import gradio as gr
    except ImportError as error:
        raise UsageError("the Space needs Gradio: pip install 'hubunlearn[space]'") from error

    from .cards import metrics_table

    def generate(prompt: str, max_new_tokens: float, temperature: float):
        prompt = (prompt or "").strip()
        if not prompt:
            raise gr.Error("Type a prompt first (or click one of the examples).", duration=ERROR_SECONDS)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}: shorten it and ask again.",
                           duration=ERROR_SECONDS)
        tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
        flag = models.flag(prompt)
        flag_text = "" if flag is None else f"ECO classifier: {'flagged' if flag[0] else 'not flagged'} (score {flag[1]:.3f})"
        original = unlearned = ""
        try:
            for original in models.stream("original", prompt, tokens, temperature):
                yield original, unlearned, flag_text
            for unlearned in models.stream("unlearned", prompt, tokens, temperature):
                yield original, unlearned, flag_text
        except RuntimeError as error:
            raise gr.Error(str(error), duration=ERROR_SECONDS) from None

    if gpu is not None:
        generate = gpu(generate)
    base = model_name(models.record["base_model"]["name_or_path"])
    title = f"{models.record['method']} unlearning of {base}"
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\nThe same prompt to the original model and to the unlearned one ({models.kind} artifact).")
        # No max_length: the browser would cut a longer paste silently; the server says what the limit is instead.
        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", info=f"Up to {MAX_PROMPT_CHARS} characters.")
        with gr.Row():
            max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0: greedy)")
        button = gr.Button("Ask both", variant="primary", elem_id="ask")
        with gr.Row():
            original = gr.Textbox(label="Original", lines=6, elem_id="original")
            unlearned = gr.Textbox(label="Unlearned", lines=6, elem_id="unlearned")
        flag = gr.Markdown(elem_id="flag")
        for group, prompts in examples(models.record).items():
            samples = gr.Dataset(components=[prompt], samples=[[p] for p in prompts], label=EXAMPLE_GROUPS[group],
                                 type="index", elem_id=f"examples-{group}")
            samples.click(None, [samples], [prompt], js=fill_prompt_js(prompts))
        with gr.Accordion("Before / after metrics (from the model card)", open=False):
            gr.Markdown(metrics_table(models.record))
            for plot in models.plots:
                gr.Image(str(plot), show_label=False)
        for ask in (button.click, prompt.submit):  # a new question closes the messages about earlier ones
            ask(None, js=CLOSE_MESSAGES_JS)
        button.click(generate, [prompt, max_new_tokens, temperature], [original, unlearned, flag], api_name="generate",
                     concurrency_limit=CONCURRENCY)
        prompt.submit(generate, [prompt, max_new_tokens, temperature], [original, unlearned, flag], api_name=False,
                      concurrency_limit=CONCURRENCY)
    return demo.queue(max_size=32, default_concurrency_limit=CONCURRENCY)


APP_TEMPLATE = "app.py"


def space_requirements() -> list[str]:
    """``requirements.txt`` of a deployed Space: Gradio at this version, and hubunlearn's own dependencies as its
    package metadata declares them (so a dependency added to ``pyproject.toml`` is never missing from a Space)."""
    import gradio
    from importlib.metadata import requires

    own = [r.split(";")[0].strip() for r in requires("hubunlearn") or [] if "extra ==" not in r]
    return [f"gradio=={gradio.__version__}", *own]


def space_files(unlearned: str, original: str | None, record: dict, hardware: str) -> dict[str, bytes]:
    """The Space repository: ``app.py``, ``requirements.txt``, a README whose metadata declares the Gradio SDK,
    the app file, the models and the hardware, and the ``hubunlearn`` package the app imports."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    from .resources import PACKAGE, resource_dir

    template = (resource_dir("spaces", "spaces") / APP_TEMPLATE).read_text()
    app = template.replace("{unlearned}", unlearned).replace("{original}", original or "")
    models = [unlearned, original or record["base_model"]["name_or_path"]]
    data = SpaceCardData(title=f"{record['method']} unlearning", sdk="gradio", sdk_version=gradio.__version__, app_file="app.py",
                         models=models, suggested_hardware=hardware, tags=["unlearning", "hubunlearn"], license=record["base_model"].get("license"))
    card = SpaceCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n# {{ title }}\n\n{{ body }}\n",
                                   title=f"{record['method']} unlearning: original and unlearned side by side",
                                   body=f"Compares `{models[1]}` with the unlearned `{unlearned}` on the same prompts. Made with hubunlearn.")
    files = {"app.py": app.encode(), "README.md": str(card).encode(),
             "requirements.txt": ("\n".join(space_requirements()) + "\n").encode()}
    for path in sorted(PACKAGE.rglob("*.py")):
        files[f"hubunlearn/{path.relative_to(PACKAGE)}"] = path.read_bytes()
    for path in sorted(resource_dir("model_cards", "model_cards").glob("*.md")):
        files[f"hubunlearn/model_cards/{path.name}"] = path.read_bytes()
    return files


def deploy(unlearned: str, space_id: str, original: str | None = None, hardware: str = "cpu-basic", private: bool = False,
           token: str | None = None) -> str:
    """Create (or update) the Space ``space_id`` in one commit; returns its URL. ``unlearned`` must be on the Hub."""
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    from .hub import _failure, _token

    if Path(unlearned).exists() or not looks_like_repo_id(unlearned):
        raise UsageError(f"a Space loads models from the Hub: push {unlearned} first (hubunlearn push FOLDER --repo_id ORG/NAME) "
                         "and pass its repo id to --unlearned")

    api = HfApi(token=token or _token())
    try:
        record = json.loads(Path(hf_hub_download(unlearned, RECORD_NAME, token=api.token)).read_text())
    except (RepositoryNotFoundError, EntryNotFoundError) as error:
        raise UsageError(f"--unlearned {unlearned} is not a hubunlearn artifact on the Hub that this token can read: "
                         "push it first (hubunlearn push FOLDER --repo_id ORG/NAME)") from error
    try:
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        operations = [CommitOperationAdd(name, content) for name, content in space_files(unlearned, original, record, hardware).items()]
        info = api.create_commit(space_id, operations, commit_message="Side-by-side demo made with hubunlearn", repo_type="space")
    except Exception as error:  # a refused token, a missing repository, a network failure: one line that says what to do
        raise _failure(error, space_id, api.endpoint, 1, False) from error
    return info.commit_url


def check_port(port: int) -> None:
    """Refuse a port outside 1-65535 or one another program listens on, before any model is loaded."""
    import socket

    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535; got {port}")
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UsageError(f"port {port} is taken ({error.strerror}): choose another --port") from error


def check_artifact(unlearned: str) -> None:
    if not Path(unlearned).exists() and not looks_like_repo_id(unlearned):
        raise UsageError(f"--unlearned {unlearned} is neither an artifact folder nor a Hub repo id (ORG/NAME)")
