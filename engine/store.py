"""One storage interface for local paths and ``s3://`` URIs (fsspec underneath).

A :class:`Store` is a root URI plus a filesystem. Paths given to its methods are
relative to the root and use ``/``.

Atomic writes: on a local disk a file is written under a hidden temporary name in
the destination folder and ``os.replace``-d into place. On S3 a PUT is already
atomic (an object is invisible until its upload completes), so writing the final
key directly is both atomic and cheaper than copy+delete; there are no ``_tmp``
objects to clean up (a known img2dataset pain on S3).

Names starting with ``.`` are temporaries or staging and are never listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO, Any

import fsspec

from engine.config import StorageConfig


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _strip_protocol(uri: str) -> str:
    if is_s3(uri):
        return uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


def s3_filesystem(cfg: StorageConfig) -> fsspec.AbstractFileSystem:
    """An s3fs filesystem for ``cfg`` (endpoint, keys, region; boto3's chain for what is unset)."""
    import s3fs

    cfg = cfg.resolved()
    client_kwargs: dict[str, Any] = {}
    if cfg.region:
        client_kwargs["region_name"] = cfg.region
    kwargs: dict[str, Any] = {"client_kwargs": client_kwargs, "anon": cfg.anon}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.access_key_id:
        kwargs["key"] = cfg.access_key_id
        kwargs["secret"] = cfg.secret_access_key
    if cfg.session_token:
        kwargs["token"] = cfg.session_token
    return s3fs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(fs, path)`` for any URI we accept: a local path, ``file://`` or ``s3://``."""
    if is_s3(uri):
        return s3_filesystem(cfg or StorageConfig()), _strip_protocol(uri)
    return fsspec.filesystem("file"), _strip_protocol(uri)


def pyarrow_filesystem(uri: str, cfg: StorageConfig | None = None):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Data / pyarrow readers."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), _strip_protocol(uri)
    c = (cfg or StorageConfig()).resolved()
    kwargs: dict[str, Any] = {"region": c.region or "us-east-1", "anonymous": c.anon}
    if c.endpoint_url:
        scheme, _, host = c.endpoint_url.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if c.access_key_id:
        kwargs["access_key"] = c.access_key_id
        kwargs["secret_key"] = c.secret_access_key
        if c.session_token:
            kwargs["session_token"] = c.session_token
    return pafs.S3FileSystem(**kwargs), _strip_protocol(uri)


class Store:
    """A root URI and its filesystem; picklable (the filesystem is rebuilt on the other side)."""

    def __init__(self, root: str, storage: StorageConfig | None = None) -> None:
        self.root = root.rstrip("/") if is_s3(root) else str(Path(_strip_protocol(root)))
        self.storage = (
            (storage or StorageConfig()).resolved() if is_s3(root) else (storage or StorageConfig())
        )
        self.is_local = not is_s3(self.root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("fs", None)
        return state

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return filesystem_for(self.root, self.storage)[0]

    @property
    def _base(self) -> str:
        return _strip_protocol(self.root)

    def child(self, rel: str) -> Store:
        return Store(self.uri(rel), self.storage)

    def uri(self, rel: str = "") -> str:
        rel = rel.strip("/")
        if not rel:
            return self.root
        return f"{self.root}/{rel}"

    def path(self, rel: str = "") -> str:
        """The filesystem path (no protocol) of ``rel``."""
        rel = rel.strip("/")
        return f"{self._base}/{rel}" if rel else self._base

    # ---- reading -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str, rel: str) -> Iterator[None]:
        """An S3 call that failed for good (throttled past its retries, refused, denied) becomes
        a :class:`StorageError` naming the URI: the CLI prints one line, not a traceback.
        ``FileNotFoundError`` passes (callers test for it); local errors pass unchanged."""
        try:
            yield
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:
            if self.is_local:
                raise
            raise StorageError(f"cannot {what} {self.uri(rel)}: {e}") from e

    def exists(self, rel: str = "") -> bool:
        with self._errors("check", rel):
            return bool(self.fs.exists(self.path(rel)))

    def isdir(self, rel: str = "") -> bool:
        with self._errors("check", rel):
            return bool(self.fs.isdir(self.path(rel)))

    def open(self, rel: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        with self._errors("open", rel):
            return self.fs.open(self.path(rel), mode, **kwargs)

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StorageError(f"cannot read {self.uri(rel)}: {e}") from e

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Sorted names directly under ``rel`` (no hidden names); [] if it does not exist."""
        try:
            with self._errors("list", rel):
                entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
        return [n for n in names if n and not n.startswith(".")]

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths relative to the root matching ``pattern`` (hidden names excluded)."""
        base = self._base
        out = []
        with self._errors("list", pattern):
            found = self.fs.glob(self.path(pattern))
        for p in found:
            p = p.rstrip("/")
            rel = p[len(base) :].lstrip("/")
            if not any(part.startswith(".") for part in rel.split("/")):
                out.append(rel)
        return sorted(out)

    def walk_files(self, rel: str = "") -> Iterator[str]:
        """Every file under ``rel``, streamed in a deterministic order, as paths relative to the root.

        Local: a depth-first walk with sorted names, one folder in memory at a time.
        S3: ListObjectsV2 pages (lexicographic key order), one page in memory at a time.
        """
        if self.is_local:
            top = Path(self.path(rel))
            if top.is_file():
                yield str(top.relative_to(self._base)) if top != Path(self._base) else top.name
                return
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    if not name.startswith("."):
                        yield os.path.relpath(os.path.join(dirpath, name), self._base)
            return
        bucket, _, prefix = self.path(rel).partition("/")
        if prefix:
            prefix = prefix.rstrip("/") + "/"
        base_prefix = self._base.partition("/")[2]
        with self._errors("list", rel):  # pages are fetched as the caller iterates
            for key in _iter_s3_keys(self.storage, bucket, prefix):
                if any(part.startswith(".") for part in key.split("/")):
                    continue
                yield key[len(base_prefix) :].lstrip("/") if base_prefix else key

    # ---- writing -------------------------------------------------------------------------
    def makedirs(self, rel: str = "") -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically."""
        if self.is_local:
            dest = self.path(rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return
        try:
            self.fs.pipe_file(self.path(rel), data)
        except Exception as e:
            raise StorageError(f"cannot write {self.uri(rel)}: {e}") from e

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def put_file(self, local_path: str, rel: str) -> None:
        """Move/upload a finished local file to ``rel`` atomically (the local file is consumed)."""
        if self.is_local:
            dest = self.path(rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            try:
                os.replace(local_path, dest)
            except OSError:  # another filesystem: copy beside the destination, then rename
                tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex}")
                shutil.copyfile(local_path, tmp)
                os.replace(tmp, dest)
                os.unlink(local_path)
            return
        try:
            self.fs.put_file(local_path, self.path(rel))
        except Exception as e:
            raise StorageError(f"cannot upload to {self.uri(rel)}: {e}") from e
        os.unlink(local_path)

    def rm(self, rel: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError), self._errors("remove", rel):
            self.fs.rm(self.path(rel), recursive=recursive)
        if not self.is_local:
            self.fs.invalidate_cache()

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[str]:
        """A private local folder for building files that will be ``put_file``-d under this store.

        Local stores stage under ``<root>/.staging/`` so the final move is a same-disk rename;
        S3 stores stage in the system temp folder. The folder is removed on exit.
        """
        if self.is_local:
            base = self.path(".staging")
            os.makedirs(base, exist_ok=True)
            d = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
        else:
            d = tempfile.mkdtemp(prefix=f"finevit-{name}-")
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def clear_staging(self) -> None:
        """Remove leftovers of killed runs (call once at the start of a run, before any worker)."""
        if self.is_local:
            shutil.rmtree(self.path(".staging"), ignore_errors=True)


def _iter_s3_keys(cfg: StorageConfig, bucket: str, prefix: str) -> Iterator[str]:
    import boto3

    c = cfg.resolved()
    client = boto3.client(
        "s3",
        endpoint_url=c.endpoint_url,
        aws_access_key_id=c.access_key_id,
        aws_secret_access_key=c.secret_access_key,
        aws_session_token=c.session_token,
        region_name=c.region or "us-east-1",
    )
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield obj["Key"]
