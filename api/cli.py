"""The read API's commands, registered with the ``mailferry`` CLI through the
``mailferry.commands`` entry point: ``mailferry api`` (as ``python -m api``) and
``mailferry api-tokens create|list|revoke``. Every mailferry command loads this module, so
Starlette and uvicorn are imported only by the command that serves."""

from __future__ import annotations

from mailferry.contracts import iso_utc
from mailferry.cli.common import open_app, print_json, print_table
from mailferry.errors import PermanentError


def register(sub, groups: dict) -> None:
    cmd = sub.add_parser("api", help="serve the read API (same as python -m api)")
    cmd.set_defaults(func=lambda args: _run())

    tokens = sub.add_parser("api-tokens", help="bearer tokens of the read API")
    actions = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="make a token; it is shown once")
    create.add_argument("--user", help="the token sees this user's mail alone (default: all mail)")
    create.add_argument("--name", default="", help="what the token is for")
    create.set_defaults(func=create_command)
    listing = actions.add_parser("list", help="the tokens (never the tokens themselves)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=list_command)
    revoke = actions.add_parser("revoke", help="revoke a token by id or prefix")
    revoke.add_argument("token", metavar="ID_OR_PREFIX")
    revoke.set_defaults(func=revoke_command)


def _run() -> int:
    from mailferry.starting import stop_while_starting
    stop_while_starting()  # before the process's imports: a stop while starting is a clean stop
    from api.main import main
    return main()


def create_command(args) -> int:
    from mailferry import api_tokens
    from mailferry.cli.imap import find_user
    open_app()
    user = find_user(args.user) if args.user else None
    row, token = api_tokens.create(args.name, user)
    print(token)
    print(f"token {row.id} ({row.prefix}…) for {user.email if user else 'all users'}: "
          "shown once, it is stored hashed")
    return 0


def list_command(args) -> int:
    from mailferry import api_tokens
    open_app()
    rows = [{"id": t.id, "prefix": t.prefix, "name": t.name,
             "user": t.user.email if t.user_id is not None else None,
             "created_at": iso_utc(t.created_at), "last_used_at": iso_utc(t.last_used_at),
             "revoked_at": iso_utc(t.revoked_at)} for t in api_tokens.all_tokens()]
    if args.json:
        print_json(rows)
        return 0
    print_table(["ID", "PREFIX", "NAME", "USER", "CREATED", "LAST USED", "REVOKED"],
                [[r["id"], r["prefix"], r["name"], r["user"] or "(all)", r["created_at"],
                  r["last_used_at"] or "never", r["revoked_at"] or ""] for r in rows])
    return 0


def revoke_command(args) -> int:
    from mailferry import api_tokens
    open_app()
    count = api_tokens.revoke(args.token)
    if not count:
        raise PermanentError(f"no live token with id or prefix {args.token}")
    print(f"revoked {count} token(s)")
    return 0
