"""WGA, SatImp, CE-U and PDU (issue 19): each pure loss against a value computed by hand on a tiny tensor, PDU's dual
variable (its update, its reduction, its checkpoint) and its refusals through the CLI. That each method forgets the
world's forget set while keeping the retain set, runs with LoRA, gradient checkpointing and one forward pass is
tested by the suites parametrised over METHODS (test_trainers, test_engines, test_training_core, test_defaults); the
chunked losses' equality with the whole computation and their slice-free gradients in test_losses."""

import json
import math

import pytest
import torch

from hubunlearn.trainers import METHODS, PDUConfig, PDUTrainer, losses
from hubunlearn.world import tiny_llama

P = torch.tensor([0.5, 0.2, 0.9])  # the gold token's probability at three answer positions


def three_tokens(p=P):
    """Logits over a 2-token vocabulary whose gold token (id 0) has probability ``p`` at positions 0..2, and labels
    that mark them (position t predicts label t + 1; label 0 is the prompt)."""
    logits = torch.stack([p.log(), (1 - p).log()], -1)
    logits = torch.cat([logits, torch.zeros(1, 2)])[None].requires_grad_()  # a 4th position predicts nothing
    return logits, torch.tensor([[-100, 0, 0, 0]])


def test_wga_and_satimp_weights_by_hand():
    assert losses.wga_weight(P, 1.0).tolist() == pytest.approx([0.5, 0.2, 0.9])
    assert losses.satimp_weight(P, 5.0, 1.0).tolist() == pytest.approx([0.5**5 * 0.5, 0.2**5 * 0.8, 0.9**5 * 0.1])
    assert losses.satimp_weight(P, 5.0, 1.0).tolist() == pytest.approx([0.015625, 0.000256, 0.059049])


WEIGHTS = {"wga": (lambda p: losses.wga_weight(p, 1.0), P), "satimp": (lambda p: losses.satimp_weight(p, 5.0, 1.0), P**5 * (1 - P)),
           "ga": (torch.ones_like, torch.ones(3))}


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_token_weighted_ascent_by_hand_with_detached_weights(name):
    weight, w = WEIGHTS[name]
    logits, labels = three_tokens()
    loss = losses.token_weighted_ascent_loss(logits, labels, weight)
    assert loss.item() == pytest.approx((w * P.log()).sum().item() / 3, rel=1e-5)  # mean over the 3 answer tokens
    if name == "ga":
        assert loss.item() == pytest.approx(losses.gradient_ascent_loss(logits, labels).item(), rel=1e-6)
    loss.backward()
    # d(w·log p)/dz_gold = w·(1 − p) / 3 with w held fixed: a weight that carried gradient would add w'(p)·p·(1 − p)·log p
    assert logits.grad[0, :3, 0].tolist() == pytest.approx((w * (1 - P) / 3).tolist(), rel=1e-4)
    assert logits.grad[0, 3].abs().sum() == 0


def test_cross_entropy_unlearning_by_hand():
    """Logits (0, ln 2, ln 3), gold token 0: p = (1/6, 2/6, 3/6), the target q = (0, 0.4, 0.6), the loss
    −(0.4·ln(1/3) + 0.6·ln(1/2)) and its gradient p − q; the first answer token is not counted."""
    step = torch.tensor([0.0, math.log(2), math.log(3)])
    logits = torch.stack([torch.zeros(3), step, step, torch.zeros(3)])[None].requires_grad_()
    labels = torch.tensor([[-100, 2, 0, -100]])  # answer tokens: 2 (the first, ignored) and 0
    loss = losses.cross_entropy_unlearning_loss(logits, labels)
    assert loss.item() == pytest.approx(0.4 * math.log(3) + 0.6 * math.log(2), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 1].tolist() == pytest.approx([1 / 6, 1 / 3 - 0.4, 0.5 - 0.6], abs=1e-6)
    assert logits.grad[0, [0, 2, 3]].abs().sum() == 0  # the first answer token's position and the rest: no gradient
    assert losses.without_first_answer_token(torch.tensor([[-100, 5, 6, 7], [4, 5, -100, -100]])).tolist() == [
        [-100, -100, 6, 7], [-100, 5, -100, -100]]


