"""The driver loop of an RL stage: the control plane. It moves task keys, counts and versions; the data plane
moves the trajectories without it (docs/architecture.md, "Receipts, not payloads"):

  rollout worker --group (object ref)--> reward worker --scored group--> Redis fresh stream --> learner
  driver: which prompts to submit (hint flags, within the staleness bound), one report back per rollout call
  (its groups' push receipts in it), one learner call per step, weights published, the step recorded from the
  learner's summary, checkpoint, then acknowledge.

One step, top to bottom: tasks are handed out while the staleness bound allows; each rollout worker generates
its tasks' groups and hands every group to a reward worker, which scores it and pushes it into the fresh
stream; the rollout call's report brings the push receipts (ids and counts) to the driver. Once a batch may be
there, the learner reads `prompts_per_step` fresh groups itself (dropping those older than max_staleness), samples the replayed ones,
trains, puts the trained samples into the tiers and returns a summary; every `publish_every` steps the
weights go to the workers (version + 1); the step is recorded; every `checkpoint_every` steps the checkpoint is
written and then the stream entries it contains are acknowledged (exactly once: cluster/committer.py).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import ray
from tqdm import tqdm

from actors.tasks import PromptTask
from reward_workers.pool import sum_worker_stats

from .availability import Availability
from .committer import Committer
from .components import Components
from .config import JobConfig
from .ledger import TaskLedger
from .metrics import DriverMetrics
from .prompts import PromptOrder, check_skipped
from .recorder import StepRecorder
from .retry import DATA_LOST, WORKER_LOST, ScoringRetries, classify
from .state import RunState

log = logging.getLogger(__name__)
MAX_LOAD_FAILURES = 3  # a rollout worker that cannot load the published weights this many times stops the job


def train_rl(cfg: JobConfig, run_dir: Path, comps: Components, order: PromptOrder, state: RunState,
             metrics: DriverMetrics, history: Path, evaluate: Callable[[], dict] | None = None) -> RunState:
    """`evaluate`: the held-out evaluation, run every pipeline.eval_every steps (before the stage's last)."""
    pcfg = cfg.pipeline
    per_step, n_replay = pcfg.prompts_per_step, pcfg.replay_per_group * pcfg.prompts_per_step
    ledger = TaskLedger(state, per_step, pcfg.max_staleness, pcfg.max_prompts_in_flight, cfg.buffer.dedup_window_groups)
    flight = Flight(comps, order, ledger, state, pcfg.worker_wait_s)
    committer = Committer(run_dir, state, comps.learner, lambda ids: ray.get(comps.buffer.ack.remote(ids)))
    recorder, phase = StepRecorder(cfg, comps, metrics, history), PhaseTimer()
    committer.ack()  # the previous run may have stopped between its checkpoint and its acknowledgement
    bar = tqdm(total=pcfg.steps, initial=state.step, desc=f"stage {cfg.stage} RL", unit="step", dynamic_ncols=True)
    reclaim, stale_groups = True, []  # the first read takes back what a previous run had read
    while state.step < pcfg.steps:
        with phase("submit"):  # 1. tasks within the staleness bound, hints from the prompts' state
            flight.submit(ledger.next_indices(flight.tasks_in_flight), cfg.buffer.hint.enabled)
        with phase("rollout_wait"):  # 2. receipts: generated, scored, in the fresh stream
            flight.wait(timeout=0.0 if flight.batch_may_be_ready(per_step) or reclaim else 0.1)
            flight.collect()
            flight.watch_workers()  # away workers that answer again get tasks; none for too long: WorkersLost
        ledger.advance()
        wait_ms = flight.learner_wait_ms(per_step)  # None: no batch can be there yet
        if wait_ms is None and not reclaim:
            continue
        with phase("train"):  # 3. the learner reads its batch from Redis, trains, fills the tiers
            summary = comps.learner.train_from_buffer(per_step, n_replay, pcfg.max_staleness, wait_ms, reclaim)
        reclaim = False
        stale_groups += flight.learner_read(summary, committer)
        if not summary["trained"]:
            continue
        state.step += 1
        committer.owe(summary["entry_ids"])
        sync_s = None  # 4. publish; each worker loads the new version at the start of its next rollout call (a
        # broadcast medium: now, every worker that answers)
        if state.step % cfg.learner.publish_every == 0:
            with phase("weight_sync"):
                t0 = time.perf_counter()
                state.policy_version = publish_with_retries(comps, wait=False)
                sync_s = time.perf_counter() - t0
        heldout = None
        if evaluate and pcfg.eval_every and state.step % pcfg.eval_every == 0 and state.step < pcfg.steps:
            with phase("eval"):  # the workers load the new weights with the evaluation's rollout call
                heldout = evaluate()["accuracy"]
            if heldout is not None:
                log.info(f"step {state.step}: held-out accuracy {heldout:.3f}")
        with phase("record"):  # 5. record; checkpoint, then acknowledge
            row = recorder.record(state, summary, flight.take_stats(), {
                "weight_sync_seconds": sync_s, "heldout_accuracy": heldout,
                # the medium that carried this step's publish: learner.transport, or object_store after a fallback
                "weight_medium": comps.weights["medium"] if sync_s is not None else None,
                "stale_dropped_groups": stale_groups, "prompts_in_flight": flight.tasks_in_flight,
                "groups_scoring": flight.groups_scoring, "phase_seconds": phase.take(),
                "rollout_workers": flight.worker_summary(), "rollout_workers_away": flight.away_names()})
        stale_groups = []
        if state.step % pcfg.checkpoint_every == 0 or state.step == pcfg.steps:
            with phase("checkpoint"):
                committer.checkpoint()
        bar.update(1)
        tiers = row["tier_sizes"]
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                        hint=f"{row['hint_rate']:.2f}", replay=f"{row['replay_fraction']:.2f}",
                        tiers=f"{tiers['easy']}/{tiers['medium']}/{tiers['hard']}", v=state.policy_version)
    bar.close()
    flight.drain()
    return state


