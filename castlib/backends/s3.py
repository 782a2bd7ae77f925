"""S3 and S3-compatible object stores (AWS, MinIO, Ceph RGW, ...), through s3fs.

Options (from the config file's `storage:` or a pipeline's `locations:`): `key`, `secret`,
`endpoint_url`, `client_kwargs`, ... go to s3fs as they are (the AWS_* environment
variables work too); `etag_is_md5: false` for stores whose ETag is no md5 (SSE-KMS);
`block_size` (bytes a part, default 8 MiB) and `connect_timeout` (s) as for every fsspec
location.

An object store keeps no folders (a key's prefix is its folder: `empty_dirs` is False) and
no settable mtimes. Writes still go to a temporary key, verified, then copied server-side
to the final key (see docs/architecture.md, "Capabilities"): an upload that fails or is
aborted is never completed, and the final key only ever holds verified bytes.
"""
from __future__ import annotations

import errno
from typing import BinaryIO, Iterator

import fsspec.asyn

from ..errors import NotFound, StorageError
from .base import DIR, FILE, Capabilities, ListingErrorHandler, Stat
from .fsspec import (READ_TIMEOUT_S, SECOND_NS, FsspecBackend, FsspecOptions, _next_items,
                     _quiet_background_errors, _Reader)


class S3Options(FsspecOptions):
    etag_is_md5: bool = True   # false: the store's ETags are no md5 (SSE-KMS), read back instead


class S3Backend(FsspecBackend):
    """One prefix of one bucket: s3://bucket/prefix."""

    description = "S3 and S3-compatible object stores (s3fs)"
    # Its ETag is the md5 of a single-part upload (a "-" marks a multipart one, not an md5).
    capabilities = Capabilities(set_mtime=False, server_checksums=frozenset({"md5"}),
                                mtime_precision_ns=SECOND_NS, empty_dirs=False)
    Options = S3Options
    utf8_names_only, protocol_name = True, "S3"

    def __init__(self, url, options: dict | None = None):
        super().__init__(url, options)
        self.etag_is_md5 = self.settings.etag_is_md5

    def _root_path(self) -> str:
        return self.url.host + self.url.path.rstrip("/")

    def _connect(self):
        import fsspec.dircache
        import s3fs

        self._refuse_options_not_in(s3fs.S3FileSystem.__init__,
                                    fsspec.asyn.AsyncFileSystem.__init__,
                                    fsspec.dircache.DirCache.__init__)
        _quiet_background_errors(fsspec.asyn.get_loop())
        opts = dict(self._storage_options)
        if self.url.user and "key" not in opts:   # s3://KEY:SECRET@bucket, if a user must
            opts["key"], opts["secret"] = self.url.user, self.url.password
        config = dict(opts.pop("config_kwargs", None) or {})
        config.setdefault("connect_timeout", self.connect_timeout)
        config.setdefault("read_timeout", READ_TIMEOUT_S)
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False,
                               config_kwargs=config, **opts)
        # botocore already retries once; s3fs's own loop on top would multiply the wait
        # on an unreachable endpoint, and the sync engine retries transient errors itself
        fs.retries = 1
        return fs

    def _describe(self, kind: str, detail: str) -> tuple[str, str]:
        if kind == "permission denied" and detail in ("Forbidden", ""):
            # a HEAD request's 403 has no body to say why
            return "access denied (wrong credentials, or no permission)", ""
        return kind, detail

    # -- listing ---------------------------------------------------------------------------
    def walk(self, on_error: ListingErrorHandler) -> Iterator[Stat]:
        """The whole prefix in pages of 1000 keys, with no delimiter: one request per
        thousand objects, whatever the depth. Folders are made up from the keys, each
        named just before its first entry; only their names are kept in memory."""
        bucket, _, prefix = self.root.partition("/")
        pages = self.fs._iterdir(bucket, delimiter="", prefix=f"{prefix}/" if prefix else "")
        folders: set[str] = set()
        while True:
            try:
                with self._errors(""):
                    batch = fsspec.asyn.sync(self.fs.loop, _next_items, pages, 1000)
            except StorageError as exc:
                on_error("", str(exc))
                return
            if not batch:
                return
            for info in batch:
                rel = self._relative(info["name"])
                if not rel:
                    continue
                parts = rel.split("/")
                for depth in range(1, len(parts) + 1):
                    folder = "/".join(parts[:depth])
                    is_marker = depth == len(parts) and info["name"].endswith("/")
                    if depth < len(parts) or is_marker:   # "x/" keys are folder markers
                        if folder not in folders:
                            folders.add(folder)
                            yield Stat(folder, DIR, 0)
                if not info["name"].endswith("/"):
                    yield self._stat_from_info(rel, info)

    def _stat_from_info(self, rel: str, info: dict) -> Stat:
        st = super()._stat_from_info(rel, info)
        if st.kind == FILE and self.etag_is_md5:
            md5 = _etag_md5(info.get("ETag"))
            st.checksums = {"md5": md5} if md5 else None
        return st

    def stat(self, path: str) -> Stat | None:
        st = super().stat(path)
        if st is None and path == "":
            return self._bucket_root()
        return st

    def _bucket_root(self) -> Stat | None:
        """An object store's location root exists as soon as its bucket does: an empty
        prefix is an empty folder, not a missing one."""
        with self._errors(""):
            exists = self.fs.exists(self.url.host)
        return Stat("", DIR, 0) if exists else None

    # -- data ------------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        with self._errors(path):
            # no read-ahead cache: each read(n) is one ranged GET of n bytes
            f = self.fs.open(self._full(path), "rb", block_size=self.block_size,
                             cache_type="none")
            return _Reader(self, path, f)

    def checksum(self, path: str, algorithm: str) -> str:
        if algorithm == "md5" and self.etag_is_md5:
            with self._errors(path):
                info = self.fs.info(self._full(path))
            md5 = _etag_md5(info.get("ETag"))
            if md5:
                return md5
        return super().checksum(path, algorithm)

    # -- namespace -------------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        """No folders on an object store: a key's prefix is its folder."""

    def delete(self, path: str) -> None:
        st = self.stat(path)
        if st is None:
            raise NotFound(f"{self._where(path)}: not found", path=path)
        with self._errors(path):
            if st.kind != DIR:
                self.fs.rm_file(self._full(path))
            elif self.fs.ls(self._full(path)):
                raise OSError(errno.ENOTEMPTY, "folder not empty")
            # a folder with no keys below it is already gone


def _etag_md5(etag: str | None) -> str | None:
    """The md5 an S3 ETag stands for, when it stands for one (single-part uploads)."""
    if not etag:
        return None
    value = etag.strip('"').lower()
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value
    return None
