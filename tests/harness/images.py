"""Container images for tests, made offline: small runnable ones as ``docker save`` style
tarballs (below), and a Debian base made with debootstrap once and kept (at the end).

The image is two layers built with :mod:`tarfile` from the host's static busybox (Debian's
``busybox-static`` installs it at ``/bin/busybox``):

* layer 1: ``/bin/busybox``
* layer 2: ``/bin/cat`` and ``/bin/sh`` as symlinks to ``busybox`` and ``/etc/hello.txt``

with ``Cmd ["/bin/cat", "/etc/hello.txt"]``, so ``docker run IMAGE`` prints the file. Nothing is
fetched from the network; the tarball loads with ``docker load`` (and ``skopeo``'s
``docker-archive:`` transport).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BUSYBOX = Path("/bin/busybox")

# A fixed timestamp keeps layers byte-for-byte reproducible for a given content.
_MTIME = 1_700_000_000
_CREATED = "2023-11-14T22:13:20Z"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "i386": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def goarch() -> str:
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is an ELF executable without a PT_INTERP (dynamic loader) segment."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        return False
    is64 = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    if is64:
        (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from(endian + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x2A)
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def find_busybox(path: Path = BUSYBOX) -> Path:
    """The static busybox binary; a clear error if it is missing or dynamically linked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install Debian's busybox-static")
    if not is_static_elf(path):
        raise RuntimeError(f"{path} is not a static ELF binary: install busybox-static")
    return path


@dataclass
class _Entry:
    name: str
    kind: str  # "dir" | "file" | "symlink"
    data: bytes = b""
    target: str = ""
    mode: int = 0o755


def _layer(entries: list[_Entry]) -> bytes:
    """An uncompressed, reproducible layer tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = _MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = entry.mode
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry.target
                info.mode = 0o777
                tar.addfile(info)
            else:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
    return buf.getvalue()


@dataclass
class BuiltImage:
    """A ``docker save`` style tarball and what is known about the image in it."""

    path: Path
    repo_tag: str  # the RepoTags entry in manifest.json, e.g. "dockyard-e2e/busybox:abc"
    config: bytes  # the image config JSON as stored in the tarball
    layers: list[bytes] = field(repr=False)  # uncompressed layer tars, bottom first
    content: str = ""  # what ``docker run`` prints (the contents of /etc/hello.txt)

    @property
    def image_id(self) -> str:
        """Docker's image ID: the digest of the config JSON."""
        return sha256(self.config)

    @property
    def diff_ids(self) -> list[str]:
        return [sha256(layer) for layer in self.layers]


def build_busybox_image(
    dest: Path,
    *,
    repo_tag: str | None = None,
    content: str | None = None,
    busybox: Path = BUSYBOX,
) -> BuiltImage:
    """Write a two-layer busybox image as a ``docker save`` tarball at ``dest``.

    ``content`` (default: a unique line) becomes /etc/hello.txt and is what the image's default
    command prints; a unique content makes a unique image ID, so a test can tell its image apart.
    """
    token = uuid.uuid4().hex[:12]
    content = content if content is not None else f"hello from dockyard e2e {token}\n"
    repo_tag = repo_tag or f"dockyard-e2e/busybox:{token}"
    binary = find_busybox(busybox).read_bytes()

    base = _layer(
        [
            _Entry("bin", "dir"),
            _Entry("bin/busybox", "file", data=binary, mode=0o755),
        ]
    )
    top = _layer(
        [
            _Entry("bin", "dir"),
            _Entry("bin/cat", "symlink", target="busybox"),
            _Entry("bin/sh", "symlink", target="busybox"),
            _Entry("etc", "dir"),
            _Entry("etc/hello.txt", "file", data=content.encode(), mode=0o644),
        ]
    )
    layers = [base, top]
    config = json.dumps(
        {
            "architecture": goarch(),
            "os": "linux",
            "created": _CREATED,
            "config": {
                "Env": ["PATH=/bin"],
                "Cmd": ["/bin/cat", "/etc/hello.txt"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
            "history": [
                {"created": _CREATED, "created_by": "dockyard e2e: ADD busybox /bin/busybox"},
                {"created": _CREATED, "created_by": "dockyard e2e: ADD symlinks, hello.txt"},
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    config_name = sha256(config).removeprefix("sha256:") + ".json"
    layer_names = [f"{sha256(layer).removeprefix('sha256:')}/layer.tar" for layer in layers]
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]
    ).encode()

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = [(config_name, config), *zip(layer_names, layers, strict=True)]
        files.append(("manifest.json", manifest))
        for name, data in files:
            if "/" in name:
                info = tarfile.TarInfo(name.split("/", 1)[0])
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _MTIME
            tar.addfile(info, io.BytesIO(data))
    return BuiltImage(path=dest, repo_tag=repo_tag, config=config, layers=layers, content=content)


# -- a Debian base image, made with debootstrap once and kept by its recipe ---------------------

#: where slow-to-make test inputs are kept between runs, named by a hash of what goes into them
CACHE_DIR = Path(os.environ.get("DOCKYARD_TEST_CACHE", Path.home() / ".cache" / "dockyard-tests"))
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")


def debian_python_rootfs(mirror: str = DEBIAN_MIRROR) -> Path:
    """A tarball of Debian bookworm (minbase) with python3 and python3-venv: the local base
    image the deploy/Dockerfile test builds on (there is no Docker Hub here). Made with
    mmdebstrap (about 40 s; debootstrap, its fallback, takes three times as long) once, and kept
    in CACHE_DIR under a name derived from the recipe (suite, variant, packages, mirror, the
    tool and its version), so a second run, or a second test worker, reuses it. Skips the test
    when neither tool is installed or the mirror cannot be reached."""
    tool = shutil.which("mmdebstrap") or shutil.which("debootstrap")
    if tool is None:
        pytest.skip("mmdebstrap (or debootstrap) is not installed: no local base image")
    name = Path(tool).name
    version = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True
    ).stdout
    recipe = ["bookworm", "minbase", "python3,python3-venv", mirror, name, version]
    key = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"debian-python-bookworm-{key}.tar"
    with open(CACHE_DIR / f"{key}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another worker may be making it
        if not tarball.exists():
            _make_rootfs(tool, mirror, tarball)
    return tarball


def _make_rootfs(tool: str, mirror: str, tarball: Path) -> None:
    partial = tarball.with_name(f"{tarball.stem}.partial.tar")
    options = ["--variant=minbase", "--include=python3,python3-venv", "bookworm"]
    if Path(tool).name == "mmdebstrap":  # writes the tarball itself
        made = subprocess.run(
            [tool, "--format=tar", *options, str(partial), mirror],
            capture_output=True,
            text=True,
            timeout=900,
        )
    else:
        rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE_DIR))
        try:
            made = subprocess.run(
                [tool, *options, str(rootfs), mirror], capture_output=True, text=True, timeout=900
            )
            if made.returncode == 0:
                subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    if made.returncode != 0:
        partial.unlink(missing_ok=True)
        output = (made.stdout + made.stderr)[-800:]
        pytest.skip(f"cannot make a Debian base image from {mirror}: {output}")
    partial.rename(tarball)
