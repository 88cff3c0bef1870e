"""Typed configuration: the YAML file, `MIRROR_*` environment overrides,
command-line flags, validation.

The key names are a contract (DESIGN.md): tools and docs rely on them. Every
field here is documented in `config.example.yaml`. Values are validated when
the file is loaded, and a bad one stops start-up with a message naming its key.

Three layers, each overriding the one below it key by key (nested sections merge,
so `MIRROR_STORAGE__MAX_SIZE` leaves the file's `storage.root` alone):

    command-line flags (`serve --listen`, `--offline`)   highest
    `MIRROR_*` environment variables
    the YAML file                                        lowest

`load_config` is the one place that applies this order; the CLI hands it its flags.
Environment overrides use `MIRROR_` plus the key path joined by `__`, e.g.
`MIRROR_LISTEN=127.0.0.1:6000`, `MIRROR_STORAGE__ROOT=/srv/cache`,
`MIRROR_UPSTREAMS__DOCKER.IO__TAG_TTL=5m`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from mirror.metadata.redis_url import parse_redis_url
from mirror.oci import is_repository_name

_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DOCKER_HUB_HOSTS = frozenset({"docker.io", "registry-1.docker.io", "index.docker.io"})


class ConfigError(Exception):
    """The configuration is unusable; the message names the key."""


def parse_duration(value: Any) -> float:
    """Seconds from `90`, `"90s"`, `"10m"`, `"1h30m"`, `"7d"`, `"500ms"`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '10m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION_RE.sub("", text) == "":
            seconds = sum(
                float(n) * _DURATION_UNITS[unit.lower()] for n, unit in _DURATION_RE.findall(text)
            )
        else:
            raise ValueError(f"invalid duration {value!r}: use e.g. '30s', '10m', '7d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


def parse_min_free(value: Any) -> int | float:
    """Bytes (`5GiB`, `1000`) as an int, or a share of the filesystem (`"10%"`) as a
    float between 0 and 1."""
    if isinstance(value, bool):
        raise ValueError("expected bytes like '5GiB' or a percentage like '10%'")
    if isinstance(value, float) and 0 < value < 1:
        return value  # a share, read back from a dumped config
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            share = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"invalid percentage {value!r}: use e.g. '10%'") from None
        if not 0 < share < 1:
            raise ValueError(f"percentage {value!r} must be between 0% and 100%")
        return share
    return int(_BYTE_SIZE.validate_python(value))


def _dump_min_free(value: int | float) -> int | str:
    return f"{value * 100:g}%" if isinstance(value, float) else value


