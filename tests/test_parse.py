"""mailread.parse: real corpus mail, national charsets, broken input and the limits."""

from __future__ import annotations

import hashlib

import pytest

from mailread.parse import Limits, parse_email
from mailferry.errors import EmailParseError
from devstack import mailgen

CORPUS = mailgen.CORPUS


def parsed(name: str):
    return parse_email((CORPUS / name).read_bytes())


def test_every_corpus_message_parses_or_gives_a_reason():
    for path in mailgen.corpus_files():
        try:
            result = parse_email(path.read_bytes())
        except EmailParseError as exc:
            assert str(exc), path.name
            continue
        assert result.message_id.startswith("<") and result.message_id.endswith(">"), path.name
        assert len(result.sha256) == 64


def test_pdf_attachment_is_decoded_with_its_name():
    result = parsed("attached-pdf.eml")
    assert [(a.filename, a.content_type) for a in result.attachments] == [("test.pdf", "application/pdf")]
    assert result.attachments[0].data.startswith(b"%PDF")
    assert "test message" in result.text.lower() or result.text.strip()


def test_inline_image_and_bodies_of_a_mailgun_message():
    result = parsed("mailgun-pic.eml")
    assert [a.filename for a in result.attachments] == ["mailgun.png"]
    assert result.attachments[0].data.startswith(b"\x89PNG")
    assert result.attachments[0].is_image
    assert result.text and result.html


def test_iphone_photo_is_a_jpeg_attachment():
    result = parsed("iphone.eml")
    assert [a.filename for a in result.attachments] == ["photo.JPG"]
    assert result.attachments[0].data[:3] == b"\xff\xd8\xff"


def test_bz2_attachment_bytes_are_exact():
    result = parsed("bz2-attachment.eml")
    assert result.attachments[0].filename == "foo.txt.bz2"
    assert result.attachments[0].data.startswith(b"BZh")


def test_raw_utf8_filename_is_recovered_not_mojibake():
    result = parsed("russian-attachment-yahoo.eml")
    assert result.attachments[0].filename.startswith("Картинка с очень")


def test_nested_message_is_kept_as_an_eml_attachment():
    result = parsed("enclosed.eml")
    assert [a.content_type for a in result.attachments] == ["message/rfc822"]
    assert result.attachments[0].filename == "thanks.eml"
    assert b"Subject:" in result.attachments[0].data
    assert result.nested_subjects == ["Thanks!"]


def test_torture_message_keeps_every_leaf():
    result = parsed("torture.eml")
    types = [a.content_type for a in result.attachments if a.enclosed_by is None]
    # The torture test's top level: eight forwarded messages and three media leaves; the
    # forwarded messages' own parts follow their .eml attachments, marked as inside them.
    assert types.count("message/rfc822") == 8
    assert sorted(t for t in types if t != "message/rfc822") == ["audio/basic", "image/gif", "image/pbm"]


def test_text_and_html_alternatives_both_kept():
    result = parse_email(mailgen.text_and_html(1))
    assert result.text.strip() == "Plain version 1"
    assert "<b>1</b>" in result.html
    assert result.attachments == []


def test_broken_mime_keeps_the_body_as_text_with_a_warning():
    result = parsed("false-multipart.eml")
    assert result.warnings and "MIME structure broken" in result.warnings[0]
    assert result.text


def test_endless_nesting_is_refused_with_a_reason():
    with pytest.raises(EmailParseError, match="MIME"):
        parsed("enclosed-endless.eml")


@pytest.mark.parametrize("charset,text", [
    ("gb2312", "中文邮件测试，这是一封信"),
    ("gbk", "中文邮件测试，镕"),  # 镕 is GBK only: labelled gb2312 it needs gb18030
    ("koi8-r", "Привет, как дела?"),
    ("iso-2022-jp", "日本語のメールです"),
    ("big5", "繁體中文郵件"),
    ("shift_jis", "ｶﾀｶﾅとひらがな"),
])
def test_national_charsets_decode(charset, text):
    result = parse_email(mailgen.national(1, charset, text))
    assert result.text.strip() == text
    assert result.subject == text[:20]


def test_gbk_text_labelled_gb2312_decodes_fully():
    raw = ("From: a@x\r\nTo: b@y\r\nSubject: =?gb2312?B?" ).encode() + b"\r\n"
    body = "镕基和中文".encode("gbk")
    raw = (b"From: a@x\r\nTo: b@y\r\nMessage-ID: <g@x>\r\n"
           b"Content-Type: text/plain; charset=gb2312\r\n\r\n" + body)
    assert parse_email(raw).text == "镕基和中文"


