"""Configuration: registry:2's config.yml, with its ``REGISTRY_*`` environment overrides.

The YAML file and the overrides are merged as raw data first, exactly as registry:2 merges them,
then validated once into frozen typed models; the rest of Dockyard only ever sees a
:class:`Config`. Any problem is a :class:`ConfigError` naming the key and the reason, raised
before a port is bound.

registry:2's override rules (distribution ``configuration/parser.go``): every variable named
``REGISTRY_<A>_<B>...`` is applied in sorted order; each segment names a field of a section
(case-insensitively) or, inside a free-form map such as ``storage`` or ``auth``, a key (created
lowercased if missing). The value is parsed as YAML. Setting a whole section replaces it, and a
bare word selects a storage driver or an auth provider (``REGISTRY_AUTH=htpasswd``). An unknown
field is warned about and ignored, as is an unknown key in the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dockyard.config_base import ByteSize, Duration, Section, parse_duration
from dockyard.errors import ConfigError
from dockyard.notificationsconfig import NotificationsConfig
from dockyard.proxyconfig import ProxyConfig, check_proxy

__all__ = ["Config", "ConfigError", "Duration", "Section", "load_config", "parse_duration"]

log = logging.getLogger("dockyard.config")

ENV_PREFIX = "REGISTRY_"


class AccessLogConfig(Section):
    disabled: bool = False


class LogConfig(Section):
    level: Literal["error", "warn", "info", "debug"] = "info"
    formatter: Literal["text", "json", "logstash"] = "text"
    fields: dict[str, Any] = Field(default_factory=dict)
    accesslog: AccessLogConfig = Field(default_factory=AccessLogConfig)

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


class LetsEncryptConfig(Section):
    cachefile: str = ""
    email: str = ""
    hosts: list[str] = Field(default_factory=list)
    #: Dockyard's additions (registry:2 ignores them): another ACME server, a CA bundle to
    #: trust it with, where HTTP-01 challenges are answered, and when to renew.
    directoryurl: str = LETSENCRYPT_DIRECTORY
    cafile: str = ""
    challengeaddr: str = ":80"
    renewbefore: Duration = 30 * 24 * 3600.0
    checkinterval: Duration = 12 * 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.cachefile)


class TLSConfig(Section):
    certificate: str = ""
    key: str = ""
    clientcas: list[str] = Field(default_factory=list)
    minimumtls: Literal["", "tls1.0", "tls1.1", "tls1.2", "tls1.3"] = ""
    ciphersuites: list[str] = Field(default_factory=list)
    letsencrypt: LetsEncryptConfig = Field(default_factory=LetsEncryptConfig)

    @property
    def enabled(self) -> bool:
        return bool(self.certificate) or self.letsencrypt.enabled


class PrometheusConfig(Section):
    enabled: bool = False
    path: str = "/metrics"


class DebugConfig(Section):
    """registry:2's debug server: a second listener with ``/debug/health`` (with each failing
    check's error) and, when ``prometheus.enabled``, the metrics at ``prometheus.path``."""

    addr: str = ""
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)


class HealthStorageDriverConfig(Section):
    """registry:2's ``health.storagedriver``. Unset ``enabled`` is Dockyard's default: storage
    is checked when the health endpoint is asked (a result reused for a second); ``true``
    checks every ``interval`` in the background and fails after ``threshold`` failures in a
    row (0 counts as 1), as registry:2 does; ``false`` checks nothing."""

    enabled: bool | None = None
    interval: Duration = 10.0
    threshold: int = Field(default=0, ge=0)

    @field_validator("interval")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("must not be negative")
        return seconds or 10.0  # registry:2: 0 means the default


class HealthConfig(Section):
    storagedriver: HealthStorageDriverConfig = Field(default_factory=HealthStorageDriverConfig)
    #: registry:2's file, HTTP and TCP checks: accepted, not run (a warning says so)
    file: list[Any] = Field(default_factory=list)
    http: list[Any] = Field(default_factory=list)
    tcp: list[Any] = Field(default_factory=list)


class LoginThrottleConfig(Section):
    """Dockyard's addition: back-off of failed logins (htpasswd and the built-in token server).

    Counted per (user, client address) and per client address across users, in windows of
    ``window``; a key over its limit is locked out for ``lockout``, doubling on each further
    lockout up to ``maxlockout``. Checked before any bcrypt work."""

    attempts: int = Field(default=10, ge=1)
    addressattempts: int = Field(default=100, ge=1)
    window: Duration = 60.0
    lockout: Duration = 30.0
    maxlockout: Duration = 900.0

    @field_validator("window", "lockout", "maxlockout")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds


