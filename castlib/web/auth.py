"""Who may start actions: the holder of the server's token, as a bearer header or as the
cookie the login form sets. Without a token configured the server is read-only."""
from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request

COOKIE = "castlib_session"


class Auth:
    def __init__(self, token: str | None):
        self.token = token or None
        # the cookie holds a digest of the token, not the token: a cookie that leaks
        # (a shared browser profile) is not the bearer token scripts use
        self._session = (hmac.new(self.token.encode(), b"castlib-web-session",
                                  hashlib.sha256).hexdigest() if self.token else None)

    @property
    def read_only(self) -> bool:
        return self.token is None

    def session_value(self) -> str:
        assert self._session is not None
        return self._session

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.encode(),
                                                              self.token.encode())

    def _bearer(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, offered = header.partition(" ")
        return scheme.lower() == "bearer" and bool(offered) and self.token_matches(
            offered.strip())

    def _cookie(self, request: Request) -> bool:
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session.encode())

    def allowed(self, request: Request) -> bool:
        """Whether this request carries the token (header) or the login cookie."""
        if self.token is None:
            return False
        return self._bearer(request) or self._cookie(request)

    def require(self, request: Request) -> None:
        """Refuse a request that may not act: 403 on a read-only server, 401 without
        (or with a wrong) token, 403 for a cookie sent by another site's page (below).
        Raised before anything is looked at or started."""
        if self.token is None:
            raise HTTPException(403, "this server is read-only: no token is configured "
                                     "(start it with castlib web --token-file FILE)")
        if self._bearer(request):
            return
        if not self._cookie(request):
            raise HTTPException(401, "this action needs the server's token: send "
                                     "'Authorization: Bearer TOKEN' or log in",
                                headers={"WWW-Authenticate": "Bearer"})
        if not same_origin(request):
            # A browser sends the cookie with whatever page asks: SameSite=Strict keeps
            # other sites out, but not a page of this host on another port (a site is
            # the host, ports aside: http://127.0.0.1:3000 is "same-site"), nor a form
            # posted as text/plain to the API. Only this server's own pages may act
            # with the cookie; a script sends the token.
            raise HTTPException(403, "refused: an action with the login cookie must come "
                                     "from this server's own pages (the request's Origin "
                                     "is another site; scripts send 'Authorization: "
                                     "Bearer TOKEN')")


def same_origin(request: Request) -> bool:
    """Whether the page that sent this request is this server's: its Origin (else its
    Referer; a browser sends one of them with every POST) names the host and port the
    request was sent to (its Host header; a proxy in front must pass it on)."""
    from urllib.parse import urlsplit

    host = request.headers.get("host", "")
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    if not host or not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()
