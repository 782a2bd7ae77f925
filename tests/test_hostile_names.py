"""Every legal file name survives a sync byte-exact, and every output can still name it."""
import json
import os

from tests.helpers import json_lines, last_json, run_cli, tree_digest

HOSTILE = [
    b"with space.dat", b"new\nline.dat", b"tab\tname", b"bad\xff\xfe-latin1-\xe9.dat",
    b"-leading-dash", b"--also-an-option", b"'single'", b'"double"', b"back\\slash",
    b"100%", b"%41%42", b"*glob?[x]", b".hidden", b"\xc3\xbcnic\xc3\xb6de", b"emoji\xf0\x9f\x98\x80",
    b"semi;colon&amp|pipe", b"$HOME", b"a" * 250,
]


def make_hostile_tree(root: bytes) -> None:
    os.makedirs(root)
    os.makedirs(os.path.join(root, b"dir with\nnewline", b"sub\xff"))
    for name in HOSTILE:
        with open(os.path.join(root, name), "wb") as f:
            f.write(name)
        with open(os.path.join(root, b"dir with\nnewline", b"sub\xff", name), "wb") as f:
            f.write(name[::-1])
    # link targets are paths too: raw bytes and a literal % must survive
    os.symlink(b"bad\xff\xfe-latin1-\xe9.dat", os.path.join(root, b"link\xff"))
    os.symlink(b"../100%/x", os.path.join(root, b"link-100%"))


def test_hostile_names_round_trip(tmp_path, db_url):
    ref = os.fsencode(str(tmp_path / "ref"))
    dst = os.fsencode(str(tmp_path / "dst"))
    make_hostile_tree(ref)
    out = run_cli("sync", os.fsdecode(ref), os.fsdecode(dst), "--json", db=db_url, check=0)
    counts = last_json(out.stdout)
    assert counts["copied"] == 2 * len(HOSTILE) and counts["failed"] == 0
    assert counts["links_created"] == 2
    assert tree_digest(os.fsdecode(dst)) == tree_digest(os.fsdecode(ref))
    # identical now: no differences, nothing to copy
    run_cli("diff", os.fsdecode(ref), os.fsdecode(dst), db=db_url, check=0)
    again = last_json(run_cli("sync", os.fsdecode(ref), os.fsdecode(dst), "--json",
                              db=db_url, check=0).stdout)
    assert again["copied"] == 0


def test_hostile_names_in_json_diff_output(tmp_path, db_url):
    ref = os.fsencode(str(tmp_path / "ref"))
    make_hostile_tree(ref)
    os.makedirs(tmp_path / "empty")
    out = run_cli("diff", os.fsdecode(ref), str(tmp_path / "empty"), "--json", db=db_url,
                  check=1)
    rows = json_lines(out.stdout)
    paths = {r["path"] for r in rows}
    assert "new\nline.dat" in paths and "-leading-dash" in paths
    assert "bad%FF%FE-latin1-%E9.dat" in paths          # raw bytes shown escaped
    assert "100%25" in paths                           # so a literal % is escaped too
    assert all(r["kind"] == "missing" for r in rows)
    json.dumps(rows).encode("utf-8")                   # valid UTF-8 all the way


def test_text_output_keeps_one_line_per_path(tmp_path, db_url):
    ref = os.fsencode(str(tmp_path / "ref"))
    make_hostile_tree(ref)
    os.makedirs(tmp_path / "empty")
    text = run_cli("diff", os.fsdecode(ref), str(tmp_path / "empty"), db=db_url, check=1).stdout
    lines = text.splitlines()
    assert len(lines) == 2 * len(HOSTILE) + 4   # files, 2 folders, 2 links
    assert "missing   new\\nline.dat" in lines
    assert "missing   back\\\\slash" in lines
