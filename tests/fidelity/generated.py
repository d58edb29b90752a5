"""Generated fidelity cases: each decoding class, in many charsets.

Every expectation is the text the case encodes, so a case can only pass by decoding it back.
The texts are long enough for a detector to have something to go on, as real mail does.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import urllib.parse

from tests.fidelity.cases import Attachment, Case

# charset label -> text written in it (real sentences: detectors judge by language).
SAMPLES = {
    "gb18030": "你好，这是一封测试邮件。我们明天下午三点在会议室开会，请准时参加。",
    "gbk": "关于下周的项目计划，请大家在周五之前提交各自的进度报告。谢谢！",
    "gb2312": "今天天气很好，我们一起去公园散步吧。",
    "big5": "您好，這是一封測試郵件。我們明天下午三點在會議室開會，請準時參加。",
    "shift_jis": "こんにちは。明日の会議は午後三時からです。資料を準備しておいてください。",
    "iso-2022-jp": "お世話になっております。請求書を添付いたしましたので、ご確認ください。",
    "euc-jp": "東京は今日とても暑いです。週末に京都へ行く予定です。",
    "euc-kr": "안녕하세요. 내일 오후 세 시에 회의실에서 회의가 있습니다. 늦지 마세요.",
    "koi8-r": "Здравствуйте! Высылаю вам отчёт за прошлый месяц. Пожалуйста, проверьте цифры.",
    "windows-1251": "Добрый день! Напоминаю, что собрание состоится в четверг в десять часов утра.",
    "iso-8859-5": "Привет, как дела? Давно не виделись, надо бы встретиться на выходных.",
    "windows-1252": "Grüße aus Köln – die „Frösche“ kosten 12 € pro Stück, garçon!",
    "iso-8859-1": "Die Hasen und die Frösche: ¿Dónde está el niño? Ça va très bien.",
    "iso-8859-2": "Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "iso-8859-7": "Καλημέρα σας. Η συνάντηση θα γίνει αύριο το πρωί στο γραφείο.",
    "iso-8859-15": "Le prix est de 15 € par personne, œuvre comprise. À bientôt !",
    "windows-1250": "Dobrý den, posílám vám fakturu za služby v měsíci září.",
    "utf-8": "Grüße aus Köln ✓ — 你好 — Привет — こんにちは",
}

# A detector needs a body's worth of text; these are the charsets a client leaves undeclared
# in real mail (Russian, Chinese, Japanese and Korean webmail of the 2000s).
UNDECLARED = ("koi8-r", "windows-1251", "gb18030", "big5", "shift_jis", "euc-kr", "euc-jp")


def cases() -> list[Case]:
    out: list[Case] = []
    for charset, text in SAMPLES.items():
        out += _header_cases(charset, text)
        out += _body_cases(charset, text)
    out += _undeclared_legacy_bodies()
    out += _mislabelled_bodies()
    out += _utf16_bodies()
    out += _padded_delimiters()
    out += _uuencode()
    out += _binhex()
    out += _broken_structure()
    out += _malformed_header_blocks()
    out += _forwarded()
    out += _filenames()
    out += _transfer_encoding_labels()
    return out


def message(headers: list[tuple[str, bytes | str]], body: bytes | str) -> bytes:
    lines = [b"From: Sender <sender@example.org>", b"To: bob@example.org",
             b"Message-ID: <gen@example.org>", b"MIME-Version: 1.0"]
    for name, value in headers:
        value = value.encode("utf-8") if isinstance(value, str) else value
        lines.append(name.encode("ascii") + b": " + value)
    body = body.encode("utf-8") if isinstance(body, str) else body
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _python_codec(charset: str) -> str:
    return {"iso-2022-jp": "iso2022_jp"}.get(charset, charset)


def _encode(text: str, charset: str) -> bytes:
    return text.encode(_python_codec(charset))


# --- class 1 and 2: headers ---------------------------------------------------------------

def _header_cases(charset: str, text: str) -> list[Case]:
    data = _encode(text, charset)
    plain = [("Content-Type", "text/plain; charset=us-ascii")]
    out = []
    b_word = b"=?" + charset.encode() + b"?B?" + base64.b64encode(data) + b"?="
    out.append(Case("generated", f"subject-b-{charset}", message([("Subject", b_word), *plain], "body"),
                    subject=text, why="an RFC 2047 B word in its charset"))
    if charset != "iso-2022-jp":  # a 7-bit charset: Q words carry its escapes, no 8-bit bytes
        q = binascii.b2a_qp(data, header=True).replace(b"=\n", b"").replace(b"?", b"=3F")
        q_word = b"=?" + charset.encode() + b"?Q?" + q + b"?="
        out.append(Case("generated", f"subject-q-{charset}", message([("Subject", q_word), *plain], "body"),
                        subject=text, why="an RFC 2047 Q word in its charset"))
        # Class 2: the 8-bit bytes left raw inside a Q word (ASCII specials still escaped).
        raw_q = data.replace(b"=", b"=3D").replace(b"?", b"=3F").replace(b"_", b"=5F").replace(b" ", b"_")
        out.append(Case("generated", f"subject-8bit-in-q-{charset}",
                        message([("Subject", b"=?" + charset.encode() + b"?Q?" + raw_q + b"?="), *plain], "body"),
                        subject=text, why="raw 8-bit bytes inside a Q word are that word's charset"))
    # A long subject folded into several words, split between characters of a multi-byte
    # charset (RFC 2047 forbids it; senders do it): the words' bytes are one string.
    if charset in ("utf-8", "gb18030", "shift_jis", "euc-kr", "big5"):
        cut = len(data) // 2 // 3 * 3 + 1  # through the middle of a character
        first, second = base64.b64encode(data[:cut]), base64.b64encode(data[cut:])
        folded = (b"=?" + charset.encode() + b"?B?" + first + b"?=\r\n =?" + charset.encode()
                  + b"?B?" + second + b"?=")
        out.append(Case("generated", f"subject-split-character-{charset}",
                        message([("Subject", folded), *plain], "body"), subject=text,
                        why="adjacent encoded words of one charset are decoded as one byte string"))
    if charset == "utf-8":
        # Class 1: RFC 6532 raw UTF-8 in the header itself.
        out.append(Case("generated", "subject-raw-utf8", message([("Subject", data), *plain], "body"),
                        subject=text, why="RFC 6532: raw UTF-8 in a header"))
        out.append(Case("generated", "subject-raw-utf8-mixed-with-word",
                        message([("Subject", data + b" =?utf-8?Q?=E2=9C=93?="), *plain], "body"),
                        subject=text + " ✓", why="raw UTF-8 beside an encoded word"))
    elif charset not in ("iso-2022-jp",):
        # Raw legacy bytes in the Subject, with the message's charset declared for the body:
        # the declared charset explains them (what old Russian and Chinese clients send).
        body_ct = [("Content-Type", f"text/plain; charset={charset}")]
        out.append(Case("generated", f"subject-raw-{charset}-body-declared",
                        message([("Subject", data), *body_ct], _encode(text, charset)),
                        subject=text, text=text,
                        why="raw 8-bit header bytes are read in the charset the message declares"))
    return out


# --- class 3: bodies ----------------------------------------------------------------------

def _body_cases(charset: str, text: str) -> list[Case]:
    data = _encode(text, charset)
    out = []
    for cte, payload in (("8bit", data), ("base64", base64.encodebytes(data)),
                         ("quoted-printable", quopri.encodestring(data))):
        if charset == "iso-2022-jp" and cte == "8bit":
            cte = "7bit"
        raw = message([("Subject", "body"), ("Content-Type", f'text/plain; charset="{charset}"'),
                       ("Content-Transfer-Encoding", cte)], payload)
        out.append(Case("generated", f"body-{cte}-{charset}", raw, subject="body", text=text,
                        why="a text body in its declared charset"))
    html = f"<html><body><p>{text}</p></body></html>"
    raw = message([("Subject", "html"), ("Content-Type", f"text/html; charset={charset}"),
                   ("Content-Transfer-Encoding", "base64")], base64.encodebytes(_encode(html, charset)))
    out.append(Case("generated", f"html-{charset}", raw, html=text, why="an HTML body in its charset"))
    if charset == "utf-8":
        for label in (None, "us-ascii", "iso-8859-1", "windows-1252"):
            ct = "text/plain" if label is None else f"text/plain; charset={label}"
            raw = message([("Subject", "utf-8"), ("Content-Type", ct),
                           ("Content-Transfer-Encoding", "8bit")], data)
            out.append(Case("generated", f"body-utf8-labelled-{label or 'nothing'}", raw, text=text,
                            why="valid UTF-8 declared as nothing or a single-byte charset is UTF-8"))
        raw = message([("Subject", "no content-type")], data)
        out.append(Case("generated", "body-utf8-no-content-type", raw, text=text,
                        why="undeclared 8-bit text is UTF-8 when it is valid"))
    return out


def _undeclared_legacy_bodies() -> list[Case]:
    out = []
    for charset in UNDECLARED:
        text = SAMPLES[charset]
        body = _encode("\n".join([text] * 3), charset)
        raw = message([("Subject", "undeclared"), ("Content-Type", "text/plain"),
                       ("Content-Transfer-Encoding", "8bit")], body)
        out.append(Case("generated", f"body-undeclared-{charset}", raw, text=text,
                        why="8-bit text with no charset that is not UTF-8: the detector reads it"))
    return out


def _mislabelled_bodies() -> list[Case]:
    out = []
    latin = SAMPLES["iso-8859-1"]
    raw = message([("Subject", "mislabelled"), ("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Transfer-Encoding", "8bit")], latin.encode("latin-1"))
    out.append(Case("generated", "body-latin1-labelled-utf8", raw, text=latin,
                    why="Latin-1 bytes labelled UTF-8 keep their letters"))
    cp1252 = SAMPLES["windows-1252"]
    raw = message([("Subject", "mislabelled"), ("Content-Type", "text/plain; charset=us-ascii"),
                   ("Content-Transfer-Encoding", "quoted-printable")], quopri.encodestring(cp1252.encode("cp1252")))
    out.append(Case("generated", "body-cp1252-labelled-ascii", raw, text=cp1252,
                    why="Windows-1252 bytes labelled us-ascii"))
    russian = SAMPLES["koi8-r"]
    raw = message([("Subject", "mislabelled"), ("Content-Type", "text/plain; charset=utf-8"),
                   ("Content-Transfer-Encoding", "8bit")], "\n".join([russian] * 3).encode("koi8-r"))
    out.append(Case("generated", "body-koi8r-labelled-utf8", raw, text=russian,
                    why="KOI8-R labelled UTF-8: not UTF-8, so the detector reads it"))
    gbk = SAMPLES["gbk"]
    raw = message([("Subject", "mislabelled"), ("Content-Type", "text/plain; charset=gb2312"),
                   ("Content-Transfer-Encoding", "base64")], base64.encodebytes("镕基与喆".encode("gbk") + gbk.encode("gbk")))
    out.append(Case("generated", "body-gbk-labelled-gb2312", raw, text="镕基与喆" + gbk,
                    why="GBK characters outside GB2312, labelled gb2312: the superset reads them"))
    raw = message([("Subject", "unknown"), ("Content-Type", "text/plain; charset=x-unknown-charset"),
                   ("Content-Transfer-Encoding", "8bit")], SAMPLES["utf-8"].encode())
    out.append(Case("generated", "body-unknown-charset-utf8", raw, text=SAMPLES["utf-8"],
                    why="a charset nobody knows, over UTF-8 bytes"))
    return out


def _utf16_bodies() -> list[Case]:
    out = []
    text = SAMPLES["utf-8"]
    for label, data in (("utf-16", text.encode("utf-16")), ("utf-16le", text.encode("utf-16-le")),
                        ("utf-16be", text.encode("utf-16-be"))):
        raw = message([("Subject", "utf-16"), ("Content-Type", f"text/plain; charset={label}"),
                       ("Content-Transfer-Encoding", "base64")], base64.encodebytes(data))
        out.append(Case("generated", f"body-{label}", raw, text=text, why="a UTF-16 body"))
    return out


# --- class 4: delimiters with transport padding --------------------------------------------

PIXEL = base64.b64decode(b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def _padded_delimiters() -> list[Case]:
    out = []
    for pad_name, pad in (("spaces", b"  "), ("tab", b"\t"), ("mixed", b" \t ")):
        parts = [b"--1" + pad + b"\r\nContent-Type: text/plain\r\n\r\nFour pictures.\r\n"]
        expected = []
        for i in range(4):
            data = PIXEL + bytes([i])
            parts.append(b"--1" + pad + b"\r\nContent-Type: image/png; name=\"p%d.png\"\r\n"
                         b"Content-Transfer-Encoding: base64\r\n\r\n" % i
                         + base64.b64encode(data) + b"\r\n")
            expected.append(Attachment.of(f"p{i}.png", "image/png", data))
        body = b"".join(parts) + b"--1--" + pad + b"\r\n"
        raw = message([("Subject", "padded"), ("Content-Type", 'multipart/mixed; boundary="1"')], body)
        out.append(Case("generated", f"padded-delimiters-{pad_name}", raw, subject="padded",
                        text="Four pictures.", attachments=tuple(expected),
                        why="RFC 2046: whitespace after a boundary delimiter"))
    return out


# --- class 5: legacy transfer encodings ----------------------------------------------------

PAYLOAD = bytes(range(256)) * 3 + b"the end\n"


def uuencoded(data: bytes, name: str, mode: str = "644") -> bytes:
    lines = [f"begin {mode} {name}".encode()]
    lines += [binascii.b2a_uu(data[i:i + 45]).rstrip(b"\n") for i in range(0, len(data), 45)]
    return b"\r\n".join(lines + [b"`", b"end"]) + b"\r\n"


def _uuencode() -> list[Case]:
    out = []
    for cte in ("x-uuencode", "uuencode", "x-uue"):
        body = (b"--b\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n"
                b"--b\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
                b"Content-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n"
                + uuencoded(PAYLOAD, "data.bin") + b"--b--\r\n")
        raw = message([("Subject", "uu"), ("Content-Type", "multipart/mixed; boundary=b")], body)
        out.append(Case("generated", f"cte-{cte}", raw, text="See the file.",
                        attachments=(Attachment.of("data.bin", "application/octet-stream", PAYLOAD),),
                        why="a uuencoded part is stored as its bytes"))
    body = (b"Here is the report.\r\n\r\n" + uuencoded(PAYLOAD, "report.pdf")
            + b"\r\nAnd a second one:\r\n\r\n" + uuencoded(b"%PDF-1.4 tiny", "second.pdf", "664")
            + b"\r\nRegards\r\n")
    raw = message([("Subject", "inline uu"), ("Content-Type", "text/plain")], body)
    out.append(Case("generated", "inline-begin-644", raw, text="Here is the report. And a second one: Regards",
                    text_excludes=("begin 644", "end\r\n"),
                    attachments=(Attachment.of("report.pdf", "application/pdf", PAYLOAD),
                                 Attachment.of("second.pdf", "application/pdf", b"%PDF-1.4 tiny")),
                    why="begin 644 blocks in a plain text body are its attachments"))
    return out


def binhexed(data: bytes, name: str, type_: bytes = b"TEXT", creator: bytes = b"ttxt") -> bytes:
    """BinHex 4.0 (RFC 1741) of a data fork, written from the format's description."""
    def crc(b: bytes) -> bytes:
        return binascii.crc_hqx(b, 0).to_bytes(2, "big")
    header = (bytes([len(name)]) + name.encode("latin-1") + b"\0" + type_ + creator + b"\0\0"
              + len(data).to_bytes(4, "big") + (0).to_bytes(4, "big"))
    stream = header + crc(header) + data + crc(data) + crc(b"")
    # Run-length encoding: a literal 0x90 is 0x90 0x00; a run of 3 to 255 is b 0x90 n.
    rle, i = bytearray(), 0
    while i < len(stream):
        b, run = stream[i], 1
        if b == 0x90:
            rle += b"\x90\x00"
            i += 1
            continue
        while i + run < len(stream) and stream[i + run] == b and run < 255:
            run += 1
        rle += bytes([b, 0x90, run]) if run >= 3 else bytes([b]) * run
        i += run
    alphabet = b"!\"#$%&'()*+,-012345689@ABCDEFGHIJKLMNPQRSTUVXYZ[`abcdefhijklmpqr"
    bits, nbits, chars = 0, 0, bytearray()
    for b in rle:
        bits, nbits = (bits << 8) | b, nbits + 8
        while nbits >= 6:
            nbits -= 6
            chars.append(alphabet[(bits >> nbits) & 63])
    if nbits:
        chars.append(alphabet[(bits << (6 - nbits)) & 63])
    text = b":" + bytes(chars) + b":"
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return b"(This file must be converted with BinHex 4.0)\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


