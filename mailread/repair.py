"""What the parsers are shown: a copy of a message, tidied where flanker or the standard
library would misread it (DESIGN.md, "Decoding"). The stored raw source and its hash are
always the bytes as they came; nothing here decodes text.
"""

from __future__ import annotations

import re
from collections import Counter

HEADER_END = re.compile(rb"\r?\n\r?\n")


_CHARSET_PARAM = re.compile(rb'charset\s*=\s*"?([A-Za-z0-9_.:+-]{1,40})', re.I)


def declared_charset(raw: bytes) -> str | None:
    """The first charset the message declares (its own, or its first text part's): what
    raw 8-bit header bytes that are not UTF-8 were most likely written in."""
    found = _CHARSET_PARAM.search(raw, 0, MAX_CHARSET_SCAN)
    return found.group(1).decode("ascii") if found else None


MAX_CHARSET_SCAN = 256 * 1024
MAX_BOUNDARIES = 64
_BOUNDARY_PARAM = re.compile(rb'boundary\s*=\s*(?:"([^"\r\n]{1,200})"|([^\s;"]{1,200}))', re.I)


def for_flanker(raw: bytes) -> bytes:
    """``raw`` as flanker can read it; the stored raw source and its hash stay as they came.

    - RFC 2046 §5.1.1 allows whitespace after a delimiter (``--1  ``); flanker does not
      recognise such a line, and every part behind it is lost. Only lines that are a declared
      boundary's delimiter followed by blanks are changed.
    - RFC 6532's ``message/global`` (a forwarded message with UTF-8 headers) is not a
      container to flanker, which then fails the whole message: it is read as
      ``message/rfc822`` with a marker, and stored under its own type.
    - Any other ``message/`` type flanker does not know (RFC 2046 §5.2.2's
      ``message/partial``, an ``x-`` type) is neither a leaf nor a container to it, and it
      fails the whole message: such a part is read as an opaque leaf
      (``application/x-mailferry-message-partial``) and stored under its own type
      (``original_type``).
    """
    boundaries = declared_boundaries(raw)
    if boundaries and len(boundaries) <= MAX_BOUNDARIES and _any_padded(raw, boundaries):
        names = b"|".join(re.escape(b) for b in sorted(boundaries, key=len, reverse=True))
        padded = re.compile(rb"^(--(?:" + names + rb")(?:--)?)[ \t]+(?=\r?$)", re.M)
        raw = padded.sub(rb"\1", raw)
    if not any(spelling in raw for spelling in (b"message/", b"Message/", b"MESSAGE/")):
        return raw  # a find is ten times cheaper than the regexes over a large message
    raw = _UNKNOWN_MESSAGE.sub(rb"\1" + OPAQUE_MESSAGE + rb"\2", raw)
    return _GLOBAL.sub(rb"\1message/rfc822; " + GLOBAL_MARKER + rb"=1", raw)


def original_type(content_type: str) -> str:
    """The type a part declared, for one ``for_flanker`` made opaque."""
    prefix = OPAQUE_MESSAGE.decode()
    return "message/" + content_type[len(prefix):] if content_type.startswith(prefix) else content_type


# The message/ types flanker reads (global is rewritten as rfc822 below).
_KNOWN_MESSAGE = (rb"rfc822|news|global|delivery-status|disposition-notification|"
                  rb"feedback-report|external-body")
_UNKNOWN_MESSAGE = re.compile(rb"^(Content-Type:[ \t]*)message/(?!(?:" + _KNOWN_MESSAGE
                              + rb")(?![\w.+-]))([\w.+-]{1,60})", re.I | re.M)
OPAQUE_MESSAGE = b"application/x-mailferry-message-"


def declared_boundaries(raw: bytes) -> set[bytes]:
    """Every ``boundary=`` the message declares (stops past MAX_BOUNDARIES). Found with
    ``bytes.find`` and the parameter regex applied only there: a case-insensitive regex
    over a message with a large attachment costs more than the rest of the parse's copies."""
    found: set[bytes] = set()
    for needle in (b"oundary", b"OUNDARY"):
        pos = raw.find(needle, 1)
        while pos > 0 and len(found) <= MAX_BOUNDARIES:
            match = _BOUNDARY_PARAM.match(raw, pos - 1)
            if match:
                found.add(match.group(1) or match.group(2))
            pos = raw.find(needle, pos + len(needle))
    return found


def _any_padded(raw: bytes, boundaries: set[bytes]) -> bool:
    """Whether a delimiter line of one of ``boundaries`` has blanks after it."""
    for boundary in boundaries:
        token = b"\n--" + boundary
        pos = raw.find(token)
        while pos >= 0:
            end = pos + len(token)
            end += 2 if raw.startswith(b"--", end) else 0
            if raw[end:end + 1] in (b" ", b"\t"):
                return True
            pos = raw.find(token, end)
    return False


