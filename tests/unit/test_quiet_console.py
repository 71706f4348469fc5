"""The console stays quiet at the source: the tiny Omni config's talker ids are valid, and the one filter
(policy/quiet.py) drops only transformers' warnings about its own default talker config."""

import dataclasses
import json
import logging
import subprocess
import sys

from transformers import Qwen2_5OmniTalkerConfig

from policy.quiet import TalkerDefaultsFilter

DEFAULTS = {f.name: f.default for f in dataclasses.fields(Qwen2_5OmniTalkerConfig)}


def _record(name: str, top: int, value: int) -> logging.LogRecord:
    msg = (f"Model config: {name} must be `None` or an integer within the vocabulary (between 0 and {top}), "
           f"got {value}. This may result in unexpected behavior.")
    return logging.LogRecord("transformers.configuration_utils", logging.WARNING, __file__, 1, msg, None, None)


def test_filter_drops_only_the_talker_class_defaults():
    f = TalkerDefaultsFilter()
    top = DEFAULTS["vocab_size"] - 1
    assert not f.filter(_record("tts_text_start_token_id", top, DEFAULTS["tts_text_start_token_id"]))
    assert not f.filter(_record("vision_start_token_id", top, DEFAULTS["vision_start_token_id"]))
    # a value that is not the default, another vocabulary, a field the talker does not have: all still shown
    assert f.filter(_record("vision_start_token_id", top, 500000))
    assert f.filter(_record("vision_start_token_id", 99, DEFAULTS["vision_start_token_id"]))
    assert f.filter(_record("image_token_id", top, DEFAULTS["vision_start_token_id"]))
    assert f.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "something else", None, None))


def test_tiny_omni_config_holds_valid_talker_ids(tmp_path):
    from policy.config import TinyModelConfig
    from policy.tiny import build_tiny_model

    out = build_tiny_model(TinyModelConfig(kind="omni"), tmp_path / "m")
    talker = json.loads((out / "config.json").read_text())["talker_config"]
    bad = {k: v for k, v in talker.items()
           if k.endswith("_token_id") and isinstance(v, int) and not 0 <= v < talker["vocab_size"]}
    assert bad == {}


def test_building_and_loading_the_tiny_model_prints_no_token_id_warning(tmp_path):
    # a fresh process: transformers warns once per process and message
    code = (f"from policy.config import TinyModelConfig\nfrom policy.tiny import build_tiny_model\n"
            f"from policy.model import load_policy\n"
            f"load_policy(build_tiny_model(TinyModelConfig(kind='omni'), {str(tmp_path / 'm')!r}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "within the vocabulary" not in proc.stderr + proc.stdout
