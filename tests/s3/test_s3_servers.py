"""The S3 and Redis servers the storage tests run against (harness/s3.py, harness/redis.py)
work as the tests assume: moto stores objects; Ceph RGW stores objects and, unlike moto,
enforces signatures and presigned-URL expiry; redis-server stores keys and can be emptied."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import botocore.exceptions
import pytest
import requests

from harness import S3Endpoint, flush_redis, redis_client

BucketFactory = Callable[[S3Endpoint], str]


def put_and_get(endpoint: S3Endpoint, bucket: str) -> None:
    s3 = endpoint.client()
    data = os.urandom(100_000)
    s3.put_object(Bucket=bucket, Key="dir/blob", Body=data)
    assert s3.get_object(Bucket=bucket, Key="dir/blob")["Body"].read() == data
    head = s3.head_object(Bucket=bucket, Key="dir/blob")
    assert head["ContentLength"] == len(data)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="dir/")
    assert [o["Key"] for o in listed["Contents"]] == ["dir/blob"]


def test_moto_put_get(moto_s3: S3Endpoint, s3_bucket_factory: BucketFactory) -> None:
    assert moto_s3.kind == "moto"
    put_and_get(moto_s3, s3_bucket_factory(moto_s3))


def test_rgw_put_get(rgw_s3: S3Endpoint, s3_bucket_factory: BucketFactory) -> None:
    assert rgw_s3.kind == "rgw"
    print(f"RGW started in {rgw_s3.started_in:.1f} s")
    put_and_get(rgw_s3, s3_bucket_factory(rgw_s3))


def test_rgw_rejects_a_wrong_secret(rgw_s3: S3Endpoint, s3_bucket_factory: BucketFactory) -> None:
    bucket = s3_bucket_factory(rgw_s3)
    wrong = rgw_s3.client(aws_secret_access_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        wrong.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_rgw_presigned_urls(rgw_s3: S3Endpoint, s3_bucket_factory: BucketFactory) -> None:
    bucket = s3_bucket_factory(rgw_s3)
    s3 = rgw_s3.client()
    data = os.urandom(10_000)
    s3.put_object(Bucket=bucket, Key="blob", Body=data)
    s3.put_object(Bucket=bucket, Key="other", Body=b"other")

    def presign(key: str = "blob", expires: int = 300) -> str:
        return s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires
        )

    url = presign()
    r = requests.get(url, timeout=30)
    assert r.status_code == 200, r.text
    assert r.content == data

    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    tampered = {
        "signature": with_query(url, **{"X-Amz-Signature": flipped}),
        "expiry": with_query(url, **{"X-Amz-Expires": "600"}),
        "key": url.replace("/blob?", "/other?"),
    }
    for what, bad in tampered.items():
        assert bad != url, what
        r = requests.get(bad, timeout=30)
        assert r.status_code == 403, (what, r.status_code, r.text)

    expiring = presign(expires=1)
    time.sleep(2)
    r = requests.get(expiring, timeout=30)
    assert r.status_code == 403, r.text


def test_redis_set_get_flush(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        r.set("dockyard-test-key", b"value")
        assert r.get("dockyard-test-key") == b"value"
        flush_redis(redis_addr)
        assert r.get("dockyard-test-key") is None
    finally:
        r.close()
