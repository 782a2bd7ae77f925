"""http-push: send a location's entries, or a diff's, to an HTTP service (a catalogue, a
data-management system such as Rucio), in batches, with retries; each run sends only what
changed since the last one that succeeded (the state is kept in the catalog).

    - http-push: {location: archive, url: "https://dm.example.org/api/replicas"}
    - http-push: {from: plan, url: "https://dm.example.org/api/differences"}
    - http-push: {location: archive, url: "https://rucio.example.org/replicas",
                  format: rucio, rse: CERN-ARCHIVE, scope: na64}

The bearer token comes from the user's configuration, never from the pipeline (which is
kept in the run record): the `storage` entry whose key is the longest prefix of the URL,
with `token:` (or `token_file:`), as back-end options are found for locations.
"""
from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Iterable, Iterator, Literal

from pydantic import Field, model_validator

from ..catalog.records import JSON_TYPES
from ..catalog.export import adler32_hex, entry_document, iso
from ..catalog.settings import get_setting, set_setting
from ..errors import StorageError, TransientStorageError
from ..location import redact
from ..transfer import with_retries
from .base import Stage, StageOutcome, StageParams
from .diff import DiffResult


class HttpPushParams(StageParams):
    location: str | None = Field(None, description="location whose entries are sent")
    from_: str | None = Field(None, alias="from",
                              description="id of an earlier diff whose differences are sent "
                                          "(instead of location)")
    url: str = Field(description="http(s) URL the batches are POSTed to")
    format: Literal["ndjson", "rucio"] = Field(
        "ndjson", description="ndjson: one entry a line (application/x-ndjson); rucio: "
                              "{rse, files: [{name, bytes, adler32}]} as JSON")
    rse: str | None = Field(None, description="rucio: the RSE name (default: the location's "
                                              "name)")
    scope: str | None = Field(None, description="rucio: the scope given with each file")
    batch: int = Field(1000, ge=1, le=100_000, description="entries per request")
    retries: int = Field(3, ge=0, le=20, description="retries of a failed request "
                                                     "(connection, 5xx, 429), with backoff")
    timeout: float = Field(60, gt=0, description="seconds to wait for an answer")
    full: bool = Field(False, description="send every entry, not only those changed since "
                                          "the last push")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.location is None) == (self.from_ is None):
            raise ValueError("give either 'location' or 'from'")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url must be an http:// or https:// URL")
        return self


class HttpPushStage(Stage):
    name = "http-push"
    description = "send a location's entries (or a diff's) to an HTTP service, in batches"
    Params = HttpPushParams
    location_params = ("location",)
    reads_results = {"from_": ("diff",)}

    def run(self) -> StageOutcome:
        p, ctx = self.params, self.context
        headers = {"User-Agent": "castlib http-push"}
        token = _token_for(p.url, ctx.user_config.storage)
        if token:
            ctx.secrets.add(token)
            headers["Authorization"] = f"Bearer {token}"
        counts = {"sent": 0, "batches": 0, "failed_batches": 0}
        state_key = new_state = None
        if p.location is not None:
            loc = ctx.resolve(p.location)
            rse = p.rse or loc.name or loc.record.url
            # one state per location and service (settings names are at most 64 long)
            state_key = (f"http-push:{loc.record.id}:"
                         f"{hashlib.sha256(p.url.encode()).hexdigest()[:32]}")
            since = None if p.full else get_setting(ctx.catalog, state_key)
            # what the last finished listing wrote is sent now; a listing still going
            # writes later times and is sent (again, at worst) next time
            new_state = iso(loc.record.indexed_at)
            entries = ctx.catalog.entries_by_key(
                loc.record.id, updated_after=datetime.fromisoformat(since.replace("Z", "+00:00"))
                if since else None)
            docs = ({**entry_document(e), "location": loc.record.url} for e in entries)
        else:
            diff = ctx.result(p.from_, DiffResult)
            rse = p.rse or diff.dst.name or diff.dst.record.url
            docs = _difference_documents(diff)
        if ctx.dry_run:
            n = sum(1 for _ in docs)
            return StageOutcome({"would_send": n}, [], None,
                                f"http-push: would send {n} entries to {redact(p.url)}")
        errors: list[str] = []
        for batch in _batches(docs, p.batch):
            body, ctype = _encode(batch, p.format, rse, p.scope)
            try:
                with_retries(lambda: _post(p.url, body, ctype, headers, p.timeout),
                             retries=p.retries, backoff_s=ctx.retry_backoff_s,
                             describe=f"http-push to {redact(p.url)}")
            except StorageError as exc:
                counts["failed_batches"] += 1
                errors.append(redact(f"{redact(p.url)}: {exc}", ctx.secrets))
                break   # the state stays: the next run sends all of this again
            counts["batches"] += 1
            counts["sent"] += len(batch)
        if not errors and state_key and new_state:
            set_setting(ctx.catalog, state_key, new_state)
        summary = (f"http-push: sent {counts['sent']} entries in {counts['batches']} "
                   f"requests to {redact(p.url)}"
                   + (f"; stopped: {errors[0]}" if errors else ""))
        return StageOutcome(counts, errors, None, summary, 1 if errors else 0)


def _token_for(url: str, storage: dict) -> str | None:
    """The token of the configuration's `storage` entry that is the longest prefix of url."""
    best, best_len = None, -1
    for prefix, options in storage.items():
        key = str(prefix).rstrip("/")
        if (url == key or url.startswith(key + "/")) and len(key) > best_len:
            best, best_len = options or {}, len(key)
    if not best:
        return None
    if best.get("token"):
        return str(best["token"])
    if best.get("token_file"):
        import os

        from ..token_file import read_token_file

        # checked as `castlib web`'s: a token others may read is a token others may use
        return read_token_file(os.path.expanduser(str(best["token_file"])), "castlib")
    return None


def _difference_documents(diff: DiffResult) -> Iterator[dict]:
    for d in diff.differences:
        side, where = (d.dst, diff.dst) if d.kind == "extra" else (d.ref, diff.ref)
        yield {"path": d.path, "difference": d.kind,
               "kind": JSON_TYPES.get(side.kind, side.kind),
               "size": side.size,
               "mtime_ns": side.mtime_ns,
               "adler32": adler32_hex(side.checksum) if diff.algorithm == "adler32" else None,
               "location": where.record.url}


def _batches(docs: Iterable[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(batch: list[dict], fmt: str, rse: str, scope: str | None) -> tuple[bytes, str]:
    if fmt == "rucio":
        files = [{"name": d["path"], "bytes": d["size"], "adler32": d.get("adler32"),
                  **({"scope": scope} if scope else {})}
                 for d in batch if d["kind"] == "file" and not d.get("deleted")]
        return json.dumps({"rse": rse, "files": files}).encode(), "application/json"
    return "".join(json.dumps(d) + "\n" for d in batch).encode(), "application/x-ndjson"


def _post(url: str, body: bytes, ctype: str, headers: dict, timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={**headers, "Content-Type": ctype})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        said = exc.read(300).decode("utf-8", "replace").strip().splitlines()
        message = f"HTTP {exc.code} {exc.reason}" + (f": {said[0]}" if said else "")
        if exc.code >= 500 or exc.code in (408, 429):
            raise TransientStorageError(message) from None
        raise StorageError(message) from None
    except (urllib.error.URLError, OSError) as exc:   # refused, reset, timed out
        reason = getattr(exc, "reason", exc)
        raise TransientStorageError(f"cannot reach the service: {reason}") from None
