"""Parsing: raw RFC 5322 bytes -> one plain ``ParsedEmail`` value.

flanker gives the MIME tree, of a copy tidied for it (``mailread.repair``);
headers are read from their raw bytes with the standard library (flanker returns None for
some Message-IDs that are present, and decodes some charsets wrongly), and text is decoded
here with the rules of ``mailread.charsets``; a multipart flanker cannot split is recovered
(``_recovered``). Limits are checked before and during the walk, so an oversized or absurdly
nested message becomes an EmailParseError with a reason instead of eating the worker.
DESIGN.md, "Decoding", says why each piece is ours.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass, field
from email import message_from_string
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses, parsedate_to_datetime

from mailread.charsets import decode_header_bytes, decode_header_value, decode_text, without_surrogates
from mailread.legacy import BINHEX_TYPES, type_for, unbinhex, uuencoded_files
from mailread.quiet_flanker import Stream, decode_body, flanker_errors, mime, transfer_decode
from mailread.repair import (HEADER_END as _HEADER_END, GLOBAL_MARKER, declared_charset, for_flanker,
                             original_type, tidy_header_block, with_found_boundary,
                             with_header_blocks_ended)
from mailread.understand import Understanding, understand
from mailferry.config import Settings
from mailferry.errors import EmailParseError

MESSAGE_ID_RE = re.compile(r"<([^<>\s\x00-\x1f\x7f]+)>")
MAX_MESSAGE_ID_LEN = 500
_BARE_ADDRESS = re.compile(r"[^\s<>()\[\]\\,;:\"@]+@[^\s<>()\[\]\\,;:\"@]+")
# Charsets chardet guesses for short raw UTF-8 strings (see _repair_mojibake).
_MOJIBAKE_GUESSES = ("mac_roman", "mac_latin2", "cp1252", "cp1250", "cp1257", "latin-1")


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 50 * 1024 * 1024
    max_mime_parts: int = 1_000
    max_mime_depth: int = 20
    max_header_bytes: int = 1024 * 1024
    max_addresses: int = 1_000

    @classmethod
    def from_settings(cls, s: Settings) -> "Limits":
        return cls(s.max_message_bytes, s.max_mime_parts, s.max_mime_depth,
                   s.max_header_bytes, s.max_addresses)


@dataclass
class ParsedAttachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    is_inline: bool = False
    # Inside a forwarded message: the position, in this list, of the message/rfc822
    # attachment it came in (which may itself be inside another).
    enclosed_by: int | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_image(self) -> bool:
        return self.content_type.startswith("image/")


@dataclass
class ParsedEmail:
    message_id: str
    subject: str
    sender: str
    to: list[str]
    cc: list[str]
    reply_to: list[str]
    date: dt.datetime | None
    in_reply_to: str | None
    references: list[str]
    text: str
    html: str
    attachments: list[ParsedAttachment]
    size: int
    sha256: str
    nested_subjects: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    understanding: Understanding | None = None  # mailread.understand: reply, automatic, bounce, thread


def parse_email(raw: bytes, limits: Limits = Limits()) -> ParsedEmail:
    """Parse ``raw``; raise EmailParseError with a readable reason if it cannot be used.

    The one boundary around the parse of one message: whatever flanker, the standard
    library or the charset layer raise on hostile bytes (RecursionError from nested
    comments, LookupError, ValueError, UnicodeError, flanker's DecodingError) becomes this
    message's EmailParseError, with the exception named, so it is quarantined with a reason
    and never fails its batch, its queue or its process.
    """
    try:
        return _parse(raw, limits)
    except EmailParseError:
        raise
    except RecursionError as exc:
        raise EmailParseError(f"cannot parse: RecursionError (structure nests too deeply): {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - hostile input may raise anything
        raise EmailParseError(f"cannot parse: {type(exc).__name__}: {exc}"[:500]) from exc


def _parse(raw: bytes, limits: Limits) -> ParsedEmail:
    if len(raw) > limits.max_message_bytes:
        raise EmailParseError(
            f"message is {len(raw)} bytes, over the limit of {limits.max_message_bytes}")
    header_end = _HEADER_END.search(raw)
    header_size = header_end.start() if header_end else len(raw)
    if header_size > limits.max_header_bytes:
        raise EmailParseError(
            f"header block is {header_size} bytes, over the limit of {limits.max_header_bytes}")
    sha256, size = hashlib.sha256(raw).hexdigest(), len(raw)
    ended = with_header_blocks_ended(raw)
    if ended is not raw:
        raw, header_end = ended, _HEADER_END.search(ended)
    tidied = tidy_header_block(raw, header_end)  # for the parsers' eyes; the hash is of what came
    if tidied is not raw:
        raw, header_end = tidied, _HEADER_END.search(tidied)
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    charset = declared_charset(raw)

    to = _addresses(_raw_all(headers, "To"), charset)
    cc = _addresses(_raw_all(headers, "Cc"), charset)
    if len(to) + len(cc) > limits.max_addresses:
        raise EmailParseError(
            f"message has {len(to) + len(cc)} To/Cc addresses, over the limit of {limits.max_addresses}")

    try:
        parts = _split(raw, limits, charset)
        broken = _lost_body(parts, raw, headers, header_end)
    except flanker_errors as exc:
        parts, broken = None, str(exc)
    if broken is not None:
        parts = _recovered(raw, headers, header_end, limits, broken, charset)
    text, html, attachments, nested, warnings = parts

    senders = _addresses(_raw_all(headers, "From"), charset)
    parsed = ParsedEmail(
        message_id=message_id_of(headers.get("Message-ID"), sha256),
        subject=decode_header_bytes(b" ".join(_raw_all(headers, "Subject")[:1]), charset),
        sender=senders[0] if senders else "",
        to=to,
        cc=cc,
        reply_to=_addresses(_raw_all(headers, "Reply-To"), charset),
        date=_date(headers.get("Date")),
        in_reply_to=_first_id(headers.get("In-Reply-To")),
        references=[f"<{ref}>" for ref in MESSAGE_ID_RE.findall(_str(headers.get("References")))[:100]],
        text=text,
        html=html,
        attachments=attachments,
        size=size,
        sha256=sha256,
        nested_subjects=nested,
        warnings=warnings,
    )
    parsed.understanding = _understood(raw, headers, parsed)
    return parsed


def _understood(raw: bytes, headers, parsed: ParsedEmail) -> Understanding | None:
    """The message's reading; None (with a warning) when hostile bytes defeat it: the
    message is still stored, only its reading is missing."""
    try:
        return understand(raw, headers, subject=parsed.subject, text=parsed.text,
                          html=parsed.html, in_reply_to=parsed.in_reply_to,
                          references=parsed.references)
    except RecursionError as exc:
        parsed.warnings.append(f"not understood: RecursionError: {exc}"[:300])
    except Exception as exc:  # noqa: BLE001 - hostile input may raise anything
        parsed.warnings.append(f"not understood: {type(exc).__name__}: {exc}"[:300])
    return None


def message_id_of(header: str | None, sha256: str) -> str:
    """The Message-ID as ``<id>``; one made from the content hash when there is none."""
    found = MESSAGE_ID_RE.search(_str(header))
    if found and len(found.group(0)) <= MAX_MESSAGE_ID_LEN:
        return found.group(0)
    bare = _str(header).strip()
    if bare and bare.isprintable() and " " not in bare and len(bare) + 2 <= MAX_MESSAGE_ID_LEN:
        return f"<{bare}>"  # some senders omit the brackets
    return f"<{sha256}@mailferry>"


def _walk(root, limits: Limits, charset: str | None):
    text_parts: list[str] = []
    html_parts: list[str] = []
    attachments: list[ParsedAttachment] = []
    nested: list[str] = []
    warnings: list[str] = []
    count = 0
    # Iterative walk with explicit depth: flanker's own walk has no depth bound. ``inside`` is
    # the position of the forwarded message a part is in (None: the message itself).
    stack = [(root, 0, None)]
    while stack:
        part, depth, inside = stack.pop()
        count += 1
        if count > limits.max_mime_parts:
            raise EmailParseError(f"message has more than {limits.max_mime_parts} MIME parts")
        if depth > limits.max_mime_depth:
            raise EmailParseError(f"MIME nesting deeper than {limits.max_mime_depth} levels")
        ctype = part.content_type
        if ctype.is_multipart():
            stack.extend((child, depth + 1, inside) for child in reversed(part.parts))
            continue
        if ctype.is_message_container() and part.enclosed is not None:
            attachments.append(_enclosed_attachment(part, inside))
            if inside is None:
                nested.append(decode_header_value(_str(part.enclosed.headers.get("Subject"))))
            stack.append((part.enclosed, depth + 1, len(attachments) - 1))
            continue
        disposition = (part.content_disposition[0] or "").lower()
        filename = _filename(part, charset)
        is_body_text = (ctype.main == "text" and ctype.sub in ("plain", "html")
                        and disposition != "attachment" and not filename)
        if is_body_text:
            if inside is not None:
                continue  # a forwarded message's text stays in its .eml, out of this body
            decoded, lossy = decode_text(transfer_decode(part), ctype.params.get("charset"))
            if lossy:
                warnings.append(f"text part in {ctype.params.get('charset')!r} decoded lossily")
            if ctype.sub == "plain":
                decoded, found = uuencoded_files(decoded)
                attachments.extend(ParsedAttachment(name, type_for(name), data) for name, data in found)
            (html_parts if ctype.sub == "html" else text_parts).append(decoded)
            continue
        data = transfer_decode(part)
        if not data and not filename:
            continue  # an empty non-text leaf (e.g. a bare multipart preamble)
        content_type = original_type(str(ctype.value).lower())[:255]
        if content_type in BINHEX_TYPES and (unpacked := unbinhex(data)) is not None:
            filename, data = unpacked[0] or filename, unpacked[1]
            content_type = type_for(filename)
        attachments.append(ParsedAttachment(
            filename=filename,
            content_type=content_type,
            data=data,
            content_id=_content_id(part),
            is_inline=disposition == "inline" or (disposition != "attachment" and bool(_content_id(part))),
            enclosed_by=inside,
        ))
    return "\n".join(text_parts), "\n".join(html_parts), attachments, nested, warnings


def _split(raw: bytes, limits: Limits, charset: str | None):
    """flanker's MIME tree of ``raw``, walked; flanker's errors (broken MIME) go up."""
    try:
        # Decoded here, reversibly: given bytes that are not UTF-8, flanker guesses a charset
        # for the whole message and its 8-bit parts lose their bytes (transfer_decode undoes
        # this surrogateescape exactly).
        root = mime.from_string(for_flanker(raw).decode("utf-8", "surrogateescape"))
        return _walk(root, limits, charset)
    except RecursionError as exc:
        raise EmailParseError("MIME structure nests too deeply to parse") from exc
    except flanker_errors as exc:
        if "Too many parts" in str(exc):
            raise EmailParseError(f"MIME structure over flanker's limit: {exc}") from exc
        raise


def _lost_body(parts, raw: bytes, headers, header_end) -> str | None:
    """Why a split that found nothing lost the body, if it did: flanker reads a multipart
    whose delimiters it does not recognise as one with no parts, and says nothing."""
    text, html, attachments, _nested, _warnings = parts
    if text or html or attachments or headers.get_content_maintype() != "multipart":
        return None
    if header_end is None or not raw[header_end.end():].strip():
        return None  # nothing there to lose
    return "no part found behind its boundary"


def _recovered(raw: bytes, headers, header_end, limits: Limits, broken: str, charset: str | None):
    """What a message flanker cannot split still carries. A multipart whose declared boundary
    is missing or never occurs is split on the delimiter lines it does have; a single part
    that is not text is kept as an attachment; what cannot be split is kept as plain text.
    The first warning says why (and makes the message partial)."""
    resplit = with_found_boundary(raw, headers, header_end)
    if resplit is not None:
        try:
            text, html, attachments, nested, warnings = _split(resplit, limits, charset)
        except flanker_errors:
            pass
        else:
            why = f"MIME structure broken ({broken}); split on the delimiter lines found"
            return text, html, attachments, nested, [why, *warnings]
    if headers.get_content_maintype() not in ("text", "multipart") and header_end is not None:
        why = f"MIME structure broken ({broken}); body kept as its {headers.get_content_type()} attachment"
        return "", "", [_whole_body_attachment(raw, headers, header_end)], [], [why]
    why = f"MIME structure broken ({broken}); body kept as plain text"
    return _plain_fallback(raw, headers, header_end), "", [], [], [why]


def _whole_body_attachment(raw: bytes, headers, header_end) -> ParsedAttachment:
    """A one-part message that is not text (a bare message/delivery-status flanker cannot
    read): its name and type as the standard library's email package reads them."""
    body = raw[header_end.end():]
    return ParsedAttachment(filename=decode_header_value(headers.get_filename() or ""),
                            content_type=headers.get_content_type()[:255],
                            data=decode_body(str(headers.get("Content-Transfer-Encoding", "7bit")), body))


def _plain_fallback(raw: bytes, headers, header_end) -> str:
    body = raw[header_end.end():] if header_end else b""
    charset = headers.get_content_charset() if headers.get_content_maintype() == "text" else None
    return decode_text(body, charset)[0]


def _enclosed_attachment(part, inside: int | None) -> ParsedAttachment:
    data = transfer_decode(part)
    subject = decode_header_value(_str(part.enclosed.headers.get("Subject"))) or "message"
    is_global = GLOBAL_MARKER.decode() in part.content_type.params
    return ParsedAttachment(filename=_filename(part, None) or f"{subject[:100]}.eml",
                            content_type="message/global" if is_global else "message/rfc822",
                            data=data, content_id=_content_id(part), enclosed_by=inside)


def _filename(part, charset: str | None) -> str:
    try:
        name = part.detected_file_name or ""
    except Exception:  # flanker trips over some RFC 2231 parameters
        name = ""
    if not name or "\ufffd" in name:
        name = _stdlib_filename(part) or name
    if not name:
        name = _header_filename(part)
    name = decode_header_value(name, charset) if "=?" in name else _raw_text(name, charset)
    return _repair_mojibake(name)


def _stdlib_filename(part) -> str:
    """The name as the standard library reads the part's own header lines: flanker decodes
    RFC 2231 names in a charset other than UTF-8 wrongly (``filename*=iso-8859-1''%E9…``
    comes back as U+FFFD), and gives up on some it cannot parse."""
    container = part._container
    if not isinstance(container, Stream):
        return ""
    head = container.read_message()
    end = _TEXT_HEADER_END.search(head)
    try:
        name = message_from_string(head[:end.start()] if end else head, policy=compat32).get_filename()
    except Exception:  # noqa: BLE001 - a second opinion only; flanker's name stands
        return ""
    return name if isinstance(name, str) else ""


_TEXT_HEADER_END = re.compile(r"\r?\n\r?\n")


def _header_filename(part) -> str:
    """The name in the part's own Content-Type header. flanker's part reports the type its
    scanner saw, without parameters, when a parameter holds raw 8-bit bytes; the header
    itself still has them."""
    ctype = part.headers.get("Content-Type")
    name = ctype.params.get("name", "") if ctype is not None and hasattr(ctype, "params") else ""
    return name if isinstance(name, str) else ""


def _raw_text(name: str, charset: str | None) -> str:
    """A name flanker handed back with raw bytes as surrogate escapes, decoded like a header."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return decode_header_value(name, charset)


def _repair_mojibake(name: str) -> str:
    """Undo flanker's guess of a legacy charset for raw UTF-8 header bytes.

    Raw 8-bit UTF-8 in a filename parameter (Yahoo sends it) comes back from flanker decoded
    as a Mac or Windows legacy charset; re-encoding and decoding as UTF-8 recovers it. A real
    Latin-1 name does not survive the strict UTF-8 decode, so it is left alone.
    """
    if name.isascii():
        return name
    for guess in _MOJIBAKE_GUESSES:
        try:
            data = name.encode(guess)
        except UnicodeError:
            continue
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start >= len(data) - 3:  # only a character cut in half at the end
                return data[:exc.start].decode("utf-8") + "\ufffd"
    return name


def _content_id(part) -> str | None:
    value = part.headers.get("Content-Id")
    return without_surrogates(str(value).strip()[:998]) if value else None


def _raw_all(headers, name: str) -> list[bytes]:
    """The raw bytes of every ``name`` header: compat32 keeps 8-bit bytes as surrogate
    escapes in ``raw_items``, where ``get`` would hand back a Header that lost them."""
    wanted = name.lower()
    return [value.encode("ascii", "surrogateescape") for key, value in headers.raw_items()
            if key.lower() == wanted and isinstance(value, str)]


def _addresses(values: list[bytes], charset: str | None) -> list[str]:
    decoded = [decode_header_bytes(v, charset) for v in values]
    try:
        pairs = getaddresses(decoded)
    except RecursionError:
        # email.utils recurses once per nested comment: a few hundred "(" exhaust the stack.
        # The addresses are still there to be found; the envelope routes the mail anyway.
        pairs = [("", found) for value in decoded for found in _BARE_ADDRESS.findall(value)]
    out = []
    for name, addr in pairs:
        addr = addr.strip()
        if addr and "@" in addr:
            out.append(addr)
    return out


def _first_id(value) -> str | None:
    found = MESSAGE_ID_RE.search(_str(value))
    return found.group(0) if found else None


def _date(value) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(_str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed


def _str(value) -> str:
    """Header values from compat32 are str, or Header objects for undecodable bytes."""
    return "" if value is None else str(value)
