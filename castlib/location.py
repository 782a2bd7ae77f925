"""Location URLs: parse what a user types, normalise it, and show it without secrets."""
from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from .errors import ConfigError
from .hosts import check_hostname, local_hostname

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes whose URL path is absolute after a double slash: root://host//eos/exp
_DOUBLE_SLASH_SCHEMES = {"root", "xroot", "roots", "xroots"}
# Where a URL starts inside free text (not in the middle of a word: `xs3://` is no URL).
_URL_IN_TEXT = re.compile(r"(?<![a-zA-Z0-9+.-])[a-zA-Z][a-zA-Z0-9+.-]*://")
_BRACKETED_HOST = re.compile(r"^\[[^\]]*\]")   # an IPv6 literal, whose colons are no password
_HOST_PORT = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*):[0-9]+$")


@dataclass(frozen=True)
class LocationURL:
    """A storage root: scheme, host (with port) and absolute path, credentials kept aside.

    `str(url)` is the canonical, credential-free form used as the location's identity in
    the catalog; `user`/`password` are only for the back-end that connects.
    """

    scheme: str
    host: str
    path: str
    user: str | None = field(default=None, compare=False)
    password: str | None = field(default=None, compare=False, repr=False)
    query: str = ""

    def __str__(self) -> str:
        if self.scheme == "file":   # the host of a local location: the machine it is on
            return f"file://{self.host}" + quote(self.path, safe="/:@!$&'()*+,;=-._~")
        sep = "/" if self.scheme in _DOUBLE_SLASH_SCHEMES else ""
        path = quote(self.path, safe="/:@!$&'()*+,;=-._~")
        q = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.host}{sep}{path}{q}"

    @property
    def hostname(self) -> str:
        """The bare host name or address, as a socket library wants it: no port, and an
        IPv6 literal without its brackets (`host` keeps them, as URLs need)."""
        return _split_host(self.host)[0]

    @property
    def port(self) -> int | None:
        return _split_host(self.host)[1]

    def child(self, relpath: str) -> "LocationURL":
        """The URL of a path below this root."""
        path = posixpath.join(self.path, relpath) if relpath else self.path
        return LocationURL(self.scheme, self.host, path, self.user, self.password, self.query)


def _split_host(host: str) -> tuple[str, int | None]:
    """`host` ("name", "name:port", "[v6]", "[v6]:port") as (bare name or address, port)."""
    m = re.fullmatch(r"\[([^\]]*)\](?::([0-9]+))?|([^:]*)(?::([0-9]+))?", host)
    if not m:   # an unbracketed IPv6 address, as older catalogs may hold: no port in it
        return host, None
    port = m.group(2) or m.group(4)
    if m.group(1) is not None:   # a zone id is percent-encoded in a URL: [fe80::1%25eth0]
        return unquote(m.group(1)), int(port) if port else None
    return m.group(3), int(port) if port else None


