"""Users' mailbox configuration (the seed's EmailConfigManager): read, validate, store, with the
IMAP password encrypted at rest (Fernet, key from MAILFERRY_SECRET_KEY or <var_dir>/secret.key).

The ``email_config`` Settings row keeps the seed's shape,
``{"imap_config": {host, port, username, password, security, folder, …}, "filter_config": {…}}``;
only the password differs: it is stored as ``fernet:<token>``. A password without that prefix
(a row from before encryption) is read as plain text and encrypted on the next write.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from cryptography.fernet import Fernet, InvalidToken

from mailferry.config import Settings
from mailferry.db import translated, write_transaction
from mailferry.errors import ConfigError, EmailConfigError
from mailferry.models import Settings as SettingsRow
from mailferry.models import TaskSource, User, utcnow

log = logging.getLogger(__name__)

CONFIG_KEY = "email_config"
SECURITY_CHOICES = ("ssl", "starttls", "none")
DEFAULT_PORTS = {"ssl": 993, "starttls": 143, "none": 143}
ENCRYPTED_PREFIX = "fernet:"
# Options a user may change without giving the credentials again (update_fetch_config).
FETCH_OPTIONS = ("folder", "folders", "mark_seen", "move_to", "delete", "idle")
OAUTH2_SECRETS = ("client_secret", "refresh_token")  # encrypted at rest, like the password
ALL_FOLDERS = "*"  # imap_config.folders = ["*"]: every folder but Trash, Junk, Sent, Drafts, All


@dataclass(frozen=True)
class ImapConfig:
    """One user's validated IMAP settings, password in clear: never log or print it whole."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    security: str = "ssl"
    folder: str = "INBOX"
    mark_seen: bool = False  # after saving: set \\Seen on the server (off: the server is left as it was)
    move_to: str | None = None  # after saving: move the message to this folder
    delete: bool = False  # after saving: \\Deleted + UID EXPUNGE of exactly those messages
    ca_file: str | None = None  # extra CA bundle for a server with a private certificate
    # The folders a fetch syncs, each with its own checkpoint; empty: ``folder`` alone;
    # ("*",): all but the SPECIAL-USE \Trash, \Junk, \Sent, \Drafts, \All and ``move_to``.
    folders: tuple[str, ...] = ()
    # OAuth2 instead of the password (mailferry.oauth2): provider, client_id, client_secret,
    # refresh_token, token_url, scopes, mechanism (XOAUTH2 or OAUTHBEARER).
    oauth2: dict | None = field(default=None, repr=False)
    # IMAP IDLE (consumer.imap_idle): True or False for this mailbox; None: as the consumer's
    # ``imap_idle`` setting says (per-mailbox: no, all: yes).
    idle: bool | None = None
    access_token: str | None = field(default=None, repr=False, compare=False)  # never stored

    def wants_idle(self, default: str) -> bool:
        """Held in IDLE by a consumer whose ``imap_idle`` setting is ``default``."""
        if default == "off":
            return False
        return self.idle if self.idle is not None else default == "all"

    @property
    def idle_folder(self) -> str:
        """The folder an IDLE connection watches: the first named one, else INBOX or ``folder``."""
        if self.folders and self.folders != (ALL_FOLDERS,):
            return self.folders[0]
        return "INBOX" if self.folders else self.folder

    @property
    def idle_covers_all(self) -> bool:
        """True when the IDLE folder is every folder a fetch syncs: then the scheduler may
        poll it only as a safety net."""
        return len(self.folders) <= 1 and self.folders != (ALL_FOLDERS,)

    @property
    def changes_server(self) -> bool:
        return self.mark_seen or bool(self.move_to) or self.delete

    def public(self) -> dict[str, Any]:
        """The settings without the password, for `imap show` and log lines."""
        data = asdict(self)
        data["password"] = "(set)" if self.password else "(not set)"
        data.pop("access_token", None)
        if self.oauth2:
            data["oauth2"] = {k: ("(set)" if k in OAUTH2_SECRETS and v else v)
                              for k, v in self.oauth2.items()}
        return data