GLOBAL_MARKER = b"x-mailferry-global"
_GLOBAL = re.compile(rb"^(Content-Type:[ \t]*)message/global\b(?!-)", re.I | re.M)


# A header block both parsers read right: field lines (a printable name, a colon) and
# continuation lines, nothing else, and no CR that does not end a line.
_CLEAN_BLOCK = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r?\n|[ \t][^\r\n]*\r?\n)*")
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def tidy_header_block(raw: bytes, header_end) -> bytes:
    """``raw`` with a header block both parsers can read, if it was malformed.

    A line that is not a header field (no colon, no name, a name with 8-bit bytes), a stray
    continuation line before the first field, or an mbox ``From `` line makes the standard
    library end the headers there and flanker give up: the Subject behind it is lost, and
    the rest of the headers becomes body text. Such lines are dropped; ``Name :`` (obsolete
    syntax, RFC 5322 §4.5) becomes ``Name:``; a CR that ends no line becomes a space. The
    stored raw source and its hash stay as they came.
    """
    if header_end is None:
        return raw
    first_break = header_end.group().split(b"\n", 1)[0] + b"\n"  # ends the last field line
    block_end = header_end.start() + len(first_break)
    block = raw[:block_end]
    if _CLEAN_BLOCK.fullmatch(block):
        return raw
    kept: list[bytes] = []
    for line in block.split(b"\n")[:-1]:
        ending = b"\r\n" if line.endswith(b"\r") else b"\n"
        line = line.removesuffix(b"\r").replace(b"\r", b" ")
        field = _FIELD.match(line)
        if field:
            kept.append(field.group(1) + b":" + line[field.end():] + ending)
        elif line[:1] in (b" ", b"\t") and kept:
            kept.append(line + ending)
        # else: not a header line; dropped (it stays in the stored raw source)
    return b"".join(kept) + raw[block_end:] if kept else raw


def with_header_blocks_ended(raw: bytes) -> bytes:
    """``raw`` with a blank line before each delimiter line that a header block runs into.

    A part whose header lines run straight into the next delimiter (an empty text part
    written without its blank line), or a message whose header block runs straight into its
    first delimiter, makes flanker read the rest of the message, delimiters, HTML and base64
    of the images, as that part's text. RFC 2046 §5.1.1 reads such lines as the part's
    headers and its body as empty. The line break before a delimiter belongs to the
    delimiter, so two are added: the blank line that ends the headers, and the delimiter's.
    """
    boundaries = declared_boundaries(raw)
    if not boundaries or len(boundaries) > MAX_BOUNDARIES:
        return raw
    out, kept, segment_start = [], 0, 0
    for start, end in _delimiter_lines(raw, boundaries):
        if start > segment_start and _HEADER_LINES.fullmatch(raw, segment_start, start):
            ending = b"\r\n" if raw[start - 2:start] == b"\r\n" else b"\n"
            out += [raw[kept:start], ending * 2]
            kept = start
        segment_start = end
    return b"".join(out) + raw[kept:] if out else raw


def _delimiter_lines(raw: bytes, boundaries: set[bytes]) -> list[tuple[int, int]]:
    """(start, end after its line break) of every delimiter line of ``boundaries``, in order."""
    found = []
    for boundary in boundaries:
        token = b"\n--" + boundary
        pos = raw.find(token)
        while pos >= 0:
            after = pos + len(token)
            if raw[after:after + 1] in (b"\r", b"\n", b"-", b" ", b"\t"):
                line_end = raw.find(b"\n", after)
                found.append((pos + 1, len(raw) if line_end < 0 else line_end + 1))
            pos = raw.find(token, after)
    return sorted(found)


# One or more header field or continuation lines, and nothing else (no blank line).
_HEADER_LINES = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\r\n]*\r?\n|[ \t]+[^\s][^\r\n]*\r?\n)+")


_DELIMITER_LINE = re.compile(rb"^--([0-9A-Za-z'()+_,./:=?-]{1,70}?)(?:--)?[ \t]*\r?$", re.M)
_CONTENT_TYPE = re.compile(rb"^Content-Type:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.I | re.M)


def with_found_boundary(raw: bytes, headers, header_end) -> bytes | None:
    """``raw`` with its top Content-Type naming the boundary its delimiter lines show, for a
    multipart that declares none or one that never occurs; None if there is nothing to find."""
    if header_end is None or headers.get_content_maintype() != "multipart":
        return None
    found = Counter(m.group(1) for m in _DELIMITER_LINE.finditer(raw, header_end.end()))
    if not found:
        return None
    boundary, seen = found.most_common(1)[0]
    if seen < 2:
        return None
    subtype = headers.get_content_subtype().encode("ascii", "replace")
    line = b'Content-Type: multipart/%s; boundary="%s"' % (subtype, boundary)
    head = _CONTENT_TYPE.sub(lambda _m: line, raw[:header_end.start()], count=1)
    return head + raw[header_end.start():]
