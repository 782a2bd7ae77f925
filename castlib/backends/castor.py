"""CASTOR (castor://host/castor/cern.ch/...): through its XRootD gateway, or its own tools.

CASTOR, CERN's tape-backed storage before CTA, is retired; its data path was XRootD. Two
modes, chosen by the location's option `mode`:

- `xrootd` (default): `castor://host/path` is served as `root://host//path` by the XRootD
  back-end (listing, server-side adler32, staging, third-party copy to EOS).
- `tools`: drives CASTOR's name-server and stager commands, as the original castlib did
  at NA64: `nsls -l --class --checksum` lists (with the `AD` adler32 column), `rfstat`
  stats, `nsmkdir`/`nsrename`/`nsrm`/`nsrmdir` change the namespace, `stager_qry`/
  `stager_get`/`stager_put` manage the disk cache, and `xrdcp` moves the bytes. Every
  command is a template in the options (`tools: {list: "...", ...}`), run without a shell
  with `{path}` (and friends) filled in per argument, so any name is passed intact.

Tools-mode options: `tools` (templates, see TOOLS), `env` (e.g. STAGE_HOST,
STAGE_SVCCLASS, CNS_HOST), `timeout` (seconds for name-server and stager commands,
default 120), `transfer_timeout` (seconds for one xrdcp, default 86400), `stage_poll`
(seconds between stager queries while recalling from tape, default 10), `exact_mtimes`
(see below).

Listings keep mtimes to the minute, as nsls prints them. A file older than about six
months shows only its year there: its mtime is left unknown (NULL; its size and adler32
decide), unless `exact_mtimes: true` asks rfstat for it, one command per such file. mtimes
can be set only if a `set_mtime` template is configured. nsls prints one line an entry, so
a name holding a newline cannot be listed in this mode. The tools' output formats the
parsers rely on are recorded in docs/castor-tool-outputs.md.
"""
from __future__ import annotations

import os
import posixpath
import re
import shlex
import subprocess
import tempfile
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Iterator, Literal, Optional, Union

from pydantic import PositiveFloat, field_validator
from pydantic_core import PydanticCustomError

from ..checksum import normalise
from ..errors import (BackendUnavailable, ConfigError, NotFound, StorageError,
                      TransientStorageError, Unsupported)
from ..location import LocationURL
from .base import (DIR, FILE, LINK, Backend, BackendOptions, Capabilities,
                   ListingErrorHandler, Stat, WriteStream, wait_for_staging, walk_by_folder)

MINUTE_NS = 60_000_000_000

