"""The contract on S3 (moto, Ceph RGW) plus what only object storage has."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from dockyard.config import S3Config
from dockyard.storage.driver import (
    ExclusiveCreate,
    NoOverwriteMove,
    PartialUploads,
    PathNotFound,
    Redirects,
    Touch,
)
from dockyard.storage.s3 import MIN_PART, S3Driver
from dockyard.storage.store import Store
from harness import S3Endpoint, new_bucket

from .base import collect, run
from .contract import DriverContract


def make_driver(endpoint: S3Endpoint, bucket: str, **settings: object) -> S3Driver:
    """A driver on ``endpoint`` with the smallest parts S3 allows; ``settings`` are more
    ``storage.s3`` keys."""
    config = S3Config.model_validate(
        endpoint.storage_config(bucket, chunksize=MIN_PART, **settings)
    )
    return S3Driver(config)


@pytest.fixture(scope="module")
def contract_bucket(endpoint: S3Endpoint) -> Iterator[str]:
    """One bucket for a module's contract tests (making and emptying one per test costs a
    second on moto); the module provides ``endpoint`` (module-scoped)."""
    name = new_bucket(endpoint, "contract")
    yield name
    with contextlib.suppress(Exception):
        endpoint.delete_bucket(name)


class S3Contract(DriverContract):
    """Contract plus S3-only cases; subclasses provide ``endpoint``."""

    capabilities = frozenset({ExclusiveCreate, NoOverwriteMove, Touch, Redirects, PartialUploads})
    # moto and Ceph RGW before Squid ignore If-None-Match on copies (S3Driver.move_new says why
    # that is harmless for content-addressed blobs)
    exclusive_moves = False

    @pytest.fixture
    def driver(self, endpoint: S3Endpoint, contract_bucket: str) -> Iterator[S3Driver]:
        # A root directory of the test's own in the module's bucket: tests share nothing.
        d = make_driver(endpoint, contract_bucket, rootdirectory=f"/prefix-{uuid.uuid4().hex}")
        yield d
        run(d.close())

    def test_keys_are_the_layout_under_rootdirectory(
        self, driver: S3Driver, store: Store, endpoint: S3Endpoint
    ) -> None:
        run(store.write("/docker/registry/v2/blobs/x", b"1"))
        root = driver.settings.rootdirectory.strip("/")
        listed = endpoint.client().list_objects_v2(Bucket=driver.bucket, Prefix=root)
        assert [o["Key"] for o in listed["Contents"]] == [f"{root}/docker/registry/v2/blobs/x"]

    def test_large_move_uses_part_copies(self, endpoint: S3Endpoint, s3_bucket_factory) -> None:  # type: ignore[no-untyped-def]
        driver = make_driver(
            endpoint,
            s3_bucket_factory(endpoint),
            multipartcopythresholdsize=MIN_PART,
            multipartcopychunksize=MIN_PART,
        )
        store = Store(driver)
        data = os.urandom(3 * MIN_PART + 1)

        async def go() -> None:
            await store.write("/a", data)
            before = (await store.stat("/a")).modified
            await asyncio.sleep(1.1)  # LastModified has one-second resolution
            await store.touch("/a")
            assert (await store.stat("/a")).modified > before
            await store.move("/a", "/b")
            assert await collect(store.reader("/b")) == data
            with pytest.raises(PathNotFound):
                await store.stat("/a")
            await store.close()

        run(go())

    def test_delete_directory_aborts_its_multipart_uploads(
        self, driver: S3Driver, store: Store
    ) -> None:
        async def go() -> None:
            await store.write("/u/1/startedat", b"now")
            w = await store.writer("/u/1/chunks/c")
            await w.write(os.urandom(MIN_PART + 1))  # a writer still running: one part up
            assert await driver.multipart_uploads("/u")
            await store.delete("/u/1")
            assert not await driver.multipart_uploads("/u")
            with pytest.raises(PathNotFound):
                await store.stat("/u/1/startedat")

        run(go())

    def test_purge_partial_aborts_only_old_uploads(
        self, driver: S3Driver, store: Store, endpoint: S3Endpoint
    ) -> None:
        async def go() -> None:
            w = await store.writer("/u/2/data")
            await w.write(os.urandom(MIN_PART))  # one part, then the process dies
            assert len(await driver.multipart_uploads("/")) == 1
            if endpoint.kind != "moto":  # moto reports every upload as started in 2010
                assert await store.purge_partial("/", time.time() - 3600, dry_run=False) == []
            found = await store.purge_partial("/", time.time() + 60, dry_run=True)
            assert len(found) == 1 and "/u/2/data" in found[0]
            assert len(await store.purge_partial("/", time.time() + 60, dry_run=False)) == 1
            assert await driver.multipart_uploads("/") == []

        run(go())

    def test_presigned_url(self, store: Store) -> None:
        async def go() -> str | None:
            await store.write("/blob", b"content")
            return await store.redirect_url("/blob", "GET")

        url = run(go())
        assert url is not None and "X-Amz-Signature" in url
        assert requests.get(url, timeout=10).content == b"content"

    def test_redirects_disabled(self, endpoint: S3Endpoint, s3_bucket_factory) -> None:  # type: ignore[no-untyped-def]
        """``storage.redirect.disable``: the driver keeps the capability and answers None."""
        driver = S3Driver(make_driver(endpoint, s3_bucket_factory(endpoint)).settings, 0.0)
        assert run(Store(driver).redirect_url("/blob")) is None
