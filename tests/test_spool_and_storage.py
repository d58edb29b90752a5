"""mailferry.spool and mailferry.storage: safe paths, durable writes, content addressing."""

from __future__ import annotations

import hashlib

import pytest

from consumer.save import safe_filename
from mailferry.errors import ContractError
from mailferry.spool import Spool
from mailferry.storage import Blob, BlobStore


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
    store = BlobStore(tmp_path / "storage")
    first, digest = store.put(b"hello")
    again, _ = store.put(b"hello")
    assert first == again == f"{digest[:2]}/{digest[2:4]}/{digest}"
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


def test_a_durable_source_file_is_linked_into_storage_not_copied(tmp_path):
    store = BlobStore(tmp_path / "storage")
    source = tmp_path / "spool.eml"
    source.write_bytes(b"raw message")
    digest = hashlib.sha256(b"raw message").hexdigest()
    [(relative, _)] = store.put_many([Blob(None, digest, source, raw=True)])
    assert relative.startswith("raw/") and relative.endswith(f"/{digest}.eml")
    stored = store.path_of(relative)
    assert stored.read_bytes() == b"raw message"
    assert stored.stat().st_ino == source.stat().st_ino  # one inode, two names
    source.unlink()  # the spool file goes after the commit; the stored copy stays
    assert store.read(relative) == b"raw message"
    assert list((tmp_path / "storage").rglob(".tmp-*")) == []


def test_a_source_stored_before_is_not_linked_again(tmp_path):
    store = BlobStore(tmp_path / "storage")
    digest = hashlib.sha256(b"raw message").hexdigest()
    first, second = tmp_path / "first.eml", tmp_path / "second.eml"
    first.write_bytes(b"raw message")
    second.write_bytes(b"raw message")
    [(relative, _)] = store.put_many([Blob(None, digest, first, raw=True)])
    # A redelivery: the same bytes under the same name, whatever file they come from now.
    assert store.put_many([Blob(None, digest, second, raw=True),
                           Blob(None, digest, second, raw=True)]) == [(relative, digest)] * 2
    assert store.path_of(relative).stat().st_ino == first.stat().st_ino
