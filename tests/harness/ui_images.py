"""Images for the web UI's tests, made by hand in OCI layouts (``harness.oci``) and pushed with
skopeo (``harness.skopeo``; always ``--preserve-digests``, so the registry holds the very bytes
made here):

- ``push_app_image``: a normal single-arch image: entrypoint, cmd, env, labels, exposed ports,
  volumes, a history with ``created_by`` for every layer (and empty-layer steps between), two
  gzip layers of files, directories, symlinks and a whiteout;
- ``push_multiarch_index``: an OCI index of two such images (linux/amd64, linux/arm64/v8);
- ``push_referrer``: an artifact (an SBOM, ``application/spdx+json``) whose ``subject`` is an
  image, pushed by digest (skopeo 1.9 pushes it from a layout to ``REPO@DIGEST``);
- ``push_hostile_image``: script payloads (``PAYLOADS``) in every string the UI may show:
  labels (keys and values), manifest, layer and referrer annotations, history, env, entrypoint,
  cmd, ports, volumes, user, working directory, author, file and symlink names in a layer, a
  referrer's ``artifactType``; names with control characters, ``../../etc/passwd``, invalid
  UTF-8 and very long names and values. A payload that runs calls ``__pwned("field:kind")``
  (recorded by ``harness.browser``);
- ``push_hostile_layer_images``: layers that must not be read whole: a gzip bomb (4 GiB of zeros
  in one tar entry, 4 MiB compressed; its gzip size field wraps to 1536), a tar of a million
  entries in one directory (gzip level 1, about 10 MiB), a gzip "layer" that is not a tar, and a
  zstd tar (``tar+zstd``), as images of one layer each and one image of all four.

Each builder returns a ``PushedImage``: repository, tag, manifest digest and bytes, config
digest and content, the layers (digest, media type, diff id, names inside), and for hostile
images the payloads by where they were put. Layers are deterministic (fixed times); the big
hostile ones are made once per process.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.client import OCI_INDEX, OCI_MANIFEST, sha256
from harness.net import Loopback
from harness.oci import CONFIG_MEDIA_TYPE, OciLayout
from harness.skopeo import Push, push, skopeo

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
SPDX = "application/spdx+json"

MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"

#: how the hostile strings try to run script, by kind; ``{t}`` is the tag ``__pwned`` gets
PAYLOADS: dict[str, str] = {
    "script": '<script>__pwned("{t}")</script>',
    "attr": '"><img src=x onerror=__pwned("{t}")>',
    "attr1": "'><img src=x onerror=__pwned('{t}')>",
    "url": 'javascript:__pwned("{t}")',
    "url-obfuscated": ' \tjava\nscript:__pwned("{t}")',
    "rcdata": '</textarea></title></style><svg onload=__pwned("{t}")>',
    "script-end": '</script><script>__pwned("{t}")</script>',
}
#: hostile strings without a ``/`` (each stays one component of a path in a layer)
NAME_PAYLOADS: dict[str, str] = {
    "attr": '"><img src=x onerror=__pwned("{t}")>',
    "svg": "<svg onload=__pwned('{t}')>",
    "iframe": "<iframe srcdoc=\"&lt;img src=x onerror=parent.__pwned('{t}')&gt;\">",
}
#: strings that must be shown as they are (a template engine would print 49)
TEMPLATE_MARKERS = ("{{7*7}}", "${7*7}", "#{7*7}", "<%= 7*7 %>")
#: names that are strange rather than script: terminal escapes, line breaks, a right-to-left
#: override, a path out of the root, an absolute path
STRANGE_NAMES = (
    "\x1b[31mred\x1b[0m",
    "carriage\rreturn\nnewline",
    "tab\there\x07bell",
    "evil\u202egpj.exe",
    "../../etc/passwd",
    "/etc/shadow",
)
LONG = 65_536  # characters of the very long values
LONG_NAME_COMPONENT = 255  # the longest name of one path component on Linux
LONG_PATH_COMPONENTS = 40  # components of 100 characters in the very long path in a layer


def payload(kind: str, tag: str) -> str:
    """``PAYLOADS[kind]`` calling ``__pwned(tag)``."""
    return PAYLOADS[kind].replace("{t}", tag)


def payloads_for(field_name: str, kinds: Mapping[str, str] = PAYLOADS) -> dict[str, str]:
    """Every payload kind for ``field_name``, keyed ``"field:kind"`` (also the tag it calls
    ``__pwned`` with)."""
    return {f"{field_name}:{k}": v.replace("{t}", f"{field_name}:{k}") for k, v in kinds.items()}


# -- layers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A tar entry: ``kind`` file, dir, symlink or hardlink (to ``target``)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int | None = None


def file(name: str, data: bytes | str = b"", mode: int = 0o644) -> Entry:
    return Entry(name, "file", data.encode() if isinstance(data, str) else data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Entry:
    return Entry(name, "dir", mode=mode)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, "symlink", target=target, mode=0o777)


def hardlink(name: str, target: str) -> Entry:
    return Entry(name, "hardlink", target=target, mode=0o644)


@dataclass(frozen=True)
class Layer:
    """A layer blob as pushed, with what a test checks the UI shows of it."""

    blob: bytes = field(repr=False)
    media_type: str
    diff_id: str  # sha256 of the uncompressed content
    uncompressed_size: int
    names: tuple[str, ...] = ()  # the entries' names (all of them, unless there are too many)
    entry_count: int = 0  # tar entries (0: not a tar)
    digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", sha256(self.blob))

    @property
    def size(self) -> int:
        return len(self.blob)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
}


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    """A PAX tar of ``entries`` (owned by root, fixed times; names may hold any character,
    lone surrogates are written as the raw bytes they escape)."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mtime = MTIME
            info.uname = info.gname = "root"
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.linkname = e.target
            info.size = len(e.data) if e.kind == "file" else 0
            tar.addfile(info, io.BytesIO(e.data) if e.kind == "file" else None)
    return out.getvalue()


