"""Each loss against a value worked out by hand."""

import math

import pytest
import torch

from hubunlearn.trainers import losses


def logits_for(probabilities):
    """Logits whose softmax is ``probabilities`` (log-probabilities are such logits)."""
    return torch.tensor(probabilities, dtype=torch.float).log()


def test_nll_counts_only_labelled_tokens():
    # Sequence of 3 tokens; position 0 predicts token 1, position 1 predicts token 2.
    logits = logits_for([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]]])
    labels = torch.tensor([[-100, 0, 2]])
    expected = -(math.log(0.5) + math.log(0.7)) / 2
    assert losses.nll_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    masked = torch.tensor([[-100, -100, 2]])
    assert losses.nll_loss(logits, masked).item() == pytest.approx(-math.log(0.7), rel=1e-6)


def test_gradient_ascent_is_negative_nll():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[:, :2] = -100
    assert losses.gradient_ascent_loss(logits, labels).item() == pytest.approx(-losses.nll_loss(logits, labels).item())
    assert losses.gradient_ascent_loss(logits, labels).item() < 0


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
def test_npo_at_reference_is_two_over_beta_ln2(beta):
    log_prob = torch.tensor([-3.0, -11.5, -0.2])
    assert losses.npo_loss(log_prob, log_prob.clone(), beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_falls_as_the_policy_moves_below_the_reference():
    reference = torch.tensor([-2.0])
    assert losses.npo_loss(torch.tensor([-10.0]), reference, 0.1) < losses.npo_loss(reference, reference, 0.1)
    # Hand value: -(2/β)·log σ(-β·Δ) with Δ = -8, β = 0.1.
    expected = -(2 / 0.1) * math.log(1 / (1 + math.exp(-0.8)))
    assert losses.npo_loss(torch.tensor([-10.0]), reference, 0.1).item() == pytest.approx(expected, rel=1e-6)


def test_simnpo_by_hand():
    log_prob, tokens = torch.tensor([-6.0]), torch.tensor([3])
    beta, gamma = 2.5, 0.5
    expected = -(2 / beta) * math.log(1 / (1 + math.exp(-(-beta * (-6.0 / 3) - gamma))))
    assert losses.simnpo_loss(log_prob, tokens, beta, gamma).item() == pytest.approx(expected, rel=1e-6)


def test_inverted_hinge_matches_a_hand_worked_three_token_distribution():
    # Position 0 predicts the label at position 1 (token 0): p = (0.6, 0.3, 0.1).
    #   1 + p(y) - max_{v≠y} p(v) = 1 + 0.6 - 0.3 = 1.3
    # Position 1 predicts token 2: p = (0.2, 0.5, 0.3): 1 + 0.3 - 0.5 = 0.8.  Mean = 1.05.
    logits = logits_for([[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.4, 0.3, 0.3]]])
    labels = torch.tensor([[-100, 0, 2]])
    assert losses.inverted_hinge_loss(logits, labels).item() == pytest.approx(1.05, rel=1e-5)


