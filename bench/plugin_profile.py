"""Where the plugin's time goes: one Haraka with the mailferry plugin, run under Node's
``--cpu-prof`` while smtp-source sends a workload, on a throwaway RabbitMQ.

Prints three views of the same round:
- CPU per accepted message by thread of Haraka's process (the event loop, the spool writer
  threads, libuv's pool, V8's helpers) and RabbitMQ's, from /proc;
- the event loop's profile, self time grouped by where the code lives (the plugin, amqplib,
  Haraka, Node's own modules, garbage collection), and the plugin's heaviest functions;
- the plugin's own step times (its shutdown log line): mean ms from the queue hook to the
  message read, spooled (written, fsynced, renamed), confirmed by RabbitMQ, its folder
  fsynced, and answered.

    .venv/bin/python bench/plugin_profile.py [--messages 4000] [--sessions 16] [--workload persistent|connection]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from smtp_ingest import CLOCK_TICKS, RCPT, WORKLOADS, clear_backlog, smtp_source

from mailferry import broker
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.users import add_user
from devstack.haraka import HarakaServer
from devstack.rabbitmq import RabbitMQServer


class ProfiledHaraka(HarakaServer):
    """Haraka started by `node --cpu-prof` (not allowed in NODE_OPTIONS): the profile is
    written when it exits on stop()'s SIGINT."""

    def __init__(self, profiles: Path, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.profiles = profiles

    @property
    def command(self) -> list[str]:
        return [shutil.which("node") or "node", "--cpu-prof", f"--cpu-prof-dir={self.profiles}",
                *super().command]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name of one process (threads of one name summed)."""
    out: dict[str, float] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = "event loop" if task.name == str(pid) else stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat.rsplit(")", 1)[1].split()
        out[re.sub(r"\d+$", "", name)] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return out


def where(url: str, function: str) -> str:
    if function in ("(garbage collector)", "(program)", "(idle)", "(root)"):
        return function
    if "haraka_plugin/mailferry.js" in url or "haraka-plugin-mailferry/mailferry.js" in url:
        return "plugin: mailferry.js"
    if "spool_writer.js" in url:
        return "plugin: spool_writer.js"
    if "/amqplib/" in url:
        return "amqplib"
    if "/node_modules/" in url:
        return "Haraka and its modules"
    if url.startswith("node:") or not url:
        return "Node (its own modules, native)"
    return "other"


def profile_summary(path: Path, top: int = 25) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self time per place and the plugin's heaviest functions, as fractions of the samples."""
    profile = json.loads(path.read_text())
    nodes = {node["id"]: node for node in profile["nodes"]}
    counts = collections.Counter(profile["samples"])
    total = sum(counts.values()) or 1
    places: dict[str, float] = collections.Counter()
    functions: dict[str, float] = collections.Counter()
    for node_id, n in counts.items():
        frame = nodes[node_id]["callFrame"]
        place = where(frame.get("url", ""), frame["functionName"])
        places[place] += n / total
        if place not in ("(idle)", "(root)"):
            name = f"{frame['functionName'] or '(anonymous)'} ({Path(frame['url']).name}:{frame['lineNumber'] + 1})"
            functions[name] += n / total
    return places, functions.most_common(top)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--workload", choices=("persistent", "connection"), default="persistent")
    parser.add_argument("--queue", default="mailferry", help="queue plugin (queue/discard: the reference)")
    args = parser.parse_args()
    workload = WORKLOADS[1] if args.workload == "persistent" else WORKLOADS[0]

    with tempfile.TemporaryDirectory(prefix="mf-plugin-profile-") as tmp:
        base = Path(tmp)
        profiles = base / "profiles"
        rabbit = RabbitMQServer(base / "rabbitmq").start()
        server = None
        try:
            settings = Settings(var_dir=base / "var", amqp_url=rabbit.amqp_url,
                                consumer_metrics_port=0, scheduler_metrics_port=0)
            settings.var_dir.mkdir(parents=True)
            open_database(settings.resolved_database_url)
            add_user(RCPT)
            broker.setup_topology(settings)
            server = ProfiledHaraka(profiles, base / "plugin", settings.amqp_url,
                                    settings.resolved_spool_dir, queue_plugin=args.queue).start()
            if args.queue == "mailferry":
                server.wait_connected()
            smtp_source(server, workload, 500, args.sessions)  # warm up
            clear_backlog(settings)
            pid, beam = server.process.pid, rabbit.beam_pid()
            before, beam_before = thread_cpu(pid), thread_cpu(beam)
            rate = smtp_source(server, workload, args.messages, args.sessions)
            after, beam_after = thread_cpu(pid), thread_cpu(beam)
            clear_backlog(settings)
        finally:
            if server is not None:
                server.stop()
            close_database()
            rabbit.stop()
        log = server.log_path.read_text(errors="replace") if server is not None else ""
        steps = re.findall(r"\[mailferry\] (\d+ messages accepted; .*)", log)
        # The event loop's profile is the largest (worker threads write small ones too).
        main_profile = max(profiles.glob("*.cpuprofile"), key=lambda p: p.stat().st_size)
        places, functions = profile_summary(main_profile)

    per_message = lambda a, b, name: (b.get(name, 0) - a.get(name, 0)) * 1000 / args.messages  # noqa: E731
    print(f"{args.queue} profile — {workload.name}, {args.messages} messages over {args.sessions} sessions: "
          f"{rate:.0f} msg/s")
    print("CPU ms per accepted message, by thread:")
    for name in sorted(set(after) | set(before), key=lambda n: -per_message(before, after, n)):
        if per_message(before, after, name) >= 0.005:
            print(f"  Haraka {name:24} {per_message(before, after, name):6.3f}")
    print(f"  Haraka, all threads            {sum(after.values()) * 1000 / args.messages - sum(before.values()) * 1000 / args.messages:6.3f}")
    print(f"  RabbitMQ, all threads          {(sum(beam_after.values()) - sum(beam_before.values())) * 1000 / args.messages:6.3f}")
    print("event loop profile, self time (whole run, warm-up included):")
    for place, share in sorted(places.items(), key=lambda kv: -kv[1]):
        print(f"  {place:34} {share:6.1%}")
    print("heaviest functions (self time):")
    for name, share in functions:
        print(f"  {name:60} {share:6.1%}")
    print("plugin steps:", steps[-1] if steps else "(no summary logged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