# The command behind each operation. Placeholders: {path} (absolute CASTOR path), {url}
# (its root:// data URL), {host}, {src} and {dst} (rename), {paths} (stager commands: one
# argument per path), {mtime} (seconds since the epoch) and {stamp} (local YYYYmmddHHMM).
TOOLS: dict[str, str | None] = {
    "list": "nsls -l --class --checksum {path}",
    "stat": "nsls -ld --class --checksum {path}",
    "rfstat": "rfstat {path}",
    "mkdir": "nsmkdir -p {path}",
    "rename": "nsrename {src} {dst}",
    "delete": "nsrm {path}",
    "rmdir": "nsrmdir {path}",
    "stage_query": "stager_qry -M {paths}",
    "stage_get": "stager_get -M {paths}",
    "stage_put": None,     # e.g. "stager_put -M {paths}" where a put must be announced
    "read": "xrdcp --silent --nopbar {url} -",
    "write": "xrdcp --silent --nopbar --force - {url}",
    "set_mtime": None,     # e.g. "nstouch -m -t {stamp} {path}" (to the minute)
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_FIELDS = {"path", "url", "host", "src", "dst", "paths", "mtime", "stamp"}
_STAGER_BATCH = 200          # paths per stager command line
_ONLINE_STATES = {"STAGED", "CANBEMIGR"}

def _template(value) -> str | None:
    """A tool's command line: split as a shell would (but run without one), every
    placeholder one castlib fills in. Empty: not configured."""
    if value is None or value == "":
        return None
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise PydanticCustomError("template", "cannot split the command line: {why}",
                                  {"why": str(exc)}) from None
    for word in words:
        for field_name in _PLACEHOLDER.findall(word):
            if field_name not in _FIELDS:
                raise PydanticCustomError(
                    "template", "unknown placeholder {name} (known: {known})",
                    {"name": "{" + field_name + "}",
                     "known": ", ".join("{" + f + "}" for f in sorted(_FIELDS))})
    return value if words else None


class CastorTools(BackendOptions):
    """The command behind each operation (see TOOLS): a template, or null for none."""

    list: Optional[str] = TOOLS["list"]
    stat: Optional[str] = TOOLS["stat"]
    rfstat: Optional[str] = TOOLS["rfstat"]
    mkdir: Optional[str] = TOOLS["mkdir"]
    rename: Optional[str] = TOOLS["rename"]
    delete: Optional[str] = TOOLS["delete"]
    rmdir: Optional[str] = TOOLS["rmdir"]
    stage_query: Optional[str] = TOOLS["stage_query"]
    stage_get: Optional[str] = TOOLS["stage_get"]
    stage_put: Optional[str] = TOOLS["stage_put"]
    read: Optional[str] = TOOLS["read"]
    write: Optional[str] = TOOLS["write"]
    set_mtime: Optional[str] = TOOLS["set_mtime"]

    @field_validator("*")
    @classmethod
    def check_template(cls, value):
        return _template(value)


class CastorToolsOptions(BackendOptions):
    """Tools mode's options (mode: xrootd hands the location to the XRootD back-end)."""

    mode: Literal["tools"] = "tools"
    tools: CastorTools = CastorTools()
    env: dict[str, Union[str, int, float]] = {}   # STAGE_HOST, STAGE_SVCCLASS, CNS_HOST...
    timeout: PositiveFloat = 120            # seconds, one name-server or stager command
    transfer_timeout: PositiveFloat = 86400  # seconds, one xrdcp
    stage_poll: PositiveFloat = 10          # seconds between stager queries while recalling
    exact_mtimes: bool = False              # rfstat each file nsls shows with a year only


assert set(CastorTools.model_fields) == set(TOOLS)   # one list of tools
_TOOLS_ONLY = set(CastorToolsOptions.model_fields) - {"mode"}


TOOLS_CAPABILITIES = Capabilities(
    set_mtime=False, server_checksums=frozenset({"adler32"}),
    mtime_precision_ns=MINUTE_NS, symlinks=False, empty_dirs=True, third_party_copy=False,
    tape=True)


def xrootd_url(url: LocationURL) -> LocationURL:
    """castor://host/castor/cern.ch/x -> root://host//castor/cern.ch/x (the same server)."""
    return LocationURL("root", url.host, url.path, url.user, url.password)


class CastorBackend(Backend):
    """A CASTOR location; `mode: xrootd` (default) hands it to the XRootD back-end."""

    description = ("CASTOR tape storage: through its XRootD gateway (default), or its "
                   "name-server and stager tools (option mode: tools)")
    capabilities = TOOLS_CAPABILITIES
    Options = CastorToolsOptions

    @classmethod
    def capabilities_for(cls, scheme: str) -> Capabilities:
        """What the default mode can do (for `castlib backends`): XRootD's."""
        try:
            from .xrootd import XRootDBackend
        except ImportError:
            return TOOLS_CAPABILITIES
        return XRootDBackend.capabilities

    def __new__(cls, url: LocationURL, options: dict | None = None):
        options = dict(options or {})
        mode = options.pop("mode", "xrootd")
        if mode == "tools":
            return super().__new__(cls)
        if mode != "xrootd":
            raise ConfigError(f"castor:// option mode must be xrootd or tools, not {mode!r}",
                              key="mode")
        stray = sorted(set(options) & _TOOLS_ONLY)
        if stray:
            raise ConfigError(f"castor:// option {stray[0]!r} applies to mode: tools only",
                              key=stray[0])
        try:
            from .xrootd import XRootDBackend
        except ImportError:
            raise BackendUnavailable(
                "castor:// reaches CASTOR through XRootD by default, and the XRootD bindings "
                "are not installed: pip install 'castlib[xrootd]' (or set option mode: tools)"
            ) from None
        return XRootDBackend(xrootd_url(url), options)

    def __init__(self, url: LocationURL, options: dict | None = None):
        super().__init__(url, options)   # self.settings: the options, checked
        opts = self.settings
        self.tools = opts.tools.model_dump()
        self.timeout = opts.timeout
        self.transfer_timeout = opts.transfer_timeout
        self.stage_poll = opts.stage_poll
        self.exact_mtimes = opts.exact_mtimes
        self.env = {**os.environ, **{str(k): str(v) for k, v in opts.env.items()}}
        self.capabilities = replace(TOOLS_CAPABILITIES, set_mtime=bool(self.tools["set_mtime"]))
        self._data_server = f"root://{url.user + '@' if url.user else ''}{url.host}/"

    # -- running the tools -----------------------------------------------------------------
    def _abs(self, path: str) -> str:
        return posixpath.join(self.url.path, path) if path else self.url.path

    def _where(self, path: str) -> str:
        return f"castor://{self.url.host}{self._abs(path)}"

    def _argv(self, tool: str, **fields) -> list[str]:
        template = self.tools[tool]
        if not template:
            raise StorageError(f"no CASTOR command is configured for {tool} "
                               f"(option tools.{tool})")
        fields.setdefault("host", self.url.host)
        argv = []
        for word in shlex.split(template):
            if word == "{paths}":
                argv.extend(fields["paths"])
            else:
                argv.append(_PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), word))
        return argv

    def _run(self, tool: str, where: str, **fields) -> "ToolOutput":
        argv = self._argv(tool, **fields)
        try:
            done = subprocess.run(argv, capture_output=True, env=self.env, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"CASTOR command {argv[0]!r} (tools.{tool}) is not installed or not on PATH") from None
        except PermissionError:
            raise BackendUnavailable(f"CASTOR command {argv[0]!r} (tools.{tool}) cannot be run: "
                                     "permission denied") from None
        except subprocess.TimeoutExpired:
            raise TransientStorageError(f"{argv[0]} timed out after {self.timeout:g} s on "
                                        f"{where}", path=where, unreached=True) from None
        return ToolOutput(argv[0], done.returncode, os.fsdecode(done.stdout),
                          os.fsdecode(done.stderr))

    def _fail(self, out: "ToolOutput", what: str, where: str) -> StorageError:
        message = f"{what} {where}: {out.argv0} failed: {out.reason()}"
        if out.not_found:
            return NotFound(message, path=where)
        if out.transient:
            return TransientStorageError(message, path=where)
        return StorageError(message, path=where)

    # -- listing -----------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        now = datetime.now()   # one "now" for the whole listing's dates
        return walk_by_folder(lambda rel: self._list_folder(rel, now), on_error,
                              f"folder does not exist: {self._where('')}")

    def _list_folder(self, rel: str, now: datetime) -> list[Stat]:
        out = self._run("list", self._where(rel), path=self._abs(rel))
        if out.returncode != 0:
            raise self._fail(out, "cannot list", self._where(rel))
        entries = []
        for line in out.stdout.splitlines():
            entry = parse_nsls_line(line, now)
            if entry is not None and entry.kind is not None and entry.name not in (".", ".."):
                entries.append(self._complete(entry, f"{rel}/{entry.name}" if rel else entry.name))
        return entries

    def stat(self, path: str) -> Stat | None:
        out = self._run("stat", self._where(path), path=self._abs(path))
        if out.returncode != 0:
            if out.not_found:
                return None
            raise self._fail(out, "cannot stat", self._where(path))
        for line in out.stdout.splitlines():
            entry = parse_nsls_line(line)
            if entry is not None:
                return None if entry.kind is None else self._complete(entry, path)
        raise StorageError(f"cannot stat {self._where(path)}: unexpected nsls output "
                           f"{out.stdout.strip()[:200]!r}", path=path)

    def _complete(self, entry: "NslsEntry", path: str) -> Stat:
        """The entry as a Stat; with exact_mtimes, an entry nsls shows with only its year
        gets its mtime from rfstat (to the minute, like the others)."""
        st = entry.to_stat(path)
        if st.mtime_ns is None and self.exact_mtimes:
            out = self._run("rfstat", self._where(path), path=self._abs(path))
            if out.returncode == 0:
                mtime = rfstat_mtime_ns(parse_rfstat(out.stdout))
                st.mtime_ns = None if mtime is None else mtime - mtime % MINUTE_NS
        return st

    # -- data ----------------------------------------------------------------------------
    def open_read(self, path: str):
        return _ToolStream(self._argv("read", path=self._abs(path), url=self._data_url(path)),
                           "read", self._where(path), self.env, self.transfer_timeout)

    def open_write(self, path: str):
        url = self._data_url(path)   # refused before the stager hears of the name
        if self.tools["stage_put"]:
            self._stager("stage_put", [path])
        return _ToolStream(self._argv("write", path=self._abs(path), url=url),
                           "write", self._where(path), self.env, self.transfer_timeout,
                           discard=lambda: self._discard(path))

    def _discard(self, path: str) -> None:
        """What an aborted write left (xrdcp creates the file before its first byte)."""
        if self.stat(path) is not None:
            self.delete(path)

    def _data_url(self, path: str) -> str:
        if "?" in path:   # xrdcp would cut the name there (opaque data) and write another file
            raise Unsupported(f"CASTOR names cannot contain '?' (xrdcp, which moves the bytes, "
                              f"takes it for the start of opaque data): {path!r}", path=path)
        return self._data_server + self._abs(path)

    def checksum(self, path: str, algorithm: str) -> str:
        if algorithm == "adler32":
            st = self.stat(path)
            if st is None:
                raise NotFound(f"no such file: {self._where(path)}", path=path)
            if st.checksums and st.checksums.get("adler32"):
                return st.checksums["adler32"]
        return super().checksum(path, algorithm)

    # -- namespace -----------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        out = self._run("mkdir", self._where(path), path=self._abs(path))
        if out.returncode != 0:
            st = self.stat(path)
            if st is None or st.kind != DIR:
                raise self._fail(out, "cannot create folder", self._where(path))

    def rename(self, src: str, dst: str) -> None:
        out = self._run("rename", self._where(src), src=self._abs(src), dst=self._abs(dst))
        if out.returncode != 0:
            raise self._fail(out, f"cannot rename {self._where(src)} to", self._where(dst))

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"no such file or folder: {self._where(path)}", path=path)
        out = self._run("rmdir" if st.kind == DIR else "delete", self._where(path),
                        path=self._abs(path))
        if out.returncode != 0:
            raise self._fail(out, "cannot delete", self._where(path))

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        if not self.tools["set_mtime"]:   # capabilities say so too: the sync does not ask
            raise Unsupported(f"{self._where(path)}: cannot set modification times (no "
                              "CASTOR command is configured for it: option tools.set_mtime)",
                              path=path)
        seconds = mtime_ns // 1_000_000_000
        stamp = datetime.fromtimestamp(seconds).strftime("%Y%m%d%H%M")
        out = self._run("set_mtime", self._where(path), path=self._abs(path), mtime=seconds,
                        stamp=stamp)
        if out.returncode != 0:
            raise self._fail(out, "cannot set the mtime of", self._where(path))

    # -- tape ------------------------------------------------------------------------------
    def stage(self, paths: list[str], timeout_s: float) -> None:
        """Recall from tape every file the stager does not hold on disk, then wait (polling
        stager_qry) until all are STAGED, or fail naming those still on tape."""
        if not paths:
            return
        states = self.stager_states(paths)
        waiting = [p for p in paths if states[p] not in _ONLINE_STATES]
        if not waiting:
            return
        self._stager("stage_get", [p for p in waiting if states[p] != "STAGEIN"])

        def still_offline(pending: list[str]) -> list[str]:
            states = self.stager_states(pending)
            invalid = [p for p in pending if states.get(p) == "INVALID"]
            if invalid:
                raise StorageError(f"the stager reports INVALID for {self._where(invalid[0])}"
                                   + (f" and {len(invalid) - 1} more" if len(invalid) > 1 else ""),
                                   path=invalid[0])
            return [p for p in pending if states.get(p) not in _ONLINE_STATES]

        wait_for_staging(waiting, still_offline, timeout_s, self.stage_poll, self._where)

    def stager_states(self, paths: list[str]) -> dict[str, str | None]:
        """{path: STAGEIN/STAGED/STAGEOUT/CANBEMIGR/INVALID, or None if the stager has no
        disk copy} from stager_qry."""
        states: dict[str, str | None] = {}
        by_abs = {self._abs(p): p for p in paths}
        for batch in _batches(list(by_abs)):
            out = self._run("stage_query", self._where(""), paths=batch)
            found = parse_stager_qry(out.stdout)
            if out.returncode not in (0, 1) or (out.returncode and not found.states
                                                 and not found.errors):
                raise self._fail(out, "cannot query the stager about files in", self._where(""))
            for absolute in batch:
                states[by_abs[absolute]] = found.states.get(absolute)
        return states

    def _stager(self, tool: str, paths: list[str]) -> None:
        """stager_get / stager_put: a SUBREQUEST_FAILED line fails its file by name."""
        by_abs = {self._abs(p): p for p in paths}
        for batch in _batches(list(by_abs)):
            out = self._run(tool, self._where(""), paths=batch)
            result = parse_stager_request(out.stdout)
            if result.failed:
                absolute, (code, message) = next(iter(result.failed.items()))
                error = TransientStorageError if code in _BUSY_ERRNOS else StorageError
                raise error(f"{self.tools[tool].split()[0]} refused {self._where(by_abs.get(absolute, absolute))}: "
                            f"{message} (errno {code})", path=by_abs.get(absolute, absolute))
            if out.returncode != 0:
                raise self._fail(out, f"{tool.replace('_', ' ')} failed for files in",
                                 self._where(""))


