"""The one leaf every package may import: what all of them share and nothing of ours depends on."""

from .config import StrictConfig

__all__ = ["StrictConfig"]
