"""Rows that API tests set up directly in the metadata store (the domain's rules are tested in
tests/service/domain; these only need a training in a given state)."""

from __future__ import annotations

import uuid


def training_row(status: str = "queued") -> str:
    """A training of a fresh dataset, in the given status; its id."""
    from service.domain import datasets
    from service.store.db import session_scope
    from service.store.tables import Training

    with session_scope() as s:
        d = datasets.create(s, f"ev{uuid.uuid4().hex[:8]}")
        s.flush()
        t = Training(dataset_id=d.id, status=status)
        s.add(t)
        s.flush()
        return t.id


def update_training(training_id: str, **values) -> None:
    from service.store.db import session_scope
    from service.store.tables import Training

    with session_scope() as s:
        t = s.get(Training, training_id)
        for k, v in values.items():
            setattr(t, k, v)
