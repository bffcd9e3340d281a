"""MUSE's metric functions (hubunlearn.metrics.muse) on fixed strings and hand-built statistics."""

import pytest

from hubunlearn.metrics import mia
from hubunlearn.metrics.muse import (PUBLISHED_REFERENCE_AUC, cut_at_stop, knowmem_prompt, min_k_scores, muse_auc, privleak,
                                     rouge_l_f1, truncate_to_tokens)
from hubunlearn.metrics.stats import TokenStats


def test_rouge_l_f1_matches_hand_computed_values_without_stemming():
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F1 = 5/6. "a b c d" vs "a c e": LCS 2, P 2/4, R 2/3,
    # F1 = 2PR/(P+R) = 4/7. "running dogs" vs "run dog": no common token without a stemmer (MUSE's use_stemmer=False).
    scores = rouge_l_f1(["the cat sat on the mat", "a b c d", "running dogs", ""], ["the cat is on the mat", "a c e", "run dog", "x"])
    assert scores == pytest.approx([5 / 6, 4 / 7, 0.0, 0.0])


def test_verbmem_ground_truth_is_cut_to_its_first_tokens_special_tokens_counted():
    from hubunlearn.world import train_tokenizer

    tokenizer = train_tokenizer(["alpha beta gamma delta epsilon"] * 50, vocab_size=300)  # one token per word, and a bos
    assert len(tokenizer("alpha beta gamma delta epsilon")["input_ids"]) == 6
    assert truncate_to_tokens(tokenizer, "alpha beta gamma delta epsilon", 4) == "alpha beta gamma"  # bos + 3 words, as MUSE cuts
    assert truncate_to_tokens(tokenizer, "alpha beta", 128) == "alpha beta"


def test_knowmem_prompt_puts_the_in_context_examples_before_the_question():
    prompt = knowmem_prompt([("Who won?", "Ada"), ("Where?", "Oslo")], "When?")
    assert prompt == "Question: Who won?\nAnswer: Ada\n\nQuestion: Where?\nAnswer: Oslo\n\nQuestion: When?\nAnswer: "
    assert knowmem_prompt([], "When?") == "Question: When?\nAnswer: "


@pytest.mark.parametrize("text, cut", [
    ("Ada Lovelace\n\nQuestion: next", "Ada Lovelace"),
    ("Ada\nQuestion what", "Ada"),
    ("Ada Question: more", "Ada "),
    ("Ada\nQuestion\n\n", "Ada"),  # the earliest stop string wins, whichever it is
    ("\n\nAda", ""),  # an answer that starts with a stop string is empty (MUSE cuts before stripping)
    ("Ada Lovelace\nmore", "Ada Lovelace\nmore"),
])
def test_knowmem_answers_end_at_the_first_stop_string(text, cut):
    assert cut_at_stop(text) == cut


def test_knowmem_rouge_after_the_cut_ignores_what_follows():
    assert rouge_l_f1([cut_at_stop("Ada Lovelace\n\nQuestion: Who else? Answer: Ada")], ["Ada Lovelace"]) == [1.0]


def test_min_k_takes_the_lowest_40_percent_of_token_log_probs_and_at_least_one():
    def stats(values):
        return TokenStats(values, None, None, [False] * len(values))

    assert min_k_scores([stats([-1.0, -2.0, -3.0, -4.0, -5.0]), stats([-1.0, -3.0])]) == pytest.approx([-4.5, -3.0])


def test_privleak_orientation_memorised_forget_texts_give_minus_100():
    # MUSE's Min-K% is minus our score: forget texts with strictly lower MUSE Min-K (likelier) than every holdout text
    # are what a model that memorised them gives; its AUC is 0 and against a reference at chance PrivLeak is -100.
    def stats(value):
        return TokenStats([value] * 5, None, None, [True] * 5)

    forget, holdout = min_k_scores([stats(-0.1), stats(-0.2), stats(-0.3)]), min_k_scores([stats(-2.0), stats(-2.5), stats(-3.0)])
    assert all(-f < -h for f in forget for h in holdout)
    assert muse_auc(forget, holdout) == 0.0
    assert privleak(muse_auc(forget, holdout), 0.5) == pytest.approx(-100.0)
    assert privleak(0.0, PUBLISHED_REFERENCE_AUC["news"]) == pytest.approx(-100.0)
    assert privleak(muse_auc(holdout, forget), 0.5) == pytest.approx(100.0)  # forget texts less likely than unseen: over-unlearned
    assert privleak(0.5, 0.5) == 0.0
    # The AUC MUSE publishes for its News target (about 0.001 against 0.4772) reads as OpenUnlearning's -99.8
    assert privleak(0.001, PUBLISHED_REFERENCE_AUC["news"]) == pytest.approx(-99.79, abs=0.01)


def test_muse_auc_is_one_minus_the_mia_auc_and_privleak_agrees_with_the_mia_convention():
    forget, holdout = [-0.5, -1.0, -2.5, -0.7], [-2.0, -0.9, -3.0]
    assert muse_auc(forget, holdout) == pytest.approx(1 - mia.auc(forget, holdout)) == pytest.approx(3 / 12)  # 3 of 12 (holdout, forget) pairs ranked holdout higher
    assert privleak(muse_auc(forget, holdout), 0.4) == pytest.approx(mia.privleak(mia.auc(forget, holdout), 0.6))


@pytest.mark.parametrize("reference", [0.0, 1.0, -0.1, 1.5])
def test_privleak_is_undefined_for_a_reference_auc_of_0_or_1_and_never_divides_by_zero(reference):
    with pytest.raises(ValueError, match="undefined for a reference AUC"):
        privleak(0.3, reference)
