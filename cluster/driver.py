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

from .accounting import StreamAccounting, WorkerCounters
from .committer import Committer
from .components import Components
from .config import JobConfig, PipelineConfig
from .handout import TaskHandout
from .ledger import TaskLedger
from .metrics import DriverMetrics
from .prompts import PromptOrder, check_skipped
from .recorder import StepRecorder
from .retry import DATA_LOST, WORKER_LOST, ScoringRetries, classify
from .state import RunState
from .worker_health import WorkerHealth

log = logging.getLogger(__name__)


def train_rl(cfg: JobConfig, run_dir: Path, comps: Components, order: PromptOrder, state: RunState,
             metrics: DriverMetrics, history: Path, evaluate: Callable[[], dict] | None = None) -> RunState:
    """`evaluate`: the held-out evaluation, run every pipeline.eval_every steps (before the stage's last)."""
    pcfg = cfg.pipeline
    per_step, n_replay = pcfg.prompts_per_step, pcfg.replay_per_group * pcfg.prompts_per_step
    ledger = TaskLedger(state, per_step, pcfg.max_staleness, pcfg.max_prompts_in_flight, cfg.buffer.dedup_window_groups)
    flight = Flight(comps, order, ledger, state, pcfg)
    committer = Committer(run_dir, state, comps.learner, lambda ids: ray.get(comps.buffer.ack.remote(ids)))
    recorder, phase = StepRecorder(cfg, comps, metrics, history), PhaseTimer()
    committer.ack()  # the previous run may have stopped between its checkpoint and its acknowledgement
    bar = tqdm(total=pcfg.steps, initial=state.step, desc=f"stage {cfg.stage} RL", unit="step", dynamic_ncols=True)
    reclaim, stale_groups = True, []  # the first read takes back what a previous run had read
    while state.step < pcfg.steps:
        with phase("submit"):  # 1. tasks within the staleness bound, hints from the prompts' state
            flight.submit(ledger.next_indices(flight.handout.tasks_in_flight), cfg.buffer.hint.enabled)
        with phase("rollout_wait"):  # 2. receipts: generated, scored, in the fresh stream
            flight.handout.wait(timeout=0.0 if flight.stream.batch_may_be_ready(per_step) or reclaim else 0.1)
            flight.collect()
            flight.watch_workers()  # away workers that answer again get tasks; none for too long: WorkersLost
        ledger.advance()
        wait_ms = flight.learner_wait_ms(per_step)  # None: no batch can be there yet
        if wait_ms is None and not reclaim:
            continue
        with phase("train"):  # 3. the learner reads its batch from Redis, trains, fills the tiers
            summary = comps.learner.train_from_buffer(per_step, n_replay, pcfg.max_staleness, wait_ms, reclaim)
        reclaim = False
        stale_groups += flight.stream.learner_read(summary, committer)
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
            row = recorder.record(state, summary, flight.counters.take(), {
                "weight_sync_seconds": sync_s, "heldout_accuracy": heldout,
                # the medium that carried this step's publish: learner.transport, or object_store after a fallback
                "weight_medium": comps.weights["medium"] if sync_s is not None else None,
                "stale_dropped_groups": stale_groups, "prompts_in_flight": flight.handout.tasks_in_flight,
                "groups_scoring": flight.counters.groups_scoring, "phase_seconds": phase.take(),
                "rollout_workers": flight.counters.rollout_summary(), "rollout_workers_away": flight.health.away_names()})
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
    flight.handout.drain(timeout_s=300.0)
    return state


class Flight:
    """The driver's side of generation: turns the rollout calls' reports into ledger entries, and decides what
    a failure means by its exception type (cluster/retry.py). Its parts, each with one job: the hand-out of tasks
    (cluster/handout.py), the rollout workers' health (cluster/worker_health.py), the stream's and the workers'
    accounting (cluster/accounting.py) and the scoring retries (cluster/retry.py).

    A worker whose call dies (its process or its node died) is away: its tasks go to the workers that answer, or
    wait for one; once it answers again it gets tasks again, loading the current weights with its next call."""

    def __init__(self, comps: Components, order: PromptOrder, ledger: TaskLedger, state: RunState,
                 pcfg: PipelineConfig):
        self.comps, self.order, self.ledger, self.state = comps, order, ledger, state
        self.handout = TaskHandout(lambda i, tasks: comps.workers[i].rollout.remote(
            tasks, comps.rewards.workers, comps.weights))
        self.health = WorkerHealth([f"rollout-{i}" for i in range(len(comps.workers))], pcfg.worker_wait_s,
                                   pcfg.max_weight_load_failures, lambda i: comps.workers[i].version.remote())
        comps.availability = self.health.availability  # evaluate and stop skip the away workers too
        self.retries = ScoringRetries(pcfg.max_scoring_retries)
        self.stream = StreamAccounting(state)
        self.counters = WorkerCounters()

    def learner_wait_ms(self, per_step: int) -> int | None:
        """How long the learner may wait in the stream for its batch: not at all when the receipts say it is
        there; 100 ms when nothing is in flight and nothing may start (only a previous run's groups can move
        on). None: no batch can be there yet. (Letting the learner wait for pushes still being scored, a receipt
        round trip sooner, measured slower on 2 cores: 0.78 against 0.56 s per step in benchmarks/pipeline.py.)"""
        if self.stream.batch_may_be_ready(per_step):
            return 0
        if self.handout.idle and not self.ledger.next_indices(0):
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
        self.handout.give(tasks, self.health.live())

    def collect(self) -> None:
        for tasks, i, report in self.handout.finished():
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
        are the tasks', so a group already pushed is refused as a duplicate), and it is probed until it answers
        again."""
        name = self.health.names[i]
        if self.health.lost(i):
            self.state.bump("rollout_workers_lost")
            live = [self.health.names[j] for j in self.health.live()]
            log.warning(f"{name} is gone ({type(exc).__name__}: its process or its node died); Ray restarts it "
                        "when a node with its placement resources is there; "
                        + (f"going on with {', '.join(live)}" if live else
                           f"no other worker answers: waiting for one (at most pipeline.worker_wait_s "
                           f"{self.health.availability.wait_s:g} s)"))
        log.warning(f"{name} died on {', '.join(t.key for t in tasks)}; resubmitting")
        self.handout.give(tasks, self.health.live())

    def watch_workers(self) -> None:
        """Away workers that answer again get tasks again (and the tasks waiting for one). Raises WorkersLost
        once none has answered for pipeline.worker_wait_s."""
        for i, away_s, version in self.health.returned():
            name = self.health.names[i]
            self.comps.refresh_metrics_targets(only={name})  # back on a new port, maybe another node
            self.state.bump("rollout_workers_back")
            log.warning(f"{name} answers again after {away_s:.1f} s: it gets tasks again (and the current weights "
                        "with its next call, or now by a broadcast)")
            self.comps.catch_up(self.comps.workers[i], version)
        self.handout.give_waiting(self.health.live())

    def _report(self, report) -> None:
        self.counters.rollout_report(report.worker_id, report.stats, report.load_seconds)
        failed = self.health.weight_load(report.worker_id, report.load_error)
        if failed:
            self.state.bump("weight_load_failures")
            log.warning(f"{report.worker_id} could not load the weights ({report.load_error}); it generates with "
                        f"v{report.stats.get('version')} meanwhile ({failed} in a row)")

    def _scored(self, task: PromptTask, receipt) -> None:
        self.counters.reward_receipt(receipt.worker, receipt.worker_stats)
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
            self.stream.pushed += receipt.entry_id is not None
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
        self.handout.give([task], self.health.live())


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