MinFree = Annotated[int | float, BeforeValidator(parse_min_free), PlainSerializer(_dump_min_free)]
_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def _plain_http_url(value: str) -> str:
    """An http(s) URL with a host and nothing a request could misuse."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must not carry credentials, a query or a fragment")
    return value.rstrip("/")


def _check_secret(
    key: str, inline: SecretStr | None, file: Path | None, env: str | None
) -> list[str]:
    """One secret, given inline (`key`), in a file (`key_file`) or in an environment
    variable (`key_env`): at most one of them, readable now. The names of those set."""
    sources = {key: inline, f"{key}_file": file, f"{key}_env": env}
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"set one of {', '.join(sources)}, not {given}")
    if file is not None and not os.access(file, os.R_OK):
        raise ValueError(f"{key}_file {file} is not readable")
    if env is not None and env not in os.environ:
        raise ValueError(f"{key}_env: ${env} is not set")
    return given


def _read_secret(inline: SecretStr | None, file: Path | None, env: str | None) -> str:
    """The secret `_check_secret` accepted, read now: a file or variable may be rotated."""
    if file is not None:
        return file.read_text(encoding="utf-8").strip()
    if env is not None:
        return os.environ.get(env, "")
    return inline.get_secret_value() if inline is not None else ""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TagRule(_Section):
    """How long tags matching the globs are trusted; the first matching rule wins."""

    repository: str = "*"
    tag: str = "*"
    tag_ttl: Duration | None = None
    immutable: bool = False

    @model_validator(mode="after")
    def _check_effect(self) -> TagRule:
        if self.immutable == (self.tag_ttl is not None):
            raise ValueError("give a rule either tag_ttl or immutable: true")
        return self


def _repository_prefix(value: str) -> str:
    """Repository path components (`dockerhub-proxy`, `docker/library`), no outer slashes."""
    if not value or not is_repository_name(value):
        raise ValueError(
            "must be repository path components such as dockerhub-proxy or docker/library"
        )
    return value


class FallbackConfig(_Section):
    """Another source of an upstream's content, asked anonymously when it fails. A plain
    URL is accepted too: its path becomes the repository prefix
    (`https://public.ecr.aws/docker/library`)."""

    url: str
    repository_prefix: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        parts = urlsplit(value)
        return {
            "url": urlunsplit((parts.scheme, parts.netloc, "", parts.query, parts.fragment)),
            "repository_prefix": parts.path.strip("/"),
        }

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _plain_http_url(value)

    @field_validator("repository_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return _repository_prefix(value) if value else value

    @property
    def label(self) -> str:
        """How logs and metrics name this fallback: host and prefix, never credentials."""
        return "/".join(filter(None, (urlsplit(self.url).netloc, self.repository_prefix)))


class HelperCredentialsConfig(_Section):
    """`docker-credential-<helper> get`, re-run every `lifetime` and when refused."""

    helper: str
    lifetime: Duration = 3600.0
    timeout: Duration = 30.0

    @field_validator("helper")
    @classmethod
    def _check_helper(cls, value: str) -> str:
        # Becomes a program name looked up on PATH: no path separators, no options.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be a helper name like 'ecr-login' (docker-credential-NAME)")
        return value

    @field_validator("lifetime", "timeout")
    @classmethod
    def _check_positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0s")
        return value


class EcrSettings(_Section):
    region: str
    registry_id: str
    # None: the AWS endpoint for the region; set for VPC endpoints (and tests).
    endpoint: str | None = None

    @field_validator("registry_id")
    @classmethod
    def _check_registry_id(cls, value: str) -> str:
        if not re.fullmatch(r"\d{12}", value):
            raise ValueError("must be the 12-digit AWS account ID (quote it in YAML)")
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", value):
            raise ValueError("must be an AWS region like 'us-east-1'")
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _plain_http_url(value)


class EcrCredentialsConfig(_Section):
    """ECR GetAuthorizationToken with the standard AWS chain (env, files, web identity)."""

    ecr: EcrSettings


class GcpSettings(_Section):
    scopes: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-platform",)


class GcpCredentialsConfig(_Section):
    """An OAuth access token from google-auth's default chain, as `oauth2accesstoken`."""

    gcp: GcpSettings


CredentialsConfig = HelperCredentialsConfig | EcrCredentialsConfig | GcpCredentialsConfig


