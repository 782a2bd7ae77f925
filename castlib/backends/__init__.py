"""Back-ends by URL scheme: a registry of built-in ones, extended through entry points.

A back-end module is imported only when a URL of its scheme is used, so a missing optional
dependency costs nothing until then and is reported as one line with the pip extra to install.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import BackendUnavailable, ConfigError
from ..location import LocationURL, parse_location
from .base import DIR, FILE, LINK, Backend, Capabilities, Stat

ENTRY_POINT_GROUP = "castlib.backends"


@dataclass(frozen=True)
class BackendSpec:
    scheme: str
    target: str            # "module:Class"
    extra: str | None      # pip extra that provides the dependency
    requires: str | None   # the importable module that extra installs
    # "module:function" that starts a connection ahead of the back-end, from a module
    # lighter than the back-end's own (see connect_ahead)
    ahead: str | None = None


_BUILTIN: dict[str, BackendSpec] = {}


def _builtin(schemes, target, extra=None, requires=None, ahead=None):
    for s in schemes:
        _BUILTIN[s] = BackendSpec(s, target, extra, requires, ahead)


_builtin(["file"], "castlib.backends.local:LocalBackend")
_builtin(["root", "xroot", "roots", "xroots"], "castlib.backends.xrootd:XRootDBackend", "xrootd", "XRootD")
_builtin(["castor"], "castlib.backends.castor:CastorBackend")
_builtin(["s3"], "castlib.backends.s3:S3Backend", "s3", "s3fs")
_builtin(["sftp", "ssh"], "castlib.backends.sftp:SftpBackend", "sftp", "sshfs",
         ahead="castlib.backends.ssh_command:start_ahead")
_builtin(["webdav", "webdavs", "dav", "davs"], "castlib.backends.webdav:WebdavBackend", "webdav", "webdav4")
_builtin(["memory"], "castlib.backends.fsspec:MemoryBackend", "fsspec", "fsspec")


def _entry_points() -> dict[str, BackendSpec]:
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = BackendSpec(ep.name, ep.value, None, None)
    return found


def registry() -> dict[str, BackendSpec]:
    """Every known scheme: built-ins, then plugins (a plugin may not shadow a built-in)."""
    specs = dict(_entry_points())
    specs.update(_BUILTIN)
    return specs


def backend_class(scheme: str) -> type[Backend]:
    # a built-in scheme is never a plugin's: no scan of the entry points (importlib.metadata
    # reads every installed package's metadata) for it
    spec = _BUILTIN.get(scheme) or registry().get(scheme)
    if spec is None:
        fsspec_cls = _fsspec_fallback(scheme)
        if fsspec_cls is None:
            raise BackendUnavailable(f"no back-end for URL scheme {scheme}:// "
                                     "(castlib backends lists the known ones)")
        return fsspec_cls
    module_name, _, cls_name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(f"{scheme}:// is served by {module_name}, which is missing "
                                     "from this installation") from None
        hint = f"pip install 'castlib[{spec.extra}]'" if spec.extra else "check the installation"
        raise BackendUnavailable(f"{scheme}:// needs {spec.requires or exc.name}, "
                                 f"which is not installed: {hint}") from None
    return getattr(module, cls_name)


def _fsspec_fallback(scheme: str):
    """Any other protocol fsspec knows goes through the generic fsspec bridge."""
    try:
        from fsspec.registry import known_implementations
    except ImportError:
        return None
    if scheme not in known_implementations:
        return None
    from .fsspec import FsspecBackend

    return FsspecBackend


def open_backend(location: str | LocationURL, options: dict | None = None) -> Backend:
    """The back-end serving a location URL (or bare local path)."""
    url = parse_location(location) if isinstance(location, str) else location
    cls = backend_class(url.scheme)
    return cls(url, options)


def connect_ahead(locations) -> None:
    """Let the back-ends of these locations (as a command line names them: URLs, paths,
    the configuration's names) start connecting now, before the command imports the
    engine, the catalog and the back-ends' libraries: an SSH login (~0.1 s, mostly a
    wait on the network) then runs while they are. The back-end takes the connection
    when it connects, if its options are those this found (see ssh_command.take_ahead).
    Anything wrong (a configuration that does not read, a URL that does not parse) is
    left alone: the command says it, as it would have."""
    from ..config import load_user_config

    if any(text.startswith(("sftp://", "ssh://")) for text in locations):
        from .ssh_command import ask_openssh_version, ask_where

        ask_openssh_version()   # (meanwhile, the configuration is read)
        for text in locations:
            if text.startswith(("sftp://", "ssh://")):
                try:
                    ask_where(parse_location(text))   # (and where ssh will connect)
                except ConfigError:
                    pass
    try:
        config = load_user_config()
    except ConfigError:
        return
    for text in locations:
        try:
            url = parse_location(config.locations.get(text, text))
        except ConfigError:
            continue
        spec = _BUILTIN.get(url.scheme)
        if spec is None or spec.ahead is None:
            continue
        module_name, _, function = spec.ahead.partition(":")
        getattr(importlib.import_module(module_name), function)(url, config.options_for(url))


def is_available(spec: BackendSpec) -> bool:
    if not spec.requires:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec(spec.requires) is not None
    except (ImportError, ValueError):
        return False


__all__ = ["Backend", "Capabilities", "Stat", "FILE", "DIR", "LINK", "open_backend",
           "backend_class", "registry", "is_available", "BackendSpec", "ConfigError",
           "connect_ahead"]
