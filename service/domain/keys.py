"""API keys: created and revoked by an operator (`felis keys ...`, or an admin key over
/v1/keys), stored hashed, checked per request.

A key is ``felis_<id>_<secret>``; the database keeps the id, the scopes and sha256(key). The
secret has 256 bits of entropy, so a fast hash is safe (no password stretching needed), and the
key is shown once, at creation. The one exception is the bootstrap admin key of a fresh
deployment (``FELIS_BOOTSTRAP_ADMIN_KEY``): any string the operator chose, found by its hash.

Scopes nest, so a key needs one: ``predict`` predicts and reads the metadata of datasets and
models; ``read`` also reads images, evaluations, downloads and trainings; ``write`` also uploads,
relabels, trains, promotes and deletes; ``admin`` also manages keys. A key may be limited to
named datasets (their ids are stored, so a dataset deleted and made again under the same name
is not included): it sees only those, and cannot create datasets or manage keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.domain import datasets
from service.errors import InvalidRequest, NotFound, Unauthorized
from service.store.tables import ApiKey, ApiKeyDataset, Dataset


class Scope(StrEnum):
    PREDICT = "predict"  # predict; read the metadata of datasets and models
    READ = "read"  # also images (list, detail, content), near-duplicates, evaluations, downloads, trainings
    WRITE = "write"  # also upload, relabel, train, cancel, promote, thresholds, delete
    ADMIN = "admin"  # also manage keys (/v1/keys) and read /metrics


SCOPES = tuple(s.value for s in Scope)
# what each scope grants: each includes the one before
IMPLIES: dict[Scope, frozenset[Scope]] = {
    Scope.PREDICT: frozenset({Scope.PREDICT}),
    Scope.READ: frozenset({Scope.PREDICT, Scope.READ}),
    Scope.WRITE: frozenset({Scope.PREDICT, Scope.READ, Scope.WRITE}),
    Scope.ADMIN: frozenset(Scope),
}
BOOTSTRAP_ID = "bootstrap"  # the id of the key FELIS_BOOTSTRAP_ADMIN_KEY makes (one, even if processes race)
MIN_BOOTSTRAP_LENGTH = 32


def granted(scopes: Iterable[str]) -> frozenset[Scope]:
    """Everything the stored scopes allow (unknown names allow nothing)."""
    return frozenset().union(*(IMPLIES.get(s, frozenset()) for s in scopes if s in SCOPES))


@dataclass(frozen=True)
class Grant:
    """What a valid key may do: its scopes (implied ones included) and, for a limited key, the
    live datasets it may see (name -> id); ``datasets`` is None for a key over every dataset."""

    key_id: str
    scopes: frozenset[Scope]
    datasets: Mapping[str, int] | None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _dataset_ids(session: Session, names: Iterable[str]) -> list[int]:
    return sorted({datasets.get(session, name).id for name in names})


def create(session: Session, scopes: Iterable[str], name: str = "",
           dataset_names: Iterable[str] | None = None) -> tuple[ApiKey, str]:
    """A new key (the row, and the key itself: shown this once). With ``dataset_names`` it sees
    only those datasets (404 ``dataset_not_found`` for a name that does not exist)."""
    scopes = list(scopes)
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise InvalidRequest(f"scopes must be among {', '.join(SCOPES)}", code="invalid_scope",
                             details={"invalid": bad})
    ids = None
    if dataset_names is not None:
        ids = _dataset_ids(session, dataset_names)
        if not ids:
            raise InvalidRequest("a key limited to datasets needs at least one; leave them out for every dataset",
                                 code="no_datasets")
    key_id = secrets.token_hex(4)
    key = f"felis_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, name=name, scopes=sorted(set(scopes)), key_hash=_hash(key), limited=ids is not None)
    session.add(row)
    session.flush()
    session.add_all(ApiKeyDataset(key_id=key_id, dataset_id=i) for i in ids or ())
    session.commit()
    return row, key


def bootstrap(session: Session, key: str) -> bool:
    """The first admin key of a fresh deployment: made from ``key`` when no key exists at all
    (revoked ones count), else nothing. True when it was made."""
    if len(key) < MIN_BOOTSTRAP_LENGTH:
        raise InvalidRequest(f"the bootstrap admin key needs at least {MIN_BOOTSTRAP_LENGTH} characters",
                             code="bootstrap_key_too_short")
    if session.scalar(select(func.count()).select_from(ApiKey)):
        return False
    session.add(ApiKey(id=BOOTSTRAP_ID, name="bootstrap admin (FELIS_BOOTSTRAP_ADMIN_KEY)",
                       scopes=[Scope.ADMIN.value], key_hash=_hash(key), limited=False))
    try:
        session.commit()
    except IntegrityError:  # another process starting at the same time made it
        session.rollback()
        return False
    return True


def revoke(session: Session, key_id: str) -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}", code="key_not_found")
    row.revoked = True
    session.commit()


def _limits(session: Session, key_ids: list[str]) -> dict[str, dict[str, int]]:
    """key id -> {name: id} of the live datasets each limited key may see."""
    out: dict[str, dict[str, int]] = {k: {} for k in key_ids}
    if key_ids:
        rows = session.execute(
            select(ApiKeyDataset.key_id, Dataset.name, Dataset.id)
            .join(Dataset, Dataset.id == ApiKeyDataset.dataset_id)
            .where(ApiKeyDataset.key_id.in_(key_ids), datasets.LIVE))
        for key_id, name, dataset_id in rows:
            out[key_id][name] = dataset_id
    return out


def describe(row: ApiKey, limits: Mapping[str, int] | None) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "scopes": row.scopes,
            "datasets": sorted(limits) if row.limited else None,
            "revoked": row.revoked, "created_at": row.created_at}


def describe_one(session: Session, row: ApiKey) -> dict[str, Any]:
    return describe(row, _limits(session, [row.id])[row.id] if row.limited else None)


def list_keys(session: Session) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))
    limits = _limits(session, [r.id for r in rows if r.limited])
    return [describe(r, limits.get(r.id)) for r in rows]


def authenticate(session: Session, key: str) -> ApiKey:
    parts = key.split("_")
    row = session.get(ApiKey, parts[1]) if len(parts) >= 3 and parts[0] == "felis" else None
    if row is None:  # the bootstrap key may have any form
        row = session.get(ApiKey, BOOTSTRAP_ID)
    if row is None or row.revoked or not hmac.compare_digest(row.key_hash, _hash(key)):
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    return row


def check(session: Session, key: str) -> Grant:
    """What ``key`` may do (one read; two for a key limited to datasets); 401 when it is not valid."""
    row = authenticate(session, key)
    limits = _limits(session, [row.id])[row.id] if row.limited else None
    return Grant(row.id, granted(row.scopes), limits)


def still_valid(session: Session, key_id: str) -> bool:
    """Whether a key checked earlier is still valid (not revoked, not deleted): for what outlasts
    the request that checked it, an event stream."""
    row = session.get(ApiKey, key_id)
    return row is not None and not row.revoked


def visible_datasets(session: Session, key_id: str, *, limit: int = 100,
                     offset: int = 0) -> tuple[list[Dataset], int]:
    """The live datasets a limited key may see, by name, as datasets.list_all lists them all."""
    where = (Dataset.id.in_(select(ApiKeyDataset.dataset_id).where(ApiKeyDataset.key_id == key_id)), datasets.LIVE)
    total = session.scalar(select(func.count(Dataset.id)).where(*where)) or 0
    rows = session.scalars(select(Dataset).where(*where).order_by(Dataset.name).limit(limit).offset(offset)).all()
    return list(rows), total
