"""diff: compare a reference and a destination location in the catalog, in SQL."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Literal

from ..backends.base import DIR, LINK
from ..catalog import DIFFERENCE_KINDS, Difference
from ..filters import PathFilter
from ..options import Cli
from .base import ChecksumName, Globs, LazyParams, ResolvedLocation, Seconds, Stage, StageOutcome

DifferenceKind = Literal[DIFFERENCE_KINDS]  # type: ignore[valid-type]


def _params():
    """The pydantic model of the parameters, built on first use (Stage.Params)."""
    from pydantic import Field

    from .base import StageParams

    class DiffParams(StageParams):
        ref: str = Field(description="reference location (name or URL)")
        dst: str = Field(description="destination location (name or URL)")
        checksum: ChecksumName = Field(
            "adler32", description="checksum algorithm compared where both sides have one")
        mtime_tolerance: Seconds = Field(
            0.0, ge=0, description="seconds two mtimes may differ by (storage may keep minutes only)")
        kinds: Annotated[list[DifferenceKind], Cli(metavar="KIND")] = Field(default_factory=lambda: list(DIFFERENCE_KINDS),
                                            description="which kinds of difference to report")
        only: Globs | None = Field(None, description="globs of files to compare (default: "
                                       "those this run's index of the reference took)")
        ignore: Globs | None = Field(None, description="globs of entries to leave out on both "
                                         "sides (default: those this run's index of the reference "
                                         "left out)")
        perms: bool = Field(True, description="compare permission bits (kind mode) where the "
                            "destination keeps them, and set them as rsync -a does (false, "
                            "--no-perms: leave them out, as rsync --no-perms)")

    return DiffParams


@dataclass
class DiffResult:
    """The differences between two locations, as a later sync or report reads them."""

    ref: ResolvedLocation
    dst: ResolvedLocation
    algorithm: str
    mtime_tolerance_ns: int | None
    differences: list[Difference] = field(default_factory=list)
    perms: bool = False        # permission bits compared, and to be set by a sync
    # folders and links alike on both sides but for their mtime: not differences (a
    # folder's mtime moves with its content), but what a sync sets as rsync -a does
    mtimes_to_set: list[Difference] = field(default_factory=list)
    filter: PathFilter | None = None   # what the comparison left out (only/ignore)

    def counts(self) -> dict[str, int]:
        c = Counter(d.kind for d in self.differences)
        return {k: c.get(k, 0) for k in DIFFERENCE_KINDS}


def _inherited(ctx, ref, name: str) -> list[str]:
    listing = ctx.listing(ref)
    return list(getattr(listing, name)) if listing is not None else []


def effective_mtime_tolerance(user_s: float, ref_backend, dst_backend) -> int | None:
    """Mtimes are compared only where the destination can set them (a difference it could
    never fix is noise), and never finer than either side keeps them."""
    if not dst_backend.capabilities.set_mtime:
        return None
    precision = max(ref_backend.capabilities.mtime_precision_ns,
                    dst_backend.capabilities.mtime_precision_ns)
    return max(int(user_s * 1e9), precision - 1 if precision > 1 else 0)


class DiffStage(Stage):
    name = "diff"
    description = ("compare two locations from the catalog: missing, extra, type, size, checksum, "
                   "corrupted (found by verify), mtime, mode")
    Params = LazyParams(_params)
    location_params = ("ref", "dst")

    def run(self) -> StageOutcome:
        p: DiffParams = self.params
        ctx = self.context
        ref, dst = ctx.resolve(p.ref), ctx.resolve(p.dst)
        ref_backend, dst_backend = ctx.backend(ref), ctx.backend(dst)
        tolerance = effective_mtime_tolerance(p.mtime_tolerance, ref_backend, dst_backend)
        caps = dst_backend.capabilities
        perms = p.perms and caps.permissions   # a mode the destination cannot keep is noise
        result = DiffResult(ref, dst, p.checksum, tolerance, perms=perms)
        settable = [k for k, can in ((DIR, caps.dir_mtimes), (LINK, caps.link_mtimes)) if can]
        # the differences and the mtimes to set, in one pass over the two locations
        result.differences, result.mtimes_to_set = ctx.catalog.compare(
            ref.record.id, dst.record.id, algorithm=p.checksum,
            mtime_tolerance_ns=tolerance, kinds=[k for k in p.kinds if k != "mode" or perms],
            drift_kinds=settable if "mtime" in p.kinds else (),
            drift_tolerance_ns=tolerance or 0)
        flt = result.filter = self._filter(ref)
        if flt.active:   # left out of the comparison: neither copied nor deleted (rsync's --exclude)
            result.differences = [d for d in result.differences
                                  if flt.covers(d.path, (d.ref or d.dst).kind)]
            result.mtimes_to_set = [d for d in result.mtimes_to_set
                                    if flt.covers(d.path, d.ref.kind)]
        counts = result.counts()
        total = len(result.differences)
        detail = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        summary = (f"diff {ref.name or ref.record.url} -> {dst.name or dst.record.url}: "
                   + (f"{total} differences ({detail})" if total else "identical"))
        if result.mtimes_to_set:
            summary += (f"; {len(result.mtimes_to_set)} folder or link mtimes differ "
                        "(a sync sets them)")
        counts["total"] = total
        return StageOutcome(counts, [], result, summary)

    def _filter(self, ref: ResolvedLocation) -> PathFilter:
        """The diff's own globs, else those this run's index of the reference listed with:
        what the reference leaves out is left out of the comparison on both sides."""
        p, ctx = self.params, self.context
        only = p.only if p.only is not None else _inherited(ctx, ref, "only")
        ignore = p.ignore if p.ignore is not None else _inherited(ctx, ref, "ignore")
        return PathFilter(only, ignore)
