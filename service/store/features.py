"""Frozen-backbone features cached in the metadata store, keyed by (extractor, image sha256).

Every worker shares them through the database, so a retrain on the same images skips the
backbone entirely. Implements models.train.FeatureCache."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.store.db import session_scope
from service.store.tables import ImageFeature


class DbFeatureCache:
    def get_many(self, extractor_id: str, sha256s: list[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        with session_scope() as session:
            for i in range(0, len(sha256s), 500):
                chunk = sha256s[i : i + 500]
                rows = session.execute(
                    select(ImageFeature.sha256, ImageFeature.vector).where(
                        ImageFeature.extractor == extractor_id, ImageFeature.sha256.in_(chunk)
                    )
                ).all()
                out.update({sha: np.frombuffer(vec, dtype="<f4").copy() for sha, vec in rows})
        return out

    def put_many(self, extractor_id: str, features: dict[str, np.ndarray]) -> None:
        if not features:
            return
        rows = [
            ImageFeature(extractor=extractor_id, sha256=sha, vector=np.asarray(v, dtype="<f4").tobytes())
            for sha, v in features.items()
        ]
        try:
            with session_scope() as session:
                session.add_all(rows)
        except IntegrityError:  # another worker cached some of them first: keep theirs
            with session_scope() as session:
                for row in rows:
                    session.merge(row)
