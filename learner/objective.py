"""The AVATAR objective as pure functions over per-token tensors (docs/method.md sections 1-3).

Conventions: per-token tensors are [B, T] with a 0/1 `mask` marking completion tokens (padding and prompt
positions are 0); per-sequence tensors are [B]. Nothing here knows about models, DeepSpeed or Ray.

The pieces take their settings as plain arguments; the learner calls only the two compositions at the end,
which read them from an ObjectiveConfig (the settings' one home and their defaults): `step_advantages` once
per step, `avatar_loss` once per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ObjectiveConfig

TAS_SHAPES = ("parabola", "uniform", "linear_decay", "linear_incline", "inverse_parabola")


# --- Temporal Advantage Shaping -------------------------------------------------------------------------------


def token_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each valid token's 0-based index within its own completion, and each row's completion length."""
    mask = mask.to(torch.long)
    position = (mask.cumsum(dim=1) - 1).clamp(min=0)
    length = mask.sum(dim=1, keepdim=True)
    return position, length


def tas_weights(mask: torch.Tensor, lam: float, shape: str) -> torch.Tensor:
    """Per-token weights from each completion's own length L: t~ = t / (L - 1) (t~ = 0 when L = 1, as
    linspace(0, 1, 1) gives), then
      parabola          1 + lam * (2 t~ - 1)^2      1+lam at both ends, 1 in the middle (AVATAR's default)
      uniform           1                           plain GRPO
      linear_decay      1 + lam * (1 - t~)          1+lam at the start, 1 at the end
      linear_incline    1 + lam * t~                1 at the start, 1+lam at the end
      inverse_parabola  1 + lam * (1 - (2 t~ - 1)^2) 1 at both ends, 1+lam in the middle
    No renormalisation. Zero on masked-out positions."""
    if shape not in TAS_SHAPES:
        raise ValueError(f"tas_shape: unknown shape {shape!r}, expected one of {TAS_SHAPES}")
    position, length = token_positions(mask)
    t = position.float() / (length - 1).clamp(min=1).float()
    if shape == "parabola":
        w = 1 + lam * (2 * t - 1) ** 2
    elif shape == "uniform":
        w = torch.ones_like(t)
    elif shape == "linear_decay":
        w = 1 + lam * (1 - t)
    elif shape == "linear_incline":
        w = 1 + lam * t
    else:
        w = 1 + lam * (1 - (2 * t - 1) ** 2)
    return w * mask.float()


