"""Per-token log-probabilities of completions under a policy: the learner's current and reference
log-probs, and the parity check against the rollout engine's behaviour log-probs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Multimodal tensors that hold one entry per media item and must be repeated once per batch row.
_PER_ITEM_KEYS = ("pixel_values_videos", "video_grid_thw", "video_second_per_grid", "input_features",
                  "feature_attention_mask")


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] without materialising the full log-softmax (vocabularies can be 150k)."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def repeat_media(media: Mapping[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """Media inputs of one prompt repeated for `times` rows (videos and audios are concatenated per item)."""
    out = {}
    for key, value in media.items():
        if key == "pixel_values_videos":
            out[key] = value.repeat(times, 1)
        elif key in _PER_ITEM_KEYS:
            out[key] = value.repeat(times, *([1] * (value.dim() - 1)))
        else:
            out[key] = value
    return out


def build_batch(
    prompt_ids: Sequence[int], completions: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [prompt + completion] rows. Returns input_ids, attention_mask and completion_mask (1 on
    the positions of completion tokens)."""
    rows = [list(prompt_ids) + list(c) for c in completions]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[i, : len(row)] = 1
        completion_mask[i, len(prompt_ids) : len(row)] = 1
    return input_ids, attention, completion_mask


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   media: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, L] tensor whose entry t is log p(input_ids[t] | input_ids[:t]); entry 0 is 0."""
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in (media or {}).items()}
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, **kwargs)
    logp = gather_logprobs(out.logits[:, :-1], input_ids[:, 1:].to(device))
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    media: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Log-probs of each completion's tokens given the (shared) prompt and its media: one 1-D tensor each."""
    input_ids, attention, completion_mask = build_batch(prompt_ids, completions, pad_id)
    media = repeat_media(media, len(completions)) if media else None
    logp = token_logprobs(model, input_ids, attention, media)
    return [logp[i][completion_mask[i].bool()].detach().cpu() for i in range(len(completions))]
