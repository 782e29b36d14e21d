"""Blob uploads: sessions, chunks, and the commit that makes a verified blob visible.

An upload writes into ``_uploads/<id>/data``. Its bytes are hashed as they are written; on the
final PUT the digest is checked and only then is the file renamed into ``blobs/`` and linked.
So an interrupted or rejected upload never leaves anything that can be served.

Upload state travels with the client: every upload URL carries ``_state``, a token signed with
HMAC-SHA256 under ``http.secret`` (as registry:2 does), so any worker or instance that shares the
secret and the storage can continue the upload. The offset is never trusted from the token: the
size of the data file is the truth. A hasher is kept in memory between chunks on the worker that
saw the previous chunk; when the next chunk lands elsewhere (or after a restart), the digest is
computed from the stored bytes at commit instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import CANONICAL_ALGORITHM, Digest, new_hasher
from dockyard.registry import layout
from dockyard.registry.blobs import BlobInfo, BlobStore, LinkedBlobs, delete_if_present
from dockyard.storage.driver import FileWriter, PathNotFound, StorageDriver

#: Bytes gathered from the request before one write+hash step; large enough that the per-step
#: overhead vanishes, small enough that memory stays flat.
IO_BUFFER = 1024 * 1024


@dataclass(frozen=True, slots=True)
class UploadSession:
    name: str
    id: str
    started_at: str
    algorithm: str = CANONICAL_ALGORITHM


class UploadTokens:
    """Signs and verifies the ``_state`` carried by upload URLs."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(secret.encode()).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def encode(self, session: UploadSession, offset: int) -> str:
        payload = json.dumps(
            {
                "name": session.name,
                "id": session.id,
                "startedat": session.started_at,
                "alg": session.algorithm,
                "offset": offset,
            },
            separators=(",", ":"),
        ).encode()
        return base64.urlsafe_b64encode(self._mac(payload) + payload).decode().rstrip("=")

    def decode(self, token: str, name: str, upload_id: str) -> UploadSession:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise _state_invalid("upload state is not valid base64") from None
        mac, payload = raw[:32], raw[32:]
        if len(mac) != 32 or not hmac.compare_digest(mac, self._mac(payload)):
            raise _state_invalid(
                "upload state signature does not verify: every instance serving this registry "
                "must share the same http.secret"
            )
        try:
            state = json.loads(payload)
            session = UploadSession(
                name=state["name"],
                id=state["id"],
                started_at=state["startedat"],
                algorithm=state.get("alg", CANONICAL_ALGORITHM),
            )
        except (ValueError, KeyError, TypeError):
            raise _state_invalid("upload state is malformed") from None
        if session.name != name or session.id != upload_id:
            raise _state_invalid("upload state belongs to another upload")
        return session


def _state_invalid(reason: str) -> RegistryError:
    # registry:2 answers a bad _state with 404 BLOB_UPLOAD_INVALID; say why in the body.
    return RegistryError(ErrorCode.BLOB_UPLOAD_INVALID, reason, status=404)


def upload_unknown(upload_id: str) -> RegistryError:
    return RegistryError(ErrorCode.BLOB_UPLOAD_UNKNOWN, detail={"id": upload_id})