def parse_location(text: str, base_dir: str | None = None) -> LocationURL:
    """Parse a URL or a bare local path into a normalised `LocationURL`; a relative path
    is taken relative to base_dir (default: the working directory).

    Raises ConfigError with the offending text when it cannot be a location.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("empty location")
    m = _SCHEME.match(text)
    if not m:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", text) and not os.path.exists(text):
            raise ConfigError(f"malformed location URL {redact(text)!r} (expected scheme://host/path)")
        path = os.path.expanduser(text)
        if path.startswith("~"):   # ~user of no such user: not a folder named "~user" here
            raise ConfigError(f"location {text!r}: no user {path[1:].split('/')[0]!r} "
                              "whose home ~ could mean")
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return LocationURL("file", local_hostname(), _clean_local(path))
    scheme = m.group(1).lower()
    if _ambiguous_credentials(text[m.end():]):
        raise ConfigError(
            f"location {redact_url(text)!r} is ambiguous: percent-encode a '/', '?', '#' or '@' "
            "of a password as %2F, %3F, %23, %40 (and an '@' of the path as %40), or give "
            "the password in the location's options")
    try:
        parts = urlsplit(text)
    except ValueError:   # an unclosed or stray '[' of an IPv6 address
        raise ConfigError(f"malformed location URL {redact_url(text)!r}: an IPv6 address goes "
                          "whole in brackets (sftp://[::1]:2222/path)") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    host = parts.hostname or ""
    if ":" in host:   # an IPv6 literal keeps its brackets, or its last group reads as a port
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad port in location {redact(text)!r}") from None
    if port:
        host = f"{host}:{port}"
    path = unquote(parts.path, errors="surrogateescape")
    if scheme == "file":
        # file:///p and file://localhost/p are on this host; file://daq02/p on daq02,
        # whose folders this machine cannot resolve (links, mounts): its path is kept
        # as written, normalised
        if port or user or password:
            raise ConfigError(f"file:// location {redact(text)!r}: a local location names "
                              "a host, never a port or a user")
        here = local_hostname()
        host = check_hostname(host, f"location {redact(text)!r}") if host else here
        if host == "localhost":
            host = here
        if host == here:
            return LocationURL("file", host, _clean_local(path or "/"))
        if not path.startswith("/"):
            raise ConfigError(f"file:// location {redact(text)!r} has no absolute path")
        return LocationURL("file", host, posixpath.normpath(path) if path != "/" else "/")
    if not host and scheme not in ("memory",):
        raise ConfigError(f"location {redact(text)!r} has no host")
    if scheme in _DOUBLE_SLASH_SCHEMES and path.startswith("//"):
        path = path[1:]
    path = posixpath.normpath(path) if path not in ("", "/") else "/"
    if path.startswith("//"):
        path = path[1:]
    return LocationURL(scheme, host, path, user, password, parts.query)


def _clean_local(path: str) -> str:
    """The canonical path of a local location: the path as the kernel resolves it
    (os.path.realpath: links followed one component at a time, so `lnk/..` is the parent
    of where lnk points, as for open(2) and rsync, never the folder holding lnk; a part
    not created yet is kept as written, below its nearest existing ancestor).

    The catalog keys a location on this text, so it names the folder that really holds
    the files, not the way to it: two spellings of one folder (a link to it, `..` after a
    link) are one location with one history, which the vanish guard and the lock rely
    on, and a root that is a link to a folder (followed, as the README says) is recorded
    as what it points to. A link later pointed elsewhere is then another location, as it
    is another tree of files."""
    path = os.path.realpath(path)
    return path if path != "//" else "/"


# -- keeping credentials out of text ----------------------------------------------------------
# One mechanism for every message, log line and run record: credentials are found by their
# position in a URL (the userinfo before the authority's last '@'), and secrets given as
# options by their exact value as a whole token; never by replacing a substring wherever it
# happens to occur (a password "p" would turn "operation" into "o***eration").

def _credentials_end(rest: str, whole: bool) -> int:
    """In the text after `scheme://`, the index of the '@' that ends the userinfo, or -1.

    The authority ends at the first '/', '?' or '#'; the userinfo is everything before its
    last '@' (a password may hold an '@': user:p@ss@host). A password holding a raw '/',
    '?' or '#' cuts the authority short (user:pa/ss@host): when the authority has a ':'
    and no '@' while an '@' follows, everything up to the last '@' is taken as userinfo,
    hiding too much rather than a password. Only in free text (`whole` false), where
    castlib's own messages name files below a host:port (host:2222/data/a@b), a ':'
    followed by digits alone is taken for a port: parse_location refuses that shape when
    a user types it, so such a password never reaches a message of castlib's."""
    cut = len(rest)
    for c in "/?#":
        i = rest.find(c)
        if 0 <= i < cut:
            cut = i
    at = rest.rfind("@", 0, cut)
    if at >= 0 and "@" in rest[cut:]:   # user:p@ss/w@rd@host: hide up to the last '@'
        return rest.rfind("@")
    if at >= 0:
        return at
    if _ambiguous_credentials(rest, cut):
        if whole or not _HOST_PORT.match(rest[:cut]):
            return rest.rfind("@")
    return -1


