"""Progress lines on a terminal: files, bytes, rate and ETA; silent when not a terminal."""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, ClassVar


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


class Progress:
    """Thread-safe counters shown as one refreshing line on stderr while enabled."""

    # A process-wide watcher of every Progress, called with snapshot() about once a second
    # and at close: a run started from the web view records its counters in the catalog
    # this way, for its page (castlib/web/runner.py). None: nobody watches.
    observer: ClassVar[Callable[[dict], None] | None] = None
    OBSERVE_EVERY_S = 1.0

    def __init__(self, label: str, total_files: int = 0, total_bytes: int = 0,
                 enabled: bool = False, stream=None):
        self.label, self.total_files, self.total_bytes = label, total_files, total_bytes
        self.files = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        self._observer = Progress.observer
        self._observed = 0.0
        if enabled or self._observer is not None:
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
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = self.bytes / elapsed
        eta = (max(self.total_bytes - self.bytes, 0) / rate
               if self.total_bytes and rate > 0 else None)
        return {"label": self.label, "files": self.files, "total_files": self.total_files,
                "bytes": self.bytes, "total_bytes": self.total_bytes,
                "elapsed_s": round(elapsed, 3), "rate": rate, "eta_s": eta}

    def _observe(self) -> None:
        try:
            self._observer(self.snapshot())
        except Exception:   # a watcher's failure never stops the work it watches
            pass

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            if self._enabled:
                self._render()
            if self._observer is not None and (
                    time.monotonic() - self._observed >= self.OBSERVE_EVERY_S):
                self._observed = time.monotonic()
                self._observe()

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
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._enabled:
                self._render(final=True)
            if self._observer is not None:
                self._observe()
            self._thread = None
