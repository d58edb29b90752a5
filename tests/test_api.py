"""The read API over real HTTP (uvicorn on loopback, httpx as the client), on SQLite and
PostgreSQL: bearer tokens, user scoping, keyset pagination, streamed downloads."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import content_disposition
from mailread.parse import parse_email
from consumer.route import Route
from consumer.save import SaveRequest, save_many, store_batch
from devstack import mailgen
from devstack.consumers import ROOT, settings_env
from mailferry import api_tokens
from mailferry.db import write_transaction
from mailferry.models import ApiToken, EmailAttachment, EmailMessage, EmailTask, TaskSource, TaskStatus
from mailferry.spool import envelope_record
from mailferry.storage import BlobStore
from mailferry.users import add_user


# -- helpers ---------------------------------------------------------------------------------


def store(settings, raws: list[bytes], user, raw_sources: list[Path | None] | None = None) -> list[int]:
    """Store messages for ``user`` the consumer's way (files, then rows in one batch)."""
    parsed = [parse_email(raw) for raw in raws]
    files = store_batch(BlobStore.of(settings), list(zip(raws, parsed)), raw_sources)
    requests = [SaveRequest(p, f, [Route(user.id, user.email, None)], "smtp", None)
                for p, f in zip(parsed, files)]
    with write_transaction():
        results = save_many(requests)
    return [i for r in results for i in r.stored]


@contextlib.contextmanager
def serving(settings):
    from api.app import build_app
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(settings):
    with serving(settings) as base:
        yield base


