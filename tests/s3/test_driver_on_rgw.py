"""The S3 driver against a real S3 server, Ceph RADOS Gateway: the same cases as against moto
(tests/unit/test_s3_driver.py), plus what only a real server checks (signatures, expiry)."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests

from dockyard.storage.store import Store
from driver_contract import S3Contract, contract_bucket, make_driver, run  # noqa: F401
from harness import S3Endpoint


@pytest.fixture(scope="module")
def endpoint(rgw_s3: S3Endpoint) -> S3Endpoint:
    return rgw_s3


class TestS3DriverOnRGW(S3Contract):
    pass


def test_presigned_urls_expire_and_cannot_be_altered(
    rgw_s3: S3Endpoint, s3_bucket_factory: Callable[[S3Endpoint], str]
) -> None:
    driver = make_driver(rgw_s3, s3_bucket_factory(rgw_s3))
    store = Store(driver)

    async def urls() -> tuple[str, str, str]:
        await store.write("/blob", b"secret content")
        await store.write("/other", b"another object")
        good = await driver.presign("/blob", "GET", 60)
        short = await driver.presign("/blob", "GET", 1)
        head = await driver.presign("/blob", "HEAD", 60)
        await driver.close()
        return good, short, head

    good, short, head = run(urls())
    assert requests.get(good, timeout=10).content == b"secret content"
    assert requests.head(head, timeout=10).status_code == 200
    assert requests.head(good, timeout=10).status_code == 403  # signed for GET only
    # Pointing a signed URL at another key, or changing its expiry, breaks the signature.
    parts = urlsplit(good)
    assert requests.get(urlunsplit(parts._replace(path=parts.path.replace("blob", "other"))),
                        timeout=10).status_code == 403  # fmt: skip
    query = dict(parse_qsl(parts.query))
    query["X-Amz-Expires"] = "604800"
    tampered = urlunsplit(parts._replace(query=urlencode(query)))
    assert requests.get(tampered, timeout=10).status_code == 403
    time.sleep(2.5)
    assert requests.get(short, timeout=10).status_code == 403
