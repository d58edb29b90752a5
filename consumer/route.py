"""Routing: which users an SMTP message belongs to, from its envelope recipients.

The envelope is authoritative (it carries Bcc recipients the headers don't show). A recipient
matches a user's address or an alias, case-insensitively; ``local+tag@domain`` matches
``local@domain`` and keeps the tag. An exact match wins over the plus-address reading.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from peewee import chunked

from mailferry.models import EmailAlias, User, db


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
    """Resolves recipients to users with one query per batch, whatever its size."""

    def lookup(self, addresses: set[str]) -> dict[str, int]:
        """The active user of each address that has one: a user's own address, or an alias."""
        if not addresses:
            return {}
        found: dict[str, int] = {}
        for chunk in chunked(sorted(addresses), 500):
            # Built once per chunk size, not per batch: this runs for every batch of mail.
            sql = _lookup_sql(len(chunk), db.param)
            rows = db.execute_sql(sql, [*chunk, True, *chunk, True]).fetchall()
            for address, user_id, is_alias in sorted(rows, key=lambda row: row[2]):
                found.setdefault(address, user_id)  # a user's own address wins over an alias
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


@functools.lru_cache(maxsize=64)
def _lookup_sql(count: int, param: str) -> str:
    """(address, user id, is an alias) of the active users among ``count`` addresses."""
    user, alias = User._meta, EmailAlias._meta
    wanted = "(" + ", ".join(param for _ in range(count)) + ")"
    return (f'SELECT u."email", u."id", 0 FROM "{user.table_name}" AS u '
            f'WHERE u."email" IN {wanted} AND u."is_active" = {param} '
            f'UNION ALL '
            f'SELECT a."address", a."user_id", 1 FROM "{alias.table_name}" AS a '
            f'JOIN "{user.table_name}" AS u ON a."user_id" = u."id" '
            f'WHERE a."address" IN {wanted} AND u."is_active" = {param}')
