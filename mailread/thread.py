"""Which conversation a message belongs to: the pure half of threading (no database here).

JWZ's algorithm, reduced to what one user's mailbox needs. A message's thread is its nearest
stored parent's (In-Reply-To, then References from the last); with none stored yet, it is
named after the conversation's root (the first of References, or In-Reply-To), so replies that
arrive before their parent already share one name, and the parent, named after its own
Message-ID when it has no references, takes it when it comes. A message with neither header
is placed by its normalised subject. The lookup of stored parents, and moving replies that
named a parent's own id when the parent turns out to belong elsewhere, are the save path's
(``consumer/threads.py``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

# Reply and forward prefixes of the clients people use, stacked ("Re: AW: Fwd:"), counted
# ("Re[2]:", "RE^3:") or with a full-width colon, and list tags ("[help] …").
_PREFIX = re.compile(
    r"^\s*((re|aw|wg|sv|vs|fw|fwd|tr|rv|enc|antw|odp|ynt|ref|rif|r|i|ответ|回复|答复|转发|回覆|轉寄|"
    r"返信|転送)\s*(\[\d+\]|\^\d+|\(\d+\))?\s*[:：]|\[[^\[\]]{1,40}\])\s*",
    re.IGNORECASE)


@dataclass(frozen=True)
class ThreadKeys:
    parents: tuple[str, ...]  # Message-IDs this one answers, nearest first
    root: str | None  # the conversation's first message, by the sender's account
    subject: str  # normalised; "" when there is none


def thread_keys(in_reply_to: str | None, references: list[str], subject: str) -> ThreadKeys:
    parents: list[str] = []
    for message_id in ([in_reply_to] if in_reply_to else []) + list(reversed(references)):
        if message_id and message_id not in parents:
            parents.append(message_id)
    root = references[0] if references else in_reply_to or None
    return ThreadKeys(tuple(parents), root, normalised_subject(subject))


def normalised_subject(subject: str) -> str:
    text = " ".join((subject or "").split())
    while True:
        stripped = _PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    return text.casefold()


def thread_name(user_id: int, key: str) -> str:
    """The thread id for a conversation named ``key`` in one user's mail: opaque, stable, and
    different for two users whose mail carries the same Message-IDs."""
    digest = hashlib.sha256(f"{user_id}\0{key}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"t_{digest[:24]}"


def own_name(user_id: int, message_id: str, keys: ThreadKeys) -> str:
    """The thread a message names when none of its parents is stored."""
    if keys.root:
        return thread_name(user_id, keys.root)
    if keys.subject:
        return thread_name(user_id, "subject\0" + keys.subject)
    return thread_name(user_id, message_id)
