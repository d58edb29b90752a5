"""`mailferry imap set|show` (a user's mailbox configuration). `imap test` and `fetch` talk to
the server and are the consumer's (consumer/cli.py)."""

from __future__ import annotations

import getpass
import sys

from mailferry.cli.common import open_app, print_json, print_table
from mailferry.users import normalise_address
from mailferry.errors import EmailConfigError, PermanentError
from mailferry.mailbox_config import DEFAULT_PORTS, SECURITY_CHOICES, EmailConfigManager
from mailferry.models import MailboxState, User

def register(sub) -> dict:
    imap = sub.add_parser("imap", help="a user's IMAP mailbox: set, show, test").add_subparsers(
        dest="imap_command", required=True, metavar="ACTION")

    cmd = imap.add_parser("set", help="set the IMAP mailbox of user EMAIL (password from stdin)")
    cmd.add_argument("email")
    cmd.add_argument("--host", required=True)
    cmd.add_argument("--port", type=int, help="default: 993 for ssl, 143 otherwise")
    cmd.add_argument("--username", required=True)
    cmd.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin (prompted on a terminal); without it "
                          "the stored password is kept")
    cmd.add_argument("--security", choices=SECURITY_CHOICES, default="ssl")
    cmd.add_argument("--folder", default="INBOX")
    cmd.add_argument("--folders", metavar="A,B,…", default="",
                     help='sync these folders (each its own checkpoint) instead of --folder; '
                          '"*": all but Trash, Junk, Sent, Drafts, All and --move-to')
    cmd.add_argument("--mark-seen", action="store_true",
                     help="set \\Seen on the server after saving (default: leave flags alone)")
    cmd.add_argument("--move-to", metavar="FOLDER", help="move messages there after saving")
    cmd.add_argument("--delete", action="store_true",
                     help="delete messages from the server after saving (UID EXPUNGE of "
                          "exactly those)")
    cmd.add_argument("--ca-file", metavar="PATH", help="CA bundle for a private certificate")
    idle = cmd.add_mutually_exclusive_group()
    idle.add_argument("--idle", dest="idle", action="store_const", const=True,
                      help="hold the mailbox in IMAP IDLE: new mail within seconds")
    idle.add_argument("--no-idle", dest="idle", action="store_const", const=False,
                      help="never hold it in IDLE, whatever the consumer's imap_idle says")
    oauth = cmd.add_argument_group("OAuth2 instead of a password (the client secret and the "
                                   "refresh token are read from stdin, a line each)")
    oauth.add_argument("--oauth2", action="store_true", help="log in with SASL XOAUTH2")
    oauth.add_argument("--provider", choices=("google", "microsoft", "custom"), default="custom")
    oauth.add_argument("--client-id")
    oauth.add_argument("--token-url", help="custom: the provider's token endpoint")
    oauth.add_argument("--scopes", help="custom: the scopes to ask for (space-separated)")
    oauth.add_argument("--mechanism", choices=("XOAUTH2", "OAUTHBEARER"), default="XOAUTH2")
    oauth.add_argument("--authority", help="custom: the provider's OpenID issuer URL (for "
                       "`imap authorize`: where its device and browser flows start)")
    cmd.set_defaults(func=imap_set)

    cmd = imap.add_parser("authorize", help="sign in at the OAuth2 provider and store the "
                          "refresh token of EMAIL's mailbox (device code or browser)")
    cmd.add_argument("email")
    cmd.add_argument("--flow", choices=("device", "browser"),
                     help="default: device for microsoft and custom, browser for google")
    cmd.add_argument("--port", type=int, default=0,
                     help="browser flow: the loopback port of the redirect (default: any free one)")
    cmd.set_defaults(func=imap_authorize)

    cmd = imap.add_parser("show", help="show the IMAP configuration and checkpoint (never the password)")
    cmd.add_argument("email")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(func=imap_show)
    return {"imap": imap}


