"""The peewee models: users and their mailboxes, tasks, stored messages, attachments, audit.

Idempotency lives here, in unique keys: (user, message_id) for messages, task_id for tasks,
and ``EmailTask.lock_key`` — set while a task is PENDING or RUNNING, NULL once it ended — so
at most one live fetch per (source, user) exists, whatever the number of processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid

import peewee
from peewee import (
    BigIntegerField, BooleanField, DatabaseProxy, DateTimeField, ForeignKeyField,
    IntegerField, Model, SQL,
)

db = DatabaseProxy()


def utcnow() -> dt.datetime:
    """Naive UTC: stored the same way by SQLite and PostgreSQL."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def clean_text(value, max_length: int | None = None):
    """``value`` as the database will take it: no NUL (PostgreSQL refuses NUL in text, and
    mail carries them), and at most ``max_length`` characters. A longer value keeps its
    start and ends in a hash of the whole, so two long values that share a start stay apart
    in a unique key. Anything that is not a str is returned as it is."""
    if not isinstance(value, str):
        return value
    if "\x00" in value:
        value = value.replace("\x00", "")
    if max_length is not None and len(value) > max_length:
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        value = f"{value[:max_length - 17]}~{digest}"
    return value


class CharField(peewee.CharField):
    """A bounded text column that never refuses a value from mail: NULs are dropped here,
    and a row that is saved is kept within ``max_length`` by ``BaseModel.save``. (Not here:
    ``db_value`` also converts query operands, and a LIKE pattern must not be shortened.)"""

    def db_value(self, value):
        return super().db_value(clean_text(value))


class TextField(peewee.TextField):
    """A text column that never refuses a value from mail: NULs are dropped."""

    def db_value(self, value):
        return super().db_value(clean_text(value))


_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


def json_text(value) -> str | None:
    """A JSONField's stored text of ``value`` (for rows inserted without the model)."""
    return None if value is None else _JSON(value)


class JSONField(TextField):
    """JSON kept as text, so the same column works on SQLite and PostgreSQL."""

    def db_value(self, value):
        return json_text(value)

    def python_value(self, value):
        return None if value is None else json.loads(value)


class BaseModel(Model):
    class Meta:
        database = db
        legacy_table_names = False

    def save(self, *args, **kwargs):
        """Every value fits its column (``clean_text``), as in ``db.insert_rows``."""
        for name, field in self._meta.fields.items():
            value = self.__data__.get(name)
            if isinstance(field, peewee.CharField) and isinstance(value, str):
                self.__data__[name] = clean_text(value, field.max_length)
        return super().save(*args, **kwargs)


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DateTimeField(default=utcnow)


class User(BaseModel):
    email = CharField(max_length=320, unique=True)  # stored lower-cased
    is_active = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)


class EmailAlias(BaseModel):
    address = CharField(max_length=320, unique=True)  # stored lower-cased
    user = ForeignKeyField(User, backref="aliases", on_delete="CASCADE")
    created_at = DateTimeField(default=utcnow)


class Settings(BaseModel):
    """Per-user settings; key ``email_config`` holds the IMAP and filter configuration."""

    user = ForeignKeyField(User, backref="settings", on_delete="CASCADE")
    key = CharField(max_length=100)
    value = JSONField(default=dict)
    is_active = BooleanField(default=True)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("user", "key"), True),)


class MailboxState(BaseModel):
    """The IMAP checkpoint of one folder: never a date, always UIDVALIDITY + last UID."""

    user = ForeignKeyField(User, backref="mailbox_states", on_delete="CASCADE")
    folder = CharField(max_length=255)
    uidvalidity = BigIntegerField(null=True)
    last_uid = BigIntegerField(default=0)
    highestmodseq = BigIntegerField(null=True)
    last_fetch_at = DateTimeField(null=True)
    # UIDs stored (in the transaction that moved the checkpoint) whose after-fetch action
    # (mark_seen, move_to, delete) is not yet done: redone by the next run, never refetched.
    pending_action = JSONField(default=list)
    # Set by the consumer holding this folder in IDLE (consumer.imap_idle), renewed with each
    # IDLE; while it is in the future, the scheduler polls the mailbox only as a safety net.
    idle_until = DateTimeField(null=True)

    class Meta:
        indexes = ((("user", "folder"), True),)


