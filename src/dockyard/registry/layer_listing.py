"""The files in an image layer, for the web UI's layer page.

- :func:`list_layer` reads a blob through the model and lists the tar archive in it (gzip,
  zstd or uncompressed, told apart by their magic bytes; anything else is answered as
  ``format="unknown"``).
- :class:`LayerListings` keeps the listings made, in storage under ``/dockyard/layer-listings/``
  (``layout.layer_listing``) and in a small in-process LRU, so a second view costs at most one
  read; it makes a missing one through :class:`ListingLimiter`.
- :class:`ListingLimiter` rations the listings that have to be made: per user (a token bucket)
  and per worker process (a few at once).
- :func:`printable` shows a name with its control characters escaped and ``..`` marked.

Layers are hostile input. A listing is streamed, never holding the blob (an entry's content is
skipped as it passes; a GNU long name or pax header, the only things held whole, may be at most
:data:`MAX_EXTENDED_HEADER` bytes), and bounded by :class:`ListingLimits`: entries, bytes
decompressed, bytes read, bytes of names kept, seconds. At a bound it stops and returns what it
had listed, ``truncated`` and with a ``reason`` saying which bound. Malformed data (garbage, a
cut archive, a corrupt stream) is answered the same way, with ``malformed`` set: nothing but a
storage error (``StorageError``, or ``RegistryError`` BLOB_UNKNOWN for a blob gone) reaches the
caller. Decompression and parsing run on worker threads, one read of at most
:data:`READ_CHUNK` bytes per step, and every :data:`STEP` bytes a decompressor produces are
parsed and checked against the bounds before it produces more, so a decompression bomb is
stopped at the byte bound and a listing never stalls the event loop.

Names are returned as stored: UTF-8 decoded with ``surrogateescape`` (bytes that are not UTF-8
are kept, as lone surrogates), longer ones cut at ``max_name_bytes``. Escaping them for display
is the UI's job, with :func:`printable`.

Nothing here knows HTTP: the handler checks access first (``LinkedBlobs.stat``, which also gives
the size), answers :class:`ListingBusy` with 429 and its ``retry_after``, and escapes what it
shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import zstandard

from dockyard.config_base import format_size
from dockyard.oci.digest import Digest
from dockyard.registry import layout
from dockyard.registry.blobs import BlobContent
from dockyard.storage.driver import PathNotFound, StorageError
from dockyard.storage.store import LocalRange, Store

log = logging.getLogger("dockyard.layer_listing")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: the most decompressed bytes produced before they are parsed and the bounds checked again
STEP = 64 * KiB
#: the most bytes of the blob read (and fed to the decoder) in one worker step
READ_CHUNK = 256 * KiB
#: the largest GNU long name or long link, or pax extended header: each is held whole to parse
MAX_EXTENDED_HEADER = 1 * MiB

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: formats recognised only to say so
UNSUPPORTED_MAGIC = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"PK\x03\x04", "zip"))

#: an entry's kind, by its tar type flag; any other flag is "other"
TYPE_NAMES = {
    "0": "file",
    "7": "file",  # contiguous file
    "S": "file",  # GNU sparse file
    "1": "hardlink",
    "2": "symlink",
    "3": "char",
    "4": "block",
    "5": "dir",
    "6": "fifo",
}
#: type flags whose size field announces no content (as tarfile reads them)
_NO_CONTENT = frozenset(b"123456")
#: headers that describe the next entry: pax extended (x, Solaris X), pax global (g), GNU long
#: name (L) and long link (K)
_EXTENDED = frozenset(b"xXgLK")
#: the pax keys a listing uses (others, xattrs included, are dropped as they are read)
_PAX_KEYS = frozenset(
    {
        b"path",
        b"linkpath",
        b"size",
        b"uid",
        b"gid",
        b"mtime",
        b"GNU.sparse.name",
        b"GNU.sparse.size",
        b"GNU.sparse.realsize",
    }
)
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_UNSIGNED = struct.Struct("148B8x356B")
_SIGNED = struct.Struct("148b8x356b")

FORMATS = ("tar+gzip", "tar+zstd", "tar", "unknown")
#: the bounds, as :attr:`LayerListing.bound` names them
BOUNDS = ("entries", "decompressed", "compressed", "names", "time")


# -- limits and results ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListingLimits:
    """How far one listing may go. Every bound but ``max_seconds`` is deterministic: a listing
    cut by one is cached (with these limits, and used again only under the same ones)."""

    #: entries listed (pax, GNU long name and end-of-archive headers are not entries)
    max_entries: int = 100_000
    #: bytes of tar stream produced by decompression (for a plain tar: bytes read)
    max_decompressed_bytes: int = 2 * GiB
    #: bytes of the blob read
    max_compressed_bytes: int = 2 * GiB
    #: wall time, reading included
    max_seconds: float = 10.0
    #: a longer path or link target is cut to this many bytes (``LayerEntry.cut``)
    max_name_bytes: int = 4096
    #: bytes of paths and link targets kept in all, which bounds the listing's size (its JSON is
    #: at most about 6 times this, when every character needs an escape, plus ~60 per entry)
    max_names_bytes: int = 16 * MiB
    #: the largest zstd window (memory the decompressor holds) a layer may ask for
    max_zstd_window: int = 32 * MiB

    def key(self) -> dict[str, int]:
        """What a listing depends on (all but the time): kept with a cached listing."""
        key = asdict(self)
        del key["max_seconds"]
        return key


@dataclass(frozen=True, slots=True)
class LayerEntry:
    path: str
    #: the tar type flag, one character: "0" file, "1" hard link, "2" symlink, "3" character
    #: device, "4" block device, "5" directory, "6" FIFO, "7" contiguous, "S" sparse (a V7
    #: regular file's NUL flag is given as "0"); see :attr:`kind`
    type: str
    #: bytes of content (a sparse file's real size); as the header says for the other kinds
    size: int
    #: permission bits (``mode & 0o7777``)
    mode: int
    #: modification time, seconds since the epoch
    mtime: int
    #: a link's target (hard links: a path in the layer)
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    #: the path or the link target was longer than ``max_name_bytes`` and is cut
    cut: bool = False

    @property
    def kind(self) -> str:
        """The kind of entry: file, dir, symlink, hardlink, char, block, fifo or other."""
        return TYPE_NAMES.get(self.type, "other")


@dataclass(frozen=True, slots=True)
class LayerListing:
    #: "tar+gzip", "tar+zstd", "tar" or "unknown" (not something this lists: see ``reason``)
    format: str
    entries: tuple[LayerEntry, ...]
    #: stopped at a bound (named by ``bound``): ``entries`` is what came before it
    truncated: bool = False
    #: "entries", "decompressed", "compressed", "names" or "time", when ``truncated``
    bound: str | None = None
    #: the data is malformed (garbage, cut short, corrupt): ``entries`` is what came before
    malformed: bool = False
    #: why the listing is not complete, for people: "stopped after 100000 entries", "the
    #: archive ends early, in the content of usr/bin/x", "not a tar archive ..."; None if it is
    reason: str | None = None
    #: bytes of the blob read, and of tar stream decompressed from them
    compressed_bytes: int = 0
    decompressed_bytes: int = 0
    #: the media type the caller gave (shown with an unknown format)
    media_type: str | None = None
    #: the limits it was made under (``ListingLimits.key``)
    limits: dict[str, int] | None = None

    @property
    def complete(self) -> bool:
        """Every entry of a well-formed archive is listed."""
        return self.format != "unknown" and not self.truncated and not self.malformed

    @property
    def cacheable(self) -> bool:
        """Everything but a listing cut by the time bound is the same whenever it is made."""
        return self.bound != "time"

    def to_json(self) -> str:
        """Compact JSON (entries as arrays); ASCII, names' lone surrogates escaped."""
        head = {
            "v": 1,
            "format": self.format,
            "truncated": self.truncated,
            "bound": self.bound,
            "malformed": self.malformed,
            "reason": self.reason,
            "compressed_bytes": self.compressed_bytes,
            "decompressed_bytes": self.decompressed_bytes,
            "media_type": self.media_type,
            "limits": self.limits,
            "entries": [
                [e.path, e.type, e.size, e.mode, e.mtime, e.linkname, e.uid, e.gid, e.cut]
                for e in self.entries
            ],
        }
        return json.dumps(head, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> LayerListing:
        """The listing :meth:`to_json` wrote; ValueError if ``text`` is not one."""
        try:
            data = json.loads(text)
            if data.get("v") != 1 or data["format"] not in FORMATS:
                raise ValueError("not a layer listing")
            entries = tuple(
                LayerEntry(
                    str(p), str(t), int(s), int(m), int(mt), str(ln), int(u), int(g), bool(c)
                )
                for p, t, s, m, mt, ln, u, g, c in data["entries"]
            )
            limits = data.get("limits")
            return cls(
                format=data["format"],
                entries=entries,
                truncated=bool(data["truncated"]),
                bound=data["bound"],
                malformed=bool(data["malformed"]),
                reason=data["reason"],
                compressed_bytes=int(data["compressed_bytes"]),
                decompressed_bytes=int(data["decompressed_bytes"]),
                media_type=data["media_type"],
                limits=dict(limits) if limits is not None else None,
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a layer listing: {e}") from None


def bound_reason(bound: str, limits: ListingLimits) -> str:
    return {
        "entries": f"stopped after {limits.max_entries} entries",
        "decompressed": f"stopped after {format_size(limits.max_decompressed_bytes)} decompressed",
        "compressed": f"stopped after reading {format_size(limits.max_compressed_bytes)}",
        "names": f"stopped after {format_size(limits.max_names_bytes)} of names",
        "time": f"stopped after {limits.max_seconds:g} s",
    }[bound]


# -- names for display --------------------------------------------------------------------------


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


#: how :func:`printable` shows a ``..`` path component: between single angle quotes
PARENT_MARK = "\u2039..\u203a"


def escape_unprintable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\xNN``/``\\uNNNN``/
    ``\\UNNNNNNNN``: controls, format characters such as right-to-left overrides, line
    separators, bytes that were not UTF-8) and backslashes doubled: pushed text of any kind
    (labels, history, annotations) shown as what it is."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(_escape(ch))
    return "".join(out)


def printable(name: str, max_chars: int | None = None) -> str:
    """``name`` for display: every character that is not printable (controls such as ESC or
    NUL, format characters such as right-to-left overrides, line separators, bytes that were
    not UTF-8) escaped as ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN``, backslashes doubled so an
    escape is never ambiguous, and every ``..`` component shown as :data:`PARENT_MARK`.
    ``max_chars`` cuts the result, ending it with an ellipsis. HTML escaping is left to the
    template."""
    text = escape_unprintable(name)
    if ".." in text:
        text = "/".join(PARENT_MARK if part == ".." else part for part in text.split("/"))
    if max_chars is not None and len(text) > max_chars:
        text = text[: max(max_chars - 1, 0)] + "\u2026"
    return text


def unsafe_path(name: str) -> bool:
    """The path would land outside the layer's root if taken literally: absolute, or with a
    ``..`` component (extractors strip or refuse these; the UI may flag them)."""
    return name.startswith("/") or ".." in name.split("/")


# -- the streaming lister (runs on worker threads) --------------------------------------------


class _Stop(Exception):
    """Ends a listing from anywhere in a step; what ended it is recorded before."""


_HEADER, _SKIP, _EXTENDED_DATA, _SPARSE, _END = range(5)


def _nts(field: bytes) -> bytes:
    """A NUL-terminated field's bytes."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _number(field: bytes) -> int:
    """A numeric header field, octal or GNU base-256 (as tarfile reads it); ValueError."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            n -= 256 ** (len(field) - 1)
        return n
    text = _nts(field).decode("ascii").strip()
    return int(text or "0", 8)


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    # the unsigned sum is the standard's; some old tars summed signed bytes
    return stored == 256 + sum(_UNSIGNED.unpack(block)) or stored == 256 + sum(
        _SIGNED.unpack(block)
    )


def _pad(size: int) -> int:
    return -size % BLOCK


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header that a listing uses; ValueError if it is malformed."""
    found: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        match = _PAX_LENGTH.match(data, pos)
        if match is None:
            raise ValueError("bad record length")
        length = int(match.group(1))
        end = pos + length - 1  # the record's final newline
        if length < 5 or end >= len(data) or data[end] != 0x0A:
            raise ValueError("bad record framing")
        keyword, equals, value = data[match.end() : end].partition(b"=")
        if not keyword or not equals:
            raise ValueError("bad record")
        if keyword in _PAX_KEYS:
            found[keyword] = value
        pos += length
    return found


def _pax_int(value: bytes) -> int | None:
    """A pax number (times may have a fraction); None if it is not one."""
    if len(value) > 40:
        return None
    try:
        return int(float(value)) if b"." in value else int(value)
    except (ValueError, OverflowError):
        return None


class _Sink:
    """Where the zstd decompressor writes its output, :data:`STEP` bytes at a time."""

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self._out = out

    def write(self, data: bytes) -> int:
        self._out(data)
        return len(data)


def _skippable(head: bytes) -> bool:
    """``head`` starts with the magic number of a zstd skippable frame (0x184D2A5?)."""
    return head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class _ZstdFrames:
    """Follows zstd frames through the compressed bytes, by their headers and block headers
    (never decompressing), to tell whether a blob ends between frames: the streaming
    decompressor does not say. Lost (and no longer consulted) on bytes that are not frames,
    which the decompressor reports itself."""

    def __init__(self) -> None:
        self._head = bytearray()  # a magic number, frame header or block header being gathered
        self._need = 4
        self._state = "magic"
        self._skip = 0
        self._checksum = False
        self.lost = False

    @property
    def between_frames(self) -> bool:
        return self.lost or (self._state == "magic" and not self._head and not self._skip)

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n and not self.lost:
            if self._skip:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                continue
            take = min(self._need - len(self._head), n - pos)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) == self._need:
                head, self._head = bytes(self._head), bytearray()
                self._step(head)

    def _step(self, head: bytes) -> None:
        if self._state == "magic":
            if head == ZSTD_MAGIC:
                self._state, self._need = "descriptor", 1
            elif _skippable(head):
                self._state, self._need = "skippable", 4
            else:
                self.lost = True
        elif self._state == "skippable":
            self._skip = int.from_bytes(head, "little")
            self._state, self._need = "magic", 4
        elif self._state == "descriptor":
            descriptor = head[0]
            single_segment = descriptor >> 5 & 1
            content_size = (single_segment, 2, 4, 8)[descriptor >> 6]
            self._checksum = bool(descriptor >> 2 & 1)
            self._skip = (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size
            self._state, self._need = "block", 3
        else:  # a block header: last-block bit, type, size
            header = int.from_bytes(head, "little")
            kind, size = header >> 1 & 3, header >> 3
            if kind == 3:
                self.lost = True
            self._skip = 1 if kind == 1 else size  # an RLE block holds one byte
            if header & 1:
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4


class _Lister:
    """One listing's state: format detection, decompression, and an incremental tar parser.
    Fed from the async side (:meth:`feed` per chunk read, :meth:`finish` at the end of the
    blob), one call at a time, each on a worker thread. Never raises: a bound, the end of the
    archive or malformed data set ``done``."""

    def __init__(self, limits: ListingLimits, deadline: float) -> None:
        self.limits = limits
        self.deadline = deadline
        self.format: str | None = None
        self.entries: list[LayerEntry] = []
        self.compressed = 0
        self.decompressed = 0
        self.done = False
        self.bound: str | None = None
        self.error: str | None = None
        self._sniffed = bytearray()
        self._unknown: str | None = None
        # decoders
        self._gzip: Any = None
        self._gzip_partial = False  # a gzip member has begun and not ended
        self._zstd: Any = None
        self._zstd_frames = _ZstdFrames()
        # the tar stream
        self._state = _HEADER
        self._offset = 0  # bytes of tar stream parsed
        self._buf = bytearray()  # a header block or extended header being gathered
        self._skip = 0
        self._ext_type = 0
        self._ext_left = 0
        self._ext_pad = 0
        self._sparse_content = 0
        self._long_name: bytes | None = None
        self._long_link: bytes | None = None
        self._pax: dict[bytes, bytes] = {}
        self._pax_global: dict[bytes, bytes] = {}
        self._names = 0
        self._current = ""  # the entry whose content is being skipped

    # -- outcomes

    def stop(self, bound: str) -> None:
        """End at ``bound`` (from outside a step: time, bytes read)."""
        if not self.done:
            self.done = True
            self.bound = bound

    def _bound(self, bound: str) -> None:
        self.stop(bound)
        raise _Stop

    def _fail(self, message: str) -> None:
        if not self.done:
            self.done = True
            self.error = message
        raise _Stop

    def _end(self) -> None:
        self.done = True
        self._state = _END
        raise _Stop

    def result(self, media_type: str | None) -> LayerListing:
        reason = None
        if self.bound is not None:  # time may run out before the format is known
            reason = bound_reason(self.bound, self.limits)
        elif self.error is not None:
            reason = self.error
        elif self.format == "unknown":
            reason = self._unknown
            if media_type:
                reason = f"{reason} (media type {media_type})"
        return LayerListing(
            format=self.format or "unknown",
            entries=tuple(self.entries),
            truncated=self.bound is not None,
            bound=self.bound,
            malformed=self.error is not None,
            reason=reason,
            compressed_bytes=self.compressed,
            decompressed_bytes=self.decompressed,
            media_type=media_type,
            limits=self.limits.key(),
        )

    # -- input

    def feed(self, data: bytes) -> None:
        """The blob's next bytes."""
        if self.done or not data:
            return
        self.compressed += len(data)
        self._guarded(self._feed, data)

    def finish(self) -> None:
        """The blob ends here."""
        if not self.done:
            self._guarded(self._finish)
        self.done = True

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except _Stop:
            pass
        except zlib.error as e:
            self.done, self.error = True, f"corrupt gzip data: {e}"
        except zstandard.ZstdError as e:
            self.done, self.error = True, f"corrupt zstd data: {e}"
            if "too much memory" in str(e):
                window = format_size(self.limits.max_zstd_window)
                self.error = f"the zstd stream asks for a window larger than {window}"
        except Exception:  # a bug: the caller still gets what was listed
            log.exception("listing a layer failed")
            self.done, self.error = True, "internal error while listing"

    def _feed(self, data: bytes) -> None:
        if self.format is None:
            self._sniffed += data
            if not self._detect(final=False):
                return
            data, self._sniffed = bytes(self._sniffed), bytearray()
        self._decode(data)

    def _finish(self) -> None:
        if self.format is None:
            self._detect(final=True)
            data, self._sniffed = bytes(self._sniffed), bytearray()
            self._decode(data)
        if self.format == "unknown":
            return
        if self._state == _HEADER and not self._buf:
            if self._gzip_partial:
                self._fail("the gzip stream ends early")
            if self.format == "tar+zstd" and not self._zstd_frames.between_frames:
                self._fail("the zstd stream ends early")
            return  # at an entry's end without the end-of-archive blocks: tarfile accepts it
        if self._state in (_SKIP, _SPARSE) and self._current:
            self._fail(f"the archive ends early, in the content of {self._current}")
        self._fail(f"the archive ends early, in a header at offset {self._offset - len(self._buf)}")

    def _detect(self, final: bool) -> bool:
        """Decide the format from the first bytes: True once decided (``format`` set)."""
        head = bytes(self._sniffed[:BLOCK])
        if head.startswith(GZIP_MAGIC):
            self.format = "tar+gzip"
            self._gzip = zlib.decompressobj(wbits=31)
            return True
        if head.startswith(ZSTD_MAGIC) or _skippable(head):
            self.format = "tar+zstd"
            decompressor = zstandard.ZstdDecompressor(max_window_size=self.limits.max_zstd_window)
            self._zstd = decompressor.stream_writer(_Sink(self._out), write_size=STEP)
            return True
        if not final and len(head) < BLOCK:
            return False
        if len(head) == BLOCK and (
            head[257:262] == b"ustar" or head == ZERO_BLOCK or _checksum_ok(head)
        ):
            self.format = "tar"
            return True
        self.format = "unknown"
        self.done = True
        named = next((name for magic, name in UNSUPPORTED_MAGIC if head.startswith(magic)), None)
        if not head:
            self._unknown = "the blob is empty"
        elif named is not None:
            self._unknown = f"{named}-compressed data cannot be listed"
        else:
            self._unknown = "not a tar archive (plain, gzip- or zstd-compressed)"
        return True

    def _decode(self, data: bytes) -> None:
        if self.format == "tar":
            view = memoryview(data)
            for start in range(0, len(view), STEP):
                self._out(view[start : start + STEP])
        elif self.format == "tar+gzip":
            self._inflate(data)
        elif self.format == "tar+zstd" and data:
            self._zstd_frames.feed(data)
            self._zstd.write(data)

    def _inflate(self, data: bytes) -> None:
        """gzip members one after another, :data:`STEP` bytes of output at a time; zero bytes
        between members (padding some tools add) are skipped."""
        while True:
            if not self._gzip_partial:
                data = data.lstrip(b"\0")
                if not data:
                    return
                self._gzip_partial = True
            given = len(data)
            out = self._gzip.decompress(data, STEP)
            data = self._gzip.unconsumed_tail
            if out:
                self._out(out)
            if self._gzip.eof:
                data = self._gzip.unused_data + data
                self._gzip = zlib.decompressobj(wbits=31)
                self._gzip_partial = False
            elif len(out) < STEP and (not data or len(data) == given):
                return  # all input taken (or none takeable), no output pending

    def _out(self, piece: bytes | memoryview) -> None:
        """The next bytes of tar stream, at most :data:`STEP`: parse them, then check the
        bounds."""
        room = self.limits.max_decompressed_bytes - self.decompressed
        over = len(piece) > room
        if over:
            piece = piece[:room]
        self.decompressed += len(piece)
        self._parse(memoryview(piece))
        if over:
            self._bound("decompressed")
        if time.monotonic() >= self.deadline:
            self._bound("time")

    # -- the tar stream

    def _parse(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            state = self._state
            if state == _SKIP:
                take = min(self._skip, n - pos)
                self._skip -= take
                pos += take
                self._offset += take
                if not self._skip:
                    self._state = _HEADER
                continue
            if state == _EXTENDED_DATA:
                take = min(self._ext_left, n - pos)
                self._buf += view[pos : pos + take]
                pos += take
                self._offset += take
                self._ext_left -= take
                if not self._ext_left:
                    data, self._buf = bytes(self._buf), bytearray()
                    self._extended(data)
                continue
            if state == _END:
                raise _Stop
            # a 512-byte block: a header, or a GNU sparse file's extension
            if not self._buf and n - pos >= BLOCK:
                block = view[pos : pos + BLOCK].tobytes()
                pos += BLOCK
                self._offset += BLOCK
            else:
                take = min(BLOCK - len(self._buf), n - pos)
                self._buf += view[pos : pos + take]
                pos += take
                self._offset += take
                if len(self._buf) < BLOCK:
                    continue
                block, self._buf = bytes(self._buf), bytearray()
            if state == _HEADER:
                self._header(block, self._offset - BLOCK)
            elif block[504] == 0:  # the sparse map's last extension block
                self._content(self._sparse_content)

    def _content(self, size: int) -> None:
        self._skip = size + _pad(size)
        self._state = _SKIP if self._skip else _HEADER

    def _header(self, block: bytes, at: int) -> None:
        if block == ZERO_BLOCK:
            self._end()  # tarfile, too, ends at the first zero block
        if not _checksum_ok(block):
            if at == 0:
                self._fail("not a tar archive: no valid header at the start")
            self._fail(f"bad header checksum at offset {at}")
        flag = block[156]
        try:
            size = _number(block[124:136])
            if size < 0:
                raise ValueError("negative size")
            if flag in _EXTENDED:
                return self._extended_header(flag, size, at)
            mode = _number(block[100:108])
            uid = _number(block[108:116])
            gid = _number(block[116:124])
            mtime = _number(block[136:148])
            real_size = _number(block[483:495]) if flag == ord("S") else size
        except ValueError:
            return self._fail(f"invalid header at offset {at}")
        name = _nts(block[0:100])
        link = _nts(block[157:257])
        if block[257:263] == b"ustar\x00" and flag != ord("S"):
            prefix = _nts(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if flag == 0:  # a V7 regular file, or a directory by its trailing slash
            flag = ord("5") if name.endswith(b"/") else ord("0")
        if self._long_name is not None:
            name = self._long_name
        if self._long_link is not None:
            link = self._long_link
        pax = {**self._pax_global, **self._pax} if self._pax_global else self._pax
        if pax:
            # an empty value unsets a global one; a number that is not one counts as 0 (tarfile)
            pax = {key: value for key, value in pax.items() if value}
            name = pax.get(b"GNU.sparse.name", pax.get(b"path", b"")).rstrip(b"/") or name
            link = pax.get(b"linkpath", link)
            if b"size" in pax:
                size = real_size = _pax_int(pax[b"size"]) or 0
                if size < 0:
                    self._fail(f"invalid pax size at offset {at}")
            sparse = pax.get(b"GNU.sparse.realsize", pax.get(b"GNU.sparse.size"))
            if sparse is not None:
                real_size = _pax_int(sparse) or 0
            uid = _pax_int(pax[b"uid"]) or 0 if b"uid" in pax else uid
            gid = _pax_int(pax[b"gid"]) or 0 if b"gid" in pax else gid
            mtime = _pax_int(pax[b"mtime"]) or 0 if b"mtime" in pax else mtime
        self._long_name = self._long_link = None
        self._pax = {}
        if flag == ord("5"):
            name = name.rstrip(b"/") or name[:1]
        self._entry(name, link, flag, real_size, mode, mtime, uid, gid)
        if flag == ord("S") and block[482]:
            self._sparse_content = size
            self._state = _SPARSE
        elif flag not in _NO_CONTENT:
            self._content(size)

    def _entry(
        self,
        name: bytes,
        link: bytes,
        flag: int,
        size: int,
        mode: int,
        mtime: int,
        uid: int,
        gid: int,
    ) -> None:
        limits = self.limits
        if len(self.entries) >= limits.max_entries:
            self._bound("entries")
        cut = len(name) > limits.max_name_bytes or len(link) > limits.max_name_bytes
        if cut:
            name, link = name[: limits.max_name_bytes], link[: limits.max_name_bytes]
        self._names += len(name) + len(link)
        if self._names > limits.max_names_bytes:
            self._bound("names")
        path = name.decode("utf-8", "surrogateescape")
        self._current = path
        self.entries.append(
            LayerEntry(
                path=path,
                type=chr(flag),
                size=size,
                mode=mode & 0o7777,
                mtime=mtime,
                linkname=link.decode("utf-8", "surrogateescape"),
                uid=uid,
                gid=gid,
                cut=cut,
            )
        )

    def _extended_header(self, flag: int, size: int, at: int) -> None:
        if size > MAX_EXTENDED_HEADER:
            self._fail(f"extended header at offset {at} is too large ({format_size(size)})")
        self._ext_type, self._ext_left, self._ext_pad = flag, size, _pad(size)
        self._current = ""
        if size:
            self._state = _EXTENDED_DATA
        else:
            self._extended(b"")

    def _extended(self, data: bytes) -> None:
        """An extended header's content, gathered whole: it describes the next entry."""
        flag = self._ext_type
        if flag == ord("L"):
            self._long_name = _nts(data)
        elif flag == ord("K"):
            self._long_link = _nts(data)
        else:
            try:
                records = _pax_records(data)
            except ValueError as e:
                self._fail(f"invalid pax header before offset {self._offset}: {e}")
            (self._pax_global if flag == ord("g") else self._pax).update(records)
        self._skip = self._ext_pad
        self._state = _SKIP if self._skip else _HEADER


# -- reading a blob -----------------------------------------------------------------------------


class BlobOpener(Protocol):
    """What a listing reads through: ``LinkedBlobs`` or ``BlobStore`` (or a test's fake)."""

    async def open(self, digest: Digest, offset: int, length: int) -> BlobContent: ...


DEFAULT_LIMITS = ListingLimits()


async def list_layer(
    blobs: BlobOpener,
    digest: Digest,
    size: int,
    limits: ListingLimits = DEFAULT_LIMITS,
    *,
    media_type: str | None = None,
) -> LayerListing:
    """List the files of the layer ``digest`` (``size`` bytes, as ``blobs.stat`` says), reading
    it through ``blobs``, within ``limits``. Never raises for what the blob holds: see the
    module's docstring. Raises what ``blobs.open`` and reading raise (StorageError,
    RegistryError BLOB_UNKNOWN)."""
    lister = _Lister(limits, time.monotonic() + limits.max_seconds)
    length = min(max(size, 0), limits.max_compressed_bytes)
    read = 0
    if length:
        content = await blobs.open(digest, 0, length)
        if isinstance(content, LocalRange):
            try:
                read = await _read_local(content, lister)
            finally:
                content.close()
        else:
            try:
                read = await _read_stream(content, lister)
            finally:
                await content.close()
    if not lister.done:  # the reading ended: at the bound on bytes read, or the blob's end
        if read >= length and length < size:
            lister.stop("compressed")
        else:
            await asyncio.to_thread(lister.finish)
    return lister.result(media_type)


async def _read_local(content: LocalRange, lister: _Lister) -> int:
    """Read and feed a local file in worker steps (a read and its parsing in each)."""
    file, remaining, read = content.file, content.length, 0

    def step(first: bool, want: int) -> int:
        if first:
            file.seek(content.offset)
        data = file.read(want)
        lister.feed(data)
        return len(data)

    while remaining > 0 and not lister.done:
        if time.monotonic() >= lister.deadline:
            lister.stop("time")
            break
        try:
            n = await asyncio.to_thread(step, read == 0, min(READ_CHUNK, remaining))
        except OSError as e:
            raise StorageError(f"reading a layer failed: {e}") from e
        if not n:
            break  # shorter than it said
        read += n
        remaining -= n
    return read


async def _read_stream(content: AsyncIterator[bytes], lister: _Lister) -> int:
    """Read a stream and feed it in worker steps; waiting for storage counts against the time
    bound."""
    chunks = aiter(content)
    read = 0
    while not lister.done:
        left = lister.deadline - time.monotonic()
        if left <= 0:
            lister.stop("time")
            break
        try:
            async with asyncio.timeout(left):
                chunk = await anext(chunks, None)
        except TimeoutError:
            lister.stop("time")
            break
        if chunk is None:
            break
        read += len(chunk)
        for start in range(0, len(chunk), READ_CHUNK):
            piece = chunk if len(chunk) <= READ_CHUNK else chunk[start : start + READ_CHUNK]
            await asyncio.to_thread(lister.feed, piece)
            if lister.done:
                break
    return read


# -- rationing ------------------------------------------------------------------------------


class ListingBusy(Exception):
    """A listing refused for now: the user made too many lately (``reason`` "rate"), or the
    process is making as many as it may (``reason`` "busy"). Answer 429 with ``Retry-After``."""

    def __init__(self, retry_after: float, reason: str) -> None:
        self.retry_after = retry_after
        self.reason = reason
        text = {
            "rate": "too many layer listings; try again in {:.0f} s",
            "busy": "the server is busy listing other layers; try again in {:.0f} s",
        }[reason]
        super().__init__(text.format(max(retry_after, 1)))


class Permit:
    """A slot to make one listing; :meth:`release` once done (again is harmless)."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
            self._slots = None


class ListingLimiter:
    """Rations listings that have to be made (cached ones are free), in one worker process:

    - per user key (a user name, or an address for anonymous users): a token bucket of
      ``burst`` listings, refilled at ``per_minute``; over it, :class:`ListingBusy` "rate" at
      once, with the seconds until a token is back;
    - per process: at most ``concurrency`` at once; another waits up to ``wait`` seconds for a
      slot, then is refused with :class:`ListingBusy` "busy" (its token given back).

    With N worker processes the server as a whole allows N times as much. At most ``max_users``
    buckets are kept; the least recently used go first (a user forgotten starts full again)."""

    def __init__(
        self,
        per_minute: float = 6.0,
        burst: int = 3,
        concurrency: int = 2,
        wait: float = 2.0,
        max_users: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.wait = wait
        self.max_users = max_users
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, user: str, now: float) -> float:
        tokens, at = self._buckets.get(user, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _spend(self, user: str) -> float:
        """Take a token: 0 if there was one, else the seconds until there is."""
        now = self._clock()
        tokens = self._tokens(user, now)
        if tokens < 1:
            return (1 - tokens) / self.rate if self.rate > 0 else 60.0
        self._buckets[user] = (tokens - 1, now)
        self._buckets.move_to_end(user)
        while len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
        return 0.0

    def _refund(self, user: str) -> None:
        now = self._clock()
        self._buckets[user] = (min(self.burst, self._tokens(user, now) + 1), now)

    async def take(self, user: str) -> Permit:
        """A permit to make one listing for ``user``, or ListingBusy."""
        retry = self._spend(user)
        if retry:
            raise ListingBusy(retry, "rate")
        try:
            async with asyncio.timeout(self.wait):
                await self._slots.acquire()
        except TimeoutError:
            self._refund(user)
            raise ListingBusy(self.wait, "busy") from None
        return Permit(self._slots)

    @contextlib.asynccontextmanager
    async def acquire(self, user: str) -> AsyncIterator[None]:
        """``async with limiter.acquire(user):`` make one listing; ListingBusy on entering
        when over the limits."""
        permit = await self.take(user)
        try:
            yield
        finally:
            permit.release()


# -- the cache --------------------------------------------------------------------------------


#: the most bytes a cached listing may decompress to when read back
MAX_CACHED_JSON = 256 * MiB


def _pack(listing: LayerListing) -> bytes:
    """gzip (fast), as the file's name says."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    return compressor.compress(listing.to_json().encode("ascii")) + compressor.flush()


def _unpack(data: bytes) -> LayerListing:
    decompressor = zlib.decompressobj(wbits=31)
    text = decompressor.decompress(data, MAX_CACHED_JSON)
    if decompressor.unconsumed_tail or not decompressor.eof:
        raise ValueError("not a whole cached listing")
    return LayerListing.from_json(text)


def _weight(listing: LayerListing) -> int:
    """About the bytes a listing holds in memory."""
    return 200 + sum(150 + len(e.path) + len(e.linkname) for e in listing.entries)


class LayerListings:
    """Layer listings, each made once: kept in storage (``layout.layer_listing``, beside the
    registry's tree, gzip-compressed JSON) and in an LRU of up to ``memory_bytes`` in this
    process. Listings cut by the time bound are never kept. A kept listing is used only under
    the limits it was made with. Derived data: deleting the files loses nothing but time.

    Listings are by digest, not repository: the caller checks the user may see the blob
    (``LinkedBlobs.stat``) before asking."""

    def __init__(
        self,
        storage: Store,
        limits: ListingLimits = DEFAULT_LIMITS,
        limiter: ListingLimiter | None = None,
        memory_bytes: int = 64 * MiB,
    ) -> None:
        self.storage = storage
        self.limits = limits
        self.limiter = limiter or ListingLimiter()
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[Digest, tuple[LayerListing, int]] = OrderedDict()
        self._held = 0
        self._making: dict[Digest, asyncio.Future[LayerListing]] = {}

    def _remember(self, digest: Digest, listing: LayerListing) -> None:
        weight = _weight(listing)
        if weight > self.memory_bytes:
            return
        old = self._memory.pop(digest, None)
        if old is not None:
            self._held -= old[1]
        self._memory[digest] = (listing, weight)
        self._held += weight
        while self._held > self.memory_bytes:
            _, (_, dropped) = self._memory.popitem(last=False)
            self._held -= dropped

    async def cached(self, digest: Digest) -> LayerListing | None:
        """The kept listing of ``digest``, or None: from memory, else one storage read. A
        stored listing that cannot be read counts as none."""
        found = self._memory.get(digest)
        if found is not None:
            self._memory.move_to_end(digest)
            return found[0]
        path = layout.layer_listing(digest)
        try:
            data = await self.storage.read(path)
        except PathNotFound:
            return None
        except StorageError as e:
            log.warning("reading the cached listing of %s failed: %s", digest, e)
            return None
        try:
            listing = await asyncio.to_thread(_unpack, data)
        except (ValueError, zlib.error) as e:
            log.warning("ignoring the unreadable cached listing of %s: %s", digest, e)
            return None
        if listing.limits != self.limits.key():
            return None
        self._remember(digest, listing)
        return listing

    async def listing(
        self,
        blobs: BlobOpener,
        digest: Digest,
        size: int,
        *,
        user: str,
        media_type: str | None = None,
    ) -> LayerListing:
        """The listing of ``digest`` (``size`` from ``blobs.stat``): the kept one, else one
        made now for ``user`` (ListingBusy when the limiter refuses) and kept. Concurrent
        requests for the same layer share one listing, which finishes (and is kept) even if
        the request that started it goes away."""
        found = await self.cached(digest)
        if found is not None:
            return found
        making = self._making.get(digest)
        if making is None:
            permit = await self.limiter.take(user)
            making = self._making.get(digest)  # started while this one waited for a slot
            if making is not None:
                permit.release()
            else:
                making = asyncio.ensure_future(self._make(permit, blobs, digest, size, media_type))
                self._making[digest] = making
                making.add_done_callback(lambda done: self._done(digest, done))
        return await asyncio.shield(making)

    def _done(self, digest: Digest, done: asyncio.Future[LayerListing]) -> None:
        if self._making.get(digest) is done:
            del self._making[digest]
        if not done.cancelled():
            done.exception()  # retrieved: nobody may be waiting any more

    async def _make(
        self,
        permit: Permit,
        blobs: BlobOpener,
        digest: Digest,
        size: int,
        media_type: str | None,
    ) -> LayerListing:
        try:
            listing = await list_layer(blobs, digest, size, self.limits, media_type=media_type)
        finally:
            permit.release()
        if listing.cacheable:
            self._remember(digest, listing)
            await self._store(digest, listing)
        return listing

    async def _store(self, digest: Digest, listing: LayerListing) -> None:
        try:
            data = await asyncio.to_thread(_pack, listing)
            await self.storage.write(layout.layer_listing(digest), data)
        except StorageError as e:
            log.warning("keeping the listing of %s failed: %s", digest, e)

    async def forget(self, digest: Digest) -> None:
        """Drop the kept listing of ``digest`` (when its blob is deleted)."""
        found = self._memory.pop(digest, None)
        if found is not None:
            self._held -= found[1]
        await self.storage.delete_if_present(layout.layer_listing(digest))
