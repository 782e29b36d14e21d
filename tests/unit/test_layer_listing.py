"""Layer file listings (registry/layer_listing.py): the same entries tarfile finds, for gzip,
zstd and plain tars; bounded against bombs, floods of entries, stalls and garbage; kept so a
second view costs one read; rationed per user and per process. Hostile archives are built
compactly here (repeated flushed deflate segments, repeated zstd frames), never materialised."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import shutil
import subprocess
import tarfile
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from test_model import upload

from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.layer_listing import (
    MAX_EXTENDED_HEADER,
    PARENT_MARK,
    LayerEntry,
    LayerListing,
    LayerListings,
    ListingBusy,
    ListingLimiter,
    ListingLimits,
    bound_reason,
    list_layer,
    printable,
    unsafe_path,
)
from dockyard.registry.repository import Registry
from dockyard.storage.driver import StorageError
from dockyard.storage.filesystem import FilesystemDriver
from dockyard.storage.store import LocalRange, Store, StreamedRange
from harness.fuzz import fuzz

MiB = 1 << 20
GiB = 1 << 30
D = Digest("sha256", "ab" * 32)


# -- blob sources ---------------------------------------------------------------------------


class FakeBlobs:
    """One blob served as a stream (``StreamedRange``), from bytes or from a function that
    yields its chunks (so a 10 GiB blob need not exist), counting opens and bytes served.
    ``stall`` makes the stream wait forever after its first chunk."""

    def __init__(
        self,
        data: bytes | Callable[[], Iterator[bytes]],
        chunk: int = 64 * 1024,
        stall: bool = False,
    ) -> None:
        self.data = data
        self.chunk = chunk
        self.stall = stall
        self.opens = 0
        self.served = 0

    def _chunks(self, offset: int, length: int) -> Iterator[bytes]:
        if isinstance(self.data, bytes):
            data = self.data[offset : offset + length]
            for i in range(0, len(data), self.chunk):
                yield data[i : i + self.chunk]
            return
        assert offset == 0
        left = length
        for piece in self.data():
            if left <= 0:
                return
            yield piece[:left]
            left -= len(piece)

    async def open(self, digest: Digest, offset: int, length: int) -> StreamedRange:
        self.opens += 1
        chunks = self._chunks(offset, length)

        async def rest() -> AsyncIterator[bytes]:
            for piece in chunks:
                self.served += len(piece)
                yield piece
                if self.stall:
                    await asyncio.Event().wait()

        return StreamedRange(b"", rest(), offset, length)


class LocalBlobs:
    """One blob from a local file (``LocalRange``, the filesystem driver's way)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opens = 0

    async def open(self, digest: Digest, offset: int, length: int) -> LocalRange:
        self.opens += 1
        file = await asyncio.to_thread(self.path.open, "rb")  # closed by the lister
        return LocalRange(file, offset, length)


def listing_of(data: bytes, limits: ListingLimits | None = None, chunk: int = 64 * 1024, **kw):  # type: ignore[no-untyped-def]
    return asyncio.run(
        list_layer(FakeBlobs(data, chunk), D, len(data), limits or ListingLimits(), **kw)
    )


# -- archives -------------------------------------------------------------------------------


def add(tar: tarfile.TarFile, name: str, data: bytes | None = None, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    info.mode = 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def sample_tar(fmt: int) -> bytes:
    """A bit of everything a layer holds, in tar format ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        add(tar, "etc", type=tarfile.DIRTYPE, mode=0o755)
        add(tar, "etc/hostname", b"box\n", uid=1000, gid=1000, uname="u", gname="g")
        add(tar, "etc/big", os.urandom(70_000), mode=0o4755)
        add(tar, "etc/empty", b"")
        add(tar, "bin/sh", type=tarfile.SYMTYPE, linkname="/bin/busybox")
        add(tar, "bin/ls", type=tarfile.LNKTYPE, linkname="bin/busybox")
        add(tar, "dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
        add(tar, "dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0)
        add(tar, "run/fifo", type=tarfile.FIFOTYPE)
        add(tar, "usr/share/" + "deep/" * 30 + "file.txt", b"long path")  # > 100: prefix or ext
        add(tar, ".wh..wh..opq", b"")  # an overlay whiteout
        if fmt != tarfile.USTAR_FORMAT:
            add(tar, "x" * 150, b"long final component")  # no ustar split possible
            add(tar, "l", type=tarfile.SYMTYPE, linkname="t/" * 80)  # long link target
            add(tar, "ünïcödé/ファイル", b"utf-8")
            add(tar, "big-ids", b"", uid=2**30, gid=2**30 + 1)
    return buf.getvalue()


def tarfile_listing(data: bytes) -> list[tuple[object, ...]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [
            (
                m.name,
                "0" if m.type == tarfile.AREGTYPE else m.type.decode("latin-1"),
                m.size,
                m.mode & 0o7777,
                int(m.mtime),
                m.linkname,
                m.uid,
                m.gid,
            )
            for m in tar
        ]


def ours(listing: LayerListing) -> list[tuple[object, ...]]:
    return [
        (e.path, e.type, e.size, e.mode, e.mtime, e.linkname, e.uid, e.gid) for e in listing.entries
    ]


def compressed(kind: str, data: bytes) -> bytes:
    if kind == "tar+gzip":
        return gzip.compress(data)
    if kind == "tar+zstd":  # in blocks of 16 KiB or less, as a streaming compressor makes
        stream = zstandard.ZstdCompressor().compressobj()
        blocks = [
            stream.compress(data[i : i + 16384]) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            for i in range(0, len(data), 16384)
        ]
        return b"".join(blocks) + stream.flush()
    return data


def gzip_repeated(
    head: bytes, segment: bytes, times: int
) -> tuple[int, Callable[[], Iterator[bytes]]]:
    """A gzip stream of ``head`` then ``segment`` ``times`` times, as (size, chunks): each
    segment is compressed once after a full flush, so its deflate bytes can be repeated."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    start = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
    repeated = co.compress(segment) + co.flush(zlib.Z_FULL_FLUSH)
    batch = max(1, 64 * 1024 // len(repeated))

    def chunks() -> Iterator[bytes]:
        yield start
        for done in range(0, times, batch):
            yield repeated * min(batch, times - done)

    return len(start) + times * len(repeated), chunks


def file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)  # base-256 size beyond 8 GiB


# -- listings match tarfile's ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
@pytest.mark.parametrize(
    "fmt",
    [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT],
    ids=["pax", "gnu", "ustar"],
)
def test_listing_matches_tarfile(kind: str, fmt: int) -> None:
    raw = sample_tar(fmt)
    blob = compressed(kind, raw)
    expected = tarfile_listing(raw)
    for chunk in (97, 4096, 1 << 20):
        listing = listing_of(blob, chunk=chunk)
        assert listing.complete and listing.reason is None, listing.reason
        assert listing.format == kind
        assert ours(listing) == expected
        assert listing.compressed_bytes <= len(blob)
    assert {e.kind for e in listing.entries} >= {"dir", "file", "symlink", "hardlink", "char"}
    assert LayerListing.from_json(listing.to_json()) == listing


def test_pax_and_gnu_long_names_and_link_targets() -> None:
    long_name = "a/" + "b" * 300 + "/c"
    long_link = "../" * 200 + "target"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            add(tar, long_name, b"data")
            add(tar, "sym", type=tarfile.SYMTYPE, linkname=long_link)
            add(tar, "hard", type=tarfile.LNKTYPE, linkname=long_name)
            add(tar, long_name + "-dir/", type=tarfile.DIRTYPE)
        listing = listing_of(buf.getvalue())
        assert listing.complete
        assert [(e.path, e.kind, e.linkname) for e in listing.entries] == [
            (long_name, "file", ""),
            ("sym", "symlink", long_link),
            ("hard", "hardlink", long_name),
            (long_name + "-dir", "dir", ""),
        ]


def test_pax_overrides_and_global_headers() -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "77"}
    ) as tar:
        info = tarfile.TarInfo("short")
        info.pax_headers = {"path": "from/pax", "mtime": "1700000000.75", "SCHILY.xattr.a": "x"}
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        add(tar, "second", b"")
    listing = listing_of(buf.getvalue())
    assert listing.complete
    assert [(e.path, e.mtime, e.uid, e.size) for e in listing.entries] == [
        ("from/pax", 1_700_000_000, 77, 3),
        ("second", 1_700_000_000, 77, 0),
    ]
    assert ours(listing) == tarfile_listing(buf.getvalue())


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_gnu_sparse_files_from_gnu_tar(tmp_path: Path, fmt: str) -> None:
    """GNU tar's sparse files (old GNU 'S' headers with extension blocks; pax GNU.sparse.*)
    list with their real size, and the entries after them are found."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        for i in range(8):  # more than the 4 holes an old GNU header holds: extension blocks
            f.seek(i * MiB)
            f.write(b"data")
        f.truncate(9 * MiB)
    (src / "after").write_bytes(b"x")
    archive = tmp_path / "a.tar"
    subprocess.run(
        [
            "tar",
            f"--format={fmt}",
            "--sparse",
            "-cf",
            str(archive),
            "-C",
            str(src),
            "sparse",
            "after",
        ],
        check=True,
    )
    raw = archive.read_bytes()
    listing = listing_of(raw, chunk=1000)
    assert listing.complete, listing.reason
    assert [(e.path, e.size) for e in listing.entries] == [("sparse", 9 * MiB), ("after", 1)]
    assert [(n, s) for n, _, s, *_ in tarfile_listing(raw)] == [("sparse", 9 * MiB), ("after", 1)]


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
def test_byte_at_a_time(kind: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "p/" + "q" * 200, b"content")
        add(tar, "s", type=tarfile.SYMTYPE, linkname="l" * 200)
    raw = buf.getvalue()
    listing = listing_of(compressed(kind, raw), chunk=1)
    assert listing.complete and ours(listing) == tarfile_listing(raw)


def test_concatenated_gzip_members_and_padding() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    cut = 4096
    blob = gzip.compress(raw[:cut]) + b"\0" * 100 + gzip.compress(raw[cut:]) + b"\0" * 512
    listing = listing_of(blob, chunk=333)
    assert listing.complete, listing.reason
    assert ours(listing) == tarfile_listing(raw)


def test_concatenated_zstd_frames() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    c = zstandard.ZstdCompressor()
    listing = listing_of(c.compress(raw[:5000]) + c.compress(raw[5000:]), chunk=100)
    assert listing.complete and ours(listing) == tarfile_listing(raw)


def test_tar_without_end_blocks_is_complete() -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)  # its last entry is empty: a header, then zeros
    end = len(raw.rstrip(b"\0"))
    listing = listing_of(raw[: end + -end % 512])
    assert listing.complete, listing.reason
    assert len(listing.entries) == len(tarfile_listing(raw))


# -- bounds -----------------------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_byte_bound_quickly_in_bounded_memory() -> None:
    """10 GiB of zeros in one entry, ~10 MB compressed: the listing stops at the decompressed
    bound, having read a fraction of the blob, without memory growing with the output."""
    size, chunks = gzip_repeated(file_header("bomb", 10 * GiB), bytes(MiB), 10 * 1024)
    assert size < 20 * MiB
    blobs = FakeBlobs(chunks)
    limits = ListingLimits(max_decompressed_bytes=128 * MiB)
    tracemalloc.start()
    try:
        started = time.monotonic()
        listing = asyncio.run(list_layer(blobs, D, size, limits))
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert listing.truncated and listing.bound == "decompressed"
    assert listing.reason == "stopped after 128.0 MiB decompressed"
    assert listing.decompressed_bytes == 128 * MiB
    assert [(e.path, e.size) for e in listing.entries] == [("bomb", 10 * GiB)]
    assert blobs.served < size // 10
    assert peak < 16 * MiB, peak
    assert elapsed < 8, elapsed
    assert listing.cacheable


def test_default_bound_messages() -> None:
    limits = ListingLimits()
    assert [bound_reason(b, limits) for b in ("entries", "decompressed", "time")] == [
        "stopped after 100000 entries",
        "stopped after 2.0 GiB decompressed",
        "stopped after 10 s",
    ]


def test_zstd_bomb_stops_at_the_byte_bound() -> None:
    c = zstandard.ZstdCompressor(level=3)
    first = c.compress(file_header("bomb", 10 * GiB) + bytes(64 * MiB))
    frame = c.compress(bytes(64 * MiB))
    times = 10 * GiB // (64 * MiB)
    size = len(first) + times * len(frame)

    def chunks() -> Iterator[bytes]:
        yield first
        for _ in range(times):
            yield frame

    blobs = FakeBlobs(chunks)
    limits = ListingLimits(max_decompressed_bytes=300 * MiB)
    listing = asyncio.run(list_layer(blobs, D, size, limits))
    assert listing.format == "tar+zstd"
    assert listing.bound == "decompressed" and listing.decompressed_bytes == 300 * MiB
    assert blobs.served < size // 5


def test_entry_flood_stops_at_the_entry_bound() -> None:
    """A million empty entries (one header repeated; ~0.5 MB gzipped): 100000 listed."""
    header = tarfile.TarInfo("f").tobuf(tarfile.USTAR_FORMAT)
    size, chunks = gzip_repeated(b"", header * 2048, 500)
    started = time.monotonic()
    listing = asyncio.run(list_layer(FakeBlobs(chunks), D, size, ListingLimits(max_seconds=60)))
    assert listing.truncated and listing.bound == "entries"
    assert listing.reason == "stopped after 100000 entries"
    assert len(listing.entries) == 100_000
    assert time.monotonic() - started < 20
    assert len(listing.to_json()) < 10 * MiB  # the cached form stays bounded


def test_time_bound() -> None:
    size, chunks = gzip_repeated(file_header("bomb", 10 * GiB), bytes(MiB), 10 * 1024)
    limits = ListingLimits(max_seconds=0.05)
    started = time.monotonic()
    listing = asyncio.run(list_layer(FakeBlobs(chunks), D, size, limits))
    assert time.monotonic() - started < 2
    assert listing.bound == "time" and listing.reason == "stopped after 0.05 s"
    assert not listing.cacheable
    assert [e.path for e in listing.entries] == ["bomb"]


def test_time_bound_covers_a_stalled_read() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    blobs = FakeBlobs(raw, chunk=1024, stall=True)
    started = time.monotonic()
    listing = asyncio.run(list_layer(blobs, D, len(raw), ListingLimits(max_seconds=0.2)))
    assert 0.15 < time.monotonic() - started < 2
    assert listing.bound == "time" and listing.entries[0].path == "etc"


def test_time_bound_before_the_format_is_known() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    listing = asyncio.run(
        list_layer(
            FakeBlobs(raw, chunk=100, stall=True), D, len(raw), ListingLimits(max_seconds=0.1)
        )
    )
    assert listing.format == "unknown" and listing.bound == "time"
    assert listing.reason == "stopped after 0.1 s" and not listing.cacheable


class BrokenBlobs(FakeBlobs):
    """Storage that fails part way through the blob."""

    async def open(self, digest: Digest, offset: int, length: int) -> StreamedRange:
        self.opens += 1
        first = self.data[:1000] if isinstance(self.data, bytes) else b""

        async def rest() -> AsyncIterator[bytes]:
            raise StorageError("disk on fire")
            yield b""  # an async generator

        return StreamedRange(first, rest(), offset, length)


def test_storage_errors_reach_the_caller_and_are_not_kept(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)

    async def go() -> None:
        storage = fs_store(tmp_path)
        listings = LayerListings(storage)
        for _ in range(2):
            with pytest.raises(StorageError, match="disk on fire"):
                await listings.listing(BrokenBlobs(raw), D, len(raw), user="u")
        assert await listings.cached(D) is None
        await storage.close()

    asyncio.run(go())


def test_compressed_bound() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    blobs = FakeBlobs(raw)
    listing = asyncio.run(
        list_layer(blobs, D, len(raw), ListingLimits(max_compressed_bytes=10_000))
    )
    assert listing.bound == "compressed" and listing.compressed_bytes == 10_000
    assert listing.reason == "stopped after reading 9.8 KiB"
    assert blobs.served == 10_000
    assert 0 < len(listing.entries) < len(tarfile_listing(raw))


def test_names_bound_and_long_names_cut() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "n" * 10_000, b"")
        for i in range(100):
            add(tar, f"{i:03d}" + "m" * 97, b"")
    listing = listing_of(buf.getvalue(), ListingLimits(max_names_bytes=5000))
    first = listing.entries[0]
    assert first.cut and first.path == "n" * 4096
    assert listing.bound == "names" and listing.reason == "stopped after 4.9 KiB of names"
    assert len(listing.entries) == 1 + (5000 - 4096) // 100


def test_loop_keeps_running_during_a_listing() -> None:
    size, chunks = gzip_repeated(file_header("bomb", 10 * GiB), bytes(MiB), 10 * 1024)

    async def go() -> float:
        gaps = []

        async def ticker() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        limits = ListingLimits(max_decompressed_bytes=128 * MiB)
        listing = await list_layer(FakeBlobs(chunks), D, size, limits)
        assert listing.bound == "decompressed"
        tick.cancel()
        return max(gaps)

    assert asyncio.run(go()) < 0.5


def test_zstd_window_bound() -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=25)
    streaming = zstandard.ZstdCompressor(compression_params=params).compressobj()
    blob = streaming.compress(raw) + streaming.flush()  # no content size: the window stays
    assert zstandard.get_frame_parameters(blob).window_size == 32 * MiB
    listing = listing_of(blob, ListingLimits(max_zstd_window=8 * MiB))
    assert listing.malformed and listing.format == "tar+zstd" and not listing.entries
    assert listing.reason == "the zstd stream asks for a window larger than 8.0 MiB"
    assert listing_of(blob).complete  # the default allows 32 MiB


# -- malformed and unknown data -------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "the blob is empty"),
        (b"garbage" * 1000, "not a tar archive"),
        (b"{}", "not a tar archive"),
        (b"BZh91AY&SY" + bytes(100), "bzip2-compressed data cannot be listed"),
        (b"\xfd7zXZ\x00" + bytes(100), "xz-compressed data cannot be listed"),
    ],
)
def test_unknown_formats(blob: bytes, reason: str) -> None:
    media_type = "application/vnd.oci.image.config.v1+json"
    listing = listing_of(blob, media_type=media_type)
    assert listing.format == "unknown" and not listing.complete and not listing.entries
    assert listing.reason is not None and listing.reason.startswith(reason)
    assert listing.reason.endswith(f"(media type {media_type})")
    assert listing.cacheable


def test_compressed_garbage_is_malformed() -> None:
    for blob, fmt in (
        (gzip.compress(os.urandom(5000)), "tar+gzip"),
        (zstandard.ZstdCompressor().compress(b"x" * 5000), "tar+zstd"),
    ):
        listing = listing_of(blob)
        assert listing.format == fmt and listing.malformed
        assert listing.reason == "not a tar archive: no valid header at the start"
    listing = listing_of(b"\x1f\x8b" + os.urandom(2000))
    assert listing.malformed and (listing.reason or "").startswith("corrupt gzip data")


@pytest.mark.parametrize("kind", ["tar", "tar+gzip", "tar+zstd"])
def test_truncated_archive_gives_a_partial_listing(kind: str) -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    expected = tarfile_listing(raw)
    blob = compressed(kind, raw)
    listing = listing_of(blob[: len(blob) // 2])
    assert listing.malformed and not listing.truncated and not listing.complete
    assert (listing.reason or "").startswith("the archive ends early")
    assert 0 < len(listing.entries) < len(expected)
    assert ours(listing) == expected[: len(listing.entries)]
    assert listing.cacheable


def test_truncated_in_content_names_the_entry() -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)
    start = raw.index(b"etc/big")
    listing = listing_of(raw[: start + 512 + 1000])
    assert listing.reason == "the archive ends early, in the content of etc/big"


def test_gzip_cut_between_entries_says_so() -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    blob = co.compress(raw[:512]) + co.flush(zlib.Z_SYNC_FLUSH)  # one header, no gzip end
    listing = listing_of(blob)
    assert listing.reason == "the gzip stream ends early"
    assert [e.path for e in listing.entries] == ["etc"]


def test_zstd_cut_between_blocks_says_so() -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)
    stream = zstandard.ZstdCompressor().compressobj()
    blob = stream.compress(raw[:512]) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    listing = listing_of(blob)
    assert listing.reason == "the zstd stream ends early"
    assert [e.path for e in listing.entries] == ["etc"]
    # skippable frames (zstd:chunked keeps its table of contents in one) are no trouble
    skippable = b"\x5e\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"12345"
    whole = zstandard.ZstdCompressor().compress(raw)
    for blob in (skippable + whole, whole + skippable, skippable + whole[:-10]):
        listing = listing_of(blob, chunk=61)
        assert listing.format == "tar+zstd"
        assert ours(listing) == tarfile_listing(raw)[: len(listing.entries)]
        assert listing.complete == (blob != skippable + whole[:-10])


def test_bad_checksum_midway() -> None:
    raw = bytearray(sample_tar(tarfile.USTAR_FORMAT))
    second = raw.index(b"etc/hostname")
    raw[second + 148] ^= 1
    listing = listing_of(bytes(raw))
    assert listing.malformed and listing.reason == f"bad header checksum at offset {second}"
    assert [e.path for e in listing.entries] == ["etc"]


def test_oversized_extended_header_is_refused_without_reading_it() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 100 * GiB
    blob = info.tobuf(tarfile.GNU_FORMAT)
    listing = listing_of(blob + bytes(4096))
    assert listing.reason == "extended header at offset 0 is too large (100.0 GiB)"
    assert listing.compressed_bytes == len(blob) + 4096 and 100 * GiB > MAX_EXTENDED_HEADER


# -- hostile names ------------------------------------------------------------------------------


def test_hostile_names_come_back_raw_and_print_escaped() -> None:
    names = [
        "\x1b[2J\x1b[31mred",
        "../../etc/passwd",
        "/abs/../x",
        "nul\x00inside",
        "rtl\u202etxt.exe",
        "back\\slash",
        "line\nbreak",
        "z" * 5000,
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo("placeholder")
            info.pax_headers = {"path": name}
            tar.addfile(info)
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "latin1-\udce9t\udce9", b"")  # bytes e9, not UTF-8
    listing = listing_of(buf.getvalue())
    assert [e.path for e in listing.entries] == [*names[:-1], "z" * 4096]
    assert listing.entries[-1].cut
    assert LayerListing.from_json(listing.to_json()) == listing
    shown = [printable(e.path) for e in listing.entries]
    assert shown[0] == "\\x1b[2J\\x1b[31mred"
    assert shown[1] == f"{PARENT_MARK}/{PARENT_MARK}/etc/passwd"
    assert shown[3] == "nul\\x00inside"
    assert shown[4] == "rtl\\u202etxt.exe"
    assert shown[5] == "back\\\\slash"
    assert shown[6] == "line\\x0abreak"
    assert all(s.isprintable() for s in shown)
    assert unsafe_path(names[1]) and unsafe_path(names[2]) and not unsafe_path("a/..b/c")

    latin = listing_of(gnu.getvalue()).entries[0].path
    assert latin == "latin1-\udce9t\udce9"
    assert printable(latin) == "latin1-\\xe9t\\xe9"
    assert printable("x" * 50, max_chars=10) == "x" * 9 + "\u2026"
    assert printable("caf\u00e9 \U0001f600") == "caf\u00e9 \U0001f600"


# -- the cache ------------------------------------------------------------------------------


def fs_store(root: Path) -> Store:
    return Store(FilesystemDriver(str(root), max_threads=4))


def test_cached_listing_costs_no_second_read(tmp_path: Path) -> None:
    raw = gzip.compress(sample_tar(tarfile.PAX_FORMAT))
    blobs = FakeBlobs(raw)

    async def go() -> None:
        storage = fs_store(tmp_path)
        listings = LayerListings(storage)
        assert await listings.cached(D) is None
        first = await listings.listing(blobs, D, len(raw), user="u")
        assert first.complete and blobs.opens == 1
        again = await listings.listing(blobs, D, len(raw), user="u")
        assert again == first and blobs.opens == 1
        assert (tmp_path / layout.layer_listing(D).lstrip("/")).is_file()
        # another process: one storage read of the kept listing, never the blob
        other = LayerListings(storage)
        assert await other.listing(blobs, D, len(raw), user="v") == first
        assert blobs.opens == 1
        # different limits: made again
        stricter = LayerListings(storage, ListingLimits(max_entries=3))
        cut = await stricter.listing(blobs, D, len(raw), user="w")
        assert cut.bound == "entries" and blobs.opens == 2
        await storage.close()

    asyncio.run(go())


def test_time_cut_listings_are_not_kept(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    blobs = FakeBlobs(raw, chunk=1024, stall=True)

    async def go() -> None:
        storage = fs_store(tmp_path)
        listings = LayerListings(storage, ListingLimits(max_seconds=0.1))
        first = await listings.listing(blobs, D, len(raw), user="u")
        assert first.bound == "time"
        assert await listings.cached(D) is None
        await listings.listing(blobs, D, len(raw), user="u")
        assert blobs.opens == 2
        await storage.close()

    asyncio.run(go())
    assert not (tmp_path / layout.layer_listing(D).lstrip("/")).exists()


def test_unreadable_cache_file_is_ignored(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)
    path = tmp_path / layout.layer_listing(D).lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not gzip")
    blobs = FakeBlobs(raw)

    async def go() -> None:
        storage = fs_store(tmp_path)
        listing = await LayerListings(storage).listing(blobs, D, len(raw), user="u")
        assert listing.complete and blobs.opens == 1
        await storage.close()

    asyncio.run(go())
    assert LayerListing.from_json(gzip.decompress(path.read_bytes())).complete
    with pytest.raises(ValueError):
        LayerListing.from_json(b'{"v": 1, "format": "tar", "entries": [[1]]}')


def test_concurrent_views_share_one_listing(tmp_path: Path) -> None:
    raw = gzip.compress(sample_tar(tarfile.PAX_FORMAT))
    blobs = FakeBlobs(raw, chunk=512)

    async def go() -> None:
        storage = fs_store(tmp_path)
        listings = LayerListings(storage)
        results = await asyncio.gather(
            *(listings.listing(blobs, D, len(raw), user=f"u{i}") for i in range(5))
        )
        assert all(r == results[0] and r.complete for r in results)
        assert blobs.opens == 1
        await storage.close()

    asyncio.run(go())


def test_real_blob_through_the_filesystem_store(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.PAX_FORMAT)
    blob = gzip.compress(raw)

    async def go() -> None:
        registry = Registry(fs_store(tmp_path), secret="s", delete_enabled=True)
        d = await upload(registry, "app", blob)
        repo = registry.repository("app")
        info = await repo.blobs.stat(d)
        content = await repo.blobs.open(d, 0, info.size)
        assert isinstance(content, LocalRange)  # the zero-copy path is what is read
        content.close()
        listing = await list_layer(
            repo.blobs, d, info.size, media_type="application/vnd.oci.image.layer.v1.tar+gzip"
        )
        assert listing.complete and ours(listing) == tarfile_listing(raw)
        assert listing.compressed_bytes == len(blob)
        listings = LayerListings(registry.storage)
        kept = await listings.listing(
            repo.blobs, d, info.size, user="u", media_type=listing.media_type
        )
        assert kept == listing
        assert (await LayerListings(registry.storage).cached(d)) == listing
        await listings.forget(d)
        assert await LayerListings(registry.storage).cached(d) is None
        await registry.close()

    asyncio.run(go())


def test_local_file_reads_match_streamed_ones(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.GNU_FORMAT)
    path = tmp_path / "blob"
    for blob in (raw, gzip.compress(raw), raw[:3000], b"junk" * 300):
        path.write_bytes(blob)
        local = asyncio.run(list_layer(LocalBlobs(path), D, len(blob)))
        assert local == listing_of(blob)


# -- the limiter ------------------------------------------------------------------------------


def test_limiter_refuses_over_the_rate() -> None:
    now = [1000.0]
    limiter = ListingLimiter(per_minute=6, burst=2, concurrency=5, clock=lambda: now[0])

    async def go() -> None:
        for _ in range(2):
            async with limiter.acquire("alice"):
                pass
        with pytest.raises(ListingBusy) as refused:
            async with limiter.acquire("alice"):
                pass
        assert refused.value.reason == "rate"
        assert refused.value.retry_after == pytest.approx(10.0)
        async with limiter.acquire("bob"):  # others are not affected
            pass
        now[0] += 10.0
        async with limiter.acquire("alice"):
            pass
        with pytest.raises(ListingBusy):
            await limiter.take("alice")

    asyncio.run(go())


def test_limiter_caps_concurrency_and_gives_the_token_back() -> None:
    limiter = ListingLimiter(per_minute=60, burst=2, concurrency=2, wait=0.05)

    async def go() -> None:
        a, b = await limiter.take("a"), await limiter.take("b")
        started = time.monotonic()
        with pytest.raises(ListingBusy) as refused:
            await limiter.take("c")
        assert refused.value.reason == "busy" and time.monotonic() - started >= 0.04
        assert "busy" in str(refused.value)
        a.release()
        a.release()  # twice is harmless
        c = await limiter.take("c")  # its refused attempt cost no token
        c2 = asyncio.create_task(limiter.take("c"))
        await asyncio.sleep(0.01)
        b.release()
        (await c2).release()
        c.release()

    asyncio.run(go())


def test_listings_refuse_when_the_limiter_does(tmp_path: Path) -> None:
    raw = sample_tar(tarfile.USTAR_FORMAT)
    digests = [Digest("sha256", f"{i:064x}") for i in range(3)]

    async def go() -> None:
        storage = fs_store(tmp_path)
        listings = LayerListings(storage, limiter=ListingLimiter(per_minute=1, burst=2))
        for d in digests[:2]:
            await listings.listing(FakeBlobs(raw), d, len(raw), user="u")
        with pytest.raises(ListingBusy):
            await listings.listing(FakeBlobs(raw), digests[2], len(raw), user="u")
        # kept listings cost nothing
        assert (await listings.listing(FakeBlobs(raw), digests[0], len(raw), user="u")).complete
        await storage.close()

    asyncio.run(go())


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = fuzz(150)
FUZZ_LIMITS = ListingLimits(
    max_entries=20,
    max_decompressed_bytes=200_000,
    max_compressed_bytes=100_000,
    # Far off: the properties are about the other bounds, which are deterministic. (A small
    # archive fed two bytes at a time took over 5 s in CI while the machine was loaded.)
    max_seconds=120,
    max_name_bytes=200,
    max_names_bytes=2000,
)


def _small_tars() -> list[bytes]:
    out = []
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            add(tar, "d", type=tarfile.DIRTYPE)
            add(tar, "d/" + "long" * 40, b"hello world" * 20)
            add(tar, "s", type=tarfile.SYMTYPE, linkname="d/" + "x" * 120)
            add(tar, "h", type=tarfile.LNKTYPE, linkname="s")
            for i in range(25):
                add(tar, f"f{i}", b"z" * i)
        out.append(buf.getvalue())
    return out


SMALL_TARS = _small_tars()
BASES = [
    *SMALL_TARS,
    *(gzip.compress(t) for t in SMALL_TARS),
    *(zstandard.ZstdCompressor().compress(t) for t in SMALL_TARS),
]


def check_bounded(listing: LayerListing, blob: bytes) -> None:
    limits = FUZZ_LIMITS
    assert len(listing.entries) <= limits.max_entries
    assert listing.decompressed_bytes <= limits.max_decompressed_bytes
    assert listing.compressed_bytes <= min(len(blob), limits.max_compressed_bytes)
    assert sum(len(e.path.encode("utf-8", "surrogateescape")) for e in listing.entries) <= 2000
    assert not (listing.reason or "").startswith("internal error"), listing.reason
    assert listing.complete == (listing.reason is None)
    assert LayerListing.from_json(listing.to_json()) == listing
    for entry in listing.entries:
        assert isinstance(entry, LayerEntry) and printable(entry.path).isprintable()


@FUZZ
@given(blob=st.binary(max_size=4096), chunk=st.integers(1, 2048))
def test_fuzz_arbitrary_bytes(blob: bytes, chunk: int) -> None:
    listing = listing_of(blob, FUZZ_LIMITS, chunk=chunk)
    check_bounded(listing, blob)


@pytest.mark.slow  # about 19 s: the full suite runs it, the inner loop does not
@FUZZ
@given(
    base=st.sampled_from(range(len(BASES))),
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=8),
    cut=st.none() | st.integers(0, 1 << 20),
    chunk=st.integers(1, 4096),
)
def test_fuzz_mutated_archives(
    base: int, flips: list[tuple[int, int]], cut: int | None, chunk: int
) -> None:
    blob = bytearray(BASES[base])
    for where, xor in flips:
        blob[where % len(blob)] ^= xor
    if cut is not None:
        del blob[cut % (len(blob) + 1) :]
    listing = listing_of(bytes(blob), FUZZ_LIMITS, chunk=chunk)
    check_bounded(listing, bytes(blob))
    if not flips and cut is None:
        assert listing.bound == "entries" and len(listing.entries) == 20
