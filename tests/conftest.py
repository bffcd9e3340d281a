"""Shared fixtures: a tiny Llama that knows the built-in world, taught once per session, offline."""

import json
import os
import sys
import tempfile
from pathlib import Path

from hubunlearn.testing import HubServer  # noqa: E402  (standard library only)

# Before any Hugging Face import: the Hub is a loopback server, caches live in a throw-away folder.
_HOME = tempfile.mkdtemp(prefix="hubunlearn-tests-")
# pytest-xdist workers inherit the controller's environment: they share one HUBUNLEARN_CACHE (keyed by content and
# locked, so the world model is taught once per run); each keeps its own Hub server and Hugging Face home.
_SHARED_CACHE = os.environ.setdefault("HUBUNLEARN_TESTS_SHARED_CACHE", os.path.join(_HOME, "cache"))
HUB_TOKEN = "hf_hubunlearn_tests_token"
OTHER_TOKEN = "hf_someone_else"  # user "alice", for the refusals a real Hub gives
HUB = HubServer(os.path.join(_HOME, "hub"), tokens={HUB_TOKEN: "tester", OTHER_TOKEN: "alice"}).start()
for name in [n for n in os.environ if n.startswith("HF_")]:
    del os.environ[name]
os.environ.update({
    "HF_ENDPOINT": HUB.url,
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HOME": os.path.join(_HOME, "hf"),
    "HF_DATASETS_OFFLINE": "1",  # the loopback Hub serves models, not `datasets` scripts
    "HUBUNLEARN_CACHE": _SHARED_CACHE,
})
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine's cores, shared out among the xdist workers (tiny models gain little from intra-op threads).
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hub():
    """The session's loopback Hub (hubunlearn.testing.HubServer); user "tester" owns HUB_TOKEN."""
    return HUB


@pytest.fixture()
def hub_token(monkeypatch):
    """Log in as "tester" for one test (through HF_TOKEN, as users do)."""
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return HUB_TOKEN


@pytest.fixture(scope="session")
def settings():
    from hubunlearn.quickstart import QuickstartSettings

    return QuickstartSettings()


@pytest.fixture(scope="session")
def world(settings):
    from hubunlearn.world import World

    return World.make(settings.num_people, settings.num_forget, settings.seed)


@pytest.fixture(scope="session")
def world_model_dir(settings) -> Path:
    """The quickstart's taught model (cached in HUBUNLEARN_CACHE, so the quickstart test reuses it)."""
    from hubunlearn.quickstart import world_model

    return world_model(settings)


@pytest.fixture(scope="session")
def world_reference_dir(world_model_dir, world, tmp_path_factory) -> Path:
    """A reference model for the world: the same recipe, taught without the forget people."""
    from transformers import AutoTokenizer

    from hubunlearn.world import teach, tiny_llama

    folder = tmp_path_factory.mktemp("world-reference")
    tokenizer = AutoTokenizer.from_pretrained(world_model_dir)
    model = teach(tiny_llama(tokenizer), tokenizer, world.rows("retain"), folder / "trainer", epochs=40, disable_tqdm=True)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="session")
def tokenizer(world_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world_model_dir)


@pytest.fixture()
def model(world_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world_model_dir)


@pytest.fixture(scope="session")
def forget_rows(world):
    return world.rows("forget")


@pytest.fixture(scope="session")
def retain_rows(world):
    return world.rows("retain")


@pytest.fixture(scope="session")
def mean_answer_probability(tokenizer):
    """``f(model, rows) -> mean length-normalised answer probability``."""
    from hubunlearn.data import DataFormat, tokenize_rows
    from hubunlearn.metrics import answer_probabilities

    def measure(model, rows):
        examples = list(tokenize_rows(rows, tokenizer, DataFormat(max_length=128)))
        values = answer_probabilities(model, examples, tokenizer.pad_token_id)
        return sum(values) / len(values)

    return measure


@pytest.fixture(scope="session")
def data_files(tmp_path_factory, world):
    """The world's forget and retain rows as JSONL files, for the CLI (test_cli.py extends its own copy)."""
    folder = tmp_path_factory.mktemp("data")
    for name in ("forget", "retain"):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in world.rows(name)))
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread computes them as fast as two and, unlike two, does not slow down tenfold when another
    process holds a core (OpenMP threads waiting on each other). A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def run_cli(capsys):
    """Run ``hubunlearn ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from hubunlearn.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def pytest_report_header():
    return f"TOFU data: {TOFU} ({'found' if TOFU.is_dir() else 'missing'}); python {sys.version.split()[0]}"
