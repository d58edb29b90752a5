"""A second opinion: the standard library's ``email`` with ``policy.default`` reads the same
messages, and every disagreement on subject or text is decided in ``expected/differential.toml``
(which reader is right, and why).

Only disagreements count, not differences of shape: the standard library's first
``text/plain`` body must appear in Mailferry's text (which joins every inline text part),
and one reader finding text where the other finds none is a disagreement.
"""

from __future__ import annotations

import email
import tomllib
from email import policy

from tests.fidelity.cases import HERE, Case, fold

DECISIONS = HERE / "expected" / "differential.toml"
SOURCES = ("corpus", "rfc", "clients")  # the messages written by people, not generated


def stdlib_reading(raw: bytes) -> tuple[str, str]:
    """Subject and first plain-text body as the standard library decodes them."""
    message = email.message_from_bytes(raw, policy=policy.default)
    try:
        subject = fold(str(message["subject"] or ""))
    except Exception as exc:  # noqa: BLE001 - the second opinion may fail where we do not
        subject = f"<{type(exc).__name__}>"
    try:
        body = message.get_body(preferencelist=("plain",))
        text = fold(body.get_content()) if body is not None else ""
    except Exception as exc:  # noqa: BLE001
        text = f"<{type(exc).__name__}>"
    return subject, text


def disagreements(case: Case, parsed) -> dict[str, tuple[str, str]]:
    """``{"subject"|"text": (mailferry, stdlib)}`` where the two readers differ."""
    if isinstance(parsed, str):
        return {"text": (f"<refused: {parsed[:60]}>", stdlib_reading(case.raw)[1][:80])}
    subject, text = stdlib_reading(case.raw)
    out = {}
    if subject != parsed.subject:
        out["subject"] = (parsed.subject[:120], subject[:120])
    ours = fold(parsed.text)
    if text[:60] not in ours or bool(text) != bool(ours):
        out["text"] = (fold(parsed.text)[:80], text[:80])
    return out


def decisions() -> dict[str, dict[str, dict[str, str]]]:
    """``{case id: {field: {"right": "mailferry"|"stdlib", "why": …}}}``."""
    return tomllib.loads(DECISIONS.read_text(encoding="utf-8"))
