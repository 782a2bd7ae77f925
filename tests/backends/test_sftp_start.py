"""The fixed cost of a command on SFTP (issue 9): what importing the back-end and asyncssh
costs, with the same outcome as the stock imports."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import cli_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="ctypes.util.find_library's processes are Linux's")

# what asyncssh found as it was imported, and which processes the import started
_PROBE = """
import json, subprocess, sys
{castlib}
started = []
popen = subprocess.Popen.__init__
def recording(self, args, *a, **k):
    started.append(args if isinstance(args, str) else args[0])
    return popen(self, args, *a, **k)
subprocess.Popen.__init__ = recording
import asyncssh
from asyncssh.crypto import pq, umac
import ctypes.util
print(json.dumps({{"sntrup": pq.sntrup_available, "mlkem": pq.mlkem_available,
                  "umac": hasattr(umac, "umac64"), "started": started,
                  "restored": ctypes.util.find_library.__module__ == "ctypes.util",
                  "libs": {{n: ctypes.util.find_library(n) for n in {names!r}}}}}))
"""


def _probe(castlib: bool, names=(), env=None) -> dict:
    code = _PROBE.format(castlib="import castlib.backends.sftp" if castlib else "",
                         names=list(names))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=cli_env(env), check=True)
    return json.loads(r.stdout)


def test_asyncssh_is_imported_without_running_gcc_or_ld():
    """asyncssh's import looks for liboqs with find_library (ldconfig, then gcc and ld when
    ldconfig does not know it): through the back-end, no gcc or ld when no such library
    file exists, and asyncssh finds what it finds when imported on its own."""
    stock, ours = _probe(castlib=False), _probe(castlib=True)
    assert {k: ours[k] for k in ("sntrup", "mlkem", "umac")} == \
        {k: stock[k] for k in ("sntrup", "mlkem", "umac")}
    assert ours["restored"]   # find_library is the stock one again after the import
    if not stock["sntrup"] and shutil.which("gcc"):   # liboqs absent: the stock looked
        assert any(p.endswith(("gcc", "cc")) for p in stock["started"]), stock["started"]
    assert not any(p.rsplit("/", 1)[-1] in ("gcc", "cc", "ld") for p in ours["started"]), ours


def test_the_lookup_answers_as_the_stock_one(tmp_path):
    """_LibraryFiles says a library could exist wherever the stock find_library finds it:
    in ld.so.cache, and in a folder of LD_LIBRARY_PATH (a copy of libz, renamed)."""
    import ctypes.util

    libz = ctypes.util.find_library("z")
    assert libz is not None
    source = next(p for p in (f"/lib/x86_64-linux-gnu/{libz}", f"/usr/lib/x86_64-linux-gnu/{libz}",
                              f"/usr/lib64/{libz}", f"/lib64/{libz}", f"/usr/lib/{libz}")
                  if __import__("os").path.exists(p))
    shutil.copy(source, tmp_path / "libcastlibprobe.so")
    names = ["c", "z", "nettle", "oqs", "liboqs", "castlibprobe", "castlib-none-such"]
    env = {"LD_LIBRARY_PATH": str(tmp_path)}
    stock = _probe(castlib=False, names=names, env=env)["libs"]
    assert stock["castlibprobe"] is not None   # the stock lookup finds the renamed copy
    from castlib.backends.sftp import _LibraryFiles

    code = ("import json, ctypes.util\nfrom castlib.backends.sftp import _LibraryFiles\n"
            "f = _LibraryFiles()\n"
            f"print(json.dumps({{n: ctypes.util.find_library(n) if f.could_exist(n) else None "
            f"for n in {names!r}}}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=cli_env(env), check=True)
    assert json.loads(r.stdout) == stock
    assert not _LibraryFiles().could_exist("castlib-none-such")
