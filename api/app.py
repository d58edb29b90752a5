"""The read API's routes: stored messages, their raw sources and attachments, and tasks, for
a bearer token; a user-scoped token sees its user's mail alone (any other id is a 404)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hashlib
import json
import logging
import re
from typing import Callable, Iterator
from urllib.parse import quote

import anyio
import peewee
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from mailferry import api_tokens, metrics
from mailferry.config import Settings
from mailferry.contracts import iso_utc
from mailferry.models import ApiToken, EmailAttachment, EmailMessage, EmailTask, TaskStatus, User, db, utcnow
from mailferry.payload import message_payload
from mailferry.storage import BlobStore, StoredObject
from mailferry.users import normalise_address

log = logging.getLogger(__name__)

DEFAULT_LIMIT, MAX_LIMIT = 50, 200
# A token's last_used_at is written at most this often: a read API must not write per request.
LAST_USED_EVERY = dt.timedelta(minutes=1)
# type/subtype as RFC 6838 allows: anything else from a message is not sent as a header.
_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")
_ASCII_NAME_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\;%]')


def operation(spec: dict) -> Callable:
    """Attach an endpoint's OpenAPI operation (a dict, not docstring YAML: PyYAML is only a
    test dependency, and the docs must not need it in production)."""
    def mark(func):
        func.openapi = spec
        return func
    return mark


class _Schemas(SchemaGenerator):
    def parse_docstring(self, func_or_method) -> dict:
        return getattr(func_or_method, "openapi", {})


def _errors(*codes: int) -> dict:
    text = {400: "bad parameter", 401: "no valid bearer token", 404: "not found (or not this token's)",
            503: "database unavailable"}
    return {str(c): {"description": text[c]} for c in codes}


SCHEMAS = _Schemas({
    "openapi": "3.0.3",
    "info": {"title": "Mailferry read API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "security": [{"bearer": []}],
})


# -- database and auth -----------------------------------------------------------------------


class _Connection:
    """One peewee connection for the request, in the thread that serves it. peewee keeps
    connections per thread; opening per request and closing after means no connection is
    left in an idle threadpool thread (a PostgreSQL server counts them), at the cost of a
    connect per request."""

    def __enter__(self):
        try:
            db.connect(reuse_if_open=True)
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            log.warning("api: database unavailable: %s", exc)
            raise HTTPException(503, "database unavailable") from exc

    def __exit__(self, *exc):
        if not db.is_closed():
            db.close()


def _authenticate(request: Request) -> ApiToken:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    row = api_tokens.verify(token.strip()) if scheme.lower() == "bearer" else None
    if row is None:
        raise HTTPException(401, "a valid bearer token is needed",
                            headers={"WWW-Authenticate": 'Bearer realm="mailferry"'})
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        # Conditional, so that many processes and threads write once a minute in all.
        (ApiToken.update(last_used_at=now)
         .where((ApiToken.id == row.id) & (ApiToken.last_used_at.is_null()
                                           | (ApiToken.last_used_at <= now - LAST_USED_EVERY)))
         .execute())
    return row


def _endpoint(handler: Callable) -> Callable:
    """A sync endpoint (Starlette runs it in its threadpool) with a connection and a token."""
    def endpoint(request: Request) -> Response:
        with _Connection():
            return handler(request, _authenticate(request))
    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    endpoint.openapi = getattr(handler, "openapi", {})
    return endpoint


def _scoped(query, model, token: ApiToken):
    return query.where(model.user == token.user_id) if token.user_id is not None else query


# -- parameters ------------------------------------------------------------------------------


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", "")
    if not raw:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _since(request: Request) -> dt.datetime | None:
    raw = request.query_params.get("since", "")
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise HTTPException(400, "since must be an ISO 8601 date-time, e.g. 2024-05-01T12:00:00Z") from None
    if value.tzinfo is not None:  # stored as naive UTC
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def encode_cursor(received_at: dt.datetime, message_id: int) -> str:
    text = json.dumps([received_at.isoformat(), message_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, int]:
    try:
        when, message_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return dt.datetime.fromisoformat(when), int(message_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "cursor is not one this API gave") from None


def _user_filter(request: Request, token: ApiToken) -> int | None:
    """The user id ``user=`` asks for (an id or an address); another user than a scoped
    token's is not found, like an unknown one."""
    raw = request.query_params.get("user", "").strip()
    if not raw:
        return token.user_id
    user = (User.get_or_none(User.id == int(raw)) if raw.isdigit()
            else User.get_or_none(User.email == normalise_address(raw)))
    if user is None or (token.user_id is not None and user.id != token.user_id):
        raise HTTPException(404, "no such user")
    return user.id


def _message(request: Request, token: ApiToken) -> EmailMessage:
    raw = request.path_params["message_id"]
    found = _scoped(EmailMessage.select().where(EmailMessage.id == raw), EmailMessage, token).first()
    if found is None:
        raise HTTPException(404, "no such message")
    return found


