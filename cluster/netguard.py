"""Outbound HTTP that a client's input can cause (URL inputs, callbacks), behind an address guard.

A URL is fetched only when its scheme is http(s) and every address its host resolves to is
public: loopback, private, link-local (cloud metadata 169.254.169.254 included), multicast,
reserved and unspecified addresses are refused unless `allow_private_urls` is set. The check is
made on the address actually connected to (the resolver's answer is pinned for the connection,
so a DNS answer cannot change between check and connect), and again on every redirect hop.
Downloads stream to disk under a size and a time limit.

`resolve` and `connect` are injectable so that tests exercise the guard without any traffic
beyond loopback.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

import httpx

from cluster.errors import InputError, InputTooLarge, UnsafeInput

Resolver = Callable[[str, int], list[str]]
"""(host, port) -> the IP addresses it resolves to."""


class UrlFetchError(InputError):
    code = "input.url_failed"


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


# Ranges refused whatever the Python version's address tables say (older ones call some global):
# the local-use NAT64 prefix and IPv4 special-purpose blocks.
NON_PUBLIC_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b:1::/48", "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15", "100.64.0.0/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: DNS64 answers on IPv6-only clusters


def address_is_public(addr: str) -> bool:
    """Whether an IP address is a public unicast one (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):  # forms that carry an IPv4 address: judged as that address
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    if any(ip in net for net in NON_PUBLIC_NETWORKS if net.version == ip.version):
        return False
    return ip.is_global and not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


HTTP_PORTS = {"http": 80, "https": 443}
#: RTMP outputs (`rtmp_url` of a live session): the schemes and their default ports.
RTMP_PORTS = {"rtmp": 1935, "rtmps": 443}


#: The longest URL taken (a presigned object-store URL runs to 1-2 thousand characters)
MAX_URL_CHARS = 8192


