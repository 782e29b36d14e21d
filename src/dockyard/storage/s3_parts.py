"""Multipart transfers for the S3 driver (storage/s3.py): a file uploaded in parts as it is
written, and server-side copies in parts. Memory per writer is bounded by ``chunksize``; no byte
of a copy passes through Dockyard."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dockyard.storage.s3 import S3Driver

#: S3's smallest part (all but the last part of a multipart upload)
MIN_PART = 5 * 1024 * 1024
#: S3's largest single CopyObject
MAX_SINGLE_COPY = 5 * 1024 * 1024 * 1024


async def copy_object(
    driver: S3Driver,
    source: str,
    dest: str,
    size: int,
    metadata: dict[str, str] | None,
    *,
    exclusive: bool = False,
) -> None:
    """Server-side copy; part-copies in parallel above the threshold (and always above
    S3's 5 GiB single-copy limit). ``exclusive``: only if ``dest`` does not exist."""
    s3 = await driver.client()
    s = driver.settings
    extra = driver.put_args()
    if metadata is not None:
        extra.update(Metadata=metadata, MetadataDirective="REPLACE")
    condition = {"IfNoneMatch": "*"} if exclusive else {}
    copy_source = {"Bucket": driver.bucket, "Key": source}
    if size <= min(s.multipartcopythresholdsize, MAX_SINGLE_COPY) or size == 0:
        await s3.copy_object(
            Bucket=driver.bucket, Key=dest, CopySource=copy_source, **extra, **condition
        )
        return
    extra.pop("MetadataDirective", None)
    created = await s3.create_multipart_upload(Bucket=driver.bucket, Key=dest, **extra)
    upload_id = created["UploadId"]
    piece = max(s.multipartcopychunksize, -(-size // 10000))
    ranges = [(start, min(start + piece, size) - 1) for start in range(0, size, piece)]
    limit = asyncio.Semaphore(max(1, s.multipartcopymaxconcurrency))

    async def copy_part(number: int, first: int, last: int) -> dict[str, Any]:
        async with limit:
            result = await s3.upload_part_copy(
                Bucket=driver.bucket,
                Key=dest,
                UploadId=upload_id,
                PartNumber=number,
                CopySource=copy_source,
                CopySourceRange=f"bytes={first}-{last}",
            )
        return {"PartNumber": number, "ETag": result["CopyPartResult"]["ETag"]}

    try:
        parts = await asyncio.gather(
            *(copy_part(i + 1, first, last) for i, (first, last) in enumerate(ranges))
        )
        await s3.complete_multipart_upload(
            Bucket=driver.bucket,
            Key=dest,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            **condition,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(
                s3.abort_multipart_upload(Bucket=driver.bucket, Key=dest, UploadId=upload_id)
            )
        raise


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    path: str
    key: str
    upload_id: str
    started: float


class S3Writer:
    """A new object uploaded as it is written (see the module docstring)."""

    def __init__(self, driver: S3Driver, path: str, key: str) -> None:
        self._driver = driver
        self._path = path
        self._key = key
        self._chunk = driver.settings.chunksize
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._buffer = bytearray()
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._buffer += data
        self._size += len(data)
        with self._driver.errors(self._path):
            while len(self._buffer) >= self._chunk:
                await self._upload_part(self._buffer[: self._chunk])
                del self._buffer[: self._chunk]

    async def _upload_part(self, data: bytes | bytearray) -> None:
        s3 = await self._driver.client()
        if self._upload_id is None:
            created = await s3.create_multipart_upload(
                Bucket=self._driver.bucket, Key=self._key, **self._driver.put_args()
            )
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        result = await s3.upload_part(
            Bucket=self._driver.bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=bytes(data),
        )
        self._parts.append({"PartNumber": number, "ETag": result["ETag"]})

    async def close(self) -> None:
        s3 = await self._driver.client()
        bucket = self._driver.bucket
        with self._driver.errors(self._path):
            if self._upload_id is None:
                await s3.put_object(
                    Bucket=bucket,
                    Key=self._key,
                    Body=bytes(self._buffer),
                    **self._driver.put_args(),
                )
            else:
                if self._buffer:
                    await self._upload_part(self._buffer)  # the last part may be small
                await s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buffer = bytearray()

    async def abort(self) -> None:
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        s3 = await self._driver.client()
        # Best effort: what is left behind is found by purge_partial.
        with contextlib.suppress(Exception):
            await s3.abort_multipart_upload(
                Bucket=self._driver.bucket, Key=self._key, UploadId=self._upload_id
            )
