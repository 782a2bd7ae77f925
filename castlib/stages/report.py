"""report: write a diff's (or a verify's) result as text, JSON or CSV."""
from __future__ import annotations

import csv
import json
import os
import sys
from typing import Literal

from pydantic import Field

from ..catalog.paths import printable
from ..errors import ConfigError
from .base import Stage, StageOutcome, StageParams
from .diff import DiffResult
from .verify import VerifyResult


class ReportParams(StageParams):
    from_: str = Field(alias="from", description="id of the diff or verify stage to report")
    format: Literal["text", "json", "csv"] = Field("text", description="output format")
    out: str = Field("-", description="file to write (relative to the pipeline file), - for stdout")


# a diff as CSV (the report stage's and the web view's download)
DIFF_CSV_FIELDS = ["path", "kind", "ref_type", "ref_size", "ref_mtime_ns", "ref_checksum",
                   "ref_mode", "dst_type", "dst_size", "dst_mtime_ns", "dst_checksum",
                   "dst_mode", "ref_corrupted", "dst_corrupted"]   # true where verify found rot


def flat_difference(r: dict) -> dict:
    """A Difference.as_dict() as one CSV row of DIFF_CSV_FIELDS."""
    flat = {"path": r["path"], "kind": r["kind"]}
    for side in ("ref", "dst"):
        for k, v in (r.get(side) or {}).items():
            flat[f"{side}_{k}"] = v
    return flat


class ReportStage(Stage):
    name = "report"
    description = "write a diff's or a verify's result as text, JSON or CSV"
    Params = ReportParams
    reads_results = {"from_": ("diff", "verify")}
    file_params = ("out",)

    def run(self) -> StageOutcome:
        p: ReportParams = self.params
        ctx = self.context
        value = ctx.result(p.from_, (DiffResult, VerifyResult))
        rows = ([d.as_dict() for d in value.differences] if isinstance(value, DiffResult)
                else [pr.as_dict() for pr in value.problems])
        if p.out == "-":
            self._write(value, rows, p.format, ctx.out)
            where = "standard output"
        else:
            path = os.path.join(ctx.base_dir, os.path.expanduser(p.out))
            tmp = path + ".tmp"
            try:
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    self._write(value, rows, p.format, f)
                os.replace(tmp, path)
            except OSError as exc:
                raise ConfigError(f"cannot write report: {exc.strerror}: {path}", key="out") from None
            where = path
        return StageOutcome({"rows": len(rows)}, [], None,
                            f"report: {len(rows)} rows ({p.format}) to {where}")

    @staticmethod
    def _write(value, rows: list[dict], fmt: str, stream) -> None:
        if fmt == "json":
            if isinstance(value, DiffResult):
                doc = {"ref": value.ref.record.url, "dst": value.dst.record.url,
                       "checksum": value.algorithm, "counts": value.counts(), "differences": rows}
            else:
                doc = {"location": value.location, "problems": rows}
            json.dump(doc, stream, indent=1)
            stream.write("\n")
        elif fmt == "csv":
            if isinstance(value, DiffResult):
                writer = csv.DictWriter(stream, DIFF_CSV_FIELDS)
                writer.writeheader()
                for r in rows:
                    writer.writerow(flat_difference(r))
            else:
                writer = csv.DictWriter(stream, ["path", "kind", "detail"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            for r in rows:
                stream.write(f"{r['kind']:<9} {printable(r['path'])}\n")
        if stream is sys.stdout:
            stream.flush()
