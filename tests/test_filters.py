"""PathFilter: rsync's wildcards (`*` stops at "/", `**` crosses it), name vs whole path."""
import pytest

from castlib.backends.base import DIR, FILE
from castlib.filters import PathFilter


def ignored(glob: str, path: str, kind: str = FILE) -> bool:
    return not PathFilter([], [glob]).covers(path, kind)


@pytest.mark.parametrize("glob, path, expected", [
    ("data/*.dat", "data/x.dat", True),
    ("data/*.dat", "data/sub/x.dat", False),        # "*" does not cross "/" (rsync, not fnmatch)
    ("data/*.dat", "run/data/x.dat", True),         # unanchored: from any folder down, as rsync
    ("/data/*.dat", "run/data/x.dat", False),       # anchored: from the root only
    ("sub/b.dat", "data/sub/b.dat", True),
    ("ub/b.dat", "data/sub/b.dat", False),          # from a folder boundary, not inside a name
    ("data/**.dat", "data/sub/x.dat", True),        # "**" does
    ("data/**", "data/a/b/c", True),
    ("/data/*.dat", "data/x.dat", True),             # a leading "/" anchors, as in rsync
    ("*.tmp", "a/b/c.tmp", True),                    # no "/": the name, at any depth
    ("*.tmp", "a/b/c.tmpx", False),
    ("?.dat", "a/x.dat", True),
    ("?.dat", "a/xy.dat", False),
    ("run?/x", "run1/x", True),
    ("run?/x", "run/1x", False),                     # "?" does not match "/"
    ("cdr0[0-4]*.dat", "cdr03001.dat", True),
    ("cdr0[!0-4]*.dat", "cdr03001.dat", False),
    ("cdr0[!0-4]*.dat", "cdr05001.dat", True),
    ("[]x].dat", "].dat", True),                     # a leading "]" in a class is literal
    ("a[b", "a[b", True),                            # an unclosed "[" is literal
    (r"\*.dat", "*.dat", True),                      # an escaped wildcard matches itself
    (r"\*.dat", "x.dat", False),
    ("a.dat", "xa.dat", False),                      # globs match whole names, not parts
])
def test_rsync_wildcards(glob, path, expected):
    assert ignored(glob, path) is expected


def test_trailing_slash_matches_folders_only():
    assert ignored("cache/", "x/cache", DIR)
    assert not ignored("cache/", "x/cache", FILE)
    assert ignored("cache/", "x/cache/f", FILE)      # hidden with its folder


def test_an_ignored_folder_hides_its_subtree_while_listing():
    flt = PathFilter([], ["tmp"])
    accepted = [p for p, k in [("a", DIR), ("a/tmp", DIR), ("a/tmp/x", FILE), ("a/tmp/s", DIR),
                               ("a/tmp/s/y", FILE), ("a/z", FILE)] if flt.accepts(p, k)]
    assert accepted == ["a", "a/z"]


def test_only_selects_files_and_keeps_folders():
    flt = PathFilter(["*.dat"], [])
    assert flt.accepts("run1", DIR)
    assert flt.accepts("run1/a.dat", FILE)
    assert not flt.accepts("run1/a.log", FILE)
    assert flt.covers("run1/a.dat", FILE) and not flt.covers("run1/a.log", FILE)


def test_no_globs_accepts_everything():
    flt = PathFilter([], [])
    assert not flt.active
    assert flt.accepts("any/thing", FILE) and flt.covers("any/thing", FILE)


# -- rsync itself as the oracle -----------------------------------------------------------
ORACLE_TREE = ["data/", "data/a.dat", "data/a.log", "data/sub/", "data/sub/b.dat",
               "data/sub/deep/", "data/sub/deep/c.dat", "x/", "x/data/", "x/data/d.dat",
               "x/cache/", "x/cache/g", "cache/", "cache/f", "top.dat", "t1.dat", "t22.dat",
               "run1/", "run1/x", "runA/", "runA/x", "cachefile"]
ORACLE_GLOBS = [
    "data/*.dat",                                    # "*" stops at "/"
    "data/**",                                       # "**" crosses it (not "data" itself)
    "data/**.dat",
    "**/c.dat",
    "/data",                                         # anchored at the root
    "/data/*.dat",
    "data",                                          # a name, at any depth
    "cache/",                                        # folders only
    "cache",                                         # folders and files
    "cache*",
    "*.dat",
    "t?.dat",                                        # "?" is one character
    "run[0-9]",                                      # classes
    "run[!0-9]",
    "sub/b.dat",
    "data/sub/",
]


def _rsync_keeps(tmp_path, glob: str) -> list[str]:
    import subprocess

    src = tmp_path / "src"
    for entry in ORACLE_TREE:
        (src / entry).mkdir(parents=True) if entry.endswith("/") else (src / entry).write_bytes(b"")
    out = subprocess.run(["rsync", "-rn", "--out-format=%n", f"--exclude={glob}", f"{src}/",
                          str(tmp_path / "dst")], capture_output=True, text=True, check=True)
    return sorted(line.rstrip("/") for line in out.stdout.splitlines() if line not in ("./", ""))


@pytest.mark.parametrize("glob", ORACLE_GLOBS)
def test_ignore_keeps_what_rsync_exclude_keeps(tmp_path, glob):
    flt = PathFilter([], [glob])
    listed = [(e.rstrip("/"), DIR if e.endswith("/") else FILE) for e in ORACLE_TREE]
    ours = sorted(p for p, kind in listed if flt.accepts(p, kind))   # parents come first
    assert ours == _rsync_keeps(tmp_path, glob)
    covered = sorted(p for p, kind in listed if PathFilter([], [glob]).covers(p, kind))
    assert covered == ours
