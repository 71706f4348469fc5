"""Hand-computed checks of every formula in learner/objective.py (docs/method.md sections 1-3). The loss and the
advantages are checked through the two compositions the learner calls (step_advantages, avatar_loss); that the
learner calls them is checked in tests/integration/test_learner.py."""

import math

import pytest
import torch

from learner.config import ObjectiveConfig
from learner.objective import (
    ObjectiveInputs,
    aggregate,
    avatar_loss,
    clipped_surrogate,
    group_advantages,
    k3_kl,
    sft_loss,
    step_advantages,
    tas_weights,
    vcrs_advantages,
)

T = torch.tensor
RELEASE = ObjectiveConfig()  # the release's defaults: clip 0.2, beta 0.1, parabola with lambda 0.3, eps 1e-4
EPS = RELEASE.adv_eps


def test_release_defaults_are_the_ones_these_hand_values_assume():
    assert (RELEASE.clip_eps, RELEASE.kl_beta, RELEASE.tas_shape, RELEASE.tas_lambda) == (0.2, 0.1, "parabola", 0.3)
    assert (RELEASE.vcrs_alpha, RELEASE.adv_eps, RELEASE.vcrs_std, RELEASE.vcrs_guard_zero_std) == (1.0, 1e-4, "none", True)
    assert RELEASE.aggregation == "sequence_mean"


def _row(length, width=None, offset=0):
    width = width or length + offset
    m = torch.zeros(1, width)
    m[0, offset : offset + length] = 1
    return m


# --- TAS ------------------------------------------------------------------------------------------------------

PARABOLA = {
    1: [1.3],
    2: [1.3, 1.3],
    3: [1.3, 1.0, 1.3],
    4: [1.3, 1 + 0.3 / 9, 1 + 0.3 / 9, 1.3],
    5: [1.3, 1.075, 1.0, 1.075, 1.3],
}


@pytest.mark.parametrize("length", sorted(PARABOLA))
def test_tas_parabola_ends_and_middle(length):
    w = tas_weights(_row(length), 0.3, "parabola")
    assert torch.allclose(w[0], T(PARABOLA[length]), atol=1e-6)


def test_tas_parabola_other_lambda_and_long():
    w = tas_weights(_row(101), 0.5, "parabola")[0]
    assert w[0].item() == pytest.approx(1.5) and w[-1].item() == pytest.approx(1.5)
    assert w[50].item() == pytest.approx(1.0)
    assert w[25].item() == pytest.approx(1 + 0.5 * 0.25)


def test_tas_padding_and_offset_use_each_rows_own_length():
    mask = torch.cat([_row(3, 6), _row(5, 6, offset=1), _row(1, 6, offset=4)])
    w = tas_weights(mask, 0.3, "parabola")
    assert torch.allclose(w[0], T([1.3, 1.0, 1.3, 0, 0, 0]))
    assert torch.allclose(w[1], T([0, 1.3, 1.075, 1.0, 1.075, 1.3]))
    assert torch.allclose(w[2], T([0, 0, 0, 0, 1.3, 0]))
    assert tas_weights(torch.zeros(2, 4), 0.3, "parabola").abs().sum() == 0  # empty rows give no weight


@pytest.mark.parametrize(
    "shape,expected",
    [
        ("uniform", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear_decay", [1.3, 1.225, 1.15, 1.075, 1.0]),
        ("linear_incline", [1.0, 1.075, 1.15, 1.225, 1.3]),
        ("inverse_parabola", [1.0, 1.225, 1.3, 1.225, 1.0]),
    ],
)
def test_tas_ablation_shapes(shape, expected):
    assert torch.allclose(tas_weights(_row(5), 0.3, shape)[0], T(expected), atol=1e-6)


def test_tas_unknown_shape_is_named():
    with pytest.raises(ValueError, match="tas_shape"):
        tas_weights(_row(3), 0.3, "cubic")


# --- Advantages -----------------------------------------------------------------------------------------------


def test_group_advantages_equal_rewards_are_zero():
    adv = group_advantages(T([0.5, 0.5, 0.5, 0.5]), T([0, 0, 0, 0]), EPS)
    assert torch.equal(adv, torch.zeros(4))


def test_group_advantages_mixed_two_groups():
    adv = group_advantages(T([1.0, 0.0, 0.0, 1.0, 2.0, 4.0]), T([0, 0, 0, 0, 1, 1]), EPS)
    s0 = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    s1 = math.sqrt(2)  # sample std of [2, 4]
    expected = [0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4),
                -1 / (s1 + 1e-4), 1 / (s1 + 1e-4)]
    assert torch.allclose(adv, T(expected), atol=1e-6)


def test_group_of_one_has_zero_advantage():
    assert group_advantages(T([1.0]), T([3]), EPS).item() == 0.0