class Flight:
    """The rollout calls in flight (several tasks each; a worker generates them in one engine call and answers
    once their groups are scored and pushed). Turns receipts into ledger entries; retries by exception type.

    A worker whose call dies (RayActorError: its process or its node died) is away (cluster/availability.py):
    its tasks go to the workers that answer, or wait for one; a call to it is kept pending until it answers
    again (Ray restarted it, on a node that joined if its own died), and then it gets tasks again, loading the
    current weights with its next call."""

    PROBE_AGAIN_S = 2.0  # a probe that failed (the actor not yet known as restarting, or gone for good)

    def __init__(self, comps: Components, order: PromptOrder, ledger: TaskLedger, state: RunState,
                 worker_wait_s: float = 600.0):
        self.comps, self.order, self.ledger, self.state = comps, order, ledger, state
        self.rollouts: dict = {}  # ObjectRef -> (tasks, worker index)
        names = [f"rollout-{i}" for i in range(len(comps.workers))] if comps is not None else []
        self.workers = Availability(names, worker_wait_s)
        if comps is not None:  # evaluate and stop skip the away workers too
            comps.availability = self.workers
        self.probes: dict[int, tuple] = {}  # away worker index -> (its pending version() call, when sent)
        self.unassigned: list[PromptTask] = []  # handed out, waiting for a worker that answers
        self.retries = ScoringRetries()
        self.pushed = 0  # groups that entered the stream since the learner's last read
        self.learner_held = 0  # groups the learner has read and not trained yet
        self._next = 0
        self.worker_stats: dict = {}  # rollout worker id -> its latest counters (they come with its reports)
        self.scorer_stats: dict = {}  # reward worker index -> its latest counters (they come with its receipts)
        self.load_seconds = 0.0  # weight loads the workers reported since the last step
        self.load_errors: dict[str, int] = {}  # rollout worker id -> failed loads in a row

    @property
    def tasks_in_flight(self) -> int:
        return sum(len(tasks) for tasks, _ in self.rollouts.values()) + len(self.unassigned)

    @property
    def groups_scoring(self) -> int:
        """Groups handed to reward workers and not answered yet, as of each rollout worker's latest report."""
        return sum(stats.get("groups_scoring", 0) for stats in self.worker_stats.values())

    def batch_may_be_ready(self, per_step: int) -> bool:
        return self.learner_held + self.pushed >= per_step

    def learner_wait_ms(self, per_step: int) -> int | None:
        """How long the learner may wait in the stream for its batch: not at all when the receipts say it is
        there; 100 ms when nothing is in flight and nothing may start (only a previous run's groups can move
        on). None: no batch can be there yet. (Letting the learner wait for pushes still being scored, a receipt
        round trip sooner, measured slower on 2 cores: 0.78 against 0.56 s per step in benchmarks/pipeline.py.)"""
        if self.batch_may_be_ready(per_step):
            return 0
        if not self.rollouts and not self.unassigned and not self.ledger.next_indices(0):
            return 100
        return None

    def submit(self, indices: range, hints_enabled: bool) -> None:
        wanted = [self.order.task(i) for i in indices]
        if not wanted:
            return
        states = ray.get(self.comps.buffer.prompt_states.remote([s.id for _, s in wanted])) if hints_enabled else {}
        tasks = []
        for key, sample in wanted:
            hinted = bool(states.get(sample.id, {}).get("hint_active") and sample.hint)
            tasks.append(PromptTask(key=key, sample=sample, use_hint=hinted))
            self.ledger.handed_out(key)
        self._hand_out(tasks)

    def _hand_out(self, tasks: list[PromptTask]) -> None:
        """One call per answering worker, the tasks dealt round robin; with none answering they wait."""
        live = self.workers.live()
        if not live:
            self.unassigned += tasks
            return
        shares: dict[int, list[PromptTask]] = {}
        for task in tasks:
            shares.setdefault(live[self._next % len(live)], []).append(task)
            self._next += 1
        for i, share in shares.items():
            self._rollout(share, i)

    def _rollout(self, tasks: list[PromptTask], i: int) -> None:
        ref = self.comps.workers[i].rollout.remote(tasks, self.comps.rewards.workers, self.comps.weights)
        self.rollouts[ref] = (tasks, i)

    def wait(self, timeout: float) -> None:
        """Sleep until a rollout call finishes, or `timeout` passes: the driver wakes on the first."""
        if self.rollouts and timeout > 0:
            ray.wait(list(self.rollouts), num_returns=1, timeout=timeout)
        elif timeout > 0:
            time.sleep(timeout)

    def collect(self) -> None:
        for ref, report in _gather(self.rollouts):
            tasks, i = self.rollouts.pop(ref)
            if isinstance(report, Exception):
                if classify(report) != WORKER_LOST:
                    raise report
                self._worker_lost(i, tasks, report)
                continue
            self._report(report)
            by_key = {t.key: t for t in tasks}
            for r in report.receipts:
                if r.skipped is not None:  # unreadable media: the reason goes to the dead-letter stream
                    skip_prompt(self.comps, self.state, r.key, r.prompt_id, r.skipped, self.ledger.submitted)
                    self.ledger.no_group(r.key)
                    continue
                self.state.completions_generated += r.completions
                if r.lost is not None:
                    self._scoring_lost(by_key[r.key], r.lost)
                else:
                    self._scored(by_key[r.key], r.answer)

    def _worker_lost(self, i: int, tasks: list[PromptTask], exc: Exception) -> None:
        """Worker i died mid-call (its process, or its node): its tasks go to the workers that answer (their ids
        are the tasks', so a group already pushed is refused as a duplicate), and it is watched until it answers
        again."""
        name = self.workers.names[i]
        if self.workers.lost(i):
            self.state.bump("rollout_workers_lost")
            self.probes[i] = (self.comps.workers[i].version.remote(), time.monotonic())
            live = [self.workers.names[j] for j in self.workers.live()]
            log.warning(f"{name} is gone ({type(exc).__name__}: its process or its node died); Ray restarts it "
                        "when a node with its placement resources is there; "
                        + (f"going on with {', '.join(live)}" if live else
                           f"no other worker answers: waiting for one (at most pipeline.worker_wait_s "
                           f"{self.workers.wait_s:g} s)"))
        log.warning(f"{name} died on {', '.join(t.key for t in tasks)}; resubmitting")
        self._hand_out(tasks)

    def watch_workers(self) -> None:
        """Away workers whose probe answered get tasks again (and the tasks waiting for one); a failed probe is
        sent again. Raises WorkersLost once none has answered for pipeline.worker_wait_s."""
        for i, (ref, sent) in list(self.probes.items()):
            if not _ready({ref: None}):
                continue
            try:
                version = ray.get(ref)
            except ray.exceptions.RayActorError:  # not known as restarting yet, or gone for good: ask again
                if time.monotonic() - sent >= self.PROBE_AGAIN_S:
                    self.probes[i] = (self.comps.workers[i].version.remote(), time.monotonic())
                continue
            del self.probes[i]
            away_s = self.workers.back(i)
            self.comps.refresh_metrics_targets(only={self.workers.names[i]})  # back on a new port, maybe another node
            self.state.bump("rollout_workers_back")
            log.warning(f"{self.workers.names[i]} answers again after {away_s:.1f} s: it gets "
                        "tasks again (and the current weights with its next call, or now by a broadcast)")
            self.comps.catch_up(self.comps.workers[i], version)
        if self.unassigned and self.workers.live():
            tasks, self.unassigned = self.unassigned, []
            self._hand_out(tasks)
        self.workers.check()

    def away_names(self) -> list[str]:
        return [self.workers.names[i] for i in sorted(self.workers.away)]

    def worker_summary(self) -> dict:
        """Per rollout worker, as of its latest report: the node it runs on, its completions since it (re)started
        and the policy version it holds."""
        return {wid: {"node": s.get("node_id"), "completions": s.get("completions", 0), "version": s.get("version")}
                for wid, s in sorted(self.worker_stats.items())}

    def _report(self, report) -> None:
        self.worker_stats[report.worker_id] = report.stats
        self.load_seconds += report.load_seconds
        if report.load_error is None:
            self.load_errors.pop(report.worker_id, None)
            return
        failed = self.load_errors[report.worker_id] = self.load_errors.get(report.worker_id, 0) + 1
        self.state.bump("weight_load_failures")
        log.warning(f"{report.worker_id} could not load the weights ({report.load_error}); it generates with "
                    f"v{report.stats.get('version')} meanwhile ({failed} in a row)")
        if failed > MAX_LOAD_FAILURES:
            raise RuntimeError(f"{report.worker_id} failed to load the published weights {failed} times in a row: "
                               f"{report.load_error}")

    def take_stats(self) -> tuple[dict, list[dict], float]:
        """(reward workers' counters summed, each rollout worker's counters, load seconds since the last call)."""
        load_s, self.load_seconds = self.load_seconds, 0.0
        return sum_worker_stats(self.scorer_stats.values()), list(self.worker_stats.values()), load_s

    def _scored(self, task: PromptTask, receipt) -> None:
        self.scorer_stats[receipt.worker] = newer_counters(self.scorer_stats.get(receipt.worker), receipt.worker_stats)
        if receipt.error:  # the group's own failure (counted by its scorer): scored again, then given up
            if self.retries.again(task.key):
                log.warning(f"scoring failed for {task.key} ({receipt.error}); scoring again "
                            f"({self.retries.failures[task.key]})")
                self.state.bump("scoring_retries")
                self._regenerate(task)
            else:  # the cursor stays before it: a resumed job generates and scores it again
                log.warning(f"scoring failed {self.retries.failures[task.key]} times for {task.key} "
                            f"({receipt.error}); left for the next resume")
                self.state.bump("unscored_groups")
                self.ledger.given_up(task.key)
        elif receipt.dead_lettered:  # a record the buffer refused: in the dead-letter stream, never trained
            self.ledger.no_group(task.key)
        else:
            self.pushed += receipt.entry_id is not None
            self.ledger.in_buffer(task.key)

    def _scoring_lost(self, task: PromptTask, exc: Exception) -> None:
        kind = classify(exc)
        if kind == WORKER_LOST:  # its reward worker died (before or after its push): once it is back, the task
            # is generated and scored again; a push that had got through makes the second one a duplicate
            log.warning(f"reward worker lost while scoring {task.key}; generating and scoring it again once it "
                        "is back")
            self.comps.ready_reward_workers()
        elif kind == DATA_LOST:  # the group's object was lost on its way to the reward worker (its node died)
            log.warning(f"the group of {task.key} was lost before its reward worker read it "
                        f"({type(exc).__name__}); generating it again")
        else:
            raise exc
        self._regenerate(task)

    def _regenerate(self, task: PromptTask) -> None:
        """The same task again (same key, so the same trajectory ids: the buffer keeps one copy)."""
        self._hand_out([task])

    def learner_read(self, summary: dict, committer: Committer) -> list[str]:
        """Account for what the learner read: its held groups, the stale groups it dropped (acknowledged with the
        next checkpoint; another task takes each one's place). Returns the dropped group ids.

        The learner reads at most a batch's worth: groups pushed beyond it are still in the stream and still count
        toward the next batch (zeroing `pushed` here made the driver wait for the next rollout call while a batch
        sat in the stream)."""
        read = len(summary.get("entry_ids", [])) + len(summary["stale"]) + summary["held"] - self.learner_held
        self.pushed, self.learner_held = max(self.pushed - read, 0), summary["held"]
        committer.owe([entry_id for entry_id, _, _ in summary["stale"]])
        self.state.bump("stale_dropped", len(summary["stale"]))
        return [group_id for _, group_id, _ in summary["stale"]]

    def drain(self, timeout_s: float = 300.0) -> None:
        """Wait for what is still generating or scoring: its groups enter the buffer for the next run."""
        deadline = time.monotonic() + timeout_s
        while self.rollouts and time.monotonic() < deadline:
            self.wait(1.0)
            for ref in _ready(self.rollouts):
                self.rollouts.pop(ref)


