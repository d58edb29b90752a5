"""Mail text made safe to show on a terminal: control and bidi-format characters escaped.

Subjects, senders and filenames are what a stranger wrote. Printed raw, ``\\x1b`` starts a
terminal escape sequence (it can retitle the window, move the cursor, hide text) and
U+202E turns ``gpj.exe`` into ``exe.jpg`` on screen. Every place that shows mail text to a
person goes through ``escape``; the stored values keep what the sender wrote.
"""

from __future__ import annotations

import io
import re
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

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


def terminal(stream) -> "Console | None":
    """A rich Console writing to ``stream`` if it is a terminal, else None (plain text then).
    Behind an EscapingWriter it writes to the terminal itself: rich's own escape sequences
    are the colours and boxes, and every cell it is given was escaped before."""
    if not stream.isatty():
        return None
    from rich.console import Console
    return Console(file=getattr(stream, "target", stream), highlight=False)


def print_table(headers: list[str], rows: list[list], stream=None) -> None:
    """Rows under their headers: a rich table on a terminal, aligned plain text otherwise
    (what scripts parse). A cell is one line: a newline in a subject does not start a row."""
    stream = stream or sys.stdout
    cells = [["" if c is None else escape(str(c)) for c in row] for row in rows]
    console = terminal(stream)
    if console is not None:
        from rich import box
        from rich.table import Table
        from rich.text import Text
        table = Table(*[str(h) for h in headers], box=box.SIMPLE_HEAD, header_style="bold")
        for row in cells:
            table.add_row(*(Text(c) for c in row))  # Text: a "[red]" in a subject stays text
        console.print(table)
        return
    lines = [[str(h) for h in headers]] + cells
    widths = [max(len(row[i]) for row in lines) for i in range(len(headers))]
    for n, row in enumerate(lines):
        stream.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if n == 0:
            stream.write("  ".join("-" * w for w in widths) + "\n")


class Progress:
    """How far a long command has got: a rich progress bar on a terminal; elsewhere (a log
    file, a pipe) one line per tenth of the way, so the output stays short."""

    WIDTH = 30

    def __init__(self, stream, unit: str = "msg"):
        self.stream, self.unit = stream, unit
        self.console = terminal(stream)
        self.total = self.done = 0
        self.started = time.monotonic()
        self._bar = self._task = None
        self._last_tenth = -1

    def note(self, text: str) -> None:
        self.stream.write(escape(text) + "\n")
        self.stream.flush()

    def start(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        if self.console is not None and total:
            from rich.progress import (BarColumn, MofNCompleteColumn, TaskProgressColumn,
                                       TextColumn, TimeRemainingColumn)
            from rich.progress import Progress as Bar
            self._bar = Bar(BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[detail]}"), TimeRemainingColumn(),
                            console=self.console)
            self._task = self._bar.add_task("", total=total, detail="")
            self._bar.start()

    def advance(self, count: int, detail: str = "") -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(self._task, advance=count, detail=escape(detail))
            return
        share = self.done / self.total if self.total else 1.0
        if int(share * 10) == self._last_tenth:
            return
        self._last_tenth = int(share * 10)
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        filled = int(self.WIDTH * share)
        self.stream.write(f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                          f"({share:4.0%}) {escape(detail)}, {rate:.0f} {self.unit}/s\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self.stream.flush()