def test_vcrs_single_sample_uses_std_one():
    for std in ("none", "replay_batch"):
        adv = vcrs_advantages(T([1.0]), T([0.25]), 1.0, EPS, True, std)
        assert adv.item() == pytest.approx(0.75 / (1 + 1e-4))


def test_vcrs_default_is_the_release_scale():
    # the release's per-device batch of one sample: std_off = 1, A = alpha (R - R(q)) whatever the batch
    adv = vcrs_advantages(T([1.0, 0.0, 1.0]), T([0.5, 0.5, 0.2]), 2.0, EPS, True, "none")
    assert torch.allclose(adv, T([1.0, -1.0, 1.6]) / (1 + 1e-4), atol=1e-6)


def test_vcrs_replay_batch_std_and_alpha():
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 1]
    adv = vcrs_advantages(T([1.0, 0.0, 1.0]), T([0.5, 0.5, 0.2]), 2.0, EPS, True, "replay_batch")
    assert torch.allclose(adv, 2 * T([0.5, -0.5, 0.8]) / (s + 1e-4), atol=1e-6)
    # 1 / 0.577: the batch std makes replayed advantages 1.73x the release's here
    assert adv[0].item() / vcrs_advantages(T([1.0]), T([0.5]), 2.0, EPS, True, "none").item() == pytest.approx(1 / s, rel=1e-3)


def test_vcrs_unknown_std_mode_is_refused():
    with pytest.raises(ValueError, match="replay_batch"):
        vcrs_advantages(T([1.0, 0.0]), T([0.5, 0.5]), 1.0, EPS, True, "batch")


def test_vcrs_all_equal_rewards_guard():
    adv = vcrs_advantages(T([1.0, 1.0]), T([0.5, 0.0]), 1.0, EPS, True, "replay_batch")
    assert torch.allclose(adv, T([0.5, 1.0]) / (1 + 1e-4))
    raw = vcrs_advantages(T([1.0, 1.0]), T([0.5, 0.0]), 1.0, EPS, False, "replay_batch")
    assert torch.allclose(raw, T([0.5, 1.0]) / 1e-4)


def test_step_advantages_route_fresh_and_replayed():
    rewards = T([1.0, 0.0, 1.0, 0.0])
    group, replay, rbar = T([0, 0, 1, 2]), T([False, False, True, True]), T([0.0, 0.0, 0.5, 0.5])
    s = math.sqrt(0.5)
    adv = step_advantages(rewards, group, replay, rbar, ObjectiveConfig(vcrs_std="replay_batch"))
    assert torch.allclose(adv[:2], T([0.5, -0.5]) / (s + 1e-4), atol=1e-6)
    assert torch.allclose(adv[2:], T([0.5, -0.5]) / (s + 1e-4), atol=1e-6)
    adv = step_advantages(rewards, group, replay, rbar, RELEASE)  # default: replayed ones at the release's scale
    assert torch.allclose(adv[:2], T([0.5, -0.5]) / (s + 1e-4), atol=1e-6)
    assert torch.allclose(adv[2:], T([0.5, -0.5]) / (1 + 1e-4), atol=1e-6)


# --- KL and the clipped surrogate -----------------------------------------------------------------------------


def test_k3_kl_zero_at_equality_and_hand_value():
    lp = T([[-1.0, -2.0, -0.3]])
    assert torch.equal(k3_kl(lp, lp.clone()), torch.zeros(1, 3))
    assert k3_kl(T([0.0]), T([math.log(2)])).item() == pytest.approx(1 - math.log(2))
    assert k3_kl(T([math.log(2)]), T([0.0])).item() == pytest.approx(0.5 + math.log(2) - 1)