def tar_layer(entries: Sequence[Entry], compression: str = "gzip") -> Layer:
    """A tar layer of ``entries``, ``compression`` gzip or zstd."""
    tar = tar_bytes(entries)
    names = tuple(e.name for e in entries)
    if compression == "gzip":
        blob, media_type = gzip.compress(tar, mtime=0), GZIP_LAYER
    elif compression == "zstd":
        blob, media_type = _zstd(tar), ZSTD_LAYER
    else:
        raise ValueError(compression)
    return Layer(blob, media_type, sha256(tar), len(tar), names, len(entries))


def _zstd(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError as exc:  # a test dependency (pip install zstandard)
        raise RuntimeError("the zstd layer needs the zstandard package") from exc
    return bytes(zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data))


#: the gzip bomb's default: zeros in one tar entry
BOMB_SIZE = 4 << 30
_ZEROS = bytes(1 << 20)


@functools.cache
def gzip_bomb_layer(size: int = BOMB_SIZE, name: str = "bomb/zeros") -> Layer:
    """A tar+gzip layer of one file of ``size`` zeros (4 GiB: 4.2 MB compressed; the gzip
    trailer's size, modulo 2**32, then reads 1536 bytes).

    Made without ever holding or compressing it whole: a 1 MiB block of zeros is deflated once
    with a full flush (which resets the compressor's history, so the block is independent of
    what precedes it) and repeated; the header and the rest are deflated around it. Hashing
    the content for the CRC and the diff id is what takes time (3 s for 4 GiB on 2 cores)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    header = info.tobuf(tarfile.PAX_FORMAT)
    zeros = size + (-size % tarfile.BLOCKSIZE) + 2 * tarfile.BLOCKSIZE  # data, padding, end
    total = len(header) + zeros

    def deflate(data: bytes, mode: int) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate
        return c.compress(data) + c.flush(mode)

    whole, rest = divmod(zeros, len(_ZEROS))
    block = deflate(_ZEROS, zlib.Z_FULL_FLUSH)

    def crc32() -> int:  # in a thread, beside the hash (both release the GIL)
        crc = zlib.crc32(header)
        for _ in range(whole):
            crc = zlib.crc32(_ZEROS, crc)
        return zlib.crc32(_ZEROS[:rest], crc)

    with ThreadPoolExecutor(1) as pool:
        crc_of_content = pool.submit(crc32)
        diff = hashlib.sha256(header)
        for _ in range(whole):
            diff.update(_ZEROS)
        diff.update(_ZEROS[:rest])
        crc = crc_of_content.result()
    blob = b"".join(
        [
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03",  # gzip, no name, mtime 0, max, unix
            deflate(header, zlib.Z_FULL_FLUSH),
            block * whole,
            deflate(_ZEROS[:rest], zlib.Z_FINISH),
            crc.to_bytes(4, "little"),
            (total % (1 << 32)).to_bytes(4, "little"),
        ]
    )
    return Layer(blob, GZIP_LAYER, "sha256:" + diff.hexdigest(), total, (name,), 1)


#: the many-entries layer's default
MANY_ENTRIES = 1_000_000


@functools.cache
def many_entries_layer(count: int = MANY_ENTRIES, directory_name: str = "many") -> Layer:
    """A tar+gzip layer of ``count`` empty files ``DIR/0000000``... in one directory (and the
    directory): ``count`` headers of 512 bytes made from one template (only the name's digits
    and the checksum change), gzip level 1. A million: about 2 s, 10 MB. ``names`` holds the
    directory and the first and last file only."""
    width = max(7, len(str(count - 1)))
    info = tarfile.TarInfo(f"{directory_name}/{'0' * width}")
    info.mtime, info.mode, info.uname, info.gname = MTIME, 0o644, "root", "root"
    template = info.tobuf(tarfile.USTAR_FORMAT)
    at = template.index(b"0" * width, len(directory_name))
    # the checksum is the sum of the header's bytes with its own field as spaces; the digits
    # add their values to that of the template's zeros
    base = sum(template[:148]) + 8 * ord(" ") + sum(template[156:])
    fmt = b"".join(
        [
            template[:at].replace(b"%", b"%%"),
            b"%0" + str(width).encode() + b"d",
            template[at + width : 148].replace(b"%", b"%%"),
            b"%06o\x00 ",
            template[156:].replace(b"%", b"%%"),
        ]
    )
    low = [sum(map(int, f"{i:03d}")) for i in range(1000)]  # digit sums of 000..999

    d = tarfile.TarInfo(directory_name)
    d.type, d.mtime, d.mode, d.uname, d.gname = tarfile.DIRTYPE, MTIME, 0o755, "root", "root"
    head = d.tobuf(tarfile.USTAR_FORMAT)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip
    diff = hashlib.sha256(head)
    out = [compressor.compress(head)]
    size = len(head)
    for start in range(0, count, 1000):
        high = base + sum(map(int, str(start // 1000)))
        chunk = b"".join(
            [fmt % (i, high + low[i % 1000]) for i in range(start, min(start + 1000, count))]
        )
        diff.update(chunk)
        out.append(compressor.compress(chunk))
        size += len(chunk)
    end = bytes(2 * tarfile.BLOCKSIZE)
    diff.update(end)
    out.append(compressor.compress(end))
    out.append(compressor.flush())
    names = (
        directory_name,
        f"{directory_name}/{0:0{width}d}",
        f"{directory_name}/{count - 1:0{width}d}",
    )
    return Layer(
        b"".join(out), GZIP_LAYER, "sha256:" + diff.hexdigest(), size + len(end), names, count + 1
    )


def not_tar_layer() -> Layer:
    """A tar+gzip layer whose gzip holds text, not a tar."""
    text = b"This layer is gzip, but what it holds is not a tar archive.\n" * 200
    return Layer(gzip.compress(text, mtime=0), GZIP_LAYER, sha256(text), len(text))


def zstd_layer() -> Layer:
    """A small tar+zstd layer (files, a directory, a symlink)."""
    return tar_layer(
        [
            directory("opt/zstd"),
            file("opt/zstd/hello.txt", "compressed with zstandard\n"),
            file("opt/zstd/run.sh", "#!/bin/sh\necho zstd\n", 0o755),
            symlink("opt/zstd/latest", "hello.txt"),
        ],
        compression="zstd",
    )


# -- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushedImage:
    """An image, index or artifact as pushed: where it is, and what the UI should show of it."""

    repository: str
    tag: str | None  # None: pushed by digest only
    digest: str  # the manifest's (or index's)
    manifest: bytes = field(repr=False)
    config_digest: str | None = None  # None for an index
    config: dict[str, Any] | None = field(default=None, repr=False)
    layers: tuple[Layer, ...] = ()
    children: tuple[PushedImage, ...] = ()  # an index's images, in its order
    referrers: tuple[PushedImage, ...] = ()  # artifacts pushed with it (``subject`` = it)
    payloads: Mapping[str, str] = field(default_factory=dict, repr=False)  # "field:kind" -> s

    @property
    def media_type(self) -> str:
        return str(json.loads(self.manifest)["mediaType"])

    @property
    def manifest_json(self) -> dict[str, Any]:
        return dict(json.loads(self.manifest))

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(layer.digest for layer in self.layers)

    @property
    def descriptor(self) -> dict[str, Any]:
        """The manifest's descriptor (for a ``subject``)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.manifest)}

    @property
    def reference(self) -> str:
        """``REPO:TAG``, or ``REPO@DIGEST`` for what has no tag."""
        return f"{self.repository}:{self.tag}" if self.tag else f"{self.repository}@{self.digest}"

    @property
    def artifact_type(self) -> str | None:
        return self.manifest_json.get("artifactType")


