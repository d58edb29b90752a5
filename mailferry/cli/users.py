"""`mailferry users …` and `mailferry aliases …`: who mail belongs to."""

from __future__ import annotations

from mailferry.cli.common import open_app, print_json, print_table
from mailferry.models import EmailAlias, User
from mailferry.users import add_alias, add_user


def register(sub) -> None:
    users = sub.add_parser("users", help="add and list users").add_subparsers(
        dest="users_command", required=True, metavar="ACTION")
    add = users.add_parser("add", help="add a user by email address")
    add.add_argument("email")
    add.set_defaults(func=users_add)
    ls = users.add_parser("list", help="list users and their aliases")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=users_list)

    aliases = sub.add_parser("aliases", help="add aliases").add_subparsers(
        dest="aliases_command", required=True, metavar="ACTION")
    add_alias = aliases.add_parser("add", help="route ALIAS to the user EMAIL")
    add_alias.add_argument("email")
    add_alias.add_argument("alias")
    add_alias.set_defaults(func=aliases_add)


def users_add(args) -> int:
    open_app()
    user = add_user(args.email)
    print(f"added user {user.email} (id {user.id})")
    return 0


def users_list(args) -> int:
    open_app()
    rows = []
    for user in User.select().order_by(User.email):
        aliases = [a.address for a in user.aliases.order_by(EmailAlias.address)]
        rows.append({"id": user.id, "email": user.email, "active": user.is_active, "aliases": aliases})
    if args.json:
        print_json(rows)
    else:
        print_table(["ID", "EMAIL", "ACTIVE", "ALIASES"],
                    [[r["id"], r["email"], "yes" if r["active"] else "no", ", ".join(r["aliases"])] for r in rows])
    return 0


def aliases_add(args) -> int:
    open_app()
    alias = add_alias(args.email, args.alias)
    print(f"added alias {alias.address} -> {args.email.lower()}")
    return 0
