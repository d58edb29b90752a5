"""Hostile bytes at the parser: every message parses to a record or to a quarantine reason
(EmailParseError), never to any other exception, whatever its headers hold."""

from __future__ import annotations

import encodings.aliases
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mailread.charsets import codec_for, decode_header_value, decode_text
from mailread.parse import ParsedEmail, parse_email
from mailferry.errors import EmailParseError

GOOD_TAIL = b"From: a@example.net\r\nMessage-ID: <m@example.net>\r\n\r\nbody\r\n"
# Every codec name Python knows, text or not: a header may name any of them.
CODEC_NAMES = sorted(set(encodings.aliases.aliases) | set(encodings.aliases.aliases.values())
                     | {"zlib", "base64", "rot13", "hex", "bz2", "uu", "quopri", "idna", "punycode"})


def outcome(raw: bytes) -> ParsedEmail | str:
    """The record, or the quarantine reason; anything else raised fails the test."""
    try:
        return parse_email(raw)
    except EmailParseError as exc:
        assert str(exc), "a quarantine reason is never empty"
        return str(exc)


@pytest.mark.parametrize("name", ["zlib", "base64", "rot13", "hex", "bz2", "uu", "quopri"])
def test_a_charset_that_is_a_codec_but_not_a_text_encoding_is_read_as_utf8(name):
    assert codec_for(name) == "utf-8"
    parsed = parse_email(b"To: b@example.org\r\nSubject: =?" + name.encode() + b"?q?=FF_ok?=\r\n"
                         + GOOD_TAIL)
    assert isinstance(parsed, ParsedEmail)
    assert parsed.subject.endswith("ok")


def test_six_hundred_open_parentheses_in_to_still_give_the_address():
    raw = b"To: " + b"(" * 600 + b"bob@example.org\r\nSubject: hi\r\n" + GOOD_TAIL
    parsed = parse_email(raw)
    assert parsed.to == ["bob@example.org"]
    assert parsed.subject == "hi"


def test_nested_parentheses_in_every_address_header_never_raise():
    nest = b"(" * 2000
    raw = (b"To: " + nest + b"a@x\r\nCc: " + nest + b"b@y\r\nReply-To: " + nest
           + b"c@z\r\nFrom: " + nest + b"d@w\r\n\r\nbody\r\n")
    result = outcome(raw)
    assert isinstance(result, ParsedEmail)
    assert result.to == ["a@x"] and result.cc == ["b@y"]


def test_a_nul_in_the_subject_is_kept_by_the_parser_for_the_database_layer_to_strip():
    parsed = parse_email(b"Subject: =?utf-8?b?AA==?=x\r\n" + GOOD_TAIL)
    assert parsed.subject == "\x00x"


def test_a_control_character_never_becomes_part_of_a_message_id():
    parsed = parse_email(b"Message-ID: <a\x00b@x>\r\nFrom: a@x\r\n\r\nbody\r\n")
    assert "\x00" not in parsed.message_id
    assert parsed.message_id.endswith("@mailferry>")


def test_decoders_never_raise_on_any_codec_name():
    for name in CODEC_NAMES:
        text, _ = decode_text(b"\xff\xfe\x00abc", name)
        assert isinstance(text, str), name
        assert isinstance(decode_header_value(f"=?{name}?q?=FF=00?= =?{name}?b?/w==?="), str), name


def test_deep_multipart_nesting_is_a_quarantine_reason_not_a_crash():
    depth = 3000
    parts = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
                     for i in range(depth))
    result = outcome(b"From: a@x\r\n" + parts + b"\r\n")
    assert isinstance(result, (ParsedEmail, str))
    if isinstance(result, str):
        assert "MIME" in result or "nests" in result or "parse" in result


# -- generated hostile headers ------------------------------------------------------------

_nested = st.sampled_from([b"(", b'"', b"<", b"\\", b"=?"]).flatmap(
    lambda ch: st.integers(1, 1500).map(lambda n: ch * n))
_encoded_word = st.tuples(st.sampled_from(CODEC_NAMES), st.sampled_from([b"q", b"b", b"x"]),
                          st.binary(max_size=40)).map(
    lambda t: b"=?" + t[0].encode() + b"?" + t[1] + b"?" + t[2].replace(b"?=", b"") + b"?=")
_piece = st.one_of(
    _nested,
    _encoded_word,
    st.just(b"\x00"),
    st.binary(min_size=1, max_size=60),  # 8-bit bytes, bare CR/LF, anything
    st.integers(998, 20_000).map(lambda n: b"x" * n),  # an overlong line
    st.sampled_from([b"a@example.org", b"<b@example.org>", b"Name <c@x>", b","]),
)
_value = st.lists(_piece, min_size=1, max_size=6).map(b"".join)
_header_name = st.sampled_from([b"To", b"Cc", b"From", b"Reply-To", b"Subject", b"Message-ID",
                                b"In-Reply-To", b"References", b"Date", b"Content-Type",
                                b"Content-Disposition", b"Content-Transfer-Encoding"])
_headers = st.lists(st.tuples(_header_name, _value), min_size=1, max_size=6)

EXAMPLES = int(os.environ.get("MAILFERRY_HYPOTHESIS_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(headers=_headers, body=st.binary(max_size=200))
def test_a_message_with_hostile_headers_is_stored_or_quarantined_never_raises(headers, body):
    raw = b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body
    result = outcome(raw)
    if isinstance(result, ParsedEmail):
        # What would be stored is plain text and a usable key.
        assert isinstance(result.subject, str) and isinstance(result.text, str)
        assert result.message_id.startswith("<") and result.message_id.endswith(">")
        assert len(result.message_id) <= 512
        assert result.message_id.isprintable()


def _storable(value) -> None:
    """Every text the parser returns can be written as UTF-8 (no lone surrogates)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, (list, tuple)):
        for item in value:
            _storable(item)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=bool(os.environ.get("CI")),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(name=st.binary(min_size=1, max_size=40), body=st.binary(max_size=300),
       charset=st.sampled_from(CODEC_NAMES))
def test_8bit_parts_never_yield_text_that_cannot_be_stored(name, body, charset):
    raw = (b"From: a@x\r\nTo: b@y\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
           b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n--BB\r\n"
           b"Content-Type: application/octet-stream; name=\"" + name.replace(b'"', b"") + b"\"\r\n"
           b"Content-ID: <" + name.replace(b">", b"") + b">\r\n"
           b"Content-Disposition: attachment\r\n\r\nxyz\r\n--BB--\r\n")
    result = outcome(raw)
    if isinstance(result, ParsedEmail):
        _storable([result.subject, result.text, result.html, result.sender, *result.to])
        for attachment in result.attachments:
            _storable([attachment.filename, attachment.content_id or "", attachment.content_type])