def find_user(email: str) -> User:
    user = User.get_or_none(User.email == normalise_address(email))
    if user is None:
        raise PermanentError(f"no user {email} (add one with `mailferry users add`)")
    return user


def read_password() -> str:
    return read_secret("IMAP password: ")


def read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


def imap_set(args) -> int:
    settings = open_app()
    user = find_user(args.email)
    configs = EmailConfigManager(settings)
    oauth2 = None
    if args.oauth2:
        password = ""
        secret = read_secret("OAuth2 client secret: ")
        refresh = read_secret("OAuth2 refresh token: ")
        oauth2 = {"provider": args.provider, "client_id": args.client_id, "client_secret": secret,
                  "refresh_token": refresh, "token_url": args.token_url, "scopes": args.scopes,
                  "mechanism": args.mechanism, "authority": args.authority}
        oauth2 = {k: v for k, v in oauth2.items() if v}
    elif args.password_stdin:
        password = read_password()
    else:
        try:
            password = configs.get_imap_config(user).password
        except EmailConfigError:
            raise PermanentError("no stored password to keep: give --password-stdin") from None
    config = configs.set_imap_config(user, {
        "host": args.host, "port": args.port or DEFAULT_PORTS[args.security],
        "username": args.username, "password": password, "security": args.security,
        "folder": args.folder, "mark_seen": args.mark_seen, "move_to": args.move_to,
        "ca_file": args.ca_file,
        "folders": [f for f in args.folders.split(",") if f.strip()], "delete": args.delete,
        "oauth2": oauth2, "idle": args.idle})
    folders = ", ".join(config.folders) if config.folders else config.folder
    secret = f"OAuth2 ({args.provider}) secrets" if oauth2 else "password"
    print(f"IMAP mailbox of {user.email}: {config.username}@{config.host}:{config.port} "
          f"({config.security}), folder(s) {folders}; {secret} stored encrypted")
    return 0


def imap_authorize(args) -> int:
    from mailferry import authorize
    from mailferry.oauth2 import forget_token, resolved
    settings = open_app()
    user = find_user(args.email)
    configs = EmailConfigManager(settings)
    config = configs.get_imap_config(user)
    if not config.oauth2:
        raise PermanentError(f"the mailbox of {user.email} logs in with a password; give it "
                             "OAuth2 first: `mailferry imap set … --oauth2 --provider …`")
    oauth2 = resolved(config.oauth2)
    flow = authorize.flow_of(oauth2, args.flow)
    def show(text: str) -> None:
        print(text, flush=True)

    if flow == authorize.DEVICE:
        tokens = authorize.device_code(oauth2, show)
    else:
        tokens = authorize.installed_app(oauth2, show, port=args.port)
    configs.save_refresh_token(user, tokens["refresh_token"])
    forget_token(user.id)
    print(f"{user.email}: authorised ({flow} flow); the refresh token is stored encrypted. "
          f"Check the login with `mailferry imap test {user.email}`.")
    return 0


def imap_show(args) -> int:
    settings = open_app()
    user = find_user(args.email)
    config = EmailConfigManager(settings).get_imap_config(user)
    states = [{"folder": s.folder, "uidvalidity": s.uidvalidity, "last_uid": s.last_uid,
               "highestmodseq": s.highestmodseq, "last_fetch_at": s.last_fetch_at,
               "idle_until": s.idle_until}
              for s in MailboxState.select().where(MailboxState.user == user).order_by(MailboxState.folder)]
    if args.json:
        print_json({"user": user.email, "imap_config": config.public(), "checkpoints": states})
        return 0
    print(f"user      {user.email}")
    for name, value in config.public().items():
        print(f"{name:<9} {'' if value is None else value}")
    if states:
        print()
        print_table(["FOLDER", "UIDVALIDITY", "LAST UID", "HIGHESTMODSEQ", "LAST FETCH",
                     "IDLE UNTIL"],
                    [[s["folder"], s["uidvalidity"], s["last_uid"], s["highestmodseq"],
                      s["last_fetch_at"], s["idle_until"] or "-"] for s in states])
    return 0
