"""consumer.route: envelope recipients to users, by address, alias and plus-address."""

from __future__ import annotations

from consumer.route import Router, candidates
from mailferry.users import add_alias, add_user
from mailferry.models import User


def test_candidates_read_plus_addresses():
    assert candidates("Bob+Tickets@Example.org") == [
        ("bob+tickets@example.org", None), ("bob@example.org", "tickets")]
    assert candidates("<plain@x.org>") == [("plain@x.org", None)]
    assert candidates("not-an-address") == []


def test_routes_by_address_alias_and_plus_tag(settings):
    bob = add_user("bob@example.org")
    alice = add_user("Alice@Example.org")
    add_alias("bob@example.org", "help@example.org")
    router = Router()
    assert [(r.user_id, r.tag) for r in router.route(["BOB+tickets@EXAMPLE.ORG"])] == [(bob.id, "tickets")]
    assert [r.user_id for r in router.route(["help@example.org"])] == [bob.id]
    assert {r.user_id for r in router.route(["alice@example.org", "bob@example.org"])} == {alice.id, bob.id}
    assert router.route(["nobody@example.org"]) == []


def test_one_route_per_user_even_when_several_recipients_match(settings):
    bob = add_user("bob@example.org")
    add_alias("bob@example.org", "help@example.org")
    routes = Router().route(["help@example.org", "bob@example.org", "bob+x@example.org"])
    assert [r.user_id for r in routes] == [bob.id]


def test_exact_address_with_plus_wins_over_plus_reading(settings):
    add_user("bob@example.org")
    exact = add_user("bob+list@example.org")
    routes = Router().route(["bob+list@example.org"])
    assert [(r.user_id, r.tag) for r in routes] == [(exact.id, None)]


def test_inactive_users_get_no_mail(settings):
    user = add_user("gone@example.org")
    User.update(is_active=False).where(User.id == user.id).execute()
    assert Router().route(["gone@example.org"]) == []


def test_route_many_resolves_a_batch(settings):
    a = add_user("a@x.org")
    b = add_user("b@x.org")
    result = Router().route_many([["a@x.org"], ["b+t@x.org"], ["c@x.org"]])
    assert [[r.user_id for r in routes] for routes in result] == [[a.id], [b.id], []]


def test_a_users_own_address_wins_over_an_alias_of_the_same_address(settings):
    bob = add_user("bob@example.org")
    owner = add_user("help@example.org")
    add_alias("bob@example.org", "help@example.org")
    assert [r.user_id for r in Router().route(["help@example.org"])] == [owner.id]
    assert [r.user_id for r in Router().route(["bob@example.org"])] == [bob.id]