def newer_counters(kept: dict | None, new: dict) -> dict:
    """A reward worker's counters, the newer of two: its replies reach the driver inside rollout reports, which
    may be read in any order, so the one counting fewer groups is the older."""
    def groups(counts: dict) -> float:
        return counts.get("groups_scored", 0) + counts.get("groups_failed", 0)

    return new if kept is None or groups(new) >= groups(kept) else kept


def _ready(calls: dict) -> list:
    if not calls:
        return []
    done, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
    return done


def _gather(calls: dict) -> list[tuple]:
    """(ref, answer or the exception it raised) for the calls that have finished, fetched in one ray.get."""
    done = _ready(calls)
    if not done:
        return []
    try:
        return list(zip(done, ray.get(done)))
    except Exception:  # one of them failed: fetch one by one to tell which
        out = []
        for ref in done:
            try:
                out.append((ref, ray.get(ref)))
            except Exception as exc:
                out.append((ref, exc))
        return out


def skip_prompt(comps: Components, state: RunState, key: str, prompt_id: str, reason: str, handed_out: int) -> int:
    """A task whose media cannot be read: counted, its reason in the dead-letter stream (once per task key), and
    the job stopped if most prompts handed out are unreadable. Returns the count of skipped prompts."""
    skipped = state.bump("skipped_prompts")
    ray.get(comps.buffer.reject.remote(key, "media", f"prompt {prompt_id}: {reason}"))
    check_skipped(skipped, handed_out, reason)
    return skipped


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
            log.warning(f"weight publish failed ({cause}); trying again ({attempt + 1}/{retries})")
            bump = False
            time.sleep(backoff_s * (attempt + 1))
    raise AssertionError("unreachable")


class PhaseTimer:
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
