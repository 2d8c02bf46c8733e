"""Service settings: one typed object, read from ``IVVAE_*`` environment variables.

This is the single source of truth for every knob the gateway has. Deployment files
(docker-compose.yml, k8s/) are checked against the field names here by a test, so a
variable renamed here and not there fails CI.

Nothing is read at import time: call ``Settings()`` where the application is built.
"""

from __future__ import annotations

import difflib
import os
import ssl
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .core import strict
from .core.names import Precision
from .triton import contract

BackendName = Literal["local", "triton"]

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 50051
# `ivvae triton-serve` and `ivvae stack` on one machine with the gateway: Triton's own
# defaults (8000-8002) would collide with the gateway's HTTP port. Containers keep 8000-8002.
LOCAL_TRITON_HTTP_PORT = 8100
LOCAL_TRITON_GRPC_PORT = 8101
LOCAL_TRITON_METRICS_PORT = 8102

ENV_PREFIX = "IVVAE_"


def variable(field: str) -> str:
    """The environment variable of a settings field: ``IVVAE_`` + its name upper-cased."""
    return ENV_PREFIX + field.upper()


# IVVAE_* variables that are not gateway settings: the command-line tools' (docs/deploy.md
# lists them), and the Triton python models' (model_repository/*/1/model.py, a fallback for
# the ARTIFACT_DIR parameter). Any other IVVAE_* name is a typo the gateway warns about.
TOOL_VARIABLES = frozenset({"IVVAE_API_KEY", "IVVAE_SHARD_COUNT", "IVVAE_DEBUG",
                            "IVVAE_TUNE_MALLOC", "IVVAE_MODEL_REPOSITORY"})
MODEL_SIDE_VARIABLES = frozenset({"IVVAE_ARTIFACT_DIR"})
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_LOG_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}
MAX_CACHE_TTL_S = 10 * 365 * 24 * 3600  # Redis takes larger, as milliseconds it cannot hold