def _manifest(
    layout: OciLayout,
    config: dict[str, Any],
    layers: Sequence[Layer],
    annotations: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """An image manifest of ``config`` and ``layers`` (both stored in ``layout``); the
    manifest (not stored) and the config's digest."""
    config_bytes = json.dumps(config, indent=2).encode()
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": layout.put(CONFIG_MEDIA_TYPE, config_bytes),
        "layers": [layout.put(layer.media_type, layer.blob) for layer in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return json.dumps(manifest, indent=2).encode(), sha256(config_bytes)


def _push(
    registry: Loopback,
    layout: OciLayout,
    work: Path,
    source: str,
    repository: str,
    tag: str,
    *,
    creds: str | None,
    index: bool = False,
) -> str:
    flags = ("--preserve-digests", *(("--all",) if index else ()))
    flags += ("--dest-creds", creds) if creds else ()
    return push(registry, layout, Push(repository, tag, source, flags), work)


def _push_by_digest(
    registry: Loopback,
    layout: OciLayout,
    source: str,
    repository: str,
    digest: str,
    creds: str | None,
) -> None:
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        *(("--dest-creds", creds) if creds else ()),
        f"oci:{layout.path}:{source}",
        f"docker://{registry.host}/{repository}@{digest}",
    )


def _layout(work: Path, name: str) -> OciLayout:
    path = work / f"layout-{name}"
    n = 0
    while path.exists():
        n += 1
        path = work / f"layout-{name}-{n}"
    return OciLayout(path, indent=2)


def app_layers(arch: str = "amd64") -> tuple[Layer, Layer]:
    """The normal image's two layers: a base (directories, files, a symlink, a file the next
    layer deletes) and an application (files, a directory symlink, the whiteout)."""
    base = tar_layer(
        [
            directory("bin"),
            file("bin/app", f"#!/bin/sh\necho app for {arch}\n", 0o755),
            symlink("bin/sh", "app"),
            directory("etc"),
            file("etc/os-release", 'NAME="Dockyard Test Linux"\nID=dockyard\nVERSION_ID=1\n'),
            file("etc/motd", "deleted by the next layer\n"),
            directory("usr"),
            directory("usr/share"),
            directory("usr/share/doc"),
            file("usr/share/doc/README", "A test image for the web UI.\n"),
        ]
    )
    app = tar_layer(
        [
            directory("srv"),
            directory("srv/data"),
            file("srv/data/config.json", '{"listen": ":8080", "mode": "production"}\n'),
            file("srv/index.html", "<!doctype html><title>app</title><p>hello</p>\n"),
            symlink("srv/current", "data"),
            directory("etc"),
            file("etc/.wh.motd"),
        ]
    )
    return base, app


def app_config(arch: str, layers: Sequence[Layer], variant: str | None = None) -> dict[str, Any]:
    """The normal image's config."""
    config: dict[str, Any] = {
        "created": CREATED,
        "author": "Dockyard tests <tests@example.com>",
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}, "8443/tcp": {}, "5353/udp": {}},
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "APP_MODE=production",
                "APP_GREETING=hello world",
            ],
            "Entrypoint": ["/bin/app"],
            "Cmd": ["--listen", ":8080"],
            "Volumes": {"/srv/data": {}},
            "WorkingDir": "/srv",
            "Labels": {
                "org.opencontainers.image.title": "app",
                "org.opencontainers.image.description": "A test image for the web UI",
                "org.opencontainers.image.version": "1.0.0",
                "org.opencontainers.image.source": "https://example.com/dockyard/app",
                "org.opencontainers.image.licenses": "Apache-2.0",
                "com.example.team": "registry",
            },
            "StopSignal": "SIGTERM",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {
                "created": CREATED,
                "created_by": "/bin/sh -c #(nop) ADD file:0123456789abcdef in / ",
                "comment": "the base",
            },
            {"created": CREATED, "created_by": "ENV APP_MODE=production", "empty_layer": True},
            {"created": CREATED, "created_by": "COPY srv/ /srv/ # buildkit"},
            {"created": CREATED, "created_by": 'ENTRYPOINT ["/bin/app"]', "empty_layer": True},
            {"created": CREATED, "created_by": 'CMD ["--listen" ":8080"]', "empty_layer": True},
        ],
    }
    if variant:
        config["variant"] = variant
    return config


