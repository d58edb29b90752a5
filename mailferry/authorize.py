"""`mailferry imap authorize`: an OAuth2 mailbox's first refresh token, from the provider's own
sign-in, so that nobody copies tokens by hand.

- **device** (Microsoft's way, RFC 8628, by msal): the command prints a URL and a code; the
  user opens the URL on any device, enters the code and signs in, and the command, polling the
  token endpoint meanwhile, receives the tokens. Nothing has to reach the machine it runs on.
- **browser** (Google's installed-app flow, by google-auth-oauthlib): the command prints a URL
  and listens on a loopback port for the redirect that carries the code (PKCE). Open the URL
  on the machine the command runs on, or forward the port (`ssh -L PORT:localhost:PORT`).

Both protocols are the libraries' work (msal knows Microsoft's authorities and reserved
scopes; google-auth-oauthlib does PKCE and the loopback server); this module chooses the
flow, hands them the mailbox's client, and returns the tokens.
"""

from __future__ import annotations

import httpx

from mailferry.errors import EmailAuthError, EmailConfigError
from mailferry.oauth2 import PROVIDERS

DEVICE, BROWSER = "device", "browser"
FLOWS = {"microsoft": DEVICE, "google": BROWSER}
GOOGLE_AUTHORIZATION_URL = "https://accounts.google.com/o/oauth2/auth"
MSAL_RESERVED = {"openid", "profile", "offline_access"}  # msal adds them itself, refuses them given


def flow_of(oauth2: dict, chosen: str | None = None) -> str:
    if chosen:
        return chosen
    return FLOWS.get(oauth2.get("provider", "custom"), DEVICE)


def scopes_of(oauth2: dict) -> list[str]:
    provider = PROVIDERS.get(oauth2.get("provider", ""), {})
    return str(oauth2.get("scopes") or provider.get("scopes", "")).split()


def device_code(oauth2: dict, show) -> dict:
    """Run the device-code flow; return the token response (with ``refresh_token``).

    Microsoft's authority is the token URL's tenant (``/common``, or the one given); a custom
    provider's is ``oauth2["authority"]``, its OpenID issuer."""
    import msal
    if oauth2.get("provider") == "microsoft":
        token_url = oauth2.get("token_url") or PROVIDERS["microsoft"]["token_url"]
        app = msal.PublicClientApplication(oauth2["client_id"],
                                           authority=token_url.split("/oauth2/")[0])
    else:
        if not oauth2.get("authority"):
            raise EmailConfigError("imap_config.oauth2.authority: required for the device flow "
                                   "of a custom provider (its OpenID issuer URL)")
        app = msal.PublicClientApplication(oauth2["client_id"], oidc_authority=oauth2["authority"])
    scopes = [s for s in scopes_of(oauth2) if s not in MSAL_RESERVED]
    flow = app.initiate_device_flow(scopes=scopes)
    if "user_code" not in flow:
        raise EmailAuthError(f"the provider refused the device flow: {flow.get('error')}: "
                             f"{flow.get('error_description', '')}")
    show(flow["message"])
    result = app.acquire_token_by_device_flow(flow)  # polls until signed in, refused or expired
    return _checked(result)


def installed_app(oauth2: dict, show, *, port: int = 0, timeout: float = 600) -> dict:
    """Run the installed-app flow with a loopback redirect on ``port`` (0: any free one);
    return the token response (with ``refresh_token``)."""
    from google_auth_oauthlib.flow import InstalledAppFlow
    provider = PROVIDERS.get(oauth2.get("provider", ""), {})
    client = {"installed": {
        "client_id": oauth2["client_id"], "client_secret": oauth2.get("client_secret", ""),
        "auth_uri": _authorization_url(oauth2),
        "token_uri": oauth2.get("token_url") or provider["token_url"],
        "redirect_uris": ["http://localhost"]}}
    flow = InstalledAppFlow.from_client_config(client, scopes=scopes_of(oauth2))
    show(f"Listening on localhost for the provider's redirect (timeout {timeout:.0f} s).")
    try:
        credentials = flow.run_local_server(
            host="localhost", port=port, open_browser=False, timeout_seconds=timeout,
            authorization_prompt_message="Open this URL in a browser and sign in:\n{url}",
            success_message="Mailferry has the mailbox's authorisation; you may close this tab.",
            access_type="offline", prompt="consent")  # consent: Google sends a refresh token
    except Exception as exc:  # noqa: BLE001 - oauthlib, requests and the WSGI timeout alike
        raise EmailAuthError(f"the sign-in did not complete: {exc}") from exc
    return _checked({"refresh_token": credentials.refresh_token,
                     "access_token": credentials.token})


def _authorization_url(oauth2: dict) -> str:
    if oauth2.get("provider") == "google":
        return GOOGLE_AUTHORIZATION_URL
    if oauth2.get("authorization_url"):
        return oauth2["authorization_url"]
    if not oauth2.get("authority"):
        raise EmailConfigError("imap_config.oauth2.authority: required for the browser flow of "
                               "a custom provider (its OpenID issuer URL)")
    try:
        document = httpx.get(oauth2["authority"].rstrip("/") + "/.well-known/openid-configuration",
                             timeout=20).json()
        return document["authorization_endpoint"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise EmailConfigError(f"cannot read the provider's OpenID configuration: {exc!r}") from exc


def _checked(result: dict) -> dict:
    if not result.get("refresh_token"):
        error = result.get("error") or "no refresh token in the answer"
        raise EmailAuthError(f"authorisation refused: {error}: "
                             f"{result.get('error_description', '')}".rstrip(": "))
    return result
