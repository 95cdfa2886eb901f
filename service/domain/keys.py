"""API keys: created and revoked by an operator (`felis keys ...`), stored hashed, checked per request.

A key is ``felis_<id>_<secret>``; the database keeps the id, the scopes and sha256(key). The
secret has 256 bits of entropy, so a fast hash is safe (no password stretching needed), and the
key is shown once, at creation.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from service.store.tables import ApiKey

SCOPES = ("predict", "write", "admin")
# what each scope may do: predict reads and predicts; write also uploads, trains, promotes and
# deletes; admin may do everything
IMPLIES = {"predict": {"predict"}, "write": {"predict", "write"}, "admin": {"predict", "write", "admin"}}


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(session: Session, scopes: list[str], name: str = "") -> tuple[ApiKey, str]:
    bad = [s for s in scopes if s not in SCOPES]
    if not scopes or bad:
        raise InvalidRequest(f"scopes must be among {SCOPES}", code="invalid_scope")
    key_id = secrets.token_hex(4)
    key = f"felis_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, name=name, scopes=sorted(set(scopes)), key_hash=_hash(key))
    session.add(row)
    session.commit()
    return row, key


def revoke(session: Session, key_id: str) -> None:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}", code="key_not_found")
    row.revoked = True
    session.commit()


def list_keys(session: Session) -> list[dict[str, Any]]:
    return [{"id": k.id, "name": k.name, "scopes": k.scopes, "revoked": k.revoked, "created_at": k.created_at}
            for k in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]


def authenticate(session: Session, key: str) -> ApiKey:
    parts = key.split("_")
    row = session.get(ApiKey, parts[1]) if len(parts) >= 3 and parts[0] == "felis" else None
    if row is None or row.revoked or not hmac.compare_digest(row.key_hash, _hash(key)):
        raise Unauthorized("the API key is not valid", code="invalid_api_key")
    return row


def authorize(row: ApiKey, scope: str) -> None:
    granted = set().union(*(IMPLIES.get(s, set()) for s in row.scopes))
    if scope not in granted:
        raise Forbidden(f"this API key lacks the {scope!r} scope", code="insufficient_scope")