def test_unknown_charset_falls_back_instead_of_failing():
    raw = (b"From: a@x\r\nTo: b@y\r\nMessage-ID: <u@x>\r\n"
           b"Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nhello \xc3\xa9")
    assert parse_email(raw).text == "hello é"


def test_message_id_flanker_misses_is_read_from_the_header():
    raw = b"From: a@x\r\nTo: b@y\r\nMessage-ID: <a@x>\r\nSubject: s\r\n\r\nbody"
    assert parse_email(raw).message_id == "<a@x>"


def test_message_without_message_id_gets_one_from_its_hash():
    result = parse_email(b"From: a@x\r\nTo: b@y\r\nSubject: s\r\n\r\nbody")
    assert result.message_id == f"<{result.sha256}@mailferry>"


def test_hostile_filename_is_kept_only_as_data():
    raw = mailgen.with_attachment(1, "../../../etc/x", b"secret")
    result = parse_email(raw)
    assert result.attachments[0].filename == "../../../etc/x"
    assert result.attachments[0].data == b"secret"


def test_addresses_threading_and_date():
    raw = (b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.de>\r\nTo: a@x, \"B, C\" <b@y>\r\n"
           b"Cc: c@z\r\nReply-To: r@x\r\nIn-Reply-To: <p@x>\r\nReferences: <o@x> <p@x>\r\n"
           b"Date: Tue, 01 Aug 2023 10:00:00 +0200\r\nMessage-ID: <m@x>\r\n\r\nhi")
    result = parse_email(raw)
    assert result.sender == "jorg@example.de"
    assert result.to == ["a@x", "b@y"] and result.cc == ["c@z"] and result.reply_to == ["r@x"]
    assert result.in_reply_to == "<p@x>" and result.references == ["<o@x>", "<p@x>"]
    assert result.date.isoformat() == "2023-08-01T08:00:00"


@pytest.mark.parametrize("limits,raw,reason", [
    (Limits(max_message_bytes=2048), mailgen.with_attachment(1, "big.bin", b"x" * 4096), "over the limit"),
    (Limits(max_header_bytes=1024), b"X-Long: " + b"a" * 2000 + b"\r\n\r\nbody", "header block"),
    (Limits(max_addresses=2), mailgen.plain(1, to="a@x, b@x, c@x"), "addresses"),
    (Limits(max_mime_parts=2), mailgen.with_attachment(1, "f.bin", b"data"), "MIME parts"),
])
def test_limits_give_readable_reasons(limits, raw, reason):
    with pytest.raises(EmailParseError, match=reason):
        parse_email(raw, limits)