_BUSY_ERRNOS = {11, 16}   # EAGAIN, EBUSY ("Another prepareToPut is ongoing for this file")


def _batches(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), _STAGER_BATCH):
        yield items[i:i + _STAGER_BATCH]


# -- the tools' outputs ------------------------------------------------------------------

@dataclass
class ToolOutput:
    argv0: str
    returncode: int
    stdout: str
    stderr: str

    def reason(self) -> str:
        lines = [l.strip() for l in (self.stderr + "\n" + self.stdout).splitlines() if l.strip()]
        return lines[-1][:300] if lines else f"exit code {self.returncode}"

    @property
    def not_found(self) -> bool:
        text = f"{self.stderr}\n{self.stdout}".lower()
        return "no such file or directory" in text

    @property
    def transient(self) -> bool:
        text = f"{self.stderr}\n{self.stdout}".lower()
        return any(w in text for w in ("timed out", "timeout", "try again", "device or resource busy",
                                       "connection refused", "communication error"))


_NSLS = re.compile(
    r"^\s*(?:(?P<fileclass>\d+)\s+)?"
    r"(?P<mode>[-dlmD][-rwxsStT]{9})\s+"
    r"(?P<nlink>\d+)\s+(?P<owner>\S+)\s+(?P<group>\S+)\s+(?P<size>\d+)\s+"
    r"(?P<month>[A-Z][a-z]{2})\s+(?P<day>\d{1,2})\s+(?P<clock>\d{1,2}:\d{2}|\d{4})"
    r"(?:\s+(?P<cstype>AD|PA|CS|MD)\s+(?P<csum>[0-9a-fA-F]+))?"
    r" (?P<name>.*)$", re.S)
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_KINDS = {"-": FILE, "m": FILE, "d": DIR, "l": LINK, "D": None}


