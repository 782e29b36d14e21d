"""S3 driver: registry:2's ``storage.s3``, on any S3-compatible object store.

Keys are the filesystem layout's paths under ``rootdirectory``, exactly as registry:2 writes
them, so one bucket can be served by either.

Objects have no directories: a directory is a key prefix, which exists while some key lies
below it. A file written by ``writer`` is uploaded in ``chunksize`` parts as it arrives
(s3_parts.py: a multipart upload, completed by ``close``; a file smaller than one part is a
single PUT, so the store's whole-file writes are one PUT each), so memory per
writer is bounded by ``chunksize`` whatever the file's size, and nothing is visible at the key
until it is complete.

Moving a file is a server-side copy (multipart part-copies above ``multipartcopythresholdsize``)
followed by a delete: the destination appears whole or not at all, and no byte passes through
Dockyard. A file's modification time is the object's LastModified; ``touch`` refreshes it with a
server-side copy of the object onto itself. A copy has a new LastModified, so a move keeps the
source's time in the destination's metadata (``dockyard-modified``, which ``stat`` prefers), as a
rename keeps a file's mtime: garbage collection moves a candidate aside and reads its time again
(``registry.gc``, rule 3). A source touched while it was being copied is copied again. A touch
landing in the instant between the move's last look at the source and its delete would be lost
(a rename has no such instant), so the driver does not declare an atomic move
(``storage.driver.AtomicMove``) and ``registry.blobs.stamp`` confirms each touch a moment later
(docs/gc.md, "On S3").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from dockyard.config import S3Config
from dockyard.storage.driver import Child, FileInfo, PathNotFound, StorageError
from dockyard.storage.s3_parts import MIN_PART as MIN_PART  # re-exported: S3's smallest part
from dockyard.storage.s3_parts import MultipartUpload, S3Writer, copy_object

READ_CHUNK = 1024 * 1024
#: connections to S3 each worker may keep open at once (see _create_client)
S3_POOL_CONNECTIONS = 1024

#: the modification time a moved object had before the move (epoch seconds)
_META_MODIFIED = "dockyard-modified"
#: copies a move makes at most of a source that keeps being touched meanwhile
MOVE_ATTEMPTS = 5
#: what S3 servers answer when a conditional write finds the key taken
_PRECONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict")


def _is_missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("NoSuchKey", "404", "NotFound", "NoSuchUpload") or status == 404


def _modified(head: dict[str, Any]) -> float:
    """A file's modification time: kept through moves in the metadata (see the module
    docstring), else the object's LastModified."""
    kept = head.get("Metadata", {}).get(_META_MODIFIED)
    with contextlib.suppress(TypeError, ValueError):
        return float(kept)
    return float(head["LastModified"].timestamp())


def _version(head: dict[str, Any]) -> tuple[Any, ...]:
    """What changes whenever an object is rewritten or touched."""
    return head["LastModified"], head.get("ETag"), sorted(head.get("Metadata", {}).items())


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


