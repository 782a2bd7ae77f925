"""Metadata as rsync -a keeps it: permission bits, folder and link mtimes, owners, hard links.
The oracle is rsync itself: after a sync, `rsync -ani --checksum SRC/ DST/` has nothing to do."""
import os

import castlib
from castlib.catalog import Catalog
from tests.helpers import make_tree


def test_an_index_sees_permission_and_content_changes_together(tmp_path, db_url):
    """One listing where a file's bits changed and another file's bytes did: both are
    recorded (the bulk update took one set of columns for all rows and failed)."""
    ref = make_tree(tmp_path / "ref", {"one.dat": b"1", "two.dat": b"2"})
    castlib.index(str(ref), db=db_url)
    cat = Catalog(db_url)
    # each way round: whichever of the two the listing meets first
    for bits, content in (("one.dat", "two.dat"), ("two.dat", "one.dat")):
        os.chmod(ref / bits, 0o600)
        (ref / content).write_bytes(b"longer")
        assert castlib.index(str(ref), db=db_url).exit_code == 0
        entries = {e["path"]: e for e in cat.entries(cat.find_location(str(ref)).id)}
        assert entries[bits]["mode"] == 0o600 and entries[content]["size"] == 6
