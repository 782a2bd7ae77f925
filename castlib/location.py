"""Location URLs: parse what a user types, normalise it, and show it without secrets."""
from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from .errors import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Schemes whose URL path is absolute after a double slash: root://host//eos/exp
_DOUBLE_SLASH_SCHEMES = {"root", "xroot", "roots", "xroots"}
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


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
        if self.scheme == "file":
            return "file://" + quote(self.path, safe="/:@!$&'()*+,;=-._~")
        sep = "/" if self.scheme in _DOUBLE_SLASH_SCHEMES else ""
        path = quote(self.path, safe="/:@!$&'()*+,;=-._~")
        q = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{self.host}{sep}{path}{q}"

    @property
    def hostname(self) -> str:
        return self.host.rsplit(":", 1)[0] if self.host.count(":") == 1 else self.host

    @property
    def port(self) -> int | None:
        if self.host.count(":") == 1:
            try:
                return int(self.host.rsplit(":", 1)[1])
            except ValueError:
                return None
        return None

    def child(self, relpath: str) -> "LocationURL":
        """The URL of a path below this root."""
        path = posixpath.join(self.path, relpath) if relpath else self.path
        return LocationURL(self.scheme, self.host, path, self.user, self.password, self.query)


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
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return LocationURL("file", "", _clean_local(os.path.abspath(path)))
    scheme = m.group(1).lower()
    parts = urlsplit(text)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad port in location {redact(text)!r}") from None
    if port:
        host = f"{host}:{port}"
    path = unquote(parts.path, errors="surrogateescape")
    if scheme == "file":
        if host and host != "localhost":
            raise ConfigError(f"file:// location {redact(text)!r} names host {host!r}; "
                              "use file:///absolute/path")
        return LocationURL("file", "", _clean_local(path or "/"))
    if not host and scheme not in ("memory",):
        raise ConfigError(f"location {redact(text)!r} has no host")
    if scheme in _DOUBLE_SLASH_SCHEMES and path.startswith("//"):
        path = path[1:]
    path = posixpath.normpath(path) if path not in ("", "/") else "/"
    if path.startswith("//"):
        path = path[1:]
    return LocationURL(scheme, host, path, user, password, parts.query)


def _clean_local(path: str) -> str:
    path = os.path.normpath(path)
    return path if path != "//" else "/"


def redact(text: str) -> str:
    """Hide `user:password@` in any URL inside `text` (for logs and error messages)."""
    return _CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", str(text))


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
        return redact(value)
    return value
