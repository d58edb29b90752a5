"""The fidelity suite's cases: a message and what its sender meant by it.

A case is raw bytes with the decoded subject, a snippet of the text body and every
attachment's filename, type, size and sha256 (and, inside a forwarded message, the position of
the ``message/rfc822`` attachment it came in). Four sources, one loader each:

- ``corpus``: every message in ``../shared/corpus/flanker/``, expectations in
  ``expected/corpus.toml``;
- ``rfc``: the examples of RFC 2045-2049, 2047, 2231 and 6532, typed from the RFC text into
  ``messages/rfc/``;
- ``clients``: Gmail, Outlook, Apple Mail and Thunderbird layouts, written by hand into
  ``messages/clients/``;
- ``generated``: each decoding class in many charsets (``generated.py``), its expectations
  computed from the text it encodes, never from a parser.

Hand-written messages and the corpus keep their expectations in TOML beside them, so a
reader checks an expectation against the message, not against code.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from mailread.parse import parse_email
from devstack.mailgen import CORPUS
from mailferry.errors import EmailParseError

HERE = Path(__file__).resolve().parent
SOURCES = ("corpus", "rfc", "clients", "generated")


@dataclass(frozen=True)
class Attachment:
    filename: str
    type: str
    size: int
    sha256: str
    enclosed_by: int | None = None

    @classmethod
    def of(cls, filename: str, type: str, data: bytes, enclosed_by: int | None = None) -> "Attachment":
        return cls(filename, type, len(data), hashlib.sha256(data).hexdigest(), enclosed_by)


@dataclass(frozen=True)
class Case:
    source: str
    name: str
    raw: bytes
    subject: str | None = None          # None: not an expectation of this case
    subject_starts: str | None = None   # for a subject too long to write out: its start …
    subject_length: int | None = None   # … and its length
    text: str | None = None             # a snippet the text body holds (whitespace folded)
    text_excludes: tuple[str, ...] = ()  # what must not be in it (MIME headers, nested text)
    html: str | None = None             # a snippet the HTML body holds
    attachments: tuple[Attachment, ...] | None = None
    quarantine: str | None = None       # the message is refused, with this in the reason
    status: str | None = None           # "partial" when the structure had to be recovered
    why: str = ""                       # what the case shows

    @property
    def id(self) -> str:
        return f"{self.source}/{self.name}"


def fold(text: str) -> str:
    return " ".join(text.split())


def load(source: str) -> list[Case]:
    if source == "generated":
        from tests.fidelity import generated
        return generated.cases()
    if source == "corpus":
        return _from_toml("corpus", HERE / "expected" / "corpus.toml", CORPUS)
    return _from_toml(source, HERE / "messages" / source / "expected.toml", HERE / "messages" / source)


def all_cases() -> list[Case]:
    return [case for source in SOURCES for case in load(source)]


def _from_toml(source: str, path: Path, folder: Path) -> list[Case]:
    table = tomllib.loads(path.read_text(encoding="utf-8"))
    files = sorted(p.name for p in folder.glob("*.eml"))
    missing = sorted(set(files) - set(table))
    if missing:  # every message has its expectations: none is skipped by forgetting it
        raise AssertionError(f"{path.name} has no expectations for {missing}")
    out = []
    for name, want in table.items():
        attachments = want.get("attachments")
        out.append(Case(
            source=source, name=name, raw=(folder / name).read_bytes(),
            subject=want.get("subject"), subject_starts=want.get("subject_starts"),
            subject_length=want.get("subject_length"), text=want.get("text"),
            text_excludes=tuple(want.get("text_excludes", ())), html=want.get("html"),
            attachments=None if attachments is None else tuple(
                Attachment(a["filename"], a["type"], a["size"], a["sha256"], a.get("enclosed_by"))
                for a in attachments),
            quarantine=want.get("quarantine"), status=want.get("status"), why=want.get("why", "")))
    return out


def outcome(raw: bytes):
    """What the parser makes of ``raw``: its ParsedEmail, or the reason it refused it."""
    try:
        return parse_email(raw)
    except EmailParseError as exc:
        return str(exc)


def differences(case: Case, parsed, status: str | None = None) -> dict[str, str]:
    """What ``parsed`` (a ParsedEmail, or the reason it was refused) gets wrong about ``case``,
    by measure: ``subject``, ``text`` (text and HTML snippets, status), ``attachments``."""
    out: dict[str, str] = {}
    if isinstance(parsed, str):  # refused with this reason
        if case.quarantine is None or case.quarantine not in parsed:
            out["subject"] = out["text"] = out["attachments"] = f"refused: {parsed}"
        return out
    if case.quarantine is not None:
        out["text"] = f"stored, but should be refused ({case.quarantine})"
        return out
    if case.subject is not None and parsed.subject != case.subject:
        out["subject"] = f"{parsed.subject!r} != {case.subject!r}"
    if case.subject_starts is not None and not (parsed.subject.startswith(case.subject_starts)
                                                and len(parsed.subject) == case.subject_length):
        out["subject"] = f"{parsed.subject[:80]!r} ({len(parsed.subject)}) is not {case.subject_starts!r}…"
    text = fold(parsed.text)
    if case.text is not None and fold(case.text) not in text:
        out["text"] = f"{fold(case.text)[:80]!r} not in {text[:200]!r}"
    for unwanted in case.text_excludes:
        if unwanted in parsed.text:
            out["text"] = f"{unwanted!r} is in the text: {text[:200]!r}"
    if case.html is not None and fold(case.html) not in fold(parsed.html):
        out["text"] = f"{fold(case.html)[:80]!r} not in the HTML {fold(parsed.html)[:200]!r}"
    actual_status = status if status is not None else ("partial" if parsed.warnings else "stored")
    if case.status is not None and actual_status != case.status:
        out["text"] = f"status {actual_status!r} != {case.status!r}"
    if case.attachments is not None:
        got = tuple(Attachment.of(a.filename, a.content_type, a.data, getattr(a, "enclosed_by", None))
                    for a in parsed.attachments)
        if got != case.attachments:
            out["attachments"] = f"{[_short(a) for a in got]} != {[_short(a) for a in case.attachments]}"
    return out


def _short(a: Attachment) -> str:
    nest = f" in #{a.enclosed_by}" if a.enclosed_by is not None else ""
    return f"{a.filename!r} {a.type} {a.size} {a.sha256[:8]}{nest}"
