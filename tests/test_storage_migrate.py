"""`mailferry storage migrate`: folders to a real S3-compatible server (SeaweedFS), killed
midway and resumed. Every object ends there once, checked against its hash; the folder
installation serves every message until the end; a damaged object is reported, not copied."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time
from collections import Counter

from devstack import mailgen
from devstack.consumers import ROOT, settings_env
from mailferry.models import EmailMessage
from mailferry.spool import envelope_record
from mailferry.storage import Blob, BlobStore, FolderStore
from mailferry.storage_migrate import migrate, plan
from mailferry.users import add_user
from tests.pipeline import wait_for
from tests.test_api import store

MESSAGES = 150  # each with an attachment of its own: 300 objects, and one shared logo


def _fill(settings, tmp_path) -> None:
    bob = add_user("bob@example.org")
    logo = b"\x89PNG logo" * 50
    raws = [mailgen.with_attachment(n, f"doc-{n}.bin", f"document {n}".encode() * 40)
            for n in range(MESSAGES)]
    raws.append(mailgen.with_attachment(MESSAGES, "logo.png", logo))
    raws.append(mailgen.with_attachment(MESSAGES + 1, "logo.png", logo))  # the same logo again
    store(settings, raws, bob)
    legacy = mailgen.plain(MESSAGES + 2)  # stored before 2026-12-06: linked from its spool file
    spooled = tmp_path / "spooled.eml"
    spooled.write_bytes(envelope_record(b'{"queue_id":"OLD","rcpt_to":["bob@example.org"]}') + legacy)
    store(settings, [legacy], bob, [spooled])
    row = EmailMessage.get(EmailMessage.message_id == f"<test-{MESSAGES + 2}@example.net>")
    folder = BlobStore.of(settings)
    (folder.root / row.raw_path).write_bytes(spooled.read_bytes())  # as the old hard link was


def _settled_count(target: BlobStore) -> int:
    """How many objects the target holds once the server has finished the PUTs the killed
    client had already sent (counted at once, a late one made the resumed run's figure
    differ by one)."""
    count = len(list(target.keys()))
    while True:
        time.sleep(1)
        again = len(list(target.keys()))
        if again == count:
            return count
        count = again


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mailferry.cli", "storage", "migrate", *args]


def test_a_migration_killed_midway_resumes_and_every_object_arrives_once(
        sqlite_settings, s3_prefix, tmp_path):
    settings = sqlite_settings
    _fill(settings, tmp_path)
    folder = BlobStore.of(settings)
    objects = sorted(folder.keys())
    assert len(objects) == MESSAGES * 2 + 2 + 1 + 1  # raws, attachments, the logo once, the legacy raw
    s3_settings = settings.replace(**s3_prefix)
    target = BlobStore.of(s3_settings)
    env = {**settings_env(settings), **{f"MAILFERRY_{k.upper()}": v for k, v in s3_prefix.items()
                                        if k != "storage_url"}}
    url = s3_prefix["storage_url"]

    first = subprocess.Popen(_cli("--to", url, "--rate", "100"), env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: first.poll() is not None or len(list(target.keys())) >= 80, timeout=60,
                 message="the first run's first objects")
        assert first.poll() is None, first.stdout.read()
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait(10)
    there = _settled_count(target)
    assert 80 <= there < len(objects), "killed midway"
    # The installation still reads every object from its folders.
    for row in EmailMessage.select():
        assert hashlib.sha256(folder.read_raw(row.raw_path)).hexdigest() == row.sha256

    second = subprocess.run(_cli("--to", url), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(objects)} objects, {there} there already" in second.stdout
    copied = int(re.search(r"copied (\d+);", second.stdout).group(1))
    assert copied == len(objects) - there  # nothing written twice
    assert "in neither store 0" in second.stdout

    keys = list(target.keys())
    assert Counter(keys) == Counter(objects)  # every object once
    for key in keys:
        data = target.read(key)
        assert hashlib.sha256(data).hexdigest() == BlobStore.sha256_of_key(key)
    for row in EmailMessage.select():  # the legacy source arrived as its message alone
        assert hashlib.sha256(target.read_raw(row.raw_path)).hexdigest() == row.sha256

    third = subprocess.run(_cli("--to", url, "--quiet"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and f"{len(objects)} there already" in third.stdout
    assert "copied 0;" in third.stdout


def test_an_object_that_does_not_hash_to_its_name_is_reported_and_not_copied(tmp_path):
    source, target = FolderStore(tmp_path / "from"), FolderStore(tmp_path / "to")
    [(good, _), (bad, _)] = source.put_many([Blob(b"sound"), Blob(b"will rot")])
    (source.root / bad).write_bytes(b"rotted")
    todo, present = plan(source, target)
    assert (sorted(todo), present) == (sorted([good, bad]), 0)
    summary = migrate(source, target, todo)
    assert (summary.copied, summary.damaged) == (1, [bad])
    assert list(target.keys()) == [good]

