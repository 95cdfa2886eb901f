"""classify_image_url: felis fetches the image at a URL the caller names. Off unless
FELIS_CUSTOMVISION_URL_HOSTS lists the hosts it may fetch from, and even then never from a
private, loopback, link-local or otherwise non-public address.

- The URL: http or https, no user info, a host on the allow-list (a name, ``*.example.com`` for its
  subdomains, ``*`` for any public host).
- The address: the name is resolved here, every address it resolves to must be public (an IPv4
  address mapped into IPv6 counts as the IPv4 one), and the connection goes to the address that was
  checked, so a second resolution cannot point it elsewhere (DNS rebinding); TLS still verifies the
  certificate for the name.
- Redirects: at most ``MAX_REDIRECTS``, each target checked as the first URL was.
- Bounds: ``FETCH_SECONDS`` for all of it (connections, redirects and body together), and the body
  no larger than ``max_bytes`` (by Content-Length before it is read, counted while it is), into a
  temporary file.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import tempfile
from typing import IO
from urllib.parse import urljoin, urlsplit

import anyio
import httpcore

from service.errors import Forbidden, InvalidRequest, TooLarge

MAX_REDIRECTS = 3
FETCH_SECONDS = 10.0
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = b"felis (Custom Vision classify_image_url)"


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in (a.strip().lower().rstrip(".") for a in allowed):
        if entry == "*" or entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def check_url(url: str, allowed: tuple[str, ...]) -> str:
    """The URL, if felis may fetch it (before its address is known); 403 url_not_allowed otherwise."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise InvalidRequest(f"not a URL: {url[:200]!r}", code="invalid_url") from e
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidRequest("the image URL must be http or https, with a host", code="invalid_url")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("the image URL may not carry a user name or password", code="invalid_url")
    if not host_allowed(host, allowed):
        raise Forbidden(f"felis does not fetch images from {host!r} (FELIS_CUSTOMVISION_URL_HOSTS)",
                        code="url_not_allowed")
    return url


async def public_address(host: str, port: int) -> str:
    """The address to connect to: ``host`` resolved, every address public; 403 otherwise."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise InvalidRequest(f"the image URL's host {host!r} does not resolve", code="url_unreachable") from e
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses or not all(_public(ip) for ip in addresses):
        raise Forbidden(f"{host!r} resolves to a private, loopback or link-local address: not fetched",
                        code="url_not_allowed")
    return str(addresses[0])


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to public addresses, the ones it checked (httpcore keeps the name for TLS)."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        address = await public_address(host, port)
        return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):  # pragma: no cover
        raise Forbidden("not fetched", code="url_not_allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


async def fetch_image(url: str, allowed: tuple[str, ...], max_bytes: int) -> IO[bytes]:
    """The image's bytes in a temporary file (at its start); the caller closes it."""
    if not allowed:
        raise InvalidRequest("classify_image_url is off on this server (FELIS_CUSTOMVISION_URL_HOSTS is empty): "
                             "send the image itself with classify_image", code="url_fetch_disabled")
    sink = tempfile.SpooledTemporaryFile(max_size=256 * 1024)
    try:
        with anyio.fail_after(FETCH_SECONDS):
            async with httpcore.AsyncConnectionPool(ssl_context=ssl.create_default_context(),
                                                    network_backend=_CheckedBackend(), retries=0) as pool:
                for _ in range(MAX_REDIRECTS + 1):
                    check_url(url, allowed)
                    async with pool.stream("GET", url, headers=[(b"User-Agent", _USER_AGENT), (b"Accept", b"image/*")]) as r:
                        if r.status in _REDIRECTS and (location := _header(r.headers, b"location")):
                            url = urljoin(url, location)
                            continue
                        if r.status != 200:
                            raise InvalidRequest(f"the image URL answered HTTP {r.status}", code="url_unreadable")
                        length = _header(r.headers, b"content-length")
                        if length and length.isdigit() and int(length) > max_bytes:
                            raise TooLarge(f"the image at the URL is over {max_bytes} bytes", code="file_too_large")
                        size = 0
                        async for chunk in r.aiter_stream():
                            size += len(chunk)
                            if size > max_bytes:
                                raise TooLarge(f"the image at the URL is over {max_bytes} bytes", code="file_too_large")
                            sink.write(chunk)
                        sink.seek(0)
                        return sink
                raise InvalidRequest(f"the image URL redirects more than {MAX_REDIRECTS} times", code="url_unreadable")
    except TimeoutError as e:
        sink.close()
        raise InvalidRequest(f"the image URL did not answer within {FETCH_SECONDS:g} s", code="url_unreachable") from e
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.TimeoutException, httpcore.ProxyError, OSError) as e:
        sink.close()
        raise InvalidRequest(f"the image URL could not be read: {type(e).__name__}", code="url_unreachable") from e
    except BaseException:
        sink.close()
        raise