def _app_image(
    layout: OciLayout, arch: str, variant: str | None = None
) -> tuple[bytes, str, dict[str, Any], tuple[Layer, ...]]:
    layers = app_layers(arch)
    config = app_config(arch, layers, variant)
    annotations = {
        "org.opencontainers.image.created": CREATED,
        "org.opencontainers.image.base.name": "docker.io/library/busybox:latest",
    }
    manifest, config_digest = _manifest(layout, config, layers, annotations)
    return manifest, config_digest, config, layers


def push_app_image(
    registry: Loopback,
    work: Path,
    repository: str = "ui/app",
    tag: str = "1.0",
    *,
    arch: str = "amd64",
    creds: str | None = None,
) -> PushedImage:
    """(a) The normal single-arch image, pushed to ``repository:tag``."""
    layout = _layout(work, "app")
    manifest, config_digest, config, layers = _app_image(layout, arch)
    layout.tag("app", manifest)
    digest = _push(registry, layout, work, "app", repository, tag, creds=creds)
    assert digest == sha256(manifest), "skopeo changed the manifest"
    return PushedImage(repository, tag, digest, manifest, config_digest, config, layers)


def push_multiarch_index(
    registry: Loopback,
    work: Path,
    repository: str = "ui/multi",
    tag: str = "1.0",
    *,
    creds: str | None = None,
) -> PushedImage:
    """(b) An OCI index of the normal image for linux/amd64 and linux/arm64/v8, pushed with
    ``--all`` to ``repository:tag``; ``children`` are the two images (no tags)."""
    layout = _layout(work, "multi")
    children = []
    descriptors = []
    for arch, variant in (("amd64", None), ("arm64", "v8")):
        manifest, config_digest, config, layers = _app_image(layout, arch, variant)
        platform = {
            "architecture": arch,
            "os": "linux",
            **({"variant": variant} if variant else {}),
        }
        descriptors.append(layout.put(OCI_MANIFEST, manifest, platform=platform))
        children.append(
            PushedImage(repository, None, sha256(manifest), manifest, config_digest, config, layers)
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": descriptors,
            "annotations": {"org.opencontainers.image.created": CREATED},
        },
        indent=2,
    ).encode()
    layout.tag("multi", index)
    digest = _push(registry, layout, work, "multi", repository, tag, creds=creds, index=True)
    assert digest == sha256(index), "skopeo changed the index"
    return PushedImage(repository, tag, digest, index, children=tuple(children))