def validate_imap_config(cfg: dict[str, Any] | None) -> ImapConfig:
    """Check a raw ``imap_config`` dict; EmailConfigError names the first bad field."""
    if not isinstance(cfg, dict):
        raise EmailConfigError("imap_config: missing (expected host, port, username, password, security)")
    oauth2 = cfg.get("oauth2") or None
    if oauth2 is not None:
        if not isinstance(oauth2, dict):
            raise EmailConfigError("imap_config.oauth2: must be an object")
        from mailferry.oauth2 import resolved  # checks what it needs
        resolved(oauth2)
        if str(oauth2.get("mechanism", "XOAUTH2")).upper() not in ("XOAUTH2", "OAUTHBEARER"):
            raise EmailConfigError("imap_config.oauth2.mechanism: XOAUTH2 or OAUTHBEARER")
    for name in ("host", "port", "username") + (() if oauth2 else ("password",)):
        value = cfg.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise EmailConfigError(f"imap_config.{name}: required")
    host = str(cfg["host"]).strip()
    if any(c.isspace() for c in host) or "/" in host:
        raise EmailConfigError(f"imap_config.host: {host!r} is not a host name or address")
    try:
        port = int(cfg["port"])
        if isinstance(cfg["port"], bool) or str(port) != str(cfg["port"]).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise EmailConfigError(f"imap_config.port: {cfg['port']!r} is not a whole number") from None
    if not 1 <= port <= 65535:
        raise EmailConfigError(f"imap_config.port: {port} must be between 1 and 65535")
    security = str(cfg.get("security") or "ssl").strip().lower()
    if security not in SECURITY_CHOICES:
        raise EmailConfigError(
            f"imap_config.security: {cfg.get('security')!r} must be one of {', '.join(SECURITY_CHOICES)}")
    folder = str(cfg.get("folder") or "INBOX").strip()
    if not folder or any(c in folder for c in "\r\n\0"):
        raise EmailConfigError(f"imap_config.folder: {folder!r} is not a folder name")
    mark_seen = cfg.get("mark_seen", False)
    if not isinstance(mark_seen, bool):
        raise EmailConfigError(f"imap_config.mark_seen: {mark_seen!r} must be true or false")
    move_to = cfg.get("move_to") or None
    if move_to is not None:
        move_to = str(move_to).strip()
        if not move_to or any(c in move_to for c in "\r\n\0"):
            raise EmailConfigError(f"imap_config.move_to: {move_to!r} is not a folder name")
        if move_to == folder:
            raise EmailConfigError("imap_config.move_to: must differ from imap_config.folder")
    delete = cfg.get("delete", False)
    if not isinstance(delete, bool):
        raise EmailConfigError(f"imap_config.delete: {delete!r} must be true or false")
    if delete and move_to:
        raise EmailConfigError("imap_config.delete and move_to: choose one")
    idle = cfg.get("idle")
    if idle is not None and not isinstance(idle, bool):
        raise EmailConfigError(f"imap_config.idle: {idle!r} must be true, false or absent")
    ca_file = cfg.get("ca_file") or None
    folders = _folders(cfg.get("folders"), move_to)
    return ImapConfig(host=host, port=port, username=str(cfg["username"]),
                      password=str(cfg.get("password") or ""), security=security, folder=folder,
                      mark_seen=mark_seen, move_to=move_to, ca_file=str(ca_file) if ca_file else None,
                      folders=folders, delete=delete, oauth2=dict(oauth2) if oauth2 else None,
                      idle=idle)


def active_imap_configs() -> Iterator[tuple[int, Any]]:
    """(user id, stored ``imap_config`` or None) of every active user with an active
    ``email_config`` row, by user id, in one query; secrets still encrypted (the scheduler
    and the IDLE lane only validate them)."""
    query = (SettingsRow.select(SettingsRow.user, SettingsRow.value)
             .join(User, on=(SettingsRow.user == User.id))
             .where(SettingsRow.key == CONFIG_KEY, SettingsRow.is_active == True,  # noqa: E712
                    User.is_active == True)  # noqa: E712
             .order_by(SettingsRow.user).tuples())
    for user_id, value in query:
        yield user_id, value.get("imap_config") if isinstance(value, dict) else None


