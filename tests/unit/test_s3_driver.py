"""The S3 driver against moto (fast; the same cases run against Ceph RGW in
tests/s3/test_driver_on_rgw.py): the shared driver contract, and what object storage adds
(multipart uploads, server-side moves, presigned URLs, purging) — ``S3Contract`` in
tests/driver_contract/."""

from __future__ import annotations

import pytest

from driver_contract import S3Contract, contract_bucket  # noqa: F401 - a fixture
from harness import S3Endpoint


@pytest.fixture(scope="module")
def endpoint(moto_s3: S3Endpoint) -> S3Endpoint:
    return moto_s3


@pytest.mark.slow
class TestS3DriverOnMoto(S3Contract):
    pass