@dataclass
class NslsEntry:
    """One line of `nsls -l --class --checksum`."""

    name: str
    kind: str | None          # FILE, DIR, LINK; None for a logically deleted entry ('D')
    mode: int
    size: int
    mtime_ns: int | None      # to the minute; None when nsls shows only the year
    owner: str
    group: str
    file_class: int | None
    adler32: str | None
    migrated: bool            # 'm': on tape, its disk copy may be gone
    link_target: str | None = None

    def to_stat(self, path: str) -> Stat:
        return Stat(path, self.kind, 0 if self.kind == DIR else self.size, self.mtime_ns,
                    self.mode, self.link_target,
                    {"adler32": self.adler32} if self.adler32 else None,
                    online=None if self.kind != FILE else not self.migrated)


def parse_nsls_line(line: str, now: datetime | None = None) -> NslsEntry | None:
    """Parse one `nsls -l` line; None for a line that is not an entry (blank, a header)."""
    m = _NSLS.match(line.rstrip("\n"))
    if not m:
        return None
    mode_text = m["mode"]
    kind = _KINDS[mode_text[0]]
    name, target = m["name"], None
    if kind == LINK and " -> " in name:
        name, target = name.split(" -> ", 1)
    adler = None
    if m["cstype"] in ("AD", "PA") and m["csum"]:
        adler = normalise("adler32", m["csum"])
    return NslsEntry(
        name=name, kind=kind, mode=_permission_bits(mode_text[1:]), size=int(m["size"]),
        mtime_ns=_nsls_mtime(m["month"], int(m["day"]), m["clock"], now or datetime.now()),
        owner=m["owner"], group=m["group"],
        file_class=int(m["fileclass"]) if m["fileclass"] else None, adler32=adler,
        migrated=mode_text[0] == "m", link_target=target)


