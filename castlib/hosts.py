"""Which machine this is: the host a `file://` location belongs to.

A local path means nothing without the machine that reads it: `/data/cdr` on daq01 and
`/data/cdr` on daq02 are two trees of files. The catalog therefore stores local locations
as `file://HOST/path`, HOST being the name of the machine that reads them: $CASTLIB_HOSTNAME,
else the `hostname:` of the user's configuration, else socket.gethostname(). The first two
let one machine play several hosts (tests, a container standing in for a DAQ host).
"""
from __future__ import annotations

import os
import re

from .errors import ConfigError

# RFC 1123 labels, dot-separated; no port, no userinfo, no path: it becomes a URL's host
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")

_cache: dict[tuple, str] = {}


def local_hostname() -> str:
    """The name of this host as the catalog knows it (lower case)."""
    env = os.environ.get("CASTLIB_HOSTNAME")
    key = (env, os.environ.get("CASTLIB_CONFIG"))
    found = _cache.get(key)
    if found is not None:
        return found
    if env is not None:
        name, where = env, "$CASTLIB_HOSTNAME"
    else:
        from .config import load_user_config   # not at import: config imports location

        configured = load_user_config().hostname
        name, where = (configured, "the configuration's hostname") if configured else (
            _system_hostname(), "socket.gethostname()")
    name = check_hostname(name, where)
    _cache[key] = name
    return name


def _system_hostname() -> str:
    """socket.gethostname(): on POSIX the node name uname() gives, which spares importing
    socket (and its selectors, enum...) in every command."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket

    return socket.gethostname()


def check_hostname(name, where: str) -> str:
    if not isinstance(name, str) or not _HOST_NAME.match(name.strip().lower()):
        raise ConfigError(f"host name {name!r} from {where} is not a host name "
                          "(letters, digits, '-' and '.')")
    return name.strip().lower()


def is_here(url) -> bool:
    """Whether the local location `url` (a LocationURL of scheme file) is on this host."""
    return not url.host or url.host == local_hostname()


def elsewhere(url) -> ConfigError:
    """The refusal for reading or writing another host's local location from this one."""
    return ConfigError(f"{url} is on {url.host}; run it there or through a worker "
                       "(--on-workers)")


def process_alive(pid: int | None) -> bool:
    """Whether this machine has a process `pid` (another user's counts)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True
