"""Decoding text in the charset a message claims, with the fallbacks real mail needs.

Senders label text with a narrower charset than they used (GBK text labelled gb2312, Big5-HKSCS
as big5, Windows Shift_JIS as shift_jis); decoding with the wider superset is always right for
the narrower one, so we use it. An unknown charset falls back to UTF-8 and then Latin-1 — text
is never refused for its label.
"""

from __future__ import annotations

import binascii
import codecs
import re

FALLBACKS = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "big5": "big5hkscs",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "iso-2022-jp": "iso2022_jp_ext",
    "ks_c_5601-1987": "cp949",
    "euc-kr": "cp949",
    "windows-874": "cp874",
    "iso-8859-8-i": "iso-8859-8",
    "unicode-1-1-utf-7": "utf-7",
    "us-ascii": "utf-8",  # mislabelled 8-bit "ascii" is nearly always UTF-8
    "ascii": "utf-8",
}


def codec_for(charset: str | None) -> str:
    """The Python codec to decode text labelled ``charset`` with.

    A charset name from a header is data: ``codecs.lookup`` also finds codecs that are not
    text encodings (``zlib``, ``base64``, ``rot13``, ``hex``, ``uu``), and decoding with one
    raises LookupError or worse. Anything that is not a text encoding is read as UTF-8.
    """
    label = (charset or "utf-8").strip().strip('"').lower()
    label = FALLBACKS.get(label, label)
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):  # ValueError: a NUL in the name
        return "utf-8"
    return info.name if getattr(info, "_is_text_encoding", True) else "utf-8"


# One byte per character: any byte string decodes in them, so a label of one of these says
# little when the bytes are valid UTF-8 (they nearly never are by chance).
_SINGLE_BYTE = ("iso8859", "latin", "cp125", "cp437", "cp850", "koi8", "mac-", "mac_", "ascii")


def decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode ``data``; the flag says whether it needed a lossy fallback. Never raises.

    The declared charset wins when the bytes are valid in it, unless it is a single-byte
    charset and the bytes are valid UTF-8 (mail labelled latin-1 by a client that wrote
    UTF-8: ``FrÃ¶sche``). Bytes labelled UTF-8 that are not are read as Windows-1252.
    """
    codec = codec_for(charset)
    if not data.isascii() and codec.startswith(_SINGLE_BYTE):
        try:
            return data.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(codec), False
    except (UnicodeError, LookupError, ValueError):  # utf-7 and friends raise more than one kind
        pass
    if codec != "utf-8":
        try:
            return data.decode("utf-8"), True
        except UnicodeDecodeError:
            pass
    else:
        try:
            return data.decode("cp1252"), True  # Latin-1 text labelled UTF-8
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(codec, errors="replace"), True
    except (UnicodeError, LookupError, ValueError):
        return data.decode("utf-8", errors="replace"), True


# An RFC 2047 encoded word, found in the header's bytes: its text is decoded in its own
# charset from its own bytes (a raw 0xF6 inside a Q word is an ö of that charset).
_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")


def decode_header_bytes(raw: bytes) -> str:
    """A header value as its sender meant it, from its raw bytes; never raises.

    Encoded words are decoded in their own charset; whitespace between two of them is
    dropped (RFC 2047 §6.2). Text outside them is UTF-8 when it is valid UTF-8 (RFC 6532:
    what Gmail and others send with SMTPUTF8), else Windows-1252. Folding is undone.
    """
    out: list[str] = []
    pos, after_word = 0, False
    for match in _ENCODED_WORD.finditer(raw):
        between = raw[pos:match.start()]
        if not (after_word and not between.strip()):
            out.append(_plain_header_text(between))
        out.append(_encoded_word(*match.groups()))
        pos, after_word = match.end(), True
    out.append(_plain_header_text(raw[pos:]))
    return " ".join("".join(out).split())


def decode_header_value(value: str | None) -> str:
    """``decode_header_bytes`` of a str (raw bytes kept as surrogate escapes come back)."""
    if not value:
        return ""
    if value.isascii() and "=?" not in value:
        return " ".join(value.split())
    return decode_header_bytes(value.encode("utf-8", "surrogateescape"))


def without_surrogates(text: str) -> str:
    """``text`` fit to store: raw bytes that flanker hands back as surrogate escapes (the
    message is given to it decoded with ``surrogateescape``) are read as UTF-8, lossily."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        data = text.encode("utf-8", "surrogateescape")  # the raw bytes back
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        data = text.encode("utf-8", "surrogatepass")
    return data.decode("utf-8", "replace")


def _plain_header_text(data: bytes) -> str:
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _encoded_word(charset: bytes, encoding: bytes, payload: bytes) -> str:
    label = charset.decode("ascii", "replace").split("*", 1)[0]  # RFC 2231 language suffix
    try:
        if encoding in (b"Q", b"q"):
            data = binascii.a2b_qp(payload, header=True)
        else:
            data = binascii.a2b_base64(payload + b"=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        return _plain_header_text(b"=?" + charset + b"?" + encoding + b"?" + payload + b"?=")
    return decode_text(data, label)[0]
