"""The storage driver contract: cases every driver must pass, through the store that the
registry model uses (storage/store.py). A driver joins by subclassing ``DriverContract`` with a
``driver`` fixture and the set of optional capabilities and fast paths it has
(tests/unit/test_storage_driver.py for the filesystem, tests/unit/test_s3_driver.py for S3 on
moto, tests/s3/test_driver_on_rgw.py for S3 on Ceph RGW).

Every case runs on every driver. A case about a capability checks that the driver has it and
what it does, or, for a driver declared without it, that the store reports it absent and
behaves as documented (refuses, or does the safe generic thing) — it never skips. Derived
operations run twice (``any_store``): with the driver's fast paths, and built by the store from
the primitives alone."""

from .base import Bare, collect, run
from .contract import DriverContract
from .s3 import S3Contract, contract_bucket, make_driver

__all__ = [
    "Bare",
    "DriverContract",
    "S3Contract",
    "collect",
    "contract_bucket",
    "make_driver",
    "run",
]
