"""Shared pieces of the benchmarks: the message mix, a throwaway RabbitMQ, timing helpers."""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailferry.inject import Injector  # noqa: E402
from mailferry.users import add_user  # noqa: E402
from mailferry.config import Settings  # noqa: E402
from mailferry.db import close_database, open_database  # noqa: E402
from devstack import mailgen  # noqa: E402
from devstack.consumers import wait_consuming  # noqa: E402,F401 - for the benchmarks


def message_mix(count: int, to: str = "bob@example.org", seed: int = 7) -> list[bytes]:
    """Plain, text+HTML, a tenth with 20–200 KB attachments, some GBK, KOI8-R, ISO-2022-JP."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        kind = n % 10
        if kind == 0:
            size = rng.randint(20_000, 200_000)
            out.append(mailgen.with_attachment(n, f"file-{n}.bin", rng.randbytes(size), to=to))
        elif kind in (1, 2, 3):
            out.append(mailgen.text_and_html(n, to=to))
        elif kind == 4:
            out.append(mailgen.national(n, "gb2312", "中文邮件测试，这是第%d封信。" % n * 5, to=to))
        elif kind == 5:
            out.append(mailgen.national(n, "koi8-r", "Привет! Это письмо номер %d. " % n * 5, to=to))
        elif kind == 6:
            out.append(mailgen.national(n, "iso-2022-jp", "日本語のメールです。番号%d。" % n * 5, to=to))
        else:
            out.append(mailgen.plain(n, to=to))
    return out


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of ``pid`` and every process below it (a parser process too)."""
    total = 0.0
    for member in [pid] + descendants(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def machine() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"


__all__ = ["message_mix", "percentile", "peak_rss_mb", "machine", "statistics", "ROOT"]


# -- a backlog for consumers to drain --------------------------------------------------------


def inject_backlog(settings: Settings, messages: list[bytes], rcpt: str = "bob@example.org") -> None:
    """A fresh database under ``settings.var_dir`` with one user, and ``messages`` injected
    for it exactly as the Haraka plugin hands mail over (spool file + published job)."""
    settings.var_dir.mkdir(parents=True)
    open_database(settings.resolved_database_url)
    add_user(rcpt)
    injector = Injector(settings)
    for raw in messages:
        injector.inject(raw, [rcpt])
    injector.close()


def stop_consumers(processes: list) -> None:
    """SIGTERM every consumer, wait for each, and close this process's database."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(60)
    close_database()