class LimitsConfig(Section):
    """Dockyard's addition (registry:2 ignores it): what one client may hold of the server."""

    #: largest request line or header field (registry:2, being Go, accepts 1 MiB of headers;
    #: large bearer tokens from external token servers need far more than 8 KiB)
    maxheaderbytes: int = Field(default=1024 * 1024, ge=8 * 1024)
    #: a request body that delivers no byte for this long is abandoned and the connection closed
    bodyidletimeout: Duration = 60.0
    #: open connections from one client address (0: unlimited); trusted proxies are exempt
    connectionsperaddress: int = Field(default=256, ge=0)
    #: upload sessions open at once in one repository (0: unlimited)
    uploadsperrepository: int = Field(default=1000, ge=0)
    login: LoginThrottleConfig = Field(default_factory=LoginThrottleConfig)

    @field_validator("bodyidletimeout")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds


class HTTPConfig(Section):
    addr: str = ":5000"
    net: Literal["tcp", "unix"] = "tcp"
    prefix: str = ""
    host: str = ""
    secret: str = ""
    relativeurls: bool = False
    draintimeout: Duration = 0.0
    headers: dict[str, list[str]] = Field(default_factory=dict)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)
    #: Dockyard's addition: peers (addresses or CIDR networks) whose ``X-Forwarded-For`` is
    #: believed when deciding a client's address; empty: the TCP peer is the client
    trustedproxies: list[str] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    @field_validator("headers", mode="before")
    @classmethod
    def _header_values(cls, v: Any) -> Any:
        # registry:2 takes a list per header; accept a single string too.
        if isinstance(v, Mapping):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v

    @field_validator("trustedproxies", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        # REGISTRY_HTTP_TRUSTEDPROXIES=10.0.0.1,10.0.1.0/24 reads as one string
        if isinstance(v, str):
            return [entry.strip() for entry in v.split(",") if entry.strip()]
        return v

    @field_validator("trustedproxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network") from None
        return v

    @field_validator("host")
    @classmethod
    def _host_url(cls, v: str) -> str:
        if v and not re.match(r"^https?://[^/]+", v):
            raise ValueError("must be an absolute URL such as https://registry.example.com")
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        return f"/{v}" if v else ""


class FilesystemConfig(Section):
    rootdirectory: str = "/var/lib/registry"
    maxthreads: int = Field(default=100, ge=25)
    #: Dockyard's addition: fsync blobs and links before they become visible (slower, survives
    #: power loss). registry:2 ignores unknown driver parameters, so the key is safe to share.
    fsync: bool = False


class S3Config(Section):
    """registry:2's ``storage.s3`` keys. Without accesskey/secretkey, credentials come from
    botocore's default chain (environment, shared files, instance roles)."""

    region: str = ""
    regionendpoint: str = ""
    forcepathstyle: bool = False
    bucket: str
    accesskey: str = ""
    secretkey: str = ""
    rootdirectory: str = ""
    secure: bool = True
    skipverify: bool = False
    v4auth: bool = True
    chunksize: int = Field(default=10 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipartcopychunksize: int = Field(default=32 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipartcopymaxconcurrency: int = Field(default=100, ge=1)
    multipartcopythresholdsize: int = Field(default=32 * 1024 * 1024, ge=0)
    encrypt: bool = False
    keyid: str = ""
    storageclass: str = "STANDARD"
    objectacl: str = "private"
    useragent: str = ""

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not v:
            raise ValueError("required")
        return v

    @field_validator("storageclass")
    @classmethod
    def _storage_class(cls, v: str) -> str:
        allowed = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "INTELLIGENT_TIERING", "NONE")
        if v.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return v.upper()


class DeleteConfig(Section):
    enabled: bool = False


class CacheConfig(Section):
    blobdescriptor: Literal["inmemory", "redis", ""] = "inmemory"
    blobdescriptorsize: int = 10000


class RedirectConfig(Section):
    disable: bool = False
    #: Dockyard's addition: how long a presigned URL stays valid (registry:2 uses 20 minutes)
    expiry: Duration = 1200.0

    @field_validator("expiry")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds


class UploadPurgingConfig(Section):
    enabled: bool = True
    age: Duration = 168 * 3600.0
    interval: Duration = 24 * 3600.0
    dryrun: bool = False


class ReadOnlyConfig(Section):
    enabled: bool = False


class GCConfig(Section):
    """Dockyard's online garbage collection (registry:2 ignores this key)."""

    enabled: bool = False
    interval: Duration = 24 * 3600.0
    #: content unreferenced but used within this long is kept (see registry.gc)
    grace: Duration = 24 * 3600.0
    deleteuntagged: bool = False
    dryrun: bool = False

    @property
    def touch_interval(self) -> float:
        """How often content in use has its time refreshed: well inside the grace period."""
        return min(3600.0, self.grace / 4)


class PresenceConfig(Section):
    """Dockyard's addition (registry:2 ignores it): every server process records in storage
    that it is running (``/dockyard/instances/``) and refreshes the record this often. An
    immediate garbage collection (``dockyard gc --grace 0``) reads the records; one not refreshed
    for four intervals counts as a stopped server (registry.presence)."""

    interval: Duration = 15.0

    @field_validator("interval")
    @classmethod
    def _positive(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds


class MaintenanceConfig(Section):
    uploadpurging: UploadPurgingConfig = Field(default_factory=UploadPurgingConfig)
    readonly: ReadOnlyConfig = Field(default_factory=ReadOnlyConfig)
    gc: GCConfig = Field(default_factory=GCConfig)
    presence: PresenceConfig = Field(default_factory=PresenceConfig)


#: storage drivers registry:2 knows; the ones Dockyard implements are in SUPPORTED_DRIVERS
KNOWN_DRIVERS = ("filesystem", "inmemory", "s3", "azure", "gcs", "swift", "oss")
SUPPORTED_DRIVERS = ("filesystem", "s3")
STORAGE_SETTINGS = ("delete", "cache", "redirect", "maintenance", "tag")


class StorageConfig(Section):
    filesystem: FilesystemConfig | None = None
    s3: S3Config | None = None
    delete: DeleteConfig = Field(default_factory=DeleteConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    redirect: RedirectConfig = Field(default_factory=RedirectConfig)
    maintenance: MaintenanceConfig = Field(default_factory=MaintenanceConfig)

    @property
    def driver(self) -> str:
        return "s3" if self.s3 is not None else "filesystem"


class HtpasswdAuthConfig(Section):
    realm: str = "basic-realm"
    path: str
    #: Dockyard's addition: how long a successful bcrypt verification is remembered (0: off)
    cachettl: Duration = 300.0
    #: Dockyard's addition: the users who may use the JSON API's admin routes (every user may
    #: still push, pull and delete everything, as in registry:2); empty: nobody
    admins: list[str] = Field(default_factory=list)

    @field_validator("admins", mode="before")
    @classmethod
    def _admins_comma_separated(cls, v: Any) -> Any:
        # REGISTRY_AUTH_HTPASSWD_ADMINS=alice,bob reads as one string
        if isinstance(v, str):
            return [entry.strip() for entry in v.split(",") if entry.strip()]
        return v

    @field_validator("admins")
    @classmethod
    def _user_names(cls, v: list[str]) -> list[str]:
        for user in v:
            # htpasswd separates the name from the hash with ':', so no user can have one
            if not user or ":" in user or user != user.strip():
                raise ValueError(f"{user!r} cannot be an htpasswd user name")
        return v


Action = Literal["pull", "push", "delete", "*"]


class AccessRuleConfig(Section):
    repository: str
    actions: list[Action]
    users: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    anonymous: bool = False


class TokenServerConfig(Section):
    """Dockyard's built-in token server (registry:2 ignores this key)."""

    htpasswd: str
    key: str = ""
    expiration: Duration = 300.0
    refreshexpiration: Duration = 30 * 24 * 3600.0
    cachettl: Duration = 300.0
    admins: list[str] = Field(default_factory=list)
    groups: dict[str, list[str]] = Field(default_factory=dict)
    access: list[AccessRuleConfig] = Field(default_factory=list)


class TokenAuthConfig(Section):
    realm: str = ""
    service: str = ""
    issuer: str = ""
    rootcertbundle: str = ""
    jwks: str = ""
    autoredirect: bool = False
    server: TokenServerConfig | None = None


class AuthConfig(Section):
    htpasswd: HtpasswdAuthConfig | None = None
    token: TokenAuthConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.htpasswd is not None or self.token is not None


#: auth providers registry:2 knows that Dockyard does not implement
UNSUPPORTED_AUTH = ("silly",)


class RedisPoolConfig(Section):
    maxidle: int = Field(default=16, ge=0)
    maxactive: int = Field(default=64, ge=1)
    idletimeout: Duration = 300.0


class RedisTLSConfig(Section):
    enabled: bool = False


class RedisConfig(Section):
    """registry:2's ``redis`` section: the blob descriptor cache shared between instances
    (``storage.cache.blobdescriptor: redis``)."""

    addr: str = ""
    password: str = ""
    username: str = ""
    db: int = Field(default=0, ge=0)
    dialtimeout: Duration = 5.0
    readtimeout: Duration = 5.0
    writetimeout: Duration = 5.0
    pool: RedisPoolConfig = Field(default_factory=RedisPoolConfig)
    tls: RedisTLSConfig = Field(default_factory=RedisTLSConfig)

    @field_validator("addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        if v and (":" not in v or not v.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"{v!r} is not host:port")
        return v


class UILayersConfig(Section):
    """Bounds of the web UI's layer file lists: a layer is read, decompressed and listed at most
    this far (the list says where it stopped), and each user may have this many layers listed
    per minute that no earlier listing cached."""

    maxbytes: ByteSize = 2 * 1024**3
    maxentries: int = Field(default=100_000, ge=1)
    timeout: Duration = Field(default=10.0, gt=0)
    perminute: int = Field(default=20, ge=1)


class UIConfig(Section):
    """Dockyard's built-in web UI at ``<http.prefix>/ui/`` (registry:2 has none)."""

    enabled: bool = True
    #: how long a login lasts
    sessionlifetime: Duration = Field(default=12 * 3600.0, gt=0)
    #: the host name the pull commands show (``registry.example.com``); empty: http.host's, or
    #: the one the browser used
    pullhost: str = ""
    layers: UILayersConfig = Field(default_factory=UILayersConfig)


class CatalogConfig(Section):
    maxentries: int = Field(default=1000, ge=1)


class IndexConfig(Section):
    """Dockyard: the metadata index (``dockyard.registry.index``), derived from the layout."""

    #: where it lives: ``sqlite`` (a file per host), ``redis`` (in ``redis``, shared by every
    #: instance: ``registry.index_redis``) or ``auto``: Redis when ``redis.addr`` is set and
    #: storage is not the filesystem driver (the S3 + Redis multi-instance deployment), else SQLite
    backend: Literal["auto", "sqlite", "redis"] = "auto"
    #: the SQLite file's directory; default ``<filesystem rootdirectory>/dockyard/index``, else
    #: ``/var/lib/dockyard/index`` (a local disk)
    directory: str = ""
    #: pull times wait in memory at most this long before they are written
    pullflush: Duration = Field(default=5.0, gt=0)
    #: how often the index is compared with the layout (changes registry:2 or a restore made)
    verifyinterval: Duration = Field(default=3600.0, gt=0)


class QuotaConfig(Section):
    """Dockyard: the most space the repositories of ``scope`` may use together, each blob
    counted once within the scope, uploads in progress included (``dockyard.registry.quotas``).
    ``scope`` is one repository (``team-a/app``), a namespace (``team-a/*``: every repository
    under ``team-a/``) or ``*`` (the whole registry). Every quota whose scope holds a
    repository applies to it."""

    scope: str
    limit: ByteSize

    @field_validator("scope")
    @classmethod
    def _scope(cls, scope: str) -> str:
        name = scope[:-2] if scope.endswith("/*") else scope
        if scope != "*" and not _REPOSITORY_NAME.fullmatch(name):
            raise ValueError(
                f"{scope!r} is not a repository name, a namespace such as team-a/* or *"
            )
        return scope


#: the OCI distribution spec's repository name rule
_REPOSITORY_NAME = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)


def _check_patterns(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
    return patterns


def parse_retention_period(value: Any) -> float:
    """A Go duration, optionally led by days (``30d``, ``1d12h``): retention periods are
    counted in days, which Go durations lack. Must be positive."""
    days, rest = 0.0, value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)d(.*)", value)
        if match is not None:
            days, rest = float(match.group(1)), match.group(2).strip()
    try:
        seconds = days * 86400 + (parse_duration(rest) if rest != "" else 0.0)
    except ValueError:
        raise ValueError(f"{value!r} is not a period (use e.g. 30d, 1d12h, 24h)") from None
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


#: a retention period (``7d``, ``24h``), held as seconds
RetentionPeriod = Annotated[float, BeforeValidator(parse_retention_period)]


class RetentionConfig(Section):
    """Dockyard's addition: which tags and manifests of a policy's repositories are deleted
    (``dockyard retention``, and on the garbage collection's schedule; see
    ``dockyard.registry.retention``). A tag is deleted only when no keep rule keeps it; with no
    tag rule at all (only ``untaggedafter``) every tag is kept."""

    #: keep the N most recently pushed tags: also the floor, a repository never keeps fewer
    keeplatest: int = Field(default=0, ge=0)
    keeppushedwithin: RetentionPeriod | None = None
    #: keep tags whose manifest was pulled within this long
    keeppulledwithin: RetentionPeriod | None = None
    #: regular expressions; a tag any of them matches whole (``re.fullmatch``) is kept
    keeptags: list[str] = Field(default_factory=list)
    #: manifests untagged (and unused) for longer than this are deleted; unset: only the
    #: manifests this run's tag deletions leave unreferenced are
    untaggedafter: RetentionPeriod | None = None
    #: a run that would delete more than this share of a repository's tags only reports,
    #: unless confirmed (``dockyard retention --confirm``)
    maxshare: float = Field(default=0.5, gt=0, le=1)

    @field_validator("keeptags")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return _check_patterns(patterns)

    @model_validator(mode="after")
    def _some_rule(self) -> RetentionConfig:
        # Elsewhere an unknown key is a warning; here a misspelt keep rule would delete what
        # it was meant to keep.
        unknown = sorted(self.model_extra or {})
        if unknown:
            raise ValueError(
                f"unknown key {unknown[0]!r} (known: {', '.join(type(self).model_fields)})"
            )
        if not (
            self.keeplatest
            or self.keeppushedwithin
            or self.keeppulledwithin
            or self.keeptags
            or self.untaggedafter
        ):
            raise ValueError(
                "no rule: set keeplatest, keeppushedwithin, keeppulledwithin, keeptags or "
                "untaggedafter"
            )
        return self


class PolicyConfig(Section):
    """Dockyard's addition: rules for the repositories whose names match one of
    ``repositories`` (globs, as the token server's access rules: ``*`` crosses ``/``). The first
    policy whose globs match a repository is that repository's; later ones do not apply."""

    repositories: list[str] = Field(min_length=1)
    #: regular expressions a whole tag must match (``re.fullmatch``) to be immutable: once it
    #: exists, pushing another manifest to it or deleting it is refused with 403 DENIED
    immutabletags: list[str] = Field(default_factory=list)
    retention: RetentionConfig | None = None

    @field_validator("immutabletags")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        return _check_patterns(patterns)


class ValidationURLsConfig(Section):
    """registry:2's policy for the URLs of non-distributable layers (regular expressions).
    Dockyard does not apply it (see :data:`NOT_ACTED_ON`)."""

    allow: list[str] = Field(default_factory=list)
    deny: list[str] = Field(default_factory=list)


class ValidationManifestsConfig(Section):
    urls: ValidationURLsConfig = Field(default_factory=ValidationURLsConfig)
    #: distribution 3's ``platforms``/``platformlist`` (not registry:2's): not applied
    indexes: dict[str, Any] = Field(default_factory=dict)
    #: Dockyard's addition: accept a manifest whose config, layers or index children are not
    #: in the repository (the OCI spec's "sparse" manifests), instead of MANIFEST_BLOB_UNKNOWN
    sparse: bool = False


class ValidationConfig(Section):
    """registry:2's ``validation`` section, plus Dockyard's ``manifests.sparse``."""

    #: registry:2's deprecated form of ``disabled`` (true turns the URL policy on)
    enabled: bool = False
    #: registry:2: no URL policy (any http(s) URL on a non-distributable layer is accepted),
    #: which is what Dockyard always does
    disabled: bool = False
    manifests: ValidationManifestsConfig = Field(default_factory=ValidationManifestsConfig)


class Config(Section):
    version: str
    log: LogConfig = Field(default_factory=LogConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    storage: StorageConfig
    auth: AuthConfig = Field(default_factory=AuthConfig)
    catalog: CatalogConfig = Field(default_factory=CatalogConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    policies: list[PolicyConfig] = Field(default_factory=list)
    index: IndexConfig = Field(default_factory=IndexConfig)
    quotas: list[QuotaConfig] = Field(default_factory=list)
    ui: UIConfig = Field(default_factory=UIConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    middleware: dict[str, Any] = Field(default_factory=dict)
    reporting: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> str:
        text = str(v)
        if text != "0.1":
            raise ValueError(f"unsupported configuration version {text!r} (registry:2 uses 0.1)")
        return text


# -- keys that are modelled but not acted on --------------------------------------------------

#: Keys of the model Dockyard accepts (registry:2 configurations carry them) but does not act
#: on, each with the reason. Every one set to a value other than its default is named in a
#: warning at start-up (``dockyard check-config`` and ``serve --strict`` make it an error).
#: tests/unit/test_config_coverage.py fails for a modelled key that is neither read by the code
#: nor listed here: implementing a key means removing it from this list.
NOT_ACTED_ON: dict[str, str] = {
    "health.file": "registry:2's file health checks are not run (storagedriver is)",
    "health.http": "registry:2's http health checks are not run (storagedriver is)",
    "health.tcp": "registry:2's tcp health checks are not run (storagedriver is)",
    "http.tls.ciphersuites": "Dockyard uses OpenSSL's default cipher suites",
    "storage.cache.blobdescriptorsize": "Dockyard keeps no in-memory blob descriptor cache "
    "(blobdescriptor: inmemory means none; redis is the shared cache)",
    "redis.pool.maxidle": "redis-py's pool keeps idle connections up to redis.pool.maxactive",
    "redis.pool.idletimeout": "redis-py's pool does not close idle connections",
    "auth.token.autoredirect": "the token realm is always the configured auth.token.realm",
    "validation.enabled": "Dockyard has no URL policy for non-distributable layers "
    "(registry:2's behaviour with validation.disabled: true)",
    "validation.manifests.urls.allow": "Dockyard accepts any http or https URL on a "
    "non-distributable layer",
    "validation.manifests.urls.deny": "Dockyard accepts any http or https URL on a "
    "non-distributable layer",
    "validation.manifests.indexes": "distribution 3's index policy; with "
    "validation.manifests.sparse: true Dockyard accepts indexes whose children it does not "
    "hold",
}

#: free-form sections accepted for compatibility that do nothing yet: warned about when set
ACCEPTED_WITHOUT_EFFECT = ("middleware", "reporting")


# -- raw loading -------------------------------------------------------------------------------

#: sections that are free-form maps in registry:2 and take a bare word to select an entry
_SELECTOR_SECTIONS = {"storage", "auth", "middleware"}


def default_raw_config() -> dict[str, Any]:
    """The embedded default: filesystem storage in ./data, port 5000, deletes enabled, no auth."""
    return {
        "version": "0.1",
        "log": {"level": "info"},
        "storage": {
            "filesystem": {"rootdirectory": "./data"},
            "delete": {"enabled": True},
        },
        "http": {"addr": ":5000"},
    }


def load_raw(path: str | None) -> dict[str, Any]:
    if path is None:
        return default_raw_config()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(path, f"cannot read the configuration file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, "the configuration must be a YAML mapping")
    return data


def _yaml_value(name: str, payload: str) -> Any:
    try:
        return yaml.safe_load(payload) if payload != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(name, f"value is not valid YAML: {exc}") from None


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The Section class behind an annotation like ``X``, ``X | None``."""
    candidates = [annotation, *get_args(annotation)]
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _is_map(annotation: Any) -> bool:
    return get_origin(annotation) is dict or annotation is dict


def _select(value: Any) -> Any:
    """``storage: s3`` / ``auth: htpasswd``: a bare word selects an entry with no parameters."""
    if isinstance(value, str):
        return {value: {}}
    return value


def _override_struct(
    model: type[BaseModel], raw: dict[str, Any], path: list[str], value: str, name: str
) -> None:
    fields = {field.upper(): field for field in model.model_fields}
    field = fields.get(path[0])
    if field is None:
        log.warning("ignoring unrecognized environment variable %s", name)
        return
    annotation = model.model_fields[field].annotation
    if len(path) == 1:
        parsed = _yaml_value(name, value)
        raw[field] = _select(parsed) if field in _SELECTOR_SECTIONS else parsed
        return
    sub_model = _section_model(annotation)
    if sub_model is not None and field not in _SELECTOR_SECTIONS:
        current = raw.get(field)
        if not isinstance(current, dict):
            current = raw[field] = {}
        _override_struct(sub_model, current, path[1:], value, name)
    elif _is_map(annotation) or field in _SELECTOR_SECTIONS:
        current = raw.get(field)
        if not isinstance(current, dict):
            current = raw[field] = {}
        _override_map(current, path[1:], value, name)
    else:
        log.warning("ignoring environment variable %s: %s is not a section", name, field)


def _override_map(raw: dict[str, Any], path: list[str], value: str, name: str) -> None:
    if len(path) == 1:
        for key in list(raw):
            if isinstance(key, str) and key.upper() == path[0]:
                del raw[key]
        raw[path[0].lower()] = _yaml_value(name, value)
        return
    for key, current in raw.items():
        if isinstance(key, str) and key.upper() == path[0] and isinstance(current, dict):
            _override_map(current, path[1:], value, name)
            return
    # A list addressed by index: ..._HOSTS_0
    for key, current in raw.items():
        if (
            isinstance(key, str)
            and key.upper() == path[0]
            and isinstance(current, list)
            and path[1].isdigit()
            and len(path) == 2
        ):
            index = int(path[1])
            while len(current) <= index:
                current.append(None)
            current[index] = _yaml_value(name, value)
            return
    fresh: dict[str, Any] = {}
    for key in list(raw):
        if isinstance(key, str) and key.upper() == path[0]:
            del raw[key]
    raw[path[0].lower()] = fresh
    _override_map(fresh, path[1:], value, name)


def apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``REGISTRY_*`` variables to raw config data, in sorted order, as registry:2 does."""
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name == "REGISTRY_CONFIGURATION_PATH":
            continue
        path = [p for p in name[len(ENV_PREFIX) :].upper().split("_")]
        if not all(path):
            log.warning("ignoring malformed environment variable %s", name)
            continue
        _override_struct(Config, raw, path, environ[name], name)
    return raw


# -- validation ----------------------------------------------------------------------------------


def _normalise_storage(raw: dict[str, Any]) -> None:
    storage = raw.get("storage")
    if storage is None:
        raise ConfigError("storage", "no storage driver configured (e.g. storage.filesystem)")
    storage = _select(storage)
    if not isinstance(storage, dict):
        raise ConfigError("storage", "must be a mapping with one storage driver")
    drivers = [k for k in storage if k not in STORAGE_SETTINGS]
    if len(drivers) != 1:
        listed = ", ".join(drivers) or "none"
        raise ConfigError("storage", f"exactly one storage driver must be configured ({listed})")
    driver = drivers[0]
    if driver not in SUPPORTED_DRIVERS:
        if driver in KNOWN_DRIVERS:
            known = "a registry:2 driver Dockyard does not support yet"
        else:
            known = "an unknown storage driver"
        raise ConfigError(
            f"storage.{driver}",
            f"{known}; supported: {', '.join(SUPPORTED_DRIVERS)}",
        )
    if storage[driver] is None:
        storage[driver] = {}
    raw["storage"] = storage


def _normalise_auth(raw: dict[str, Any]) -> None:
    auth = raw.get("auth")
    if auth is None:
        return
    auth = _select(auth)
    if not isinstance(auth, dict):
        raise ConfigError("auth", "must be a mapping with one auth provider")
    providers = list(auth)
    if len(providers) > 1:
        listed = ", ".join(providers)
        raise ConfigError("auth", f"only one auth provider may be configured ({listed})")
    for name in providers:
        if name in UNSUPPORTED_AUTH:
            raise ConfigError(f"auth.{name}", "this auth provider is not supported")
        if name not in ("htpasswd", "token"):
            raise ConfigError(f"auth.{name}", "unknown auth provider (htpasswd or token)")
        if auth[name] is None:
            auth[name] = {}
    raw["auth"] = auth


def _check_auth(config: Config) -> None:
    token = config.auth.token
    if token is None:
        return
    if token.server is None:
        for key in ("realm", "service", "issuer"):
            if not getattr(token, key):
                raise ConfigError(f"auth.token.{key}", "required for token authentication")
        if not token.rootcertbundle and not token.jwks:
            raise ConfigError(
                "auth.token.rootcertbundle", "required (or auth.token.jwks) to verify tokens"
            )


def _reject_unsupported(config: Config) -> None:
    """Inconsistent TLS settings, and settings whose silent absence would be dangerous
    (proxying), fail loudly."""
    tls = config.http.tls
    if tls.certificate and tls.letsencrypt.enabled:
        raise ConfigError(
            "http.tls.letsencrypt", "set either a certificate or Let's Encrypt, not both"
        )
    if tls.certificate and not tls.key:
        raise ConfigError("http.tls.key", "required with http.tls.certificate")
    if tls.key and not tls.certificate:
        raise ConfigError("http.tls.certificate", "required with http.tls.key")
    if tls.letsencrypt.enabled and not tls.letsencrypt.hosts:
        raise ConfigError("http.tls.letsencrypt.hosts", "required with letsencrypt.cachefile")
    check_proxy(config.proxy)
    if config.storage.cache.blobdescriptor == "redis" and not config.redis.addr:
        raise ConfigError("redis.addr", "required with storage.cache.blobdescriptor: redis")
    if config.index.backend == "redis" and not config.redis.addr:
        raise ConfigError("redis.addr", "required with index.backend: redis")
    for key in ACCEPTED_WITHOUT_EFFECT:
        if getattr(config, key):
            log.warning("configuration key %s is accepted but has no effect yet", key)
    _check_debug_and_health(config)


def _check_debug_and_health(config: Config) -> None:
    """The debug address is checked at start-up (server.py binds it); what would be ignored
    is named."""
    debug = config.http.debug
    if debug.prometheus.enabled and not debug.addr:
        log.warning(
            "http.debug.prometheus.enabled has no effect without http.debug.addr "
            "(the metrics are served on the debug address only)"
        )
    if debug.prometheus.enabled and not debug.prometheus.path.startswith("/"):
        raise ConfigError("http.debug.prometheus.path", "must start with /")


def _warn_not_acted_on(config: Config) -> None:
    """One warning per key of :data:`NOT_ACTED_ON` whose value is not its default."""
    for key, reason in NOT_ACTED_ON.items():
        *parents, leaf = key.split(".")
        section: Any = config
        for part in parents:
            section = getattr(section, part)
            if section is None:  # an optional section (a storage driver...) not configured
                break
        if section is None:
            continue
        default = type(section).model_fields[leaf].get_default(call_default_factory=True)
        if getattr(section, leaf) != default:
            log.warning("%s is not applied: %s", key, reason)


def _warn_unknown(model: BaseModel, prefix: str) -> None:
    for key in model.model_extra or {}:
        log.warning("ignoring unknown configuration key %s%s", prefix, key)
    for field in type(model).model_fields:
        value = getattr(model, field)
        if isinstance(value, BaseModel):
            _warn_unknown(value, f"{prefix}{field}.")
        elif isinstance(value, list | tuple):  # policies[], quotas[], endpoints[], ...
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _warn_unknown(item, f"{prefix}{field}[{i}].")


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return key or "(root)", message


def validate(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    if "version" not in raw:
        raise ConfigError("version", "missing (registry:2 configurations start with version: 0.1)")
    # registry:2's deprecated top-level 'loglevel'
    if "loglevel" in raw:
        raw.setdefault("log", {})
        if isinstance(raw["log"], dict):
            raw["log"].setdefault("level", raw.pop("loglevel"))
    _normalise_storage(raw)
    _normalise_auth(raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        key, reason = _describe(exc.errors()[0])
        raise ConfigError(key, reason) from None
    _warn_unknown(config, "")
    _check_auth(config)
    _reject_unsupported(config)
    _warn_not_acted_on(config)
    return config


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The configuration warnings (unknown keys and variables, keys not acted on, sections
    without effect) raised inside the block, instead of logging them: for ``dockyard
    check-config`` and ``serve --strict``, which turn them into errors."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler = Collect(logging.WARNING)
    saved = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield found
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def load_config(path: str | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the embedded default when None), apply the environment, validate."""
    environ = os.environ if environ is None else environ
    raw = load_raw(path)
    apply_env_overrides(raw, environ)
    return validate(raw)


def parse_addr(addr: str, key: str = "http.addr") -> tuple[str, int]:
    """``host:port`` (``[v6]:port``, ``:port``) as ``(host, port)``, or ConfigError naming
    ``key``."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"{addr!r} is not host:port (e.g. :5000 or 0.0.0.0:5000)")
    return host.strip("[]"), int(port)
