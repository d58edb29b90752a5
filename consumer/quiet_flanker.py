"""flanker, imported once and quietly, and the one private detail of it we rely on.

flanker 0.9.11 prints PLY grammar warnings when it first builds its parse tables; they say
nothing about the mail, so they are silenced here. We decode text ourselves, so we need a
part's bytes after transfer decoding but before flanker's charset guess: that is
``Stream.read_body`` plus flanker's own transfer decoder (pinned version, see pyproject).
"""

from __future__ import annotations

import binascii
import contextlib
import io
import logging

logging.getLogger("flanker").setLevel(logging.ERROR)

with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    from flanker import mime  # noqa: E402
    from flanker.mime.message import errors as _errors  # noqa: E402
    from flanker.mime.message.part import Stream, _decode_transfer_encoding  # noqa: E402

flanker_errors = (_errors.MimeError, _errors.DecodingError, ValueError, LookupError,
                  UnicodeError, IndexError, KeyError, TypeError, AttributeError)

__all__ = ["mime", "flanker_errors", "transfer_decode", "uudecode"]


UUENCODINGS = ("x-uuencode", "uuencode", "x-uue", "uue")


def transfer_decode(part) -> bytes:
    """The bytes of a leaf part after base64/quoted-printable/uuencode, before any charset."""
    container = part._container
    encoding = "7bit"
    if isinstance(container, Stream):
        encoding = str(part.content_encoding.value if part.content_encoding else "7bit").lower()
        body = container.read_body()
        if encoding not in UUENCODINGS:
            body = _decode_transfer_encoding(encoding, body)
    else:
        body = part.body
    if isinstance(body, str):
        # The message was given to flanker decoded with surrogateescape (consumer.parse):
        # this gives back its exact bytes.
        body = body.encode("utf-8", errors="surrogateescape")
    if encoding in UUENCODINGS:
        return uudecode(body or b"")
    return body or b""


def uudecode(data: bytes) -> bytes:
    """The bytes of a uuencoded body (``begin 644 name`` … ``end``; flanker and the
    standard library's email package leave it encoded). Lines that are not uuencode are
    skipped; a line with padding some encoders leave out is decoded as far as it goes."""
    lines = data.splitlines()
    begin = next((i for i, line in enumerate(lines) if line.startswith(b"begin ")), -1)
    out = bytearray()
    for line in lines[begin + 1:]:
        if line.strip() in (b"end", b"`", b""):
            if line.strip() == b"end":
                break
            continue
        try:
            out += binascii.a2b_uu(line)
        except binascii.Error:
            # Some encoders drop trailing spaces: decode what the length byte announces.
            length = (((line[0] - 32) & 63) * 4 + 5) // 3
            try:
                out += binascii.a2b_uu(line[:length])
            except binascii.Error:
                continue
    return bytes(out)
