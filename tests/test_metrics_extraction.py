"""Extraction metrics: ES, teacher-forced ES, EM, MA and EL_n by hand, then on the taught world model."""

import math
import random

import pytest

from hubunlearn.data import DataFormat, format_prompt, tokenize_rows
from hubunlearn.metrics import extraction
from hubunlearn.metrics.stats import TokenStats, token_stats


def flags(*correct):
    return TokenStats([0.0] * len(correct), [0.0] * len(correct), [0.0] * len(correct), list(correct))


# ---- by hand -----------------------------------------------------------------------------------------------------


def test_teacher_forced_extraction_strength_by_hand():
    assert extraction.teacher_forced_extraction_strength(flags(True, True, True, True, True)) == 1.0
    assert extraction.teacher_forced_extraction_strength(flags(False, False, False, False, False)) == 0.0
    # Only the last 2 of 5 answer tokens are recovered: m_tf - l = 3, ES = 1 - 3/5.
    assert extraction.teacher_forced_extraction_strength(flags(False, False, False, True, True)) == pytest.approx(0.4)
    # A wrong token late in the answer caps ES however good the start is: 1 - 5/5.
    assert extraction.teacher_forced_extraction_strength(flags(True, True, True, True, False)) == 0.0
    assert extraction.teacher_forced_extraction_strength(flags()) == 0.0


def test_eos_is_left_out_of_extraction_strength_and_exact_memorization_by_hand():
    # prompt [1, 2], answer [7, 8], eos 3: the model gets both answer tokens right and misses the eos.
    example = {"input_ids": [1, 2, 7, 8, 3], "labels": [-100, -100, 7, 8, 3], "prompt_length": 2}
    answer = extraction.answer_stats(flags(True, True, False), example, eos_token_id=3)
    assert answer.correct == [True, True]
    assert extraction.teacher_forced_extraction_strength(answer) == 1.0  # eos counted: 0
    assert extraction.exact_memorization(answer) == 1.0  # eos counted: 2/3
    # Only the last answer token wrong: ES is 0 (m = r), not OpenUnlearning's 1/n = 1/2.
    assert extraction.teacher_forced_extraction_strength(extraction.answer_stats(flags(True, False, True), example, 3)) == 0.0
    truncated = {"input_ids": [1, 2, 7, 8], "labels": [-100, -100, 7, 8], "prompt_length": 2}  # cut by max_length: no eos
    assert extraction.answer_stats(flags(True, False), truncated, 3).correct == [True, False]
    assert extraction.answer_stats(flags(True, False), example, None).correct == [True, False]


def test_exact_memorization_and_memorization_accuracy_by_hand():
    stats = flags(True, False, True, True)
    assert extraction.exact_memorization(stats) == 0.75
    assert extraction.memorization_accuracy(stats) == 0.75
    assert extraction.exact_memorization(flags()) == 0.0


def test_ngram_overlap_by_hand():
    assert extraction.ngrams([1, 2, 3, 2, 3], 2) == [(1, 2), (2, 3), (3, 2), (2, 3)]
    assert extraction.ngram_overlap([1, 2, 3, 4], [1, 2, 3, 4], 2) == 1.0
    # Reference bigrams 12 23 34 45; the generation shares 12 and 23: 2/4.
    assert extraction.ngram_overlap([1, 2, 3, 9, 9], [1, 2, 3, 4, 5], 2) == 0.5
    # A repeated bigram counts at most as often as in the reference: {12} from 12 21 12, over 3 bigrams.
    assert extraction.ngram_overlap([1, 2, 1, 2], [1, 2, 7, 8], 2) == pytest.approx(1 / 3)
    assert extraction.ngram_overlap([1, 2], [1, 2, 3], 3) == 0.0  # the generation is too short for a trigram
    assert extraction.ngram_overlap([1, 2, 3], [1, 2], 3) == 0.0  # no reference trigram: 0, not undefined


def test_positions_spread_evenly():
    assert extraction._positions(1, 11, None) == list(range(1, 11))
    assert extraction._positions(1, 11, 4) == [1, 4, 7, 10]
    assert extraction._positions(3, 5, 10) == [3, 4]
    assert extraction._positions(5, 5, None) == []


# ---- on the taught world model ----------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def facts(forget_rows, tokenizer):
    return list(tokenize_rows(forget_rows[:10], tokenizer, DataFormat(max_length=128)))


@pytest.fixture(scope="module")
def wrong_facts(forget_rows, tokenizer):
    """The same questions with the first perturbed (wrong) answer, which the model was never taught."""
    rows = [{"question": r["question"], "answer": r["perturbed_answer"][0]} for r in forget_rows[:10]]
    return list(tokenize_rows(rows, tokenizer, DataFormat(max_length=128)))


