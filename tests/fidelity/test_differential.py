"""The differential check: the standard library's reading of every hand-made case (the
corpus, the RFC examples, the client layouts), each disagreement decided (differential.py)."""

from __future__ import annotations

from tests.fidelity.cases import load, outcome
from tests.fidelity.differential import SOURCES, decisions, disagreements


def test_every_disagreement_with_the_standard_library_is_decided():
    found = {}
    for source in SOURCES:
        for case in load(source):
            for field_name, readings in disagreements(case, outcome(case.raw)).items():
                found[(case.id, field_name)] = readings
    decided = {(case_id, field_name): decision
               for case_id, fields in decisions().items() for field_name, decision in fields.items()}
    undecided = {key: found[key] for key in found.keys() - decided.keys()}
    stale = sorted(decided.keys() - found.keys())
    assert undecided == {}, "decide these in expected/differential.toml"
    assert stale == [], "these disagreements are gone: remove their decisions"
    for key, decision in decided.items():
        assert decision["right"] in ("mailferry", "stdlib") and decision["why"].strip(), key
        # A disagreement the standard library wins is a bug of ours, fixed in the parser:
        # then it is no disagreement, and no decision can say so.
        assert decision["right"] == "mailferry", f"{key}: fix the parser, then drop the decision"
