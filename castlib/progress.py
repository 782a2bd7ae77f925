"""Progress of a run: one refreshing line on a terminal (files, bytes, rate and ETA; silent
when not a terminal), and the run's live record in the catalog (RunBeat), which the web
view, the API and a client waiting on a worker read."""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


class Progress:
    """Thread-safe counters shown as one refreshing line on stderr while enabled."""

    def __init__(self, label: str, total_files: int = 0, total_bytes: int = 0,
                 enabled: bool = False, stream=None):
        self.label, self.total_files, self.total_bytes = label, total_files, total_bytes
        self.files = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._start = time.monotonic()
        self._end: float | None = None   # set by close(): the rate and elapsed stay put
        self._stop = threading.Event()
        self._thread = None
        if enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def add_file(self, n: int = 1) -> None:
        with self._lock:
            self.files += n

    def snapshot(self) -> dict:
        """The counters now: files, bytes (of their totals where known), rate, ETA."""
        elapsed = max((self._end or time.monotonic()) - self._start, 1e-6)
        rate = self.bytes / elapsed
        eta = (max(self.total_bytes - self.bytes, 0) / rate
               if self.total_bytes and rate > 0 else None)
        return {"label": self.label, "files": self.files, "total_files": self.total_files,
                "bytes": self.bytes, "total_bytes": self.total_bytes,
                "elapsed_s": round(elapsed, 3), "rate": rate, "eta_s": eta}

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self._render()

    def _render(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = self.bytes / elapsed
        parts = [f"{self.label}: {self.files}"
                 + (f"/{self.total_files}" if self.total_files else "") + " files"]
        if self.total_bytes or self.bytes:
            parts.append(human_bytes(self.bytes)
                         + (f"/{human_bytes(self.total_bytes)}" if self.total_bytes else ""))
            parts.append(f"{human_bytes(rate)}/s")
            if self.total_bytes and rate > 0 and not final:
                eta = max(self.total_bytes - self.bytes, 0) / rate
                parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        self._stream.write("\r\033[K" + ", ".join(parts) + ("\n" if final else ""))
        self._stream.flush()

    def close(self) -> None:
        if self._end is None:
            self._end = time.monotonic()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._render(final=True)
            self._thread = None


class RunBeat:
    """The live record of a run in the catalog, kept by every run wherever it runs (the
    command line, the web view's child process, a worker): a thread that writes, about
    once a second, the heartbeat and the counters of the stage running now
    (Progress.snapshot of `current()`) into the run's record (Catalog.heartbeat), and a
    last time when the run's stages end, so the record keeps the final counters.

    The heartbeat tells other hosts the run is alive (Catalog.mark_dead_runs); the
    record's `cancel_requested`, read back on each beat, calls `on_cancel` once (a worker
    stops its run cleanly that way). A failed write is tried again on the next beat: the
    record of the work never stops the work."""

    EVERY_S = 1.0

    def __init__(self, catalog, run_id: int, current: Callable[[], Progress | None],
                 on_cancel: Callable[[], None] | None = None):
        from .catalog.records import heartbeat_limit_s

        self.catalog, self.run_id, self.current, self.on_cancel = (
            catalog, run_id, current, on_cancel)
        # several beats within the time after which a silent run counts as died
        self.every_s = min(self.EVERY_S, heartbeat_limit_s() / 4)
        self._stop = threading.Event()
        self._cancelled = False
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"castlib-beat-{run_id}")

    def __enter__(self) -> "RunBeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.beat()   # the final counters, before the run's end is recorded

    @property
    def cancelled(self) -> bool:
        """Whether `on_cancel` was called: a stop that follows is the cancel's."""
        return self._cancelled

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def beat(self) -> None:
        progress = self.current()
        try:
            cancel = self.catalog.heartbeat(
                self.run_id, progress.snapshot() if progress is not None else None)
        except Exception as exc:   # a catalog hiccup: the next beat tries again
            log.debug("run %s: heartbeat failed: %s", self.run_id, exc)
            return
        if cancel and not self._cancelled and self.on_cancel is not None:
            self._cancelled = True
            self.on_cancel()
