"""Mail text made safe to show on a terminal: control and bidi-format characters escaped.

Subjects, senders and filenames are what a stranger wrote. Printed raw, ``\\x1b`` starts a
terminal escape sequence (it can retitle the window, move the cursor, hide text) and
U+202E turns ``gpj.exe`` into ``exe.jpg`` on screen. Every place that shows mail text to a
person goes through ``escape``; the stored values keep what the sender wrote.
"""

from __future__ import annotations

import io
import re

# C0 and C1 controls, DEL, and the Unicode bidi formatting characters (embeddings,
# overrides, isolates, marks). Other format characters (ZWJ in emoji) are harmless.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    ch = match.group(0)
    # \u for DEL and above: inside a JSON string that is the same character again.
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x7f else f"\\u{ord(ch):04x}")


def escape(text: str, keep: str = "") -> str:
    """``text`` with every unsafe character written as an escape (``\\x1b``, ``\\u202e``),
    except those in ``keep`` (a table cell keeps none, a whole output line keeps ``\\n``)."""
    if not keep:
        return _UNSAFE.sub(_escaped, text)
    return _UNSAFE.sub(lambda m: m.group(0) if m.group(0) in keep else _escaped(m), text)


class EscapingWriter(io.TextIOBase):
    """A text stream that escapes what it is given before passing it on: the CLI's stdout,
    so that no command can print mail text raw by mistake."""

    def __init__(self, target):
        self.target = target

    def write(self, text: str) -> int:
        self.target.write(escape(text, keep="\n\t"))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    @property
    def encoding(self):
        return getattr(self.target, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()