class HasherCache:
    """Per-process: the running hasher of recent uploads, valid only at a given offset."""

    def __init__(self, capacity: int = 1024) -> None:
        self._entries: OrderedDict[str, tuple[int, str, Any]] = OrderedDict()
        self._capacity = capacity

    def take(self, upload_id: str, offset: int, algorithm: str) -> Any | None:
        entry = self._entries.pop(upload_id, None)
        if entry is None or entry[0] != offset or entry[1] != algorithm:
            return None
        return entry[2]

    def put(self, upload_id: str, offset: int, algorithm: str, hasher: Any) -> None:
        self._entries[upload_id] = (offset, algorithm, hasher)
        self._entries.move_to_end(upload_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def drop(self, upload_id: str) -> None:
        self._entries.pop(upload_id, None)


@dataclass(frozen=True, slots=True)
class ContentRange:
    """The byte range a chunk claims to carry (``Content-Range: <start>-<end>``, inclusive)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class Uploads:
    """The uploads of one repository."""

    def __init__(
        self,
        name: str,
        store: BlobStore,
        blobs: LinkedBlobs,
        tokens: UploadTokens,
        hashers: HasherCache,
    ) -> None:
        self.name = name
        self.store = store
        self.blobs = blobs
        self.driver: StorageDriver = store.driver
        self.tokens = tokens
        self.hashers = hashers

    # -- sessions ----------------------------------------------------------------------------
    async def start(self, algorithm: str = CANONICAL_ALGORITHM) -> UploadSession:
        new_hasher(algorithm)  # rejects an unsupported algorithm before anything is written
        session = UploadSession(
            name=self.name,
            id=str(uuid.uuid4()),
            started_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            algorithm=algorithm,
        )
        await self.driver.write(
            layout.upload_started_at(self.name, session.id), session.started_at.encode()
        )
        await self.driver.write(layout.upload_data(self.name, session.id), b"")
        return session

    async def resume(self, upload_id: str, state: str | None) -> UploadSession:
        """The session named in a URL. With ``_state`` its signature is checked; without it
        (a client that dropped the query) the session is found from storage alone."""
        if state:
            session = self.tokens.decode(state, self.name, upload_id)
        else:
            session = UploadSession(name=self.name, id=upload_id, started_at="")
        if not _is_upload_id(upload_id):
            raise upload_unknown(upload_id)
        try:
            await self.driver.stat(layout.upload_data(self.name, upload_id))
        except PathNotFound:
            raise upload_unknown(upload_id) from None
        return session

    async def size(self, session: UploadSession) -> int:
        try:
            return (await self.driver.stat(layout.upload_data(self.name, session.id))).size
        except PathNotFound:
            raise upload_unknown(session.id) from None

    def token(self, session: UploadSession, offset: int) -> str:
        return self.tokens.encode(session, offset)

    async def cancel(self, session: UploadSession) -> None:
        self.hashers.drop(session.id)
        if not await delete_if_present(self.driver, layout.upload_dir(self.name, session.id)):
            raise upload_unknown(session.id)

    # -- data ----------------------------------------------------------------------------------
    async def append(
        self,
        session: UploadSession,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None = None,
        content_length: int | None = None,
    ) -> int:
        """Append a chunk; return the new size. All or nothing: if the body fails midway the
        file is truncated back to where the chunk began. A chunk that does not start at the
        current size is refused with 416 and the current range."""
        path = layout.upload_data(self.name, session.id)
        try:
            writer = await self.driver.writer(path, append=True)
        except PathNotFound:
            raise upload_unknown(session.id) from None
        start = writer.size
        if content_range is not None:
            if content_range.start != start:
                await writer.abort()
                raise RegistryError(
                    ErrorCode.BLOB_UPLOAD_INVALID,
                    f"chunk starts at {content_range.start}, the upload is at {start}",
                    {"range": f"0-{max(start - 1, 0)}"},
                    status=416,
                )
            if content_length is not None and content_length != content_range.length:
                await writer.abort()
                raise RegistryError(
                    ErrorCode.SIZE_INVALID,
                    "Content-Length does not match Content-Range",
                    {"contentLength": content_length, "range": content_range.length},
                    status=416,
                )
        expected = content_range.length if content_range else content_length
        hasher = self.hashers.take(session.id, start, session.algorithm)
        if hasher is None and start == 0:
            hasher = new_hasher(session.algorithm)
        try:
            received = await pump(body, writer, hasher)
            if expected is not None and received != expected:
                raise RegistryError(
                    ErrorCode.SIZE_INVALID,
                    f"received {received} bytes, {expected} were announced",
                    {"received": received, "expected": expected},
                )
            await writer.close()
        except BaseException:
            self.hashers.drop(session.id)
            await asyncio.shield(writer.abort())
            raise
        if hasher is not None:
            self.hashers.put(session.id, writer.size, session.algorithm, hasher)
        return writer.size

    async def commit(self, session: UploadSession, digest: Digest) -> BlobInfo:
        """Verify the upload against ``digest`` and make it the blob's content, linked into the
        repository. On a mismatch the upload is discarded (as registry:2 does) and
        DIGEST_INVALID raised."""
        path = layout.upload_data(self.name, session.id)
        await self.size(session)  # BLOB_UPLOAD_UNKNOWN if it is gone
        writer = await self.driver.writer(path, append=True)
        await writer.commit()  # whole and movable from now on (completes an S3 multipart upload)
        size = writer.size
        hasher = self.hashers.take(session.id, size, digest.algorithm)
        if hasher is None:
            hasher = await self._hash_stored(path, digest.algorithm)
        actual = Digest(digest.algorithm, hasher.hexdigest())
        if actual != digest:
            with contextlib.suppress(RegistryError):
                await self.cancel(session)
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                "provided digest did not match uploaded content",
                {"provided": str(digest), "computed": str(actual), "size": size},
            )
        await self.store.adopt(path, digest)
        await self.store.keep(digest)  # in use from now on, whatever the upload's own times
        await delete_if_present(self.driver, layout.upload_dir(self.name, session.id))
        await self.blobs.link(digest)
        return BlobInfo(digest=digest, size=size, modified=time.time())

    async def _hash_stored(self, path: str, algorithm: str) -> Any:
        hasher = new_hasher(algorithm)
        loop = asyncio.get_running_loop()
        async for chunk in self.driver.reader(path):
            await loop.run_in_executor(None, hasher.update, chunk)
        return hasher

    # -- cross-repository mount ------------------------------------------------------------------
    async def mount(self, source: LinkedBlobs, digest: Digest) -> BlobInfo | None:
        """Link a blob another repository has; None if it does not have it."""
        if not await source.is_linked(digest):
            return None
        try:
            info = await self.store.keep(digest)
        except RegistryError:
            return None
        await self.blobs.link(digest)
        return info


def _is_upload_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


async def pump(body: AsyncIterator[bytes], writer: FileWriter, hasher: Any | None) -> int:
    """Copy a request body into ``writer``, hashing it on the way, and return the byte count.

    Reading, hashing and writing overlap: while one buffer is hashed (in C, without the GIL) and
    written on worker threads, the event loop gathers the next one. At most two buffers are alive,
    so memory stays flat whatever the size of the blob.
    """
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] | None = None
    buffer = bytearray()
    received = 0

    def flush(data: bytearray) -> asyncio.Future[Any]:
        steps = [asyncio.ensure_future(writer.write(data))]
        if hasher is not None:
            steps.append(loop.run_in_executor(None, hasher.update, data))
        return asyncio.gather(*steps)

    try:
        async for chunk in body:
            received += len(chunk)
            buffer += chunk
            if len(buffer) >= IO_BUFFER:
                if pending is not None:
                    await pending
                pending, buffer = flush(buffer), bytearray()
        if pending is not None:
            await pending
            pending = None
        if buffer:
            await flush(buffer)
    finally:
        if pending is not None and not pending.done():
            # Never leave a write running behind the caller's back (it may truncate next).
            with contextlib.suppress(BaseException):
                await asyncio.shield(pending)
    return received