def push_referrer(
    registry: Loopback,
    work: Path,
    subject: PushedImage,
    *,
    artifact_type: str = SPDX,
    content: bytes | None = None,
    annotations: Mapping[str, str] | None = None,
    layer_annotations: Mapping[str, str] | None = None,
    creds: str | None = None,
    payloads: Mapping[str, str] | None = None,
) -> PushedImage:
    """(c) An artifact manifest whose ``subject`` is ``subject``'s manifest: an empty config,
    one layer of ``content`` (an SPDX document by default) of media type ``artifact_type``,
    pushed by digest into ``subject``'s repository."""
    layout = _layout(work, "referrer")
    if content is None:
        content = json.dumps(
            {
                "spdxVersion": "SPDX-2.3",
                "SPDXID": "SPDXRef-DOCUMENT",
                "name": subject.reference,
                "packages": [{"name": "app", "versionInfo": "1.0.0", "SPDXID": "SPDXRef-app"}],
            },
            indent=2,
        ).encode()
    layer_descriptor = layout.put(
        artifact_type,
        content,
        annotations=dict(layer_annotations or {"org.opencontainers.image.title": "sbom.spdx.json"}),
    )
    manifest_doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {**layout.put(EMPTY_MEDIA_TYPE, b"{}"), "data": "e30="},
        "layers": [layer_descriptor],
        "subject": subject.descriptor,
        "annotations": dict(annotations or {"org.opencontainers.image.created": CREATED}),
    }
    manifest = json.dumps(manifest_doc, indent=2).encode()
    digest = layout.tag("referrer", manifest)
    _push_by_digest(registry, layout, "referrer", subject.repository, digest, creds)
    layer = Layer(content, artifact_type, sha256(content), len(content))
    return PushedImage(
        subject.repository,
        None,
        digest,
        manifest,
        sha256(b"{}"),
        {},
        (layer,),
        payloads=dict(payloads or {}),
    )


