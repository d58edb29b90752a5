"""Decoding text in the charset a message claims, with the fallbacks real mail needs.

Senders label text with a narrower charset than they used (GBK text labelled gb2312, Big5-HKSCS
as big5, Windows Shift_JIS as shift_jis); decoding with the wider superset is always right for
the narrower one, so we use it. An unknown charset falls back to UTF-8 and then Latin-1 — text
is never refused for its label.
"""

from __future__ import annotations

import codecs
from email.header import decode_header

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


def decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode ``data``; the flag says whether it needed a lossy fallback. Never raises."""
    codec = codec_for(charset)
    try:
        return data.decode(codec), False
    except (UnicodeError, LookupError, ValueError):  # utf-7 and friends raise more than one kind
        pass
    if codec != "utf-8":
        try:
            return data.decode("utf-8"), True
        except UnicodeDecodeError:
            pass
    try:
        return data.decode(codec, errors="replace"), True
    except (UnicodeError, LookupError, ValueError):
        return data.decode("utf-8", errors="replace"), True


def decode_header_value(value: str | None) -> str:
    """Decode RFC 2047 encoded words, using the same charset fallbacks as bodies."""
    if not value:
        return ""
    if "=?" not in value:
        return " ".join(value.split())
    try:
        chunks = decode_header(value)
    except Exception:  # email.header raises several kinds on broken encoded words
        return " ".join(value.split())
    out = []
    for chunk, charset in chunks:
        if isinstance(chunk, bytes):
            out.append(decode_text(chunk, charset)[0])
        else:
            out.append(chunk)
    return " ".join("".join(out).split())