class UpstreamConfig(_Section):
    """One upstream registry."""

    url: str
    # The upstream's own name for a repository is `<prefix>/<client-facing name>`.
    repository_prefix: str = ""
    fallbacks: tuple[FallbackConfig, ...] = ()
    aliases: tuple[str, ...] = ()
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    password_env: str | None = None
    # Exclusive with username/password: a helper, ECR or Google's default chain.
    credentials: CredentialsConfig | None = None
    tag_ttl: Duration = 600.0
    tag_rules: tuple[TagRule, ...] = ()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_stale: Duration = 7 * 86400.0
    tags_list_ttl: Duration = 30.0
    connect_timeout: Duration = 10.0
    read_timeout: Duration = 60.0
    docker_hub: bool | None = Field(
        default=None, description="map one-component names to library/; auto-detected by host"
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        return _plain_http_url(value)

    @field_validator("repository_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        return _repository_prefix(value) if value else value

    @model_validator(mode="after")
    def _check_credentials(self) -> UpstreamConfig:
        sources = _check_secret("password", self.password, self.password_file, self.password_env)
        if self.credentials is not None and (self.username or sources):
            raise ValueError("credentials: set either credentials or username/password, not both")
        if sources and not self.username:
            raise ValueError(f"{sources[0]} needs a username")
        if self.username and not sources:
            raise ValueError("username needs password, password_file or password_env")
        return self

    @property
    def host(self) -> str:
        """`host[:port]` of the upstream URL."""
        return urlsplit(self.url).netloc

    @property
    def is_docker_hub(self) -> bool:
        if self.docker_hub is not None:
            return self.docker_hub
        return urlsplit(self.url).hostname in DOCKER_HUB_HOSTS

    @property
    def has_credentials(self) -> bool:
        return bool(self.username) or self.credentials is not None

    def static_credentials(self) -> tuple[str, str] | None:
        """The username and password, read now: a file or variable may be rotated."""
        if not self.username:
            return None
        return self.username, _read_secret(self.password, self.password_file, self.password_env)


# S3 refuses multipart parts below this size (all but the last).
S3_MIN_PART = 5 * 1024 * 1024


class S3Config(_Section):
    """An S3-compatible bucket holding the blobs (`storage.backend: s3`). The secret key
    is read like upstream passwords: inline, from a file, or from a variable; without
    access_key, credentials come from the standard AWS chain."""

    # None: the AWS endpoint for the region.
    endpoint: str | None = None
    bucket: str
    region: str = "us-east-1"
    prefix: str = ""
    path_style: bool = False
    multipart_chunk: ByteSize = ByteSize(16 * 1024 * 1024)
    redirect: bool = False
    redirect_expiry: Duration = 1200.0
    create_bucket: bool = False
    access_key: str | None = None
    secret_key: SecretStr | None = None
    secret_key_file: Path | None = None
    secret_key_env: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _plain_http_url(value)

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", value):
            raise ValueError("must be 3-63 characters: lower-case letters, digits, '.', '-'")
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        value = value.strip("/")
        return f"{value}/" if value else ""

    @field_validator("multipart_chunk")
    @classmethod
    def _check_chunk(cls, value: ByteSize) -> ByteSize:
        if value < S3_MIN_PART:
            raise ValueError("must be at least 5MiB: S3 refuses smaller multipart parts")
        return value

    @field_validator("redirect_expiry")
    @classmethod
    def _check_expiry(cls, value: float) -> float:
        # SigV4 presigned URLs live at most 7 days.
        if not 1 <= value <= 7 * 86400:
            raise ValueError("must be between 1s and 7d")
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> S3Config:
        sources = _check_secret(
            "secret_key", self.secret_key, self.secret_key_file, self.secret_key_env
        )
        if sources and not self.access_key:
            raise ValueError(f"{sources[0]} needs access_key")
        if self.access_key and not sources:
            raise ValueError("access_key needs secret_key, secret_key_file or secret_key_env")
        return self

    def credentials(self) -> tuple[str, str] | None:
        """The access key and secret, read now (a file or variable may be rotated);
        None: the standard AWS credential chain."""
        if not self.access_key:
            return None
        return self.access_key, _read_secret(
            self.secret_key, self.secret_key_file, self.secret_key_env
        )


class StorageConfig(_Section):
    # filesystem: blobs under root. s3: blobs in storage.s3's bucket; root keeps temp
    # files and the embedded metadata only.
    backend: Literal["filesystem", "s3"] = "filesystem"
    s3: S3Config | None = None
    root: Path = Path("/var/lib/mirror")
    max_size: ByteSize | None = None
    high_watermark: float = Field(default=0.95, gt=0, le=1)
    low_watermark: float = Field(default=0.85, gt=0, le=1)
    eviction_interval: Duration = 30.0
    # Bytes ("5GiB") or a share of the filesystem ("10%") always left free.
    min_free: MinFree | None = None

    @model_validator(mode="after")
    def _check_watermarks(self) -> StorageConfig:
        if self.low_watermark >= self.high_watermark:
            raise ValueError("low_watermark must be below high_watermark")
        return self

    @model_validator(mode="after")
    def _check_backend(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend s3 needs the storage.s3 section (at least its bucket)")
        return self

    @property
    def min_free_bytes(self) -> int | None:
        return self.min_free if isinstance(self.min_free, int) else None

    @property
    def min_free_ratio(self) -> float | None:
        return self.min_free if isinstance(self.min_free, float) else None


class MetadataConfig(_Section):
    backend: Literal["embedded", "redis"] = "embedded"
    redis_url: str | None = None
    key_prefix: str = "mirror:"
    lease_ttl: Duration = 30.0

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_redis_url(value)  # its messages never repeat a password
        return value

    @model_validator(mode="after")
    def _check_backend(self) -> MetadataConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("backend redis needs redis_url")
        return self


# A shared secret shorter than this is refused: it guards every cached blob, the
# private upstreams' included, from anything that can reach the cluster port.
CLUSTER_SECRET_MIN = 16


class ClusterConfig(_Section):
    """The peer endpoint of a fleet of replicas with their own disks (fleet mode: `listen`
    set and the metadata backend redis). The secret is read like upstream passwords."""

    listen: str | None = None
    advertise_url: str | None = None
    secret: SecretStr | None = None
    secret_file: Path | None = None
    secret_env: str | None = None
    peer_timeout: Duration = 10.0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None and parse_listen(value)[1] == 0:
            raise ValueError("needs a fixed port: peers reach it at the advertised URL")
        return value

    @field_validator("advertise_url")
    @classmethod
    def _check_advertise_url(cls, value: str | None) -> str | None:
        return None if value is None else _plain_http_url(value)

    @model_validator(mode="after")
    def _check_cluster(self) -> ClusterConfig:
        sources = _check_secret("secret", self.secret, self.secret_file, self.secret_env)
        if self.listen is None:
            return self
        if not sources:
            raise ValueError("listen needs secret, secret_file or secret_env")
        if len(self.secret_value()) < CLUSTER_SECRET_MIN:
            raise ValueError(f"{sources[0]} must be at least {CLUSTER_SECRET_MIN} characters")
        if self.advertise_url is None and _binds_every_address(self.listen):
            # http://0.0.0.0:port would send every peer to itself.
            raise ValueError("listen binds every address: set advertise_url")
        return self

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return None if self.listen is None else parse_listen(self.listen)

    @property
    def peer_url(self) -> str | None:
        """The URL other replicas reach this one's peer endpoint at (None: no fleet)."""
        if self.listen is None:
            return None
        return self.advertise_url or f"http://{self.listen}"

    def secret_value(self) -> str:
        """The shared secret, read now: a file or variable may be rotated ("" if none)."""
        try:
            return _read_secret(self.secret, self.secret_file, self.secret_env)
        except OSError:
            return ""  # refuses every peer request until the file is back


def _binds_every_address(listen: str) -> bool:
    host = parse_listen(listen)[0]
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a name


class AccessRule(_Section):
    """Who may pull what: a client matching users, groups or anonymous, for upstream and
    repository globs. With rules configured, a pull needs a matching rule."""

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    anonymous: bool = False
    upstreams: tuple[str, ...] = ("*",)
    repositories: tuple[str, ...] = ("*",)

    @model_validator(mode="after")
    def _check_who(self) -> AccessRule:
        if not (self.users or self.groups or self.anonymous):
            raise ValueError("a rule names users, groups, or anonymous: true")
        return self


class AuthConfig(_Section):
    htpasswd: Path | None = None
    anonymous: bool = True
    realm: str = "registry-mirror"
    groups: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    rules: tuple[AccessRule, ...] = ()

    @model_validator(mode="after")
    def _check_auth(self) -> AuthConfig:
        if not self.anonymous and self.htpasswd is None:
            raise ValueError("anonymous: false needs an htpasswd file")
        if self.htpasswd is not None and not os.access(self.htpasswd, os.R_OK):
            raise ValueError(f"htpasswd {self.htpasswd} is not readable")
        for rule in self.rules:
            unknown = set(rule.groups) - set(self.groups)
            if unknown:
                raise ValueError(f"rules name groups that are not defined: {sorted(unknown)}")
        return self


class TlsConfig(_Section):
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _check_tls(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("client_ca needs cert and key")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name} {path} is not readable")
        return self


class ServerConfig(_Section):
    # Keep-alive connections idle this long are closed.
    idle_timeout: Duration = 60.0


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class UiConfig(_Section):
    """The operators' console (`/ui/`) and its JSON API (`/api/v1/`), mirror/console/."""

    enabled: bool = True
    # The `auth.groups` group whose members may act (pin, unpin, refresh, evict, seed).
    admins: str = "admins"
    # Let anonymous remote clients view (never act); loopback clients always may.
    allow_remote: bool = False


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"invalid listen address {value!r}: use host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    if not host:
        raise ValueError(f"invalid listen address {value!r}: missing host")
    return host, int(port_text)


class MirrorConfig(BaseSettings):
    """The whole configuration. Build it with `load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="MIRROR_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    listen: str = "0.0.0.0:5000"
    default_upstream: str | None = None
    offline: bool = False
    storage: StorageConfig = StorageConfig()
    metadata: MetadataConfig = MetadataConfig()
    log: LogConfig = LogConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    server: ServerConfig = ServerConfig()
    cluster: ClusterConfig = ClusterConfig()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    ui: UiConfig = UiConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_config has merged file, environment and flags in their order already;
        # reading the environment again here would put it above the flags.
        return (init_settings,)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="after")
    def _check_upstreams(self) -> MirrorConfig:
        if not self.upstreams:
            raise ValueError("upstreams: configure at least one upstream")
        if self.default_upstream is not None and self.default_upstream not in self.upstreams:
            raise ValueError(
                f"default_upstream: {self.default_upstream!r} is not one of upstreams "
                f"({', '.join(sorted(self.upstreams))})"
            )
        return self

    @model_validator(mode="after")
    def _check_cluster(self) -> MirrorConfig:
        listen = self.cluster.listen
        if listen is None:
            return self
        if self.metadata.backend != "redis":
            raise ValueError(
                "cluster.listen: fleet mode needs metadata.backend redis "
                "(replicas find each other's blobs through it)"
            )
        if parse_listen(listen)[1] == self.listen_address[1]:
            raise ValueError(f"cluster.listen: port {self.listen_address[1]} is listen's port")
        return self

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def fleet(self) -> bool:
        """Replicas with their own disks fill from each other (`cluster.listen` set; the
        backend is redis, which validation makes sure of)."""
        return self.cluster.listen is not None


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {key}: {message}")
    return "invalid configuration:\n" + "\n".join(lines)


def _merge(lower: dict[str, Any], higher: dict[str, Any]) -> dict[str, Any]:
    """`higher` over `lower`, key by key; two mappings under one key merge."""
    merged = dict(lower)
    for key, value in higher.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, dict):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def load_config(path: Path | str | None, **flags: Any) -> MirrorConfig:
    """The file (if any), under the `MIRROR_*` environment, under `flags` (the
    command line's values); then validate. See the module docstring."""
    file_layer = _read_file(path)
    environment = EnvSettingsSource(MirrorConfig)()
    data = _merge(_merge(file_layer, environment), flags)
    try:
        return MirrorConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def _read_file(path: Path | str | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        data = loaded or {}
    return data
