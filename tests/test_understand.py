"""The hand-written understanding set, through the real pipeline: each message injected as
Haraka would, for a user of its own, read and stored by the consumer, and its record read back
through the read API (HTTP on loopback). Reply text per client and per language, automatic
mail, bounces and complaints; no false positive on what people wrote."""

from __future__ import annotations

from collections import defaultdict
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

import pytest

from mailferry import api_tokens
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.inject import Injector
from mailferry.models import EmailMessage, InboundReceipt, User
from mailferry.users import add_user
from tests.pipeline import consumer_thread, wait_for
from tests.test_api import client, serving
from tests.understand.cases import CATEGORIES, cases, corpus_bounces, is_ours, normalised

REPLY_GOAL = 0.95  # of the whole set, exact after whitespace normalisation
GROUP_GOAL = 0.80  # of each client and each language (groups of 3 to 16 messages)
BOUNCE_GOAL = 0.95

THE_SET = [case for category in CATEGORIES for case in cases(category)] + corpus_bounces()


def _loop_addresses(raw: bytes) -> set[str]:
    """What X-Loop names of this installation: those addresses are its users here too."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    found = {a.lower() for _, a in getaddresses([str(v) for v in headers.get_all("x-loop") or ()])}
    return {a for a in found if is_ours(a)}


@pytest.fixture(scope="module")
def readings(module_rabbitmq_vhost, tmp_path_factory) -> dict[str, dict]:
    """The API's record of each case, by case name: the whole set goes through one consumer."""
    tmp = tmp_path_factory.mktemp("understand")
    settings = Settings(var_dir=tmp / "var", amqp_url=module_rabbitmq_vhost, secret_key="",
                        consumer_metrics_port=0, scheduler_metrics_port=0, relay_metrics_port=0,
                        webhook_metrics_port=0)
    settings.var_dir.mkdir(parents=True)
    open_database(settings.resolved_database_url)
    try:
        owner = {f"set{n}@example.org": str(case) for n, case in enumerate(THE_SET)}
        for address in set(owner) | {a for case in THE_SET for a in _loop_addresses(case.raw)}:
            add_user(address)
        _, token = api_tokens.create("understanding set")
        with consumer_thread(settings):
            injector = Injector(settings)
            try:
                ids = [injector.inject(case.raw, [address], "sender@example.net")
                       for address, case in zip(owner, THE_SET)]
            finally:
                injector.close()
            wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(ids)).count() == len(ids),
                     timeout=120, message="the whole set handled")
        stored = {row.user.email: row.id for row in EmailMessage.select(EmailMessage.id, User.email).join(User)}
        with serving(settings) as base, client(base, token) as http:
            return {owner[address]: http.get(f"/v1/messages/{id_}").json()
                    for address, id_ in stored.items() if address in owner}
    finally:
        close_database()


def _reading(readings: dict, case) -> dict:
    assert str(case) in readings, f"{case} was not stored (quarantined?)"
    return readings[str(case)]


def _share(results: list[bool]) -> float:
    return sum(results) / len(results)


def test_reply_text_is_what_the_sender_wrote_per_client_and_per_language(readings):
    by_group: dict[str, list[bool]] = defaultdict(list)
    misses, everything = [], []
    for case in cases("replies"):
        got = _reading(readings, case)["reply_text"]
        right = normalised(got) == normalised(case.expected["reply_text"])
        everything.append(right)
        by_group[f"client {case.expected['client']}"].append(right)
        by_group[f"language {case.expected['language']}"].append(right)
        by_group[f"style {case.expected['style']}"].append(right)
        by_group["html only" if case.expected["html_only"] else "with text"].append(right)
        if not right:
            misses.append(f"{case}: got {normalised(got)[:160]!r}, "
                          f"want {normalised(case.expected['reply_text'])[:160]!r}")
    listed = "\n".join(misses)
    assert _share(everything) >= REPLY_GOAL, f"{sum(everything)}/{len(everything)} exact:\n{listed}"
    weak = {g: f"{sum(r)}/{len(r)}" for g, r in by_group.items() if _share(r) < GROUP_GOAL}
    assert not weak, f"groups below {GROUP_GOAL:.0%}: {weak}\n{listed}"


def test_mail_people_wrote_is_neither_automatic_nor_bulk_nor_a_bounce(readings):
    flagged = []
    for case in cases("replies"):
        got = _reading(readings, case)
        if got["auto_reply"] or got["bulk"] or got["loop"] or got["bounce"]:
            flagged.append(f"{case}: auto_reply {got['auto_reply']}, bulk {got['bulk']}, "
                           f"loop {got['loop']}, bounce {got['bounce']}")
    assert not flagged, "\n".join(flagged)


@pytest.mark.parametrize("case", cases("automatic"), ids=str)
def test_automatic_mail_is_told_apart(readings, case):
    got, want = _reading(readings, case), case.expected
    assert (got["auto_reply"], got["bulk"], got["loop"], got["bounce"] is not None) \
        == (want["auto_reply"], want["bulk"], want["loop"], want["bounce"])


def _bounce_right(got: dict, case) -> tuple[bool, str]:
    want, found = case.expected, got["bounce"]
    if not want["bounce"]:
        return found is None, f"want no bounce, got {found}"
    if found is None:
        return False, "want a bounce, got none"
    wanted = {r["address"].lower(): (r["status"] or "")[:1] for r in want.get("recipients", [])}
    named = {r["address"].lower(): (r["status"] or "")[:1] for r in found["recipients"]}
    if found["kind"] != want["kind"]:
        return False, f"kind {found['kind']}, want {want['kind']}"
    if named != wanted:
        return False, f"recipients and status classes {named}, want {wanted}"
    if "original_message_id" in want and found["original_message_id"] != want["original_message_id"]:
        return False, f"original {found['original_message_id']}, want {want['original_message_id']}"
    return True, ""


def test_bounces_and_complaints_name_their_recipients_and_status_classes(readings):
    results = [(case, *_bounce_right(_reading(readings, case), case)) for case in cases("bounces")]
    misses = "\n".join(f"{case}: {why}" for case, right, why in results if not right)
    assert _share([right for _, right, _ in results]) >= BOUNCE_GOAL, misses


@pytest.mark.parametrize("case", corpus_bounces(), ids=str)
def test_the_real_bounces_and_complaints_of_the_corpus_are_read(readings, case):
    right, why = _bounce_right(_reading(readings, case), case)
    assert right, why
