"""Weight sync per publish, medium by medium, in one run: bytes sent and seconds from the learner's publish
until the rollout engine holds the version, for object_store (the default), gloo (vLLM's weight-transfer
broadcast) and lora (the adapter only), on the demo's model and on a larger tiny model. Prints a table and
writes JSON.

    python -m benchmarks.weights [--repeats 3] [--out benchmarks/results/weights.json]

The learner side and one real vLLM-CPU engine (AsyncLLM, as in a rollout worker) run in this process; Ray is started locally for the object store. The weights are a LoRA learner's (r 8, all linear
layers of the language model, towers frozen): the merged weights for object_store and gloo, the adapter for
lora. The share of the demo's RL step divides by --demo-step-s, by default the s/step benchmarks/pipeline.py printed for
the demo at staleness 1 (docs/benchmarks.md), another run on the same machine."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script, this folder comes first on sys.path and its learner.py would shadow the learner package.
sys.path[:] = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

MODELS = {
    "demo": dict(kind="omni", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1),
    "larger": dict(kind="omni", vocab_size=1024, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2,
                   intermediate_size=1536),
}


def learner_weights(model_dir: Path) -> tuple[dict, dict, dict, int]:
    """A LoRA learner's publishable states: (merged full weights, adapter, adapter config, parameter count)."""
    from learner.config import LearnerConfig, LoraConfig
    from learner.distributed import shutdown_distributed
    from learner.learner import Learner

    learner = Learner(LearnerConfig(zero_stage=0, lora=LoraConfig(enabled=True, r=8, alpha=32)), model_dir,
                      total_steps=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained adapters: B is zero at start
        for name, p in learner.engine.module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    full, adapter, config = learner.checkpoint_state_dict(), learner.adapter_state_dict(), learner.adapter_config()
    params = sum(v.numel() for v in full.values())
    learner.close()
    shutdown_distributed()  # the engine sets up its own process group in this process
    return full, adapter, config, params


def timed_publishes(engine, sender, state, model_dir: Path, work: Path, repeats: int, first_version: int) -> dict:
    """Publish `repeats` versions; per publish the seconds from publish() until the engine holds it."""
    from learner.weights import receive

    seconds, announced = [], None
    for i in range(repeats):
        version = first_version + i
        start = time.perf_counter()
        announced = sender.publish(state, version, 1)
        engine.update_weights(receive({**announced, "rank_offset": 1}, work, model_dir))
        sender.finish()
        seconds.append(time.perf_counter() - start)
        assert engine.version == version
    return {"bytes": announced["num_bytes"], "seconds": round(statistics.median(seconds), 4),
            "seconds_all": [round(s, 4) for s in seconds]}


def measure(name: str, tiny: dict, work: Path, repeats: int, media: list[str]) -> list[dict]:
    from actors.config import RolloutConfig
    from actors.engines import VLLMEngine
    from learner.weights import make_sender
    from policy.config import TinyModelConfig
    from policy.tiny import build_tiny_model

    model_dir = build_tiny_model(TinyModelConfig(**tiny), work / name)
    full, adapter, adapter_cfg, params = learner_weights(model_dir)
    cfg = RolloutConfig(max_new_tokens=8, max_model_len=1024, group_size=1)
    rows = []
    engine = VLLMEngine(model_dir, cfg, weight_medium="gloo")
    try:
        for medium in [m for m in media if m != "lora"]:
            sender = make_sender(medium, work / f"{name}-{medium}", 120.0, "127.0.0.1")
            rows.append({"model": name, "params": params, "medium": medium,
                         **timed_publishes(engine, sender, full, model_dir, work / f"{name}-w", repeats,
                                           1 + 100 * len(rows))})
    finally:
        engine.shutdown()
    if "lora" not in media:
        return rows
    engine = VLLMEngine(model_dir, cfg, weight_medium="lora", lora_rank=8)
    try:
        sender = make_sender("lora", work / f"{name}-lora", 120.0, adapter_config=adapter_cfg)
        rows.append({"model": name, "params": params, "medium": "lora",
                     **timed_publishes(engine, sender, adapter, model_dir, work / f"{name}-w", repeats, 1)})
    finally:
        engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="demo,larger")
    ap.add_argument("--media", default="object_store,gloo,lora",
                    help="object_store starts a local Ray; shared_file is the same file without Ray's copy")
    ap.add_argument("--demo-step-s", type=float, default=4.99,
                    help="the demo's RL step in seconds (benchmarks/pipeline.py, staleness 1, docs/benchmarks.md)")
    ap.add_argument("--out", default="benchmarks/results/weights.json")
    args = ap.parse_args()

    import ray

    media = args.media.split(",")
    # on a loaded machine the raylet may miss Ray's fixed 30 s start window: try again
    for attempt in range(3 if "object_store" in media else 0):
        try:
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=1, log_to_driver=False)
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray did not start ({exc}); trying again")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="avatar-weights-bench-") as tmp:
            for name in args.models.split(","):
                rows += measure(name, MODELS[name], Path(tmp), args.repeats, media)
    finally:
        ray.shutdown()

    step_s = args.demo_step_s
    merged = {r["model"]: r["bytes"] for r in rows if r["medium"] != "lora"}
    for r in rows:
        r["merged_over_sent"] = round(merged[r["model"]] / r["bytes"], 1)
        r["share_of_demo_step"] = round(r["seconds"] / step_s, 4) if r["model"] == "demo" else None
    print(f"{'model':7} {'params':>11} {'medium':13} {'bytes/publish':>14} {'merged/sent':>11} "
          f"{'s until held':>12} {'share of demo step':>18}")
    for r in rows:
        share = f"{100 * r['share_of_demo_step']:.1f}%" if r["share_of_demo_step"] is not None else "-"
        print(f"{r['model']:7} {r['params']:>11,} {r['medium']:13} {r['bytes']:>14,} {r['merged_over_sent']:>11} "
              f"{r['seconds']:>12} {share:>18}")
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs visible"
    print(f"one rollout engine (vLLM-CPU), median of {args.repeats} publishes; demo RL step "
          f"{step_s} s (benchmarks/pipeline.py); machine: {machine}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "demo_step_seconds": step_s, "machine": machine,
                               "args": vars(args)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
