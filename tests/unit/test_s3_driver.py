"""The S3 driver against moto (fast; the same cases run against Ceph RGW in
tests/e2e/test_s3_rgw.py): the shared driver contract, and what object storage adds
(appendable files as multipart uploads, server-side moves, presigned URLs, purging) —
``S3Contract`` in tests/driver_contract.py."""

from __future__ import annotations

import pytest

from driver_contract import S3Contract
from s3support import S3Endpoint


class TestS3DriverOnMoto(S3Contract):
    @pytest.fixture
    def endpoint(self, moto_s3: S3Endpoint) -> S3Endpoint:
        return moto_s3
