"""Bearer tokens of the read API: made by ``mailferry api-tokens create``, shown once, kept
as their SHA-256 only. A token with a user sees that user's mail alone; one without sees all.

A token is 32 random bytes, so a fast unsalted hash is enough: there is nothing to guess
from it, and the API can look a token up by its hash with one indexed query.
"""

from __future__ import annotations

import hashlib
import secrets

from mailferry.models import ApiToken, User, utcnow

PREFIX = "mft_"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create(name: str = "", user: User | None = None) -> tuple[ApiToken, str]:
    """A new token: (its row, the token itself, which is not stored)."""
    token = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.create(token_hash=_hash(token), prefix=token[:10], name=name,
                          user=user.id if user else None)
    return row, token


def verify(token: str) -> ApiToken | None:
    """The live token row for ``token``, or None."""
    if not token or not token.startswith(PREFIX) or len(token) > 200:
        return None
    row = ApiToken.get_or_none((ApiToken.token_hash == _hash(token)) & ApiToken.revoked_at.is_null())
    return row


def revoke(prefix_or_id: str) -> int:
    """Revoke the tokens with this id or prefix; how many."""
    query = ApiToken.update(revoked_at=utcnow()).where(ApiToken.revoked_at.is_null())
    if prefix_or_id.isdigit():
        query = query.where(ApiToken.id == int(prefix_or_id))
    else:
        query = query.where(ApiToken.prefix == prefix_or_id[:10])
    return query.execute()


def all_tokens() -> list[ApiToken]:
    return list(ApiToken.select().order_by(ApiToken.id))