class TaskStatus:
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"
    ALL = (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, SKIPPED)
    ACTIVE = (PENDING, RUNNING)
    TERMINAL = (COMPLETED, FAILED, CANCELLED, SKIPPED)


class TaskSource:
    IMAP = "IMAP_EMAIL_FETCH"
    HARAKA = "HARAKA_EMAIL_FETCH"
    ALL = (IMAP, HARAKA)


class EmailTask(BaseModel):
    task_id = CharField(max_length=36, unique=True, default=lambda: str(uuid.uuid4()))
    email_source = CharField(max_length=32)
    user = ForeignKeyField(User, null=True, backref="tasks", on_delete="SET NULL")
    status = CharField(max_length=16, default=TaskStatus.PENDING)
    # "<source>:<user id or ->" while the task is live, NULL after: the per-mailbox lock.
    lock_key = CharField(max_length=64, null=True, unique=True)
    created_at = DateTimeField(default=utcnow)
    started_at = DateTimeField(null=True)
    completed_at = DateTimeField(null=True)
    timeout_at = DateTimeField(null=True)
    timeout_seconds = IntegerField(default=600)
    emails_fetched = IntegerField(default=0)
    emails_saved = IntegerField(default=0)
    emails_failed = IntegerField(default=0)
    emails_processed = IntegerField(default=0)
    details = JSONField(default=dict)
    error_message = TextField(null=True)

    class Meta:
        indexes = (
            (("status", "created_at"), False),
            (("email_source", "status"), False),
            (("user", "status"), False),
            (("status", "completed_at"), False),
        )


class TaskLog(BaseModel):
    """One execution-log line of a task; the newest few hundred per task are kept."""

    task = ForeignKeyField(EmailTask, backref="log_entries", on_delete="CASCADE")
    timestamp = DateTimeField(default=utcnow)
    step = CharField(max_length=64)
    message = TextField()
    level = CharField(max_length=10, default="INFO")


class EmailMessage(BaseModel):
    user = ForeignKeyField(User, backref="messages", on_delete="CASCADE")
    message_id = CharField(max_length=512)
    subject = TextField(default="")
    sender = TextField(default="")
    recipients = JSONField(default=list)
    cc = JSONField(default=list)
    reply_to = JSONField(default=list)
    sent_at = DateTimeField(null=True)  # the Date header
    received_at = DateTimeField(default=utcnow)  # when Mailferry got it
    text_content = TextField(default="")  # "" when the body is in storage (text_path)
    html_content = TextField(default="")
    # body_storage = storage: the bodies' storage keys (UTF-8 objects), the columns above "".
    text_path = CharField(max_length=255, null=True)
    html_path = CharField(max_length=255, null=True)
    raw_path = CharField(max_length=255)
    size = IntegerField()
    sha256 = CharField(max_length=64)
    source = CharField(max_length=16)  # smtp | imap
    queue_id = CharField(max_length=64, null=True, index=True)  # Haraka's, for smtp
    envelope = JSONField(null=True)
    plus_tag = CharField(max_length=255, null=True)
    in_reply_to = TextField(null=True)
    references = JSONField(default=list)
    status = CharField(max_length=32, default="stored")  # stored | partial (MIME fallback)
    created_at = DateTimeField(default=utcnow)
    # What mailread.understand made of it (null thread_id: stored before, not yet reindexed).
    reply_text = TextField(null=True)
    auto_reply = BooleanField(default=False)
    bulk = BooleanField(default=False)
    loop = BooleanField(default=False)
    bounce = JSONField(null=True)  # {"kind", "original_message_id", "recipients": [...]}
    thread_id = CharField(max_length=32, null=True)

    class Meta:
        indexes = (
            (("user", "message_id"), True),
            (("user", "received_at"), False),
            (("sha256",), False),
            (("thread_id",), False),  # names embed the user
        )

    @property
    def storage_keys(self) -> list[str]:
        """The objects this row references in storage: its raw source and any bodies kept
        there (attachments are their own rows)."""
        return [key for key in (self.raw_path, self.text_path, self.html_path) if key]