def hostile_layer_entries() -> tuple[list[Entry], dict[str, str]]:
    """The hostile image's layer: files named with payloads (each its own component), one deep
    path through ``PAYLOADS`` (whose ``/`` split them), symlinks to payloads, strange and very
    long names, invalid UTF-8; and the payloads by ``file:kind`` / ``symlink:kind``."""
    found: dict[str, str] = {}
    entries = [directory("pwn")]
    for key, value in payloads_for("file", NAME_PAYLOADS).items():
        entries.append(file(f"pwn/{value}", f"{key}\n"))
        found[key] = value
    for key, value in payloads_for("path").items():
        entries.append(file(f"pwn/paths/{value}", f"{key}\n"))
        found[key] = value
    for key, value in payloads_for("symlink").items():
        entries.append(symlink(f"pwn/link-{key.split(':')[1]}", value))
        found[key] = value
    for key, value in payloads_for("dir", NAME_PAYLOADS).items():
        entries.append(directory(f"pwn/{value}"))
        entries.append(file(f"pwn/{value}/inside"))
        found[key] = value
    for i, name in enumerate(STRANGE_NAMES):
        entries.append(file(name if name.startswith(("/", "..")) else f"pwn/{name}", f"{i}\n"))
    entries.append(hardlink("pwn/hardlink-out", "../../etc/passwd"))
    entries.append(file("pwn/bad-utf8-\udcff\udcfe-name", "invalid UTF-8 in the name\n"))
    for marker in TEMPLATE_MARKERS:
        entries.append(file(f"pwn/{marker}"))
    entries.append(file("pwn/" + "L" * LONG_NAME_COMPONENT))
    entries.append(file("pwn/" + "/".join(["d" * 99] * LONG_PATH_COMPONENTS) + "/deep"))
    return entries, found


