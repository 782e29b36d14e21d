"""Blob uploads: sessions, chunks, and the commit that makes a verified blob visible.

An upload is stored as a chain of immutable chunks (paths in layout.py):

- ``_uploads/<id>/startedat``: the session exists while this does.
- ``_uploads/<id>/chunks/<token>``: the bytes one request sent, written by that request alone
  under a random name, complete (and never changed again) before anything refers to it.
- ``_uploads/<id>/parts/<offset>``: a claim on the upload's bytes from ``<offset>``, naming the
  chunk and its size. Claims are created exclusively (no-overwrite), so each offset is claimed
  at most once, and a request claims only the offset where the chain ended when it began; the
  upload's content is the chain of claimed chunks from offset 0, its size where the chain ends.

The commit closes the chain by claiming its end with a *seal*: from then on no request can
extend it, and nothing in it can change, so the bytes the commit hashes are the bytes it
publishes, whatever other requests on the session do meanwhile — no lock is involved. A blob is
published with a no-overwrite move: if the digest is already stored, the verified upload is
discarded and the existing blob only linked; stored content is never replaced. The argument in
full is in docs/data-safety.md.

Upload state travels with the client: every upload URL carries ``_state``, a token signed with
HMAC-SHA256 under ``http.secret`` (as registry:2 does), so any worker or instance that shares the
secret and the storage can continue the upload. The offset is never trusted from the token: the
chain in storage is the truth. A hasher is kept in memory between chunks on the worker that
wrote them; it is used at commit only if that worker claimed every chunk of the chain (checked
by the chunk's random name, which nobody else can produce), else the chunks are hashed from
storage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dockyard.errors import ErrorCode, RegistryError
from dockyard.oci.digest import CANONICAL_ALGORITHM, Digest, new_hasher
from dockyard.registry import layout
from dockyard.registry.blobs import BlobInfo, BlobStore, LinkedBlobs
from dockyard.registry.pump import pump
from dockyard.registry.upload_locks import NoUploadLocks, UploadLocks, upload_busy
from dockyard.storage.driver import FileWriter, PathNotFound, StorageError
from dockyard.storage.store import Store
from dockyard.tracing import in_repository, traced

if TYPE_CHECKING:
    from dockyard.registry.quotas import Quotas


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


def _being_completed(upload_id: str) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UPLOAD_INVALID,
        "the upload is being completed; it takes no more data",
        {"id": upload_id},
    )


def _out_of_order(reason: str, size: int) -> RegistryError:
    return RegistryError(
        ErrorCode.BLOB_UPLOAD_INVALID,
        f"{reason}, the upload is at {size}",
        {"range": f"0-{max(size - 1, 0)}"},
        status=416,
    )


@dataclass(frozen=True, slots=True)
class RunningHash:
    """A running hasher over an upload's chain up to ``offset``, whose last chunk is
    ``last_chunk`` (the hasher's worker claimed every chunk up to there)."""

    offset: int
    algorithm: str
    last_chunk: str | None
    hasher: Any


class HasherCache:
    """Per process: the running hasher of recent uploads."""

    def __init__(self, capacity: int = 1024) -> None:
        self._entries: OrderedDict[str, RunningHash] = OrderedDict()
        self._capacity = capacity

    def take(self, upload_id: str, chain: Chain, algorithm: str) -> Any | None:
        """The hasher over exactly ``chain``, if this process has it (removed from the cache)."""
        entry = self._entries.pop(upload_id, None)
        if (
            entry is None
            or entry.offset != chain.end
            or entry.algorithm != algorithm
            or entry.last_chunk != chain.last_chunk
        ):
            return None
        return entry.hasher

    def put(self, upload_id: str, entry: RunningHash) -> None:
        self._entries[upload_id] = entry
        self._entries.move_to_end(upload_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def drop(self, upload_id: str) -> None:
        self._entries.pop(upload_id, None)


@dataclass(frozen=True, slots=True)
class Part:
    offset: int
    size: int
    chunk: str


@dataclass(frozen=True, slots=True)
class Chain:
    """What an upload holds: its parts from offset 0 in order (or only the last one, where that
    is all a caller needs), where it ends, and whether a commit sealed it."""

    parts: tuple[Part, ...] = ()
    end: int = 0
    sealed: bool = False

    @property
    def last_chunk(self) -> str | None:
        return self.parts[-1].chunk if self.parts else None


_SEAL = b'{"sealed":true}'


def _claim(chunk: str, size: int) -> bytes:
    return json.dumps({"chunk": chunk, "size": size}, separators=(",", ":")).encode()


def _parse_claim(offset: int, data: bytes) -> Part | None:
    """The part a claim names; None for the seal. StorageError for anything else (nothing but
    Dockyard writes claims)."""
    try:
        claim = json.loads(data)
        if claim.get("sealed") is True:
            return None
        chunk, size = claim["chunk"], claim["size"]
        if not isinstance(chunk, str) or not _is_token(chunk) or not isinstance(size, int):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StorageError(f"upload part at offset {offset} is unreadable") from None
    return Part(offset, size, chunk)


def _is_token(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


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
        locks: UploadLocks | None = None,
        max_sessions: int = 0,
        quotas: Quotas | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.blobs = blobs
        self.storage: Store = store.storage
        self.tokens = tokens
        self.hashers = hashers
        self.locks: UploadLocks = locks or NoUploadLocks()
        self.max_sessions = max_sessions
        #: the quotas that hold this repository, if any (registry.quotas)
        self.quotas = quotas if quotas is not None and quotas.applies(name) else None

    # -- sessions ----------------------------------------------------------------------------
    @traced("registry.upload.start", in_repository, expected=(RegistryError,))
    async def start(self, algorithm: str = CANONICAL_ALGORITHM) -> UploadSession:
        new_hasher(algorithm)  # rejects an unsupported algorithm before anything is written
        if self.max_sessions:
            await self._check_session_limit()
        if self.quotas is not None:
            await self.quotas.check_start(self.name)
        session = UploadSession(
            name=self.name,
            id=str(uuid.uuid4()),
            started_at=datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            algorithm=algorithm,
        )
        await self.storage.write(
            layout.upload_started_at(self.name, session.id), session.started_at.encode()
        )
        return session

    async def _check_session_limit(self) -> None:
        try:
            open_sessions = len(await self.storage.list(layout.uploads_dir(self.name)))
        except PathNotFound:
            return
        if open_sessions >= self.max_sessions:
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                f"{open_sessions} uploads are open in this repository, the most allowed "
                "(http.limits.uploadsperrepository); finish or cancel some first",
                {"limit": self.max_sessions},
                headers={"Retry-After": "60"},
            )

    @traced("registry.upload.resume", in_repository, expected=(RegistryError,))
    async def resume(self, upload_id: str, state: str | None) -> UploadSession:
        """The session named in a URL. With ``_state`` its signature is checked; without it
        (a client that dropped the query) the session is found from storage alone."""
        if state:
            session = self.tokens.decode(state, self.name, upload_id)
        else:
            session = UploadSession(name=self.name, id=upload_id, started_at="")
        if not _is_upload_id(upload_id):
            raise upload_unknown(upload_id)
        await self._check_exists(session)
        return session

    async def _check_exists(self, session: UploadSession) -> None:
        try:
            await self.storage.stat(layout.upload_started_at(self.name, session.id))
        except PathNotFound:
            raise upload_unknown(session.id) from None

    def hold(self, session: UploadSession) -> contextlib.AbstractAsyncContextManager[None]:
        """One request at a time on ``session`` where that is cheap (see upload_locks)."""
        return self.locks.hold(self.name, session.id)

    async def size(self, session: UploadSession) -> int:
        return (await self._chain(session, whole=False)).end

    def token(self, session: UploadSession, offset: int) -> str:
        return self.tokens.encode(session, offset)

    @traced("registry.upload.cancel", in_repository, expected=(RegistryError,))
    async def cancel(self, session: UploadSession) -> None:
        self.hashers.drop(session.id)
        if not await self.storage.delete_if_present(layout.upload_dir(self.name, session.id)):
            raise upload_unknown(session.id)
        if self.quotas is not None:
            await self.quotas.release(self.name, session.id)

    # -- the chain -------------------------------------------------------------------------------
    async def _chain(self, session: UploadSession, *, whole: bool = True) -> Chain:
        """The session's chain: every part when ``whole``, else only the last one (enough for
        its end). BLOB_UPLOAD_UNKNOWN if the session does not exist."""
        try:
            names = await self.storage.list(layout.upload_parts_dir(self.name, session.id))
        except PathNotFound:
            await self._check_exists(session)
            return Chain()
        offsets = sorted(int(n) for n in names if n.isdigit())
        if not offsets:
            await self._check_exists(session)
            return Chain()
        wanted = offsets if whole else offsets[-1:]
        claims = await asyncio.gather(*(self._read_claim(session, o) for o in wanted))
        parts = tuple(p for p in claims if p is not None)
        sealed = claims[-1] is None  # the seal sits where the chain ends
        end = offsets[-1] if sealed else parts[-1].offset + parts[-1].size
        if whole:
            expected = 0
            for part in parts:
                if part.offset != expected:
                    raise StorageError(f"upload {session.id} has a gap at offset {expected}")
                expected = part.offset + part.size
            if expected != end or len(parts) != len(claims) - sealed:
                raise StorageError(f"upload {session.id} is not one chain")
        return Chain(parts, end=end, sealed=sealed)

    async def _read_claim(self, session: UploadSession, offset: int) -> Part | None:
        try:
            data = await self.storage.read(layout.upload_part(self.name, session.id, offset))
        except PathNotFound:
            raise upload_unknown(session.id) from None
        return _parse_claim(offset, data)

    # -- data ----------------------------------------------------------------------------------
    @traced("registry.upload.append", in_repository, expected=(RegistryError,))
    async def append(
        self,
        session: UploadSession,
        body: AsyncIterator[bytes],
        content_range: ContentRange | None = None,
        content_length: int | None = None,
    ) -> int:
        """Write a chunk and claim the offset where the upload ends; return the new size. All or
        nothing: a body that fails midway, or a claim another request won meanwhile, leaves the
        upload as it was. A chunk that does not start at the current size is refused with 416
        and the current range."""
        chain = await self._chain(session, whole=False)
        if chain.sealed:
            raise _being_completed(session.id)
        start = chain.end
        if content_range is not None:
            if content_range.start != start:
                raise _out_of_order(f"chunk starts at {content_range.start}", start)
            if content_length is not None and content_length != content_range.length:
                raise RegistryError(
                    ErrorCode.SIZE_INVALID,
                    "Content-Length does not match Content-Range",
                    {"contentLength": content_length, "range": content_range.length},
                    status=416,
                )
        expected = content_range.length if content_range else content_length
        hasher = self.hashers.take(session.id, chain, session.algorithm)
        if hasher is None and start == 0:
            hasher = new_hasher(session.algorithm)
        if self.quotas is not None:
            # Reserved before a byte is read: the announced length at once, else step by step.
            if expected is not None:
                await self.quotas.reserve(self.name, session.id, start + expected)
            else:
                body = self.quotas.metered(self.name, session.id, start, body)
        token = secrets.token_hex(16)
        path = layout.upload_chunk(self.name, session.id, token)
        writer = await self.storage.writer(path)
        received = 0
        try:
            received = await pump(body, writer, hasher)
            if expected is not None and received != expected:
                raise RegistryError(
                    ErrorCode.SIZE_INVALID,
                    f"received {received} bytes, {expected} were announced",
                    {"received": received, "expected": expected},
                )
            if received == 0:
                await writer.abort()
                if hasher is not None:
                    self.hashers.put(
                        session.id, RunningHash(start, session.algorithm, chain.last_chunk, hasher)
                    )
                return start
            await writer.close()
        except PathNotFound:  # the session was removed meanwhile (cancelled, committed)
            await asyncio.shield(writer.abort())
            await self._settle_quota(session, start)
            raise upload_unknown(session.id) from None
        except BaseException:
            await asyncio.shield(writer.abort())
            await self._settle_quota(session, start)
            raise
        try:
            await self._claim(session, start, token, received)
        except BaseException:
            await self._settle_quota(session, start)
            raise
        if expected is None:  # reserved in steps ahead of the body: count what came
            await self._settle_quota(session, start + received)
        if hasher is not None:
            self.hashers.put(
                session.id, RunningHash(start + received, session.algorithm, token, hasher)
            )
        return start + received

    async def _settle_quota(self, session: UploadSession, size: int) -> None:
        """After a request: the upload counts what it holds, no longer what was reserved."""
        if self.quotas is not None:
            await asyncio.shield(self.quotas.release(self.name, session.id, size))

    async def _claim(self, session: UploadSession, offset: int, token: str, size: int) -> None:
        """Claim ``offset`` for the written chunk ``token``, or discard it and say why."""
        claim = layout.upload_part(self.name, session.id, offset)
        if await self.storage.write_new(claim, _claim(token, size)):
            try:
                await self._check_exists(session)  # a cancel may have raced the claim
            except RegistryError:
                await self.storage.delete_if_present(layout.upload_dir(self.name, session.id))
                raise
            return
        await self.storage.delete_if_present(layout.upload_chunk(self.name, session.id, token))
        self.hashers.drop(session.id)
        try:
            winner = await self._read_claim(session, offset)
        except RegistryError:
            raise upload_unknown(session.id) from None
        if winner is None:
            raise _being_completed(session.id)
        raise _out_of_order("another request wrote this part of the upload first", offset)

    @traced("registry.upload.commit", in_repository, expected=(RegistryError,))
    async def commit(self, session: UploadSession, digest: Digest) -> BlobInfo:
        """Seal the upload, verify it against ``digest`` and make it the blob's content, linked
        into the repository. On a mismatch the upload is discarded (as registry:2 does) and
        DIGEST_INVALID raised."""
        chain = await self._sealed_chain(session)
        hasher = self.hashers.take(session.id, chain, digest.algorithm)
        built: str | None = None
        try:
            if hasher is None or len(chain.parts) != 1:
                try:
                    hasher, built = await self._hash_and_join(
                        session, chain, digest.algorithm, hasher
                    )
                except PathNotFound:  # its chunks went: see below
                    raise upload_unknown(session.id) from None
            actual = Digest(digest.algorithm, hasher.hexdigest())
            if actual != digest:
                with contextlib.suppress(RegistryError):
                    await self.cancel(session)
                raise RegistryError(
                    ErrorCode.DIGEST_INVALID,
                    "provided digest did not match uploaded content",
                    {"provided": str(digest), "computed": str(actual), "size": chain.end},
                )
            source = built or layout.upload_chunk(self.name, session.id, chain.parts[0].chunk)
            # Publish unless the digest is stored already: then the upload is verified and
            # discarded, and the existing blob only linked (stored content is never replaced).
            if not await self.store.exists(digest):
                try:
                    await self.store.publish(source, digest)
                except PathNotFound:
                    # The verified chunk went: a racing commit of this upload published it (the
                    # blob is there), or the session was removed meanwhile (cancelled, or its
                    # repository deleted: registry.deletion), which the client is told.
                    if not await self.store.exists(digest):
                        raise upload_unknown(session.id) from None
            info = await self.store.keep(digest)  # in use from now on, whatever its age
        finally:
            if built is not None:
                await self.storage.delete_if_present(built)
        await self.storage.delete_if_present(layout.upload_dir(self.name, session.id))
        await self.blobs.link(digest, info.size)
        if self.quotas is not None:  # counted as a blob of the repository from now on
            await self.quotas.release(self.name, session.id)
        return BlobInfo(digest=digest, size=info.size, modified=time.time())

    async def _sealed_chain(self, session: UploadSession) -> Chain:
        """The chain with its end claimed by the seal, so nothing can be added to it. A chain
        another commit sealed is final too (commits are idempotent)."""
        for _ in range(5):
            chain = await self._chain(session)
            if chain.sealed:
                return chain
            seal = layout.upload_part(self.name, session.id, chain.end)
            if await self.storage.write_new(seal, _SEAL):
                return Chain(chain.parts, end=chain.end, sealed=True)
            # A request claimed the end first: look again.
        raise upload_busy(session.id)

    async def _hash_and_join(
        self, session: UploadSession, chain: Chain, algorithm: str, hasher: Any | None
    ) -> tuple[Any, str | None]:
        """Hash the chain's chunks from storage (unless ``hasher`` already covers them) and,
        when there is not exactly one chunk, join them into one new file; return the hasher and
        the joined file's path (None when the single chunk is the content)."""
        joined: FileWriter | None = None
        path = None
        if len(chain.parts) != 1:
            path = layout.upload_chunk(self.name, session.id, secrets.token_hex(16))
            joined = await self.storage.writer(path)
        running = hasher or new_hasher(algorithm)
        loop = asyncio.get_running_loop()
        try:
            for part in chain.parts:
                if joined is None and hasher is not None:
                    break
                chunk_path = layout.upload_chunk(self.name, session.id, part.chunk)
                async for data in self.storage.reader(chunk_path):
                    if hasher is None:
                        await loop.run_in_executor(None, running.update, data)
                    if joined is not None:
                        await joined.write(data)
            if joined is not None:
                await joined.close()
        except BaseException:
            if joined is not None:
                await asyncio.shield(joined.abort())
            raise
        return running, path

    # -- cross-repository mount ------------------------------------------------------------------
    @traced("registry.upload.mount", in_repository, expected=(RegistryError,))
    async def mount(self, source: LinkedBlobs, digest: Digest) -> BlobInfo | None:
        """Link a blob another repository has; None if it does not have it."""
        if not await source.is_linked(digest):
            return None
        try:
            info = await self.store.keep(digest)
        except RegistryError:
            return None
        if self.quotas is None:
            await self.blobs.link(digest, info.size)
            return info
        reservation = self.quotas.transient()
        await self.quotas.reserve(self.name, reservation, info.size, digest)
        try:
            await self.blobs.link(digest, info.size)
        finally:
            await self.quotas.release(self.name, reservation)
        return info


def _is_upload_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False
