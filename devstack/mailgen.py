"""Building test messages: plain, text+HTML, attachments, national charsets."""

from __future__ import annotations

import base64
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "flanker"


def corpus_files() -> list[Path]:
    files = sorted(CORPUS.glob("*.eml"))
    assert files, f"corpus not found at {CORPUS}"
    return files


def plain(n: int, to: str = "bob@example.org", *, subject: str | None = None,
          message_id: str | None = None, cc: str | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.net>"
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject or f"Test message {n}"
    msg["Date"] = formatdate(1_700_000_000 + n)
    msg["Message-ID"] = message_id or f"<test-{n}@example.net>"
    msg.set_content(f"Hello, this is message number {n}.\n")
    return msg.as_bytes()


def with_attachment(n: int, filename: str, data: bytes, to: str = "bob@example.org",
                    content_type: str = "application/octet-stream") -> bytes:
    msg = MIMEMultipart()
    msg["From"] = "sender@example.net"
    msg["To"] = to
    msg["Subject"] = f"Attachment {n}"
    msg["Date"] = formatdate(1_700_000_000 + n)
    msg["Message-ID"] = f"<att-{n}@example.net>"
    msg.attach(MIMEText("See attached.\n", "plain", "utf-8"))
    main, sub = content_type.split("/")
    part = MIMEApplication(data, _subtype=sub)
    part.replace_header("Content-Type", f'{content_type}; name="{filename}"')
    part.add_header("Content-Disposition", f'attachment; filename="{filename}"')
    msg.attach(part)
    return msg.as_bytes()


def national(n: int, charset: str, text: str, to: str = "bob@example.org") -> bytes:
    """A text message in ``charset``, subject encoded in the same charset.

    Built by hand: the standard library would re-label some charsets (shift_jis as
    iso-2022-jp), and the point is to send exactly the label real senders use.
    """
    codec = {"gb2312": "gbk"}.get(charset, charset)  # senders write GBK and say gb2312
    subject = base64.b64encode(text[:20].encode(codec)).decode()
    body = base64.encodebytes(text.encode(codec)).decode()
    return (f"From: sender@example.net\r\nTo: {to}\r\n"
            f"Subject: =?{charset}?B?{subject}?=\r\n"
            f"Date: {formatdate(1_700_000_000 + n)}\r\nMessage-ID: <{charset}-{n}@example.net>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n{body}").encode("ascii")


def text_and_html(n: int, to: str = "bob@example.org") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@example.net"
    msg["To"] = to
    msg["Subject"] = f"Newsletter {n}"
    msg["Date"] = formatdate(1_700_000_000 + n)
    msg["Message-ID"] = f"<html-{n}@example.net>"
    msg.set_content(f"Plain version {n}\n")
    msg.add_alternative(f"<html><body><p>HTML version <b>{n}</b></p></body></html>\n", subtype="html")
    return msg.as_bytes()