class S3Driver:
    """Primitives; capabilities: exclusive create and no-overwrite move (conditional writes),
    touch (a copy onto itself), redirects (presigned URLs), clean-up of abandoned multipart
    uploads. A move is a copy and a delete, so it is not atomic (no ``atomic_move``); the store
    reads small files and walks trees with the primitives (one GET; one delimited listing per
    directory), and writes a small file as one PUT through the writer."""

    name = "s3"

    def __init__(self, settings: S3Config, redirect_expiry: float = 1200.0) -> None:
        """``settings`` is registry:2's ``storage.s3`` section (validated by the config);
        ``redirect_expiry``: seconds a presigned URL stays valid, 0 for no redirects."""
        self.settings = settings
        self.redirect_expiry = redirect_expiry
        self.bucket = settings.bucket
        self._prefix = settings.rootdirectory.strip("/")
        self._client: Any = None
        self._client_cm: Any = None
        self._client_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the client, created on the event loop that uses it ---------------------------------
    async def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client
        if self._client_lock is None or self._loop is not loop:
            # A client belongs to one event loop (one per worker; tests may use several).
            self._client_lock, self._loop, self._client = asyncio.Lock(), loop, None
        async with self._client_lock:
            if self._client is None:
                self._client_cm = self._create_client()
                self._client = await self._client_cm.__aenter__()
        return self._client

    def _create_client(self) -> Any:
        from aiobotocore.config import AioConfig  # loaded only when S3 is configured
        from aiobotocore.session import get_session

        s = self.settings
        endpoint = s.regionendpoint or None
        if endpoint and "://" not in endpoint:
            endpoint = ("https://" if s.secure else "http://") + endpoint
        addressing = "path" if (s.forcepathstyle or endpoint) else "auto"
        config = AioConfig(
            signature_version="s3v4" if s.v4auth else "s3",
            s3={"addressing_style": addressing},
            # Per worker. A blob GET holds its connection for the whole transfer: with 64,
            # 200 concurrent pulls queued the small link and HEAD requests behind the large
            # ones (bench/load_scale.py: 1.5x the throughput at 1024). Go's client, which
            # registry:2 uses, has no limit at all; worker.raise_open_file_limit makes room.
            max_pool_connections=S3_POOL_CONNECTIONS,
            retries={"max_attempts": 5, "mode": "standard"},
            user_agent_extra=s.useragent or None,
            # Only send a checksum where S3 requires one: several S3-compatible servers (Ceph
            # RGW among them) reject the newer default checksum trailers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return get_session().create_client(
            "s3",
            region_name=s.region or "us-east-1",
            endpoint_url=endpoint,
            use_ssl=s.secure if endpoint is None else endpoint.startswith("https://"),
            verify=False if s.skipverify else None,
            aws_access_key_id=s.accesskey or None,
            aws_secret_access_key=s.secretkey or None,
            config=config,
        )

    async def close(self) -> None:
        if self._client_cm is not None:
            cm, self._client_cm, self._client = self._client_cm, None, None
            await cm.__aexit__(None, None, None)

    # -- keys and the one place backend errors become driver errors ---------------------------
    def _key(self, path: str) -> str:
        # validated by the store (storage.store.check_path)
        return (self._prefix + path).lstrip("/") if path != "/" else self._prefix

    def _dir_prefix(self, path: str) -> str:
        key = self._key(path).rstrip("/")
        return key + "/" if key else ""

    @contextlib.contextmanager
    def errors(self, path: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            if _is_missing(exc):
                raise PathNotFound(path) from None
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            raise StorageError(f"{path}: {type(exc).__name__}: {exc}") from exc

    def put_args(self) -> dict[str, Any]:
        s = self.settings
        args: dict[str, Any] = {"ACL": s.objectacl} if s.objectacl != "private" else {}
        if s.storageclass and s.storageclass.upper() not in ("STANDARD", "NONE"):
            args["StorageClass"] = s.storageclass
        if s.encrypt:
            args["ServerSideEncryption"] = "aws:kms" if s.keyid else "AES256"
            if s.keyid:
                args["SSEKMSKeyId"] = s.keyid
        return args

    # -- primitives ------------------------------------------------------------------------------
    async def stat(self, path: str) -> FileInfo:
        key = self._key(path)
        s3 = await self.client()
        with self.errors(path):
            try:
                head = await s3.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if not _is_missing(exc):
                    raise
            else:
                return FileInfo(path, int(head["ContentLength"]), _modified(head), is_dir=False)
            listing = await s3.list_objects_v2(
                Bucket=self.bucket, Prefix=self._dir_prefix(path), MaxKeys=1
            )
            if listing.get("KeyCount", 0) or listing.get("Contents"):
                return FileInfo(path, 0, 0.0, is_dir=True)
        raise PathNotFound(path)

    async def list(self, path: str) -> list[Child]:
        """One delimited listing: sub-prefixes are directories, keys are files."""
        prefix = self._dir_prefix(path)
        children: list[Child] = []
        with self.errors(path):
            async for page in self._pages(prefix, delimiter="/"):
                children.extend(
                    Child(p["Prefix"][len(prefix) :].rstrip("/"), True) for p in page["dirs"]
                )
                children.extend(Child(o["Key"][len(prefix) :], False) for o in page["files"])
        if not children:
            raise PathNotFound(path)
        return children

    async def _pages(self, prefix: str, delimiter: str = "") -> AsyncIterator[dict[str, Any]]:
        s3 = await self.client()
        paginator = s3.get_paginator("list_objects_v2")
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            args["Delimiter"] = delimiter
        async for page in paginator.paginate(**args):
            yield {"dirs": page.get("CommonPrefixes", []), "files": page.get("Contents", [])}

    async def move(self, source: str, dest: str) -> None:
        src, dst = self._key(source), self._key(dest)
        s3 = await self.client()
        with self.errors(source):
            for _ in range(MOVE_ATTEMPTS):
                head = await s3.head_object(Bucket=self.bucket, Key=src)
                metadata = dict(head.get("Metadata", {}))
                metadata[_META_MODIFIED] = f"{_modified(head):.3f}"
                await copy_object(self, src, dst, int(head["ContentLength"]), metadata)
                # Touched meanwhile (a touch changes the metadata)? Then the copy carries a
                # stale time: copy again with the new one.
                again = await s3.head_object(Bucket=self.bucket, Key=src)
                if _version(again) == _version(head):
                    break
            await s3.delete_object(Bucket=self.bucket, Key=src)

    async def delete(self, path: str) -> None:
        key = self._key(path)
        s3 = await self.client()
        found = False
        with self.errors(path):
            try:
                await s3.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if not _is_missing(exc):
                    raise
            else:
                await s3.delete_object(Bucket=self.bucket, Key=key)
                return
            prefix = self._dir_prefix(path)
            batch: list[dict[str, str]] = []
            async for page in self._pages(prefix):
                for obj in page["files"]:
                    batch.append({"Key": obj["Key"]})
                    if len(batch) == 1000:
                        await self._delete_batch(batch)
                        batch = []
            if batch:
                await self._delete_batch(batch)
                found = True
            for upload in await self.multipart_uploads(path):
                found = True
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
                    )
        if not found:
            raise PathNotFound(path)

    async def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        s3 = await self.client()
        response = await s3.delete_objects(
            Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
        )
        errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
        if errors:
            raise StorageError(f"deleting {errors[0].get('Key')}: {errors[0].get('Message')}")

    async def reader(
        self, path: str, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        key = self._key(path)
        if length == 0:
            return
        s3 = await self.client()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        with self.errors(path):
            try:
                response = await s3.get_object(**args)
            except Exception as exc:
                if _error_code(exc) == "InvalidRange":
                    return  # offset at or past the end: nothing to read
                raise
            async with response["Body"] as body:
                while chunk := await body.read(READ_CHUNK):
                    yield chunk

    async def writer(self, path: str) -> S3Writer:
        return S3Writer(self, path, self._key(path))

    # -- capabilities ----------------------------------------------------------------------------
    async def write_new(self, path: str, data: bytes) -> bool:
        key = self._key(path)
        s3 = await self.client()
        with self.errors(path):
            try:
                await s3.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(data),
                    IfNoneMatch="*",  # exactly one of several writers creates it
                    **self.put_args(),
                )
            except Exception as exc:
                if _error_code(exc) in _PRECONDITION_FAILED:
                    return False
                raise
            return True

    async def move_new(self, source: str, dest: str) -> bool:
        """A conditional copy (``If-None-Match: *``) and a delete. Where the S3 server ignores the
        condition on copies (Ceph RGW before Squid), the existence check just before the copy
        leaves a window of one request in which two movers to a missing ``dest`` can both copy;
        Dockyard only moves verified content to a content-addressed name, so the two copies
        hold the same bytes and the one that lands second changes nothing a reader can see."""
        src, dst = self._key(source), self._key(dest)
        s3 = await self.client()
        with self.errors(source):
            try:
                await s3.head_object(Bucket=self.bucket, Key=dst)
                return False
            except Exception as exc:
                if not _is_missing(exc):
                    raise
            head = await s3.head_object(Bucket=self.bucket, Key=src)
            metadata = dict(head.get("Metadata", {}))
            metadata[_META_MODIFIED] = f"{_modified(head):.3f}"
            try:
                await copy_object(
                    self, src, dst, int(head["ContentLength"]), metadata, exclusive=True
                )
            except Exception as exc:
                if _error_code(exc) in _PRECONDITION_FAILED:
                    return False
                raise
            await s3.delete_object(Bucket=self.bucket, Key=src)
        return True

    async def touch(self, path: str) -> None:
        key = self._key(path)
        s3 = await self.client()
        with self.errors(path):
            head = await s3.head_object(Bucket=self.bucket, Key=key)
            metadata = dict(head.get("Metadata", {}))
            metadata.pop(_META_MODIFIED, None)  # from now on the copy's LastModified counts
            # A copy onto itself must change something: S3 refuses a no-op copy.
            metadata["dockyard-touched"] = f"{time.time():.3f}"
            await copy_object(self, key, key, int(head["ContentLength"]), metadata)

    async def redirect_url(self, path: str, method: str = "GET") -> str | None:
        if self.redirect_expiry <= 0:
            return None
        return await self.presign(path, method, self.redirect_expiry)

    async def presign(self, path: str, method: str, expires: float) -> str:
        s3 = await self.client()
        operation = "head_object" if method == "HEAD" else "get_object"
        with self.errors(path):
            url: str = await s3.generate_presigned_url(
                operation,
                Params={"Bucket": self.bucket, "Key": self._key(path)},
                ExpiresIn=max(1, int(expires)),
            )
        return url

    async def purge_partial(self, path: str, before: float, dry_run: bool) -> list[str]:
        """Abort multipart uploads started before ``before``: parts of uploads whose session
        was abandoned, of writers that failed, or of copies that were interrupted."""
        s3 = await self.client()
        removed = []
        for upload in await self.multipart_uploads(path):
            if upload.started >= before:
                continue
            removed.append(f"{upload.path} (multipart upload {upload.upload_id})")
            if not dry_run:
                with self.errors(upload.path), contextlib.suppress(PathNotFound):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
                    )
        return removed

    async def multipart_uploads(self, path: str) -> list[MultipartUpload]:
        """Multipart uploads in progress below ``path``, with their start times."""
        prefix = self._dir_prefix(path)
        root = self._key("/").rstrip("/")
        s3 = await self.client()
        found: list[MultipartUpload] = []
        with self.errors(path):
            paginator = s3.get_paginator("list_multipart_uploads")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    key = upload["Key"]
                    found.append(
                        MultipartUpload(
                            path="/" + key[len(root) :].lstrip("/"),
                            key=key,
                            upload_id=upload["UploadId"],
                            started=upload["Initiated"].timestamp(),
                        )
                    )
        return found