def client(base: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def sha256_of_download(http: httpx.Client, url: str) -> tuple[httpx.Response, str]:
    digest = hashlib.sha256()
    with http.stream("GET", url) as response:
        for chunk in response.iter_bytes():
            digest.update(chunk)
    return response, digest.hexdigest()


def all_pages(http: httpx.Client, params: dict, between=lambda: None) -> list[dict]:
    seen, cursor = [], None
    while True:
        page = http.get("/v1/messages", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        seen.extend(body["messages"])
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        between()


# -- auth and scoping ------------------------------------------------------------------------


def test_no_bad_or_revoked_token_is_401_with_a_bearer_challenge(settings, api):
    bob = add_user("bob@example.org")
    store(settings, [mailgen.plain(1)], bob)
    _, token = api_tokens.create("app", bob)
    revoked_row, revoked = api_tokens.create("old", bob)
    assert api_tokens.revoke(revoked_row.prefix) == 1
    for headers in ({}, {"Authorization": "Bearer mft_nope"}, {"Authorization": f"Bearer {revoked}"},
                    {"Authorization": f"Basic {token}"}):
        for path in ("/v1/messages", "/v1/tasks", "/v1/messages/1", "/v1/messages/1/raw"):
            answer = httpx.get(api + path, headers=headers)
            assert answer.status_code == 401, (headers, path)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "error" in answer.json()
    assert client(api, token).get("/v1/messages").status_code == 200


def test_a_user_token_sees_only_its_users_mail_and_any_other_id_is_404(settings, api):
    bob, alice = add_user("bob@example.org"), add_user("alice@example.org")
    [bobs] = store(settings, [mailgen.with_attachment(1, "b.bin", b"bob's")], bob)
    [alices] = store(settings, [mailgen.with_attachment(2, "a.bin", b"alice's", to="alice@example.org")], alice)
    _, bob_token = api_tokens.create("bob's app", bob)
    _, admin_token = api_tokens.create("all mail")
    as_bob, as_admin = client(api, bob_token), client(api, admin_token)

    assert [m["id"] for m in as_bob.get("/v1/messages").json()["messages"]] == [bobs]
    for path in (f"/v1/messages/{alices}", f"/v1/messages/{alices}/raw",
                 f"/v1/messages/{alices}/attachments/0", "/v1/messages/999999"):
        assert as_bob.get(path).status_code == 404, path
    for who in ("alice@example.org", str(alice.id), "nobody@example.org"):
        assert as_bob.get("/v1/messages", params={"user": who}).status_code == 404
    assert as_bob.get("/v1/messages", params={"user": "BOB@example.org"}).json()["messages"][0]["id"] == bobs
    assert as_bob.get(f"/v1/messages/{bobs}/attachments/0").content == b"bob's"

    assert {m["id"] for m in as_admin.get("/v1/messages").json()["messages"]} == {bobs, alices}
    only_alice = as_admin.get("/v1/messages", params={"user": "alice@example.org"}).json()["messages"]
    assert [(m["id"], m["user"], m["attachments"]) for m in only_alice] == [(alices, alice.id, 1)]
    payload = as_admin.get(f"/v1/messages/{alices}").json()
    assert payload["id"] == alices and payload["user"] == {"id": alice.id, "email": "alice@example.org"}
    assert payload["subject"] == "Attachment 2" and payload["attachments"][0]["name"] == "a.bin"
    assert payload["attachments"][0]["url"].endswith(f"/v1/messages/{alices}/attachments/0")


def test_last_used_is_written_once_a_minute_not_per_request(settings, api):
    row, token = api_tokens.create("app")
    http = client(api, token)
    assert http.get("/v1/messages").status_code == 200
    first = ApiToken.get_by_id(row.id).last_used_at
    assert first is not None
    assert http.get("/v1/messages").status_code == 200
    assert ApiToken.get_by_id(row.id).last_used_at == first
    ApiToken.update(last_used_at=first - dt.timedelta(minutes=2)).where(ApiToken.id == row.id).execute()
    assert http.get("/v1/messages").status_code == 200
    assert ApiToken.get_by_id(row.id).last_used_at > first - dt.timedelta(minutes=1)


# -- listing ---------------------------------------------------------------------------------


def test_pages_are_newest_first_and_stable_while_mail_arrives(settings, api):
    bob = add_user("bob@example.org")
    # Three batches: the messages of one batch share received_at, so ties are by id.
    for first in (0, 4, 8):
        store(settings, [mailgen.plain(n) for n in range(first, first + 4)], bob)
        time.sleep(0.01)
    existing = list(EmailMessage.select().order_by(EmailMessage.received_at.desc(), EmailMessage.id.desc()))
    assert len(existing) == 12
    _, token = api_tokens.create("app", bob)
    arriving = iter(range(100, 200))

    def new_mail():
        store(settings, [mailgen.plain(next(arriving)), mailgen.plain(next(arriving))], bob)

    seen = all_pages(client(api, token), {"limit": 3}, between=new_mail)
    assert [m["id"] for m in seen] == [m.id for m in existing]  # each once, newest first
    assert EmailMessage.select().count() == 12 + 2 * 3  # mail did arrive between the pages
    assert seen[0]["from"] == existing[0].sender and seen[0]["size"] == existing[0].size
    assert seen[0]["url"].endswith(f"/v1/messages/{existing[0].id}")

    newest = client(api, token).get("/v1/messages", params={"limit": 200}).json()
    assert newest["next_cursor"] is None and len(newest["messages"]) == 18


def test_since_keeps_the_mail_received_from_then(settings, api):
    bob = add_user("bob@example.org")
    store(settings, [mailgen.plain(1), mailgen.plain(2)], bob)
    time.sleep(0.05)
    later = store(settings, [mailgen.plain(3), mailgen.plain(4)], bob)
    since = EmailMessage.get_by_id(later[0]).received_at
    _, token = api_tokens.create("app")
    http = client(api, token)
    for value in (since.isoformat() + "Z", since.isoformat() + "+00:00",
                  (since + dt.timedelta(hours=2)).isoformat() + "+02:00"):
        got = all_pages(http, {"since": value, "limit": 1})
        assert sorted(m["id"] for m in got) == sorted(later), value
    assert len(http.get("/v1/messages", params={"since": "2000-01-01T00:00:00Z"}).json()["messages"]) == 4
    assert http.get("/v1/messages", params={"since": "yesterday"}).status_code == 400
    assert http.get("/v1/messages", params={"cursor": "!!not-ours"}).status_code == 400
    for limit in ("0", "201", "x"):
        assert http.get("/v1/messages", params={"limit": limit}).status_code == 400


def test_tasks_are_listed_newest_first_and_scoped(settings, api):
    bob, alice = add_user("bob@example.org"), add_user("alice@example.org")
    EmailTask.create(email_source=TaskSource.IMAP, user=bob, status=TaskStatus.COMPLETED, emails_saved=3)
    failed = EmailTask.create(email_source=TaskSource.IMAP, user=bob, status=TaskStatus.FAILED,
                              error_message="login refused")
    EmailTask.create(email_source=TaskSource.IMAP, user=alice, status=TaskStatus.RUNNING)
    EmailTask.create(email_source=TaskSource.HARAKA, user=None, status=TaskStatus.COMPLETED)
    _, bob_token = api_tokens.create("bob", bob)
    _, admin_token = api_tokens.create("all")
    bobs = client(api, bob_token).get("/v1/tasks").json()["tasks"]
    assert [t["user"]["email"] for t in bobs] == ["bob@example.org"] * 2
    assert bobs[0]["task_id"] == failed.task_id and bobs[0]["error_message"] == "login refused"
    assert bobs[1]["counts"]["saved"] == 3 and bobs[1]["source"] == TaskSource.IMAP
    admin = client(api, admin_token)
    assert len(admin.get("/v1/tasks").json()["tasks"]) == 4
    assert [t["user"] for t in admin.get("/v1/tasks", params={"status": "completed"}).json()["tasks"]][0] is None
    assert len(admin.get("/v1/tasks", params={"limit": 1}).json()["tasks"]) == 1
    assert admin.get("/v1/tasks", params={"status": "LOST"}).status_code == 400


# -- downloads -------------------------------------------------------------------------------


def test_raw_and_attachment_downloads_are_byte_identical(settings, api, tmp_path):
    bob = add_user("bob@example.org")
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 300
    raw = mailgen.with_attachment(1, "report.pdf", pdf, content_type="application/pdf")
    # A source linked from a spool file starts with the envelope record: not served.
    spooled_raw = mailgen.plain(2)
    spool_file = tmp_path / "spooled"
    spool_file.write_bytes(envelope_record(b'{"queue_id": "Q2"}') + spooled_raw)
    message_id, spooled_id = store(settings, [raw, spooled_raw], bob, [None, spool_file])
    _, token = api_tokens.create("app", bob)
    http = client(api, token)

    for mid, source in ((message_id, raw), (spooled_id, spooled_raw)):
        response, digest = sha256_of_download(http, f"/v1/messages/{mid}/raw")
        assert response.status_code == 200
        assert digest == hashlib.sha256(source).hexdigest() == EmailMessage.get_by_id(mid).sha256
        assert response.headers["content-type"] == "message/rfc822"
        assert response.headers["content-disposition"] == f'attachment; filename="message-{mid}.eml"'
        assert int(response.headers["content-length"]) == len(source)

    attachment = EmailAttachment.get(EmailAttachment.email_message == message_id)
    response, digest = sha256_of_download(http, f"/v1/messages/{message_id}/attachments/{attachment.position}")
    assert response.status_code == 200
    assert digest == attachment.sha256 == hashlib.sha256(pdf).hexdigest()
    assert response.headers["content-type"] == "application/pdf"
    assert response.headers["content-disposition"] == 'attachment; filename="report.pdf"'
    assert http.get(f"/v1/messages/{message_id}/attachments/7").status_code == 404

    payload = http.get(f"/v1/messages/{message_id}").json()
    assert payload["raw_url"].endswith(f"/v1/messages/{message_id}/raw")
    assert payload["attachments"][0]["sha256"] == attachment.sha256
    assert ["Subject", "Attachment 1"] in payload["headers"]


def test_a_hostile_content_type_is_not_sent_as_a_header(settings, api):
    bob = add_user("bob@example.org")
    [message_id] = store(settings, [mailgen.with_attachment(1, "x.bin", b"data")], bob)
    EmailAttachment.update(content_type="text/html\r\nSet-Cookie: a=b", safe_filename="naïve \"x\".txt") \
        .where(EmailAttachment.email_message == message_id).execute()
    _, token = api_tokens.create("app")
    response = client(api, token).get(f"/v1/messages/{message_id}/attachments/0")
    assert response.status_code == 200 and response.content == b"data"
    assert response.headers["content-type"] == "application/octet-stream"
    assert "set-cookie" not in response.headers
    assert response.headers["content-disposition"] == \
        "attachment; filename=\"na_ve _x_.txt\"; filename*=UTF-8''na%C3%AFve%20%22x%22.txt"


@pytest.mark.parametrize("name, header", [
    ("report.pdf", 'attachment; filename="report.pdf"'),
    ("Grüße.txt", "attachment; filename=\"Gr__e.txt\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe.txt"),
    ("a\r\nSet-Cookie: x=1", "attachment; filename=\"aSet-Cookie: x=1\""),
    ('q";.txt', "attachment; filename=\"q__.txt\"; filename*=UTF-8''q%22%3B.txt"),
    ("", 'attachment; filename="download"'),
])
def test_content_disposition_is_rfc6266_and_injection_proof(name, header):
    assert content_disposition(name) == header


def test_a_20_mb_attachment_streams_without_being_held_in_memory(settings, api):
    bob = add_user("bob@example.org")
    big = bytes(range(256)) * (20 * 1024 * 1024 // 256)
    [message_id] = store(settings, [mailgen.with_attachment(1, "big.bin", big)], bob)
    _, token = api_tokens.create("app", bob)
    http = client(api, token)
    url = f"/v1/messages/{message_id}/attachments/0"
    assert http.get("/healthz").status_code == 200  # connection and threads warm before tracing
    # tracemalloc sees every thread of this process: the server's threads and the client.
    tracemalloc.start()
    try:
        response, digest = sha256_of_download(http, url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200 and int(response.headers["content-length"]) == len(big)
    assert digest == hashlib.sha256(big).hexdigest()
    assert peak < 5 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB while streaming 20 MB"


# -- service ---------------------------------------------------------------------------------


def test_healthz_answers_without_a_token(settings, api):
    answer = httpx.get(api + "/healthz")
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}


def test_healthz_is_503_when_the_database_does_not_answer(settings, tmp_path):
    from mailferry.models import db
    original = db.obj
    # The same kind of database, somewhere it cannot be opened: a missing folder, a closed port.
    db.initialize(type(original)(str(tmp_path / "no-such-dir" / "x.db")) if "sqlite" in
                  settings.resolved_database_url else type(original)("nosuchdb", host="127.0.0.1", port=1))
    try:
        with serving(settings) as base:
            answer = httpx.get(base + "/healthz")
        assert answer.status_code == 503 and answer.json()["status"] == "unavailable"
    finally:
        db.initialize(original)


def test_openapi_lists_the_routes_and_docs_load_it(settings, api):
    schema = httpx.get(api + "/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {
        "/healthz", "/v1/messages", "/v1/messages/{message_id}", "/v1/messages/{message_id}/raw",
        "/v1/messages/{message_id}/attachments/{position}", "/v1/tasks"}
    assert all("get" in ops for ops in schema["paths"].values())
    assert "401" in schema["paths"]["/v1/messages"]["get"]["responses"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    docs = httpx.get(api + "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def mailferry(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailferry.cli", *args], env=settings_env(settings),
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_api_tokens_create_list_revoke_on_the_command_line(settings, api):
    add_user("bob@example.org")
    made = mailferry(settings, "api-tokens", "create", "--user", "bob@example.org", "--name", "helpdesk")
    assert made.returncode == 0, made.stderr
    token = made.stdout.splitlines()[0]
    assert token.startswith("mft_") and "shown once" in made.stdout
    assert client(api, token).get("/v1/messages").status_code == 200

    [listed] = json.loads(mailferry(settings, "api-tokens", "list", "--json").stdout)
    assert listed["name"] == "helpdesk" and listed["user"] == "bob@example.org"
    assert token.startswith(listed["prefix"]) and listed["last_used_at"] and listed["revoked_at"] is None
    assert not any(token in str(v) or len(str(v)) == 64 for v in listed.values())  # never the hash
    table = mailferry(settings, "api-tokens", "list").stdout
    assert "helpdesk" in table and listed["prefix"] in table and token not in table

    assert mailferry(settings, "api-tokens", "create", "--user", "nobody@example.org").returncode == 1
    revoked = mailferry(settings, "api-tokens", "revoke", listed["prefix"])
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert client(api, token).get("/v1/messages").status_code == 401
    again = mailferry(settings, "api-tokens", "revoke", str(listed["id"]))
    assert again.returncode == 1 and "no live token" in again.stderr


def test_an_api_process_serves_at_most_api_threads_requests_at_once(settings):
    """Each request thread keeps a database connection: the thread limit bounds them."""
    import anyio

    from api.app import build_app
    app = build_app(settings.replace(api_threads=5))

    async def started() -> float:
        async with app.router.lifespan_context(app):
            return anyio.to_thread.current_default_thread_limiter().total_tokens
    assert anyio.run(started) == 5