def test_logit_margin_flattening_by_hand():
    """(max − mean)²: logits (1, 2, 6) give (6 − 3)² = 9, (0, 0, 3) give (3 − 1)² = 4; flat logits give 0."""
    logits = torch.tensor([[[1.0, 2.0, 6.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0], [9.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 1, 1, 1]])  # positions 0..2 predict answer tokens; position 3 nothing
    loss = losses.logit_margin_flattening_loss(logits, labels)
    assert loss.item() == pytest.approx((9 + 4 + 0) / 3)
    loss.backward()
    # d/dz (max − mean)² = 2·(max − mean)·(onehot(argmax) − 1/V), over 3 positions
    assert logits.grad[0, 0].tolist() == pytest.approx([-2 * 3 / 9, -2 * 3 / 9, 2 * 3 * (2 / 3) / 3])
    assert logits.grad[0, 3].abs().sum() == 0


def test_dual_ascent_is_projected():
    assert losses.dual_ascent(1.0, constraint=0.5, epsilon=0.3, step_size=2.0) == pytest.approx(1.4)  # violated: grows
    assert losses.dual_ascent(1.0, constraint=0.1, epsilon=0.3, step_size=2.0) == pytest.approx(0.6)  # holds: shrinks
    assert losses.dual_ascent(0.1, constraint=0.0, epsilon=0.3, step_size=2.0) == 0.0  # never below 0


@pytest.fixture(scope="module")
def world_tokenizer(world):
    from hubunlearn.world import train_tokenizer

    return train_tokenizer(world.corpus())


def pdu(tokenizer, rows, tmp_path, **overrides):
    forget, retain = rows
    settings = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                    disable_tqdm=True, report_to="none", seed=1, utility_probe_size=4, logging_steps=1, retain_epsilon=2.0,
                    dual_step_size=0.5, initial_multiplier=3.0, **overrides)
    return PDUTrainer(model=tiny_llama(tokenizer, hidden_size=32, num_layers=2), args=PDUConfig(**settings),
                      forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)


def test_pdu_dual_variable_follows_the_retain_nll_is_logged_and_checkpointed(world_tokenizer, forget_rows, retain_rows, tmp_path):
    """Each step λ ← max(0, λ + η·(retain NLL − ε)) from that step's retain NLL (logged), λ is logged, recorded, and
    saved in each checkpoint; resuming from one restores it."""
    rows = (forget_rows[:8], retain_rows[:8])
    trainer = pdu(world_tokenizer, rows, tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "retain_loss" in h]
    assert len(logged) == 3
    expected, multipliers = 3.0, []
    for entry in logged:  # an untrained model: retain NLL ~ ln(vocab) > ε, so λ grows
        multipliers.append(expected)
        assert entry["retain_multiplier"] == pytest.approx(expected, rel=1e-5)
        expected = max(0.0, expected + 0.5 * (entry["retain_loss"] - 2.0))
    assert expected > 3.0 and trainer.dual.multiplier == pytest.approx(expected, rel=1e-5)
    assert trainer.record_extras["dual"]["retain_multiplier"] == pytest.approx(expected, rel=1e-5)
    trainer.save_model()
    record = json.loads((tmp_path / "out" / "unlearning.json").read_text())
    assert record["dual"]["retain_multiplier"] == pytest.approx(expected, rel=1e-5) and record["hyperparameters"]["retain_epsilon"] == 2.0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "arXiv:2506.05314" in card and "Constrained Entropic Unlearning" in card and "| `initial_multiplier` | `3.0` |" in card
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    saved = state["stateful_callbacks"]["DualAscent"]["args"]["multiplier"]
    assert saved == pytest.approx(max(0.0, multipliers[1] + 0.5 * (logged[1]["retain_loss"] - 2.0)), rel=1e-5)

    resumed = pdu(world_tokenizer, rows, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    step3 = [h for h in resumed.state.log_history if "retain_multiplier" in h][-1]
    assert step3["retain_multiplier"] == pytest.approx(saved, rel=1e-5)  # step 3 ran with the restored λ, not 3.0


def test_pdu_loss_is_the_lagrangian(world_tokenizer, forget_rows, retain_rows, tmp_path):
    trainer = pdu(world_tokenizer, (forget_rows[:8], retain_rows[:8]), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    forget, retain = trainer._logged["forget_loss"][-1], trainer._logged["retain_loss"][-1]
    assert loss.item() == pytest.approx(forget + 3.0 * (retain - 2.0), rel=1e-5)
    assert forget > 0 and retain > 2.0


def test_pdu_without_retain_epsilon_is_refused_in_one_line(run_cli, tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n")
    common = ["unlearn", "--method", "PDU", "--model_name_or_path", tmp_path / "model", "--forget", forget, "--retain", forget]
    for extra, message in (([], "PDU needs --retain_epsilon"), (["--retain_epsilon", "0"], "--retain_epsilon must be above 0"),
                           (["--retain_epsilon", "-1"], "--retain_epsilon must be above 0"),
                           (["--retain_epsilon", "1", "--retain_loss", "kl"], "unknown --retain_loss 'kl'; choose one of: nll"),
                           (["--retain_epsilon", "1", "--retain_weight", "2"], "drop --retain_weight")):
        code, out, err = run_cli(*common, *extra, "--output_dir", tmp_path / "out")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


def test_the_new_methods_are_registered_with_their_papers():
    for method, arxiv in (("wga", "2502.19301"), ("satimp", "2505.11953"), ("ceu", "2503.01224"), ("pdu", "2506.05314")):
        assert METHODS[method]._paper["id"] == arxiv
    from hubunlearn.trainers import canonical_method

    assert [canonical_method(name) for name in ("WGA", "SatImp", "CEU", "CE-U", "PDU")] == ["wga", "satimp", "ceu", "ceu", "pdu"]
