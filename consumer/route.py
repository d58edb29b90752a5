"""Routing: which users an SMTP message belongs to, from its envelope recipients.

The envelope is authoritative (it carries Bcc recipients the headers don't show). A recipient
matches a user's address or an alias, case-insensitively; ``local+tag@domain`` matches
``local@domain`` and keeps the tag. An exact match wins over the plus-address reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from peewee import chunked

from mailferry.models import EmailAlias, User


@dataclass(frozen=True)
class Route:
    user_id: int
    address: str  # the envelope recipient that matched
    tag: str | None  # the +tag, when matched through a plus-address


def candidates(recipient: str) -> list[tuple[str, str | None]]:
    """(address to look up, tag) pairs for one recipient, most specific first."""
    address = recipient.strip().strip("<>").lower()
    if "@" not in address:
        return []
    local, _, domain = address.rpartition("@")
    found = [(address, None)]
    if "+" in local:
        base, _, tag = local.partition("+")
        if base:
            found.append((f"{base}@{domain}", tag or None))
    return found


class Router:
    """Resolves recipients to users with two queries per batch, whatever its size."""

    def lookup(self, addresses: set[str]) -> dict[str, int]:
        if not addresses:
            return {}
        found: dict[str, int] = {}
        for chunk in chunked(sorted(addresses), 500):
            for user in User.select(User.id, User.email).where(
                    User.email.in_(chunk), User.is_active == True):  # noqa: E712
                found[user.email] = user.id
            query = (EmailAlias.select(EmailAlias.address, EmailAlias.user)
                     .join(User).where(EmailAlias.address.in_(chunk), User.is_active == True))  # noqa: E712
            for alias in query:
                found.setdefault(alias.address, alias.user_id)
        return found

    def route_many(self, recipient_lists: list[list[str]]) -> list[list[Route]]:
        wanted = {addr for rcpts in recipient_lists for r in rcpts for addr, _ in candidates(r)}
        known = self.lookup(wanted)
        return [self._route(rcpts, known) for rcpts in recipient_lists]

    def route(self, recipients: list[str]) -> list[Route]:
        return self.route_many([recipients])[0]

    @staticmethod
    def _route(recipients: list[str], known: dict[str, int]) -> list[Route]:
        routes: dict[int, Route] = {}
        for recipient in recipients:
            for address, tag in candidates(recipient):
                user_id = known.get(address)
                if user_id is not None:
                    routes.setdefault(user_id, Route(user_id, recipient.strip().lower(), tag))
                    break
        return list(routes.values())

