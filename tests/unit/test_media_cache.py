"""The learner's per-prompt media cache is bounded by bytes, evicts the least recently used entry first and
does not keep an entry larger than its bound."""

from __future__ import annotations

import torch

from learner.learner import MediaCache, _MediaEntry


def _entry(n_floats: int) -> _MediaEntry:
    return _MediaEntry({"pixel_values_videos": torch.zeros(n_floats)})


def test_byte_bound_and_lru_order():
    cache = MediaCache(max_bytes=1000)
    for key in "abc":
        cache.put(key, _entry(100))  # 400 bytes each
    assert cache.nbytes == 800 and list(cache._items) == ["b", "c"]  # "a" evicted
    cache.get("b")  # b is now the most recent
    cache.put("d", _entry(100))
    assert list(cache._items) == ["b", "d"] and cache.nbytes <= 1000
    cache.put("big", _entry(1000))  # 4000 bytes: used by the caller, never kept
    assert "big" not in cache and cache.nbytes == 800
    cache.put("none", None)  # a prompt without media costs nothing
    assert "none" in cache and cache.nbytes == 800
    cache.put("d", _entry(10))  # replacing an entry updates the count
    assert cache.nbytes == 440


def test_frozen_entry_keeps_only_features_and_position_inputs():
    media = {"pixel_values_videos": torch.zeros(1000), "video_grid_thw": torch.tensor([[1, 2, 2]]),
             "input_features": torch.zeros(1, 128, 10), "feature_attention_mask": torch.ones(1, 10, dtype=torch.long)}
    entry = _MediaEntry(media, (torch.zeros(1, 4), torch.zeros(2, 4)))
    assert set(entry.media) == {"video_grid_thw", "feature_attention_mask"}
    assert entry.nbytes == 3 * 8 + 10 * 8 + 12 * 4
