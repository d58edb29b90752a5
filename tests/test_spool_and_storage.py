"""mailferry.spool and mailferry.storage: safe paths, durable writes, content addressing."""

from __future__ import annotations

import hashlib
import re

import pytest

from consumer.save import safe_filename
from mailferry.errors import ContractError
from mailferry.spool import Spool, SpoolEntry, envelope_record
from mailferry.storage import Blob, BlobStore, FolderStore


@pytest.mark.parametrize("relative", [
    "../../etc/passwd", "/etc/passwd", "incoming/../../x.eml", "", "incoming/\x00.eml"])
def test_spool_refuses_paths_outside_its_root(tmp_path, relative):
    spool = Spool(tmp_path / "spool").ensure()
    with pytest.raises(ContractError):
        spool.resolve(relative)


def test_spool_refuses_a_symlink_that_leads_outside(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    (spool.incoming / "evil.eml").symlink_to("/etc/passwd")
    with pytest.raises(ContractError):
        spool.resolve("incoming/evil.eml")


def test_spool_refuses_files_of_an_incoming_folder_that_leads_outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.eml").write_bytes(b"raw message")
    spool = Spool(tmp_path / "spool")
    spool.root.mkdir()
    spool.incoming.symlink_to(outside)
    with pytest.raises(ContractError):
        spool.resolve("incoming/x.eml")


def test_write_incoming_and_quarantine_keep_the_message_and_a_reason(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    queue_id, relative = spool.write_incoming(b"raw message")
    path = spool.resolve(relative)
    assert path.read_bytes() == b"raw message"
    target = spool.quarantine(path, "too big")
    assert not path.exists()
    assert target.read_bytes() == b"raw message"
    assert target.with_name(target.name + ".reason").read_text().strip().endswith("too big")
    assert list(spool.incoming.iterdir()) == []


def test_blobs_are_named_by_hash_and_stored_once(tmp_path):
    store = FolderStore(tmp_path / "storage")
    first, digest = store.put(b"hello")
    again, _ = store.put(b"hello")
    assert first == again and re.fullmatch(rf"parts/\d{{4}}-\d\d-\d\d/{digest}", first)
    assert store.read(first) == b"hello"
    assert [p.name for p in (tmp_path / "storage").rglob("*") if p.is_file()] == [digest]


@pytest.mark.parametrize("name,expected", [
    ("../../../etc/x", "x"),
    ("..\\..\\boot.ini", "boot.ini"),
    ("report.pdf", "report.pdf"),
    ("", "attachment-1.pdf"),
    ("....", "attachment-1.pdf"),
    ("a\x00b\r\nc.txt", "abc.txt"),
    ("Картинка.png", "Картинка.png"),
])
def test_safe_filename_has_no_path_and_no_control_characters(name, expected):
    assert safe_filename(name, 0, "application/pdf") == expected


def test_safe_filename_is_bounded():
    name = safe_filename("x" * 500 + ".pdf")
    assert name.endswith(".pdf") and len(name.encode()) <= 200 and "/" not in name


def test_a_spool_file_is_stored_as_its_message_alone(tmp_path):
    # The spool file begins with the envelope record, whose RCPT list is the whole
    # transaction's (Bcc included): what is stored is the message after it, its own file.
    store = FolderStore(tmp_path / "storage")
    source = tmp_path / "spool.eml"
    record = envelope_record(b'{"rcpt_to":["alice@example.org","bcc@example.org"]}')
    source.write_bytes(record + b"Subject: hi\r\n\r\nraw message\r\n")
    message = b"Subject: hi\r\n\r\nraw message\r\n"
    digest = hashlib.sha256(message).hexdigest()
    [(relative, _)] = store.put_many([Blob(None, digest, SpoolEntry(source, "spool"), raw=True)])
    assert relative.startswith("raw/") and relative.endswith(f"/{digest}.eml")
    stored = (store.root / relative)
    assert stored.read_bytes() == message
    assert stored.stat().st_ino != source.stat().st_ino  # not a second name of the spool file
    source.unlink()  # the spool file goes after the commit; the stored copy stays
    assert store.read(relative) == message == store.read_raw(relative)
    assert list((tmp_path / "storage").rglob(".tmp-*")) == []


def test_a_raw_source_linked_before_still_reads_as_its_message(tmp_path):
    # Installations older than 2026-12-06 hold raw sources linked from spool files.
    store = FolderStore(tmp_path / "storage")
    record = envelope_record(b'{"rcpt_to":["alice@example.org"]}')
    key = f"raw/2026-12-01/{hashlib.sha256(b'Subject: old').hexdigest()}.eml"
    old = store.root / key
    old.parent.mkdir(parents=True)
    old.write_bytes(record + b"Subject: old\r\n\r\nbody\r\n")
    assert store.read_raw(key) == b"Subject: old\r\n\r\nbody\r\n"
    assert store.open_raw(key).size == len(b"Subject: old\r\n\r\nbody\r\n")
    assert store.read(key).startswith(record)  # the file as it lies, for whoever copies it


def test_a_key_that_could_leave_the_store_is_not_opened(tmp_path):
    store = FolderStore(tmp_path / "storage")
    (tmp_path / "secret").write_bytes(b"not mail")
    for key in ("../secret", "/etc/passwd", "raw/2026-12-01/../../../secret", "ab/cd/x"):
        with pytest.raises(FileNotFoundError):
            store.open(key)


def test_a_source_stored_before_is_not_written_again(tmp_path):
    store = FolderStore(tmp_path / "storage")
    digest = hashlib.sha256(b"raw message").hexdigest()
    first, second = tmp_path / "first.eml", tmp_path / "second.eml"
    first.write_bytes(b"raw message")
    second.write_bytes(b"raw message")
    [(relative, _)] = store.put_many([Blob(None, digest, SpoolEntry(first, "q"), raw=True)])
    written = (store.root / relative).stat().st_ino
    # A redelivery: the same bytes under the same name, whatever file they come from now.
    assert store.put_many([Blob(None, digest, SpoolEntry(second, "q"), raw=True),
                           Blob(None, digest, SpoolEntry(second, "q"), raw=True)]) == [(relative, digest)] * 2
    assert (store.root / relative).stat().st_ino == written


def _record_disk_steps(monkeypatch, fail_fsync_of: int | None = None) -> list[tuple]:
    """Log fsyncs (of files, by their content), renames and folder fsyncs, in order."""
    import os

    import mailferry.storage as storage

    steps: list[tuple] = []
    real_fsync, real_replace, real_fsync_dir = os.fsync, os.replace, storage.fsync_dir

    def fsync(fd):
        try:
            content = os.pread(fd, 64, 0)
        except IsADirectoryError:  # a folder's fsync: fsync_dir logs it
            return real_fsync(fd)
        if fail_fsync_of is not None and len([s for s in steps if s[0] == "fsync"]) == fail_fsync_of:
            raise OSError(5, "Input/output error")
        real_fsync(fd)
        steps.append(("fsync", content))

    def replace(src, dst):
        real_replace(src, dst)
        steps.append(("rename", os.path.basename(dst)))

    def fsync_dir(folder):
        real_fsync_dir(folder)
        steps.append(("fsync_dir", str(folder)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(storage, "fsync_dir", fsync_dir)
    return steps


def test_a_batch_is_durable_before_its_names_and_its_folders_after_them(tmp_path, monkeypatch):
    store = FolderStore(tmp_path / "storage", sync="fsync")
    source = tmp_path / "spool.eml"
    source.write_bytes(b"raw message")
    raw_digest = hashlib.sha256(b"raw message").hexdigest()
    steps = _record_disk_steps(monkeypatch)
    results = store.put_many([Blob(None, raw_digest, SpoolEntry(source, "q"), raw=True), Blob(b"first file"),
                              Blob(b"second file")])
    files = [hashlib.sha256(data).hexdigest() for data in (b"first file", b"second file")]
    assert [r[1] for r in results] == [raw_digest] + files
    # Every file's contents, the raw source's included, are on disk before any gets its
    # final name …
    assert steps[:3] == [("fsync", b"raw message"), ("fsync", b"first file"),
                         ("fsync", b"second file")]
    assert steps[3:6] == [("rename", f"{raw_digest}.eml"), ("rename", files[0]), ("rename", files[1])]
    # … and then every folder that changed is fsynced, the deepest first.
    folders = [s[1] for s in steps[6:]]
    assert all(kind == "fsync_dir" for kind, _ in steps[6:])
    root = str(tmp_path / "storage")
    expected = {root, f"{root}/raw", (store.root / results[0][0]).parent.as_posix()}
    expected |= {f"{root}/parts", (store.root / results[1][0]).parent.as_posix()}
    assert set(folders) == expected
    depths = [f.count("/") for f in folders]
    assert depths == sorted(depths, reverse=True)


def test_a_failed_fsync_leaves_no_temporary_and_no_final_name(tmp_path, monkeypatch):
    store = FolderStore(tmp_path / "storage", sync="fsync")
    _record_disk_steps(monkeypatch, fail_fsync_of=1)  # the second file's fsync fails
    with pytest.raises(OSError):
        store.put_many([Blob(b"first file"), Blob(b"second file")])
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []


def _with_syncfs_logged(store: BlobStore, monkeypatch, fail: bool = False) -> list[tuple]:
    """The steps of ``store``'s batch: each syncfs (with the files under the root then, by
    their content) and each rename; nothing of the per-file path may run."""
    import os

    import mailferry.storage as storage

    assert store._syncfs is not None, "this Linux's syncfs reports errors (5.8 and later)"
    steps: list[tuple] = []
    real_syncfs, real_replace = store._syncfs, os.replace

    def syncfs(fd):
        if fail:
            raise OSError(5, "Input/output error")
        real_syncfs(fd)
        steps.append(("syncfs", sorted(p.read_bytes() for p in store.root.rglob("*") if p.is_file())))

    def replace(src, dst):
        real_replace(src, dst)
        steps.append(("rename", os.path.basename(dst)))

    def refused(*_):
        raise AssertionError("a per-file fsync on the syncfs path")

    monkeypatch.setattr(store, "_syncfs", syncfs)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", refused)
    monkeypatch.setattr(storage, "fsync_dir", refused)
    return steps


def test_with_syncfs_a_batch_has_two_barriers_contents_then_names(tmp_path, monkeypatch):
    store = FolderStore(tmp_path / "storage")  # auto: syncfs on this Linux
    steps = _with_syncfs_logged(store, monkeypatch)
    results = store.put_many([Blob(b"raw message", raw=True), Blob(b"first file"), Blob(b"second file")])
    names = [f"{results[0][1]}.eml", results[1][1], results[2][1]]
    contents = sorted([b"raw message", b"first file", b"second file"])
    # One barrier while every file still has its temporary name, then the renames, then one
    # barrier for the names and the folders: two journal commits for the whole batch.
    assert steps == [("syncfs", contents), *[("rename", name) for name in names], ("syncfs", contents)]
    assert [store.read(relative) for relative, _ in results] == [b"raw message", b"first file", b"second file"]


def test_a_failed_syncfs_leaves_no_temporary_and_no_final_name(tmp_path, monkeypatch):
    store = FolderStore(tmp_path / "storage")
    _with_syncfs_logged(store, monkeypatch, fail=True)
    with pytest.raises(OSError):
        store.put_many([Blob(b"first file"), Blob(b"second file")])
    assert [p for p in (tmp_path / "storage").rglob("*") if p.is_file()] == []
