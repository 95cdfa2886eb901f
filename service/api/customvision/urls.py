"""Signed, expiring URLs of felis's own image bytes (get_tagged_images' ``originalImageUri``,
``resizedImageUri`` and ``thumbnailUri``), as Custom Vision hands out SAS URLs: whoever holds one
may read that image until it expires, without a key.

The signature is HMAC-SHA256, keyed by FELIS_CUSTOMVISION_URL_SECRET, over the URL's path and its
expiry (Unix seconds): a changed path, image, size or expiry fails. Without the setting each
process signs with a random key of its own, so its URLs fail at other processes and after a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from functools import lru_cache
from urllib.parse import urlencode

from service.config import Settings
from service.errors import Forbidden

CONTENT_PREFIX = "/customvision/content/images"
KINDS = ("original", "resized", "thumbnail")


@lru_cache(maxsize=1)
def _process_secret() -> bytes:
    return secrets.token_bytes(32)


def _secret(settings: Settings) -> bytes:
    configured = settings.customvision_url_secret.get_secret_value()
    return configured.encode() if configured else _process_secret()


def content_path(image_id: str, kind: str) -> str:
    return f"{CONTENT_PREFIX}/{image_id}/{kind}"


def signature(settings: Settings, path: str, expires: int) -> str:
    return hmac.new(_secret(settings), f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def signed_url(settings: Settings, base_url: str, image_id: str, kind: str, *, now: float | None = None) -> str:
    path = content_path(image_id, kind)
    expires = int((time.time() if now is None else now) + settings.customvision_url_ttl_seconds)
    query = urlencode({"expires": expires, "signature": signature(settings, path, expires)})
    return f"{base_url.rstrip('/')}{path}?{query}"


def verify(settings: Settings, path: str, expires: int, given: str, *, now: float | None = None) -> None:
    """403 unless ``given`` signs this path and expiry, and the expiry has not passed."""
    if not hmac.compare_digest(signature(settings, path, expires), given or ""):
        raise Forbidden("the URL's signature is not valid", code="invalid_signature")
    if (time.time() if now is None else now) > expires:
        raise Forbidden("the URL has expired: get a new one from get_tagged_images", code="url_expired")