def _folders(value, move_to: str | None) -> tuple[str, ...]:
    if value in (None, "", []):
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise EmailConfigError(f"imap_config.folders: {value!r} must be a list of folder names")
    names = tuple(dict.fromkeys(v.strip() for v in value))
    for name in names:
        if not name or any(c in name for c in "\r\n\0"):
            raise EmailConfigError(f"imap_config.folders: {name!r} is not a folder name")
    if ALL_FOLDERS in names and len(names) > 1:
        raise EmailConfigError('imap_config.folders: "*" (all folders) stands alone')
    if move_to is not None and move_to in names:
        raise EmailConfigError("imap_config.folders: must not hold move_to (mail moved there "
                               "would be fetched again)")
    return names


def load_fernet(settings: Settings) -> Fernet:
    """The Fernet of MAILFERRY_SECRET_KEY, or of <var_dir>/secret.key (made once, mode 0600)."""
    key = settings.secret_key.strip() if settings.secret_key else _key_file(settings.var_dir)
    try:
        return Fernet(key.encode("ascii") if isinstance(key, str) else key)
    except (ValueError, TypeError, UnicodeEncodeError):
        where = "MAILFERRY_SECRET_KEY" if settings.secret_key else f"{Path(settings.var_dir) / 'secret.key'}"
        raise ConfigError(f"{where}: not a Fernet key (32 url-safe base64-encoded "
                          "bytes; make one with `python -c 'from cryptography.fernet import "
                          "Fernet; print(Fernet.generate_key().decode())'`)") from None


def check_secret_key(settings: Settings) -> None:
    """At start: the key that decrypts stored passwords is usable and private, or a
    ConfigError that says what to do. A missing file is fine (it is made when first needed)."""
    if settings.secret_key:
        load_fernet(settings)
        return
    path = Path(settings.var_dir) / "secret.key"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file; it must hold the Fernet key")
    if info.st_mode & 0o077:
        raise ConfigError(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets other users read "
                          f"the key that decrypts IMAP passwords; run `chmod 600 {path}`")
    if not path.read_text(errors="replace").strip():
        raise ConfigError(f"{path}: empty. Restore it from the backup kept with the database "
                          "(stored IMAP passwords cannot be read without it), or remove it to "
                          "make a new key and set the passwords again")
    load_fernet(settings)


def _key_file(var_dir: Path) -> str:
    path = Path(var_dir) / "secret.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting at once must not each write a different key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(Fernet.generate_key().decode("ascii") + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.info("created %s: the key that encrypts IMAP passwords; keep it with the database", path)
    return path.read_text().strip()


