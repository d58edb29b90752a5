"""`mailferry config`: every setting, its variable, its value now and what it means."""

from __future__ import annotations

import dataclasses

from mailferry.app import settings_or_exit
from mailferry.cli.common import print_json, print_table
from mailferry.config import Settings, env_name, redact_url


def register(sub) -> None:
    config = sub.add_parser("config", help="show every setting and its current value")
    config.add_argument("--json", action="store_true")
    config.set_defaults(func=show_config)


def show_config(args) -> int:
    settings = settings_or_exit()
    rows = []
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if f.name == "secret_key":
            value = "(set)" if value else "(from var/secret.key)"
        elif f.name == "s3_secret_access_key":
            value = "(set)" if value else ""
        elif isinstance(value, str) and "://" in value:
            value = redact_url(value)
        rows.append({"variable": env_name(f.name), "value": str(value), "help": f.metadata["help"]})
    if args.json:
        print_json(rows)
    else:
        print_table(["VARIABLE", "VALUE", "MEANING"], [[r["variable"], r["value"], r["help"]] for r in rows])
    return 0