def _ambiguous_credentials(rest: str, cut: int | None = None) -> bool:
    """user:pa/ss@host and host:22/a@b are the same shape: a ':' in an authority without
    '@', and an '@' after it. So are user:p@ss/w@rd@host/x and user@host/w@rd: a userinfo
    in the authority and an '@' after it. No position can tell a password from a port and
    a path, or from a host and a path."""
    if cut is None:
        cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    authority = rest[:cut]
    if "@" not in rest[cut:]:
        return False
    return "@" in authority or ":" in _BRACKETED_HOST.sub("", authority)


def ambiguous_url(url: str) -> bool:
    """Whether the credentials of a whole URL cannot be told from its host and path (a
    raw '/', '?' or '#' in a password: _ambiguous_credentials): such a URL is refused,
    and not shown, wherever castlib takes one (a location, the broker)."""
    m = _SCHEME.match(url)
    return bool(m) and _ambiguous_credentials(url[m.end():])


def redact_url(url: str, whole: bool = True) -> str:
    """The URL `url` (the whole text, spaces and all) with its userinfo replaced by ***."""
    url = str(url)
    m = _SCHEME.match(url)
    if not m:
        return url
    rest = url[m.end():]
    at = _credentials_end(rest, whole)
    return url if at < 0 else url[:m.end()] + "***" + rest[at:]


def redact(text: str, secrets=()) -> str:
    """`text` fit to show or keep: the userinfo of every URL in it replaced by *** (a URL
    in free text ends at white space), and each of `secrets` (option values: passwords,
    secret keys) replaced where it stands as a whole token, raw or percent-encoded."""
    text = str(text)
    if "://" in text:
        out, pos = [], 0
        while True:
            m = _URL_IN_TEXT.search(text, pos)
            if not m:
                break
            end = m.end()
            while end < len(text) and not text[end].isspace():
                end += 1
            following = _URL_IN_TEXT.search(text, m.end(), end)   # no '@' of the next URL
            if following:
                end = following.start()
            at = _credentials_end(text[m.end():end], whole=False)
            out.append(text[pos:m.end()])
            if at >= 0:
                out.append("***")
            pos = m.end() + max(at, 0)   # on from there: a URL may follow without a space
        out.append(text[pos:])
        text = "".join(out)
    for secret in sorted({f for s in secrets if isinstance(s, str) and s
                          for f in (s, quote(s, safe=""))}, key=len, reverse=True):
        if secret in text:
            text = _token_pattern(secret).sub("***", text)
    return text


def _token_pattern(secret: str) -> re.Pattern:
    """`secret` as a whole token: not continued by a letter or digit on a side where the
    secret itself begins or ends with one (so "p" matches in "password: p" only)."""
    before = r"(?<!\w)" if re.match(r"\w", secret) else ""
    after = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return re.compile(before + re.escape(secret) + after)


def secret_values(options: dict | None, url: "LocationURL | None" = None) -> list[str]:
    """The values a message about a location must never show: its URL's password and the
    back-end options under secret-looking keys (password, secret, token, key...)."""
    found = [url.password] if url is not None and url.password else []

    def collect(value, secret: bool):
        if isinstance(value, dict):
            for k, v in value.items():
                collect(v, secret or (isinstance(k, str) and bool(_SECRET_KEY.search(k))))
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v, secret)
        elif secret and isinstance(value, str) and value:
            found.append(value)

    collect(options or {}, False)
    return found


_SECRET_KEY = re.compile(r"pass(word|phrase)?|secret|token|credential|(^|_)key$", re.I)


def scrub_secrets(value):
    """A copy of a structure (run arguments, stage parameters, a parsed pipeline) fit to
    keep: URL credentials redacted, values under secret-looking keys (password, secret,
    token, key...) replaced by ***."""
    if isinstance(value, dict):
        return {k: "***" if (isinstance(k, str) and _SECRET_KEY.search(k)
                             and v not in (None, "")) else scrub_secrets(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        # a value that is a URL is one URL to its end, spaces and all
        return redact_url(value) if _SCHEME.match(value) else redact(value)
    return value
