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

    def allowed(self, request: Request) -> bool:
        """Whether this request carries the token (header) or the login cookie."""
        if self.token is None:
            return False
        header = request.headers.get("authorization", "")
        scheme, _, offered = header.partition(" ")
        if scheme.lower() == "bearer" and offered and self.token_matches(offered.strip()):
            return True
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session.encode())

    def require(self, request: Request) -> None:
        """Refuse a request that may not act: 403 on a read-only server, 401 without
        (or with a wrong) token. Raised before anything is looked at or started."""
        if self.token is None:
            raise HTTPException(403, "this server is read-only: no token is configured "
                                     "(start it with castlib web --token-file FILE)")
        if not self.allowed(request):
            raise HTTPException(401, "this action needs the server's token: send "
                                     "'Authorization: Bearer TOKEN' or log in",
                                headers={"WWW-Authenticate": "Bearer"})
