"""One writer per layer: a lease file ``<layer>/_lease.json`` (owner, run id, heartbeat, expiry).

The same lease guards a dataset being ingested (``<root>/_lease.json``, engine/ingest.py) and
a training run folder (``<log.dir>/_lease.json``, train/stage1.py).

A run takes the lease before it writes ``layer.json`` or stages anything, renews it every
``ttl / 3`` seconds from a thread, and removes it at the end. A second run on the same layer
is refused with the holder's name while the lease is alive; a lease whose heartbeat stopped
(the holder was killed) may be taken over once it has expired, or at once when the holder ran
on this machine and its process is gone.

Exclusive creation is atomic on both stores: a local file is created with ``O_EXCL``; on S3
the PUT carries ``If-None-Match: *`` (S3 conditional writes; moto >= 5.0.x honours them).
Taking over an expired lease is atomic too: locally the stale file is renamed away (one
rename wins), on S3 the PUT carries ``If-Match: <etag of the expired lease>``. Renewals on S3
are ``If-Match`` our own last ETag, so a run that lost its lease notices at its next heartbeat
(:attr:`Lease.lost`) and its driver stops before committing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from engine.layout import LayoutError
from engine.store import StorageError, Store

LEASE = "_lease.json"


class LeaseHeld(LayoutError):
    """Another live run holds the layer's lease."""


def _precondition(e: BaseException | None) -> bool:
    """Whether a failed write was a failed condition (s3fs wraps botocore's PreconditionFailed)."""
    while e is not None:
        text = f"{type(e).__name__} {e}"
        if "PreconditionFailed" in text or "pre-conditions" in text or isinstance(e, FileExistsError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _user() -> str:
    """Who runs this process, for the holder's name (``$USER`` is unset in containers and CI)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _dead_here(cur: dict[str, Any]) -> bool:
    """The holder ran on this machine and its process is gone (killed): no need to wait."""
    if cur.get("host") != socket.gethostname() or not isinstance(cur.get("pid"), int):
        return False
    try:
        os.kill(cur["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    def __init__(
        self, store: Store, name: str, ttl: float = 120.0, owner: str | None = None, what: str = "layer"
    ) -> None:
        self.store = store
        self.name = name
        self.what = what  # what is leased, for messages: a layer, a dataset, a run folder
        self.ttl = ttl
        self.run_id = uuid.uuid4().hex[:12]
        self.owner = owner or f"{_user()}@{socket.gethostname()} pid {os.getpid()}"
        self.lost = False
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the file --------------------------------------------------------------------------
    def _body(self) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "owner": self.owner,
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat": now,
                "expires": now + self.ttl,
            }
        ).encode()

    def _path(self) -> str:
        return self.store.path(LEASE)

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The current lease and (S3) its ETag; ``(None, None)`` if there is none."""
        if not self.store.is_local:
            self.store.fs.invalidate_cache()
        try:
            if self.store.is_local:
                with open(self._path(), "rb") as f:
                    return json.loads(f.read()), None
            bucket, key, _ = self.store.fs.split_path(self._path())
            out = self.store.fs.call_s3("get_object", Bucket=bucket, Key=key)
            body = self._sync_read(out["Body"])
            return json.loads(body), out.get("ETag")
        except FileNotFoundError:
            return None, None
        except Exception as e:
            if "NoSuchKey" in f"{type(e).__name__} {e}" or "404" in str(e):
                return None, None
            if self.store.is_local:
                raise
            raise StorageError(f"cannot read the lease {self.store.uri(LEASE)}: {e}") from e

    def _sync_read(self, body: Any) -> bytes:
        from fsspec.asyn import sync

        async def go() -> bytes:
            async with body as b:
                return await b.read()

        return sync(self.store.fs.loop, go)

    def _put(self, *, create: bool = False, if_match: str | None = None) -> bool:
        """Write the lease; False when the condition failed (someone else's lease is there)."""
        data = self._body()
        if self.store.is_local:
            path = self._path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if create:
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            tmp = f"{path}.tmp-{self.run_id}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return True
        bucket, key, _ = self.store.fs.split_path(self._path())
        cond: dict[str, str] = {}
        if create:
            cond["IfNoneMatch"] = "*"
        elif if_match is not None:
            cond["IfMatch"] = if_match
        try:
            out = self.store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as e:
            if _precondition(e):
                return False
            # throttled past the client's retries, refused, denied: one line from the CLI
            raise StorageError(f"cannot write the lease {self.store.uri(LEASE)}: {e}") from e
        self._etag = out.get("ETag")
        self.store.fs.invalidate_cache()
        return True

    # ---- the protocol ----------------------------------------------------------------------
    def acquire(self) -> Lease:
        for _ in range(3):
            if self._put(create=True):
                self._start()
                return self
            cur, etag = self.read()
            if cur is None:
                continue  # released between our two calls: try again
            left = float(cur.get("expires", 0)) - time.time()
            if left > 0 and not _dead_here(cur):
                raise LeaseHeld(
                    f"{self.what} {self.name!r} is being written by {cur.get('owner')} (run {cur.get('run_id')}, "
                    f"last heartbeat {time.time() - float(cur.get('heartbeat', 0)):.0f}s ago, "
                    f"expires in {left:.0f}s). One writer per {self.what}: wait for it, or, if that run is dead, "
                    f"remove {self.store.uri(LEASE)}"
                )
            if self._take_over(etag):
                self._start()
                return self
        raise LeaseHeld(f"{self.what} {self.name!r}: could not take the lease (another run is taking it)")

    def _take_over(self, etag: str | None) -> bool:
        if not self.store.is_local:
            return etag is not None and self._put(if_match=etag)
        stale = f"{self._path()}.stale-{self.run_id}"
        try:
            os.rename(self._path(), stale)  # atomic: one of the runs taking over wins
        except FileNotFoundError:
            return False
        os.unlink(stale)
        return self._put(create=True)

    def renew(self) -> bool:
        """Renew the heartbeat; False (and :attr:`lost`) if the lease is no longer ours."""
        if self.store.is_local:
            cur, _ = self.read()
            ok = cur is not None and cur.get("run_id") == self.run_id and self._put()
        else:
            ok = self._etag is not None and self._put(if_match=self._etag)
        if not ok:
            self.lost = True
        return ok

    def _start(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 3):
                with contextlib.suppress(Exception):  # a transient error: the next beat tries again
                    if not self.renew():
                        return

        self._thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            cur, _ = self.read()
            if cur is not None and cur.get("run_id") == self.run_id:
                self.store.rm(LEASE)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