def test_inverted_hinge_lies_in_zero_two():
    torch.manual_seed(0)
    for scale in (0.1, 1.0, 30.0):
        logits, labels = torch.randn(4, 9, 11) * scale, torch.randint(0, 11, (4, 9))
        per_sequence = [losses.inverted_hinge_loss(logits[i : i + 1], labels[i : i + 1]).item() for i in range(4)]
        assert all(0.0 <= value <= 2.0 for value in per_sequence)
    # The extremes: a sure true token gives 2, a sure other token gives 0.
    certain = torch.full((1, 2, 3), -1e4)
    certain[0, 0, 1] = 0.0
    assert losses.inverted_hinge_loss(certain, torch.tensor([[-100, 1]])).item() == pytest.approx(2.0)
    assert losses.inverted_hinge_loss(certain, torch.tensor([[-100, 0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_to_reference_is_zero_at_the_reference_and_positive_elsewhere():
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 6, 5), torch.ones(2, 6, dtype=torch.long)
    assert losses.kl_to_reference(logits, logits.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.kl_to_reference(logits, torch.randn(2, 6, 5), mask).item() > 0.01


def test_kl_by_hand():
    # KL(ref || p) with ref = (0.5, 0.5), p = (0.9, 0.1) at the one position whose next token is real.
    policy = logits_for([[[0.9, 0.1], [0.5, 0.5]]])
    reference = logits_for([[[0.5, 0.5], [0.5, 0.5]]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert losses.kl_to_reference(policy, reference, torch.tensor([[1, 1]])).item() == pytest.approx(expected, rel=1e-5)


def test_kl_counts_every_real_token_and_no_padding():
    """TOFU's retain KL: the whole sequence (prompt positions too), the same value whatever the padding holds."""
    torch.manual_seed(0)
    policy, reference = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    value = losses.kl_to_reference(policy, reference, mask)
    per_row = [losses.kl_to_reference(policy[i : i + 1, : n], reference[i : i + 1, : n], mask[i : i + 1, : n]) for i, n in ((0, 7), (1, 4))]
    assert value.item() == pytest.approx((6 * per_row[0].item() + 3 * per_row[1].item()) / 9, rel=1e-5)  # a token mean
    noisy = policy.clone()
    noisy[1, 4:] = torch.randn(3, 11) * 10  # what the model predicts on padding does not count
    assert losses.kl_to_reference(noisy, reference, mask).item() == pytest.approx(value.item(), rel=1e-6)
    prompt_moved = policy.clone()
    prompt_moved[0, 0] += 5 * torch.randn(11)  # a prompt position (no label there) does
    assert losses.kl_to_reference(prompt_moved, reference, mask).item() != pytest.approx(value.item(), rel=1e-3)


def test_nll_and_sequence_log_prob_follow_the_causal_lm_conventions():
    """Retain NLL is transformers' own causal-LM loss (mean over the batch's labelled tokens, as OpenUnlearning's
    ``model(**batch).loss``); NPO's sequence log-likelihood is minus the summed token cross-entropy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(3, 37, (3, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:], attention[2, 4:] = 0, 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :3] = -100  # the prompt
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=attention, labels=labels)
    assert losses.nll_loss(output.logits, labels).item() == pytest.approx(output.loss.item(), rel=1e-5)
    summed = torch.nn.functional.cross_entropy(output.logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(-1)
    log_prob, count = losses.sequence_log_prob(output.logits, labels)
    assert torch.allclose(log_prob, -summed, rtol=1e-5) and count.tolist() == [6, 3, 1]


def full_gold_log_probs(logits, targets):
    """The memory-hungry formula the lean one replaces: a float32 log-softmax over the vocabulary, then a gather."""
    return torch.gather(logits.float().log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def values_and_gradients(function, logits):
    leaf = logits.detach().clone().requires_grad_()
    value = function(leaf)
    weights = torch.linspace(-1, 1, value.numel()).reshape(value.shape) if value.dim() else torch.tensor(1.0)
    (value.float() * weights).sum().backward()
    return value.detach().float(), leaf.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 301), (2, 9, 1000)])
def test_memory_lean_log_probs_equal_the_full_log_softmax(dtype, shape):
    """TRL's selective log-softmax (float32) and the chunked float32 upcast (bfloat16 on a CPU) give the full
    log-softmax's gold-token log-probabilities and gradients; so do NLL and the sequence sums built on them."""
    torch.manual_seed(sum(shape))
    logits = (4 * torch.randn(shape)).to(dtype)
    labels = torch.randint(0, shape[2], shape[:2])
    labels[:, :3], labels[0, -2:] = -100, -100
    targets = labels.clamp(min=0)

    def old_token_log_probs(x):
        shifted, target, mask = losses.shift(x, labels)
        return full_gold_log_probs(shifted, target) * mask

    pairs = [(lambda x: losses.gold_log_probs(x, targets), lambda x: full_gold_log_probs(x, targets)),
             (lambda x: losses.gold_log_probs(x, targets, chunk_positions=4), lambda x: full_gold_log_probs(x, targets)),
             (lambda x: losses.token_log_probs(x, labels)[0], old_token_log_probs),
             (lambda x: losses.sequence_log_prob(x, labels)[0], lambda x: old_token_log_probs(x).sum(-1)),
             (lambda x: losses.nll_loss(x, labels), lambda x: -old_token_log_probs(x).sum() / (labels[:, 1:] != -100).sum())]
    for lean, full in pairs:
        (lean_value, lean_grad), (full_value, full_grad) = values_and_gradients(lean, logits), values_and_gradients(full, logits)
        assert lean_value.dtype == torch.float32
        torch.testing.assert_close(lean_value, full_value, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(lean_grad, full_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_and_inverted_hinge_equal_the_whole_sequence_at_once(dtype):
    """Chunks of positions (each chunk's float32 softmax recomputed in the backward, its gradient written into one
    buffer) give the same values and gradients as one chunk, including a last chunk shorter than the others."""
    torch.manual_seed(0)
    logits, reference = (3 * torch.randn(3, 23, 257)).to(dtype), (3 * torch.randn(3, 23, 257)).to(dtype)
    labels = torch.randint(0, 257, (3, 23))
    labels[:, :5] = -100
    attention = torch.ones(3, 23, dtype=torch.long)
    attention[2, 15:] = 0
    for loss in (lambda x, n: losses.kl_to_reference(x, reference, attention, chunk_positions=n),
                 lambda x, n: losses.inverted_hinge_loss(x, labels, chunk_positions=n),
                 lambda x, n: losses.cross_entropy_unlearning_loss(x, labels, chunk_positions=n),
                 lambda x, n: losses.logit_margin_flattening_loss(x, labels, chunk_positions=n)):
        whole_value, whole_grad = values_and_gradients(lambda x: loss(x, 10**6), logits)
        assert whole_value.abs() > 1e-3 and whole_grad.abs().max() > 0
        for chunk in (1, 5, 22):
            value, grad = values_and_gradients(lambda x: loss(x, chunk), logits)
            torch.testing.assert_close(value, whole_value, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=1e-7)


def test_chunk_size_follows_the_vocabulary_and_the_device():
    """Automatic chunks hold at most CHUNK_ELEMENTS float32 values on an accelerator (a 128k vocabulary at batch 4
    is cut in chunks of 64 positions), CPU_CHUNK_ELEMENTS on the CPU (16 positions), a small vocabulary not at all."""
    seen = []
    for device, step in (("meta", 64), ("cpu", 16)):
        seen.clear()
        logits = torch.zeros(4, 130, 128 * 1024, dtype=torch.bfloat16, device=device)
        losses.chunked(lambda x: seen.append(x.shape[1]) or x[..., 0].float(), logits)
        assert seen == [step] * (130 // step) + [130 % step]
    assert 4 * 64 * 128 * 1024 == losses.CHUNK_ELEMENTS and 4 * 16 * 128 * 1024 == losses.CPU_CHUNK_ELEMENTS
    seen.clear()
    losses.chunked(lambda x: seen.append(x.shape[1]) or x[..., 0].float(), torch.zeros(4, 130, 1000))
    assert seen == [130]


def vocabulary_slices(tensor, vocab):
    """Names of the autograd nodes between ``tensor`` and the leaves that slice, select or index a tensor whose last
    dimension is ``vocab`` (the logits): each such node's backward fills a full-size zero gradient."""
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        sizes = getattr(node, "_saved_self_sym_sizes", None)
        if sizes is not None and int(sizes[-1]) == vocab and any(k in node.name() for k in ("Slice", "Select", "Index")):
            found.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("vocab", [301, 1000])
def test_no_loss_slices_logits_that_carry_gradients(vocab):
    """Every logits loss (on a row-split part of joint logits, as the one-pass trainer hands them) reaches the logits
    through TRL's kernel, GoldLogProb or the chunked function, never through a slice of the logits (whose backward
    would add a full-size zero-filled gradient per slice), and its gradient equals the unsplit computation's."""
    torch.manual_seed(vocab)
    joint = torch.randn(5, 11, vocab, requires_grad=True)
    labels, attention = torch.randint(0, vocab, (5, 11)), torch.ones(5, 11, dtype=torch.long)
    labels[:, :2], labels[3:, 8:], attention[3:, 8:] = -100, -100, 0  # the second part's rows are padded to the joint width
    reference = torch.randn(5, 11, vocab)
    for loss in (lambda x, rows: losses.nll_loss(x, labels[rows]), lambda x, rows: losses.sequence_log_prob(x, labels[rows])[0].sum(),
                 lambda x, rows: losses.capped_gradient_ascent_loss(x, labels[rows], 3.0),
                 lambda x, rows: losses.inverted_hinge_loss(x, labels[rows], chunk_positions=4),
                 lambda x, rows: losses.kl_to_reference(x, reference[rows], attention[rows], chunk_positions=4),
                 lambda x, rows: losses.token_weighted_ascent_loss(x, labels[rows], lambda p: losses.satimp_weight(p, 5.0, 1.0)),
                 lambda x, rows: losses.cross_entropy_unlearning_loss(x, labels[rows], chunk_positions=4),
                 lambda x, rows: losses.logit_margin_flattening_loss(x, labels[rows], chunk_positions=4)):
        forget, retain = joint.split([3, 2])
        value = loss(forget, slice(0, 3)) + 2 * loss(retain, slice(3, 5))
        assert vocabulary_slices(value, vocab) == []
        split_grad, = torch.autograd.grad(value, joint)
        whole = [loss(joint[:3], slice(0, 3)), loss(joint[3:], slice(3, 5))]  # slicing here: the reference computation
        assert vocabulary_slices(whole[0], vocab) != []  # the check sees a slice where there is one
        whole_grad, = torch.autograd.grad(whole[0] + 2 * whole[1], joint)
        torch.testing.assert_close(split_grad, whole_grad, rtol=1e-6, atol=1e-6)
