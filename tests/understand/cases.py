"""The understanding test set: real-looking mail under ``mail/<category>/<name>.eml``, each
with its expectation in ``<name>.toml``, written by hand (never from a parser's output)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent / "mail"
CATEGORIES = ("replies", "automatic", "bounces")
INSTALLATION_DOMAIN = "example.org"  # the addresses "of this installation" in the set


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    raw: bytes
    expected: dict

    def __str__(self) -> str:
        return f"{self.category}/{self.name}"


def cases(category: str) -> list[Case]:
    folder = HERE / category
    found = [Case(category, eml.stem, eml.read_bytes(), tomllib.loads(eml.with_suffix(".toml").read_text()))
             for eml in sorted(folder.glob("*.eml"))]
    assert found, f"no test mail in {folder}"
    return found


from devstack.mailgen import CORPUS  # noqa: E402 (the shared corpus, read in place)


def corpus_bounces() -> list[Case]:
    """The real bounces and complaints of the shared corpus, expectations in corpus.toml."""
    expected = tomllib.loads((Path(__file__).resolve().parent / "corpus.toml").read_text())
    return [Case("corpus", name, (CORPUS / name).read_bytes(), want) for name, want in expected.items()]


def normalised(text: str | None) -> str:
    """The comparison is of words, in order: line breaks and spacing do not count."""
    return " ".join((text or "").split())


def is_ours(address: str) -> bool:
    return address.lower().endswith("@" + INSTALLATION_DOMAIN)
