"""Root pytest configuration: server fixtures live in tests/servers/, one module a server."""
pytest_plugins = [
    "tests.servers.common",
    "tests.servers.outage",
    "tests.servers.s3",
    "tests.servers.sftp",
    "tests.servers.webdav",
    "tests.servers.rclone",     # rclone serve sftp / webdav: other implementations
    "tests.servers.xrootd",
    "tests.servers.castor",     # CASTOR's tools, over the xrootd server
    "tests.servers.postgres",
    "tests.servers.redis",      # the workers' broker, and castlib worker processes
]
