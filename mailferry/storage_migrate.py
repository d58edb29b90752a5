"""``mailferry storage migrate --to URL``: copy an installation's stored objects into another
store (folders to S3-compatible object storage, usually), resumable after a kill.

The source is never changed, so the running installation keeps reading it until the operator
points ``storage_url`` at the target. A run lists what the target already holds and copies
only the rest, so a second run after a kill starts where the first stopped and no object is
written twice. Each object is checked against its key on the way (keys are content hashes):
one that does not hash to its name is reported and left out, never copied as if sound. A raw
source stored before 2026-12-06 began with the spool's envelope record; its message alone is
copied, under the same key, as every raw source is stored now.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from mailferry.storage import Blob, BlobStore, DamagedObject

BATCH = 64  # objects per write_new: one folder barrier, or this many PUTs in flight


@dataclass
class MigrationSummary:
    listed: int = 0  # objects in the source
    present: int = 0  # already in the target (a run before this one)
    copied: int = 0
    damaged: list[str] = field(default_factory=list)  # keys whose bytes are not their hash
    vanished: list[str] = field(default_factory=list)  # listed, then gone before they were read


def plan(source: BlobStore, target: BlobStore) -> tuple[list[str], int]:
    """(the source keys the target lacks, in order; how many it has already)."""
    have = set(target.keys())
    keys = sorted(source.keys())
    todo = [key for key in keys if key not in have]
    return todo, len(keys) - len(todo)


def migrate(source: BlobStore, target: BlobStore, todo: list[str], *,
            progress: Callable[[int, str], None] = lambda n, detail: None,
            rate: float = 0.0, batch: int = BATCH) -> MigrationSummary:
    """Copy ``todo`` from ``source`` to ``target``, ``batch`` at a time, at most ``rate``
    objects a second (0: as fast as both allow)."""
    summary = MigrationSummary(listed=len(todo))
    started = time.monotonic()
    for start in range(0, len(todo), batch):
        items = []
        for key in todo[start:start + batch]:
            blob = _sound_blob(source, key, summary)
            if blob is not None:
                items.append((key, blob))
        summary.copied += target.write_new(items)
        done = min(start + batch, len(todo))
        progress(done - start, f"copied {summary.copied}, damaged {len(summary.damaged)}")
        if rate:
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return summary


def _sound_blob(source: BlobStore, key: str, summary: MigrationSummary) -> Blob | None:
    try:
        data = source.read_sound(key)
    except FileNotFoundError:
        summary.vanished.append(key)
        return None
    except DamagedObject:
        summary.damaged.append(key)
        return None
    return Blob(data, BlobStore.sha256_of_key(key))


def unreferenced_in(target: BlobStore, referenced: list[str]) -> list[str]:
    """The keys the database points at that the target does not hold."""
    have = set(target.keys())
    return [key for key in referenced if key not in have]
