"""The side-by-side Space: its API through gradio_client, a real browser, and a deployment to the loopback Hub."""

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from hubunlearn.testing import free_port
from hubunlearn.trainers import ECOConfig, ECOTrainer, GradDiffTrainer

from .test_trainers import config

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def lora_artifact(world_model_dir, world, tmp_path_factory):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path_factory.mktemp("space") / "graddiff-lora"
    trainer = GradDiffTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir), args=config(GradDiffTrainer, output, learning_rate=1e-2),
                              forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                              processing_class=AutoTokenizer.from_pretrained(world_model_dir),
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model()
    return output


@pytest.fixture(scope="module")
def full_artifact(world_model_dir, world, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path_factory.mktemp("space") / "graddiff-full"
    trainer = GradDiffTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir), args=config(GradDiffTrainer, output, learning_rate=1e-3),
                              forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                              processing_class=AutoTokenizer.from_pretrained(world_model_dir))
    trainer.train()
    trainer.save_model()
    return output


@pytest.fixture(scope="module")
def eco_artifact(world_model_dir, world, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path_factory.mktemp("space") / "eco"
    trainer = ECOTrainer(model=AutoModelForCausalLM.from_pretrained(world_model_dir),
                         args=ECOConfig(output_dir=str(output), classifier_alpha=0.25, target_probability=0.05, use_cpu=True),
                         forget_dataset=world.rows("forget"), retain_dataset=world.rows("retain"),
                         processing_class=AutoTokenizer.from_pretrained(world_model_dir))
    trainer.train()
    trainer.save_model()
    return output


@pytest.fixture()
def serve():
    """``serve(artifact) -> url`` of the app running in this process; closed after the test."""
    from hubunlearn.space import SideBySide, build_demo

    demos = []

    def start(artifact):
        demo = build_demo(SideBySide.load(str(artifact)))
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        demos.append(demo)
        return f"http://127.0.0.1:{port}/"

    yield start
    for demo in demos:
        demo.close()


def final(stream) -> str:
    answer = ""
    for answer in stream:
        pass
    return answer


@pytest.mark.parametrize("kind", ["full", "lora", "eco"])
def test_overlapping_requests_each_get_the_answer_their_model_gives_alone(request, kind, world):
    """Many requests of both kinds at once, on the same prompts (same shapes, the worst case for shared state):
    every answer must equal that model's answer alone. A global adapter toggle or a shared ECO selection fails."""
    from hubunlearn.space import SideBySide

    models = SideBySide.load(str(request.getfixturevalue(f"{kind}_artifact")))
    prompts = [r["question"] for r in world.rows("forget")[:2]] + [world.rows("retain")[0]["question"]]
    jobs = [(which, prompt) for which in ("original", "unlearned") for prompt in prompts]
    alone = {job: final(models.stream(*job, 24, 0.0)) for job in jobs}
    assert all(alone[("original", p)] != alone[("unlearned", p)] for p in prompts[:2])  # forgotten: the two differ
    overlapping = jobs * 6
    random.Random(0).shuffle(overlapping)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda job: final(models.stream(*job, 24, 0.0)), overlapping))
    wrong = [(job, answer) for job, answer in zip(overlapping, answers) if answer != alone[job]]
    assert not wrong, f"{len(wrong)} of {len(overlapping)} overlapping answers differ from the model's own: {wrong[:2]}"


@pytest.mark.parametrize("kind", ["full", "lora", "eco"])
def test_both_models_compute_on_the_device_asked(request, kind, world):
    """SideBySide.load puts the unlearned model and its original on the device asked (the default auto: the GPU when
    there is one) and generation runs there: on an accelerator, the answers equal those of --device cpu."""
    from hubunlearn.modeling import model_device, resolve_device
    from hubunlearn.space import SideBySide

    artifact = str(request.getfixturevalue(f"{kind}_artifact"))
    models = SideBySide.load(artifact)
    wanted = resolve_device("auto").type
    assert {model_device(getattr(models, which)).type for which in ("original", "unlearned")} == {wanted}
    prompt = world.rows("forget")[0]["question"]
    answers = {which: final(models.stream(which, prompt, 12, 0.0)) for which in ("original", "unlearned")}
    assert answers["original"] and answers["original"] != answers["unlearned"]
    if wanted != "cpu":
        on_cpu = SideBySide.load(artifact, device="cpu")
        assert {model_device(on_cpu.original).type, model_device(on_cpu.unlearned).type} == {"cpu"}
        assert answers == {which: final(on_cpu.stream(which, prompt, 12, 0.0)) for which in ("original", "unlearned")}


