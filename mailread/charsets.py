"""Decoding text in the charset a message claims, with the fallbacks real mail needs.

Senders label text with a narrower charset than they used (GBK text labelled gb2312, Big5-HKSCS
as big5, Windows Shift_JIS as shift_jis); decoding with the wider superset is always right for
the narrower one, so we use it. Text the label does not explain (none, or the wrong one) is
UTF-8 when it is valid UTF-8, else what charset-normalizer finds, else Windows-1252: text is
never refused for its label. The order is in DESIGN.md, "Decoding".
"""

from __future__ import annotations

import binascii
import codecs
import re

from charset_normalizer import from_bytes

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
    if not getattr(info, "_is_text_encoding", True):
        return "utf-8"
    # Text labelled Latin-1 with bytes in 0x80-0x9F is Windows-1252 (quotes, dashes, the euro):
    # what the WHATWG Encoding Standard decides too.
    return "cp1252" if info.name == "iso8859-1" else info.name


# One byte per character: any byte string decodes in them, so a label of one of these says
# little when the bytes are valid UTF-8 (they nearly never are by chance).
_SINGLE_BYTE = ("iso8859", "latin", "cp125", "cp437", "cp850", "koi8", "mac-", "mac_", "ascii")


def decode_text(data: bytes, charset: str | None) -> tuple[str, bool]:
    """Decode ``data``; the flag says whether it needed a lossy fallback. Never raises.

    The declared charset wins when the bytes are valid in it, unless it is a single-byte
    charset and the bytes are valid UTF-8 (mail labelled latin-1 by a client that wrote
    UTF-8: ``FrÃ¶sche``). Undeclared 8-bit text is UTF-8 when valid. Bytes the label does not
    explain (labelled UTF-8 and not, or undeclared and not UTF-8) go to the detector.
    """
    codec = codec_for(charset)
    if codec == "utf-8" or codec.startswith(_SINGLE_BYTE):
        text = utf8(data)  # ASCII, or UTF-8 wherever it was written
        if text is not None:
            return text, False
    if codec != "utf-8":
        try:
            return data.decode(codec, errors=_errors_for(codec)), False
        except (UnicodeError, LookupError, ValueError):  # utf-7 and friends raise more than one kind
            pass
        try:
            return data.decode("utf-8"), True
        except UnicodeDecodeError:
            pass
    detected = detect(data) if _enough_to_detect(data) else None
    if detected is not None:
        return detected, False
    if codec == "utf-8":  # Latin-1 text labelled UTF-8 (or nothing), the usual case
        return data.decode("cp1252", errors=_C1), True
    try:
        return data.decode(codec, errors="replace"), True
    except (UnicodeError, LookupError, ValueError):
        return data.decode("utf-8", errors="replace"), True


# Windows-1252 leaves five bytes undefined; as in the WHATWG standard, each is the C1
# control of its value, so Windows-1252 decodes any bytes (as the Latin-1 it replaces did).
_C1 = "mailferry-c1"
codecs.register_error(_C1, lambda exc: (chr(exc.object[exc.start]), exc.start + 1))


def _errors_for(codec: str) -> str:
    return _C1 if codec == "cp1252" else "strict"


DETECT_BYTES = 64 * 1024  # what the detector is shown; it samples within that anyway


