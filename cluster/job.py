"""One stage of the curriculum as a job: launch, components, (resume), evaluate, train, evaluate, export.
`run_curriculum` runs stages in sequence, each starting from the previous stage's exported policy."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import ray
from tqdm import tqdm

from actors.tasks import PromptTask
from common.testhooks import install_audit_from_env
from learner.learner import SFTExample
from policy.media import MediaError
from policy.model import is_omni, resolve_model_path
from policy.processor import PromptProcessor, prompt_layout

from . import launcher
from .availability import WorkersLost
from .components import Components, start_components
from .config import JobConfig, check_config_paths, dump_config
from .driver import skip_prompt, train_rl
from .metrics import DriverMetrics, MetricsTargets, write_scrape_config
from .prompts import PromptOrder, load_prompts, load_splits
from .report import mechanism_summary, read_history, write_report
from .state import RunState, latest_checkpoint, load_state, save_state

log = logging.getLogger(__name__)


def evaluate(comps: Components, samples, cfg: JobConfig) -> dict:
    """Greedy decoding on the eval prompts; the answer parsed from <answer> (docs/method.md section 6). Each worker
    hands its completions to the reward workers, which return the accuracy and format values only."""
    if not samples:
        return {"accuracy": None, "format": None, "n": 0}
    greedy = {"n": 1, "temperature": 0.0, "max_new_tokens": cfg.rollout.max_new_tokens}
    workers = comps.available_workers()  # during training: without those whose node died
    if not workers:
        log.warning("no rollout worker answers: the held-out evaluation is skipped")
        return {"accuracy": None, "format": None, "n": 0}
    shards = [samples[i :: len(workers)] for i in range(len(workers))]
    refs = [w.rollout.remote([PromptTask(f"eval:{s.id}", s) for s in shard], comps.rewards.workers, comps.weights,
                             True, 0, greedy)
            for w, shard in zip(workers, shards) if shard]
    receipts = [r for report in ray.get(refs) for r in report.receipts]
    for r in receipts:
        if r.lost is not None:  # no retry for an evaluation: its numbers would be partial
            raise r.lost
    scores = [r.answer for r in receipts if r.skipped is None]
    acc, fmt = [s["accuracy"] for s in scores], [s["format"] for s in scores]
    return {"accuracy": sum(acc) / max(len(acc), 1), "format": sum(fmt) / max(len(fmt), 1), "n": len(acc),
            "skipped": len(receipts) - len(scores)}


def train_sft(cfg: JobConfig, run_dir: Path, comps: Components, order: PromptOrder, state: RunState,
              model_path: Path, history: Path, evaluate=None) -> RunState:
    """Stage 0: supervised fine-tuning on the chain-of-thought targets, same engine and checkpoints.
    `evaluate`: the held-out evaluation, every pipeline.eval_every steps (the weights published first)."""
    from transformers import AutoTokenizer

    processor = PromptProcessor(cfg.processor, AutoTokenizer.from_pretrained(model_path), model_path=model_path)
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
                log.warning(f"skipping prompt {sample.id}: {exc}")
                skip_prompt(comps, state, key, sample.id, str(exc), state.cursor)
        stats = comps.learner.sft_step(examples)
        state.step += 1
        heldout = None
        if evaluate and cfg.pipeline.eval_every and state.step % cfg.pipeline.eval_every == 0 \
                and state.step < cfg.pipeline.steps:
            comps.publish_weights()
            heldout = evaluate()["accuracy"]
            log.info(f"step {state.step}: held-out accuracy {heldout}")
        with history.open("a") as f:
            f.write(json.dumps({"mode": "sft", "stage": 0, "step": state.step, "loss": stats["loss"],
                                "prompts": [e.prompt_id for e in examples], "heldout_accuracy": heldout,
                                "time": time.time()}) + "\n")
        if state.step % cfg.pipeline.checkpoint_every == 0 or state.step == cfg.pipeline.steps:
            save_state(run_dir, state, comps.learner)
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    bar.close()
    return state


def resume_version(run_dir: Path, checkpoint_version: int) -> int:
    """The version a resumed job publishes its restored weights under (the workers start from the base
    weights): the checkpoint's, unless the lost run had published past it; then one more than the newest
    publish, so versions stay monotonic and groups generated by the lost versions show their true age."""
    from learner.weights.shared_file import latest_published

    last = latest_published(run_dir / "published")
    return checkpoint_version if last is None or last[0] <= checkpoint_version else last[0] + 1


def _truncate_history(history: Path, step: int) -> None:
    """Steps after the restored checkpoint were never committed: they are trained again, so forget them."""
    if history.is_file():
        keep = [line for line in history.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        history.write_text("".join(line + "\n" for line in keep))


def write_rejected_rows(run_dir: Path, rejected: list) -> Path:
    """runs/<name>/rejected_rows.jsonl: one JSON line per rejected manifest row (manifest, line, id or null,
    reason); rewritten at every start of the stage, empty when every row was valid."""
    path = run_dir / "rejected_rows.jsonl"
    path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in rejected))
    return path


def run_stage(cfg: JobConfig, resume: bool = True) -> dict:
    check_config_paths(cfg, source=f"stage {cfg.name}")  # init_from may have been set after load (curriculum)
    run_dir = Path(cfg.run_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    history = run_dir / "history.jsonl"
    rl = cfg.stage != 0
    if not resume:  # --fresh: a later resume must not find the previous run's checkpoints or weights
        for old in ("checkpoints", "published"):
            shutil.rmtree(run_dir / old, ignore_errors=True)
    install_audit_from_env()  # tests: what the driver receives (common/testhooks.py)
    launch = launcher.start(run_dir, cfg.buffer.redis)
    metrics = DriverMetrics(cfg.pipeline.metrics_port)
    targets = MetricsTargets(run_dir, cfg.name)
    targets.update("driver", "driver", metrics.endpoint.where())
    targets.write()
    write_scrape_config(run_dir)
    log.info(f"{cfg.name}: stage {cfg.stage}, run folder {run_dir}, metrics: {targets.path} lists every component's "
             f"endpoint (the driver's: {targets.targets['driver']['address']})")
    comps = None
    try:
        bad_rows: list = []
        samples, eval_samples = load_splits(cfg, run_dir, rejected=bad_rows, with_eval=bool(cfg.pipeline.eval_items))
        if cfg.data.manifest:
            listed = write_rejected_rows(run_dir, bad_rows)
            if bad_rows:
                log.warning("%d manifest rows rejected, listed in %s", len(bad_rows), listed)
        if cfg.pipeline.eval_items and not eval_samples:
            log.warning("no held-out prompts (data.eval_fraction %s, no data.eval_manifest): nothing to evaluate",
                        cfg.data.eval_fraction)
        model_path = Path(cfg.init_from) if cfg.init_from else resolve_model_path(cfg.model, Path(cfg.run_dir) / "_models")
        if is_omni(model_path):
            log.info(f"prompt layout: {prompt_layout(cfg.processor, model_path, samples)}")
        comps = start_components(cfg, run_dir, model_path, samples, launch.redis, rl, eval_samples)
        comps.metrics = targets
        comps.refresh_metrics_targets(timeout_s=300)  # the workers answer once their engines are up
        if not resume and (cleared := ray.get(comps.buffer.clear.remote())):
            # the previous run's buffer (its seen ids would make every regenerated group a duplicate)
            log.info(f"--fresh: cleared {cleared} replay-service keys left by a previous run")
        for row in bad_rows:  # in the dead-letter stream too, once each (a resume adds nothing)
            source = "manifest" if row.manifest == str(Path(cfg.data.manifest)) else "eval_manifest"
            ray.get(comps.buffer.reject.remote(f"{source}:{row.line}", source, f"{row.manifest} line {row.line}: {row.reason}"))
        order = PromptOrder(samples, cfg.data.seed, cfg.data.shuffle)
        ckpt = latest_checkpoint(run_dir) if resume else None
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if (ckpt and summary_path.is_file()) else {}
        if ckpt is not None:
            state = load_state(ckpt)
            comps.learner.load_checkpoint(ckpt / "learner")
            _truncate_history(history, state.step)
            state.policy_version = comps.publish_weights(version=resume_version(run_dir, state.policy_version))
            log.info(f"resumed from {ckpt.name}: step {state.step}, cursor {state.cursor}")
        else:
            state = RunState()
            history.unlink(missing_ok=True)
        if "before" not in summary:
            summary["before"] = evaluate(comps, eval_samples, cfg)
            log.info(f"accuracy before: {summary['before']}")
            summary_path.write_text(json.dumps(summary, indent=2))
        if rl:
            state = train_rl(cfg, run_dir, comps, order, state, metrics, history,
                             evaluate=lambda: evaluate(comps, eval_samples, cfg))
        else:
            state = train_sft(cfg, run_dir, comps, order, state, model_path, history,
                              evaluate=lambda: evaluate(comps, eval_samples, cfg))
        if not rl:  # SFT changed the weights without publishing: hand them to the workers for the evaluation
            comps.publish_weights()
        summary["after"] = evaluate(comps, eval_samples, cfg)
        log.info(f"accuracy after: {summary['after']}")
        summary["export"] = comps.learner.export_hf(run_dir / "export")
        if rl and state.step:
            summary["report"] = [str(p) for p in write_report(run_dir)]
            summary["mechanisms"] = mechanism_summary(read_history(run_dir))
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
                log.warning(f"stopping components: {type(exc).__name__}: {str(exc)[:300]}")
        launcher.stop(launch)


class JobInterrupted(RuntimeError):
    """A component that cannot be restarted in place died (a learner rank, the replay service or its Redis), or
    no rollout worker answered for pipeline.worker_wait_s: the job stops cleanly and resumes from its last checkpoint with the same command."""


def lost_component(exc: BaseException) -> str | None:
    """What died, when `exc` says a component the job cannot restart in place is gone; else None."""
    import redis

    if isinstance(exc, WorkersLost):
        return str(exc)
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

    check_config_paths(cfg, source=f"eval {cfg.name}")
    run_dir = Path(cfg.run_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    launch = launcher.start(run_dir, cfg.buffer.redis, with_redis=False)
    workers = []
    try:
        model_path = Path(cfg.init_from) if cfg.init_from else resolve_model_path(cfg.model, Path(cfg.run_dir) / "_models")
        samples = load_prompts(cfg, run_dir, split="eval")
        actor = rollout_worker_actor(num_cpus=0, max_restarts=0)
        workers = [actor.remote(f"eval-{i}", str(model_path), cfg.rollout, cfg.processor, cfg.model.dtype, cfg.seed)
                   for i in range(cfg.rollout.num_workers)]
        return evaluate(Components(buffer=None, learner=None, workers=workers), samples, cfg)
    finally:
        for w in workers:
            ray.get(w.shutdown.remote())
            ray.kill(w)
        launcher.stop(launch)
