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
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .yamlfile import name_keys
from .location import LocationURL, parse_location


# the keys of the file, in the order an error lists them
FIELDS = ("storage", "locations", "hostname", "broker", "queues")


class StorageOptions(dict):
    """A location's back-end options, and where the configuration file sets each (a
    back-end's error about one names that file and line: Backend.option_error)."""

    def __init__(self, options: dict, file: str | None = None,
                 lines: dict[str, int | None] | None = None):
        super().__init__(options)
        self.file, self.lines = file, dict(lines or {})

    def override(self, options: dict) -> None:
        """Options set elsewhere (a pipeline's locations), over these: not the file's."""
        self.update(options)
        for name in options:
            self.lines.pop(name, None)


class UserConfig:
    """The configuration file's keys (a new key is an attribute here, a field of the
    file's model, _file_model, and a check in _plain_file). Plain data: a command starts
    without importing pydantic; the model checks only a file that _plain_file does not
    find plainly valid (and words its errors)."""

    __slots__ = ("storage", "locations", "hostname", "broker", "queues", "_path", "_lines")

    def __init__(self, storage: dict[str, dict[str, Any]] | None = None,
                 locations: dict[str, str] | None = None, hostname: str | None = None,
                 broker: str | None = None, queues: dict[str, str] | None = None):
        self.storage = dict(storage or {})       # back-end options by URL prefix (the longest wins)
        self.locations = dict(locations or {})   # names for URLs, as a pipeline's locations
        # this machine's name in local locations (file://HOST/path); default:
        # $CASTLIB_HOSTNAME, else the system's
        self.hostname = hostname
        self.broker = broker                     # the workers' broker URL (README, Several hosts)
        self.queues = dict(queues or {})         # URL prefix -> the worker queue that serves it
        self._path: str | None = None
        self._lines: dict[tuple, int] = {}   # the file's line of each key (yamlfile)

    def __repr__(self) -> str:
        return "UserConfig(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in FIELDS) + ")"

    @property
    def path(self) -> str | None:
        """The file it was read from (None: no file)."""
        return self._path

    def options_for(self, url: LocationURL) -> "StorageOptions":
        """Back-end options for a URL: the entry with the longest matching prefix (which
        knows the file and line of each of its keys, for a back-end's error)."""
        target = str(url)
        best, best_len, best_prefix = {}, -1, None
        for prefix, options in self.storage.items():
            try:
                key = str(parse_location(prefix))
            except ConfigError:
                key = prefix
            if (target == key or target.startswith(key.rstrip("/") + "/")) and len(key) > best_len:
                best, best_len, best_prefix = options, len(key), prefix
        if best_prefix is None or not self._path:
            return StorageOptions(best)
        return StorageOptions(best, self._path, {
            name: self._lines.get(("storage", best_prefix, name)) for name in best})

    def queue_for(self, url: LocationURL) -> str | None:
        """The worker queue `queues:` maps a (remote) location to: the longest prefix."""
        target = str(url)
        best, best_len = None, -1
        for prefix, queue in self.queues.items():
            if target.startswith(prefix.rstrip("/")) and len(prefix) > best_len:
                best, best_len = queue, len(prefix)
        return best


def _explain(loc: tuple, kind: str, message: str) -> str | None:
    if not loc:
        return "expected a mapping with 'storage' and 'locations'"
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown key (expected {', '.join(FIELDS)})"
    if loc[0] == "storage":
        return "'storage' must map URL prefixes to option mappings"
    if loc[0] == "locations":
        return "'locations' must map names to URLs"
    return None


def _file_model():
    """The pydantic model that checks a configuration file (imported only when one exists)."""
    from typing import Annotated

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

    class UserConfigFile(BaseModel):
        model_config = ConfigDict(extra="forbid")
        storage: dict[str, dict[str, Any]] = Field(default_factory=dict)
        locations: dict[str, str] = Field(default_factory=dict)
        hostname: str | None = None
        broker: str | None = None
        queues: dict[str, Annotated[str, StringConstraints(min_length=1)]] = Field(
            default_factory=dict)

        @field_validator("storage", "locations", "queues", mode="before")
        @classmethod
        def _mapping(cls, value):
            return name_keys(value)

    assert tuple(UserConfigFile.model_fields) == FIELDS
    return UserConfigFile


def _plain_file(data) -> dict | None:
    """The file's keys as the model (_file_model) reads them, when every value is plainly
    valid: of its exact type, as YAML gives a file that is right; else None, and the model
    checks it (its coercions and its error messages stay the one definition). A command
    that reads a configuration file then starts without importing pydantic (~0.1 s)."""
    if data is None:   # an empty file
        data = {}
    if type(data) is not dict or not all(type(k) is str and k in FIELDS for k in data):
        return None
    values: dict = {}
    for key in ("storage", "locations", "queues"):
        value = data.get(key)
        if value is not None and type(value) is not dict:
            return None
        mapping = name_keys(value)
        for v in mapping.values():
            if key == "storage":
                if type(v) is not dict or not all(type(k) is str for k in v):
                    return None
            elif type(v) is not str or (key == "queues" and not v):
                return None
        if key == "storage":
            mapping = {k: dict(v) for k, v in mapping.items()}
        values[key] = mapping
    for key in ("hostname", "broker"):
        value = data.get(key)
        if value is not None and type(value) is not str:
            return None
        values[key] = value
    return values


def config_path() -> Path:
    env = os.environ.get("CASTLIB_CONFIG")
    if env:
        return Path(env).expanduser()
    if sys.platform.startswith("linux"):
        # what platformdirs.user_config_dir says on Linux, without importing it in every
        # command: $XDG_CONFIG_HOME (when set and not blank), else ~/.config
        base = os.environ.get("XDG_CONFIG_HOME", "").strip() or os.path.expanduser("~/.config")
        return Path(base) / "castlib" / "config.yaml"
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
    from .yamlfile import KeyLines, load_with_lines

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=str(path)) from None
    data, lines = load_with_lines(text, str(path))
    values = _plain_file(data)
    if values is None:   # something the model converts or refuses: it says what, or reads it
        from pydantic import ValidationError

        try:
            checked = _file_model().model_validate({} if data is None else data)
        except ValidationError as exc:
            raise KeyLines(str(path), lines).invalid(exc, _explain) from None
        values = {k: getattr(checked, k) for k in FIELDS}
    config = UserConfig(**values)
    config._path = str(path)
    config._lines = lines
    return config