def utf8(data: bytes) -> str | None:
    """``data`` as UTF-8 if it is UTF-8, allowing a last character cut in half (a header or
    a body shortened by bytes, as Yahoo shortens long filenames); else None."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data" or exc.end != len(data):
            return None
        return data[:exc.start].decode("utf-8") + "\ufffd"


def _enough_to_detect(data: bytes) -> bool:
    # Fewer 8-bit bytes than this say too little for a detector: Windows-1252 is the better bet.
    return len(data) - len(data.translate(None, _HIGH)) >= DETECT_MIN_8BIT


_HIGH = bytes(range(0x80, 0x100))
DETECT_MIN_8BIT = 8


def detect(data: bytes) -> str | None:
    """``data`` decoded in the charset charset-normalizer finds most likely, or None when it
    finds none (binary, or too little to go on). Costs about 0.1-0.5 ms for a page of text;
    called only for bytes their label does not explain (docs/BENCHMARKS.md)."""
    best = from_bytes(data[:DETECT_BYTES]).best()
    if best is None or best.encoding in ("utf_8", "ascii"):
        return None  # not valid UTF-8 (checked before): a claim of UTF-8 is wrong
    encoding = "cp1252" if best.encoding == "latin_1" else best.encoding  # as in codec_for
    try:
        return data.decode(encoding, errors="replace" if len(data) > DETECT_BYTES else _errors_for(encoding))
    except (UnicodeError, LookupError):
        return None


# An RFC 2047 encoded word, found in the header's bytes: its text is decoded in its own
# charset from its own bytes (a raw 0xF6 inside a Q word is an ö of that charset).
_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?]*)\?=")


def decode_header_bytes(raw: bytes, charset: str | None = None) -> str:
    """A header value as its sender meant it, from its raw bytes; never raises.

    Encoded words are decoded in their own charset, from their own bytes; adjacent words of
    one charset are joined before decoding, as senders split a character across two words
    (RFC 2047 forbids it; Python's email does the same), and the whitespace between words is
    dropped (RFC 2047 §6.2). Raw 8-bit text outside them is UTF-8 when it is valid UTF-8
    (RFC 6532: what Gmail and others send with SMTPUTF8), else in ``charset`` (the one the
    message declares), else what the detector finds. Folding is undone.
    """
    out: list[str] = []
    pending: list[tuple[str, bytes]] = []  # adjacent encoded words not yet decoded
    pos = 0
    for match in _ENCODED_WORD.finditer(raw):
        between = raw[pos:match.start()]
        if not (pending and not between.strip()):
            out.append(_joined_words(pending))
            pending = []
            out.append(_plain_header_text(between, charset))
        label, data = _encoded_word(*match.groups())
        if pending and pending[-1][0] == label:
            pending[-1] = (label, pending[-1][1] + data)
        else:
            pending.append((label, data))
        pos = match.end()
    out.append(_joined_words(pending))
    out.append(_plain_header_text(raw[pos:], charset))
    return " ".join("".join(out).split())


def decode_header_value(value: str | None, charset: str | None = None) -> str:
    """``decode_header_bytes`` of a str (raw bytes kept as surrogate escapes come back)."""
    if not value:
        return ""
    if value.isascii() and "=?" not in value:
        return " ".join(value.split())
    return decode_header_bytes(value.encode("utf-8", "surrogateescape"), charset)


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


def _plain_header_text(data: bytes, charset: str | None = None) -> str:
    if data.isascii():
        return data.decode("ascii")
    text = utf8(data)
    if text is not None:
        return text
    codec = codec_for(charset) if charset is not None else "utf-8"
    if codec != "utf-8":
        try:
            return data.decode(codec, errors=_errors_for(codec))
        except (UnicodeError, LookupError, ValueError):
            pass
    detected = detect(data) if _enough_to_detect(data) else None
    return detected if detected is not None else data.decode("cp1252", errors=_C1)


def _joined_words(words: list[tuple[str, bytes]]) -> str:
    return "".join(decode_text(data, label)[0] for label, data in words)


def _encoded_word(charset: bytes, encoding: bytes, payload: bytes) -> tuple[str, bytes]:
    """An encoded word's charset label and its bytes; a word that does not decode is text."""
    label = charset.decode("ascii", "replace").split("*", 1)[0]  # RFC 2231 language suffix
    try:
        if encoding in (b"Q", b"q"):
            return label, binascii.a2b_qp(payload, header=True)
        return label, binascii.a2b_base64(payload + b"=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        whole = b"=?" + charset + b"?" + encoding + b"?" + payload + b"?="
        return "utf-8", whole