def _binhex() -> list[Case]:
    data = b"BinHex lives on in old Macs.\r" * 20 + bytes([0x90, 0x90, 0, 0, 0, 0, 0, 7])
    body = (b"--b\r\nContent-Type: text/plain\r\n\r\nA Mac file.\r\n"
            b"--b\r\nContent-Type: application/mac-binhex40; name=\"notes.txt.hqx\"\r\n\r\n"
            + binhexed(data, "notes.txt") + b"--b--\r\n")
    raw = message([("Subject", "binhex"), ("Content-Type", "multipart/mixed; boundary=b")], body)
    return [Case("generated", "binhex-part", raw, text="A Mac file.",
                 attachments=(Attachment.of("notes.txt", "text/plain", data),),
                 why="a BinHex 4.0 part is stored as its data fork, under the name it carries")]


# --- class 6: broken structure -------------------------------------------------------------

def _two_parts(boundary: bytes, final: bool = True) -> bytes:
    body = (b"--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe letter text. Gr\xc3\xbc\xc3\x9fe\r\n"
            b"--" + boundary + b"\r\nContent-Type: application/pdf; name=\"a.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"%PDF-1.4 broken") + b"\r\n")
    return body + (b"--" + boundary + b"--\r\n" if final else b"")


def _broken_structure() -> list[Case]:
    pdf = (Attachment.of("a.pdf", "application/pdf", b"%PDF-1.4 broken"),)
    shapes = {
        "missing-final-boundary": ('multipart/mixed; boundary="XYZ"', _two_parts(b"XYZ", final=False), None),
        "missing-boundary-parameter": ("multipart/mixed", _two_parts(b"XYZ"), "partial"),
        "boundary-never-occurs": ('multipart/mixed; boundary="ABC"', _two_parts(b"XYZ"), "partial"),
    }
    out = []
    for name, (ctype, body, status) in shapes.items():
        raw = message([("Subject", "broken"), ("Content-Type", ctype)], body)
        out.append(Case("generated", name, raw, subject="broken", text="The letter text. Grüße",
                        text_excludes=("Content-Type", "--XYZ"), attachments=pdf, status=status,
                        why="a broken multipart is split on the delimiter lines it has"))
    return out


# --- class 7: a subject beside a malformed header block ------------------------------------

def _malformed_header_blocks() -> list[Case]:
    shapes = {
        "line-without-colon": b"From: a@example.org\r\nThis line is no header\r\nSubject: Still here\r\n",
        "space-before-colon": b"From: a@example.org\r\nX-Mailer : Old Client 1.0\r\nSubject: Still here\r\n",
        "subject-space-before-colon": b"From: a@example.org\r\nSubject : Still here\r\n",
        "8bit-header-name": b"From: a@example.org\r\nX-\xe9t\xe9: yes\r\nSubject: Still here\r\n",
        "empty-header-name": b"From: a@example.org\r\n: nameless\r\nSubject: Still here\r\n",
        "leading-blank-continuation": b" stray continuation\r\nFrom: a@example.org\r\nSubject: Still here\r\n",
        "mbox-from-line": b"From a@example.org Mon Jan  1 00:00:00 2001\r\nFrom: a@example.org\r\nSubject: Still here\r\n",
        "lf-only-with-cr-junk": b"From: a@example.org\nX-Junk: a\rb\nSubject: Still here\n",
        "nul-in-earlier-header": b"From: a@example.org\r\nX-Nul: a\x00b\r\nSubject: Still here\r\n",
    }
    out = []
    for name, head in shapes.items():
        newline = b"\n" if b"\r\n" not in head else b"\r\n"
        raw = head + b"Content-Type: text/plain" + newline + newline + b"The body." + newline
        out.append(Case("generated", f"malformed-headers-{name}", raw, subject="Still here",
                        text="The body.", text_excludes=("Subject",),
                        why="a header block malformed elsewhere keeps its Subject and its body"))
    return out


# --- message/rfc822: nesting ---------------------------------------------------------------

def _forwarded() -> list[Case]:
    inner = (b"From: carol@example.org\r\nSubject: Inner\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=in\r\n\r\n"
             b"--in\r\nContent-Type: text/plain\r\n\r\nInner text, not the outer body.\r\n"
             b"--in\r\nContent-Type: image/png; name=inner.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             + base64.encodebytes(PIXEL) + b"--in--\r\n")
    body = (b"--out\r\nContent-Type: text/plain\r\n\r\nSee the forwarded mail.\r\n"
            b"--out\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment; filename=fwd.eml\r\n\r\n"
            + inner + b"--out\r\nContent-Type: application/pdf; name=outer.pdf\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(b"%PDF outer") + b"--out--\r\n")
    raw = message([("Subject", "Fwd: Inner"), ("Content-Type", "multipart/mixed; boundary=out")], body)
    return [Case("generated", "forwarded-with-attachments", raw, subject="Fwd: Inner",
                 text="See the forwarded mail.", text_excludes=("Inner text",),
                 attachments=(Attachment.of("fwd.eml", "message/rfc822", inner[:-2]),  # the CRLF
                              # before a delimiter is the delimiter's (RFC 2046 §5.1.1)
                              Attachment.of("inner.png", "image/png", PIXEL, enclosed_by=0),
                              Attachment.of("outer.pdf", "application/pdf", b"%PDF outer")),
                 why="a forwarded message keeps its attachments, marked as inside it; "
                     "its text stays out of the outer body")]


# --- attachment names and transfer-encoding labels ---------------------------------------

NAMES = {"windows-1251": "Отчёт за май.pdf", "koi8-r": "Счёт пять.pdf", "iso-8859-1": "élève année.pdf",
         "shift_jis": "報告書.pdf", "gb18030": "季度报告.pdf", "big5": "報告.pdf", "utf-8": "€ rates ✓.pdf",
         "euc-kr": "보고서.pdf", "iso-8859-2": "Zażółć.pdf"}


def _with_part(part_headers: bytes, data: bytes) -> bytes:
    body = (b"--n\r\nContent-Type: text/plain\r\n\r\nAttached.\r\n--n\r\n" + part_headers
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data) + b"--n--\r\n")
    return message([("Subject", "name"), ("Content-Type", "multipart/mixed; boundary=n")], body)


def _filenames() -> list[Case]:
    out = []
    data = b"%PDF-1.4 named"
    for charset, name in NAMES.items():
        encoded = _encode(name, charset)
        rfc2231 = (b"Content-Type: application/pdf\r\nContent-Disposition: attachment; filename*="
                   + charset.encode() + b"''" + urllib.parse.quote(encoded).encode())
        out.append(Case("generated", f"filename-rfc2231-{charset}", _with_part(rfc2231, data), text="Attached.",
                        attachments=(Attachment.of(name, "application/pdf", data),),
                        why="an RFC 2231 filename in its own charset"))
        word = b"=?" + charset.encode() + b"?B?" + base64.b64encode(encoded) + b"?="
        ew = b'Content-Type: application/pdf; name="' + word + b'"\r\nContent-Disposition: attachment'
        out.append(Case("generated", f"filename-encoded-word-{charset}", _with_part(ew, data), text="Attached.",
                        attachments=(Attachment.of(name, "application/pdf", data),),
                        why="an encoded-word filename (what Outlook and Gmail send), in its charset"))
    return out


def _transfer_encoding_labels() -> list[Case]:
    out = []
    for label in ("BASE64", '"base64"', "base64 (by the gateway)", " Base64 "):
        body = (b"--t\r\nContent-Type: text/plain\r\n\r\nSee the file.\r\n--t\r\nContent-Type: application/octet-stream;"
                b" name=data.bin\r\nContent-Transfer-Encoding: " + label.encode() + b"\r\n\r\n"
                + base64.encodebytes(PAYLOAD) + b"--t--\r\n")
        raw = message([("Subject", "cte"), ("Content-Type", "multipart/mixed; boundary=t")], body)
        out.append(Case("generated", f"cte-label-{label.strip().strip(chr(34)).split()[0].lower()}-{len(out)}", raw,
                        attachments=(Attachment.of("data.bin", "application/octet-stream", PAYLOAD),),
                        why="a transfer-encoding label in capitals, quoted, with a comment or blanks"))
    return out
