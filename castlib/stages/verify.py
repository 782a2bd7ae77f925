"""verify: re-read a location and report every file whose bytes no longer match the catalog."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..backends.base import FILE
from ..catalog.paths import from_catalog
from ..errors import ConfigError, LocationMissing, StorageError
from .base import ChecksumName, LazyParams, Stage, StageOutcome

# What verify can find, worst first
PROBLEMS = ("corrupted", "missing", "changed", "unreadable")


def _params():
    """The pydantic model of the parameters, built on first use (Stage.Params)."""
    from pydantic import Field

    from .base import StageParams

    class VerifyParams(StageParams):
        location: str = Field(description="location name or URL to re-read")
        checksum: ChecksumName = Field("adler32", description="checksum algorithm to compare")
        prefix: str = Field("", description="only verify below this relative folder")
        workers: int = Field(4, ge=1, le=64, description="files read in parallel")

    return VerifyParams


@dataclass
class Problem:
    path: str
    kind: str        # one of PROBLEMS
    detail: str

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "detail": self.detail}


@dataclass
class VerifyResult:
    location: str
    problems: list[Problem] = field(default_factory=list)


class VerifyStage(Stage):
    name = "verify"
    description = "re-read files and compare their checksums with the catalog (bit-rot, tampering)"
    Params = LazyParams(_params)
    location_params = ("location",)

    @classmethod
    def connects_to(cls, params, earlier: dict) -> list[str]:
        return [params.location]

    def run(self) -> StageOutcome:
        p: VerifyParams = self.params
        ctx = self.context
        loc = ctx.resolve(p.location)
        if loc.record.indexed_at is None:
            raise ConfigError(f"location {loc.record.url} has never been indexed: there is "
                              "nothing to verify against (castlib index it first)",
                              key="location")
        backend = ctx.backend(loc)
        if not backend.root_exists():
            raise LocationMissing(f"location {loc.record.url} does not exist or cannot be "
                                  "reached", path="")
        algo = p.checksum
        entries = list(ctx.catalog.entries(loc.record.id, p.prefix, kind=FILE))
        if entries:   # its readers, and the run's thread
            backend.sessions_needed(min(p.workers, len(entries)) + 1)
        result = VerifyResult(loc.record.url)
        counts = {"files": len(entries), "ok": 0, "baseline": 0, "bytes": 0,
                  **dict.fromkeys(PROBLEMS, 0)}
        baseline: list[tuple[str, str]] = []
        # what this run found, recorded on the entries: a sync replaces a corrupted
        # destination file and never copies a corrupted reference (see make_plan)
        found_rotten: list[tuple[str, int, int]] = []   # (path, size, mtime_ns) as read
        found_sound: list[str] = []    # marked earlier, its bytes match again
        progress = ctx.progress(f"verify {loc.name or loc.record.url}", len(entries),
                                sum(e["size"] or 0 for e in entries))

        def check(entry):
            path = from_catalog(entry["path"])
            try:
                st = backend.stat(path)
                if st is None or st.kind != FILE:
                    return entry, "missing", "no longer exists", None
                if st.size != entry["size"] or st.mtime_ns != entry["mtime_ns"]:
                    return entry, "changed", (f"size {entry['size']} -> {st.size}, mtime "
                                              f"changed: modified since indexed"), None
                value = backend.checksum(path, algo)
                progress.add_bytes(st.size or 0)
                return entry, None, None, value
            except StorageError as exc:
                return entry, "unreadable", str(exc), None
            finally:
                progress.add_file()

        try:
            with ThreadPoolExecutor(max_workers=p.workers) as pool:
                for entry, problem, detail, value in pool.map(check, entries):
                    if problem is None:
                        counts["bytes"] += entry["size"] or 0
                        known = entry[algo]
                        if known is None and entry["corrupted"]:   # no checksum of this
                            problem = "corrupted"           # algorithm to clear it with
                            detail = (f"found corrupted earlier; the catalog has no {algo} "
                                      "to check it against (verify with the checksum that "
                                      "found it)")
                        elif known is None:
                            baseline.append((entry["path"], value))
                            counts["baseline"] += 1
                            continue
                        elif known == value:
                            counts["ok"] += 1
                            if entry["corrupted"]:
                                found_sound.append(entry["path"])
                            continue
                        else:
                            problem = "corrupted"
                            detail = (f"{algo} is {value}, catalog has {known}, with size "
                                      "and mtime unchanged")
                            if not entry["corrupted"]:
                                found_rotten.append((entry["path"], entry["size"],
                                                     entry["mtime_ns"]))
                    counts[problem] += 1
                    result.problems.append(Problem(entry["path"], problem, detail))
        finally:
            progress.close()
        # baseline: first verification of these files, their checksums become the reference
        ctx.catalog.record_verify(loc.record.id, algo, baseline, found_rotten, found_sound)
        result.problems.sort(key=lambda pr: (PROBLEMS.index(pr.kind), pr.path))
        bad = len(result.problems)
        summary = (f"verified {loc.name or loc.record.url}: {counts['ok']} ok, "
                   + ", ".join(f"{counts[k]} {k}" for k in PROBLEMS)
                   + (f", {counts['baseline']} checksummed for the first time" if baseline else ""))
        errors = [f"{pr.path}: {pr.kind}: {pr.detail}" for pr in result.problems]
        return StageOutcome(counts, errors, result, summary, 1 if bad else 0)