# --- Advantages -----------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_G R) / (std_G R + eps) within each group. std is the sample std (n - 1), as
    torch.std and the TRL-style released trainer compute it; a group of one gets advantage 0."""
    rewards = rewards.float()
    adv = torch.zeros_like(rewards)
    for g in torch.unique(group_index):
        members = group_index == g
        r = rewards[members]
        if r.numel() < 2:
            continue
        adv[members] = (r - r.mean()) / (r.std() + eps)
    return adv


def vcrs_advantages(
    rewards: torch.Tensor, rbar: torch.Tensor, alpha: float, eps: float, guard_zero_std: bool, std: str
) -> torch.Tensor:
    """Replayed samples against their prompt's VCRS baseline R(q): A = alpha (R - R(q)) / (std_off + eps).
    std "none" (the release's effective behaviour: it normalises over a per-device batch of one sample):
    std_off = 1.0. std "replay_batch": std_off is the (sample) std of the rewards of all replayed samples in the
    batch, and 1.0 for a single sample. guard_zero_std extends the single-sample rule to any batch whose
    replayed rewards are all equal (std 0): dividing by eps there would blow the advantages up 10,000x."""
    if std not in ("none", "replay_batch"):
        raise ValueError(f"vcrs std must be 'none' or 'replay_batch', got {std!r}")
    rewards = rewards.float()
    if rewards.numel() == 0:
        return rewards
    if std == "none":
        return alpha * (rewards - rbar.float()) / (1.0 + eps)
    std = rewards.std() if rewards.numel() > 1 else torch.tensor(1.0)
    if guard_zero_std and std.item() == 0.0:
        std = torch.tensor(1.0)
    return alpha * (rewards - rbar.float()) / (std + eps)


# --- Per-token terms ------------------------------------------------------------------------------------------


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 where they agree)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's min(rho A, clip(rho, 1-eps, 1+eps) A) per token, rho = exp(logp - old) against the behaviour
    log-probs. `advantages` is [B] (broadcast over tokens). Returns the surrogate (to maximise), the ratio and
    a bool tensor marking tokens where the clip is active (rho < 1-eps with A < 0, or rho > 1+eps with A > 0)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return surrogate, ratio, clipped


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """sequence_mean: mean over each sequence's valid tokens, then over sequences; token_mean: mean over all
    valid tokens. num_sequences / num_tokens override the denominators so that micro-batches of one step
    (and ranks) sum to the loss of the whole step."""
    mask = mask.float()
    if aggregation == "sequence_mean":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.sum() / (num_sequences if num_sequences is not None else max(per_token.shape[0], 1))
    if aggregation == "token_mean":
        return (per_token * mask).sum() / (num_tokens if num_tokens is not None else mask.sum().clamp(min=1))
    raise ValueError(f"aggregation: unknown {aggregation!r}, expected sequence_mean or token_mean")


# --- The compositions the learner calls -------------------------------------------------------------------------


def step_advantages(rewards: torch.Tensor, group_index: torch.Tensor, is_replay: torch.Tensor, rbar: torch.Tensor,
                    cfg: ObjectiveConfig) -> torch.Tensor:
    """The advantages of one step's mixed batch ([B] each): group-normalised for fresh samples (is_replay
    False), VCRS against their rbar for replayed ones (rbar is ignored for fresh rows)."""
    adv = torch.zeros(rewards.shape, dtype=torch.float32)
    fresh = ~is_replay.bool()
    if fresh.any():
        adv[fresh] = group_advantages(rewards[fresh], group_index[fresh], cfg.adv_eps)
    if (~fresh).any():
        adv[~fresh] = vcrs_advantages(rewards[~fresh], rbar[~fresh], cfg.vcrs_alpha, cfg.adv_eps,
                                      cfg.vcrs_guard_zero_std, cfg.vcrs_std)
    return adv


@dataclass
class ObjectiveInputs:
    """One micro-batch: per-token [B, T] log-probs of the policy being trained, of the behaviour policy that
    generated the tokens and of the reference (None: no KL term), the completion mask, and each sequence's
    advantage [B]. num_sequences / num_tokens: the whole step's counts (None: this micro-batch's), so that the
    micro-batches of a step (and the ranks) sum to the step's loss."""

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    mask: torch.Tensor
    advantages: torch.Tensor
    num_sequences: int | None = None
    num_tokens: int | None = None


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def avatar_loss(x: ObjectiveInputs, cfg: ObjectiveConfig) -> LossOutput:
    """l_t = -w_t min(rho A, clip(rho) A) + beta KL_t, the TAS weight w on the policy term only, aggregated.
    Stats are over this micro-batch's valid tokens; `tokens` lets callers combine micro-batches."""
    mask = x.mask.float()
    advantages = x.advantages.to(x.logprobs.device)
    weights = tas_weights(mask, cfg.tas_lambda, cfg.tas_shape)
    surrogate, ratio, clipped = clipped_surrogate(x.logprobs, x.old_logprobs, advantages, cfg.clip_eps)
    per_token = -weights * surrogate
    kl = k3_kl(x.logprobs, x.ref_logprobs) if x.ref_logprobs is not None else torch.zeros_like(x.logprobs)
    if x.ref_logprobs is not None and cfg.kl_beta > 0:
        per_token = per_token + cfg.kl_beta * kl
    loss = aggregate(per_token, mask, cfg.aggregation, x.num_sequences, x.num_tokens)

    with torch.no_grad():
        valid = mask.bool()
        n = int(valid.sum())
        adv_tokens = advantages.unsqueeze(-1).expand_as(mask)[valid]
        stats = {
            "tokens": float(n),
            "sequences": float(mask.shape[0]),
            "clip_fraction": clipped[valid].float().mean().item() if n else 0.0,
            "kl": kl[valid].mean().item() if n else 0.0,
            "adv_abs_mean": advantages.abs().mean().item() if advantages.numel() else 0.0,
            "zero_adv_token_fraction": (adv_tokens == 0).float().mean().item() if n else 0.0,
            "ratio_max": ratio[valid].max().item() if n else 1.0,
        }
    return LossOutput(loss=loss, stats=stats)


def sft_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, aggregation: str,
    num_sequences: int | None = None, num_tokens: int | None = None,
) -> torch.Tensor:
    """Stage 0: negative log-likelihood of the chain-of-thought target tokens."""
    return aggregate(-logprobs, mask, aggregation, num_sequences, num_tokens)
