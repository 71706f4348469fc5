"""The dead-letter stream: records the service could not use (a group that fails decoding or validation) and
input the job could not use (unreadable media, a bad manifest row), each with its reason and counted; nothing is
dropped silently. Bounded to about config.dead_letter_maxlen entries."""

from __future__ import annotations

import time

from buffer_service.store import Store


class DeadLetters:
    def __init__(self, store: Store):
        self.store = store

    def add(self, source: str, reason: str, payload: bytes, entry_id: str = "") -> None:
        """A record the service refused, with its bytes (b"" when it could not even be encoded)."""
        store = self.store
        pipe = store.r.pipeline(transaction=True)
        pipe.xadd(
            store.k["dead"],
            {
                "source": source,
                "reason": reason,
                "entry_id": entry_id,
                "at": repr(time.time()),
                "payload": payload,
            },
            maxlen=store.config.dead_letter_maxlen,
            approximate=True,
        )
        pipe.hincrby(store.k["stats"], "dead_lettered", 1)
        pipe.execute()

    def reject(self, key: str, source: str, reason: str) -> bool:
        """Input that cannot be used (a prompt whose media cannot be read, a malformed manifest row): its reason
        enters the dead-letter stream once per key (a resumed job that meets it again adds nothing), counted
        as `rejected`. Returns True the first time."""
        keys = self.store.keys("rejected", "dead", "stats")
        args = [key, source, reason, repr(time.time()), self.store.config.dead_letter_maxlen]
        return bool(self.store.scripts["reject"](keys=keys, args=args))

    def read(self, count: int = 100, newest: bool = False) -> list[dict]:
        """The first `count` dead letters, oldest first (newest: the last `count`, newest first)."""
        r = self.store.r
        read = r.xrevrange if newest else r.xrange
        out = []
        for eid, fields in read(self.store.k["dead"], count=count):
            row = {k.decode(): v for k, v in fields.items()}
            for key in ("source", "reason", "entry_id", "at"):
                row[key] = row.get(key, b"").decode(errors="replace")
            row["id"] = eid.decode()
            out.append(row)
        return out
