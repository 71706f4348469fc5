"""One stage of the curriculum as a job: launch, components, (resume), evaluate, train, evaluate, export.
`run_curriculum` runs stages in sequence, each starting from the previous stage's exported policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import ray
from tqdm import tqdm

from actors.prompt_queue import PromptTask
from learner.learner import SFTExample
from policy.media import MediaError
from policy.model import resolve_model_path
from policy.processor import PromptProcessor
from reward_workers.rewards import accuracy_reward, format_reward

from . import launcher
from .components import Components, start_components
from .config import JobConfig, dump_config
from .driver import skip_prompt, train_rl
from .metrics import JobMetrics, write_scrape_config
from .prompts import PromptOrder, load_prompts
from .report import write_report
from .state import RunState, latest_checkpoint, load_state, save_state


def evaluate(comps: Components, samples, cfg: JobConfig) -> dict:
    """Greedy decoding on the eval prompts; the answer parsed from <answer> (AVATAR.md section 6)."""
    if not samples:
        return {"accuracy": None, "format": None, "n": 0}
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": cfg.rollout.max_new_tokens}
    shards = [samples[i :: len(comps.workers)] for i in range(len(comps.workers))]
    refs = [w.generate.remote([PromptTask(f"eval:{s.id}", s) for s in shard], 0, greedy)
            for w, shard in zip(comps.workers, shards) if shard]
    by_id = {s.id: s for s in samples}
    acc, fmt, skipped = [], [], 0
    for results in ray.get(refs):
        for r in results:
            if r.skipped is not None:
                skipped += 1
                continue
            text = r.trajectories[0].completion_text
            acc.append(accuracy_reward(text, by_id[r.prompt_id]))
            fmt.append(format_reward(text, by_id[r.prompt_id]))
    return {"accuracy": sum(acc) / max(len(acc), 1), "format": sum(fmt) / max(len(fmt), 1), "n": len(acc),
            "skipped": skipped}


def train_sft(cfg: JobConfig, run_dir: Path, comps: Components, order: PromptOrder, state: RunState,
              model_path: Path, history: Path) -> RunState:
    """Stage 0: supervised fine-tuning on the chain-of-thought targets, same engine and checkpoints."""
    from transformers import AutoTokenizer

    processor = PromptProcessor(cfg.processor, AutoTokenizer.from_pretrained(model_path))
    bar = tqdm(total=cfg.pipeline.steps, initial=state.step, desc="stage 0 SFT", unit="step", dynamic_ncols=True)
    while state.step < cfg.pipeline.steps:
        examples = []
        while len(examples) < cfg.pipeline.prompts_per_step:
            key, sample = order.task(state.cursor)
            state.cursor += 1
            if not sample.cot:
                raise ValueError(f"stage 0 needs chain-of-thought targets (`cot`); missing for {sample.id}")
            try:
                examples.append(SFTExample(processor.build(sample).prompt_token_ids, processor.target_ids(sample.cot),
                                           prompt_id=sample.id))
            except (MediaError, OSError) as exc:  # skipped, counted, its reason in the dead-letter stream
                print(f"[sft] skipping prompt {sample.id}: {exc}", flush=True)
                skip_prompt(comps, state, key, sample.id, str(exc), state.cursor)
        stats = comps.learner.sft_step(examples)
        state.step += 1
        with history.open("a") as f:
            f.write(json.dumps({"mode": "sft", "stage": 0, "step": state.step, "loss": stats["loss"],
                                "prompts": [e.prompt_id for e in examples], "time": time.time()}) + "\n")
        if state.step % cfg.pipeline.checkpoint_every == 0 or state.step == cfg.pipeline.steps:
            save_state(run_dir, state, comps.learner)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    bar.close()
    return state


def _truncate_history(history: Path, step: int) -> None:
    """Steps after the restored checkpoint were never committed: they are trained again, so forget them."""
    if history.is_file():
        keep = [line for line in history.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        history.write_text("".join(line + "\n" for line in keep))


def run_stage(cfg: JobConfig, resume: bool = True) -> dict:
    run_dir = Path(cfg.run_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    history = run_dir / "history.jsonl"
    rl = cfg.stage != 0
    launch = launcher.start(run_dir, cfg.buffer.redis)
    metrics = JobMetrics()
    port = metrics.serve(cfg.pipeline.metrics_port)
    write_scrape_config(run_dir, port, cfg.name)
    print(f"[job] {cfg.name}: stage {cfg.stage}, run folder {run_dir}, metrics on 127.0.0.1:{port}/metrics", flush=True)
    comps = None
    try:
        bad_rows: list = []
        samples = load_prompts(cfg, run_dir, rejected=bad_rows)
        eval_samples = load_prompts(cfg, run_dir, split="eval") if cfg.pipeline.eval_items else []
        model_path = Path(cfg.init_from) if cfg.init_from else resolve_model_path(cfg.model, Path(cfg.run_dir) / "_models")
        comps = start_components(cfg, run_dir, model_path, samples, launch.redis, rl)
        for line, reason in bad_rows:  # in the dead-letter stream too, once each (a resume adds nothing)
            ray.get(comps.buffer.reject.remote(f"manifest:{line}", "manifest", f"{cfg.data.manifest} line {line}: {reason}"))
        order = PromptOrder(samples, cfg.data.seed, cfg.data.shuffle)
        ckpt = latest_checkpoint(run_dir) if resume else None
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if (ckpt and summary_path.is_file()) else {}
        if ckpt is not None:
            state = load_state(ckpt)
            comps.learner.load_checkpoint(ckpt / "learner")
            _truncate_history(history, state.step)
            state.policy_version = comps.publish_weights(bump=False)  # workers start from the base weights
            print(f"[job] resumed from {ckpt.name}: step {state.step}, cursor {state.cursor}", flush=True)
        else:
            state = RunState()
            history.unlink(missing_ok=True)
        if "before" not in summary:
            summary["before"] = evaluate(comps, eval_samples, cfg)
            print(f"[job] accuracy before: {summary['before']}", flush=True)
            summary_path.write_text(json.dumps(summary, indent=2))
        if rl:
            state = train_rl(cfg, run_dir, comps, order, state, metrics, history)
        else:
            state = train_sft(cfg, run_dir, comps, order, state, model_path, history)
        if not rl:  # SFT changed the weights without publishing: hand them to the workers for the evaluation
            comps.publish_weights()
        summary["after"] = evaluate(comps, eval_samples, cfg)
        print(f"[job] accuracy after: {summary['after']}", flush=True)
        summary["export"] = comps.learner.export_hf(run_dir / "export")
        if rl and state.step:
            summary["report"] = [str(p) for p in write_report(run_dir)]
        summary.update({"stage": cfg.stage, "steps": state.step, "cursor": state.cursor,
                        "completions_generated": state.completions_generated, "counters": state.counters,
                        "run_dir": str(run_dir)})
        summary_path.write_text(json.dumps(summary, indent=2))
        return summary
    except Exception as exc:
        lost = lost_component(exc)
        if lost is None:
            raise
        ckpt = latest_checkpoint(run_dir)
        raise JobInterrupted(
            f"{lost}. The job stops here; nothing is lost: the replay service's Redis keeps its AOF in {run_dir}/redis "
            f"and training resumes from {ckpt.name if ckpt else 'the start'} with the same command "
            f"(python -m cluster.cli train <config> [overrides])") from exc
    finally:
        if comps is not None:
            try:
                comps.stop()
            except Exception as exc:  # a dead component must not keep Ray and Redis from being stopped
                print(f"[job] stopping components: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        launcher.stop(launch)


class JobInterrupted(RuntimeError):
    """A component that cannot be restarted in place died (a learner rank, the replay service or its Redis):
    the job stops cleanly and resumes from its last checkpoint with the same command."""


def lost_component(exc: BaseException) -> str | None:
    """What died, when `exc` says a component the job cannot restart in place is gone; else None."""
    import redis

    if isinstance(exc, ray.exceptions.RayActorError):
        import re

        found = re.search(r"class_name: (\w+)", str(exc))
        return f"a Ray actor ({found.group(1) if found else 'unknown class'}) died ({str(exc).strip().splitlines()[0][:200]})"
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(
            exc.cause, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return f"the replay service lost its Redis ({type(exc.cause).__name__}: {str(exc.cause)[:200]})"
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return f"Redis is unreachable ({exc})"
    return None


def run_curriculum(configs: list[JobConfig], resume: bool = True) -> list[dict]:
    """Each stage starts from the previous stage's exported policy."""
    summaries = []
    previous = None
    for cfg in configs:
        if previous is not None:
            cfg = cfg.model_copy(update={"init_from": previous["export"]})
        previous = run_stage(cfg, resume=resume)
        summaries.append(previous)
    return summaries


def run_eval(cfg: JobConfig) -> dict:
    """Greedy accuracy of the config's policy (init_from, else model) on the eval split, rollout workers only."""
    from actors.worker import rollout_worker_actor

    run_dir = Path(cfg.run_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = launcher.start(run_dir, cfg.buffer.redis, with_redis=False)
    workers = []
    try:
        model_path = Path(cfg.init_from) if cfg.init_from else resolve_model_path(cfg.model, Path(cfg.run_dir) / "_models")
        samples = load_prompts(cfg, run_dir, split="eval")
        actor = rollout_worker_actor(num_cpus=0, max_restarts=0)
        workers = [actor.remote(f"eval-{i}", str(model_path), cfg.rollout, cfg.processor, None, cfg.model.dtype, cfg.seed)
                   for i in range(cfg.rollout.num_workers)]
        return evaluate(Components(buffer=None, learner=None, workers=workers), samples, cfg)
    finally:
        for w in workers:
            ray.get(w.shutdown.remote())
            ray.kill(w)
        launcher.stop(launch)
