"""Bit-rot found by verify is recorded on the entry: the next sync replaces a rotten
destination file from the reference, and never copies a rotten reference file until it
is repaired; re-indexing clears the mark only when the file changed or reads back sound."""
import os
import zlib

import castlib
from castlib.catalog import Catalog
from tests.helpers import json_lines, last_json, make_tree, run_cli


def _rot(path) -> None:
    """One flipped byte, size and mtime kept: what a failing disk does."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _entry(db_url, root, path) -> dict:
    catalog = Catalog(db_url)
    try:
        loc = catalog.find_location(str(root))
        (entry,) = [e for e in catalog.entries(loc.id) if e["path"] == path]
        return entry
    finally:
        catalog.close()


def _adler(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def test_a_rotten_destination_file_is_replaced_by_the_next_sync(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a" * 5000, "b.dat": b"b" * 100})
    dst = tmp_path / "dst"
    assert castlib.sync(str(ref), str(dst), db=db_url).counts["copied"] == 2
    _rot(dst / "a.dat")

    v = castlib.verify(str(dst), db=db_url)
    assert v.exit_code == 1 and [(p.path, p.kind) for p in v.value.problems] == [
        ("a.dat", "corrupted")]
    d = run_cli("diff", str(ref), str(dst), "--json", db=db_url, check=1)
    (line,) = json_lines(d.stdout)
    assert line["path"] == "a.dat" and line["kind"] == "corrupted"
    assert line["dst"]["corrupted"] is True and "corrupted" not in line["ref"]
    assert _entry(db_url, dst, "a.dat")["corrupted"] is True
    assert _entry(db_url, dst, "a.dat")["adler32"] == _adler(b"a" * 5000)   # the good one kept
    plan = run_cli("sync", str(ref), str(dst), "--dry-run", db=db_url, check=0)
    assert "would replace a.dat (destination corrupted)" in plan.stdout
    kept = castlib.sync(str(ref), str(dst), db=db_url, replace=False)
    assert kept.counts["kept"] == 1 and kept.counts["replaced"] == 0

    r = castlib.sync(str(ref), str(dst), db=db_url)
    assert r.exit_code == 0 and r.counts["replaced"] == 1 and r.counts["copied"] == 0
    assert (dst / "a.dat").read_bytes() == b"a" * 5000
    assert _entry(db_url, dst, "a.dat")["corrupted"] is False
    assert castlib.verify(str(dst), db=db_url).exit_code == 0
    run_cli("diff", str(ref), str(dst), db=db_url, check=0)


def test_a_rotten_reference_file_is_never_copied_until_repaired(tmp_path, db_url):
    good = os.urandom(3000)
    ref = make_tree(tmp_path / "ref", {"rot.dat": good, "ok.dat": b"ok"})
    castlib.index(str(ref), db=db_url, checksum="adler32")
    mtime = os.stat(ref / "rot.dat").st_mtime_ns
    _rot(ref / "rot.dat")
    assert castlib.verify(str(ref), db=db_url).exit_code == 1

    # into a new destination: the rest is copied, the rotten file is not
    fresh = tmp_path / "fresh"
    r = run_cli("sync", str(ref), str(fresh), "--json", db=db_url)
    assert sorted(os.listdir(fresh)) == ["ok.dat"]
    assert r.returncode == 1
    counts = last_json(r.stdout)
    assert counts["ref_corrupted"] == 1 and counts["copied"] == 1
    assert "rot.dat: not copied: castlib verify found the reference's bytes corrupted" in r.stderr
    assert "1 not copied: reference found corrupted" in r.stderr

    # over a destination holding the good copy: kept, and said where the good bytes are,
    # even when the sync computes checksums (the re-read rotten bytes are not recorded)
    backup = make_tree(tmp_path / "backup", {"rot.dat": good, "ok.dat": b"ok"})
    os.utime(backup / "rot.dat", ns=(mtime, mtime))
    r = castlib.sync(str(ref), str(backup), db=db_url, checksum="adler32")
    assert r.exit_code == 1 and r.counts["replaced"] == 0 and r.counts["ref_corrupted"] == 1
    assert (backup / "rot.dat").read_bytes() == good
    assert any("the destination's copy has the catalogued size and checksum" in e
               for e in r.errors)

    # no reason to clear it: a plain index, a rehash that reads the same rot
    castlib.index(str(ref), db=db_url)
    rehash = castlib.index(str(ref), db=db_url, checksum="adler32", rehash=True)
    assert rehash.counts["corrupted_cleared"] == 0
    entry = _entry(db_url, ref, "rot.dat")
    assert entry["corrupted"] is True and entry["adler32"] == _adler(good)
    assert castlib.sync(str(ref), str(fresh), db=db_url).exit_code == 1

    # repaired (the good bytes restored with their mtime, as cp -p does): an index that
    # computes checksums reads it back sound and clears the mark
    (ref / "rot.dat").write_bytes(good)
    os.utime(ref / "rot.dat", ns=(mtime, mtime))
    assert castlib.index(str(ref), db=db_url, checksum="adler32").counts["corrupted_cleared"] == 1
    r = castlib.sync(str(ref), str(fresh), db=db_url)
    assert r.exit_code == 0 and r.counts["copied"] == 1
    assert (fresh / "rot.dat").read_bytes() == good


def test_a_rotten_file_rewritten_since_is_taken_as_new(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"x.dat": b"first version"})
    castlib.index(str(ref), db=db_url, checksum="adler32")
    _rot(ref / "x.dat")
    assert castlib.verify(str(ref), db=db_url).exit_code == 1
    assert _entry(db_url, ref, "x.dat")["corrupted"] is True
    (ref / "x.dat").write_bytes(b"written again, longer")   # size and mtime move
    r = castlib.sync(str(ref), str(tmp_path / "dst"), db=db_url)
    assert r.exit_code == 0 and r.counts["copied"] == 1
    assert _entry(db_url, ref, "x.dat")["corrupted"] is False
    assert (tmp_path / "dst" / "x.dat").read_bytes() == b"written again, longer"


def test_verify_clears_the_mark_when_the_bytes_read_back_sound(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"x.dat": b"payload"})
    castlib.index(str(ref), db=db_url, checksum="adler32")
    _rot(ref / "x.dat")
    assert castlib.verify(str(ref), db=db_url).exit_code == 1
    fresh = tmp_path / "dst"
    assert castlib.sync(str(ref), str(fresh), db=db_url).exit_code == 1
    assert not (fresh / "x.dat").exists()
    _rot(ref / "x.dat")                       # flipped back: the bytes are right again
    assert castlib.verify(str(ref), db=db_url).exit_code == 0
    assert _entry(db_url, ref, "x.dat")["corrupted"] is False
    assert castlib.sync(str(ref), str(fresh), db=db_url).counts["copied"] == 1


def test_a_pipeline_verifies_then_reports_the_corrupted_file(tmp_path, db_url):
    import csv

    ref = make_tree(tmp_path / "ref", {"a.dat": b"a" * 100, "b.dat": b"b"})
    dst = tmp_path / "dst"
    castlib.sync(str(ref), str(dst), db=db_url)
    _rot(dst / "b.dat")
    (tmp_path / "p.yaml").write_text(f"""
locations: {{ref: "{ref}", dst: "{dst}"}}
stages:
  - verify: {{location: dst}}
  - diff: {{id: d, ref: ref, dst: dst}}
  - report: {{from: d, format: csv, out: d.csv}}
  - sync: {{from: d}}
""")
    r = castlib.run_pipeline(str(tmp_path / "p.yaml"), db=db_url)
    assert r.exit_code == 1                              # verify found the rot
    with open(tmp_path / "d.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["path"], row["kind"], row["dst_corrupted"], row["ref_corrupted"]) == (
        "b.dat", "corrupted", "True", "")
    assert r.counts["replaced"] == 1 and (dst / "b.dat").read_bytes() == b"b"