# -- endpoints -------------------------------------------------------------------------------


@operation({"summary": "Liveness and database", "security": [],
            "responses": {"200": {"description": '{"status": "ok"}'}, **_errors(503)}})
def healthz(request: Request) -> Response:
    try:
        with _Connection():
            db.execute_sql("SELECT 1")
    except (HTTPException, peewee.DatabaseError) as exc:
        return JSONResponse({"status": "unavailable", "error": str(getattr(exc, "detail", exc))}, 503)
    return JSONResponse({"status": "ok"})


@operation({
    "summary": "Messages, newest first",
    "parameters": [
        {"name": "user", "in": "query", "schema": {"type": "string"}, "description": "user id or address"},
        {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"},
         "description": "only messages received at or after this time (UTC if no offset)"},
        {"name": "cursor", "in": "query", "schema": {"type": "string"},
         "description": "next_cursor of the previous page"},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                                     "default": DEFAULT_LIMIT}},
    ],
    "responses": {"200": {"description": '{"messages": [summary…], "next_cursor": string or null}'},
                  **_errors(400, 401, 404)},
})
def list_messages(request: Request, token: ApiToken) -> Response:
    settings: Settings = request.app.state.settings
    limit, since = _limit(request), _since(request)
    user_id = _user_filter(request, token)
    query = EmailMessage.select()
    if user_id is not None:
        query = query.where(EmailMessage.user == user_id)
    if since is not None:
        query = query.where(EmailMessage.received_at >= since)
    if request.query_params.get("cursor"):
        # Keyset on (received_at, id), not an offset: a message stored meanwhile is newer
        # than the cursor, so it neither shifts the next page nor shows up twice.
        when, last_id = decode_cursor(request.query_params["cursor"])
        query = query.where((EmailMessage.received_at < when)
                            | ((EmailMessage.received_at == when) & (EmailMessage.id < last_id)))
    rows = list(query.order_by(EmailMessage.received_at.desc(), EmailMessage.id.desc()).limit(limit + 1))
    page, more = rows[:limit], len(rows) > limit
    counts = dict(EmailAttachment.select(EmailAttachment.email_message, peewee.fn.COUNT(EmailAttachment.id))
                  .where(EmailAttachment.email_message.in_([m.id for m in page]))
                  .group_by(EmailAttachment.email_message).tuples()) if page else {}
    base = settings.resolved_api_base_url
    return JSONResponse({
        "messages": [{
            "id": m.id, "user": m.user_id, "from": m.sender, "subject": m.subject,
            "received_at": iso_utc(m.received_at, "auto"), "size": m.size,
            "attachments": counts.get(m.id, 0), "url": f"{base}/v1/messages/{m.id}",
        } for m in page],
        "next_cursor": encode_cursor(page[-1].received_at, page[-1].id) if more else None,
    })


_MESSAGE_ID = {"name": "message_id", "in": "path", "required": True, "schema": {"type": "integer"}}


@operation({"summary": "One message, as the message.stored webhook payload", "parameters": [_MESSAGE_ID],
            "responses": {"200": {"description": "the message payload"}, **_errors(401, 404)}})
def get_message(request: Request, token: ApiToken) -> Response:
    settings: Settings = request.app.state.settings
    return JSONResponse(message_payload(_message(request, token), settings, request.app.state.store))


@operation({"summary": "The raw source (.eml), streamed", "parameters": [_MESSAGE_ID],
            "responses": {"200": {"description": "message/rfc822",
                                  "content": {"message/rfc822": {}}}, **_errors(401, 404)}})
def get_raw(request: Request, token: ApiToken) -> Response:
    message = _message(request, token)
    stored = _open(request, message.raw_path, "the raw source", raw=True)
    return _stream(stored, verified(stored, message.sha256, message.raw_path), "message/rfc822",
                   f"message-{message.id}.eml")


