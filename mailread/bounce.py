"""Did my mail bounce: delivery status notifications and complaints, read into one shape.

Three readers, most certain first:
- an RFC 3464 report (``multipart/report; report-type=delivery-status``): the per-recipient
  fields say it all (Postfix, Sendmail, Exchange, Gmail, SES and every modern MTA);
- an RFC 5965 feedback report, or Microsoft's JMRP (a forwarded copy carrying
  ``X-HmXmrOriginalRecipient``): a complaint;
- the plain-text bounces older MTAs write (qmail, Exim, Yahoo, Exchange 2010): only when the
  sender or the subject says "delivery failure", the recipients from the lines that follow
  the MTA's own phrases, their status from the SMTP reply quoted after them.

Works on the standard library's MIME tree (``email`` with compat32 parses delivery-status
blocks into header sets); the caller bounds the size first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32

_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_MESSAGE_ID = re.compile(r"^message-id:\s*(<[^<>\s]{1,500}>)", re.IGNORECASE | re.MULTILINE)
_ADDRESS = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"
_FAILED_ACTIONS = {"failed", "delayed"}
_REPORT_TYPES = {"multipart/report", "message/delivery-status", "message/feedback-report"}

_BOUNCE_SENDER = re.compile(r"mailer-daemon|postmaster|mail delivery|mail.?delivery.?subsystem|"
                            r"mail administrator|maildelivery|bounce", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|returned mail|delivery (status notification|failure|failed|"
    r"incomplete|has failed|delayed)|mail delivery failed|failure notice|delivery notification|"
    r"could not be delivered|unzustellbar|nicht zustellbar|non remis|no se puede entregar|"
    r"não entregue|non recapitabile|onbestelbaar|не доставлено|退信|系统退信|配信エラー|"
    r"delayed mail|warning: message .* delayed|mail could not be delivered",
    re.IGNORECASE)
# Where a plain-text bounce starts listing the addresses that failed, and what it says then.
_LIST_STARTS = re.compile(
    r"following (address\(es\)|addresses|recipients?)( had permanent fatal errors| failed)?|"
    r"to the following address|could not be delivered to|delivery has failed to these|"
    r"wasn't able to deliver your message|unable to deliver your message|"
    r"delivery to the following recipient|your message to .{1,320} couldn't be delivered|"
    r"message could not be delivered|following message to|an error occurred while trying to deliver|"
    r"^delivery failed\b",
    re.IGNORECASE)
_LIST_ENDS = re.compile(r"below this line is a copy|original message|^-{3,}|"
                        r"^content-type:|^received:|^return-path:", re.IGNORECASE)
# An address alone on its line (qmail's "<x@y>:", Exim's indented list), maybe with a comment;
# or a name with the address in parentheses after it (Exchange 2010's "Name (x@y)").
_ADDRESSES = re.compile(_ADDRESS)
_ADDRESS_LINE = re.compile(rf"^<?({_ADDRESS})>?(\s*\(.*\))?\s*:?\s*$")
_BARE_ADDRESS_LINE = re.compile(rf"^<?{_ADDRESS}>?\s*:?\s*$")
_NAME_THEN_ADDRESS = re.compile(rf"\(\s*{_ADDRESS}\s*\)\s*$")
_NAMED_ADDRESS_LINE = re.compile(rf"^\S.*?\(?<?({_ADDRESS})>?\)?\s*$")
_PERMANENT_WORDS = re.compile(r"permanent|given up|giving up|failed permanently", re.IGNORECASE)
_DELAY_WORDS = re.compile(r"\bdelayed\b|will (be )?retr(y|ied)|not yet been delivered|"
                          r"temporar(y|ily) (failure|problem|error)|still trying|"
                          r"delivery incomplete|has not been delivered yet", re.IGNORECASE)


@dataclass(frozen=True)
class Recipient:
    address: str
    action: str  # failed | delayed | complaint
    status: str | None  # RFC 3463 "5.1.1", as the report states it
    diagnostic: str | None


@dataclass(frozen=True)
class Bounce:
    kind: str  # bounce | delay | complaint
    original_message_id: str | None
    recipients: list[Recipient] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "original_message_id": self.original_message_id,
                "recipients": [vars(r) for r in self.recipients]}


def bounce_of(raw: bytes, headers: Message, text: str) -> Bounce | None:
    """The bounce or complaint ``raw`` is, or None. ``headers``: its parsed header block;
    ``text``: its decoded plain text (for the reports that are only text)."""
    ctype = (headers.get_content_type() or "").lower()
    says_so = _looks_like_a_bounce(headers)
    if ctype in _REPORT_TYPES or says_so or b"X-HmXmrOriginalRecipient" in raw:
        tree = BytesParser(policy=compat32).parsebytes(raw)
        found = _from_report(tree) or _from_jmrp(tree)
        if found is not None:
            return found
    return _from_text(text, raw) if says_so else None


def _looks_like_a_bounce(headers: Message) -> bool:
    sender = str(headers.get("from") or "") + " " + str(headers.get("return-path") or "")
    subject = str(headers.get("subject") or "")
    return bool(_BOUNCE_SENDER.search(sender) or _BOUNCE_SUBJECT.search(subject)) and \
        not _is_autoreply_header(headers)


def _is_autoreply_header(headers: Message) -> bool:
    value = str(headers.get("auto-submitted") or "").lower()
    return "vacation" in value


def _from_report(tree: Message) -> Bounce | None:
    for part in tree.walk():
        kind = part.get_content_type().lower()
        if kind in ("message/delivery-status", "message/global-delivery-status"):
            return _delivery_status(part, tree)
        if kind == "message/feedback-report":
            return _feedback_report(part, tree)
    return None


def _field_blocks(part: Message) -> list[Message]:
    """The header blocks of a delivery-status or feedback-report part."""
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = [p for p in payload if isinstance(p, Message)]
        if blocks and any(b.keys() for b in blocks):
            return blocks
        text = "\n\n".join(p.as_string() for p in blocks)
    else:
        text = part.get_payload(decode=True) or b""
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    text = text.replace("\r\n", "\n")
    return [HeaderParser(policy=compat32).parsestr(chunk.strip() + "\n")
            for chunk in re.split(r"\n\s*\n", text) if chunk.strip()]


def _delivery_status(part: Message, tree: Message) -> Bounce | None:
    recipients = []
    for block in _field_blocks(part)[1:] or _field_blocks(part):
        address = _typed_address(block.get("final-recipient") or block.get("original-recipient"))
        action = str(block.get("action") or "").strip().lower()
        if not address:
            continue
        diagnostic = _one_line(block.get("diagnostic-code"))
        status = _status(block.get("status")) or _status(diagnostic)
        if not action:
            action = "delayed" if status and status.startswith("4") else "failed"
        if action not in _FAILED_ACTIONS:
            continue  # delivered, relayed, expanded: what went well is not a bounce
        recipients.append(Recipient(address, action, status, diagnostic))
    if not recipients:
        return None
    return Bounce(_kind(recipients), _original_message_id(tree), recipients)


def _feedback_report(part: Message, tree: Message) -> Bounce:
    recipients = []
    for block in _field_blocks(part):
        for value in block.get_all("original-rcpt-to") or block.get_all("removal-recipient") or ():
            address = _address_in(str(value))
            if address:
                recipients.append(Recipient(address, "complaint", None, None))
    return Bounce("complaint", _original_message_id(tree), _unique(recipients))


def _from_jmrp(tree: Message) -> Bounce | None:
    for part in tree.walk():
        if part.get_content_type().lower() != "message/rfc822":
            continue
        enclosed = part.get_payload(0) if part.is_multipart() else None
        if not isinstance(enclosed, Message):
            continue
        original = enclosed.get("x-hmxmroriginalrecipient")
        if original is not None:
            address = _address_in(str(original))
            recipients = [Recipient(address, "complaint", None, None)] if address else []
            return Bounce("complaint", _clean_id(enclosed.get("message-id")), recipients)
    return None


def _from_text(text: str, raw: bytes) -> Bounce | None:
    lines = text.replace("\r\n", "\n").split("\n")
    head = text[:4000]  # the MTA's own words, before any copy of the original
    delayed = bool(_DELAY_WORDS.search(head)) and not _PERMANENT_WORDS.search(head)
    recipients: list[Recipient] = []
    listing = False
    for index, line in enumerate(lines):
        if _LIST_STARTS.search(line):
            listing = True
            for address in _ADDRESSES.findall(line):  # "… couldn't be delivered", "failed: x@y"
                recipients.append(_text_recipient(address, lines, index, delayed))
            continue
        if not listing:
            continue
        stripped = line.strip()
        if _LIST_ENDS.search(stripped):
            break
        found = _ADDRESS_LINE.match(stripped)
        if found is None and _NAME_THEN_ADDRESS.search(stripped):
            found = _NAMED_ADDRESS_LINE.match(stripped)
        if found:
            recipients.append(_text_recipient(found.group(1), lines, index, delayed))
    recipients = _unique(recipients)
    if not recipients:
        return None
    return Bounce(_kind(recipients), _original_message_id_in_text(text, raw), recipients)


def _text_recipient(address: str, lines: list[str], index: int, delayed: bool) -> Recipient:
    """``delayed``: what the bounce's own words say of all its recipients; a 4.x.x status
    quoted for this one says it is only delayed."""
    # The reason follows the address: the lines up to the next address or the end of the list.
    reason_lines = []
    for line in lines[index + 1:index + 8]:
        stripped = line.strip()
        if _BARE_ADDRESS_LINE.match(stripped) or _LIST_ENDS.search(stripped):
            break
        reason_lines.append(stripped)
    reason = " ".join(l for l in reason_lines if l) or None
    status = _status(reason)
    if status and status.startswith("4"):
        delayed = True
    return Recipient(address.lower(), "delayed" if delayed else "failed", status, reason)


def _kind(recipients: list[Recipient]) -> str:
    return "delay" if all(r.action == "delayed" for r in recipients) else "bounce"


def _original_message_id(tree: Message) -> str | None:
    for part in tree.walk():
        kind = part.get_content_type().lower()
        if kind in ("message/rfc822", "message/global"):
            enclosed = part.get_payload(0) if part.is_multipart() else None
            if isinstance(enclosed, Message) and enclosed.get("message-id"):
                return _clean_id(enclosed.get("message-id"))
        if kind in ("text/rfc822-headers", "message/global-headers"):
            payload = part.get_payload(decode=True) or b""
            found = _MESSAGE_ID.search(payload.decode("utf-8", "replace"))
            if found:
                return found.group(1)
    return None


def _original_message_id_in_text(text: str, raw: bytes) -> str | None:
    # The copy of the original follows the bounce's own header block.
    normal = raw.replace(b"\r\n", b"\n")
    body = normal.split(b"\n\n", 1)[1] if b"\n\n" in normal else b""
    found = _MESSAGE_ID.search(body.decode("utf-8", "replace")) or _MESSAGE_ID.search(text)
    return found.group(1) if found else None


def _typed_address(value) -> str | None:
    """``rfc822; user@host`` → ``user@host``."""
    if value is None:
        return None
    text = str(value).strip()
    if ";" in text:
        text = text.split(";", 1)[1]
    return _address_in(text)


def _address_in(text: str) -> str | None:
    found = _ADDRESSES.search(text)
    return found.group(0).lower() if found else None


def _status(value) -> str | None:
    if value is None:
        return None
    found = _STATUS.search(str(value))
    return ".".join(found.groups()) if found else None


def _one_line(value) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _clean_id(value) -> str | None:
    if value is None:
        return None
    found = re.search(r"<[^<>\s]{1,500}>", str(value))
    return found.group(0) if found else None


def _unique(recipients: list[Recipient]) -> list[Recipient]:
    seen: dict[str, Recipient] = {}
    for recipient in recipients:
        seen.setdefault(recipient.address, recipient)
    return list(seen.values())
