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
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in (media or {}).items()}
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


# --- batched multimodal forward: each prompt's media encoded once, several prompts in one forward ----------

def media_nbytes(value) -> int:
    """Bytes held by the tensors in a (nested) mapping / sequence of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
        return sum(media_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(media_nbytes(v) for v in value)
    return 0


def encode_media(thinker: torch.nn.Module, medias: Sequence[Mapping[str, torch.Tensor] | None]
                 ) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """The vision and audio towers' outputs for several prompts' media, one call per tower for all of them
    (Qwen2.5-Omni takes per-video grids and per-audio lengths). Per prompt: (video embeddings
    [n_video_tokens, H], audio embeddings [n_audio_tokens, H]), None where the prompt has none. Runs under
    the caller's grad mode."""
    device = next(thinker.parameters()).device
    out: list[list[torch.Tensor | None]] = [[None, None] for _ in medias]
    vids = [i for i, m in enumerate(medias) if m and m.get("pixel_values_videos") is not None]
    if vids:
        grids = [medias[i]["video_grid_thw"] for i in vids]
        pooled = thinker.get_video_features(
            torch.cat([medias[i]["pixel_values_videos"] for i in vids]).to(device),
            torch.cat(grids).to(device)).pooler_output
        k = 0
        for i, g in zip(vids, grids):
            out[i][0] = torch.cat(pooled[k:k + g.shape[0]])
            k += g.shape[0]
    auds = [i for i, m in enumerate(medias) if m and m.get("input_features") is not None]
    if auds:
        width = max(medias[i]["input_features"].shape[-1] for i in auds)
        feats = torch.cat([torch.nn.functional.pad(medias[i]["input_features"],
                                                   (0, width - medias[i]["input_features"].shape[-1]))
                           for i in auds])
        masks = torch.cat([torch.nn.functional.pad(medias[i]["feature_attention_mask"],
                                                   (0, width - medias[i]["feature_attention_mask"].shape[-1]))
                           for i in auds])
        hidden = thinker.get_audio_features(feats.to(device), masks.to(device)).last_hidden_state
        _, lengths = thinker.audio_tower._get_feat_extract_output_lengths(masks.sum(-1))
        pieces = torch.split(hidden, lengths.tolist())
        k = 0
        for i in auds:
            n = medias[i]["input_features"].shape[0]
            out[i][1] = torch.cat(pieces[k:k + n])
            k += n
    return [(v, a) for v, a in out]


def media_positions(thinker: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    medias: Sequence[Mapping[str, torch.Tensor] | None]) -> torch.Tensor:
    """Qwen2.5-Omni's 3-D rope positions [3, B, L] for rows that each carry their own prompt's media (None for
    a text-only row), exactly as the thinker's forward computes them from per-row grids and audio lengths.
    Rows whose video carries its own audio interleaved (media["use_audio_in_video"]) and rows with separate
    items go to get_rope_index apart: it takes one layout per call."""
    def cat(present, key, fn=lambda v: v):
        values = [fn(m[key]) for m in present if m.get(key) is not None]
        return torch.cat(values).to(input_ids.device) if values else None

    interleaved = [bool(m and m.get("use_audio_in_video")) for m in medias]
    positions = torch.ones(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    for layout in set(interleaved):
        rows = [i for i, flag in enumerate(interleaved) if flag == layout]
        present = [medias[i] for i in rows if medias[i]]
        positions[:, rows], _ = thinker.get_rope_index(
            input_ids[rows], None, cat(present, "video_grid_thw"), attention_mask[rows], layout,
            cat(present, "feature_attention_mask", lambda v: v.sum(-1)), cat(present, "video_second_per_grid"))
    return positions


def scatter_media(embeds: torch.Tensor, input_ids: torch.Tensor, config,
                  features: Sequence[tuple[torch.Tensor | None, torch.Tensor | None] | None]) -> torch.Tensor:
    """Text embeddings [B, L, H] with each row's media features put on its placeholder tokens (row order:
    `features[i]` is row i's (video, audio) features, None for a text-only row)."""
    for slot, token in ((0, config.video_token_id), (1, config.audio_token_id)):
        parts = [f[slot] for f in features if f is not None and f[slot] is not None]
        if parts:
            mask = (input_ids == token).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, torch.cat(parts).to(embeds.device, embeds.dtype))
    return embeds
