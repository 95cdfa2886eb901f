"""Who may call: API keys (Bearer or X-API-Key), what each route declares it requires, and
per-caller rate limits.

A route says what it requires where it is declared, never derived from its URL::

    @router.delete("/{name}", status_code=204, dependencies=[Requires(Scope.WRITE), InDataset])

- ``Requires(scope, *, rate_limit=None, every_dataset=False)``: the key must grant ``scope`` (403
  ``insufficient_scope``; scopes nest, see service.domain.keys). ``rate_limit`` names the limiter
  that counts the request (``"predict"``, ``"upload"``): per key, or per client address without
  one. ``every_dataset``: refused to a key limited to datasets (403 ``key_limited_to_datasets``).
- ``InDataset``: the route's ``{name}`` must be a dataset the key may see; any other answers 404
  ``dataset_not_found`` as if it did not exist. ``InTraining``: the same for ``{training_id}``,
  by the training's dataset.

Keys are required when ``FELIS_API_KEYS_REQUIRED`` (on in production mode): none sent is 401
``api_key_required``. Where keys are optional a request without one may do everything (embedded
mode on loopback); a key that is sent is always checked (401 ``invalid_api_key``). Failed key
attempts are limited per client address (429), and the client address is the peer's, or the one
X-Forwarded-For names when the peer is in ``FELIS_TRUSTED_PROXIES``. The limits are shared by every
API replica through Redis when one is configured, else kept per process (service.api.ratelimit).

The key is checked once per request however many declarations the route has: they all depend on
``current_caller``, which FastAPI solves once per request. Everything here is ``async def``: a
request without a key costs no thread hop and no database read (the predict path cannot afford
one, see deps.py); a key costs one hop and one read (two for a key limited to datasets).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request, params
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from service.api.ratelimit import Limits, Rate
from service.config import Settings, get_settings
from service.domain import keys, trainings
from service.domain.keys import Scope
from service.errors import Forbidden, NotFound, RateLimited, Unauthorized
from service.store.db import session_scope

log = logging.getLogger("felis.api")

RATE_LIMITS = ("predict", "upload")  # what a route's rate_limit may name
FAILED_KEYS = "failed_keys"  # the limiter of failed key attempts, per client address
FAILED_KEYS_PER_MINUTE = 30  # a client address that sends more bad keys than this waits (429)
FAILED_KEYS_BURST = 10

_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer felis_...`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="or the API key in X-API-Key")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the client address, and the key's grant (None: no key, keys optional)."""

    address: str
    grant: keys.Grant | None

    @property
    def key_id(self) -> str | None:
        return self.grant.key_id if self.grant else None

    @property
    def scopes(self) -> frozenset[Scope]:
        return self.grant.scopes if self.grant else frozenset(Scope)

    @property
    def datasets(self) -> Mapping[str, int] | None:
        """The datasets (name -> id) a limited key may see; None: every dataset."""
        return self.grant.datasets if self.grant else None

    @property
    def rate_key(self) -> str:
        return f"key:{self.grant.key_id}" if self.grant else f"addr:{self.address}"


def make_limiters(settings: Settings) -> Limits:
    return Limits({"predict": Rate(settings.rate_limit_predict_per_minute),
                   "upload": Rate(settings.rate_limit_upload_per_minute),
                   FAILED_KEYS: Rate(FAILED_KEYS_PER_MINUTE, burst=FAILED_KEYS_BURST)},
                  settings.shared_redis_url)


# --- the client address ----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _networks(entries: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            log.warning("FELIS_TRUSTED_PROXIES: %r is not an address or CIDR; ignored", entry)
    return tuple(out)


