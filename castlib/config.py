"""The user's configuration file: back-end options (credentials, endpoints) by URL prefix.

    # ~/.config/castlib/config.yaml  (or the file named by CASTLIB_CONFIG)
    storage:
      "s3://cdr-archive":            {endpoint_url: "https://s3.example.org"}
      "sftp://na64@archive.example": {client_keys: ["~/.ssh/id_ed25519"]}
    locations:
      daq: /data/cdr
      archive: root://eos.example.org//eos/exp/cdr
    # several hosts (README, "Several hosts"): this machine's name in file:// locations,
    # the broker workers take stages from, and the queue that serves a remote storage
    hostname: daq01
    broker: redis://broker.example.org:6379/0
    queues:
      "root://eos.example.org": eos

Options apply to every location whose URL starts with the key (the longest key wins).
Secrets belong here or in the environment, never in the catalog: the catalog stores URLs
without credentials.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .location import LocationURL, parse_location


@dataclass
class UserConfig:
    path: str | None = None
    storage: dict[str, dict] = field(default_factory=dict)
    locations: dict[str, str] = field(default_factory=dict)
    hostname: str | None = None
    broker: str | None = None
    queues: dict[str, str] = field(default_factory=dict)   # URL prefix -> worker queue

    def options_for(self, url: LocationURL) -> dict:
        """Back-end options for a URL: the entry with the longest matching prefix."""
        target = str(url)
        best, best_len = {}, -1
        for prefix, options in self.storage.items():
            try:
                key = str(parse_location(prefix))
            except ConfigError:
                key = prefix
            if (target == key or target.startswith(key.rstrip("/") + "/")) and len(key) > best_len:
                best, best_len = options, len(key)
        return dict(best)

    def queue_for(self, url: LocationURL) -> str | None:
        """The worker queue `queues:` maps a (remote) location to: the longest prefix."""
        target = str(url)
        best, best_len = None, -1
        for prefix, queue in self.queues.items():
            if target.startswith(prefix.rstrip("/")) and len(prefix) > best_len:
                best, best_len = queue, len(prefix)
        return best


def config_path() -> Path:
    env = os.environ.get("CASTLIB_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("castlib", appauthor=False)) / "config.yaml"


def load_user_config() -> UserConfig:
    path = config_path()
    try:
        present = path.is_file()
    except OSError:   # e.g. a home folder this user may not enter: no config of ours there
        present = False
    if not present:
        if os.environ.get("CASTLIB_CONFIG"):
            raise ConfigError("configuration file does not exist", file=str(path))
        return UserConfig()
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"malformed YAML: {getattr(exc, 'problem', exc)}", file=str(path),
                          line=mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with 'storage' and 'locations'", file=str(path))
    unknown = set(data) - set(CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown key (expected {', '.join(CONFIG_KEYS)})", file=str(path),
                          key=sorted(unknown)[0])
    storage = data.get("storage") or {}
    locations = data.get("locations") or {}
    if not isinstance(storage, dict) or not all(isinstance(v, dict) for v in storage.values()):
        raise ConfigError("'storage' must map URL prefixes to option mappings", file=str(path),
                          key="storage")
    if not isinstance(locations, dict) or not all(isinstance(v, str) for v in locations.values()):
        raise ConfigError("'locations' must map names to URLs", file=str(path), key="locations")
    for key in ("hostname", "broker"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"'{key}' must be a string", file=str(path), key=key)
    queues = data.get("queues") or {}
    if not isinstance(queues, dict) or not all(isinstance(v, str) and v
                                               for v in queues.values()):
        raise ConfigError("'queues' must map URL prefixes to queue names", file=str(path),
                          key="queues")
    return UserConfig(str(path), storage, locations, data.get("hostname"), data.get("broker"),
                      {str(k): v for k, v in queues.items()})


CONFIG_KEYS = ("storage", "locations", "hostname", "broker", "queues")