class EmailConfigManager:
    """Reads and writes users' ``email_config`` rows; the only code that sees the key."""

    def __init__(self, settings: Settings):
        self.fernet = load_fernet(settings)

    # -- reading ---------------------------------------------------------------------------

    def get_email_config(self, user: User | int) -> dict[str, Any] | None:
        """The user's active email_config (password decrypted), or None if there is none."""
        row = _row(user)
        if row is None or not row.is_active or not isinstance(row.value, dict):
            return None
        value = dict(row.value)
        if isinstance(value.get("imap_config"), dict):
            imap = dict(value["imap_config"])
            if imap.get("password"):
                imap["password"] = self._decrypt(imap["password"])
            if isinstance(imap.get("oauth2"), dict):
                imap["oauth2"] = {k: (self._decrypt(v) if k in OAUTH2_SECRETS and v else v)
                                  for k, v in imap["oauth2"].items()}
            value["imap_config"] = imap
        return value

    def get_imap_config(self, user: User | int) -> ImapConfig:
        """The user's validated IMAP configuration; EmailConfigError if none or invalid."""
        value = self.get_email_config(user)
        if not value or not value.get("imap_config"):
            raise EmailConfigError(f"user {_user_id(user)} has no IMAP configuration")
        return validate_imap_config(value["imap_config"])

    def detect_email_source(self, user: User | int) -> str:
        """IMAP_EMAIL_FETCH for a user with an active IMAP configuration, else HARAKA_EMAIL_FETCH."""
        value = self.get_email_config(user)
        return TaskSource.IMAP if value and value.get("imap_config") else TaskSource.HARAKA

    # -- writing ---------------------------------------------------------------------------

    def set_imap_config(self, user: User | int, cfg: dict[str, Any]) -> ImapConfig:
        """Validate and store a whole IMAP configuration (filter_config is kept)."""
        config = validate_imap_config(cfg)
        self._write(user, config)
        return config

    def update_fetch_config(self, user: User | int, **changes: Any) -> ImapConfig:
        """Change fetch options (folder, mark_seen, move_to) and keep the credentials."""
        unknown = sorted(set(changes) - set(FETCH_OPTIONS))
        if unknown:
            raise EmailConfigError(f"imap_config.{unknown[0]}: not a fetch option "
                                   f"(one of {', '.join(FETCH_OPTIONS)})")
        current = self.get_imap_config(user)
        merged = asdict(current)
        merged.update(changes)
        config = validate_imap_config(merged)
        self._write(user, config)
        return config

    def _write(self, user: User | int, config: ImapConfig) -> None:
        stored = {k: v for k, v in asdict(config).items() if v is not None and k != "access_token"}
        stored["password"] = self._encrypt(config.password) if config.password else ""
        if config.oauth2:
            stored["oauth2"] = {k: (self._encrypt(v) if k in OAUTH2_SECRETS and v else v)
                                for k, v in config.oauth2.items()}
        # A write transaction from the start: on SQLite a read snapshot that must become a
        # write fails at once if another connection committed meanwhile (the IDLE lane does).
        with translated("storing a mailbox configuration"), write_transaction():
            row = _row(user)
            if row is None:
                SettingsRow.create(user=_user_id(user), key=CONFIG_KEY,
                                   value={"imap_config": stored, "filter_config": {}})
                return
            value = dict(row.value) if isinstance(row.value, dict) else {}
            value["imap_config"] = stored
            value.setdefault("filter_config", {})
            (SettingsRow.update(value=value, is_active=True, updated_at=utcnow())
             .where(SettingsRow.id == row.id).execute())

    def save_refresh_token(self, user: User | int, token: str) -> None:
        """The provider rotated the mailbox's refresh token: keep the new one."""
        config = self.get_imap_config(user)
        self._write(user, replace(config, oauth2={**(config.oauth2 or {}), "refresh_token": token}))

    def encrypt_secret(self, value: str) -> str:
        return self._encrypt(value)

    def decrypt_secret(self, stored: str) -> str:
        return self._decrypt(stored)

    # -- the key ----------------------------------------------------------------------------

    def _encrypt(self, password: str) -> str:
        return ENCRYPTED_PREFIX + self.fernet.encrypt(password.encode("utf-8")).decode("ascii")

    def _decrypt(self, stored: str) -> str:
        if not stored.startswith(ENCRYPTED_PREFIX):
            return stored  # written before encryption; encrypted on the next write
        try:
            return self.fernet.decrypt(stored[len(ENCRYPTED_PREFIX):].encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise EmailConfigError(
                "imap_config.password: cannot be decrypted with this MAILFERRY_SECRET_KEY "
                "(was the key changed?); set it again with `mailferry imap set`") from None


def _user_id(user: User | int) -> int:
    return user if isinstance(user, int) else user.id


def _row(user: User | int) -> SettingsRow | None:
    with translated("reading a mailbox configuration"):
        return SettingsRow.get_or_none((SettingsRow.user == _user_id(user)) & (SettingsRow.key == CONFIG_KEY))
