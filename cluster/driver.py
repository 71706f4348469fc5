"""The driver loop: rollouts kept busy within a staleness bound, scored groups into the replay service's
fresh stream, training batches of fresh groups plus replayed samples, weights published every k steps.

One step, top to bottom (see DESIGN.md for the data flow):
  submit prompts (hint decided from the buffer's per-prompt state) while the staleness bound allows
  -> generated groups go to the reward pool -> scored groups enter the fresh stream
  -> the learner reads `prompts_per_step` fresh groups, samples G_off replayed samples per group,
     trains one step, the step is checkpointed, then the fresh entries are committed into the tiers
  -> every `publish_every` steps the weights go to the rollout workers (version + 1).
Exactly once: a task's group id is derived from its key, so a group regenerated after a crash is a
duplicate the buffer drops; a step's fresh samples join the replay tiers right after the step (once per stream
entry: a retrained redelivery inserts nothing), and their stream entries are acknowledged only after the
checkpoint that contains their training (the ids it owes are saved with it and acknowledged again on resume).
Staleness is bounded twice: at submission (a task starts only if it can be trained in time) and at training
(a group older than max_staleness versions is dropped, counted and acknowledged, never trained).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import ray
from tqdm import tqdm

from actors.prompt_queue import PromptTask

from .components import Components
from .config import JobConfig
from .metrics import JobMetrics
from .prompts import PromptOrder, check_skipped
from .state import RunState, save_state

MAX_SCORING_RETRIES = 3


class Rollouts:
    """Tasks handed to the rollout workers, several per call: a worker generates a call's prompts in one engine
    call (vLLM batches across them), and `finished` wakes on the first call that completes."""

    def __init__(self, comps: Components):
        self.comps = comps
        self.workers = comps.workers
        self.inflight: dict = {}  # ObjectRef -> (tasks, worker)
        self._next = 0

    @property
    def tasks_in_flight(self) -> int:
        return sum(len(tasks) for tasks, _ in self.inflight.values())

    def submit(self, tasks: list[PromptTask], worker=None) -> None:
        """One call per worker, the tasks dealt round robin (all of them to `worker` when given)."""
        if worker is not None:
            self.inflight[worker.generate.remote(tasks)] = (tasks, worker)
            return
        shares: dict[int, list[PromptTask]] = {}
        for task in tasks:
            shares.setdefault(self._next % len(self.workers), []).append(task)
            self._next += 1
        for i, share in shares.items():
            self.submit(share, self.workers[i])

    def finished(self) -> list:
        """The results of the calls that have finished (waits for none)."""
        if not self.inflight:
            return []
        done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        results = []
        for ref in done:
            tasks, worker = self.inflight.pop(ref)
            try:
                results += ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                # The worker died mid-call and Ray restarts it: once it is back with the current weights, the
                # tasks are handed out again (their ids are the tasks', so nothing can be counted twice).
                keys = ", ".join(t.key for t in tasks)
                print(f"[driver] rollout worker died on {keys} ({type(exc).__name__}); resubmitting", flush=True)
                self.comps.ready_worker(worker)
                self.submit(tasks, worker)
        return results

    def drain(self) -> None:
        """Wait for what is still generating (its groups enter the buffer on the next run)."""
        if self.inflight:
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=300)
            self.inflight.clear()


def wait_for_work(rollouts: Rollouts, comps: Components, timeout: float) -> None:
    """Sleep until a generate or scoring call finishes, or `timeout` passes: the driver wakes on the first."""
    refs = list(rollouts.inflight) + comps.rewards.inflight_refs
    if refs and timeout > 0:
        ray.wait(refs, num_returns=1, timeout=timeout)
    elif timeout > 0:
        time.sleep(timeout)


def skip_prompt(comps: Components, state: RunState, key: str, prompt_id: str, reason: str, handed_out: int) -> int:
    """A task whose media cannot be read: counted, its reason in the dead-letter stream (once per task key), and
    the job stopped if most prompts handed out are unreadable. Returns the count of skipped prompts."""
    skipped = state.bump("skipped_prompts")
    ray.get(comps.buffer.reject.remote(key, "media", f"prompt {prompt_id}: {reason}"))
    check_skipped(skipped, handed_out, reason)
    return skipped


def train_rl(cfg: JobConfig, run_dir: Path, comps: Components, order: PromptOrder, state: RunState,
             metrics: JobMetrics, history: Path) -> RunState:
    pcfg = cfg.pipeline
    per_step = pcfg.prompts_per_step
    rollouts = Rollouts(comps)
    by_id = {s.id: s for s in order.samples}
    submitted = state.cursor  # tasks handed out so far (the prompt order's cursor)
    score_failures: dict[str, int] = {}  # task key -> failed scorings
    not_pushed: dict[str, int] = {}  # task key -> index, for tasks whose group has not entered the buffer
    # Tasks that will bring no group (unreadable media; scoring given up): each lets another task start.
    # Those at or after the cursor are counted per run (a resumed job meets them again and counts them
    # again); those the cursor has passed are in the checkpointed counter `lost_before_cursor`.
    lost_here: dict[str, int] = {}  # task key -> index
    window_warned = False
    held: list = []  # fresh entries read from the stream, waiting for a full batch
    reclaim_ms = 0  # the first read takes back what a previous run of this job had read and not committed
    bar = tqdm(total=pcfg.steps, initial=state.step, desc=f"stage {cfg.stage} RL", unit="step", dynamic_ncols=True)
    ack_pending(comps, state)  # the previous run may have stopped between its checkpoint and its acknowledgement
    dropped_stale: list[str] = []  # group ids dropped for staleness since the last recorded step
    phase = _PhaseTimer()  # driver wall time per phase since the last recorded step (benchmarks/pipeline.py)
    unread = 0  # groups this run pushed and has not read yet: when they make a batch, the driver does not sleep
    load_s = 0.0  # the rollout workers' weight-load seconds collected since the last recorded step

    while state.step < pcfg.steps:
        # 1. keep rollouts busy: a task may start if it will be trained within max_staleness versions
        lost = state.counters.get("lost_before_cursor", 0) + state.counters.get("stale_dropped", 0) + len(lost_here)
        allowed = (state.step + 1 + pcfg.max_staleness) * per_step + lost
        room = pcfg.max_prompts_in_flight - rollouts.tasks_in_flight
        wanted = [order.task(i) for i in range(submitted, min(allowed, submitted + max(room, 0)))]
        if wanted:
            with phase("buffer"):
                states = ray.get(comps.buffer.prompt_states.remote([s.id for _, s in wanted]))
            tasks = []
            for key, sample in wanted:
                hinted = cfg.buffer.hint.enabled and states.get(sample.id, {}).get("hint_active") and sample.hint
                tasks.append(PromptTask(key=key, sample=sample, use_hint=bool(hinted)))
                not_pushed[key] = submitted
                submitted += 1
            rollouts.submit(tasks)

        # 2. generated groups -> the reward pool; scored groups -> the fresh stream. The driver sleeps only
        # when no batch can be read yet, and wakes on whichever generate or scoring call finishes first.
        with phase("weight_sync"):
            load_s += comps.settle_loads()
        with phase("rollout_wait"):
            wait_for_work(rollouts, comps, timeout=0.0 if len(held) + unread >= per_step else 0.1)
            finished = rollouts.finished()
        for result in finished:
            if result.skipped is not None:  # unreadable media: the reason goes to the dead-letter stream
                skipped = skip_prompt(comps, state, result.key, result.prompt_id, result.skipped.reason, submitted)
                metrics.count_to("avatar_buffer_events_total", skipped, event="skipped_prompt")
                lost_here[result.key] = not_pushed.pop(result.key)
                continue
            state.completions_generated += len(result.trajectories)
            with phase("scoring"):
                comps.rewards.submit(result.trajectories, by_id[result.prompt_id])
        with phase("scoring"):
            polled = comps.rewards.poll(timeout=0.0)
        for scored in polled:
            if scored.error:  # counted by the pool; scored again (a dead reward worker is restarted by Ray)
                key = scored.trajectories[0].group_id
                if any(name in scored.error for name in ("ActorUnavailableError", "ActorDiedError", "RayActorError")):
                    # the worker died under it: no fault of the group's; wait for Ray's restart, then again
                    print(f"[driver] reward worker lost while scoring {key}; scoring again once it is back", flush=True)
                    comps.ready_reward_workers()
                    comps.rewards.submit(scored.trajectories, by_id[scored.sample_id])
                    continue
                tries = score_failures[key] = score_failures.get(key, 0) + 1
                if tries <= MAX_SCORING_RETRIES:
                    print(f"[driver] scoring failed for {key} ({scored.error}); scoring again ({tries})", flush=True)
                    state.bump("scoring_retries")
                    with phase("scoring"):
                        comps.rewards.submit(scored.trajectories, by_id[scored.sample_id])
                else:  # the cursor stays before it: a resumed job generates and scores it again
                    print(f"[driver] scoring failed {tries} times for {key} ({scored.error}); "
                          "left for the next resume", flush=True)
                    state.bump("unscored_groups")
                    lost_here[key] = not_pushed[key]  # another task takes its place in this run
                continue
            with phase("buffer"):
                pushed = ray.get(comps.buffer.push_group.remote(scored.trajectories))
            unread += pushed["entry_id"] is not None
            not_pushed.pop(scored.trajectories[0].group_id, None)
        state.cursor = min(not_pushed.values(), default=submitted)
        for key in [k for k, i in lost_here.items() if i < state.cursor]:
            del lost_here[key]
            state.bump("lost_before_cursor")
        if submitted - state.cursor > cfg.buffer.dedup_window_groups and not window_warned:
            window_warned = True  # a group stuck before the cursor: a resume would regenerate too much
            print(f"[driver] warning: {submitted - state.cursor} tasks handed out past the cursor (held back by "
                  f"{min(not_pushed, key=not_pushed.get)}), more than buffer.dedup_window_groups; a resume could "
                  "accept some of their groups twice", flush=True)

        # 3. a training step once a full batch of fresh groups has been read
        if len(held) < per_step:
            # the driver pushes every group itself, so a read need not block (the first one takes back what a
            # previous run of this job had read and not committed)
            with phase("fresh_wait"):
                read = ray.get(comps.buffer.read_fresh.remote("learner", per_step - len(held), None, reclaim_ms))
            held += read
            unread = max(0, unread - len(read))
            reclaim_ms = None
        held, stale = split_stale(held, state.policy_version, pcfg.max_staleness)
        for entry_id, group in stale:  # acknowledged with the next checkpoint; another task takes its place
            state.pending_ack.append(entry_id)
            state.bump("stale_dropped")
            dropped_stale.append(group[0].group_id)
            print(f"[driver] dropped {group[0].group_id}: generated by v{group[0].policy_version}, "
                  f"{state.policy_version - group[0].policy_version} versions old > max_staleness "
                  f"{pcfg.max_staleness}", flush=True)
        if len(held) < per_step:
            continue
        batch, held = held[:per_step], held[per_step:]
        groups = [g for _, g in batch]
        n_replay = pcfg.replay_per_group * per_step
        with phase("buffer"):
            replay = ray.get(comps.buffer.sample.remote(n_replay, None, None, state.policy_version)) if n_replay else []
        with phase("train"):
            stats = comps.learner.train_step(groups, replay)
        state.step += 1
        trained = [t for g in groups for t in g]
        for t in trained:
            t.advantage = stats["advantages"][t.trajectory_id]
            t.mean_logratio_old_ref = stats["mean_logratio_old_ref"].get(t.trajectory_id)
            # the reference log-probs travel with the record: a replayed sample needs no reference forward
            t.ref_logprobs = stats["ref_logprobs"].get(t.trajectory_id, t.ref_logprobs)
        # the trained fresh samples join the tiers now (step t+1 can replay them; with replay off they only
        # feed the prompts' KL statistic); their entries are acknowledged with the next checkpoint
        entry_ids = [e for e, _ in batch]
        with phase("buffer"):
            ray.get(comps.buffer.insert.remote(entry_ids, trained, stats["kl_per_trajectory"],
                                               pcfg.replay_per_group > 0))
        state.pending_ack += entry_ids

        staleness = max(state.policy_version - t.policy_version for t in trained)

        # 4. publish every k steps; the workers load before they generate again (actor calls are ordered)
        sync_s = None
        if state.step % cfg.learner.publish_every == 0:
            t0 = time.perf_counter()
            with phase("weight_sync"):  # the workers load behind their current generate call, unwaited
                state.policy_version = publish_with_retries(comps, wait=False)
            sync_s = time.perf_counter() - t0

        # 5. record, checkpoint (with the acknowledgements it owes), then acknowledge
        with phase("record"):
            row = record_step(cfg, state, stats, groups, replay, comps, metrics, sync_s, staleness)
        row["stale_dropped_groups"], dropped_stale = dropped_stale, []
        row["weight_load_seconds"], load_s = round(load_s, 4), 0.0
        row["phase_seconds"] = phase.take()  # this step's record time is counted in the next row
        with history.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if state.step % pcfg.checkpoint_every == 0 or state.step == pcfg.steps:
            with phase("checkpoint"):
                save_state(run_dir, state, comps.learner)
            with phase("buffer"):
                ack_pending(comps, state)
        bar.update(1)
        tiers = row["tier_sizes"]
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                        hint=f"{row['hint_rate']:.2f}", replay=f"{row['replay_fraction']:.2f}",
                        tiers=f"{tiers['easy']}/{tiers['medium']}/{tiers['hard']}", v=state.policy_version)
    bar.close()
    comps.settle_loads(wait=True)
    rollouts.drain()
    return state


def publish_with_retries(comps: Components, retries: int = 3, backoff_s: float = 2.0, wait: bool = True) -> int:
    """comps.publish_weights(); a publish that fails inside the learner (the transport's timeout, a full disk)
    is tried again, republishing the version the learner holds (it may have bumped before the transport
    failed). The workers keep the weights they have meanwhile. A dead learner (RayActorError) is not retried."""
    bump = True
    for attempt in range(retries + 1):
        try:
            return comps.publish_weights(bump, wait=wait)
        except ray.exceptions.RayTaskError as exc:
            if attempt == retries:
                raise
            cause = str(exc).strip().splitlines()[-1][:300]
            print(f"[driver] weight publish failed ({cause}); trying again ({attempt + 1}/{retries})", flush=True)
            bump = False
            time.sleep(backoff_s * (attempt + 1))
    raise AssertionError("unreachable")


def split_stale(held: list, version: int, max_staleness: int) -> tuple[list, list]:
    """(entry_id, group) pairs split into (trainable, stale): a group generated more than max_staleness policy
    versions before `version` is stale."""
    fresh, stale = [], []
    for item in held:
        (stale if version - item[1][0].policy_version > max_staleness else fresh).append(item)
    return fresh, stale


def ack_pending(comps: Components, state: RunState) -> None:
    """Acknowledge the fresh entries whose training (or staleness drop) the last checkpoint contains
    (idempotent in the service)."""
    if state.pending_ack:
        ray.get(comps.buffer.ack.remote(state.pending_ack))
    state.pending_ack = []


def record_step(cfg, state, stats, groups, replay, comps, metrics, sync_s, staleness) -> dict:
    trajs = [t for g in groups for t in g]
    terms = sorted({k for t in trajs for k in t.rewards})
    term_means = {k: _mean([t.rewards.get(k) for t in trajs]) for k in terms}
    fresh_adv = [round(stats["advantages"][t.trajectory_id], 4) for t in trajs]
    replay_adv = [round(stats["advantages"][s.trajectory.trajectory_id], 4) for s in replay]
    buffer_stats = ray.get(comps.buffer.stats.remote())
    reward_stats = comps.rewards.stats()
    worker_stats = comps.worker_stats()
    tiers = {k: int(buffer_stats.get(f"tier_{k}", 0)) for k in ("easy", "medium", "hard")}
    row = {
        "mode": "rl", "stage": cfg.stage, "step": state.step, "policy_version": state.policy_version,
        "completions_generated": state.completions_generated, "reward_mean": _mean([t.reward for t in trajs]),
        "accuracy": term_means.get("accuracy", 0.0), "reward_terms": term_means,
        "loss": stats["loss"], "kl": stats["kl"], "clip_fraction": stats["clip_fraction"],
        "zero_adv_token_fraction": stats["zero_adv_token_fraction"], "step_seconds": stats["seconds"],
        "staleness_max": staleness, "hint_rate": _mean([float(g[0].hinted) for g in groups]),
        "replay_fraction": len(replay) / (len(trajs) + len(replay)),
        "zero_adv_group_fraction": _mean([float(len({t.reward for t in g}) == 1) for g in groups]),
        "hints_active": int(buffer_stats.get("hints_active", 0)),
        "stale_dropped_total": state.counters.get("stale_dropped", 0),
        "judge_requests_total": int(reward_stats.get("judge_requests", 0)),
        "trained_groups": [g[0].group_id for g in groups], "trained_prompts": [g[0].prompt_id for g in groups],
        "advantages_fresh": fresh_adv, "advantages_replay": replay_adv, "tier_sizes": tiers,
        "weight_sync_seconds": sync_s, "time": time.time(),
        "judge_missing": sum(1 for t in trajs if "judge" in t.rewards and t.rewards["judge"] is None),
        "judge_failures_total": reward_stats.get("judge_failures", 0),
    }
    # cumulative busy seconds of the rollout workers (generation) and reward workers (scoring)
    row["rollout_generate_seconds"] = sum(s.get("generate_seconds", 0.0) for s in worker_stats)
    row["rollout_tokens"] = sum(s.get("tokens", 0) for s in worker_stats)  # cumulative completion tokens
    row["reward_scoring_seconds"] = float(reward_stats.get("scoring_s_sum", 0.0))
    m = metrics
    m.set("avatar_policy_version", state.policy_version)
    m.count_to("avatar_learner_steps_total", state.step)
    m.set("avatar_learner_step_seconds", stats["seconds"])
    m.set("avatar_loss", stats["loss"], term="total")
    m.set("avatar_clip_fraction", stats["clip_fraction"])
    m.set("avatar_kl", stats["kl"])
    m.set("avatar_advantage_abs_mean", _mean([abs(a) for a in fresh_adv]), source="fresh")
    m.set("avatar_advantage_abs_mean", _mean([abs(a) for a in replay_adv]), source="replay")
    m.set("avatar_zero_advantage_fraction", stats["zero_adv_token_fraction"])
    for k, v in term_means.items():
        m.set("avatar_reward_mean", v, term=k)
    m.set("avatar_reward_mean", row["reward_mean"], term="total")
    m.set("avatar_accuracy", row["accuracy"])
    gen_s = row["rollout_generate_seconds"]
    m.set("avatar_rollout_tokens_per_second", row["rollout_tokens"] / gen_s if gen_s else 0.0)
    m.count_to("avatar_completions_total", state.completions_generated)
    m.set("avatar_queue_depth", buffer_stats.get("fresh_length", 0), queue="fresh_stream")
    m.set("avatar_queue_depth", reward_stats.get("pending", 0), queue="reward_pool")
    m.set("avatar_staleness_versions", staleness)
    for tier, size in tiers.items():
        m.set("avatar_buffer_tier_size", size, tier=tier)
    for event in ("pushed_groups", "duplicates", "dead_lettered", "rejected", "reclaimed", "inserted", "evicted",
                  "sampled", "acked"):
        m.count_to("avatar_buffer_events_total", buffer_stats.get(event, 0), event=event)
    m.set("avatar_hint_rate", row["hint_rate"])
    m.set("avatar_replay_fraction", row["replay_fraction"])
    m.set("avatar_hints_active", row["hints_active"])
    m.count_to("avatar_stale_dropped_total", row["stale_dropped_total"])
    m.count_to("avatar_judge_requests_total", row["judge_requests_total"])
    lat_n = reward_stats.get("judge_requests", 0)
    m.set("avatar_judge_latency_seconds", reward_stats.get("judge_latency_s_sum", 0.0) / lat_n if lat_n else 0.0)
    m.count_to("avatar_judge_failures_total", reward_stats.get("judge_failures", 0))
    if sync_s is not None:
        m.set("avatar_weight_sync_seconds", sync_s)
    m.set("avatar_prompts_in_flight", reward_stats.get("pending", 0))
    return row


class _PhaseTimer:
    """Wall seconds the driver spends in each phase; `take()` returns them and starts over."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        out, self.seconds = {k: round(v, 4) for k, v in self.seconds.items()}, {}
        return out


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else 0.0
