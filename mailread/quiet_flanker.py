"""flanker, imported once and quietly, and the one private detail of it we rely on.

flanker 0.9.11 prints PLY grammar warnings when it first builds its parse tables; they say
nothing about the mail, so they are silenced here. We decode text ourselves, so we need a
part's bytes after transfer decoding but before flanker's charset guess: that is
``Stream.read_body`` plus flanker's own transfer decoder (pinned version, see pyproject).
"""

from __future__ import annotations

import contextlib
import io
import logging

logging.getLogger("flanker").setLevel(logging.ERROR)

with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    from flanker import mime  # noqa: E402
    from flanker.mime.message import errors as _errors  # noqa: E402
    from flanker.mime.message.part import Stream, _decode_transfer_encoding  # noqa: E402

from mailread.legacy import UUENCODINGS, uudecode  # noqa: E402

flanker_errors = (_errors.MimeError, _errors.DecodingError, ValueError, LookupError,
                  UnicodeError, IndexError, KeyError, TypeError, AttributeError)

__all__ = ["mime", "flanker_errors", "transfer_decode", "decode_body", "Stream"]


def transfer_decode(part) -> bytes:
    """The bytes of a leaf part after base64/quoted-printable/uuencode, before any charset."""
    container = part._container
    if isinstance(container, Stream):
        encoding = str(part.content_encoding.value if part.content_encoding else "7bit")
        return decode_body(encoding, container.read_body())
    return _as_bytes(part.body)


def decode_body(encoding: str, body: str | bytes) -> bytes:
    """``body`` (as flanker holds it, or raw bytes) with its transfer encoding undone."""
    encoding = encoding.split("(", 1)[0].strip().strip('"').strip().lower()  # comments, quotes
    if encoding in UUENCODINGS:
        return uudecode(_as_bytes(body))
    if isinstance(body, bytes):
        body = body.decode("utf-8", "surrogateescape")
    return _as_bytes(_decode_transfer_encoding(encoding, body))


def _as_bytes(body) -> bytes:
    if isinstance(body, str):
        # The message was given to flanker decoded with surrogateescape (mailread.parse):
        # this gives back its exact bytes.
        return body.encode("utf-8", errors="surrogateescape")
    return body or b""