class Settings(BaseSettings):
    """Gateway configuration. Every field maps to ``IVVAE_<FIELD_NAME_UPPER>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- network ---------------------------------------------------------------------------
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(DEFAULT_HTTP_PORT, ge=0, le=65535)
    grpc_port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    enable_http: bool = True
    enable_grpc: bool = True

    # -- models ----------------------------------------------------------------------------
    # Path of the default model's weights (.pth, .safetensors, or a folder that
    # IVVAEAutoencoder.save_pretrained wrote). Empty: the bundled model.
    weights: str = ""
    # Extra models, "name=path,name2=path2". The default model is also listed under its name.
    extra_weights: str = ""
    model_name: str = ""  # name of the default model; derived from the weights when empty
    device: str = "cpu"
    # torch intra-op threads for the local backend; 0 = torch's default (one per core).
    # On small shared CPUs, 1 often wins: many videos in flight batch instead of spinning.
    torch_threads: int = Field(0, ge=0)
    encode_precision: Precision = "float32"
    decode_precision: Precision = "float32"

    # -- backend ---------------------------------------------------------------------------
    backend: BackendName = "local"
    # Triton's gRPC endpoint: host:port, a comma-separated list, or dns:///name:port (one
    # endpoint per address, resolved per video). Each video stays on one endpoint.
    triton_url: str = f"127.0.0.1:{LOCAL_TRITON_GRPC_PORT}"
    triton_encoder_model: str = contract.ENCODER_MODEL
    triton_decoder_model: str = contract.DECODER_MODEL
    triton_timeout_s: float = Field(60.0, gt=0)
    triton_connect_retries: int = Field(3, ge=0)

    # -- batching --------------------------------------------------------------------------
    batch_max_size: int = Field(8, ge=1)
    batch_max_delay_ms: float = Field(5.0, ge=0)
    groups_per_step: int = Field(4, ge=1)  # frame groups sent to the model in one step

    # -- result cache ----------------------------------------------------------------------
    redis_url: str = ""  # empty: in-memory LRU
    cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, le=MAX_CACHE_TTL_S)  # 0 = no expiry
    cache_max_entry_bytes: int = Field(256 * 1024 * 1024, ge=0)
    cache_memory_max_bytes: int = Field(512 * 1024 * 1024, ge=0)
    cache_key_prefix: str = "ivvae"
    redis_timeout_s: float = Field(2.0, gt=0)
    # After a Redis failure the cache is skipped this long; then one request probes it.
    redis_retry_s: float = Field(5.0, gt=0)
    # Key of the MAC that seals every cache entry (>= 16 characters); every gateway sharing
    # one Redis needs the same one. Empty: read from cache_secret_file, which is created with
    # a random secret when absent (and when it cannot be, a per-process secret is used).
    cache_secret: SecretStr = SecretStr("")
    cache_secret_file: str = ""  # empty: $XDG_STATE_HOME/ivvae/cache-secret

    # -- limits ----------------------------------------------------------------------------
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # What an encode produces (after preprocessing) and a decode may produce.
    max_frames: int = Field(2048, ge=1)
    max_pixels: int = Field(1920 * 1088, ge=1)  # per frame, width * height
    # What an upload may be before preprocessing brings it down: its frame size (a 4K clip
    # resized on the way in) and its duration (an hour-long clip with max_frames), checked
    # against the headers before decoding and against what decodes.
    max_source_pixels: int = Field(4096 * 2304, ge=1)
    max_source_seconds: float = Field(4 * 3600.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    # After SIGTERM: how long in-flight requests (HTTP and gRPC) get to finish before they
    # are cancelled (HTTP: a 503 the client may retry; gRPC: UNAVAILABLE). Keep it below the
    # orchestrator's wait: compose's stop_grace_period, Kubernetes' grace minus preStop.
    shutdown_grace_s: float = Field(50.0, gt=0, le=3600)
    # Bytes a second an upload (an HTTP body, a gRPC request stream) must average after a
    # first allowance of one gap timeout (http_body_timeout_s, grpc_read_timeout_s); 0: no
    # bound. Without it one byte every 29 seconds holds a connection and a request for ever.
    min_upload_rate: float = Field(500.0, ge=0)
    # The process's memory bound (ivvae.memory): step sizes are planned from it, what cannot
    # fit is refused (413), and requests queue for it. 0: 75% of the machine's (or the
    # container's) memory.
    memory_budget_mb: int = Field(0, ge=0)
    # How long a request may wait for its share of the budget, or for one of the
    # max_concurrent_requests, before a 503 (Retry-After).
    admission_timeout_s: float = Field(30.0, gt=0)
    max_concurrent_requests: int = Field(64, ge=1)
    # gRPC: the largest single message either way (EncodeUnary's whole file); the streaming
    # RPCs use <= 1 MiB chunks, so this does not limit them (max_upload_bytes does).
    grpc_max_message_bytes: int = Field(64 * 1024 * 1024, ge=2 * 1024 * 1024, le=2**31 - 1)
    # ivvae RPCs in flight over gRPC; more are refused with UNAVAILABLE (clients back off).
    grpc_max_concurrent_rpcs: int = Field(256, ge=1)
    # The longest wait for the next message of a request stream (the first one included).
    grpc_read_timeout_s: float = Field(10.0, gt=0)
    # Received but unread bytes each gRPC stream may hold (its HTTP/2 flow-control window);
    # an upload moves about this + 1 MiB per round trip. 0: grpc's own windows, which grow
    # with the measured bandwidth-delay product: faster over long round trips, but on
    # loopback 100 refused 60 MB uploads then peaked at 114-412 MB (fixed: 40-50 MB).
    # bench/bench_grpc.py measures both.
    grpc_stream_window_bytes: int = Field(4 * 1024 * 1024, ge=0, le=2**31 - 1)

    # -- connections -----------------------------------------------------------------------
    # HTTP: the bytes and lines of a request head; the time to send it (from the connection's
    # opening or the previous response); the longest gap inside a request body; idle time
    # between requests; open connections (past it: 503 and closed at once).
    http_max_header_bytes: int = Field(64 * 1024, ge=4096)
    http_max_headers: int = Field(100, ge=8)
    http_header_timeout_s: float = Field(10.0, gt=0)
    http_body_timeout_s: float = Field(30.0, gt=0)
    http_keepalive_s: float = Field(5.0, gt=0)
    max_connections: int = Field(1024, ge=1)

    # -- auth ------------------------------------------------------------------------------
    # Comma-separated; empty disables auth. Only separators and spaces is an error (it would
    # read as "no keys" and disable auth unnoticed).
    api_keys: str = ""
    # TLS for both listeners (HTTPS and gRPC over TLS): PEM certificate chain and private
    # key files. Both or neither; empty: plain text (e.g. behind a mesh or an ingress).
    tls_cert: str = ""
    tls_key: str = ""

    log_level: str = "info"  # critical, error, warning, info, debug

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = _LOG_LEVEL_ALIASES.get(value.strip().lower(), value.strip().lower())
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not a log level: {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        url = urlsplit(value)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"the scheme must be redis://, rediss:// or unix://, got "
                             f"{url.scheme or 'none'}:// (redis://host:port/db)")
        db = url.path.strip("/") if url.scheme != "unix" else ""
        # redis-py drops a db path that is not a number and uses db 0: another gateway's.
        if db and not db.isdigit():
            raise ValueError(f"the database is a number (redis://host:port/0), got {db!r}")
        # redis-py takes it from the URL over the client's own setting: every entry would
        # come back as text, and every read fail.
        if "decode_responses" in parse_qs(url.query):
            raise ValueError("remove decode_responses from the URL: cache entries are binary")
        return value

    @field_validator("extra_weights")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("api_keys")
    @classmethod
    def _some_key(cls, value: str) -> str:
        keys = _keys(value)
        # "," or " , " would otherwise mean "no keys", which silently disables auth.
        if value and not keys:
            raise ValueError("IVVAE_API_KEYS holds no key (only commas and spaces); leave it "
                             "empty to disable auth, or list the keys")
        if not all(map(strict.is_api_key, keys)):
            # No client could send such a key: a typo, not a key (the key is not shown).
            raise ValueError("IVVAE_API_KEYS holds a key with characters a header cannot "
                             "carry: visible ASCII only (inner spaces allowed)")
        return value.strip()

    @field_validator("grpc_stream_window_bytes")
    @classmethod
    def _usable_window(cls, value: int) -> int:
        # Below HTTP/2's default window every upload would crawl; 0 means grpc's default.
        if 0 < value < 65535:
            raise ValueError("IVVAE_GRPC_STREAM_WINDOW_BYTES must be 0 (grpc's default) or "
                             "at least 65535")
        return value

    @field_validator("model_name")
    @classmethod
    def _safe_model_name(cls, value: str) -> str:
        return strict.model_name(value) if value else value

    @field_validator("cache_secret")
    @classmethod
    def _secret_length(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value().encode()) < 16:
            raise ValueError("IVVAE_CACHE_SECRET must be at least 16 bytes")
        return value

    @model_validator(mode="after")
    def _extra_weights_parse(self) -> Settings:
        self.extra_weight_paths  # noqa: B018  (raises on a malformed list, at start-up)
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("IVVAE_TLS_CERT and IVVAE_TLS_KEY must be set together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"{variable(name)}: no such file {path!r}")
        if self.tls_cert:
            # Loaded now, as both listeners will: a key that is not the certificate's, a
            # file that is not PEM, or a key with a passphrase (which OpenSSL would ask
            # for on the terminal) is a start-up error naming the settings, not a failed
            # bind or a server that quietly ends.
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"IVVAE_TLS_CERT {self.tls_cert!r} and IVVAE_TLS_KEY {self.tls_key!r} are "
                    f"not a usable PEM certificate chain and its unencrypted key: "
                    f"{exc.strerror or exc}") from None
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        if (self.enable_http and self.enable_grpc and self.port != 0
                and self.port == self.grpc_port):
            raise ValueError(f"IVVAE_PORT and IVVAE_GRPC_PORT are both {self.port}: HTTP and "
                             "gRPC need a port each")
        return self

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) PEM bytes, or None without TLS."""
        if not self.tls_cert:
            return None
        return Path(self.tls_cert).read_bytes(), Path(self.tls_key).read_bytes()

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(_keys(self.api_keys))

    @property
    def extra_weight_paths(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for item in self.extra_weights.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"IVVAE_EXTRA_WEIGHTS entry {item!r} is not NAME=PATH")
            name = strict.model_name(name.strip())
            if name in out:  # the last would win, and the first be dropped unseen
                raise ValueError(f"IVVAE_EXTRA_WEIGHTS names {name!r} twice")
            out[name] = Path(path.strip())
        return out


def settings_problems(exc: ValidationError, options: Collection[str] = ()) -> list[str]:
    """One line per problem of a ``Settings`` validation error, each named where its value
    came from: ``--option`` for a field in ``options`` (given on a command line), else its
    ``IVVAE_*`` variable."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        name = str(loc[0]) if loc else ""
        where = ("settings" if not name else f"--{name.replace('_', '-')}" if name in options
                 else variable(name))
        lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return lines


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A line for each ``IVVAE_*`` variable in ``environ`` that nothing reads (a typo:
    settings ignore names they do not know), with the setting it most likely meant."""
    environ = os.environ if environ is None else environ
    known = {variable(name) for name in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        upper = name.upper()  # settings read names in any case
        if (not upper.startswith(ENV_PREFIX) or upper in known or upper in TOOL_VARIABLES
                or upper in MODEL_SIDE_VARIABLES):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{name} is not an ivvae setting and is ignored{hint}")
    return lines


def _keys(api_keys: str) -> list[str]:
    """The keys of ``IVVAE_API_KEYS`` (comma-separated; spaces around each dropped)."""
    return [k.strip() for k in api_keys.split(",") if k.strip()]