def push_hostile_image(
    registry: Loopback,
    work: Path,
    repository: str = "ui/hostile",
    tag: str = "pwn",
    *,
    creds: str | None = None,
) -> PushedImage:
    """(d) An image with payloads (``PAYLOADS``: each calls ``__pwned("field:kind")`` if it runs)
    in every string of its config, manifest and layer, plus a referrer whose ``artifactType``,
    annotations and layer annotations carry payloads too (``referrers[0]``). ``payloads``:
    every payload put in, by ``"field:kind"`` (fields: label, label-key, env, env-name,
    history, comment, entrypoint, cmd, port, volume, user, workdir, author, annotation,
    annotation-key, url-annotation, layer-annotation, file, path, symlink, dir;
    referrer-artifact-type, referrer-annotation on the referrer)."""
    found: dict[str, str] = {}

    def take(name: str, kinds: Mapping[str, str] = PAYLOADS) -> dict[str, str]:
        p = payloads_for(name, kinds)
        found.update(p)
        return p

    entries, file_payloads = hostile_layer_entries()
    found.update(file_payloads)
    layer = tar_layer(entries)
    labels = {f"org.example.{k}": v for k, v in take("label").items()}
    labels.update({v: k for k, v in take("label-key").items()})
    labels.update({f"url.{k}": v for k, v in take("url-label", {"url": PAYLOADS["url"]}).items()})
    labels["org.opencontainers.image.source"] = payload("url", "label-source:url")
    labels["org.opencontainers.image.url"] = payload("url-obfuscated", "label-url:url-obfuscated")
    found["label-source:url"] = labels["org.opencontainers.image.source"]
    found["label-url:url-obfuscated"] = labels["org.opencontainers.image.url"]
    for i, name in enumerate(STRANGE_NAMES):
        labels[f"strange.{i}"] = name
        labels[f"strange-key-{name}"] = str(i)
    labels["control.nul"] = "before\x00after"
    labels["template"] = " ".join(TEMPLATE_MARKERS)
    labels["long.value"] = "V" * LONG
    labels["long.key." + "K" * 4096] = "long key"
    env = [f"PAYLOAD_{i}={v}" for i, v in enumerate(take("env").values())]
    env += [f"{v}=name" for v in take("env-name", NAME_PAYLOADS).values()]
    env += ["ESCAPES=\x1b[31mred\x1b[0m\r\nnext", "LONG_ENV=" + "E" * LONG]
    history_payloads = take("history")
    comment_payloads = take("comment")
    history = [
        {"created": CREATED, "created_by": v, "comment": c}
        for v, c in zip(history_payloads.values(), comment_payloads.values(), strict=True)
    ]
    history.append({"created": CREATED, "created_by": "RUN " + "x" * LONG})
    # the one layer is made by the last history entry that is not empty
    for h in history[:-1]:
        h["empty_layer"] = True
    config = {
        "created": CREATED,
        "author": next(iter(take("author").values())),
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": next(iter(take("user").values())),
            "WorkingDir": next(iter(take("workdir").values())),
            "ExposedPorts": {f"80/tcp{v}": {} for v in take("port", NAME_PAYLOADS).values()},
            "Volumes": {f"/data/{v}": {} for v in take("volume", NAME_PAYLOADS).values()},
            "Env": env,
            "Entrypoint": list(take("entrypoint").values()),
            "Cmd": list(take("cmd").values()),
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": history,
    }
    annotations = {f"org.example.{k}": v for k, v in take("annotation").items()}
    annotations.update({v: k for k, v in take("annotation-key").items()})
    url_annotations = take(
        "url-annotation", {"url": PAYLOADS["url"], "url-obfuscated": PAYLOADS["url-obfuscated"]}
    )
    annotations["org.opencontainers.image.source"] = url_annotations["url-annotation:url"]
    annotations["org.opencontainers.image.documentation"] = url_annotations[
        "url-annotation:url-obfuscated"
    ]
    annotations["org.opencontainers.image.description"] = "\n".join(take("description").values())
    annotations["org.opencontainers.image.title"] = "\x1b[31mred title\x1b[0m\r\n" + "T" * LONG
    annotations["control.nul"] = "before\x00after"

    layout = _layout(work, "hostile")
    manifest, config_digest = _manifest(layout, config, [layer], annotations)
    doc = json.loads(manifest)
    doc["layers"][0]["annotations"] = dict(take("layer-annotation"))
    manifest = json.dumps(doc, indent=2).encode()
    layout.tag("hostile", manifest)
    digest = _push(registry, layout, work, "hostile", repository, tag, creds=creds)
    assert digest == sha256(manifest), "skopeo changed the manifest"
    image = PushedImage(repository, tag, digest, manifest, config_digest, config, (layer,))

    artifact_type = payload("script", "referrer-artifact-type:script")
    referrer_annotations = payloads_for("referrer-annotation")
    referrer_annotations["org.opencontainers.image.created"] = CREATED
    layer_annotations = payloads_for("referrer-layer-annotation", NAME_PAYLOADS)
    layer_annotations["org.opencontainers.image.title"] = payload("attr", "referrer-title:attr")
    referrer_payloads = {
        "referrer-artifact-type:script": artifact_type,
        "referrer-title:attr": layer_annotations["org.opencontainers.image.title"],
        **{k: v for k, v in referrer_annotations.items() if ":" in k},
        **{k: v for k, v in layer_annotations.items() if ":" in k},
    }
    referrer = push_referrer(
        registry,
        work,
        image,
        artifact_type=f"application/vnd.pwn+json{artifact_type}",
        content=b'{"pwn": true}',
        annotations=referrer_annotations,
        layer_annotations=layer_annotations,
        creds=creds,
        payloads=referrer_payloads,
    )
    found.update(referrer_payloads)
    return PushedImage(
        repository,
        tag,
        digest,
        manifest,
        config_digest,
        config,
        (layer,),
        referrers=(referrer,),
        payloads=found,
    )


