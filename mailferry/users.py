"""Users and their aliases: the addresses mail is routed to. Used by `mailferry users`,
`mailferry aliases`, the tests and the benchmarks."""

from __future__ import annotations

import peewee

from mailferry.errors import PermanentError
from mailferry.models import EmailAlias, User, db


def normalise_address(address: str) -> str:
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or " " in address:
        raise PermanentError(f"{address!r} is not an email address")
    return address


def add_user(email: str) -> User:
    email = normalise_address(email)
    try:
        with db.atomic():
            return User.create(email=email)
    except peewee.IntegrityError:
        raise PermanentError(f"user {email} exists already") from None


def add_alias(email: str, alias: str) -> EmailAlias:
    user = User.get_or_none(User.email == normalise_address(email))
    if user is None:
        raise PermanentError(f"no user {email}")
    try:
        with db.atomic():
            return EmailAlias.create(address=normalise_address(alias), user=user)
    except peewee.IntegrityError:
        raise PermanentError(f"alias {alias} exists already") from None
