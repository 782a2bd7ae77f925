"""Who may start actions: the holder of the server's token, as a bearer header or as the
cookie the login form sets. Without a token configured the server is read-only. Guesses
at the token are limited per client address (LoginLimit); the file that holds it must
be its owner's alone (castlib/token_file.py)."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque

from fastapi import HTTPException, Request

COOKIE = "castlib_session"


class LoginLimit:
    """At most `failures` wrong tokens from a client address in any `window` seconds:
    past that, the address waits (retry_after) until its oldest failure of those leaves
    the window, and its attempts meanwhile are refused without the token being compared.
    A guesser gets `failures` tries a minute; the right token from another address is
    never held up, as nothing but failures is counted, per address.

    In-process and bounded: an address is forgotten once its last failure is older than
    the window, and at most `max_clients` addresses are kept (the longest quiet go
    first). Thread-safe: FastAPI runs the sync routes (the login form) in a thread pool
    and the async ones on the loop, both come here."""

    def __init__(self, failures: int = 10, window: float = 60.0, *, clock=time.monotonic,
                 max_clients: int = 10_000):
        self.failures, self.window, self.clock = failures, window, clock
        self.max_clients = max_clients
        self._lock = threading.Lock()
        # address -> the times of its last `failures` failures; ordered by the newest
        # failure, so the stale ones are at the front
        self._failed: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> int:
        """The seconds `client` must wait before its token is compared again; 0: now."""
        with self._lock:
            now = self.clock()
            self._forget(now)
            return self._wait(self._failed.get(client), now)

    def start(self, client: str) -> tuple[int, float | None]:
        """Before a token from `client` is compared: (seconds to wait, None) when it may
        not try now; else (0, stamp), the attempt counted as a failure already, so that
        guesses sent side by side (the login form runs in a pool of threads) are not all
        compared before the first is counted. forgive(client, stamp) if it was right."""
        with self._lock:
            now = self.clock()
            self._forget(now)
            times = self._failed.get(client)
            wait = self._wait(times, now)
            if wait:
                return wait, None
            if times is None:
                times = self._failed[client] = deque(maxlen=self.failures)
            else:
                self._failed.move_to_end(client)   # the order is by newest failure
            times.append(now)   # when full, drops the oldest: out of the window (_wait)
            while len(self._failed) > self.max_clients:
                self._failed.popitem(last=False)
            return 0, now

    def forgive(self, client: str, stamp: float) -> None:
        """The attempt start() counted was the right token: not a failure after all."""
        with self._lock:
            times = self._failed.get(client)
            if times is not None and stamp in times:
                times.remove(stamp)
                if not times:
                    del self._failed[client]

    def _wait(self, times: deque[float] | None, now: float) -> int:
        if times is None or len(times) < self.failures:
            return 0
        wait = times[0] + self.window - now
        return max(1, math.ceil(wait)) if wait > 0 else 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._failed)

    def _forget(self, now: float) -> None:
        while self._failed:
            client, times = next(iter(self._failed.items()))
            if times[-1] > now - self.window:
                break
            del self._failed[client]


def client_address(request: Request) -> str:
    """Whom a guess is counted against: the address that connected (`castlib web` does not
    take it from X-Forwarded-For: any local process could name a new address with every
    guess; behind a proxy every client is the proxy's, and a guesser there holds up the
    bearer token of all for a minute, the cookies of those logged in excepted). An IPv6
    address counts as its /64, the block one host or customer is given: a guesser has
    millions of addresses in it."""
    host = request.client.host if request.client else ""
    if ":" not in host:   # IPv4 as the server gives it (parsing it costs a request 3 us)
        return host
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Auth:
    def __init__(self, token: str | None, limit: LoginLimit | None = None):
        self.token = token or None
        self.limit = limit if limit is not None else LoginLimit()
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

    def attempt(self, request: Request, offered: str) -> tuple[bool, int]:
        """A guess at the token by this request's client: (whether it is the token, 0),
        a wrong one counted; or (False, seconds to wait) when the client has had too many
        wrong ones, and the token is not compared."""
        client = client_address(request)
        wait, stamp = self.limit.start(client)
        if wait:
            return False, wait
        if self.token_matches(offered):
            self.limit.forgive(client, stamp)
            return True, 0
        return False, 0

    def _bearer(self, request: Request) -> tuple[bool, int]:
        """attempt() on the bearer header (False, 0 without one), once a request: a page
        asks allowed() after require(), and one request is one guess."""
        try:
            return request.state.castlib_bearer
        except AttributeError:
            pass
        header = request.headers.get("authorization", "")
        scheme, _, offered = header.partition(" ")
        offered = offered.strip()
        verdict = ((False, 0) if scheme.lower() != "bearer" or not offered
                   else self.attempt(request, offered))
        request.state.castlib_bearer = verdict
        return verdict

    def _cookie(self, request: Request) -> bool:
        cookie = request.cookies.get(COOKIE)
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session.encode())

    def allowed(self, request: Request) -> bool:
        """Whether this request carries the token (header) or the login cookie."""
        if self.token is None:
            return False
        return self._bearer(request)[0] or self._cookie(request)

    def require(self, request: Request) -> None:
        """Refuse a request that may not act: 403 on a read-only server, 401 without
        (or with a wrong) token, 403 for a cookie sent by another site's page (below).
        Raised before anything is looked at or started."""
        if self.token is None:
            raise HTTPException(403, "this server is read-only: no token is configured "
                                     "(start it with castlib web --token-file FILE)")
        matched, wait = self._bearer(request)
        if matched:
            return
        # the cookie is not a guess at the token (it is an HMAC of it: 256 bits to guess,
        # not counted), so a client logged in acts even while its address waits
        if not self._cookie(request):
            if wait:
                raise too_many(wait)
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


def too_many(wait: int) -> HTTPException:
    return HTTPException(429, f"too many wrong tokens from this address: try again in "
                              f"{wait} s", headers={"Retry-After": str(wait)})


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


# -- the token file ---------------------------------------------------------------------