def _is_proxy(address: str, proxies: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(request: Request, settings: Settings) -> str:
    """The peer, unless it is a trusted proxy: then the nearest address in X-Forwarded-For that is
    not one (each proxy appends the peer it saw, so what a client wrote itself stays to the left)."""
    peer = request.client.host if request.client else "unknown"
    proxies = _networks(tuple(settings.trusted_proxies))
    if not proxies or not _is_proxy(peer, proxies):
        return peer
    hops = [h.strip() for value in request.headers.getlist("x-forwarded-for") for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_proxy(hop, proxies):
            return hop
        peer = hop
    return peer


# --- the caller: checked once per request ----------------------------------------------------


def _check_key(key: str) -> keys.Grant:
    with session_scope() as session:
        return keys.check(session, key)


KEY_OUTAGE_GRACE_S = 300.0  # while the database is down, a key this process found valid this recently still is
_KNOWN_KEYS_MAX = 10_000


class KnownKeys:
    """The grants of the keys this process checked lately, by the key's SHA-256 (never the key):
    what lets a caller whose key was valid a moment ago go on predicting from loaded versions
    while the metadata store is down, as keyless callers do. A key found invalid is forgotten at
    once; one revoked during the outage cannot be, as nothing can be revoked then."""

    def __init__(self, grace_s: float = KEY_OUTAGE_GRACE_S):
        self.grace_s = grace_s
        self._grants: dict[str, tuple[keys.Grant, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _id(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def remember(self, key: str, grant: keys.Grant) -> None:
        with self._lock:
            self._grants.pop(self._id(key), None)
            self._grants[self._id(key)] = (grant, time.monotonic())
            while len(self._grants) > _KNOWN_KEYS_MAX:  # the oldest first (insertion order)
                self._grants.pop(next(iter(self._grants)))

    def forget(self, key: str) -> None:
        with self._lock:
            self._grants.pop(self._id(key), None)

    def recent(self, key: str) -> keys.Grant | None:
        with self._lock:
            known = self._grants.get(self._id(key))
        return known[0] if known and time.monotonic() - known[1] <= self.grace_s else None


async def authenticate(request: Request, key: str, address: str) -> Caller:
    """The caller whose key was sent (however it was sent: /v1's headers, Custom Vision's): 401
    ``invalid_api_key`` for a bad one, which counts against ``address``'s failed attempts; 429
    while that address has sent too many, good key or not. While the metadata store is down, a
    key this process found valid in the last KEY_OUTAGE_GRACE_S is taken (KnownKeys); any other
    answers 503 database_unavailable, as it cannot be checked."""
    limiters: Limits = request.app.state.limiters
    known: KnownKeys = request.app.state.known_keys
    await limiters.check(FAILED_KEYS, address)  # this address sent too many bad keys: wait, good key or not
    try:
        grant = await run_in_threadpool(_check_key, key)
    except Unauthorized:
        known.forget(key)
        try:
            await limiters.take(FAILED_KEYS, address)
        except RateLimited:
            pass
        raise
    except DBAPIError:
        grant = known.recent(key)
        if grant is None:
            raise
        log.warning("the metadata store is unreachable: key %s taken as checked in the last %.0f s", grant.key_id, known.grace_s)
        return Caller(address, grant)
    known.remember(key, grant)
    return Caller(address, grant)


async def current_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
) -> Caller:
    settings = get_settings()
    address = client_address(request, settings)
    key = (bearer.credentials.strip() if bearer else "") or header_key
    if not key:
        if settings.api_keys_required:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'", code="api_key_required")
        return Caller(address, None)
    return await authenticate(request, key, address)


_CallerDep = Annotated[Caller, Depends(current_caller)]  # routes list deps.CallerDep, the same dependency


# --- what routes declare ---------------------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """What a route requires of its caller (the marker tests/service/api/test_routes_declare_scopes.py reads)."""

    scope: Scope
    rate_limit: str | None = None
    every_dataset: bool = False

    async def check(self, request: Request, caller: Caller) -> None:
        if self.scope not in caller.scopes:
            raise Forbidden(f"this API key lacks the {self.scope.value!r} scope", code="insufficient_scope",
                            details={"required_scope": self.scope.value,
                                     "granted": sorted(s.value for s in caller.scopes)})
        if self.every_dataset and caller.datasets is not None:
            raise Forbidden("this API key is limited to some datasets; this needs a key for every dataset",
                            code="key_limited_to_datasets")
        if self.rate_limit:
            await request.app.state.limiters.take(self.rate_limit, caller.rate_key)


def requires_of(caller_dependency, scope: Scope, rate_limit: str | None, every_dataset: bool) -> params.Depends:
    """The dependency that requires ``scope`` (and a rate limit, and every dataset) of the caller
    ``caller_dependency`` solves: ``current_caller`` for /v1 (``Requires``), Custom Vision's own."""
    if rate_limit is not None and rate_limit not in RATE_LIMITS:
        raise ValueError(f"unknown rate limit {rate_limit!r}; one of {RATE_LIMITS}")
    requirement = Requirement(Scope(scope), rate_limit, every_dataset)

    async def require(request: Request, caller: Caller = Depends(caller_dependency)) -> None:  # noqa: B008 (a closure's Annotated would be a string here)
        await requirement.check(request, caller)

    require.requirement = requirement  # type: ignore[attr-defined]
    return Depends(require)


def Requires(scope: Scope, *, rate_limit: str | None = None, every_dataset: bool = False) -> params.Depends:  # noqa: N802
    """The dependency a route lists to require ``scope`` (and a rate limit, and every dataset)."""
    return requires_of(current_caller, scope, rate_limit, every_dataset)


async def _dataset_visible(name: str, caller: _CallerDep) -> None:
    if caller.datasets is not None and name not in caller.datasets:
        raise NotFound(f"dataset {name!r} does not exist", code="dataset_not_found")


def _training_dataset(training_id: str) -> int:
    with session_scope() as session:
        return trainings.get(session, training_id).dataset_id


async def _training_visible(training_id: str, caller: _CallerDep) -> None:
    if caller.datasets is None:  # every dataset: nothing to look up
        return
    if await run_in_threadpool(_training_dataset, training_id) not in caller.datasets.values():
        raise NotFound(f"training {training_id!r} does not exist", code="training_not_found")


InDataset = Depends(_dataset_visible)
InTraining = Depends(_training_visible)


# --- the first key ---------------------------------------------------------------------------


def bootstrap_admin_key(settings: Settings) -> None:
    """FELIS_BOOTSTRAP_ADMIN_KEY: stored (hashed) as an admin key when no key exists yet."""
    key = settings.bootstrap_admin_key.get_secret_value()
    if not key:
        return
    with session_scope() as session:
        if keys.bootstrap(session, key):
            log.warning("stored FELIS_BOOTSTRAP_ADMIN_KEY as admin key %r: create the keys you need with it, "
                        "then revoke it (DELETE /v1/keys/%s)", keys.BOOTSTRAP_ID, keys.BOOTSTRAP_ID)
