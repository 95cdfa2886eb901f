"""Browser guards: web pages of other sites may not change state, and (embedded mode) a page
that rebinds its DNS name to this machine may not talk to it at all.

Any page a user visits can send "simple" requests (multipart and empty-body POSTs, no preflight)
to ``http://127.0.0.1:8000``, and with DNS rebinding (``evil.example`` resolving to 127.0.0.1)
read the answers too. ``RequestGuardMiddleware`` answers 403 before the app sees such a request:

* ``cross_site_request``: a state-changing request (anything but GET, HEAD, OPTIONS) whose
  ``Origin`` is neither the server's own nor in ``FELIS_ALLOWED_ORIGINS``, or that a browser marks
  ``Sec-Fetch-Site: cross-site`` or ``same-site`` without such an Origin. Requests with neither
  header (curl, the felis client, scripts) are not from a web page and pass.
* ``host_not_allowed`` (embedded mode only): a ``Host`` other than localhost, 127.0.0.1 or [::1]
  (any port) or an entry of ``FELIS_ALLOWED_HOSTS`` (``name`` matches any port, ``name:port`` only
  that one, ``*`` anything). /healthz and /readyz are exempt: they tell nothing, and probes
  address the pod by IP.

"The server's own origin" is the scheme and Host the request came to; ``X-Forwarded-Proto`` and
``X-Forwarded-Host`` count only from a peer in ``FELIS_TRUSTED_PROXIES`` (addresses or CIDRs).
"""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import refusal
from service.config import LOOPBACK_HOSTS, Settings

log = logging.getLogger("felis.api")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
EXEMPT_FROM_HOST_CHECK = frozenset({"/healthz", "/readyz"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split_host(value: str) -> tuple[str, int | None] | None:
    """'Example.COM:8000' -> ('example.com', 8000); '[::1]:80' -> ('::1', 80); None if malformed."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return host.lower(), port


def normalize_origin(value: str) -> str | None:
    """'HTTP://Example.com:80' -> 'http://example.com'; None for 'null' or anything not an origin."""
    try:
        parts = urlsplit(value.strip())
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        return None
    if not scheme or not host or parts.path not in ("", "/") or parts.query or parts.username is not None:
        return None
    return _origin(scheme, host.lower(), port)


def _origin(scheme: str, host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def _networks(entries: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            log.warning("FELIS_TRUSTED_PROXIES: %r is not an address or CIDR; ignored", entry)
    return out


class RequestGuardMiddleware:
    """403 for state-changing requests from other sites, and (embedded mode) for foreign Hosts."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.check_host = settings.mode == "embedded"
        hosts = [h.strip().lower() for h in settings.allowed_hosts if h.strip()]
        self.any_host = "*" in hosts
        self.hosts_any_port = {h for h in hosts if (s := _split_host(h)) and s[1] is None}
        self.hosts_exact = {(s[0], s[1]) for h in hosts if (s := _split_host(h)) and s[1] is not None}
        self.origins = {o for o in (normalize_origin(v) for v in settings.allowed_origins) if o}
        self.proxies = _networks(settings.trusted_proxies)

    def _trusted(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client or not self.proxies:
            return False
        try:
            peer = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(peer in net for net in self.proxies)

    def host_allowed(self, host: str, port: int | None) -> bool:
        return (self.any_host or host in LOOPBACK_HOSTS or host in self.hosts_any_port
                or (host, port) in self.hosts_exact)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[bytes, str] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name, value.decode("latin-1"))  # the first of repeated headers
        scheme, host_header = scope.get("scheme", "http"), headers.get(b"host", "")
        if self._trusted(scope):
            scheme = headers.get(b"x-forwarded-proto", "").split(",")[0].strip().lower() or scheme
            host_header = headers.get(b"x-forwarded-host", "").split(",")[0].strip() or host_header
        host = _split_host(host_header)

        if (self.check_host and scope.get("path") not in EXEMPT_FROM_HOST_CHECK
                and (host is None or not self.host_allowed(*host))):
            log.warning("refused a request for Host %r (neither a loopback name nor in FELIS_ALLOWED_HOSTS)",
                        host_header[:200])
            return await _forbidden(scope, receive, send, "host_not_allowed",
                                    f"this server does not answer for the host {host_header[:200]!r}: add the name "
                                    f"to FELIS_ALLOWED_HOSTS to reach it that way")

        method = scope.get("method", "GET").upper()
        if method not in SAFE_METHODS and not self._may_change_state(headers, scheme, host):
            log.warning("refused a cross-site %s %s from origin %r (Sec-Fetch-Site: %s)", method, scope.get("path"),
                        headers.get(b"origin", "")[:200], headers.get(b"sec-fetch-site", "-")[:40])
            return await _forbidden(scope, receive, send, "cross_site_request",
                                    "requests that change state are not accepted from another site's web page: "
                                    "add a trusted web origin to FELIS_ALLOWED_ORIGINS (behind a proxy that "
                                    "terminates TLS, list the proxy in FELIS_TRUSTED_PROXIES)")
        await self.app(scope, receive, send)

    def _may_change_state(self, headers: dict[bytes, str], scheme: str, host: tuple[str, int | None] | None) -> bool:
        """Whether a state-changing request may go on: not sent by another site's page, or by an allowed one."""
        origin_header = headers.get(b"origin")
        origin = normalize_origin(origin_header) if origin_header is not None else None
        fetch_site = headers.get(b"sec-fetch-site", "").strip().lower()
        if fetch_site in ("cross-site", "same-site"):  # the browser says so: only a listed origin passes
            return origin is not None and origin in self.origins
        if origin_header is None:  # no browser page (curl, the felis client) or a same-origin navigation
            return True
        return origin is not None and (origin in self.origins or (host is not None and origin == _origin(scheme, *host)))


async def _forbidden(scope: Scope, receive: Receive, send: Send, code: str, message: str) -> None:
    await refusal(scope, 403, code, message, {"Vary": "Origin, Sec-Fetch-Site"})(scope, receive, send)
