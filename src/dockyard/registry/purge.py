"""Upload purging, registry:2's ``storage.maintenance.uploadpurging``: uploads started more than
``age`` ago and never finished are removed (``dryrun``: only reported)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from dockyard.registry import inventory, layout
from dockyard.storage.driver import PathNotFound
from dockyard.storage.store import Store

log = logging.getLogger("dockyard.purge")


@dataclass
class PurgeReport:
    dry_run: bool
    removed: list[str] = field(default_factory=list)


def parse_started_at(text: str) -> float | None:
    """registry:2 writes Go's RFC 3339 with nanoseconds; Dockyard, Python's isoformat."""
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    if "." in text:  # trim fractions beyond microseconds
        head, _, rest = text.partition(".")
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


async def _started_at(storage: Store, name: str, upload_id: str) -> float | None:
    try:
        started = parse_started_at(
            (await storage.read(layout.upload_started_at(name, upload_id))).decode(errors="replace")
        )
    except PathNotFound:
        started = None
    if started is None:  # no usable start time: judge by the directory's last change
        try:
            started = (await storage.stat(layout.upload_dir(name, upload_id))).modified
        except PathNotFound:
            return None
    return started


async def purge_uploads(storage: Store, age: float, dry_run: bool) -> PurgeReport:
    report = PurgeReport(dry_run=dry_run)
    cutoff = time.time() - age
    for name in await inventory.repository_names(storage):
        for upload_id in await inventory.uploads(storage, name):
            started = await _started_at(storage, name, upload_id)
            if started is None or started >= cutoff:
                continue
            report.removed.append(f"{name}/_uploads/{upload_id}")
            if not dry_run:
                await storage.delete_if_present(layout.upload_dir(name, upload_id))
    report.removed += await storage.purge_partial(layout.ROOT, cutoff, dry_run)
    if report.removed:
        log.info(
            "purged abandoned uploads",
            extra={"fields": {"count": len(report.removed), "dry_run": dry_run}},
        )
    return report
