"""Legacy encodings still in the wild, decoded to their bytes: uuencode and BinHex 4.0.

Neither flanker nor the standard library decodes them any more (Python 3.11 removed
``binhex`` and ``binascii.a2b_hqx``), and a mail archive or an old Mac client still sends
them. Both are written from the formats' descriptions (uuencode: POSIX ``uuencode``; BinHex:
RFC 1741), each check failing closed: what does not decode stays as it came.
"""

from __future__ import annotations

import binascii
import mimetypes
import re

UUENCODINGS = ("x-uuencode", "uuencode", "x-uue", "uue")
BINHEX_TYPES = ("application/mac-binhex40", "application/mac-binhex", "application/x-binhex40",
                "application/binhex", "application/x-binhex")
# The built-in table only: the machine's /etc/mime.types must not change what we store.
_TYPES = mimetypes.MimeTypes(filenames=())


def type_for(name: str) -> str:
    return _TYPES.guess_type(name, strict=False)[0] or "application/octet-stream"


def uudecode(data: bytes) -> bytes:
    """The bytes of a uuencoded body (``begin 644 name`` … ``end``). Lines that are not
    uuencode are skipped; a line with padding some encoders leave out is decoded as far as
    it goes."""
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


# A begin line, uuencode lines (printable ASCII from space to backquote), an end line.
_UU_BLOCK = re.compile(r"^begin [0-7]{3,4} ([^\r\n]{1,255})\r?\n((?:[ -`]{1,90}\r?\n){1,2000000}?)end[ \t]*\r?$",
                       re.M)
MAX_UU_BLOCKS = 100


def uuencoded_files(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """``text`` without the ``begin 644 name`` blocks it carries, and the files they hold
    (name, bytes): how mail with attachments looked before MIME, still sent by scripts and
    archives. A block whose lines do not decode is left in the text."""
    if "begin " not in text:
        return text, []
    files: list[tuple[str, bytes]] = []

    def take(match: re.Match) -> str:
        if len(files) >= MAX_UU_BLOCKS:
            return match.group(0)
        data = _strict_uudecode(match.group(2))
        if data is None:
            return match.group(0)
        files.append((match.group(1).strip(), data))
        return ""

    return _UU_BLOCK.sub(take, text), files


def _strict_uudecode(lines: str) -> bytes | None:
    out = bytearray()
    for line in lines.splitlines():
        if line in ("`", ""):
            continue
        try:
            out += binascii.a2b_uu(line.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            return None
    return bytes(out)


_HQX = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
_HQX_VALUE = {c: i for i, c in enumerate(_HQX)}
_RUN = 0x90


def unbinhex(data: bytes) -> tuple[str, bytes] | None:
    """The file name and data fork of a BinHex 4.0 body, or None if it is not one (or a CRC
    does not match). The resource fork, Mac-only, is dropped."""
    start = 0 if data.startswith(b":") else data.find(b"\n:") + 1
    if start == 0 and not data.startswith(b":"):
        return None  # no line begins the encoded stream
    end = data.find(b":", start + 1)
    if end < 0:
        return None
    stream = _unrun(_six_bit(data[start + 1:end]))
    if stream is None or len(stream) < 22:
        return None
    n = stream[0]
    header_end = 1 + n + 1 + 4 + 4 + 2 + 4 + 4
    if len(stream) < header_end + 2:
        return None
    header = stream[:header_end]
    if _crc(header) != stream[header_end:header_end + 2]:
        return None
    data_len = int.from_bytes(header[-8:-4], "big")
    fork = stream[header_end + 2:header_end + 2 + data_len]
    if len(fork) != data_len or _crc(fork) != stream[header_end + 2 + data_len:header_end + 4 + data_len]:
        return None
    return header[1:1 + n].decode("mac_roman"), bytes(fork)


def _six_bit(chars: bytes) -> bytes:
    bits, nbits, out = 0, 0, bytearray()
    for c in chars:
        value = _HQX_VALUE.get(c)
        if value is None:
            continue  # line breaks and blanks
        bits, nbits = ((bits << 6) | value) & 0xFFFFFF, nbits + 6
        if nbits >= 8:
            nbits -= 8
            out.append((bits >> nbits) & 0xFF)
    return bytes(out)


def _unrun(data: bytes) -> bytes | None:
    """Undo BinHex's run-length coding: ``b 0x90 n`` is n of b; ``0x90 0x00`` a literal 0x90."""
    out, i = bytearray(), 0
    while i < len(data):
        b = data[i]
        if b != _RUN:
            out.append(b)
            i += 1
            continue
        if i + 1 >= len(data):
            return None
        count = data[i + 1]
        if count == 0:
            out.append(_RUN)
        elif out:
            out += bytes([out[-1]]) * (count - 1)
        else:
            return None
        i += 2
    return bytes(out)


def _crc(data: bytes) -> bytes:
    return binascii.crc_hqx(data, 0).to_bytes(2, "big")