def hostile_layers(bomb_size: int = BOMB_SIZE, entries: int = MANY_ENTRIES) -> dict[str, Layer]:
    """(e) The hostile layers by name: ``bomb``, ``many-entries``, ``not-tar``, ``zstd``."""
    return {
        "bomb": gzip_bomb_layer(bomb_size),
        "many-entries": many_entries_layer(entries),
        "not-tar": not_tar_layer(),
        "zstd": zstd_layer(),
    }


def push_hostile_layer_images(
    registry: Loopback,
    work: Path,
    repository: str = "ui/layers",
    *,
    bomb_size: int = BOMB_SIZE,
    entries: int = MANY_ENTRIES,
    creds: str | None = None,
) -> dict[str, PushedImage]:
    """(e) An image of each hostile layer (``hostile_layers``), tagged with its name in
    ``repository``, and one of all four in that order, tagged ``all``; by tag."""
    layers = hostile_layers(bomb_size, entries)
    layout = _layout(work, "layers")
    plans = [(name, [name]) for name in layers] + [("all", list(layers))]
    pushed = {}
    for tag, names in plans:
        image_layers = [layers[name] for name in names]
        config = {
            "created": CREATED,
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"], "Labels": {"org.example.layers": tag}},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in image_layers]},
            "history": [{"created": CREATED, "created_by": f"ADD {name} /"} for name in names],
        }
        manifest, config_digest = _manifest(layout, config, image_layers)
        layout.tag(tag, manifest)
        digest = _push(registry, layout, work, tag, repository, tag, creds=creds)
        assert digest == sha256(manifest), "skopeo changed the manifest"
        pushed[tag] = PushedImage(
            repository, tag, digest, manifest, config_digest, config, tuple(image_layers)
        )
    return pushed