class EmailAttachment(BaseModel):
    user = ForeignKeyField(User, backref="attachments", on_delete="CASCADE")
    email_message = ForeignKeyField(EmailMessage, backref="attachments", on_delete="CASCADE")
    filename = TextField(default="")  # as the message said: data only, never a path
    safe_filename = CharField(max_length=255)
    content_type = CharField(max_length=255)
    file_size = IntegerField()
    file_path = CharField(max_length=255)  # parts/<day>/<sha256> (ab/cd/<sha256> before 2026-12-07)
    sha256 = CharField(max_length=64)
    is_image = BooleanField(default=False)
    is_inline = BooleanField(default=False)
    content_id = TextField(null=True)
    # The attachment's place in its message (0, 1, …) and, for a part of a forwarded
    # message, the place of the message/rfc822 attachment it came in (None: the message's own).
    position = IntegerField(default=0)
    enclosed_by = IntegerField(null=True)


class UnroutedMessage(BaseModel):
    """SMTP mail whose recipients match no user: kept, with its raw source, for operators."""

    queue_id = CharField(max_length=64, unique=True)
    message_id = CharField(max_length=512)
    mail_from = TextField(default="")
    rcpt_to = JSONField(default=list)
    raw_path = CharField(max_length=255)
    sha256 = CharField(max_length=64)
    size = IntegerField()
    created_at = DateTimeField(default=utcnow)


class InboundReceipt(BaseModel):
    """One row per Haraka queue id handled, written in the transaction that stored it.

    It makes a redelivered inbound job (the ack was lost) an acknowledged duplicate even when
    the message was unrouted or a duplicate for every user, and tells the spool sweep which
    files are done.
    """

    queue_id = CharField(max_length=64, unique=True)
    outcome = CharField(max_length=16)  # stored | duplicate | unrouted
    stored_count = IntegerField(default=0)
    created_at = DateTimeField(default=utcnow, index=True)
    # Whose spool held it (MAILFERRY_NODE); '' for one host, and for receipts written before
    # receipts named their node. A default in the schema too: not every writer names it.
    node = CharField(max_length=64, default="", constraints=[SQL("DEFAULT ''")])


class PendingDelete(BaseModel):
    """An object no row names any more, to be deleted from storage: written in the transaction
    that deleted its last row, removed once the store has deleted it, so a DELETE that failed
    (or a crash before it) is retried by the next retention run instead of leaking the object.
    Only shared keys of before objects were filed by day (``ab/cd/<sha256>``) need it: those
    are never written again, so nothing can come to name one meanwhile."""

    key = CharField(max_length=255, unique=True)
    created_at = DateTimeField(default=utcnow)


class SpoolFloor(BaseModel):
    """Per host's spool (``node``), reported by its spool sweep: no record left on that spool
    needs a receipt created before ``floor``, so older receipts of that node may go
    (``scheduler.delivery_retention``). A host that stops reporting holds its floor."""

    node = CharField(max_length=64, primary_key=True)
    floor = DateTimeField()
    reported_at = DateTimeField(default=utcnow)

    @classmethod
    def report(cls, node: str, floor: dt.datetime, at: dt.datetime) -> None:
        cls.insert(node=node, floor=floor, reported_at=at).on_conflict(
            conflict_target=[cls.node], update={cls.floor: floor, cls.reported_at: at}).execute()


class AuditLog(BaseModel):
    action = CharField(max_length=64)
    details = JSONField(default=dict)
    created_at = DateTimeField(default=utcnow, index=True)