@operation({"summary": "One attachment, streamed",
            "parameters": [_MESSAGE_ID, {"name": "position", "in": "path", "required": True,
                                         "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "the attachment's bytes, with its content type"},
                          **_errors(401, 404)}})
def get_attachment(request: Request, token: ApiToken) -> Response:
    message = _message(request, token)
    attachment = (EmailAttachment.select()
                  .where((EmailAttachment.email_message == message.id)
                         & (EmailAttachment.position == request.path_params["position"]))
                  .order_by(EmailAttachment.id).first())
    if attachment is None:
        raise HTTPException(404, "no such attachment")
    stored = _open(request, attachment.file_path, "the attachment")
    media_type = attachment.content_type if _MEDIA_TYPE.match(attachment.content_type or "") \
        else "application/octet-stream"
    return _stream(stored, verified(stored, attachment.sha256, attachment.file_path), media_type,
                   attachment.safe_filename or f"attachment-{attachment.position + 1}")


@operation({
    "summary": "Recent tasks (IMAP fetches, Haraka sweeps), newest first",
    "parameters": [
        {"name": "status", "in": "query", "schema": {"type": "string", "enum": list(TaskStatus.ALL)}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                                     "default": DEFAULT_LIMIT}},
    ],
    "responses": {"200": {"description": '{"tasks": [task…]}'}, **_errors(400, 401)},
})
def list_tasks(request: Request, token: ApiToken) -> Response:
    limit = _limit(request)
    status = request.query_params.get("status", "").upper()
    if status and status not in TaskStatus.ALL:
        raise HTTPException(400, f"status must be one of {', '.join(TaskStatus.ALL)}")
    query = _scoped(EmailTask.select(EmailTask, User).join(User, peewee.JOIN.LEFT_OUTER), EmailTask, token)
    if status:
        query = query.where(EmailTask.status == status)
    rows = query.order_by(EmailTask.created_at.desc(), EmailTask.id.desc()).limit(limit)
    return JSONResponse({"tasks": [{
        "task_id": t.task_id, "source": t.email_source,
        "user": {"id": t.user.id, "email": t.user.email} if t.user_id is not None else None,
        "status": t.status,
        "counts": {"fetched": t.emails_fetched, "saved": t.emails_saved, "failed": t.emails_failed,
                   "processed": t.emails_processed},
        "created_at": iso_utc(t.created_at, "auto"), "started_at": iso_utc(t.started_at, "auto"),
        "completed_at": iso_utc(t.completed_at, "auto"), "error_message": t.error_message,
    } for t in rows]})


def openapi(request: Request) -> Response:
    return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Mailferry read API</title>
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><p>The schema: <a href="/openapi.json">/openapi.json</a>.</p><div id="ui"></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>"""


def docs(request: Request) -> Response:
    return HTMLResponse(DOCS_PAGE)


# -- streaming -------------------------------------------------------------------------------


def _open(request: Request, key: str, what: str, raw: bool = False) -> StoredObject:
    store: BlobStore = request.app.state.store
    try:
        return store.open_raw(key) if raw else store.open(key)
    except FileNotFoundError:
        raise HTTPException(404, f"{what} is no longer stored") from None
    except OSError as exc:
        log.error("storage: cannot read %s for the API: %s", key, exc)
        raise HTTPException(503, f"{what} cannot be read from storage now") from None


def verified(stored: StoredObject, sha256: str, key: str) -> Iterator[bytes]:
    """The object's chunks (an attachment, or a raw source: the message its row's sha256 is
    of), its last one held back until the whole object hashed to
    ``sha256``: an object changed or damaged in storage ends the response short of its
    Content-Length, which every HTTP client reports as an error, instead of arriving as if
    whole."""
    digest, held = hashlib.sha256(), None
    for chunk in stored:
        if held is not None:
            yield held
        digest.update(chunk)
        held = chunk
    if digest.hexdigest() != sha256:
        metrics.storage_integrity_failures.inc()
        log.error("storage: %s does not hash to its sha256 %s: the response is cut short",
                  key, sha256)
        raise OSError(f"{key}: stored bytes do not match their sha256")
    if held is not None:
        yield held


def _stream(stored: StoredObject, chunks: Iterator[bytes], media_type: str, filename: str) -> Response:
    """``chunks`` is a sync iterator: Starlette reads it in its threadpool, and the object is
    never whole in memory."""
    return StreamingResponse(chunks, media_type=media_type, headers={
        "Content-Length": str(stored.size), "Content-Disposition": content_disposition(filename),
        "X-Content-Type-Options": "nosniff"})


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename=`` and, for any other name, ``filename*=`` in
    UTF-8 (RFC 6266 / 8187); controls are dropped, so nothing ends the header early."""
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f") or "download"
    fallback = _ASCII_NAME_UNSAFE.sub("_", name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


# -- the application -------------------------------------------------------------------------


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


def _bounded(settings: Settings):
    """At start, at most ``api_threads`` requests at once. Each sync endpoint and each stream
    runs in anyio's thread pool (40 threads unless told), and every thread keeps its own
    database connection (peewee's are per thread), so this bounds the connections too."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield
    return lifespan


def build_app(settings: Settings) -> Starlette:
    """The API over the database ``open_database`` connected (``mailferry.models.db``)."""
    app = Starlette(routes=[
        Route("/healthz", healthz),
        Route("/v1/messages", _endpoint(list_messages)),
        Route("/v1/messages/{message_id:int}", _endpoint(get_message)),
        Route("/v1/messages/{message_id:int}/raw", _endpoint(get_raw)),
        Route("/v1/messages/{message_id:int}/attachments/{position:int}", _endpoint(get_attachment)),
        Route("/v1/tasks", _endpoint(list_tasks)),
        Route("/openapi.json", openapi, include_in_schema=False),
        Route("/docs", docs, include_in_schema=False),
    ], exception_handlers={HTTPException: _http_error}, lifespan=_bounded(settings))
    app.state.settings = settings
    app.state.store = BlobStore.of(settings)
    return app