@pytest.mark.parametrize(
    "adv,ratio,value,clipped,grad",
    [
        (1.0, 1.5, 1.2, True, 0.0),  # A > 0 above the clip: capped, no gradient
        (1.0, 0.5, 0.5, False, 0.5),  # A > 0 below the clip: unclipped, d(rho A)/dlogp = rho A
        (1.0, 1.1, 1.1, False, 1.1),  # inside the range
        (-1.0, 1.5, -1.5, False, -1.5),  # A < 0 above: the unclipped term is the min
        (-1.0, 0.5, -0.8, True, 0.0),  # A < 0 below the clip: capped
        (-2.0, 0.9, -1.8, False, -1.8),
    ],
)
def test_clipped_surrogate_both_sides(adv, ratio, value, clipped, grad):
    old = T([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    surrogate, rho, clip_mask = clipped_surrogate(logp, old, T([adv]), 0.2)
    assert rho.item() == pytest.approx(ratio)
    assert surrogate.item() == pytest.approx(value)
    assert bool(clip_mask.item()) is clipped
    surrogate.sum().backward()
    assert logp.grad.item() == pytest.approx(grad)


# --- Aggregation and the loss ---------------------------------------------------------------------------------


def test_aggregation_sequence_then_batch_and_token_mean():
    per_token = T([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, "sequence_mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    # global denominators let micro-batches sum to the step's loss
    halves = [aggregate(per_token[i : i + 1], mask[i : i + 1], "sequence_mean", num_sequences=2) for i in (0, 1)]
    assert sum(halves).item() == pytest.approx(3.0)


def test_tas_multiplies_policy_term_only():
    lp = T([[-1.0, -1.0]])
    ref = T([[-1.0 + math.log(2), -1.0]])  # KL 1-ln2 on token 0, 0 on token 1
    out = avatar_loss(ObjectiveInputs(lp, lp.clone(), ref, T([[1, 1]]), T([1.0])), RELEASE)
    # ratio 1: policy term -1.3 * A on both tokens (L=2: both ends); KL added unweighted
    expected = (-1.3 + 0.1 * (1 - math.log(2)) - 1.3) / 2
    assert out.loss.item() == pytest.approx(expected)
    assert out.stats["kl"] == pytest.approx((1 - math.log(2)) / 2)


def test_stats_clip_fraction_zero_adv_and_ratio_max():
    old = T([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).log_softmax(-1)
    lp = old + T([[math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = avatar_loss(ObjectiveInputs(lp, old, None, T([[1, 1, 1], [1, 1, 0]]), T([1.0, 0.0])), RELEASE)
    assert out.stats["clip_fraction"] == pytest.approx(1 / 5)
    assert out.stats["zero_adv_token_fraction"] == pytest.approx(2 / 5)
    assert out.stats["ratio_max"] == pytest.approx(1.5)
    assert out.stats["adv_abs_mean"] == pytest.approx(0.5)
    assert out.stats["kl"] == 0.0


def test_sft_loss_is_target_nll():
    lp = T([[-9.0, -1.0, -2.0], [-9.0, -4.0, -9.0]])
    mask = T([[0, 1, 1], [0, 1, 0]])
    assert sft_loss(lp, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert sft_loss(lp, mask, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2)


# --- Equivalence with an independently written plain GRPO -----------------------------------------------------


def _plain_grpo(logits, targets, lengths, rewards, groups, ref_logp, beta):
    """Textbook GRPO with ratio 1 (on-policy), sequence-mean then batch-mean, written out loop by loop."""
    total = 0.0
    for i in range(logits.shape[0]):
        same = [j for j in range(len(groups)) if groups[j] == groups[i]]
        r = [rewards[j] for j in same]
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        a = (rewards[i] - mean) / (std + 1e-4)
        seq = 0.0
        for t in range(lengths[i]):
            logp = torch.log_softmax(logits[i, t], dim=-1)[targets[i, t]]
            ratio = torch.exp(logp - logp.detach())
            kl = torch.exp(ref_logp[i, t] - logp) - (ref_logp[i, t] - logp) - 1
            seq = seq + (-ratio * a + beta * kl)
        total = total + seq / lengths[i]
    return total / logits.shape[0]


def _learner_path(logp, ref, mask, rewards, groups, cfg, micro_batches=((0, 3), (3, 6))):
    """The loss as Learner.train_step builds it: step_advantages once for the step, then avatar_loss on each
    micro-batch with the step's denominators, the micro-batch losses summed (as their gradients accumulate)."""
    b = logp.shape[0]
    adv = step_advantages(T(rewards), T(groups), torch.zeros(b, dtype=torch.bool), torch.zeros(b), cfg)
    return sum(avatar_loss(ObjectiveInputs(logp[i:j], logp[i:j].detach(), ref[i:j], mask[i:j], adv[i:j],
                                           num_sequences=b, num_tokens=int(mask.sum())), cfg).loss
               for i, j in micro_batches)


def test_uniform_no_replay_ratio_one_equals_plain_grpo():
    torch.manual_seed(0)
    b, t, v = 6, 5, 7
    lengths = [5, 3, 4, 1, 5, 2]
    logits = torch.randn(b, t, v)
    targets = torch.randint(0, v, (b, t))
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    rewards = [1.0, 0.0, 0.5, 1.0, 0.0, 0.2]
    groups = [0, 0, 0, 1, 1, 1]
    ref = torch.log_softmax(torch.randn(b, t, v), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    x1 = logits.clone().requires_grad_(True)
    expected = _plain_grpo(x1, targets, lengths, rewards, groups, ref, beta=0.1)
    expected.backward()

    x2 = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x2, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = _learner_path(logp, ref, mask, rewards, groups, ObjectiveConfig(tas_shape="uniform", kl_beta=0.1))
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(x2.grad, x1.grad, atol=1e-6)
    assert x2.grad.abs().sum() > 0
    # and TAS (the release's parabola) really changes the gradient
    x3 = logits.clone().requires_grad_(True)
    logp3 = torch.log_softmax(x3, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    _learner_path(logp3, ref, mask, rewards, groups, RELEASE).backward()
    assert not torch.allclose(x3.grad, x1.grad, atol=1e-4)
