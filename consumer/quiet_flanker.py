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

flanker_errors = (_errors.MimeError, _errors.DecodingError, ValueError, LookupError,
                  UnicodeError, IndexError, KeyError, TypeError, AttributeError)

__all__ = ["mime", "flanker_errors", "transfer_decode"]


def transfer_decode(part) -> bytes:
    """The bytes of a leaf part after base64/quoted-printable, before any charset."""
    container = part._container
    if isinstance(container, Stream):
        encoding = part.content_encoding.value if part.content_encoding else "7bit"
        body = _decode_transfer_encoding(str(encoding).lower(), container.read_body())
    else:
        body = part.body
    if isinstance(body, str):
        return body.encode("utf-8", errors="surrogateescape")
    return body or b""