class SchedulerLease(BaseModel):
    """One row per lease name: whoever holds an unexpired lease is the acting scheduler."""

    name = CharField(max_length=64, primary_key=True)
    holder = CharField(max_length=128)
    expires_at = DateTimeField()
    renewed_at = DateTimeField(default=utcnow)


class IdleLease(BaseModel):
    """Which consumer holds a mailbox in IDLE (``mailferry.idle_leases``): one row per user,
    renewed by its holder; a lease that expired is free for another consumer to take."""

    user = ForeignKeyField(User, primary_key=True, on_delete="CASCADE")
    holder = CharField(max_length=128, index=True)
    expires_at = DateTimeField(index=True)


class IdleHolder(BaseModel):
    """A consumer taking part in the IDLE leases, renewed with them: how the others know it
    is there, and so what their fair share is, before it holds any mailbox."""

    holder = CharField(max_length=128, primary_key=True)
    expires_at = DateTimeField(index=True)


class Event(BaseModel):
    """The outbox: one row per event, written in the transaction that made it happen, and
    published to ``mailferry.events`` by the relay, which then sets ``published_at``.

    ``event_id`` is stable: a UUID made from what happened (``mailferry.outbox.event_id``),
    so the same happening written twice is one row, and a row published twice (the relay
    died between the broker's confirm and its update) carries one id both times.
    """

    event_id = CharField(max_length=36, unique=True)
    type = CharField(max_length=32)  # message.stored | message.unrouted | ...
    user = IntegerField(null=True)  # whose it is, for user-scoped webhooks; no FK: outlives it
    data = JSONField(default=dict)
    created_at = DateTimeField(default=utcnow)
    published_at = DateTimeField(null=True)

    class Meta:
        indexes = ((("published_at", "id"), False),)


class WebhookEndpoint(BaseModel):
    """Where an application wants events POSTed, signed with its own secret (encrypted)."""

    url = TextField()
    secret = TextField()  # Fernet-encrypted "whsec_…", as IMAP passwords are
    events = JSONField(default=list)  # event types wanted; empty: all
    user = ForeignKeyField(User, null=True, backref="webhooks", on_delete="CASCADE")
    enabled = BooleanField(default=True)
    disabled_reason = TextField(null=True)
    failing_since = DateTimeField(null=True)  # first failed attempt since the last success
    created_at = DateTimeField(default=utcnow)


class WebhookAttempt(BaseModel):
    """One POST of one event to one endpoint: what the endpoint answered, and how fast."""

    endpoint = ForeignKeyField(WebhookEndpoint, backref="attempts", on_delete="CASCADE")
    event_id = CharField(max_length=36)
    event_type = CharField(max_length=32)
    attempt = IntegerField()
    outcome = CharField(max_length=16)  # delivered | retry | dead | gone | skipped
    status = IntegerField(null=True)  # the HTTP status; None when there was no answer
    latency_ms = IntegerField(default=0)
    error = TextField(null=True)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        indexes = ((("event_id", "endpoint"), False), (("endpoint", "created_at"), False))


class ApiToken(BaseModel):
    """A bearer token of the read API, kept as its SHA-256 only; ``user`` None sees all."""

    token_hash = CharField(max_length=64, unique=True)
    prefix = CharField(max_length=16)  # the token's first characters, to tell tokens apart
    name = CharField(max_length=100, default="")
    user = ForeignKeyField(User, null=True, backref="api_tokens", on_delete="CASCADE")
    created_at = DateTimeField(default=utcnow)
    last_used_at = DateTimeField(null=True)
    revoked_at = DateTimeField(null=True)


ALL_MODELS = [
    SchemaVersion, User, EmailAlias, Settings, MailboxState, EmailTask, TaskLog,
    EmailMessage, EmailAttachment, UnroutedMessage, InboundReceipt, AuditLog, SchedulerLease,
    Event, WebhookEndpoint, WebhookAttempt, ApiToken, IdleLease, IdleHolder, SpoolFloor,
    PendingDelete,
]
