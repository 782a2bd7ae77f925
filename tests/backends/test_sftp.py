"""What the SFTP back-end does beyond the contract (tests/backends/test_contract.py runs that
against OpenSSH and `rclone serve sftp` too): how many requests a file costs, the ciphers
it asks for, sessions per transfer thread, and what it does when a server refuses links,
set-stat or posix-rename."""
from __future__ import annotations

import os

import pytest

from castlib.backends import open_backend
from castlib.checksum import Hasher
from castlib.transfer import temp_path
from tests.backends.test_contract import MIB
from tests.helpers import backend_listing as listing
from tests.helpers import backend_read as read
from tests.helpers import backend_write as write


class _RequestCounter:
    """Counts the SFTP requests the client sends, by type (the real traffic to a real
    server, observed at the client's request method)."""

    def __init__(self, monkeypatch):
        import asyncssh.sftp

        self.counts: dict = {}
        original = asyncssh.sftp.SFTPClientHandler._make_request

        async def counting(handler, pkttype, *args):
            self.counts[pkttype] = self.counts.get(pkttype, 0) + 1
            return await original(handler, pkttype, *args)

        monkeypatch.setattr(asyncssh.sftp.SFTPClientHandler, "_make_request", counting)

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.mark.parametrize("kind", ["sftp", "rclone-sftp"])
def test_sftp_reads_of_small_files_ask_only_for_their_bytes(request, kind, monkeypatch):
    """A small file is read in a handful of requests, not in as many as a whole read
    buffer would take (rclone serves 16 KiB a request: 4 MiB were 256 requests, and as
    many again to find the end); a large one is still read whole and exact."""
    server = request.getfixturevalue(kind.replace("-", "_") + "_server")
    b = open_backend(server.url, server.options)
    small, big = os.urandom(5000), os.urandom(5 * MIB + 3)
    temp = temp_path("small", b.temp_key)   # a temporary file, as a sync writes it
    for path, data in (("small", small), (temp, small), ("big", big)):
        write(b, path, data)
    counter = _RequestCounter(monkeypatch)
    assert read(b, "small") == small
    assert counter.total() <= 5, counter.counts     # open, stat, read, read (at the end), close
    counter.counts.clear()
    hasher = Hasher(("md5",))
    hasher.update(small)
    assert b.checksum(temp, "md5") == hasher.hexdigests()["md5"]
    assert counter.total() <= 4, counter.counts     # open, stat, read, close: its size is known
    assert read(b, "big") == big
    b.close()


def test_sftp_file_that_grows_while_read_is_read_to_its_new_end(sftp_server):
    b = open_backend(sftp_server.url, sftp_server.options)
    write(b, "growing", b"first part;")
    with b.open_read("growing") as f:
        head = f.read(4)
        with open(sftp_server.folder / "growing", "ab") as local:
            local.write(b" and more")
        rest = b"".join(iter(lambda: f.read(MIB), b""))
    assert head + rest == b"first part; and more"


def test_sftp_prefers_aes_gcm_when_the_server_offers_it(sftp_server, rclone_sftp_server):
    """chacha20-poly1305 (asyncssh's first choice) costs two calls into `cryptography` a
    packet; AES-GCM one: castlib asks for AES-GCM first."""
    for server in (sftp_server, rclone_sftp_server):
        b = open_backend(server.url, server.options)
        assert b.stat("") is not None
        assert b.fs.client.get_extra_info("send_cipher").startswith("aes")
        b.close()


def test_sftp_refusals_are_learned_and_rename_replaces_without_posix_rename(
        sftp_restricted_server):
    """A server that refuses set-stat (permission denied on a file castlib owns) and offers
    no posix-rename: set_mtime says Unsupported and the location's capabilities stop
    promising it; rename still replaces its target, through plain renames."""
    from castlib.errors import Unsupported

    b = open_backend(sftp_restricted_server.url, sftp_restricted_server.options)
    assert b.capabilities.set_mtime and b.posix_rename   # what SFTP promises
    write(b, "final", b"old")
    write(b, "new.tmp", b"new bytes")
    b.rename("new.tmp", "final")
    assert read(b, "final") == b"new bytes" and b.stat("new.tmp") is None
    assert sorted(os.listdir(sftp_restricted_server.folder)) == ["final"]   # nothing aside
    assert not b.posix_rename
    with pytest.raises(Unsupported, match="cannot set modification times"):
        b.set_mtime("final", 1_600_000_000 * 10**9)
    assert not b.capabilities.set_mtime
    b.close()


def test_sftp_links_refused_by_the_server_are_unsupported(rclone_sftp_server):
    from castlib.errors import Unsupported

    b = open_backend(rclone_sftp_server.url, rclone_sftp_server.options)
    assert b.capabilities.symlinks
    with pytest.raises(Unsupported, match="cannot hold links"):
        b.symlink("l", "target")
    assert not b.capabilities.symlinks
    b.close()


