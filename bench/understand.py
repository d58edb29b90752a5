"""Reading mail, measured: each reply and bounce library against Mailferry's own readers on the
hand-written test set (tests/understand/mail and the shared corpus), and the cost per message
of each piece.

    .venv/bin/pip install -e '.[bench]'   # the libraries compared
    .venv/bin/python bench/understand.py

Reply text: exact after whitespace normalisation (the same comparison as the tests). Bounces:
the recipient set and each recipient's status class right (flanker's detection names no
recipient, so it scores only on messages that are no bounce, and on "is a bounce" shown
apart). Times are CPU seconds per message of this process (they hold on any machine as a
ratio to the parse).
"""

from __future__ import annotations

import email
import email.policy
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mailread.html_text import html_to_text  # noqa: E402
from mailread.parse import parse_email  # noqa: E402
from mailread import automatic, bounce, reply, thread  # noqa: E402
from mailread.understand import understand  # noqa: E402
from tests.understand.cases import cases, corpus_bounces, normalised  # noqa: E402

LANGUAGES = ["en", "de", "fr", "es", "it", "nl", "pl", "sv", "cs", "da", "ja", "ko", "zh", "pt", "ru"]


# -- reply libraries: each gets the text part, or the HTML as text when there is none --------

def _input(parsed) -> tuple[str, str]:
    return parsed.text, parsed.html


def email_reply_parser(text: str, html: str) -> str:
    from email_reply_parser import EmailReplyParser
    return EmailReplyParser.parse_reply(text or html_to_text(html))


def mail_parser_reply(text: str, html: str) -> str:
    from mailparser_reply import EmailReplyParser
    parser = EmailReplyParser(languages=[l for l in LANGUAGES if _has_language(l)])
    return parser.parse_reply(text=text or html_to_text(html))


def _has_language(code: str) -> bool:
    from mailparser_reply.constants import MAIL_LANGUAGES
    return code in MAIL_LANGUAGES


def quotequail_reply(text: str, html: str) -> str:
    import quotequail
    if not text and html:
        parts = quotequail.quote_html(html)
        return html_to_text("".join(part for own, part in parts if own))
    return "".join(part for own, part in quotequail.quote(text) if own)


def talon_reply(text: str, html: str) -> str:
    from talon import quotations
    from talon.signature.bruteforce import extract_signature
    if not text and html:
        text = html_to_text(quotations.extract_from_html(html))
    else:
        text = quotations.extract_from_plain(text)
    return extract_signature(text)[0]


def mailferry_reply(text: str, html: str) -> str:
    return reply.reply_text(text, html) or ""


REPLY_READERS = {"email-reply-parser": email_reply_parser, "mail-parser-reply": mail_parser_reply,
                 "quotequail": quotequail_reply, "talon": talon_reply, "Mailferry": mailferry_reply}


# -- bounce libraries ------------------------------------------------------------------------

def _want(case) -> dict[str, str]:
    return {r["address"].lower(): (r["status"] or "")[:1] for r in case.expected.get("recipients", [])}


def flanker_bounce(raw: bytes):
    from flanker import mime
    found = mime.from_string(raw).bounce
    if not found.is_bounce():
        return None
    return {}  # flanker names no recipient: a bounce with an unknown recipient set


def flufl_bounce(raw: bytes):
    from flufl.bounce import all_failures
    temporary, permanent = all_failures(email.message_from_bytes(raw))
    if not temporary and not permanent:
        return None
    found = {a.decode().lower() if isinstance(a, bytes) else str(a).lower(): "5" for a in permanent}
    found.update({a.decode().lower() if isinstance(a, bytes) else str(a).lower(): "4" for a in temporary})
    return found


def mailferry_bounce(raw: bytes):
    found = parse_email(raw).understanding.bounce
    if found is None:
        return None
    return {r.address: (r.status or "")[:1] for r in found.recipients}


BOUNCE_READERS = {"flanker": flanker_bounce, "flufl.bounce": flufl_bounce, "Mailferry": mailferry_bounce}


def _bounce_score(found, case) -> tuple[bool, bool]:
    """(recipients and their status classes right, told bounce from not-a-bounce right). A
    class the bounce does not state is not held against a reader that gives one."""
    if not case.expected["bounce"]:
        return found is None, found is None
    if found is None:
        return False, False
    want = _want(case)
    right = set(found) == set(want) and all(not want[a] or found[a] == want[a] for a in want)
    return right, True


# -- the run ---------------------------------------------------------------------------------

