"""ECO's prompt classifier on kinds of prompts it never saw (issue 16): no language model, seconds.

Trained as ``--method eco`` trains it, on a forget and a retain set only, from a world (seed 101, 50 people: 4
forget, 12 retain) that neither the defaults nor ``benchmarks/eco_heldout.py`` (world seed 0, TOFU) were tuned on
(it was first run after the design was fixed); scored on whole kinds absent from both sets: the world's other
people, TOFU's real authors and world facts, everyday requests.
"""

import json

import pytest

from hubunlearn.eco.classifier import CONFIG_NAME, ClassifierSettings, PromptClassifier, train_classifier
from hubunlearn.eco.pool import TEMPLATES, general_prompts
from hubunlearn.world import World

from .conftest import TOFU

EVERYDAY = [  # written here, not by hubunlearn.eco.pool
    "Can you suggest a name for my new sourdough starter?", "What's the quickest way to defrost chicken safely?",
    "Help me write a birthday message for my grandmother.", "Why does my laptop fan get so loud?",
    "How do I fold a fitted sheet?", "What are some good questions to ask at the end of an interview?",
    "Give me a weekly meal plan for a vegetarian.", "How often should I water a cactus?",
    "Write a short poem about the sea at night.", "What is a good way to learn chess openings?",
]


def _questions(name):
    return [json.loads(line)["question"] for line in (TOFU / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def case():
    world = World.make(num_people=50, num_forget=4, seed=101)
    forget, retain, others = world.rows_of(world.people[:4]), world.rows_of(world.people[4:16]), world.rows_of(world.people[16:])
    return {"forget": [r["question"] for r in forget], "retain": [r["question"] for r in retain],
            "paraphrases": [r["paraphrased_question"] for r in forget],
            "held_out": {"other people": [r[k] for r in others for k in ("question", "paraphrased_question")],
                         "real authors": _questions("real_authors.json"), "world facts": _questions("world_facts.json"),
                         "everyday": EVERYDAY}}


def _trained(case, settings=None, floor=None, seed=0):
    classifier = PromptClassifier(settings)
    if floor is not None:
        classifier.min_threshold = floor
    train_classifier(classifier, case["forget"], case["retain"], alpha=0.05, max_fpr=0.01, holdout_fraction=0.25, seed=seed)
    return classifier


def test_default_classifier_keeps_false_flags_low_on_kinds_it_never_saw(case, tmp_path):
    classifier = _trained(case)
    assert classifier.flags(case["forget"]).mean() >= 0.95
    assert classifier.flags(case["paraphrases"]).mean() >= 0.9  # never trained or calibrated on
    false_flags = {kind: classifier.flags(prompts).mean() for kind, prompts in case["held_out"].items()}
    assert max(false_flags.values()) <= 0.02, false_flags

    # the bundle's files hold the gate (safetensors) and what the classifier learnt from (JSON); flags survive
    classifier.save(tmp_path)
    assert PromptClassifier.load(tmp_path).flags(case["held_out"]["other people"] + case["paraphrases"]).tolist() == \
        classifier.flags(case["held_out"]["other people"] + case["paraphrases"]).tolist()
    assert classifier.record()["general_pool"]["size"] == len(general_prompts()) >= 5000
    assert classifier.record()["gate"]["terms"] >= 8  # at least the four people's first and last names


@pytest.fixture(scope="module")
def before(case):
    """The classifier as it was before issue 16 (no pool, no gate, no floor, C = 1, lbfgs)."""
    return _trained(case, ClassifierSettings(pool_size=0, gate_similarity=0.0, regularisation=1.0, solver="lbfgs"), floor=0.0)


def test_the_classifier_before_issue_16_fails_the_same_check(case, before):
    """The check above can fail: without pool, gate and floor, the same data flags other people's questions."""
    false_flags = {kind: before.flags(prompts).mean() for kind, prompts in case["held_out"].items()}
    assert max(false_flags.values()) > 0.02, false_flags


def test_pool_is_varied_deterministic_and_not_an_evaluation_set():
    pool = general_prompts()
    assert pool == general_prompts() and len(set(pool)) == len(pool)
    assert len(pool) >= 5000 and len(TEMPLATES) >= 8 and len({p.split()[0] for p in pool}) >= 20  # eight kinds, many openings
    evaluation = set(_questions("real_authors.json") + _questions("world_facts.json") + _questions("full.json"))
    assert not evaluation & set(pool)


def test_a_classifier_saved_before_the_gate_loads_without_one(case, before, tmp_path):
    legacy = before
    legacy.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in ("pool_size", "pool_version", "gate_similarity", "solver"):  # regularisation was there
        del config["settings"][key]  # as written before issue 16
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    loaded = PromptClassifier.load(tmp_path)
    assert loaded.gate is None and loaded.record() == {"general_pool": None, "gate": None}
    prompts = case["forget"] + case["held_out"]["other people"]
    assert loaded.flags(prompts).tolist() == legacy.flags(prompts).tolist()


def test_gate_terms_are_names_and_rare_words_not_common_english():
    """A common word only the forget prompts use ("recognition") is no term; a name, even a common word
    capitalised mid-sentence ("Patrick"), and a rare word are; a lower-case topic keeps its rare words; typos match."""
    from hubunlearn.eco.gate import TermGate

    negatives = ["Where was the painter born?", "What is the capital of France?"]
    gate = TermGate.fit(["What recognition did Patrick Abilov receive for his shale studies?"], negatives, 0.75)
    assert {"patrick", "abilov", "shale"} <= set(gate.terms) and "recognition" not in gate.terms and "studies" not in gate.terms
    assert gate.passes(["Tell me about Patrik Ablov.", "What recognition did the painter receive?"]).tolist() == [True, False]
    topic = TermGate.fit(["how does chlorophyll absorb light in photosynthesis?"], negatives, 0.75)
    assert {"chlorophyll", "photosynthesis"} <= set(topic.terms) and "light" not in topic.terms
    only_common = TermGate.fit(["why do people like music?"], negatives, 0.75)  # nothing rare: every unused word stays a term
    assert {"people", "like", "music"} <= set(only_common.terms)
