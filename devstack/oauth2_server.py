"""An OAuth2 provider on loopback, for tests: a token endpoint (the refresh-token grant,
short-lived access tokens, a new refresh token at every refresh) and an introspection
endpoint (RFC 7662) that Dovecot's ``oauth2`` passdb asks whether a token is live."""

from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OAuth2Server:
    def __init__(self, username: str, *, client_id: str = "mailferry", client_secret: str = "s3cret",
                 lifetime: float = 3600.0, rotate: bool = True):
        self.username, self.client_id, self.client_secret = username, client_id, client_secret
        self.lifetime, self.rotate = lifetime, rotate
        self.refresh_tokens = {secrets.token_urlsafe(16)}  # the live ones
        self.access_tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self.refreshes = 0
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                status, body = provider.answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        base = f"http://127.0.0.1:{self.server.server_address[1]}"
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
                live = expiry is not None and expiry > time.monotonic()
                return 200, ({"active": True, "username": self.username} if live else {"active": False})
            if path != "/token":
                return 404, {"error": "not_found"}
            if (form.get("client_id"), form.get("client_secret")) != (self.client_id, self.client_secret):
                return 401, {"error": "invalid_client"}
            if form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in self.refresh_tokens:
                return 400, {"error": "invalid_grant", "error_description": "refresh token revoked or unknown"}
            self.refreshes += 1
            access = secrets.token_urlsafe(24)
            self.access_tokens[access] = time.monotonic() + self.lifetime
            body = {"access_token": access, "token_type": "Bearer", "expires_in": int(self.lifetime)}
            if self.rotate:
                self.refresh_tokens.discard(form["refresh_token"])
                new = secrets.token_urlsafe(16)
                self.refresh_tokens.add(new)
                body["refresh_token"] = new
            return 200, body

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