def test_app_serves_overlapping_submits_with_each_models_own_answer(serve, lora_artifact, world):
    from gradio_client import Client

    client = Client(serve(lora_artifact), verbose=False)
    prompts = [world.rows("forget")[0]["question"], world.rows("forget")[1]["question"]]
    alone = {prompt: client.predict(prompt, 24, 0.0, api_name="/generate")[:2] for prompt in prompts}
    for _ in range(4):  # two users at once, as the queue's concurrency limit allows
        jobs = [(prompt, client.submit(prompt, 24, 0.0, api_name="/generate")) for prompt in prompts * 2]
        for prompt, job in jobs:
            assert tuple(job.result()[:2]) == tuple(alone[prompt])


def test_api_forget_prompt_answers_differ_and_limits_hold(serve, lora_artifact, world):
    from gradio_client import Client

    record = json.loads((lora_artifact / "unlearning.json").read_text())
    assert record["examples"]["forget"] == [r["question"] for r in world.rows("forget")[:3]]  # demo prompts, no answers
    client = Client(serve(lora_artifact), verbose=False)
    fact = world.rows("forget")[0]
    original, unlearned, flag = client.predict(fact["question"], 24, 0.0, api_name="/generate")
    assert fact["answer"].split()[-1].strip(".") in original  # the original still knows
    assert original != unlearned and flag == ""
    with pytest.raises(Exception, match="the limit is 1000"):
        client.predict("x" * 1001, 8, 0.0, api_name="/generate")
    with pytest.raises(Exception, match="Type a prompt first"):
        client.predict("   ", 8, 0.0, api_name="/generate")


def test_eco_bundle_unflagged_prompt_gives_identical_answers(serve, eco_artifact, world):
    from gradio_client import Client

    client = Client(serve(eco_artifact), verbose=False)
    original, unlearned, flag = client.predict(world.rows("retain")[0]["question"], 16, 0.0, api_name="/generate")
    assert original == unlearned and "not flagged" in flag
    original, unlearned, flag = client.predict(world.rows("forget")[0]["question"], 16, 0.0, api_name="/generate")
    assert "ECO classifier: flagged" in flag and original != unlearned


def answered(page, text: str) -> None:
    """Wait until the original model's answer contains ``text`` and both answers are in."""
    page.wait_for_function("([text]) => document.querySelector('#original textarea').value.includes(text) "
                           "&& document.querySelector('#unlearned textarea').value.length > 0", arg=[text], timeout=60_000)
    previous = None
    for _ in range(60):  # the unlearned answer streams to its end: unchanged for a second (a fixed wait was short under load)
        page.wait_for_timeout(1000)
        current = page.locator("#unlearned textarea").input_value()
        if current == previous:
            break
        previous = current


