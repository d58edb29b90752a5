"""The four answers a help desk needs of each message, from its bytes and its parse.

What the person wrote (``reply``), whether a person wrote it at all (``automatic``), whether
it reports a bounce or a complaint (``bounce``), and the keys that place it in a conversation
(``thread``). Pure: the installation's addresses (for loops) and the stored parents (for
threads) are the save path's to add.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from mailread.automatic import Automatic, automatic
from mailread.bounce import Bounce, bounce_of
from mailread.reply import reply_text
from mailread.thread import ThreadKeys, thread_keys

BOUNCE_LIMIT = 4 * 1024 * 1024  # bytes of a message read for its delivery report


@dataclass(frozen=True)
class Understanding:
    reply_text: str | None
    automatic: Automatic
    bounce: Bounce | None
    thread: ThreadKeys

    @property
    def auto_reply(self) -> bool:
        return self.automatic.auto_reply and self.bounce is None  # a bounce is its own kind

    @property
    def bulk(self) -> bool:
        return self.automatic.bulk and self.bounce is None

    @property
    def kind(self) -> str:
        """For counting: person, auto_reply, bulk, bounce or complaint."""
        if self.bounce is not None:
            return "complaint" if self.bounce.kind == "complaint" else "bounce"
        if self.auto_reply:
            return "auto_reply"
        return "bulk" if self.bulk else "person"


def understand(raw: bytes, headers: Message, *, subject: str, text: str, html: str,
               in_reply_to: str | None, references: list[str]) -> Understanding:
    """``headers``: the header block of ``raw`` (compat32), as the parser read it."""
    return Understanding(
        reply_text=reply_text(text, html),
        automatic=automatic(headers, subject),
        bounce=bounce_of(raw[:BOUNCE_LIMIT], headers, text),
        thread=thread_keys(in_reply_to, references, subject),
    )

