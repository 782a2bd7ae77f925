"""What the catalog hands out and takes: records, sides and differences, the row layout of
a new entry. Plain Python, no database library: the lean SQLite path (catalog.lite) and the
general SQLAlchemy one (catalog.catalog) share them."""
from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import NamedTuple

from ..backends.base import DIR, KIND_NAMES
from ..hosts import process_alive

CHECKSUM_COLUMNS = ("adler32", "md5", "sha256")

# per location, in the settings table: a token that changes with every write of its
# entries, and the overview's counts with the token they were counted at (Catalog.
# location_overview): counts whose token is not the location's current one are recounted
WRITES_KEY, COUNTS_KEY = "location_writes:", "location_counts:"

BATCH = 20_000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class LocationRecord:
    id: int
    url: str
    name: str | None
    indexed_at: datetime | None


class IndexedEntry(NamedTuple):
    """An entry as the index stage needs it to decide what changed."""

    id: int
    kind: str
    size: int | None
    mtime_ns: int | None
    mode: int | None
    link_target: str | None
    deleted: bool
    adler32: str | None
    md5: str | None
    sha256: str | None
    corrupted: bool = False   # verify found its bytes other than its checksum says

    def checksum(self, algo: str) -> str | None:
        return getattr(self, algo)


class Side(NamedTuple):
    """One side of a difference, as the catalog has it."""

    kind: str
    size: int | None
    mtime_ns: int | None
    checksum: str | None
    link_target: str | None
    mode: int | None
    corrupted: bool = False   # verify found its bytes other than its checksum says


class Difference(NamedTuple):
    """One path that differs between a reference and a destination location."""

    path: str           # catalog form (see catalog.paths)
    kind: str           # missing, extra, type, size, checksum, corrupted, mtime, mode
    ref: Side | None
    dst: Side | None

    def as_dict(self) -> dict:
        out = {"path": self.path, "kind": self.kind}
        for label, side in (("ref", self.ref), ("dst", self.dst)):
            if side is not None:
                out[label] = {"type": _JSON_TYPES[side.kind],
                              "size": side.size, "mtime_ns": side.mtime_ns,
                              "checksum": side.checksum, "mode": _octal(side.mode)}
                if side.corrupted:
                    out[label]["corrupted"] = True
        return out


# what --json calls each kind: a folder is "dir" there, as it always was (scripts parse it);
# messages say "folder" (KIND_NAMES)
_JSON_TYPES = {**KIND_NAMES, DIR: "dir"}
JSON_TYPES = _JSON_TYPES   # the web API and http-push say kinds as --json does


def _octal(mode: int | None) -> str | None:
    return None if mode is None else f"{mode:04o}"


# "corrupted": a file verify found rotten on either side (the catalog's checksums agree,
# the bytes do not); above mtime, whose fix would keep the rotten bytes.
# `mode`: the permission bits of a file or folder (links have none worth the name on POSIX)
DIFFERENCE_KINDS = ("missing", "extra", "type", "size", "checksum", "corrupted", "mtime", "mode")
INSERT_COLUMNS = ("location_id", "path", "name", "kind", "size", "mtime_ns", "mode", "link_target",
                  "adler32", "md5", "sha256", "online", "first_seen", "last_seen", "deleted")


def _classify(ref: Side, dst: Side | None, tol: int | None, kinds: set[str]) -> str | None:
    if dst is None:
        return "missing" if "missing" in kinds else None
    if ref.kind != dst.kind:
        return "type" if "type" in kinds else None
    if ref.kind == "l":
        same = (ref.link_target or "") == (dst.link_target or "")
        return None if same or "type" not in kinds else "type"
    if ref.kind == "f":
        if "size" in kinds and ref.size != dst.size:
            return "size"
        if ("checksum" in kinds and ref.checksum and dst.checksum
                and ref.checksum != dst.checksum):
            return "checksum"
        if "corrupted" in kinds and (ref.corrupted or dst.corrupted):
            return "corrupted"
        if ("mtime" in kinds and tol is not None and ref.mtime_ns is not None
                and dst.mtime_ns is not None and abs(ref.mtime_ns - dst.mtime_ns) > tol):
            return "mtime"
    if ("mode" in kinds and ref.mode is not None and dst.mode is not None
            and ref.mode != dst.mode):
        return "mode"
    return None


def _drifted(ref: Side, dst: Side, kinds, tol: int) -> bool:
    """Whether two live entries at one path are what mtime_drift reports: a folder or link
    (of `kinds`) alike on both sides but for an mtime more than `tol` apart."""
    return (ref.kind == dst.kind and ref.kind in kinds
            and (ref.link_target or "") == (dst.link_target or "")
            and ref.mtime_ns is not None and dst.mtime_ns is not None
            and abs(ref.mtime_ns - dst.mtime_ns) > tol)


