"""The output layer kept apart (HeadLogits): same losses and gradients as the model's logits, no logits kept, and the
full logits wherever the model's forward does more than the output layer's product."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from hubunlearn.trainers import losses
from hubunlearn.trainers.head import HeadLogits, output_layer, policy_logits


def llama(hidden: int, layers: int, vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))


def batch_of(vocab: int, rows: int = 3, length: int = 17):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length), generator=generator)
    attention = torch.ones_like(ids)
    attention[1, length - 5:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": attention}, labels


def every_loss(model, reference, batch, labels, chunked: bool):
    """A mix of every way a loss reads logits, on a forget part (2 rows) and a retain part (1 row) of one pass."""
    forget, retain = policy_logits(model, batch, chunked).split([2, 1])
    with torch.no_grad():
        reference_retain = policy_logits(reference, batch, chunked).split([2, 1])[1]
    return (losses.nll_loss(forget, labels[:2]) + losses.inverted_hinge_loss(forget, labels[:2], chunk_positions=3)
            + losses.kl_to_reference(retain, reference_retain, batch["attention_mask"][2:], chunk_positions=4)
            + 0.1 * losses.sequence_log_prob(retain, labels[2:])[0].sum())


@pytest.mark.parametrize("hidden,layers,vocab,frozen_head", [(32, 2, 300, False), (48, 1, 1000, False), (32, 2, 300, True)])
def test_head_logits_give_the_logits_losses_and_gradients(hidden, layers, vocab, frozen_head):
    """Also with a frozen output layer (as under LoRA), where the chunked losses keep each position's gradient from
    the forward pass instead of recomputing the chunk."""
    model, reference = llama(hidden, layers, vocab), llama(hidden, layers, vocab, seed=1)
    model.lm_head.weight.requires_grad_(not frozen_head)
    batch, labels = batch_of(vocab)
    results = []
    for chunked in (False, True):
        model.zero_grad()
        loss = every_loss(model, reference, batch, labels, chunked)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}))
    assert ("lm_head.weight" in results[0][1]) is not frozen_head
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert plain.abs() > 1e-3
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(policy_logits(model, batch).materialize(), model(**batch).logits)


def test_no_vocabulary_sized_tensor_is_kept_for_the_backward():
    """The forward pass of a loss on HeadLogits saves nothing the size of the logits (only hidden states and weights);
    on the model's logits tensor it does."""
    vocab = 5000
    model = llama(32, 2, vocab)
    batch, labels = batch_of(vocab, rows=4, length=40)

    def largest_saved(chunked: bool) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            losses.nll_loss(policy_logits(model, batch, chunked), labels)
        return max(sizes)

    logits_size = 4 * 40 * vocab
    assert largest_saved(False) >= logits_size
    assert largest_saved(True) <= vocab * 32  # the output layer's weight


def test_frozen_output_layer_gets_no_gradient_and_lora_still_trains():
    vocab = 300
    model = get_peft_model(llama(32, 2, vocab), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    batch, labels = batch_of(vocab)
    logits = policy_logits(model, batch)
    assert isinstance(logits, HeadLogits) and not logits.weight.requires_grad
    losses.nll_loss(logits, labels).backward()
    trained = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(g is not None for g in trained.values())
    assert all(g.abs().max() > 0 for name, g in trained.items() if "lora_B" in name)  # lora_A's is 0 while B starts at 0
    assert model.get_output_embeddings().weight.grad is None


def test_models_whose_logits_are_more_than_the_product_keep_the_full_logits():
    """An output layer under LoRA, a model family that soft-caps its logits (Gemma 2), or chunked=False: the
    model's logits tensor, unchanged."""
    vocab = 300
    batch, _ = batch_of(vocab)
    lora_head = get_peft_model(llama(32, 2, vocab), LoraConfig(r=4, target_modules=["lm_head"], task_type="CAUSAL_LM"))
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0))
    for model in (lora_head, gemma):
        assert output_layer(model) is None
        logits = policy_logits(model, batch)
        assert isinstance(logits, torch.Tensor)
        torch.testing.assert_close(logits, model(**batch).logits)
    plain = llama(32, 2, vocab)
    assert output_layer(plain) is not None and isinstance(policy_logits(plain, batch, chunked=False), torch.Tensor)
    assert "forward" not in vars(output_layer(plain))  # the identity forward is gone after the call


@pytest.mark.parametrize("weight_trains", [True, False])
def test_mean_nll_with_gradients_in_the_forward_pass_equals_the_logits_one(weight_trains):
    """nll_loss on HeadLogits computes its gradients in the forward pass (no recomputation): the loss, the hidden
    states' and the weight's gradients equal those of the logits tensor, at several chunk sizes, scaled by the
    incoming gradient (here -2, as gradient ascent's sign and a weight would)."""
    vocab, generator = 700, torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 16, generator=generator)
    weight = torch.randn(vocab, 16, generator=generator)
    labels = torch.randint(0, vocab, (3, 11), generator=generator)
    labels[:, :4] = -100
    labels[2, 8:] = -100
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_trains)
        logits = HeadLogits(h, w) if chunked else h @ w.T
        loss = losses.nll_loss(logits, labels)
        (-2 * loss).backward()
        results.append((loss.detach(), h.grad, w.grad))
    (loss, h_grad, w_grad), (head_loss, head_h_grad, head_w_grad) = results
    torch.testing.assert_close(head_loss, loss)
    torch.testing.assert_close(head_h_grad, h_grad)
    assert h_grad.abs().max() > 0
    if weight_trains:
        torch.testing.assert_close(head_w_grad, w_grad)
    else:
        assert head_w_grad is None


@pytest.mark.parametrize("spread", [False, True])
def test_evaluation_statistics_from_hidden_states_equal_the_full_logits_ones(spread, monkeypatch):
    """token_stats (every metric's forward pass) reads the final hidden states and makes the labelled positions'
    logits a few at a time: same numbers as a log-softmax of the model's full logits, and the output layer never
    returns vocabulary-sized logits, in the plain and the shared-prompt paths."""
    from hubunlearn.metrics import stats

    model, vocab = llama(32, 2, 1000).eval(), 1000
    batch, labels = batch_of(vocab, rows=4, length=15)
    examples = [{"input_ids": ids[mask.bool()].tolist(), "labels": row[mask.bool()].tolist(), "prompt_length": 5}
                for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], labels)]
    examples.append({**examples[0], "input_ids": examples[0]["input_ids"][:5] + examples[1]["input_ids"][5:12],
                     "labels": [-100] * 5 + examples[1]["input_ids"][5:12]})  # shares the first example's prompt
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, output: widths.append(output.shape[-1]))
    monkeypatch.setattr(stats, "default_chunk_positions", lambda *args: 3)  # several chunks per batch
    for share_prompts in (True, False):
        widths.clear()
        got = stats.token_stats(model, examples, 0, batch_size=3, spread=spread, share_prompts=share_prompts)
        assert widths and set(widths) == {32}  # hidden states, never the vocabulary
        for example, result in zip(examples, got):
            with torch.no_grad():
                log_probs = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(example["labels"][1:])
            at = targets != -100
            expected = log_probs[at].gather(-1, targets[at].unsqueeze(-1)).squeeze(-1)
            assert result.log_probs == pytest.approx(expected.tolist(), abs=1e-5)
            assert result.correct == (log_probs[at].argmax(-1) == targets[at]).tolist()
            if spread:
                mean = (log_probs[at].exp() * log_probs[at]).sum(-1)
                assert result.mean_log_probs == pytest.approx(mean.tolist(), abs=1e-5)
