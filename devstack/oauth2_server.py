"""An OAuth2 provider on loopback, for tests: a token endpoint (the refresh-token grant,
short-lived access tokens, a new refresh token at every refresh) and an introspection
endpoint (RFC 7662) that Dovecot's ``oauth2`` passdb asks whether a token is live.

For `mailferry imap authorize`, the flows that issue the first refresh token: the device
code grant (RFC 8628; what msal runs for Microsoft) and the authorization code grant with a
loopback redirect (what Google's installed-app flow runs), under an OpenID discovery
document at ``<authority>/.well-known/openid-configuration``. ``tls=(cert, key)`` serves
HTTPS: msal accepts no other authority."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OAuth2Server:
    def __init__(self, username: str, *, client_id: str = "mailferry", client_secret: str = "s3cret",
                 lifetime: float = 3600.0, rotate: bool = True, tls: tuple[str, str] | None = None):
        self.username, self.client_id, self.client_secret = username, client_id, client_secret
        self.lifetime, self.rotate = lifetime, rotate
        self.refresh_tokens = {secrets.token_urlsafe(16)}  # the live ones
        self.access_tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.refreshes = 0
        self.clock = time.monotonic  # the provider's clock: a test may set it off ours
        self.devices: dict[str, bool] = {}  # device_code -> approved by the user
        self.codes: set[str] = set()  # authorization codes not yet exchanged
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                basic = self.headers.get("authorization", "")
                if basic.lower().startswith("basic "):  # RFC 6749 2.3.1: client credentials
                    client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
                    form.setdefault("client_id", urllib.parse.unquote_plus(client_id))
                    form.setdefault("client_secret", urllib.parse.unquote_plus(secret))
                status, body = provider.answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                path, _, query = self.path.partition("?")
                if path.endswith("/.well-known/openid-configuration"):
                    data = json.dumps(provider.discovery()).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif path == "/authorize":  # the user signs in and consents at once
                    params = dict(urllib.parse.parse_qsl(query))
                    code = secrets.token_urlsafe(12)
                    with provider.lock:
                        provider.codes.add(code)
                    target = params["redirect_uri"] + "?" + urllib.parse.urlencode(
                        {"code": code, "state": params.get("state", "")})
                    self.send_response(302)
                    self.send_header("location", target)
                    self.send_header("content-length", "0")
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        base = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.base = base
        self.authority = f"{base}/tenant"  # the OpenID issuer: msal's oidc_authority
        self.token_url, self.introspection_url = f"{base}/token", f"{base}/introspect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def refresh_token(self) -> str:
        """A live refresh token (the one to configure first)."""
        return next(iter(self.refresh_tokens))

    def answer(self, path: str, form: dict) -> tuple[int, dict]:
        with self.lock:
            if path == "/introspect":
                expiry = self.access_tokens.get(form.get("token", ""))
                live = expiry is not None and expiry > self.clock()
                return 200, ({"active": True, "username": self.username} if live else {"active": False})
            if path == "/devicecode":
                code = secrets.token_urlsafe(12)
                self.devices[code] = False
                user_code = "MF-" + user_code_of(secrets.token_bytes(6))
                return 200, {"device_code": code, "user_code": user_code,
                             "verification_uri": f"{self.base}/device", "expires_in": 600,
                             "interval": 1, "message": f"To sign in, open {self.base}/device "
                             f"and enter the code {user_code}."}
            if path != "/token":
                return 404, {"error": "not_found"}
            if form.get("client_id") != self.client_id or (
                    form.get("client_secret") not in (None, self.client_secret)):
                return 401, {"error": "invalid_client"}
            grant = form.get("grant_type")
            if grant == "urn:ietf:params:oauth:grant-type:device_code":
                approved = self.devices.get(form.get("device_code", ""))
                if approved is None:
                    return 400, {"error": "expired_token"}
                if not approved:
                    return 400, {"error": "authorization_pending"}
                del self.devices[form["device_code"]]
                return 200, self._issue(new_refresh=True)
            if grant == "authorization_code":
                if form.get("code") not in self.codes:
                    return 400, {"error": "invalid_grant", "error_description": "unknown code"}
                self.codes.discard(form["code"])
                return 200, self._issue(new_refresh=True)
            if grant != "refresh_token" or form.get("refresh_token") not in self.refresh_tokens:
                return 400, {"error": "invalid_grant", "error_description": "refresh token revoked or unknown"}
            self.refreshes += 1
            return 200, self._issue(old_refresh=form["refresh_token"])

    def _issue(self, *, old_refresh: str | None = None, new_refresh: bool = False) -> dict:
        """An access token, and a refresh token when one is new or rotated (lock held)."""
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = self.clock() + self.lifetime
        body = {"access_token": access, "token_type": "Bearer", "expires_in": int(self.lifetime)}
        if new_refresh or self.rotate:
            if old_refresh:
                self.refresh_tokens.discard(old_refresh)
            new = secrets.token_urlsafe(16)
            self.refresh_tokens.add(new)
            body["refresh_token"] = new
        return body

    def discovery(self) -> dict:
        return {"issuer": self.authority, "token_endpoint": self.token_url,
                "authorization_endpoint": f"{self.base}/authorize",
                "device_authorization_endpoint": f"{self.base}/devicecode",
                "response_types_supported": ["code"]}

    def approve_devices(self) -> int:
        """The user entered every code shown so far; returns how many."""
        with self.lock:
            for code in self.devices:
                self.devices[code] = True
            return len(self.devices)

    def revoke(self) -> None:
        """Every refresh and access token dies (the user withdrew the grant)."""
        with self.lock:
            self.refresh_tokens.clear()
            self.access_tokens.clear()

    def expire_access_tokens(self) -> None:
        with self.lock:
            self.access_tokens = {t: 0.0 for t in self.access_tokens}

    def __enter__(self) -> "OAuth2Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


USER_CODE_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # as providers do: no vowels, nothing read two ways


def user_code_of(random: bytes) -> str:
    """A code a person types: letters only (a urlsafe token may begin with ``-`` or hold ``_``)."""
    return "".join(USER_CODE_LETTERS[b % len(USER_CODE_LETTERS)] for b in random)
