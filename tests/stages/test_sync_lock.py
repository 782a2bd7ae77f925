"""One sync per destination at a time: the second refuses at once, or waits with --lock-wait."""
import threading
import time

from castlib.catalog import Catalog
from castlib.catalog.locks import location_lock
from tests.helpers import make_tree, run_cli


def test_second_sync_refuses_before_doing_anything_then_waits_when_asked(tmp_path, db_url):
    ref = make_tree(tmp_path / "ref", {"a.dat": b"a"})
    dst = tmp_path / "dst"
    catalog = Catalog(db_url)
    loc = catalog.location(str(dst))
    with location_lock(catalog, loc.id, loc.url):
        r = run_cli("sync", str(ref), str(dst), db=db_url, check=2)
        assert "another run is syncing into" in r.stderr
        assert "indexed" not in r.stderr          # refused before listing anything
        assert not dst.exists()

    release = threading.Event()

    def hold():
        with location_lock(catalog, loc.id, loc.url):
            release.wait(20)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.5)
    threading.Timer(1.5, release.set).start()
    started = time.monotonic()
    run_cli("sync", str(ref), str(dst), "--lock-wait", "30", db=db_url, check=0)
    holder.join()
    assert time.monotonic() - started >= 1.0
    assert (dst / "a.dat").read_bytes() == b"a"
