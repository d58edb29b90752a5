"""Fidelity score: how many subjects, text bodies and attachments each source of the fidelity
suite decodes as their senders meant (tests/fidelity/), as matched/total; the disagreements
with the standard library's reading; and what the charset detector costs.

    .venv/bin/python bench/fidelity.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailread.charsets import decode_text  # noqa: E402
from tests.fidelity import generated  # noqa: E402
from tests.fidelity.cases import SOURCES, differences, load, outcome  # noqa: E402
from tests.fidelity.differential import SOURCES as SECOND_OPINION, disagreements  # noqa: E402


def score(cases) -> dict[str, list[int]]:
    """matched/total per measure; a case counts for a measure it has an expectation for."""
    totals = {"subjects": [0, 0], "text": [0, 0], "attachments": [0, 0]}
    for case in cases:
        wrong = differences(case, outcome(case.raw))
        measured = {
            "subjects": case.subject is not None or case.subject_starts is not None or case.quarantine,
            "text": case.text is not None or case.html is not None or case.quarantine,
            "attachments": case.attachments is not None or case.quarantine,
        }
        for measure, key in (("subjects", "subject"), ("text", "text"), ("attachments", "attachments")):
            if measured[measure]:
                totals[measure][1] += 1
                totals[measure][0] += key not in wrong
    return totals


def detector_cost() -> tuple[float, float]:
    """ms per call of decode_text on the generated bodies that need the detector, against
    the same bytes declared in their own charset (the path nearly all mail takes)."""
    samples = [(generated._encode("\n".join([generated.SAMPLES[c]] * 3), c), c) for c in generated.UNDECLARED]
    def timed(declared: bool) -> float:
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(20):
                for data, charset in samples:
                    decode_text(data, charset if declared else None)
            runs.append((time.perf_counter() - started) / (20 * len(samples)) * 1000)
        return statistics.median(runs)
    timed(False)  # the detector's first call loads its tables
    return timed(False), timed(True)


def main() -> int:
    print(f"{'source':<10} {'cases':>5}  {'subjects':>10}  {'text':>10}  {'attachments':>11}")
    for source in SOURCES:
        cases = load(source)
        totals = score(cases)
        cells = [f"{m}/{t}" for m, t in totals.values()]
        print(f"{source:<10} {len(cases):>5}  {cells[0]:>10}  {cells[1]:>10}  {cells[2]:>11}")
    split = 0
    for source in SECOND_OPINION:
        split += sum(len(disagreements(c, outcome(c.raw))) for c in load(source))
    print(f"\ndisagreements with the standard library's email (decided in "
          f"tests/fidelity/expected/differential.toml): {split}")
    undeclared, declared = detector_cost()
    print(f"decode_text of a 200-byte CJK/Cyrillic body: {undeclared:.3f} ms undeclared (detector), "
          f"{declared:.3f} ms declared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
