"""Storage drivers: one small interface (``driver.StorageDriver``), one module per backend."""

from __future__ import annotations

import os

from dockyard.config import Config
from dockyard.storage.driver import StorageDriver


def build_driver(config: Config) -> StorageDriver:
    """The driver the configuration names (``validate`` guarantees one Dockyard supports)."""
    storage = config.storage
    if storage.s3 is not None:
        from dockyard.storage.s3 import S3Driver, S3Settings  # botocore loads only when used

        s3 = storage.s3
        return S3Driver(
            S3Settings(
                bucket=s3.bucket,
                region=s3.region or "us-east-1",
                regionendpoint=s3.regionendpoint,
                accesskey=s3.accesskey,
                secretkey=s3.secretkey,
                rootdirectory=s3.rootdirectory,
                secure=s3.secure,
                skipverify=s3.skipverify,
                v4auth=s3.v4auth,
                forcepathstyle=s3.forcepathstyle,
                chunksize=s3.chunksize,
                multipartcopychunksize=s3.multipartcopychunksize,
                multipartcopymaxconcurrency=s3.multipartcopymaxconcurrency,
                multipartcopythresholdsize=s3.multipartcopythresholdsize,
                encrypt=s3.encrypt,
                keyid=s3.keyid,
                storageclass=s3.storageclass,
                objectacl=s3.objectacl,
                useragent=s3.useragent,
                redirect_expiry=0.0 if storage.redirect.disable else storage.redirect.expiry,
            )
        )
    from dockyard.storage.filesystem import FilesystemDriver

    fs = storage.filesystem
    assert fs is not None
    return FilesystemDriver(
        os.path.abspath(fs.rootdirectory), max_threads=fs.maxthreads, fsync=fs.fsync
    )