@pytest.mark.parametrize("writes", [1, 3])
def test_sftp_upload_abandoned_before_close_publishes_nothing_partial(sftp_server, writes):
    """A small file goes out as open, write and close in one call at close time: an upload
    abandoned before (an error in the reading side) never even creates it; a larger one
    abandoned midway is removed by the abort (the write life cycle, base.WriteStream)."""
    b = open_backend(sftp_server.url, sftp_server.options)
    with pytest.raises(RuntimeError):
        with b.open_write("f") as f:
            for _ in range(writes):
                f.write(b"x" * 1000)
            raise RuntimeError("the source failed")
    assert b.stat("f") is None
    write(b, "f", b"after")   # the back-end goes on working
    assert read(b, "f") == b"after"


def _in_threads(count: int, work) -> list:
    """work(i) in `count` threads that all run at once; their results."""
    import threading

    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i):
        barrier.wait()
        results[i] = work(i)
        barrier.wait()   # no thread ends before all have worked

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_sftp_transfer_threads_get_sessions_of_their_own(sftp_server):
    """Parallel transfers do not queue behind one another in one server-side session:
    each thread has its own SFTP session on the one connection; a thread that ended hands
    its session on to the next."""
    b = open_backend(sftp_server.url, sftp_server.options)
    assert listing(b) == []

    def work(i):
        write(b, f"f{i}", b"x" * i)
        assert read(b, f"f{i}") == b"x" * i
        return b._client()

    sessions = _in_threads(4, work)
    assert len({id(s) for s in sessions}) == 4
    assert b._client() not in sessions   # the calling thread kept its own
    later = _in_threads(4, work)
    assert {id(s) for s in later} == {id(s) for s in sessions}   # handed on, none new
    b.close()


def test_sftp_server_allowing_few_sessions_is_shared(sftp_two_sessions_server):
    """A server that opens no more channels (MaxSessions 2 here) still serves every
    thread: those without a session of their own share the first one."""
    server = sftp_two_sessions_server
    b = open_backend(server.url, server.options)
    assert listing(b) == []
    results = _in_threads(5, lambda i: (write(b, f"f{i}", bytes([i]) * 1000),
                                        read(b, f"f{i}"))[1])
    assert results == [bytes([i]) * 1000 for i in range(5)]
    assert {st.path for st in listing(b)} == {f"f{i}" for i in range(5)}
    b.close()


def test_sftp_requests_carry_32k_on_a_server_that_names_no_limit(rclone_sftp_server, monkeypatch):
    """rclone serve sftp does not say how large a request may be: castlib sends just under
    32 KiB a request (asyncssh alone would send 16 KiB: twice the requests and packets)."""
    import asyncssh.sftp

    b = open_backend(rclone_sftp_server.url, rclone_sftp_server.options)
    data = os.urandom(3 * MIB)
    b.stat("")
    counter = _RequestCounter(monkeypatch)
    write(b, "big", data)
    assert read(b, "big") == data
    per_request = 32 * 1024 - 512
    blocks = -(-len(data) // per_request)
    assert counter.counts[asyncssh.sftp.FXP_WRITE] == blocks
    assert counter.counts[asyncssh.sftp.FXP_READ] <= blocks + 1
    b.close()


def test_sftp_to_an_ipv6_loopback_server_keeps_host_and_port(rclone_sftp_ipv6_session, tmp_path):
    """sftp://[::1]:PORT/x reaches ::1 at PORT (it once went to host '::1:PORT', port 22),
    and the catalog and messages name it with its brackets."""
    import yaml

    from tests.helpers import run_cli

    server = rclone_sftp_ipv6_session.for_test()
    db_url = f"sqlite:///{tmp_path}/catalog.sqlite"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dat").write_bytes(b"ipv6 " * 1000)
    config = tmp_path / "castlib.yaml"
    config.write_text(yaml.safe_dump({"storage": {server.url: server.options}}))
    dst = server.url + "/archive"
    assert dst.startswith("sftp://castlib@[::1]:")
    r = run_cli("sync", str(src), dst, db=db_url, env={"CASTLIB_CONFIG": str(config)}, check=0)
    shown = f"sftp://[::1]:{server.port}/{server.folder}/archive"
    assert f"synced file://{src} -> {shown}: 1 copied" in r.stderr, r.stderr
    assert (server.path / "archive" / "a.dat").read_bytes() == b"ipv6 " * 1000
    r = run_cli("verify", dst, db=db_url, env={"CASTLIB_CONFIG": str(config)}, check=0)
    out = r.stdout + r.stderr
    assert shown in out and "::1:" not in out.replace("[::1]:", ""), out
