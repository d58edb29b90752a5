"""Benchmark: Mailferry's IMAP first sync and empty incremental runs, against Dovecot.

One run, on a throwaway Dovecot (devstack/) with a 5,000-message folder of the benchmark
mix: (1) the fetch ceiling — the folder fetched raw with imapclient (BODY.PEEK[]) in batches
of 500, login to logout; (2) the parse ceiling — the parse-only rate of the same messages, as
the server returned them, in one process; (3) Mailferry's first sync of the folder as
`mailferry fetch` runs it (a RUNNING task; fetch, parse, store, commit, checkpoint, counts and
a log line per batch) into a fresh database; then
(4) the time of an incremental run with nothing new, at 100 and at 5,000 messages — both the
IMAP work (connect to logout) and the whole run (with the checkpoint write).

Goals: first sync ≥ 0.8 × the smaller ceiling; an empty incremental run under 20 ms of IMAP
work, and no slower at 5,000 messages than at 100 (ratio ≤ 1.5).

    .venv/bin/python bench/imap_sync.py [--count 5000] [--small 100] [--runs 30] [--rounds 3]
                                        [--batch-size N] [--postgres]

Rounds alternate the ceilings and a first sync (each into a fresh database); the goal is
judged on the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, message_mix, percentile

from imapclient import IMAPClient

from consumer.imap_sync import MailboxSync
from consumer.imap_worker import run_fetch_task
from mailread.parse import parse_email
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry import metrics, tasks
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import EmailMessage, TaskSource, TaskStatus, User
from devstack.dovecot import DovecotServer

PASSWORD = "bench-password"
CEILING_BATCH = 500


def login(server: DovecotServer, username: str) -> IMAPClient:
    client = IMAPClient(server.host, server.port, ssl=False, timeout=60)
    client.login(username, PASSWORD)
    return client


def seed(server: DovecotServer, username: str, messages: list[bytes]) -> None:
    client = login(server, username)
    try:
        for start in range(0, len(messages), 200):
            client.multiappend("INBOX", messages[start:start + 200])
    finally:
        client.logout()


def fetch_ceiling(server: DovecotServer, username: str) -> tuple[float, list[bytes]]:
    """(messages per second, the raw messages) of a plain imapclient fetch, login to logout."""
    started = time.perf_counter()
    client = login(server, username)
    client.select_folder("INBOX", readonly=True)
    uids = client.search(["ALL"])
    served: list[bytes] = []
    for start in range(0, len(uids), CEILING_BATCH):
        response = client.fetch(uids[start:start + CEILING_BATCH], [b"BODY.PEEK[]"])
        served.extend(data[b"BODY[]"] for data in response.values())
    client.logout()
    return len(served) / (time.perf_counter() - started), served


def parse_ceiling(messages: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in messages:
        try:
            parse_email(raw)
        except Exception:  # noqa: BLE001 - an unparseable message still costs its parse
            pass
    return len(messages) / (time.perf_counter() - started)


def first_sync(var_dir: Path, database_url: str, server: DovecotServer,
               args) -> tuple[float, object, Settings]:
    """Mailferry's first sync of "big" into a fresh database: (msg/s, SyncResult, settings)."""
    settings = Settings(var_dir=var_dir, database_url=database_url,
                        imap_batch_size=args.batch_size)
    settings.var_dir.mkdir(parents=True)
    open_database(settings.resolved_database_url)
    configs = EmailConfigManager(settings)
    users = {}
    for name in ("big", "small"):
        users[name] = User.create(email=f"{name}@example.org")
        configs.set_imap_config(users[name], {
            "host": server.host, "port": server.port, "username": name,
            "password": PASSWORD, "security": "none"})
    # As `mailferry fetch` runs it: a task, RUNNING, counts and log lines per batch.
    task = tasks.create_task(TaskSource.IMAP, users["big"].id)
    tasks.start_task(task.task_id)
    results = []
    sync = MailboxSync(settings, parse_in_helper=not args.no_helper)
    parse_before = metrics.parse_seconds._sum.get()
    cpu_before, started = time.process_time(), time.perf_counter()
    status = run_fetch_task(task, None, sync=sync, configs=configs,
                            progress=lambda result, delta: results.append(result))
    elapsed = time.perf_counter() - started  # the helper process's start included
    cpu = time.process_time() - cpu_before
    sync.close()
    parsing = metrics.parse_seconds._sum.get() - parse_before
    print(f"  first sync: {elapsed:.1f} s; CPU of this process {cpu:.1f} s (all its threads), "
          f"parsing {parsing:.1f} s ({'in the helper' if sync.parse_pool else 'in this process'}"
          f", busy {100 * parsing / elapsed:.0f} % of the sync); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    result = results[-1]
    result.parser_busy = parsing / elapsed
    assert status == TaskStatus.COMPLETED, tasks.get_task(task.task_id).error_message
    assert EmailMessage.select().where(EmailMessage.user == users["big"]).count() + \
        result.failed + result.duplicates == args.count, "messages missing after the first sync"
    result.seconds = elapsed
    return result.fetched / elapsed, result, settings


def empty_runs(sync: MailboxSync, user: User, configs: EmailConfigManager,
               runs: int) -> tuple[list[float], list[float], list[float]]:
    """(IMAP seconds, whole-run seconds, IMAP seconds after login) of ``runs`` incremental
    runs with nothing new."""
    imap, whole, after_login = [], [], []
    config = configs.get_imap_config(user)
    sync.run(user, config)  # warm: the first connection of a user starts its processes
    for _ in range(runs):
        result = sync.run(user, config)
        assert result.fetched == 0, "an empty run fetched something"
        imap.append(result.imap_seconds)
        whole.append(result.seconds)
        after_login.append(result.imap_seconds - result.connect_seconds)
    return imap, whole, after_login


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:.1f} ms, "
            f"p90 {percentile(values, 90) * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--runs", type=int, default=30, help="empty runs timed per size")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ceilings + first sync")
    parser.add_argument("--batch-size", type=int, default=Settings.imap_batch_size,
                        help="Mailferry's imap_batch_size (default: the setting's default)")
    parser.add_argument("--postgres", action="store_true",
                        help="a throwaway PostgreSQL instead of SQLite (a fresh database per round)")
    parser.add_argument("--no-helper", action="store_true",
                        help="parse in the syncing process (no parser helper process)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="mf-bench-imap-"))
    server = DovecotServer(base / "dovecot", {"big": PASSWORD, "small": PASSWORD}, ssl=False)
    postgres = None
    try:
        server.start()
        if args.postgres:
            from devstack.postgres import PostgresServer
            postgres = PostgresServer(base / "postgres").start()
        print(f"machine: {machine()}; Dovecot on {server.host}:{server.port}")
        t0 = time.perf_counter()
        seed(server, "big", message_mix(args.count, seed=11))
        seed(server, "small", message_mix(args.small, seed=13))
        print(f"seeded {args.count} + {args.small} messages in {time.perf_counter() - t0:.1f} s")

        fetch_ceiling(server, "big")  # warm Dovecot's index and the page cache
        rounds = []
        for number in range(1, args.rounds + 1):
            # Ceilings and sync alternate, so a busy machine slows all three alike.
            fetch_rate, served = fetch_ceiling(server, "big")
            parse_rate = parse_ceiling(served)
            print(f"  ceilings: fetch {fetch_rate:,.0f} msg/s, parse {parse_rate:,.0f} msg/s; "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
            database_url = postgres.create_database(f"bench_imap_{number}") if postgres else ""
            sync_rate, result, settings = first_sync(base / f"var{number}", database_url, server, args)
            rounds.append((fetch_rate, parse_rate, sync_rate, result.parser_busy))
            size_mb = sum(len(m) for m in served) / 1e6
            print(f"round {number}: fetch ceiling {fetch_rate:,.0f} msg/s ({len(served)} messages, "
                  f"{size_mb:.1f} MB, batches of {CEILING_BATCH}); parse ceiling "
                  f"{parse_rate:,.0f} msg/s; first sync {sync_rate:,.0f} msg/s ({result.saved} "
                  f"saved, {result.failed} failed, {result.seconds:.1f} s, IMAP wait "
                  f"{result.imap_seconds:.1f} s) = {sync_rate / min(fetch_rate, parse_rate):.2f} "
                  f"× the smaller ceiling", flush=True)
            if number < args.rounds:
                close_database()
        fetch_rate, parse_rate, first_rate, busy = (statistics.median(r[i] for r in rounds) for i in range(4))
        first_ratio = statistics.median(r[2] / min(r[0], r[1]) for r in rounds)
        print(f"medians of {args.rounds}: fetch ceiling {fetch_rate:,.0f} msg/s, parse ceiling "
              f"{parse_rate:,.0f} msg/s, first sync {first_rate:,.0f} msg/s "
              f"(batches of {args.batch_size}, "
              f"{'parsed in-process' if args.no_helper else 'parser helper process'}, "
              f"{settings.resolved_database_url.split(':')[0]}); the parser busy "
              f"{100 * busy:.0f} % of the sync (goal ≥ 90 %)")

        configs = EmailConfigManager(settings)
        users = {name: User.get(User.email == f"{name}@example.org") for name in ("big", "small")}
        sync = MailboxSync(settings)
        sync.run(users["small"], configs.get_imap_config(users["small"]))

        imap_small, whole_small, rest_small = empty_runs(sync, users["small"], configs, args.runs)
        imap_big, whole_big, rest_big = empty_runs(sync, users["big"], configs, args.runs)
        print(f"empty run at {args.small}: IMAP {ms(imap_small)} (after login {ms(rest_small)}); "
              f"whole run {ms(whole_small)}")
        print(f"empty run at {args.count}: IMAP {ms(imap_big)} (after login {ms(rest_big)}); "
              f"whole run {ms(whole_big)}")

        ratio = statistics.median(imap_big) / statistics.median(imap_small)
        goals = [
            ("first sync ≥ 0.8 × smaller ceiling (median of rounds)", first_ratio, first_ratio >= 0.8),
            ("parser busy during the first sync ≥ 90 % (median)", 100 * busy, busy >= 0.9),
            ("empty run IMAP work < 20 ms (median at the larger size)",
             statistics.median(imap_big) * 1000, statistics.median(imap_big) < 0.020),
            (f"empty run {args.count} / {args.small} ≤ 1.5", ratio, ratio <= 1.5),
        ]
        print()
        for name, value, ok in goals:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f}")
        close_database()
        return 0 if all(ok for _, _, ok in goals) else 1
    finally:
        server.close()
        if postgres is not None:
            postgres.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
