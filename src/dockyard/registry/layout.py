"""registry:2's storage layout, as pure functions. Nothing else builds a storage path.

::

    /docker/registry/v2/
      blobs/<alg>/<hex[0:2]>/<hex>/data                 every blob: layers, configs, manifests
      repositories/<name>/                              '/' in a name nests directories
        _layers/<alg>/<hex>/link                        blob linked into the repository
        _manifests/revisions/<alg>/<hex>/link           manifest present in the repository
        _manifests/tags/<tag>/current/link              tag -> manifest digest
        _manifests/tags/<tag>/index/<alg>/<hex>/link    every digest the tag has pointed to
        _manifests/referrers/<alg>/<hex>/<alg>/<hex>/link   Dockyard: subject -> referrer
        _uploads/<id>/startedat                         RFC 3339 start time (the session)
        _uploads/<id>/chunks/<token>                    Dockyard: the bytes one request sent
        _uploads/<id>/parts/<offset>                    Dockyard: which chunk holds the bytes
                                                        from <offset> (or the commit's seal)
    /dockyard/                                          Dockyard's own: health probes, leases
                                                        (one GC at a time), quarantined blobs,
      instances/<id>                                    a running server's presence record
      trash/<time>-<id>/                                what a repository delete moved aside
                                                        (a rename) before deleting it
      retention/<policy id>                             a retention policy confirmed to delete
      gc/last-run.json                                  the last collection's figures (the UI)
      layer-listings/<alg>/<hex[0:2]>/<hex>.json.gz     a layer's file listing (derived, cached)

A ``link`` file holds ``<alg>:<hex>`` with no newline. registry:2 ignores directories it does
not know, so the ``referrers`` index (Dockyard's addition) leaves the store readable by it. An
upload in progress is Dockyard's own (registry:2 keeps it in ``_uploads/<id>/data``; neither
continues the other's uploads, and both purge the other's abandoned ones by ``startedat``).
"""

from __future__ import annotations

from dockyard.oci.digest import Digest

ROOT = "/docker/registry/v2"
#: Dockyard's own files, beside registry:2's tree (registry:2 never looks here)
DOCKYARD = "/dockyard"
BLOBS = f"{ROOT}/blobs"
REPOSITORIES = f"{ROOT}/repositories"


def blob_dir(digest: Digest) -> str:
    return f"{BLOBS}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def blob_data(digest: Digest) -> str:
    return f"{blob_dir(digest)}/data"


def repository(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


def layer_link(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_layers/{digest.algorithm}/{digest.hex}/link"


def layers_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_layers"


def manifests_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests"


def revisions_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/revisions"


def revision_link(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}/link"


def tags_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags"


def tag_dir(name: str, tag: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags/{tag}"


def tag_current_link(name: str, tag: str) -> str:
    return f"{tag_dir(name, tag)}/current/link"


def tag_index_link(name: str, tag: str, digest: Digest) -> str:
    return f"{tag_dir(name, tag)}/index/{digest.algorithm}/{digest.hex}/link"


def referrers_dir(name: str, subject: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/referrers/{subject.algorithm}/{subject.hex}"


def referrer_link(name: str, subject: Digest, referrer: Digest) -> str:
    return f"{referrers_dir(name, subject)}/{referrer.algorithm}/{referrer.hex}/link"


def uploads_dir(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_uploads"


def upload_dir(name: str, upload_id: str) -> str:
    return f"{REPOSITORIES}/{name}/_uploads/{upload_id}"


def upload_chunk(name: str, upload_id: str, token: str) -> str:
    return f"{upload_dir(name, upload_id)}/chunks/{token}"


def upload_parts_dir(name: str, upload_id: str) -> str:
    return f"{upload_dir(name, upload_id)}/parts"


def upload_part(name: str, upload_id: str, offset: int) -> str:
    return f"{upload_dir(name, upload_id)}/parts/{offset}"


def upload_started_at(name: str, upload_id: str) -> str:
    return f"{upload_dir(name, upload_id)}/startedat"


def health_probe(name: str) -> str:
    return f"{DOCKYARD}/health/{name}"


def cache_epoch() -> str:
    return f"{DOCKYARD}/cache-epoch"


def index_id() -> str:
    """The store's identity for the metadata index in Redis (registry.index_redis): written
    once, it keeps the indexes of stores sharing one Redis apart."""
    return f"{DOCKYARD}/index-id"


def lease(name: str) -> str:
    return f"{DOCKYARD}/leases/{name}"


def instances_dir() -> str:
    return f"{DOCKYARD}/instances"


def instance(instance_id: str) -> str:
    return f"{DOCKYARD}/instances/{instance_id}"


def gc_last_run() -> str:
    return f"{DOCKYARD}/gc/last-run.json"


def retention_record(policy_id: str) -> str:
    """Written when a retention policy's deletions are first confirmed (``dockyard retention
    --confirm``); until it exists, runs of the policy only report."""
    return f"{DOCKYARD}/retention/{policy_id}"


def layer_listing(digest: Digest) -> str:
    """The cached file listing of the layer ``digest`` (registry.layer_listing): derived from
    the blob, so it may be deleted at any time and is made again when next asked for."""
    return f"{DOCKYARD}/layer-listings/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}.json.gz"


def trash_dir() -> str:
    return f"{DOCKYARD}/trash"


def trash(entry: str) -> str:
    """A repository delete's own directory (``<unix time>-<random>``), where the repository's
    directories are renamed before they are deleted (registry.deletion)."""
    return f"{DOCKYARD}/trash/{entry}"


def quarantine(digest: Digest, stamp: str) -> str:
    return f"{DOCKYARD}/quarantine/{digest.algorithm}/{digest.hex}-{stamp}"


def proxy_fetch_lock(digest: Digest) -> str:
    """Held (flock) by the one process that fetches a blob from an upstream."""
    return f"{DOCKYARD}/proxy/fetching/{digest.algorithm}/{digest.hex}"


def proxy_incoming(fetch_id: str) -> str:
    """A blob being fetched from an upstream, until it is verified and published."""
    return f"{DOCKYARD}/proxy/incoming/{fetch_id}"
