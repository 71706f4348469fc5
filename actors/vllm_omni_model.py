"""The torchvision-free Qwen2.5-Omni thinker class, built on import: vLLM imports this module when it loads a
model of the architecture that actors.vllm_omni registers by name (in whichever of its processes needs it)."""

from .vllm_omni import build_thinker_class

AvatarQwen2_5OmniThinker = build_thinker_class()
