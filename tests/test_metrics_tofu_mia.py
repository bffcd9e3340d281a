"""TOFU metrics and membership-inference scores against values worked out by hand, plus one pass on the world model."""

import math

import pytest

from hubunlearn.data import DataFormat
from hubunlearn.metrics import mia, tofu
from hubunlearn.metrics.stats import TokenStats

# ---- TOFU ------------------------------------------------------------------------------------------------------


def test_rouge_l_recall_and_f1_by_hand():
    identical, partial, stemmed, disjoint = tofu.rouge_l(
        ["the cat sat on the mat", "a cat on the mat", "she running fast", "dog"],
        ["the cat sat on the mat", "the cat sat on the mat", "she runs fast", "the cat"],
    )
    assert identical == {"recall": 1.0, "f1": 1.0}
    # LCS("the cat sat on the mat", "a cat on the mat") = "cat on the mat": recall 4/6, precision 4/5.
    assert partial["recall"] == pytest.approx(4 / 6)
    assert partial["f1"] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))  # = 8/11
    assert stemmed == {"recall": 1.0, "f1": 1.0}  # Porter: running, runs -> run
    assert disjoint == {"recall": 0.0, "f1": 0.0}


def test_rouge_l_needs_one_reference_per_generation():
    with pytest.raises(ValueError):
        tofu.rouge_l(["a", "b"], ["a"])


def test_truth_ratio_uses_the_geometric_mean_of_perturbed_probabilities():
    # Normalised probabilities: paraphrased e^-1, perturbed e^-2 and e^-4 (geometric mean e^-3): R = e^-3 / e^-1.
    assert tofu.truth_ratio(-1.0, [-2.0, -4.0]) == pytest.approx(math.exp(-2))
    assert tofu.truth_ratio(-2.0, [-2.0]) == pytest.approx(1.0)


def test_truth_ratio_adds_openunlearnings_epsilon_to_the_paraphrased_probability():
    # A collapsed model: every answer at p = e^-23 ≈ 1.026e-10, so R = p / (p + 1e-10) ≈ 0.50646, not 1.
    p = math.exp(-23)
    assert tofu.TRUTH_RATIO_EPSILON == 1e-10
    assert tofu.truth_ratio(-23.0, [-23.0, -23.0]) == pytest.approx(p / (p + 1e-10), rel=1e-12)
    assert tofu.truth_ratio(-23.0, [-23.0]) == pytest.approx(0.506462, abs=1e-6)
    assert tofu.truth_ratio(-1.0, [-1.0]) == pytest.approx(1 - 1e-10 * math.e, rel=1e-12)  # 2.7e-10 below 1
    # The forget aggregate guards 1/R the same way: min(R, 1/(R + 1e-10)); R = 0 gives 0, not a division by zero.
    assert tofu.forget_truth_ratio_score([0.0, 1.0]) == pytest.approx(0.5 * (1 / (1 + 1e-10)), rel=1e-12)


def test_truth_ratio_aggregates_by_hand():
    # min(R, 1/R): 0.5, 0.5, 1 -> 2/3.   max(0, 1 - R): 0.75, 0, 0 -> 0.25.
    assert tofu.forget_truth_ratio_score([0.5, 2.0, 1.0]) == pytest.approx(2 / 3)
    assert tofu.retain_truth_ratio_score([0.25, 2.0, 1.0]) == pytest.approx(0.25)