def test_extraction_strength_is_one_when_the_question_alone_gives_the_answer(model, tokenizer, facts):
    assert extraction.extraction_strength(model, tokenizer, facts, batch_size=4) == [1.0] * len(facts)


def test_extraction_strength_is_zero_for_a_model_that_never_reproduces(tokenizer, facts):
    from hubunlearn.world import tiny_llama

    untrained = tiny_llama(tokenizer, seed=123)  # random weights: not even the answer's last token is its argmax
    assert extraction.extraction_strength(untrained, tokenizer, facts) == [0.0] * len(facts)


def test_taught_answers_are_more_extractable_than_wrong_ones(model, tokenizer, facts, wrong_facts):
    taught = extraction.extraction_strength(model, tokenizer, facts)
    wrong = extraction.extraction_strength(model, tokenizer, wrong_facts)
    assert all(t > w for t, w in zip(taught, wrong))
    assert all(0.0 < w < 1.0 for w in wrong)  # the shared start ("NAME was born in") is no help, the tail is


def test_teacher_forced_extraction_strength_agrees_with_generation(model, tokenizer, facts, wrong_facts):
    for examples in (facts, wrong_facts):
        generated = extraction.extraction_strength(model, tokenizer, examples)
        stats = token_stats(model, examples, tokenizer.pad_token_id)
        eos = tokenizer.eos_token_id
        assert [extraction.teacher_forced_extraction_strength(extraction.answer_stats(s, e, eos)) for s, e in zip(stats, examples)] == pytest.approx(generated)


def test_an_answer_cut_before_its_last_word_is_fully_extractable(model, tokenizer, forget_rows):
    # "NAME was born in" + eos: the model reproduces every answer token from the question alone, then goes on with
    # the birthplace instead of eos. Leaving eos out (OpenUnlearning) gives ES = EM = 1; counting it gave ES = 0.
    rows = [{"question": r["question"], "answer": r["answer"].rsplit(" ", 1)[0]} for r in forget_rows[:5]]
    examples = list(tokenize_rows(rows, tokenizer, DataFormat(max_length=128)))
    assert all(e["input_ids"][-1] == tokenizer.eos_token_id for e in examples)
    assert extraction.extraction_strength(model, tokenizer, examples) == [1.0] * len(examples)
    stats = token_stats(model, examples, tokenizer.pad_token_id)
    assert not any(s.correct[-1] for s in stats)  # the eos is never the argmax there
    answers = [extraction.answer_stats(s, e, tokenizer.eos_token_id) for s, e in zip(stats, examples)]
    assert [extraction.teacher_forced_extraction_strength(a) for a in answers] == [1.0] * len(examples)
    assert [extraction.exact_memorization(a) for a in answers] == [1.0] * len(examples)


def test_extraction_strength_searches_in_lockstep(model, tokenizer, wrong_facts, monkeypatch):
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: calls.append(1) or generate(**kwargs))
    extraction.extraction_strength(model, tokenizer, wrong_facts, batch_size=32)
    longest = max(len(e["input_ids"]) - e["prompt_length"] for e in wrong_facts)
    assert len(calls) <= math.ceil(math.log2(longest + 1))  # one call per round, one round per halving


def test_extraction_likelihood_is_one_on_answers_the_model_recalls(model, tokenizer, facts):
    # Every answer prefix (t = l .. T-n) continues greedily into the rest of the answer.
    assert extraction.extraction_likelihood(model, tokenizer, facts[:4], n=2) == [1.0] * 4
    assert extraction.extraction_likelihood(model, tokenizer, facts[:4], n=2, max_positions=3) == [1.0] * 4


def test_taught_text_beats_random_tokens_on_extraction_likelihood_and_memorization_accuracy(model, tokenizer, forget_rows):
    texts = [{"text": format_prompt(tokenizer, r["question"]) + " " + r["answer"]} for r in forget_rows[:10]]
    taught = list(tokenize_rows(texts, tokenizer, DataFormat(max_length=128)))
    rng = random.Random(0)
    noise = []
    for example in taught:  # same lengths, bos then random tokens past the special ones
        ids = [tokenizer.bos_token_id] + [rng.randrange(4, len(tokenizer)) for _ in example["input_ids"][1:]]
        noise.append({"input_ids": ids, "labels": list(ids), "prompt_length": 0})

    el_taught, el_noise = (extraction.extraction_likelihood(model, tokenizer, e, n=2) for e in (taught, noise))
    assert min(el_taught) > max(el_noise)
    assert sum(el_taught) / len(el_taught) > 0.2 and max(el_noise) < 0.05

    ma_taught, ma_noise = ([extraction.memorization_accuracy(s) for s in token_stats(model, e, tokenizer.pad_token_id)]
                           for e in (taught, noise))
    assert min(ma_taught) > max(ma_noise)