def replies_table() -> list[str]:
    set_ = cases("replies")
    parsed = [parse_email(c.raw) for c in set_]
    lines = ["| reader | exact | history right (same signature step) | of | text | HTML-only | "
             "by language (worst) |", "|---|---|---|---|---|---|---|"]
    for name, reader in REPLY_READERS.items():
        right, history, by_kind, by_language = 0, 0, defaultdict(list), defaultdict(list)
        for case, p in zip(set_, parsed):
            try:
                got = reader(*_input(p))
            except Exception:  # noqa: BLE001 - a library that fails on a message misses it
                got = None
            want = normalised(case.expected["reply_text"])
            ok = normalised(got) == want
            # Most libraries keep sign-offs and "Sent from" lines by design: this column asks
            # only whether they found where the history begins.
            history += normalised(reply.without_signature(got or "")) == want
            right += ok
            by_kind["html" if case.expected["html_only"] else "text"].append(ok)
            by_language[case.expected["language"]].append(ok)
        worst = min(by_language.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
        share = lambda xs: f"{sum(xs)}/{len(xs)}"  # noqa: E731
        lines.append(f"| {name} | **{right / len(set_):.0%}** | {history / len(set_):.0%} | {len(set_)} | "
                     f"{share(by_kind['text'])} | "
                     f"{share(by_kind['html'])} | {worst[0]} {share(worst[1])} |")
    return lines


def _read(reader, raw: bytes):
    try:
        return reader(raw)
    except Exception:  # noqa: BLE001 - a library that fails on a message misses it
        return None


def bounces_table() -> list[str]:
    """Bounces and complaints (the test set's and the corpus's), then the automatic set, which
    holds none: a reader that calls one of those a bounce would hide mail from a person."""
    bounces, others = cases("bounces") + corpus_bounces(), cases("automatic")
    lines = [f"| reader | recipients and classes right (of {len(bounces)}) | told bounce from not "
             f"(of {len(bounces)}) | false bounces (of {len(others)} automatic, none a bounce) |",
             "|---|---|---|---|"]
    for name, reader in BOUNCE_READERS.items():
        scores = [_bounce_score(_read(reader, case.raw), case) for case in bounces]
        right, apart = sum(ok for ok, _ in scores), sum(told for _, told in scores)
        false = sum(_read(reader, case.raw) is not None for case in others)
        share = lambda n: f"{n / len(bounces):.0%}"  # noqa: E731
        lines.append(f"| {name} | **{share(right)}** | {share(apart)} | {false} |")
    return lines


def costs_table(rounds: int = 5) -> list[str]:
    raws = [c.raw for cat in ("replies", "automatic", "bounces") for c in cases(cat)]
    parsed = [parse_email(r) for r in raws]
    from email.parser import BytesHeaderParser
    from email.policy import compat32
    headers = [BytesHeaderParser(policy=compat32).parsebytes(r) for r in raws]
    pieces = {
        "parse (flanker and the decoding layer)": lambda: [parse_email(r) for r in raws],
        "reply text": lambda: [reply.reply_text(p.text, p.html) for p in parsed],
        "automatic (auto-reply, bulk, loop)": lambda: [automatic.automatic(h, p.subject) for h, p in zip(headers, parsed)],
        "bounce": lambda: [bounce.bounce_of(r, h, p.text) for r, h, p in zip(raws, headers, parsed)],
        "thread keys": lambda: [thread.thread_keys(p.in_reply_to, p.references, p.subject) for p in parsed],
        "understand (all four)": lambda: [understand(r, h, subject=p.subject, text=p.text, html=p.html,
                                                     in_reply_to=p.in_reply_to, references=p.references)
                                          for r, h, p in zip(raws, headers, parsed)],
    }
    best: dict[str, float] = {}
    for _ in range(rounds):  # interleaved: the machine's speed drifts
        for name, run in pieces.items():
            start = time.process_time()
            run()
            best[name] = min(best.get(name, 1e9), (time.process_time() - start) / len(raws))
    base = best["parse (flanker and the decoding layer)"]
    lines = ["| piece | CPU µs per message | × the parse |", "|---|---|---|"]
    lines += [f"| {name} | {seconds * 1e6:,.0f} | {seconds / base:.2f} |" for name, seconds in best.items()]
    return lines


def main() -> None:
    print("## Reply text\n")
    print("\n".join(replies_table()))
    print("\n## Bounces and complaints\n")
    print("\n".join(bounces_table()))
    print("\n## Cost per message\n")
    print("\n".join(costs_table()))


if __name__ == "__main__":
    main()
