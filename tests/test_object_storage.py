"""Storage behind one interface: the folder backend and the S3 backend against a real
S3-compatible server (SeaweedFS on loopback) keep the same contract; the server checks what
arrives (a body changed in transit is refused) and the API checks what it serves (an object
changed in storage is never sent as if whole)."""

from __future__ import annotations

import hashlib
import socket
import threading

import httpx
import obstore
import pytest

from devstack import mailgen
from mailferry import api_tokens, metrics
from mailferry.config import Settings
from mailferry.models import EmailAttachment, EmailMessage
from mailferry.object_storage import S3Store
from mailferry.spool import SpoolEntry, envelope_record
from mailferry.storage import Blob, BlobStore, FolderStore
from mailferry.users import add_user
from tests.test_api import client, serving, sha256_of_download, store


@pytest.fixture(params=["folders", "s3"])
def backend(request, tmp_path) -> BlobStore:
    if request.param == "folders":
        return FolderStore(tmp_path / "storage")
    s3 = request.getfixturevalue("s3_prefix")
    return BlobStore.of(Settings(var_dir=tmp_path, **s3))


def test_every_backend_keeps_the_contract(backend, tmp_path):
    spooled = tmp_path / "spooled.eml"
    message = b"Subject: hi\r\n\r\nthe message\r\n"
    spooled.write_bytes(envelope_record(b'{"rcpt_to":["a@example.org","bcc@example.org"]}') + message)
    digest = hashlib.sha256(message).hexdigest()
    blobs = [Blob(None, digest, SpoolEntry(spooled, "Q1"), raw=True), Blob(b"logo"), Blob(b"logo"),
             Blob(b"x" * 300_000)]
    results = backend.put_many(blobs)
    raw_key = results[0][0]
    assert raw_key.startswith("raw/") and raw_key.endswith(f"/{digest}.eml")
    day = raw_key.split("/")[1]  # every key of a batch is filed under the day it was stored
    assert results[1] == results[2] == (backend.key_of(hashlib.sha256(b"logo").hexdigest(), day),
                                        hashlib.sha256(b"logo").hexdigest())
    assert backend.read(raw_key) == message == backend.read_raw(raw_key)  # never the envelope
    assert backend.read(results[1][0]) == b"logo"
    big = backend.open(results[3][0])
    assert big.size == 300_000 and b"".join(big) == b"x" * 300_000
    assert backend.open_raw(raw_key).head(7) == b"Subject"
    assert sorted(backend.keys()) == sorted({key for key, _ in results})
    # Stored again (a redelivery): the same keys, nothing written twice.
    assert backend.write_new([(key, Blob(b"logo")) for key, _ in results[1:2]]) == 0
    assert backend.put_many([Blob(b"logo")]) == [results[1]]
    with pytest.raises(FileNotFoundError):
        backend.open(backend.key_of("0" * 64, day))


def test_a_store_that_refuses_the_credentials_fails_the_batch_as_storage_errors_do(s3_prefix, tmp_path):
    wrong = BlobStore.of(Settings(var_dir=tmp_path, **{**s3_prefix, "s3_secret_access_key": "wrong"}))
    with pytest.raises(OSError) as refused:
        wrong.put_many([Blob(b"first"), Blob(b"second")])
    assert "object storage: PUT" in refused.value.strerror
    right = BlobStore.of(Settings(var_dir=tmp_path, **s3_prefix))
    assert list(right.keys()) == []  # nothing half-stored


def test_a_body_changed_in_transit_is_refused_by_the_server_and_nothing_is_stored(seaweedfs, tmp_path):
    with Corrupting(seaweedfs.ports["s3"], b"PRECIOUS", b"precious") as proxy:
        settings = Settings(var_dir=tmp_path, **{**seaweedfs.settings("transit"),
                                                 "s3_endpoint": f"http://127.0.0.1:{proxy.port}"})
        through_proxy = BlobStore.of(settings)
        assert through_proxy.put(b"an ordinary object")  # the proxy passes what it does not match
        with pytest.raises(OSError):
            through_proxy.put(b"a PRECIOUS attachment")
        assert proxy.changed == 1
    direct = BlobStore.of(Settings(var_dir=tmp_path, **seaweedfs.settings("transit")))
    assert [direct.read(key) for key in direct.keys()] == [b"an ordinary object"]


@pytest.mark.parametrize("where", ["folders", "s3"])
def test_the_api_serves_from_either_backend_and_never_sends_a_changed_object_as_whole(
        settings, where, request):
    if where == "s3":
        settings = settings.replace(**request.getfixturevalue("s3_prefix"))
    bob = add_user("bob@example.org")
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 1000
    raw = mailgen.with_attachment(1, "report.pdf", pdf, content_type="application/pdf")
    [message_id] = store(settings, [raw], bob)
    attachment = EmailAttachment.get(EmailAttachment.email_message == message_id)
    _, token = api_tokens.create("app", bob)
    with serving(settings) as base:
        http = client(base, token)
        response, digest = sha256_of_download(http, f"/v1/messages/{message_id}/raw")
        assert response.status_code == 200 and digest == EmailMessage.get_by_id(message_id).sha256
        url = f"/v1/messages/{message_id}/attachments/{attachment.position}"
        response, digest = sha256_of_download(http, url)
        assert response.status_code == 200 and digest == hashlib.sha256(pdf).hexdigest()
        assert ["Subject", "Attachment 1"] in http.get(f"/v1/messages/{message_id}").json()["headers"]

        _overwrite(settings, attachment.file_path, pdf[:-1] + b"!")  # damaged in storage
        before = metrics.storage_integrity_failures._value.get()
        with pytest.raises(httpx.HTTPError):  # the body ends short of its Content-Length
            sha256_of_download(http, url)
        assert metrics.storage_integrity_failures._value.get() == before + 1

        raw_path = EmailMessage.get_by_id(message_id).raw_path
        _overwrite(settings, raw_path, raw.replace(b"Subject", b"Subjekt"))  # a damaged source
        with pytest.raises(httpx.HTTPError):
            sha256_of_download(http, f"/v1/messages/{message_id}/raw")
        assert metrics.storage_integrity_failures._value.get() == before + 2

        _remove(settings, message_id)
        assert http.get(f"/v1/messages/{message_id}/raw").status_code == 404
        assert http.get(f"/v1/messages/{message_id}").json()["headers"] == []


def _overwrite(settings: Settings, key: str, data: bytes) -> None:
    """Change a stored object behind the store's back (a bad disk, a careless operator)."""
    store = BlobStore.of(settings)
    if isinstance(store, S3Store):
        obstore.put(store._client, key, data)
    else:
        (store.root / key).write_bytes(data)


def _remove(settings: Settings, message_id: int) -> None:
    key = EmailMessage.get_by_id(message_id).raw_path
    store = BlobStore.of(settings)
    if isinstance(store, S3Store):
        obstore.delete(store._client, key)
    else:
        (store.root / key).unlink()


class Corrupting:
    """A TCP proxy on loopback that passes everything to ``port`` but changes ``find`` into
    ``replace`` (same length) in what the client sends: a body damaged on the way."""

    def __init__(self, port: int, find: bytes, replace: bytes):
        assert len(find) == len(replace)
        self.target, self.find, self.replace = port, find, replace
        self.changed = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Corrupting":
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc) -> None:
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._spawn(self._pipe, downstream, upstream, True)
            self._spawn(self._pipe, upstream, downstream, False)

    def _pipe(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.find in data:
                    data = data.replace(self.find, self.replace)
                    self.changed += 1
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
