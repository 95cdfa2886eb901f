"""Keyset pagination: an opaque cursor names the last row of a page, the next page starts after it.

Lists ordered by (a timestamp, an id) take ``cursor`` and answer ``next_cursor`` (None after the
last page): each page costs an index seek, whatever how deep it is, where ``offset`` reads and
drops every row before it; rows added or removed meanwhile neither repeat nor skip rows. The cursor
is base64url JSON of the last row's sort key, with a kind tag so a trainings cursor is refused by
the images list (422 invalid_cursor), and bounded in length.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime, timezone

from service.errors import InvalidRequest

MAX_CURSOR_CHARS = 200


def encode(kind: str, at: datetime, row_id: str) -> str:
    raw = json.dumps([kind, at.astimezone(timezone.utc).isoformat() if at.tzinfo else at.isoformat(), row_id],
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode(kind: str, cursor: str) -> tuple[datetime, str]:
    """(timestamp, id) of the row a cursor of `kind` names; InvalidRequest invalid_cursor otherwise."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        tag, at, row_id = value
        if tag != kind or not isinstance(row_id, str) or len(row_id) > 64:
            raise ValueError("another list's cursor")
        stamp = datetime.fromisoformat(at)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)), row_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("not a cursor this list gave: send the next_cursor of the page before, unchanged, "
                             "or leave cursor out for the first page", code="invalid_cursor") from None
