"""The fresh stream: scored groups in (the reward workers' push), groups out to the learner through the consumer
group. A push is idempotent by trajectory id and updates the prompt's statistics in the same script (push.lua);
a record that fails decoding or validation goes to the dead-letter stream instead."""

from __future__ import annotations

import redis

from buffer_service.dead_letters import DeadLetters
from buffer_service.prompt_state import script_settings, task_reward
from buffer_service.records import Trajectory
from buffer_service.schema import RecordError, SchemaError, decode_group, encode_group, validate_group
from buffer_service.store import Store


def _try_encode(group) -> bytes:
    try:
        return encode_group(list(group))
    except Exception:  # an object that cannot even be encoded: keep the reason only
        return b""


class FreshStream:
    def __init__(self, store: Store, dead_letters: DeadLetters):
        self.store = store
        self.dead_letters = dead_letters
        self.create_group()

    def create_group(self) -> None:
        """The learners' consumer group (and the stream), unless it exists."""
        try:
            # From id 0: groups pushed before the first reader are delivered too.
            self.store.r.xgroup_create(self.store.k["fresh"], self.store.config.consumer_group, id="0",
                                       mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def push(self, group: list[Trajectory] | bytes) -> dict:
        store = self.store
        result = {"entry_id": None, "accepted": 0, "duplicates": 0, "dead_lettered": False}
        payload = group if isinstance(group, (bytes, bytearray, memoryview)) else None
        try:
            if payload is not None:
                group = decode_group(bytes(payload))
            validate_group(group)
            blob = bytes(payload) if payload is not None else encode_group(group)
        except (SchemaError, RecordError) as exc:
            self.dead_letters.add("push", str(exc), payload if payload is not None else _try_encode(group))
            result["dead_lettered"] = True
            return result
        for _ in range(10):  # optimistic: the script refuses if another writer pushed one of ours meanwhile
            seen = store.r.smismember(store.k["seen"], [t.trajectory_id for t in group])
            new = [t for t, s in zip(group, seen, strict=True) if not s]
            result["duplicates"] = len(group) - len(new)
            if not new:
                store.r.hincrby(store.k["stats"], "duplicates", len(group))
                return result
            args = [
                script_settings(store.config),
                blob if len(new) == len(group) else encode_group(new),
                new[0].group_id,
                new[0].prompt_id,
                result["duplicates"],
                len(new),
            ]
            for t in new:
                args += [t.trajectory_id, repr(float(t.reward)), repr(task_reward(t))]
            keys = store.keys("seen", "fresh", "stats", "rbar", "streak", "hinted", "seen_order")
            entry = store.scripts["push"](keys=keys, args=args)
            if entry is not None:
                result["entry_id"] = entry.decode()
                result["accepted"] = len(new)
                return result
        raise RuntimeError("push_group: trajectory ids kept colliding with concurrent pushes")

    def read(
        self,
        consumer: str,
        max_groups: int = 1,
        block_ms: int | None = None,
        reclaim_idle_ms: int | None = None,
        new_only: bool = False,
    ) -> list[tuple[str, list[Trajectory]]]:
        """Entries pending longer than reclaim_idle_ms (a dead consumer's), then new ones; `new_only`: new ones
        only, for a consumer whose pending entries are all its own and still accounted for."""
        store = self.store
        group_name, fresh = store.config.consumer_group, store.k["fresh"]
        messages = []
        if not new_only:
            idle = store.config.reclaim_idle_ms if reclaim_idle_ms is None else reclaim_idle_ms
            _, claimed, _ = store.r.xautoclaim(fresh, group_name, consumer, idle, start_id="0-0", count=max_groups)
            messages += self._reclaimed(claimed)
        left = max_groups - len(messages)
        if left > 0:
            block = block_ms if block_ms and block_ms > 0 else None
            reply = store.r.xreadgroup(group_name, consumer, {fresh: ">"}, count=left, block=block)
            for _, entries in reply or []:
                messages += entries
        return self._decode(messages)

    def take_back(self, consumer: str) -> list[tuple[str, list[Trajectory]]]:
        """Every entry pending in the consumer group (read and never acknowledged, by any consumer, however
        recently), now `consumer`'s: a resumed learner's first read."""
        store = self.store
        group_name, fresh = store.config.consumer_group, store.k["fresh"]
        messages, start = [], "0-0"
        while True:
            start, claimed, _ = store.r.xautoclaim(fresh, group_name, consumer, 0, start_id=start, count=100)
            messages += self._reclaimed(claimed)
            if start in (b"0-0", "0-0"):  # the scan went through the whole pending list
                return self._decode(messages)

    def _reclaimed(self, claimed: list) -> list:
        if claimed:
            self.store.r.hincrby(self.store.k["stats"], "reclaimed", len(claimed))
        return list(claimed)

    def _decode(self, messages: list) -> list[tuple[str, list[Trajectory]]]:
        """Decoded groups; an undecodable entry is dead-lettered and acknowledged."""
        store = self.store
        group_name, fresh = store.config.consumer_group, store.k["fresh"]
        out = []
        for entry_id, fields in messages:
            entry_id = entry_id.decode()
            try:
                if fields is None or b"blob" not in fields:
                    raise SchemaError("stream entry has no 'blob' field")
                group = decode_group(fields[b"blob"])
                validate_group(group)
            except (SchemaError, RecordError) as exc:
                self.dead_letters.add("fresh", str(exc), (fields or {}).get(b"blob", b""), entry_id)
                pipe = store.r.pipeline(transaction=True)
                pipe.xack(fresh, group_name, entry_id).xdel(fresh, entry_id)
                pipe.execute()
                continue
            out.append((entry_id, group))
        if out:
            store.r.hincrby(store.k["stats"], "read", len(out))
        return out
