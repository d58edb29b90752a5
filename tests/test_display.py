"""The CLI's tables and progress: rich on a terminal, plain text elsewhere, mail text escaped
in both (mailferry.display)."""

from __future__ import annotations

import io
import os
import pty

from mailferry.display import Progress, print_table

HOSTILE = ["[red]not markup[/red]", "evil\x1b]0;title\x07", "gpj.\u202eexe"]


class Terminal:
    """A pseudo-terminal: what is written to ``stream`` is read back from the other end."""

    def __init__(self):
        self.master, slave = pty.openpty()
        self.stream = os.fdopen(slave, "w", encoding="utf-8")

    def output(self) -> str:
        self.stream.flush()
        os.set_blocking(self.master, False)
        chunks = []
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def close(self):
        self.stream.close()
        os.close(self.master)


def test_a_table_on_a_terminal_is_rich_and_its_cells_stay_text():
    term = Terminal()
    try:
        print_table(["ID", "SUBJECT"], [[1, s] for s in HOSTILE], stream=term.stream)
        out = term.output()
    finally:
        term.close()
    assert "─" in out  # rich's rule under the headers, not the plain dashes
    assert "[red]not markup[/red]" in out  # markup in a subject is printed, not obeyed
    assert "evil\\x1b]0;title\\x07" in out and "\x07" not in out
    assert "\\u202e" in out and "\u202e" not in out


def test_a_table_elsewhere_is_plain_aligned_text():
    out = io.StringIO()
    print_table(["ID", "SUBJECT"], [[1, "hello"], [22, "line\nbreak"]], stream=out)
    assert out.getvalue().splitlines() == ["ID  SUBJECT", "--  -----------", "1   hello",
                                           "22  line\\nbreak"]


def test_progress_on_a_terminal_is_a_bar():
    term = Terminal()
    try:
        progress = Progress(term.stream)
        progress.start(10)
        progress.advance(3, "saved 3, failed 0")
        progress.close()
        out = term.output()
    finally:
        term.close()
    assert "3/10" in out and "saved 3, failed 0" in out


def test_progress_elsewhere_is_a_line_per_tenth():
    out = io.StringIO()
    progress = Progress(out)
    progress.start(100)
    for _ in range(100):
        progress.advance(1, "saved")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 1 %, 10 %, 20 %, …, 100 %
    assert lines[-1].startswith("[" + "#" * 30 + "] 100/100")