def test_eval_takes_a_hub_eco_bundle_as_space_and_load_do(run_cli, hub_token, eco_artifact, world_model_dir, tmp_path):
    """An ECO bundle on the Hub is a model to `eval` (it was refused: no config.json), as to `space` and `load`."""
    from huggingface_hub import HfApi

    HfApi().create_repo("tester/eco-base", exist_ok=True)
    HfApi().upload_folder(folder_path=str(world_model_dir), repo_id="tester/eco-base", ignore_patterns=["README.md"])
    code, _, err = run_cli("push", eco_artifact, "--repo_id", "tester/eco-bundle", "--base_model_id", "tester/eco-base")
    assert code == 0, err
    results = {}
    for name, model in (("bundle", "tester/eco-bundle"), ("base", "tester/eco-base")):
        code, _, err = run_cli("eval", "--model", model, "--benchmark", "world", "--metrics", "probability", "--max_examples", "4",
                               "--output_dir", tmp_path / name)
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "summary.json").read_text())["sets"]
    assert results["base"]["forget"]["probability"] > 0.9  # the base model knows the forget people...
    assert results["bundle"]["forget"]["probability"] < 0.5 * results["base"]["forget"]["probability"]  # ...through the bundle it does not
    assert results["bundle"]["retain"]["probability"] == pytest.approx(results["base"]["retain"]["probability"], abs=0.05)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_example_then_ask_on_fresh_servers_and_messages_that_close(serve, lora_artifact, world_model_dir, world, tmp_path):
    """On a freshly started server, click an example and at once "Ask both": the example's question is asked (it
    used to reach the server as an empty prompt, 3 of 3 fresh servers). An error (an over-long prompt, which the
    browser must not cut silently) closes when the next question is asked."""
    from playwright.sync_api import sync_playwright

    forget, retain = world.rows("forget")[0], world.rows("retain")[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        for attempt in range(2):  # each on a server started for it
            page = browser.new_page()
            page.goto(serve(lora_artifact))
            assert page.locator("h1").inner_text() == f"GradDiff unlearning of {world_model_dir.name}"  # not a cache path
            page.locator("#examples-forget button").first.click()
            page.locator("#ask").click()
            answered(page, forget["answer"].split()[-1].strip("."))
            answers = [page.locator(f"#{name} textarea").input_value() for name in ("original", "unlearned")]
            assert page.locator("#prompt textarea").input_value() == forget["question"] and answers[0] != answers[1]
            assert page.locator("[data-testid='toast-body']").count() == 0, page.locator("[data-testid='toast-body']").all_inner_texts()
        assert "Retain-set questions" in page.locator("#examples-retain").inner_text()
        page.locator("#prompt textarea").fill("x" * 1200)
        page.locator("#ask").click()
        page.wait_for_selector("[data-testid='toast-body']", timeout=60_000)
        assert "1200 characters long; the limit is 1000" in page.locator("[data-testid='toast-body']").inner_text()
        page.locator("#examples-retain button").first.click()
        page.locator("#ask").click()
        answered(page, retain["answer"].split()[-1].strip("."))
        assert page.locator("[data-testid='toast-body']").count() == 0  # the stale message closed
        page.screenshot(path=str(tmp_path / "space.png"), full_page=True)
        browser.close()
    assert (tmp_path / "space.png").stat().st_size > 10_000


def test_page_names_models_by_hub_id_or_folder_and_groups_examples():
    from hubunlearn.space import examples, model_name

    assert model_name("/home/u/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B/snapshots/0cb88a4f7/") == "meta-llama/Llama-3.2-1B"
    assert model_name("locuslab/tofu_ft_llama2-7b") == "locuslab/tofu_ft_llama2-7b"
    assert model_name("/root/.cache/hubunlearn/world-model-c505a4d17e8f/") == "world-model-c505a4d17e8f"
    assert model_name("./outputs/base") == "base"
    record = {"examples": {"retain": ["r1"], "forget": ["f1", "f2"], "other": ["x"]}}
    assert examples(record) == {"forget": ["f1", "f2"], "retain": ["r1"]} and examples({}) == {}


def test_deploy_pushes_a_space_that_starts_from_a_clean_download(run_cli, hub_token, lora_artifact, world_model_dir, tmp_path):
    from huggingface_hub import HfApi, SpaceCard, snapshot_download

    api = HfApi()
    api.create_repo("tester/space-base", exist_ok=True)
    api.upload_folder(folder_path=str(world_model_dir), repo_id="tester/space-base", ignore_patterns=["README.md"])
    code, _, err = run_cli("push", lora_artifact, "--repo_id", "tester/space-adapter", "--base_model_id", "tester/space-base")
    assert code == 0, err
    code, _, err = run_cli("space", "--unlearned", lora_artifact, "--deploy", "tester/side-by-side")
    assert code == 2 and "push" in err and "first" in err  # a Space cannot read a local folder
    code, out, err = run_cli("space", "--unlearned", "tester/space-adapter", "--deploy", "tester/side-by-side", "--hardware", "zero-a10g")
    assert code == 0, err

    card = SpaceCard.load("tester/side-by-side", repo_type="space")
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.sdk_version
    assert card.data.models == ["tester/space-adapter", "tester/space-base"] and card.data.suggested_hardware == "zero-a10g"
    folder = snapshot_download("tester/side-by-side", repo_type="space", local_dir=tmp_path / "space")
    assert (tmp_path / "space" / "hubunlearn" / "space.py").is_file() and "gradio==" in (tmp_path / "space" / "requirements.txt").read_text()
    port = free_port()
    env = {**os.environ, "PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("the Space's app.py did not start serving")
    finally:
        process.terminate()
        process.wait(timeout=30)


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirement lines install, with what they require in turn (extras left out)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [Requirement(line) for line in requirements], set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo += [Requirement(line) for line in requires(name) or []]
        except PackageNotFoundError:
            continue
    return seen


# Imported by the app's dependencies only when installed (``try: import ...``), here because other extras pulled them in
OPTIONAL_IMPORTS = {"colorama": "torch._inductor.runtime.runtime_utils", "charset-normalizer": "numpy.f2py.crackfortran"}


def test_space_requirements_cover_every_package_the_app_imports(lora_artifact):
    """What a fresh Space machine installs (requirements.txt and its dependencies) holds every package the app
    imports while it starts and builds its page."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    from hubunlearn.space import space_requirements

    script = ("import json, sys\nbefore = set(sys.modules)\nfrom hubunlearn.space import SideBySide, build_demo\n"
              f"build_demo(SideBySide.load({str(lora_artifact)!r}))\n"
              "print(json.dumps(sorted({name.split('.')[0] for name in set(sys.modules) - before})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    distributions = packages_distributions()
    imported = {canonicalize_name(d) for module in json.loads(result.stdout.splitlines()[-1]) for d in distributions.get(module, [])}
    missing = imported - {"hubunlearn"} - OPTIONAL_IMPORTS.keys() - _distribution_closure(space_requirements())
    assert not missing, f"the Space imports {sorted(missing)}, which its requirements.txt does not install"


def test_deploy_without_a_token_or_without_rights_is_one_line(run_cli, monkeypatch):
    from .conftest import OTHER_TOKEN

    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, _, err = run_cli("space", "--unlearned", "tester/space-adapter", "--deploy", "tester/side-by-side")
    assert code == 2 and "no Hugging Face token" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)  # alice may not write to tester's namespace
    code, _, err = run_cli("space", "--unlearned", "tester/space-adapter", "--deploy", "tester/side-by-side")
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("hubunlearn: error:") and ("(403)" in last or "this token can read" in last), err
    assert "Traceback" not in err and OTHER_TOKEN not in err


@pytest.mark.parametrize("argv, message", [
    (["--unlearned", "not a repo"], "neither an artifact folder nor a Hub repo id"),
    (["--unlearned", "{artifact}", "--port", "0"], "--port must be between 1 and 65535"),
    (["--unlearned", "{artifact}", "--port", "{taken}"], "is taken"),
    (["--unlearned", "outputs/no-such-artifact"], "neither a local folder nor a Hub repository you can read"),
    (["--unlearned", "{artifact}", "--prot", "7860"], "unrecognized arguments: --prot"),
    (["--unlearned", "{artifact}", "--device", "gpu"], "unknown --device 'gpu': choose auto, cpu, cuda or cuda:N"),
    pytest.param(["--unlearned", "{artifact}", "--device", "cuda"], "--device cuda: no CUDA GPU is available here",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal needs a machine without a GPU")),
])
def test_space_bad_input(run_cli, lora_artifact, argv, message):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        code, _, err = run_cli("space", *[a.format(artifact=lora_artifact, taken=taken) for a in argv])
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