def test_nesting_depth_limit():
    inner = mailgen.plain(1)
    for _ in range(5):
        inner = (b"From: a@x\r\nMessage-ID: <n@x>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
                 b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b--\r\n")
    assert parse_email(inner, Limits(max_mime_depth=20))
    deep = b"Content-Type: multipart/mixed; boundary=b0\r\nMessage-ID: <d@x>\r\n\r\n"
    tail = b""
    for level in range(1, 8):
        deep += f"--b{level - 1}\r\nContent-Type: multipart/mixed; boundary=b{level}\r\n\r\n".encode()
        tail = f"\r\n--b{level - 1}--\r\n".encode() + tail
    deep += b"--b7\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b7--" + tail
    with pytest.raises(EmailParseError, match="nesting deeper"):
        parse_email(deep, Limits(max_mime_depth=4))


@pytest.mark.parametrize("header, subject", [
    ("Subject: Grüße aus Köln ✓".encode(), "Grüße aus Köln ✓"),  # RFC 6532 raw UTF-8
    (b"Subject: =?iso-8859-1?Q?Die_Hasen_und_die_Fr\xf6sche?=", "Die Hasen und die Frösche"),
    ("Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= und Köln".encode(), "Grüße und Köln"),
    (b"Subject: =?utf-8?q?a?=\r\n =?utf-8?b?w7w=?= x =?gb2312?b?xOO6ww==?=", "aü x 你好"),
    (b"Subject: caf\xe9 \x93quoted\x94", "café “quoted”"),  # not UTF-8: Windows-1252
    (b"Subject: =?utf-8*en?q?language_suffix?=", "language suffix"),  # RFC 2231 in a word
])
def test_headers_are_decoded_from_their_raw_bytes(header, subject):
    raw = b"From: a@example.net\r\nTo: b@example.org\r\n" + header + b"\r\n\r\nbody\r\n"
    assert parse_email(raw).subject == subject


def test_raw_utf8_display_names_do_not_hide_the_addresses():
    raw = ("From: Jörg Müller <jm@example.de>\r\nTo: Zoë <zoe@example.org>, "
           "=?utf-8?q?Ren=C3=A9?= <rene@example.org>\r\n\r\nbody\r\n").encode()
    parsed = parse_email(raw)
    assert parsed.sender == "jm@example.de"
    assert parsed.to == ["zoe@example.org", "rene@example.org"]


@pytest.mark.parametrize("charset, body, text", [
    (None, "Die Frösche".encode(), "Die Frösche"),  # undeclared 8-bit: UTF-8 when valid
    ("us-ascii", "Die Frösche".encode(), "Die Frösche"),
    ("iso-8859-1", "Die Frösche".encode(), "Die Frösche"),  # UTF-8 labelled latin-1
    ("utf-8", "Die Frösche".encode("latin-1"), "Die Frösche"),  # latin-1 labelled UTF-8
    ("iso-8859-1", "Die Frösche".encode("latin-1"), "Die Frösche"),
    ("windows-1251", "Привет, мир".encode("cp1251"), "Привет, мир"),
    ("koi8-r", "Привет, мир".encode("koi8-r"), "Привет, мир"),
])
def test_text_bodies_are_decoded_the_way_the_sender_meant(charset, body, text):
    ctype = b"text/plain" + (b"; charset=" + charset.encode() if charset else b"")
    raw = (b"From: a@example.net\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\nContent-Type: "
           + ctype + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n")
    assert parse_email(raw).text.strip() == text


def test_an_x_uuencode_attachment_is_stored_as_its_bytes():
    import binascii
    payload = bytes(range(256)) * 3
    lines = b"".join(binascii.b2a_uu(payload[i:i + 45]) for i in range(0, len(payload), 45))
    raw = (b"From: a@example.net\r\nTo: b@example.org\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
           b"Content-Type: text/plain\r\n\r\nsee attached\r\n--BB\r\n"
           b"Content-Type: application/octet-stream; name=data.bin\r\n"
           b"Content-Transfer-Encoding: x-uuencode\r\n\r\n"
           b"begin 644 data.bin\r\n" + lines.replace(b"\n", b"\r\n") + b"`\r\nend\r\n--BB--\r\n")
    parsed = parse_email(raw)
    [attachment] = parsed.attachments
    assert attachment.filename == "data.bin"
    assert attachment.data == payload


@pytest.mark.parametrize("pad", [b"  ", b"\t", b" \t "])
def test_boundary_delimiters_with_transport_padding_still_split_the_parts(pad):
    parts = b"".join(b"--1" + pad + b"\r\nContent-Type: image/png; name=i%d.png\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n" % i for i in range(4))
    raw = (b"From: a@x\r\nTo: b@y\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
           b"boundary=1\r\n\r\n" + parts + b"--1--" + pad + b"\r\n")
    parsed = parse_email(raw)
    assert [a.filename for a in parsed.attachments] == [f"i{i}.png" for i in range(4)]
    assert all(a.data == b"\x89PNG\r\n\x1a\n" for a in parsed.attachments)
    assert parsed.warnings == []
    assert parsed.sha256 == hashlib.sha256(raw).hexdigest()  # of the bytes as they came


_BROKEN_PARTS = (b"--XX\r\nContent-Type: text/plain\r\n\r\nhello text\r\n--XX\r\n"
                 b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64"
                 b"\r\n\r\nJVBERi0xLjQ=\r\n")


@pytest.mark.parametrize("content_type, tail", [
    (b"multipart/mixed", b"--XX--\r\n"),  # no boundary= at all
    (b"multipart/mixed;\r\n boundary=YY", b"--XX--\r\n"),  # a boundary that never occurs
    (b"multipart/alternative; boundary=YY", b""),  # … and no final delimiter either
])
def test_a_broken_multipart_is_split_on_the_delimiter_lines_it_has(content_type, tail):
    raw = (b"From: a@x\r\nTo: b@y\r\nSubject: broken\r\nMIME-Version: 1.0\r\nContent-Type: "
           + content_type + b"\r\n\r\n" + _BROKEN_PARTS + tail)
    parsed = parse_email(raw)
    assert parsed.text.strip() == "hello text"  # no MIME headers in the text
    assert [(a.filename, a.data) for a in parsed.attachments] == [("a.pdf", b"%PDF-1.4")]
    assert parsed.warnings and "split on the delimiter lines found" in parsed.warnings[0]
    assert parsed.sha256 == hashlib.sha256(raw).hexdigest()