def split_url(url: str, field: str = "url"):
    """`urlsplit(url)`, or `UnsafeInput` naming `field` for what is no URL: control characters (a NUL,
    a newline: an HTTP request cannot carry them), an unbalanced IPv6 bracket, a length past
    `MAX_URL_CHARS`, or what httpx cannot send. They were a 500 (`ValueError`, httpx's `InvalidURL`)
    on every route that takes a URL. (A space is sent %-encoded, as browsers do.)"""
    if len(url) > MAX_URL_CHARS:
        raise UnsafeInput(f"{field}: the URL is longer than {MAX_URL_CHARS} characters", path=field)
    bad = next((c for c in url if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise UnsafeInput(f"{field}: not a URL: it holds the control character {bad!r} (written %-encoded in "
                          f"a URL)", path=field)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise UnsafeInput(f"{field}: not a URL: {e}", path=field) from e
    try:
        parts.port  # noqa: B018
    except ValueError:  # a bad port: `check_url` says so, naming it
        return parts
    if parts.scheme in HTTP_PORTS:
        try:
            httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as e:
            raise UnsafeInput(f"{field}: not a URL: {e}", path=field) from e
    return parts


def check_url(url: str, *, allow_private: bool, resolve: Resolver = system_resolver,
              field: str = "url", schemes: dict[str, int] = HTTP_PORTS) -> tuple[str, int, str]:
    """Refuse a URL the guard does not allow; return (host, port, the vetted address to connect to).
    `schemes`: the schemes accepted, each with its default port."""
    parts = split_url(url, field)
    if parts.scheme not in schemes:
        raise UnsafeInput(f"{field}: only {' and '.join(schemes)} URLs are accepted, got {parts.scheme or 'no'} "
                          f"scheme", path=field)
    if not parts.hostname:
        raise UnsafeInput(f"{field}: the URL {url!r} has no host", path=field)
    if parts.username or parts.password:
        raise UnsafeInput(f"{field}: URLs with credentials are not accepted", path=field)
    host = parts.hostname
    try:
        port = parts.port or schemes[parts.scheme]
    except ValueError as e:
        raise UnsafeInput(f"{field}: bad port in {url!r}: {e}", path=field) from e
    try:
        addrs = [host] if _is_ip(host) else resolve(host, port)
    except OSError as e:
        raise UrlFetchError(f"{field}: cannot resolve {host}: {e}", path=field, cause=repr(e)) from e
    if not addrs:
        raise UrlFetchError(f"{field}: {host} resolves to no address", path=field)
    if not allow_private:
        bad = [a for a in addrs if not address_is_public(a)]
        if bad:
            raise UnsafeInput(f"{field}: {host} resolves to a non-public address ({bad[0]}); loopback, "
                              f"private, link-local and multicast addresses are refused "
                              f"(LIPSYNC_ALLOW_PRIVATE_URLS=1 allows them on trusted networks)", path=field)
    return host, port, addrs[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class _PinnedTransport(httpx.HTTPTransport):
    """Connects to the vetted address while keeping the URL's host for TLS SNI and Host header."""

    def __init__(self, address: str, **kw) -> None:
        super().__init__(**kw)
        self.address = address

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        request.extensions = {**request.extensions, "sni_hostname": host}
        request.url = request.url.copy_with(host=self.address)
        request.headers["Host"] = host if request.url.port in (None, 80, 443) else f"{host}:{request.url.port}"
        return super().handle_request(request)


Connector = Callable[[str], httpx.BaseTransport]
"""(vetted address) -> the transport that performs the request (tests inject a mock)."""


def pinned_connector(address: str) -> httpx.BaseTransport:
    return _PinnedTransport(address)


def _guarded_requests(method: str, url: str, *, allow_private: bool, timeout_s: float, max_redirects: int,
                      resolve: Resolver, connect: Connector, field: str, **kw):
    """Yield-free helper: performs `method` following redirects by hand, each hop checked."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max_redirects + 1):
        _, _, address = check_url(url, allow_private=allow_private, resolve=resolve, field=field)
        left = deadline - time.monotonic()
        if left <= 0:
            raise UrlFetchError(f"{field}: {url} took longer than {timeout_s:.0f} s", path=field)
        client = httpx.Client(transport=connect(address), timeout=httpx.Timeout(min(left, 30.0)),
                              follow_redirects=False, trust_env=False)
        req = client.build_request(method, url, **kw)
        resp = client.send(req, stream=True)
        if resp.is_redirect:
            location = resp.headers.get("location", "")
            resp.close()
            client.close()
            if method != "GET":
                raise UrlFetchError(f"{field}: {url} answered a redirect; not followed for {method}", path=field)
            url = urljoin(url, location)
            continue
        return client, resp, deadline
    raise UrlFetchError(f"{field}: more than {max_redirects} redirects", path=field)


def download(url: str, dest: str | Path, *, max_bytes: int, timeout_s: float, max_redirects: int = 5,
             allow_private: bool = False, resolve: Resolver = system_resolver,
             connect: Connector = pinned_connector, field: str = "url") -> int:
    """Stream `url` to `dest` (created or truncated); returns the byte count. Typed errors:
    `input.unsafe` for a refused address, `input.too_large` past `max_bytes`, `input.url_failed`
    for HTTP errors, timeouts and connection problems."""
    try:
        client, resp, deadline = _guarded_requests(
            "GET", url, allow_private=allow_private, timeout_s=timeout_s, max_redirects=max_redirects,
            resolve=resolve, connect=connect, field=field)
    except httpx.HTTPError as e:
        raise UrlFetchError(f"{field}: cannot fetch {url}: {type(e).__name__}: {e}", path=field,
                            cause=repr(e)) from e
    total = 0
    try:
        if resp.status_code != 200:
            raise UrlFetchError(f"{field}: {url} answered HTTP {resp.status_code}", path=field)
        declared = resp.headers.get("content-length")
        if declared and re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > max_bytes:
            raise InputTooLarge(f"{field}: {url} is {int(declared)} bytes; the limit is {max_bytes}", path=field)
        with open(dest, "wb") as f:
            for block in resp.iter_bytes():  # as data arrives: a sized read would wait out a slow drip
                total += len(block)
                if total > max_bytes:
                    raise InputTooLarge(f"{field}: {url} is larger than the limit of {max_bytes} bytes", path=field)
                if time.monotonic() > deadline:
                    raise UrlFetchError(f"{field}: {url} took longer than {timeout_s:.0f} s", path=field)
                f.write(block)
    except httpx.HTTPError as e:
        raise UrlFetchError(f"{field}: download of {url} failed: {type(e).__name__}: {e}", path=field,
                            cause=repr(e)) from e
    finally:
        resp.close()
        client.close()
    return total


def post_json(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, allow_private: bool = False,
              resolve: Resolver = system_resolver, connect: Connector = pinned_connector,
              field: str = "callback_url") -> int:
    """POST `body` to a guarded URL (no redirects followed); returns the HTTP status."""
    try:
        client, resp, _ = _guarded_requests("POST", url, allow_private=allow_private, timeout_s=timeout_s,
                                            max_redirects=0, resolve=resolve, connect=connect, field=field,
                                            content=body, headers=headers)
    except httpx.HTTPError as e:
        raise UrlFetchError(f"{field}: POST to {url} failed: {type(e).__name__}: {e}", path=field,
                            cause=repr(e)) from e
    try:
        return resp.status_code
    finally:
        resp.close()
        client.close()


def is_url(value: str) -> bool:
    """Meant as a URL (then checked by `check_url`, which refuses what is not one), not a path."""
    try:
        return urlsplit(value).scheme.lower() in ("http", "https") or "://" in value
    except ValueError:  # e.g. "http://[::1": a URL, malformed
        return "://" in value


@dataclass(frozen=True)
class RtmpTarget:
    """An RTMP output the guard has vetted. ffmpeg connects to `connect_url` (the vetted address in
    place of the host name, so that a DNS answer cannot change between check and connect) and
    announces `tc_url` (the URL's own host) to the server; `shown` is the URL without its stream
    key, for views and logs (a stream key is a credential)."""
    connect_url: str
    tc_url: str
    shown: str
    scheme: str


def vet_rtmp_url(url: str, *, allow_private: bool, resolve: Resolver = system_resolver,
                 field: str = "rtmp_url") -> RtmpTarget:
    """`rtmp://host[:port]/app/stream-key` (or rtmps) checked as input URLs are: public addresses
    only unless `allow_private`; typed `UnsafeInput` / `UrlFetchError` naming `field`."""
    if len(url) > 2048 or any(c.isspace() for c in url):  # (ffmpeg's argument: no spaces)
        raise UnsafeInput(f"{field}: not an RTMP URL (longer than 2048 characters or holding spaces)", path=field)
    host, port, address = check_url(url, allow_private=allow_private, resolve=resolve, field=field,
                                    schemes=RTMP_PORTS)
    parts = urlsplit(url)  # (a URL now: `check_url` refused what is not one)
    segments = [s for s in parts.path.split("/") if s]
    if len(segments) < 2:
        raise UnsafeInput(f"{field}: an RTMP URL names an application and a stream key "
                          f"(rtmp://host/app/key), got {parts.path or 'no'} path", path=field)
    if parts.query or parts.fragment:
        raise UnsafeInput(f"{field}: an RTMP URL takes no query or fragment", path=field)
    netloc = f"[{address}]" if ":" in address else address
    app = "/".join(segments[:-1])
    return RtmpTarget(connect_url=f"{parts.scheme}://{netloc}:{port}{parts.path}",
                      tc_url=f"{parts.scheme}://{parts.netloc}/{app}",
                      shown=f"{parts.scheme}://{parts.netloc}/{app}/…", scheme=parts.scheme)