def _nsls_mtime(month: str, day: int, clock: str, now: datetime) -> int | None:
    """'Nov 02 14:07' (recent: this year, or last year if that is in the future) to epoch
    ns, in local time as nsls prints it; 'Jun 13 2017' (older: only the day) to None."""
    if ":" not in clock:
        return None
    hour, minute = (int(x) for x in clock.split(":"))
    try:
        when = datetime(now.year, _MONTHS[month], day, hour, minute)
        if (when - now).days > 1:   # nsls shows the year for anything not recent
            when = when.replace(year=now.year - 1)
    except (KeyError, ValueError):
        return None
    return int(when.timestamp()) * 1_000_000_000


def _permission_bits(text: str) -> int:
    """'rwxr-s--T' -> 0o3750 (the nine characters after the type)."""
    bits = 0
    for i, ch in enumerate(text[:9]):
        if ch in "rwxsStT" and ch not in "ST":
            bits |= 1 << (8 - i)
    specials = {2: 0o4000, 5: 0o2000, 8: 0o1000}
    for i, bit in specials.items():
        if text[i:i + 1] in ("s", "S", "t", "T"):
            bits |= bit
    return bits


def parse_rfstat(text: str) -> dict[str, str]:
    """`key : value` lines of rfstat into a dict (keys as printed, e.g. 'Last modify')."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip()] = value.strip()
    return fields


def rfstat_mtime_ns(fields: dict[str, str]) -> int | None:
    """'Last modify : Tue Jun 13 12:44:10 2017' (local time) to epoch ns."""
    value = fields.get("Last modify")
    if not value:
        return None
    try:
        return int(datetime.strptime(value, "%a %b %d %H:%M:%S %Y").timestamp()) * 1_000_000_000
    except ValueError:
        return None


@dataclass
class StagerQuery:
    states: dict[str, str]                 # absolute path -> state
    errors: list[tuple[int, str]]          # (code, message) of "Error <code>/<message>"


_STAGER_STATE = re.compile(r"^(?P<path>/.*?)\s+(?P<fileid>\d+@\S+)\s+"
                           r"(?P<state>STAGEIN|STAGED|STAGEOUT|CANBEMIGR|INVALID)\s*$")
_STAGER_ERROR = re.compile(r"^Error\s+(?P<code>\d+)\s*/\s*(?P<message>.*)$")


def parse_stager_qry(text: str) -> StagerQuery:
    """`stager_qry -M` output: '<path> <fileid>@<ns host> <STATE>' lines, and
    'Error <code>/<message>' lines."""
    result = StagerQuery({}, [])
    for line in text.splitlines():
        if m := _STAGER_STATE.match(line):
            result.states[m["path"]] = m["state"]
        elif m := _STAGER_ERROR.match(line.strip()):
            result.errors.append((int(m["code"]), m["message"].strip()))
    return result


@dataclass
class StagerRequest:
    ready: list[str]
    failed: dict[str, tuple[int, str]]     # path -> (errno, message)
    request_id: str | None


_SUBREQUEST = re.compile(r"^(?P<path>/.*?)\s+SUBREQUEST_(?P<what>READY|FAILED)"
                         r"(?:\s+(?P<code>\d+)\s*(?P<message>.*))?$")


def parse_stager_request(text: str) -> StagerRequest:
    """`stager_get`/`stager_put` output: per-file SUBREQUEST_READY / SUBREQUEST_FAILED lines
    and the final 'Stager request ID: <uuid>'."""
    result = StagerRequest([], {}, None)
    for line in text.splitlines():
        line = line.rstrip()
        if m := _SUBREQUEST.match(line):
            if m["what"] == "READY":
                result.ready.append(m["path"])
            else:
                result.failed[m["path"]] = (int(m["code"] or 0), (m["message"] or "").strip())
        elif line.startswith("Stager request ID:"):
            result.request_id = line.split(":", 1)[1].strip()
    return result


# -- streaming through xrdcp ------------------------------------------------------------------

class _ToolStream(WriteStream):
    """A read or write stream through a child process's stdout or stdin (xrdcp to or from
    '-'), in bounded memory. close() (the commit) waits for the process and raises unless
    it succeeded, so a failed transfer is never taken for a complete one; an abort (a
    `with` block left on an error) kills it. Reads share the life cycle: a clean close
    of an abandoned read stops it too. A watchdog kills a transfer that outlives
    transfer_timeout."""

    def __init__(self, argv: list[str], direction: str, where: str, env: dict, timeout_s: float,
                 discard=None):
        self._where, self._direction, self._argv0 = where, direction, argv[0]
        self._discard = discard
        self._stderr = tempfile.TemporaryFile()
        pipes = ({"stdout": subprocess.PIPE, "stdin": subprocess.DEVNULL} if direction == "read"
                 else {"stdin": subprocess.PIPE, "stdout": subprocess.DEVNULL})
        try:
            self._proc = subprocess.Popen(argv, stderr=self._stderr, env=env, **pipes)
        except FileNotFoundError:
            self._stderr.close()
            raise BackendUnavailable(f"CASTOR command {argv[0]!r} (tools.{direction}) is not "
                                     "installed or not on PATH") from None
        self._timed_out = False
        self._watchdog = threading.Timer(timeout_s, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._timeout_s = timeout_s

    def _kill(self) -> None:
        self._timed_out = True
        self._proc.kill()

    def read(self, size: int = -1) -> bytes:
        data = self._proc.stdout.read(size) if size and size > 0 else self._proc.stdout.read()
        if not data:
            self._finish()
        return data

    def _write(self, data) -> int:
        try:
            self._proc.stdin.write(data)
        except BrokenPipeError:
            self._finish()   # raises with the tool's own reason
            raise StorageError(f"cannot write {self._where}: {self._argv0} stopped reading",
                               path=self._where) from None
        return memoryview(data).nbytes

    def _finish(self) -> None:
        """Wait for the process; raise if it did not succeed."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        code = proc.wait()
        self._watchdog.cancel()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()
        if code == 0:
            return
        self._stderr.seek(0)
        lines = [l.strip() for l in os.fsdecode(self._stderr.read()).splitlines() if l.strip()]
        reason = lines[-1][:300] if lines else f"exit code {code}"
        verb = "read" if self._direction == "read" else "write"
        if self._timed_out:
            raise TransientStorageError(f"cannot {verb} {self._where}: {self._argv0} took "
                                        f"longer than {self._timeout_s:g} s", path=self._where)
        error = NotFound if "no such file" in reason.lower() else TransientStorageError
        raise error(f"cannot {verb} {self._where}: {self._argv0} failed: {reason}",
                    path=self._where)

    def _commit(self) -> None:
        try:
            if self._proc.returncode is None:
                if self._direction == "read" and self._proc.stdout and not self._proc.stdout.closed:
                    self._proc.stdout.close()   # an abandoned read: stop the transfer
                    self._proc.kill()
                    self._proc.wait()
                    self._watchdog.cancel()
                else:
                    self._finish()
        finally:
            self._stderr.close()

    def _abort(self) -> None:
        """The copy failed: stop the transfer; the original error is what matters."""
        if self._proc.returncode is None:
            self._proc.kill()
            self._proc.wait()
        self._watchdog.cancel()
        self._stderr.close()
        if self._discard is not None:
            self._discard()
