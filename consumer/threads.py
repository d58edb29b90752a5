"""Threads in the save path: the stored parents a new message joins, and the replies that
arrived before their parent moved into its thread when it comes.

The algorithm is ``mailread.thread`` (pure); this module adds the two lookups it needs, one
query each per batch, inside the batch's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from peewee import Case, chunked

from mailread.thread import ThreadKeys, own_name, thread_name
from mailferry.models import EmailMessage


@dataclass(frozen=True)
class Wanted:
    user_id: int
    message_id: str
    keys: ThreadKeys


def assign(wanted: list[Wanted]) -> list[str]:
    """The thread id of each new message, in order; call inside the batch's transaction, before
    its rows are inserted. Replies stored earlier under a name this batch's messages own (the
    parent came after them) are moved into the parent's thread."""
    known = _stored_threads({(w.user_id, p) for w in wanted for p in w.keys.parents})
    names: list[str] = []
    for item in wanted:
        parent = next((known[(item.user_id, p)] for p in item.keys.parents
                       if (item.user_id, p) in known), None)
        name = parent or own_name(item.user_id, item.message_id, item.keys)
        known[(item.user_id, item.message_id)] = name  # a reply later in this batch joins it
        names.append(name)
    # Replies that came first named their thread after this message's id: they join its thread.
    moves = {thread_name(w.user_id, w.message_id): name for w, name in zip(wanted, names)
             if thread_name(w.user_id, w.message_id) != name}
    moves = {old: _final(old, moves) for old in moves}
    names = [moves.get(name, name) for name in names]
    _move_stored(moves)
    return names


def _final(name: str, moves: dict[str, str]) -> str:
    """Where a chain of moves ends: <c> named <b>'s thread, <b> joined <a>'s, <a> another."""
    seen = {name}
    while name in moves and moves[name] not in seen:
        name = moves[name]
        seen.add(name)
    return name


def _stored_threads(keys: set[tuple[int, str]]) -> dict[tuple[int, str], str]:
    found: dict[tuple[int, str], str] = {}
    users = sorted({user for user, _ in keys})
    for chunk in chunked(sorted({m for _, m in keys}), 500):
        query = (EmailMessage.select(EmailMessage.user, EmailMessage.message_id, EmailMessage.thread_id)
                 .where(EmailMessage.user.in_(users) & EmailMessage.message_id.in_(chunk)
                        & EmailMessage.thread_id.is_null(False)))
        for user_id, message_id, thread_id in query.tuples():
            if (user_id, message_id) in keys:
                found[(user_id, message_id)] = thread_id
    return found


def _move_stored(moves: dict[str, str]) -> None:
    """Rename the stored threads among ``moves`` (old name → new). A thread name embeds its
    user, so the name alone finds its rows; most names were never used, and one read says so."""
    for chunk in chunked(sorted(moves), 500):
        used = [old for (old,) in EmailMessage.select(EmailMessage.thread_id).distinct()
                .where(EmailMessage.thread_id.in_(chunk)).tuples()]
        if used:
            (EmailMessage.update(thread_id=Case(EmailMessage.thread_id, [(o, moves[o]) for o in used]))
             .where(EmailMessage.thread_id.in_(used)).execute())