def test_normalised_probability_by_hand():
    assert tofu.normalised_probability(math.log(0.3), [math.log(0.1)]) == pytest.approx(0.75)
    assert tofu.normalised_probability(math.log(0.2), [math.log(0.2)] * 3) == pytest.approx(0.25)
    assert tofu.normalised_probability(-1000.0, [-1001.0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow


def test_forget_quality_is_the_ks_p_value():
    sample = [0.1 * i for i in range(1, 51)]
    assert tofu.forget_quality(sample, list(sample)) == pytest.approx(1.0)
    # Disjoint samples of 50: D = 1, exact p = 2 / C(100, 50) ≈ 2e-29.
    assert tofu.forget_quality(sample, [100 + x for x in sample]) < 1e-6


def test_model_utility_is_the_harmonic_mean_of_nine_numbers():
    values = dict.fromkeys(tofu.MODEL_UTILITY_KEYS, 0.5)
    values["retain/rouge_recall"] = 0.25
    values["forget/probability"] = 0.0  # other keys are ignored
    assert tofu.model_utility(values) == pytest.approx(9 / (8 * 2 + 4))  # = 0.45
    values["world_facts/truth_ratio"] = 0.0
    assert tofu.model_utility(values) == 0.0


def test_model_utility_names_what_is_missing():
    values = dict.fromkeys(tofu.MODEL_UTILITY_KEYS, 0.5)
    del values["real_authors/rouge_recall"]
    values["world_facts/truth_ratio"] = None
    with pytest.raises(ValueError, match="missing: real_authors/rouge_recall, world_facts/truth_ratio"):
        tofu.model_utility(values)


# ---- membership inference ----------------------------------------------------------------------------------------

STATS = TokenStats(
    log_probs=[-1.0, -3.0, -0.5, -2.0, -4.0],
    mean_log_probs=[-1.0, -1.0, -1.0, -1.0, -1.0],
    std_log_probs=[1.0, 2.0, 0.5, 1.0, 1.5],
    correct=[True, False, True, False, False],
)


def test_loss_and_zlib_scores_by_hand():
    assert mia.loss_score(STATS) == pytest.approx(-10.5 / 5)
    assert mia.zlib_score(STATS, "abc") == pytest.approx(-2.1 / 11)  # zlib.compress(b"abc") is 11 bytes


def test_min_k_defaults_to_forty_percent_as_muse_and_openunlearning():
    assert mia.MIN_K == 0.4
    assert mia.min_k_score(STATS) == pytest.approx(-3.5)  # the lowest 2 of 5: -4, -3
    assert mia.min_k_plus_plus_score(STATS) == pytest.approx(-1.5)  # -2, -1
    assert mia.mia_scores([STATS], ["abc"])["min_k"] == pytest.approx([-3.5])


def test_min_k_by_hand():
    assert mia.min_k_score(STATS, k=0.2) == pytest.approx(-4.0)  # int(5 * 0.2) = 1 token
    assert mia.min_k_score(STATS, k=0.4) == pytest.approx(-3.5)  # -4, -3
    assert mia.min_k_score(STATS, k=0.1) == pytest.approx(-4.0)  # int(0.5) = 0 -> at least one token
    assert mia.min_k_score(STATS, k=1.0) == pytest.approx(-2.1)


def test_min_k_plus_plus_by_hand():
    # (log p - mu) / sigma = 0, -1, 1, -1, -2
    assert mia.min_k_plus_plus_score(STATS, k=0.4) == pytest.approx(-1.5)
    assert mia.min_k_plus_plus_score(STATS, k=1.0) == pytest.approx(-0.6)
    certain = TokenStats([0.0, -0.5], [0.0, -1.0], [0.0, 0.5], [True, True])  # sigma 0: guarded, 0 / floor = 0
    assert mia.min_k_plus_plus_score(certain, k=1.0) == pytest.approx(0.5)


def test_scores_refuse_examples_without_tokens():
    with pytest.raises(ValueError):
        mia.min_k_score(TokenStats([], [], [], []))


def test_mia_scores_gives_every_attack_per_example():
    other = TokenStats([-0.1, -0.2], [-0.1, -0.1], [1.0, 1.0], [True, True])
    scores = mia.mia_scores([STATS, other], ["abc", "abc"], k=0.4)
    assert set(scores) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    assert scores["loss"] == pytest.approx([-2.1, -0.15])
    assert scores["zlib"] == pytest.approx([-2.1 / 11, -0.15 / 11])
    assert scores["min_k"] == pytest.approx([-3.5, -0.2])
    assert scores["min_k_plus_plus"] == pytest.approx([-1.5, -0.1])
    with pytest.raises(ValueError):
        mia.mia_scores([STATS], [])


def test_auc_by_hand():
    assert mia.auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert mia.auc([0.5, 0.5], [0.5, 0.5]) == 0.5
    # Pairs (member > non-member): 0.9>0.5, 0.9>0.1, 0.3<0.5, 0.3>0.1 -> 3/4.
    assert mia.auc([0.9, 0.3], [0.5, 0.1]) == pytest.approx(0.75)


def test_privleak_by_hand_in_muses_convention():
    # Our AUCs (forget rows as members); MUSE's are 1 - ours. Nothing unlearned against a reference at chance:
    # MUSE's AUC 0 vs 0.5 -> -100 % (MUSE's target model: -99.8 on News; OpenUnlearning: -100).
    assert mia.privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert mia.privleak(0.9, 0.6) == pytest.approx(100 * (0.1 - 0.4) / 0.4)  # = -75: under-unlearning
    assert mia.privleak(0.2, 0.5) == pytest.approx(60.0)  # MUSE's AUC 0.8 vs 0.5: over-unlearning
    assert mia.privleak(0.6, 0.6) == 0.0
    with pytest.raises(ValueError, match="reference AUC of 1"):
        mia.privleak(0.5, 1.0)


def test_privleak_matches_muses_auc_computed_as_muse_does():
    # MUSE (swj0419/muse_bench, metrics/privleak.py) labels forget rows 0 and holdout rows 1 and scores by the
    # Min-k% log-likelihood (higher = likelier); privleak = (AUC_unlearn - AUC_retrain) / AUC_retrain * 100.
    from sklearn.metrics import roc_auc_score

    def muse_auc(forget, holdout):
        return roc_auc_score([0] * len(forget) + [1] * len(holdout), forget + holdout)

    unlearned = ([-0.5, -0.7, -2.0, -0.2], [-1.5, -2.5, -0.6, -3.0])  # forget still likelier than holdout
    retrained = ([-1.0, -2.2, -1.7, -0.9], [-1.2, -2.0, -0.95, -1.6])
    muse = 100 * (muse_auc(*unlearned) - muse_auc(*retrained)) / muse_auc(*retrained)
    assert mia.privleak(mia.auc(*unlearned), mia.auc(*retrained)) == pytest.approx(muse)
    assert muse == pytest.approx(100 * (0.1875 - 0.5) / 0.5)  # 3 of 16 pairs, 8 of 16: -62.5


# ---- on the taught world model -------------------------------------------------------------------------------------


def test_qa_statistics_on_the_world_model(model, tokenizer, forget_rows, retain_rows):
    rows = forget_rows + retain_rows[:15]
    fmt = DataFormat(max_length=128)
    wrong = [{"question": r["question"], "answer": r["perturbed_answer"][0]} for r in rows]
    no_paraphrase = [{k: v for k, v in r.items() if k != "paraphrased_answer"} for r in rows[:3]]
    too_long = {"question": "word " * 200, "answer": "x", "perturbed_answer": ["y"]}
    results = tofu.qa_statistics(model, tokenizer, rows + wrong + no_paraphrase + [too_long], fmt, batch_size=64)
    taught, other, real_style, skipped = results[: len(rows)], results[len(rows) : 2 * len(rows)], results[-4:-1], results[-1]

    assert len(results) == 2 * len(rows) + 4
    assert skipped == dict.fromkeys(["probability", "mean_log_prob", "exact_memorization", *tofu.TRUTH_RATIO_KEYS])
    assert set(other[0]) == {"probability", "mean_log_prob", "exact_memorization"}  # no perturbed answers
    for r in taught:
        assert r["probability"] == pytest.approx(math.exp(r["mean_log_prob"]))
        assert r["truth_ratio"] == pytest.approx(tofu.truth_ratio(r["paraphrased_mean_log_prob"], r["perturbed_mean_log_probs"]))
        assert len(r["perturbed_mean_log_probs"]) == 3 and 0 <= r["exact_memorization"] <= 1
    # The taught answer beats the answers of other people, question by question and on average.
    assert sum(t["probability"] > o["probability"] for t, o in zip(taught, other)) >= 0.9 * len(rows)
    # Length-normalised perturbed answers share the taught template (p ≈ e^-1 each), so the normalised probability
    # stays below 1/2 here; beating every perturbed answer means beating chance, 1 / (1 + 3).
    assert sum(r["mean_log_prob"] > max(r["perturbed_mean_log_probs"]) for r in taught) >= 0.9 * len(rows)
    assert sum(r["normalised_probability"] > 1 / 4 for r in taught) >= 0.9 * len(rows)
    assert sum(r["exact_memorization"] for r in taught) / len(taught) > 0.8
    # Without a paraphrase the truth ratio's base is the answer itself (TOFU's real authors and world facts).
    for r, full in zip(real_style, taught):
        assert r["paraphrased_mean_log_prob"] == r["mean_log_prob"]
        assert r["mean_log_prob"] == pytest.approx(full["mean_log_prob"], abs=1e-4)
