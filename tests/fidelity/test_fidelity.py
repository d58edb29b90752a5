"""The fidelity suite: every case decoded the way its sender meant (see cases.py)."""

from __future__ import annotations

import pytest

from consumer.parse import parse_email
from mailferry.errors import EmailParseError
from tests.fidelity.cases import all_cases, differences

CASES = all_cases()


def outcome(raw: bytes):
    try:
        return parse_email(raw)
    except EmailParseError as exc:
        return str(exc)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_decodes_as_its_sender_meant(case):
    assert differences(case, outcome(case.raw)) == {}, case.why
