"""The fidelity suite: every case decoded the way its sender meant (see cases.py)."""

from __future__ import annotations

import pytest

from tests.fidelity.cases import all_cases, differences, outcome

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_decodes_as_its_sender_meant(case):
    assert differences(case, outcome(case.raw)) == {}, case.why
