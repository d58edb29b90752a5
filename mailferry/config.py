"""Settings: read once from MAILFERRY_* variables (and an optional TOML file), validated, frozen.

Precedence: environment over the TOML file named by MAILFERRY_CONFIG over the defaults below.
The defaults run on one machine: SQLite, a local RabbitMQ, folders under ``var/``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mailferry.errors import ConfigError

QUEUE_TYPES = ("classic", "quorum")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _meta(help: str, *, minimum: int | None = None, maximum: int | None = None,
          choices: tuple[str, ...] | None = None, scheme: tuple[str, ...] | None = None) -> dict:
    return {"help": help, "minimum": minimum, "maximum": maximum, "choices": choices,
            "scheme": scheme}


@dataclass(frozen=True)
class Settings:
    var_dir: Path = field(default=Path("var"), metadata=_meta(
        "folder that holds the default database, spool and storage"))
    amqp_url: str = field(default="amqp://guest:guest@127.0.0.1:5672/%2F", metadata=_meta(
        "RabbitMQ URL; for a cluster, the nodes' URLs separated by commas, tried in that order "
        "(each host lists a different node first), with queue_type = quorum",
        scheme=("amqp", "amqps")))
    management_url: str = field(default="http://guest:guest@127.0.0.1:15672", metadata=_meta(
        "RabbitMQ management API URL (for `mailferry status`)", scheme=("http", "https")))
    node: str = field(default="", metadata=_meta(
        "this host's name where several hosts each run Haraka and consumers: its Haraka "
        "publishes to routing key inbound.<node>, and only this host's consumers take "
        "mailferry.inbound.<node>, since the spool is this host's disk; empty: one host"))
    database_url: str = field(default="", metadata=_meta(
        "database URL; empty means sqlite:///<var_dir>/mailferry.db",
        scheme=("sqlite", "postgresql", "postgres")))
    spool_dir: Path = field(default=Path(""), metadata=_meta(
        "spool root shared with Haraka; empty means <var_dir>/spool"))
    storage_dir: Path = field(default=Path(""), metadata=_meta(
        "root of raw messages and attachments; empty means <var_dir>/storage"))
    storage_url: str = field(default="", metadata=_meta(
        "where raw messages and attachments are kept: empty (the folder storage_dir), "
        "file:///PATH, or s3://BUCKET/PREFIX for S3-compatible object storage (s3_* settings)",
        scheme=("file", "s3")))
    s3_endpoint: str = field(default="", metadata=_meta(
        "S3 endpoint URL for an s3:// storage_url; empty means AWS's for s3_region",
        scheme=("http", "https")))
    s3_region: str = field(default="us-east-1", metadata=_meta("S3 region"))
    s3_access_key_id: str = field(default="", metadata=_meta(
        "S3 access key; empty means the AWS SDKs' own lookup (AWS_* variables, a role)"))
    s3_secret_access_key: str = field(default="", metadata=_meta("S3 secret key"))
    storage_concurrency: int = field(default=16, metadata=_meta(
        "object-storage requests in flight per batch (s3:// storage only)",
        minimum=1, maximum=256))
    body_storage: str = field(default="database", metadata=_meta(
        "where a message's text and HTML bodies are kept: database (in its row) or storage "
        "(objects beside its raw source, the row keeping their keys; for a database that would "
        "otherwise grow by the bodies, most of its size)", choices=("database", "storage")))
    storage_sync: str = field(default="auto", metadata=_meta(
        "how a batch's files are made durable: auto (one syncfs per batch where Linux reports "
        "its errors, else fsync) or fsync (each file; for storage sharing a filesystem with a "
        "busy database)", choices=("auto", "fsync")))
    secret_key: str = field(default="", metadata=_meta(
        "Fernet key for IMAP passwords at rest; empty means <var_dir>/secret.key, made once"))
    queue_type: str = field(default="classic", metadata=_meta(
        "RabbitMQ queue type", choices=QUEUE_TYPES))
    prefetch: int = field(default=512, metadata=_meta(
        "messages a consumer holds unacked; a batch per commit is a quarter of it"
        ", and at most 16 MB of mail",
        minimum=1, maximum=10_000))
    parse_process: str = field(default="auto", metadata=_meta(
        "parse inbound mail in a helper process: on, off, or auto (on with two or more cores)",
        choices=("auto", "on", "off")))
    log_level: str = field(default="INFO", metadata=_meta("log level", choices=LOG_LEVELS))
    # Parse limits: a message over one of them is quarantined with the reason.
    max_message_bytes: int = field(default=50 * 1024 * 1024, metadata=_meta(
        "largest message accepted, in bytes", minimum=1024))
    max_mime_parts: int = field(default=1_000, metadata=_meta(
        "most MIME parts in one message", minimum=1))
    max_mime_depth: int = field(default=20, metadata=_meta(
        "deepest MIME nesting in one message", minimum=1))
    max_header_bytes: int = field(default=1024 * 1024, metadata=_meta(
        "largest header block of a message, in bytes", minimum=1024))
    max_addresses: int = field(default=1_000, metadata=_meta(
        "most addresses in To/Cc/envelope recipients of one message", minimum=1))
    # Tasks and scheduling.
    schedule_interval: int = field(default=60, metadata=_meta(
        "seconds between scheduler ticks", minimum=1, maximum=86_400))
    task_timeout: int = field(default=600, metadata=_meta(
        "seconds a RUNNING fetch task may take before the watchdog cancels it", minimum=1))
    fetch_job_ttl: int = field(default=300, metadata=_meta(
        "seconds a fetch job may wait in its queue before it expires", minimum=1))
    spool_sweep_age: int = field(default=300, metadata=_meta(
        "seconds after which an unclaimed spool file is republished", minimum=10))
    spool_segment_idle: int = field(default=30, metadata=_meta(
        "seconds a spool segment must be unwritten before the sweep reads it (more than the "
        "plugin's segment_seconds)", minimum=2))
    lease_seconds: int = field(default=30, metadata=_meta(
        "seconds a scheduler's lease lasts without renewal", minimum=2))
    retention_completed_days: int = field(default=1, metadata=_meta(
        "days completed tasks are kept", minimum=0))
    retention_failed_days: int = field(default=7, metadata=_meta(
        "days failed tasks are kept", minimum=0))
    retention_cancelled_days: int = field(default=1, metadata=_meta(
        "days cancelled and skipped tasks are kept", minimum=0))
    retention_message_days: int = field(default=0, metadata=_meta(
        "days stored messages, their attachments and unrouted mail are kept; then they are "
        "deleted, and their objects in storage within two days more. 0 keeps them for ever",
        minimum=0))
    retention_event_days: int = field(default=30, metadata=_meta(
        "days published events, webhook attempts and inbound receipts are kept (unpublished "
        "events always are, and receipts while a spool may hold their mail). 0 keeps them "
        "for ever", minimum=0))
    retention_batch_size: int = field(default=1_000, metadata=_meta(
        "tasks, messages or events deleted per retention batch", minimum=1))
    imap_batch_size: int = field(default=100, metadata=_meta(
        "messages fetched from IMAP per batch (one checkpoint per batch)", minimum=1))
    imap_batch_bytes: int = field(default=16 * 1024 * 1024, metadata=_meta(
        "most bytes of mail in one IMAP batch (a batch holds at least one message)",
        minimum=64 * 1024))
    imap_timeout: int = field(default=30, metadata=_meta(
        "seconds for IMAP connect and read", minimum=1))
    imap_fetch_deadline: int = field(default=120, metadata=_meta(
        "seconds one IMAP fetch may take in all before its socket is closed (a server that "
        "trickles bytes passes every read timeout); the next attempt goes on from the checkpoint",
        minimum=5))
    imap_lanes: int = field(default=2, metadata=_meta(
        "IMAP fetches one consumer runs at once: a slow server holds up only its own lane",
        minimum=1, maximum=32))
    imap_idle: str = field(default="per-mailbox", metadata=_meta(
        "IMAP IDLE in this consumer: off; per-mailbox (mailboxes set with idle); all (every "
        "mailbox whose server has IDLE, but those set with no-idle)",
        choices=("off", "per-mailbox", "all")))
    imap_idle_lease: int = field(default=60, metadata=_meta(
        "seconds a consumer's hold on an IDLE mailbox lasts unless renewed: when a consumer "
        "dies, its mailboxes are held elsewhere within about this long", minimum=10, maximum=3600))
    imap_idle_max: int = field(default=5000, metadata=_meta(
        "IDLE mailboxes one consumer holds at most (it takes its fair share of them, up to this)",
        minimum=1, maximum=100_000))
    imap_idle_renew: int = field(default=1500, metadata=_meta(
        "seconds an IDLE command is held before it is renewed (RFC 2177: servers may drop "
        "one after 30 minutes)", minimum=5, maximum=1740))
    imap_idle_poll_interval: int = field(default=900, metadata=_meta(
        "seconds between the scheduler's safety-net polls of a mailbox held in IDLE",
        minimum=60))
    imap_idle_connects: int = field(default=4, metadata=_meta(
        "IDLE connections this consumer opens at once (reconnect storms are bounded by it "
        "and by imap_idle_connect_rate)", minimum=1, maximum=64))
    imap_idle_connect_rate: int = field(default=50, metadata=_meta(
        "IDLE connections this consumer opens per second at most", minimum=1))
    # Metrics and health: one port per long-running process.
    metrics_host: str = field(default="127.0.0.1", metadata=_meta("address metrics listen on"))
    consumer_metrics_port: int = field(default=9101, metadata=_meta(
        "consumer /metrics port (0 turns it off)", minimum=0, maximum=65_535))
    scheduler_metrics_port: int = field(default=9102, metadata=_meta(
        "scheduler /metrics port (0 turns it off)", minimum=0, maximum=65_535))

    relay_metrics_port: int = field(default=9103, metadata=_meta(
        "relay /metrics port (0 turns it off)", minimum=0, maximum=65_535))
    relay_poll_ms: int = field(default=100, metadata=_meta(
        "milliseconds the relay waits when the outbox is empty", minimum=10, maximum=60_000))
    # Webhooks and the read API.
    webhook_automatic: str = field(default="deliver", metadata=_meta(
        "automatic mail (auto-replies, bulk, loops, bounces) in message.stored webhooks: "
        "deliver (flagged in the body) or skip; message.bounced is always delivered",
        choices=("deliver", "skip")))
    webhook_schedule: str = field(default="5,30,120,600,1800,3600,7200,10800,10800",
                                  metadata=_meta(
        "seconds before each retry of a failed webhook delivery (comma-separated); one more "
        "attempt than delays"))
    webhook_metrics_port: int = field(default=9104, metadata=_meta(
        "webhook worker /metrics port (0 turns it off)", minimum=0, maximum=65_535))
    webhook_nice: int = field(default=10, metadata=_meta(
        "how much lower the CPU priority of the relay and the webhook worker is (nice): "
        "storing mail comes first",
        minimum=0, maximum=19))
    webhook_timeout: int = field(default=10, metadata=_meta(
        "seconds a webhook POST may take", minimum=1, maximum=300))
    webhook_body_limit: int = field(default=256 * 1024, metadata=_meta(
        "characters of text and of HTML a payload carries; longer bodies are cut and flagged",
        minimum=0))
    api_host: str = field(default="127.0.0.1", metadata=_meta("address the read API listens on"))
    api_port: int = field(default=8025, metadata=_meta(
        "port of the read API", minimum=1, maximum=65_535))
    api_threads: int = field(default=16, metadata=_meta(
        "requests one API process serves at once: each runs in a thread that keeps one "
        "database connection, so this bounds the process's connections too",
        minimum=1, maximum=256))
    api_base_url: str = field(default="", metadata=_meta(
        "the read API's public URL, for the links in payloads; empty means http://<api_host>:<api_port>"))

    @property
    def webhook_delays(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.webhook_schedule.split(",") if part.strip())

    @property
    def amqp_urls(self) -> list[str]:
        """The broker nodes of ``amqp_url``, in the order they are tried."""
        return split_urls(self.amqp_url)

    @property
    def resolved_api_base_url(self) -> str:
        return (self.api_base_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.var_dir / 'mailferry.db').resolve()}"

    @property
    def resolved_spool_dir(self) -> Path:
        return (self.spool_dir if str(self.spool_dir) not in ("", ".") else self.var_dir / "spool").resolve()

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir if str(self.storage_dir) not in ("", ".") else self.var_dir / "storage").resolve()

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


def split_urls(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def env_name(name: str) -> str:
    return "MAILFERRY_" + name.upper()


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from the environment; raise ConfigError naming the bad field."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    config_file = environ.get("MAILFERRY_CONFIG")
    if config_file:
        raw.update(_read_toml(Path(config_file)))
    for f in dataclasses.fields(Settings):
        if env_name(f.name) in environ:
            raw[f.name] = environ[env_name(f.name)]
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Settings)})
    if unknown:
        raise ConfigError(f"{config_file}: unknown setting(s) {', '.join(unknown)}")
    values = {f.name: _convert(f, raw[f.name]) for f in dataclasses.fields(Settings) if f.name in raw}
    _check_node(values.get("node", ""))
    settings = Settings(**values)
    _check_cluster(settings)
    return settings


def _check_node(name: str) -> None:
    if name and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,39}", name):
        raise ConfigError(f"MAILFERRY_NODE={name!r}: lower-case letters, digits and '-', "
                          "at most 40 (it names a queue and a routing key)")


def _check_cluster(settings: Settings) -> None:
    """Several broker nodes need quorum queues: a classic queue lives on one node, and while
    that node is down the queue is gone for every process, whichever node it reached."""
    nodes = len(settings.amqp_urls)
    if (settings.node or nodes > 1) and settings.resolved_database_url.startswith("sqlite:"):
        why = f"MAILFERRY_NODE={settings.node}" if settings.node else f"{nodes} RabbitMQ nodes"
        raise ConfigError(
            f"{why} means more than one host, and SQLite is a file on one host: set "
            "MAILFERRY_DATABASE_URL=postgresql://… (one database every host reaches)")
    if nodes > 1 and settings.queue_type != "quorum":
        raise ConfigError(
            f"MAILFERRY_AMQP_URL names {nodes} RabbitMQ nodes but MAILFERRY_QUEUE_TYPE="
            f"{settings.queue_type}: a classic queue is unavailable while its one node is down; "
            "set MAILFERRY_QUEUE_TYPE=quorum")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"MAILFERRY_CONFIG: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"MAILFERRY_CONFIG: {path} is not valid TOML: {exc}") from exc
    return data.get("mailferry", data)


def _convert(f: dataclasses.Field, value: Any) -> Any:
    name, meta = env_name(f.name), f.metadata
    if f.type in ("int", int):
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{name}={value!r}: expected a whole number ({meta['help']})") from None
        low, high = meta["minimum"], meta["maximum"]
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{name}={number}: must be {bounds} ({meta['help']})")
        return number
    if f.type in ("Path", Path):
        return Path(str(value))
    text = str(value).strip()
    if meta["choices"]:
        normal = text.upper() if f.name == "log_level" else text.lower()
        if normal not in meta["choices"]:
            raise ConfigError(f"{name}={text!r}: must be one of {', '.join(meta['choices'])}")
        return normal
    if meta["scheme"] and text:
        for url in (split_urls(text) if f.name == "amqp_url" else [text]):
            scheme = url.split("://", 1)[0].lower() if "://" in url else ""
            if scheme not in meta["scheme"]:
                accepted = ", ".join(s + "://" for s in meta["scheme"])
                raise ConfigError(f"{name}={redact_url(url)!r}: must start with {accepted}")
    return text


# Query parameters that carry a secret in the URLs people write (psycopg2 and RabbitMQ take
# ``?password=``; tokens and keys travel the same way).
_SECRET_PARAMS = ("password", "passwd", "pass", "pwd", "secret", "token", "key", "auth")


def redact_url(url: str) -> str:
    """``url`` fit to print: the password in its userinfo and every secret-looking query
    parameter replaced by ``***``. Anything that is not a URL is returned as it is."""
    if "://" not in url:
        return url
    nodes = split_urls(url)
    if len(nodes) > 1 and all("://" in node for node in nodes):  # a cluster's list
        return ",".join(redact_url(node) for node in nodes)
    scheme, rest = url.split("://", 1)
    base, query_mark, query = rest.partition("?")
    if "@" in base:
        creds, host = base.rsplit("@", 1)
        user, has_password, _ = creds.partition(":")
        base = f"{user}:***@{host}" if has_password else f"{user}@{host}"
    if query_mark:
        parts = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            secret = any(word in name.lower() for word in _SECRET_PARAMS)
            parts.append(f"{name}=***" if eq and secret else item)
        query = "&".join(parts)
    return f"{scheme}://{base}{query_mark}{query}"
