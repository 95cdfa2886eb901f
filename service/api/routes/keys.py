"""/v1/keys: API keys, managed with an admin key for every dataset (or `felis keys ...`)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from service.api.auth import Requires
from service.api.deps import SessionDep
from service.domain import keys
from service.domain.keys import Scope

router = APIRouter(prefix="/keys", tags=["keys"], dependencies=[Requires(Scope.ADMIN, every_dataset=True)])


class KeyCreate(BaseModel):
    scopes: list[Scope] = Field(min_length=1, max_length=4, examples=[["read"]],
                                description="predict ⊂ read ⊂ write ⊂ admin: one is enough")
    name: str = Field("", max_length=128, description="a note: who or what uses the key")
    datasets: list[str] | None = Field(None, min_length=1, max_length=1000,
                                       description="limit the key to these datasets; leave out for every dataset")


class KeyPublic(BaseModel):
    id: str
    name: str
    scopes: list[str]
    datasets: list[str] | None = Field(description="the datasets a limited key may see; null: every dataset")
    revoked: bool
    created_at: datetime


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class KeysPublic(BaseModel):
    data: list[KeyPublic]
    count: int


@router.post("", status_code=201)
def create_key(body: KeyCreate, session: SessionDep) -> KeyCreated:
    """A new key. The answer holds the key itself, which is shown this once."""
    row, key = keys.create(session, [s.value for s in body.scopes], name=body.name, dataset_names=body.datasets)
    return KeyCreated(**keys.describe_one(session, row), key=key)


@router.get("")
def list_keys(session: SessionDep) -> KeysPublic:
    """Every key, revoked ones included (never the keys themselves)."""
    rows = keys.list_keys(session)
    return KeysPublic(data=[KeyPublic(**r) for r in rows], count=len(rows))


@router.delete("/{key_id}", status_code=204)
def revoke_key(key_id: str, session: SessionDep) -> Response:
    """Revoke a key: it is refused from the next request on (it stays listed, revoked)."""
    keys.revoke(session, key_id)
    return Response(status_code=204)