def _process_started_at(pid: int) -> datetime | None:
    """When process `pid` of this machine started (Linux: /proc/PID/stat's start time in
    ticks after boot, and /proc/stat's boot time), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()   # after the name, whatever it holds
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        ticks = int(fields[19])   # field 22 of the line; the name was field 2
        return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# how much later than a run's last sign of life its pid's process may seem to have started
# and still be the run's: /proc/stat's boot time is in whole seconds, and it moves a little
# as the clock is adjusted
STARTED_AFTER_SLACK_S = 5.0


def _pid_reused(pid: int, last: datetime | None, now: datetime) -> bool:
    """Whether the live process `pid` started after the run's last sign of life, so is not
    the run's process but a later one given the same number (after a reboot, or pids
    wrapping round): the run's own process beat while it lived. A start after now tells
    nothing: the boot time is not the one the start is counted from (a container's
    /proc/stat virtualised, as lxcfs 2.0.x did)."""
    started = _process_started_at(pid)
    return (started is not None and last is not None
            and (started - _aware(last)).total_seconds() > STARTED_AFTER_SLACK_S
            and (started - _aware(now)).total_seconds() <= STARTED_AFTER_SLACK_S)


def _username() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return None


def heartbeat_limit_s() -> float:
    """How old the last heartbeat of another host's run may be before the run counts as
    died: many beats (progress.RunBeat) missed, not one slow commit.
    $CASTLIB_HEARTBEAT_LIMIT sets it."""
    try:
        return float(os.environ.get("CASTLIB_HEARTBEAT_LIMIT", "") or 120)
    except ValueError:
        return 120.0


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


# how long a run of this host (by name) whose process is gone may have been silent and
# still be some other process's: a few beats (progress.RunBeat: about one a second)
SAME_NAME_GRACE_S = 10.0


def run_seems_dead(hostname: str | None, pid: int | None, heartbeat_at: datetime | None,
                   started_at: datetime | None, host: str, now: datetime,
                   silent_here_is_dead: bool = False) -> bool:
    """Whether a run still 'running' ended without saying so (killed, its machine
    stopped). Its last sign of life is its last heartbeat, else its start.
    - Another host's run: no sign for heartbeat_limit_s().
    - A run of this host's name: its process gone, and no sign for a few beats (the
      smaller of SAME_NAME_GRACE_S and the limit). A process of another machine with the
      same name, or of another PID namespace (a container with the host's name), is no
      pid of this one, yet beats every second: it was marked died while it ran, and its
      waiting client failed. A process of this host that lives is alive however late its
      beats (stopped with Ctrl-Z, waiting for SQLite's write lock held by its own stage),
      unless `silent_here_is_dead` (the SQLite catalog's rule, as it always had it): then
      a beat older than the limit ends it too.
    - A pid of this host whose process started after the run's last sign of life is
      another process's (reused after a reboot, or numbers wrapping round): the run's
      process is gone. Before, on PostgreSQL such a run stayed 'running' for good."""
    last = heartbeat_at or started_at
    quiet = (now - _aware(last)).total_seconds() if last is not None else float("inf")
    if hostname != host:
        return quiet > heartbeat_limit_s()
    if not process_alive(pid) or _pid_reused(pid, last, now):
        return quiet > min(SAME_NAME_GRACE_S, heartbeat_limit_s())
    return (silent_here_is_dead and heartbeat_at is not None
            and (now - _aware(heartbeat_at)).total_seconds() > heartbeat_limit_s())


def fill_checksums(inserts: list[list], checksums: dict[str, dict[str, str]],
                   sum_at: dict[str, int], path_at: int) -> dict[str, dict[str, str]]:
    """The checksums of an index batch (algorithm -> {catalog path: value}) that belong to
    rows about to be inserted go into those rows (column `sum_at[algo]`, the row's path at
    `path_at`); what is left, checksums of entries already in the catalog, is returned to
    be written by path. Both index writers (lean and general) batch this way."""
    rest: dict[str, dict[str, str]] = {}
    for algo, values in checksums.items():
        if not values:
            continue
        values = dict(values)
        if inserts:
            at = sum_at[algo]
            for row in inserts:
                if row[path_at] in values:
                    row[at] = values.pop(row[path_at])
        rest[algo] = values
    return rest


def pair_conditions(kinds: set[str], algorithm: str, tolerance: int | None, drift: list[str],
                    *, bind, truth=lambda column: column) -> list[str]:
    """The SQL conditions on a reference row (r) paired with the destination's row at its
    path (d) under which the pair is a difference of `kinds` (type, size, checksum,
    corrupted, mtime, mode) or, for the kinds in `drift` ("d", "l"), a folder or link
    whose mtime moved: what _classify and _drifted then decide in Python, written once
    for both catalogs' compare(). `bind(name)` spells a parameter (tol, dtol) in the
    driver's style; `truth(column)` a boolean column's truth."""
    rc, dc = f"r.{algorithm}", f"d.{algorithm}"
    conds = []
    if "type" in kinds:
        conds.append("r.kind != d.kind")
    in_files = []
    if "size" in kinds:
        in_files.append("r.size != d.size")
    if "checksum" in kinds:   # NULL on either side: no difference (nor a true condition)
        in_files.append(f"{rc} != {dc}")
    if "corrupted" in kinds:
        in_files.append(f"{truth('r.corrupted')} OR {truth('d.corrupted')}")
    if "mtime" in kinds and tolerance is not None:
        in_files.append(f"abs(r.mtime_ns - d.mtime_ns) > {bind('tol')}")
    if in_files:
        conds.append(f"r.kind = 'f' AND d.kind = 'f' AND ({' OR '.join(in_files)})")
    if "type" in kinds:   # a link pointing elsewhere is a different kind of thing
        conds.append("r.kind = 'l' AND d.kind = 'l' AND "
                     "coalesce(r.link_target, '') != coalesce(d.link_target, '')")
    if "mode" in kinds:   # NULL (a side that does not know) compares as no difference
        conds.append("r.kind = d.kind AND r.kind != 'l' AND r.mode != d.mode")
    if drift:   # as mtime_drift
        conds.append(f"r.kind IN ({', '.join(repr(k) for k in drift)}) AND d.kind = r.kind "
                     "AND coalesce(r.link_target, '') = coalesce(d.link_target, '') "
                     f"AND abs(r.mtime_ns - d.mtime_ns) > {bind('dtol')}")
    return conds
