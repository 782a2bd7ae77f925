"""Root pytest configuration: server fixtures live in tests/servers/, one module a server."""
pytest_plugins = [
    "tests.servers.common",
    "tests.servers.outage",
    "tests.servers.s3",
    "tests.servers.sftp",
    "tests.servers.sftp_tamper",   # a hostile SFTP server: OpenSSH's replies, changed
    "tests.servers.webdav",
    "tests.servers.rclone",     # rclone serve sftp / webdav: other implementations
    "tests.servers.xrootd",
    "tests.servers.castor",     # CASTOR's tools, over the xrootd server
    "tests.servers.postgres",
    "tests.servers.redis",      # the workers' broker, and castlib worker processes
]


def pytest_sessionstart(session):
    """CASTLIB_REQUIRE_ACCEL=1 (scripts/test, hence CI): the index's C accelerator
    (castlib/_accel.c) must be built and usable, or the suite fails here: without it every
    index test would pass on the Python path alone and never test the C one."""
    import os

    if os.environ.get("CASTLIB_REQUIRE_ACCEL", "") not in ("", "0"):
        from castlib.catalog.accel import why_not

        reason = why_not(honour_env=False)
        if reason:
            import pytest

            pytest.exit(f"CASTLIB_REQUIRE_ACCEL=1 but the C accelerator cannot be used: "
                        f"{reason} (pip install -e . with gcc and libsqlite3-dev)", returncode=3)


def pytest_configure(config):
    """The suite tests what Ctrl-C does. A shell script that starts it in the background
    (`scripts/test &`, `nohup`) hands it SIGINT ignored, and every castlib it starts would
    inherit that (castlib keeps an ignored SIGINT ignored, as a nohup'ed command must):
    the Ctrl-C tests would then fail for how they were launched. The default is restored."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
