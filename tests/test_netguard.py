"""The address guard for URL inputs and callbacks, and the SDK's imports.

No test here sends traffic anywhere: resolution is injected, and the connector is an in-process
httpx.MockTransport that records which vetted address it was asked to connect to."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from cluster.errors import InputTooLarge, UnsafeInput
from cluster.netguard import UrlFetchError, address_is_public, check_url, download

PUBLIC = "93.184.215.14"


def resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return table[host]
    return resolve


def connector(routes: dict[str, httpx.Response], seen: list[str]):
    """Answers per vetted address; records each connection attempt."""
    def connect(address: str) -> httpx.BaseTransport:
        seen.append(address)

        def handler(request: httpx.Request) -> httpx.Response:
            return routes[address]
        return httpx.MockTransport(handler)
    return connect


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.9.9.9", "10.0.0.1", "172.16.5.5", "192.168.1.1",
                                  "169.254.169.254", "100.100.100.200", "0.0.0.0", "224.0.0.251", "::1",
                                  "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "fd00:ec2::254",
                                  # 6to4 / NAT64 forms of loopback and private IPv4, special-purpose IPv4
                                  # blocks (Python 3.11's tables call some of them global)
                                  "2002:7f00:1::1", "2002:a00:1::1", "64:ff9b::a00:1", "192.0.0.8",
                                  "192.88.99.1", "198.18.0.1", "100.64.0.1"])
def test_non_public_addresses_refused(addr):
    assert not address_is_public(addr), addr
    assert address_is_public("93.184.216.34") and address_is_public("2606:2800:220:1::1")
    # 6to4 and NAT64 forms of a public IPv4 address are public (DNS64 on IPv6-only clusters)
    assert address_is_public("64:ff9b::5db8:d822") and address_is_public("2002:5db8:d822::1")
    seen: list[str] = []
    with pytest.raises(UnsafeInput) as e:
        download("http://media.example/a.wav", "/dev/null", max_bytes=100, timeout_s=5, allow_private=False,
                 resolve=resolver({"media.example": [addr]}), connect=connector({}, seen), field="audio")
    assert seen == [] and e.value.path == "audio" and "non-public" in e.value.message


def test_metadata_hostname_and_mixed_answers_refused():
    seen: list[str] = []
    # a name that resolves to a public and a metadata address is refused as a whole
    with pytest.raises(UnsafeInput):
        download("http://metadata.google.internal/computeMetadata/v1/", "/dev/null", max_bytes=10, timeout_s=5,
                 resolve=resolver({"metadata.google.internal": [PUBLIC, "169.254.169.254"]}),
                 connect=connector({}, seen))
    assert seen == []


def test_public_download_streams_and_pins_the_vetted_address(tmp_path):
    seen: list[str] = []
    body = b"RIFF" + b"x" * 5000
    dest = tmp_path / "a.wav"
    n = download("https://media.example/a.wav", dest, max_bytes=10_000, timeout_s=5,
                 resolve=resolver({"media.example": [PUBLIC]}),
                 connect=connector({PUBLIC: httpx.Response(200, content=body)}, seen))
    assert n == len(body) and dest.read_bytes() == body and seen == [PUBLIC]


def test_redirect_to_private_address_is_rechecked(tmp_path):
    seen: list[str] = []
    routes = {PUBLIC: httpx.Response(302, headers={"location": "http://internal.example/secret"})}
    with pytest.raises(UnsafeInput):
        download("http://media.example/a.wav", tmp_path / "a", max_bytes=100, timeout_s=5,
                 resolve=resolver({"media.example": [PUBLIC], "internal.example": ["10.1.2.3"]}),
                 connect=connector(routes, seen))
    assert seen == [PUBLIC]


def test_redirect_loop_bounded_and_size_limit(tmp_path):
    seen: list[str] = []
    routes = {PUBLIC: httpx.Response(302, headers={"location": "/again"})}
    with pytest.raises(UrlFetchError, match="redirects"):
        download("http://media.example/a", tmp_path / "a", max_bytes=100, timeout_s=5, max_redirects=3,
                 resolve=resolver({"media.example": [PUBLIC]}), connect=connector(routes, seen))
    assert len(seen) == 4
    with pytest.raises(InputTooLarge):
        download("http://media.example/a", tmp_path / "b", max_bytes=100, timeout_s=5,
                 resolve=resolver({"media.example": [PUBLIC]}),
                 connect=connector({PUBLIC: httpx.Response(200, content=b"x" * 1000)}, []))
    with pytest.raises(UrlFetchError, match="HTTP 404"):
        download("http://media.example/a", tmp_path / "c", max_bytes=100, timeout_s=5,
                 resolve=resolver({"media.example": [PUBLIC]}),
                 connect=connector({PUBLIC: httpx.Response(404)}, []))


def test_schemes_credentials_and_private_opt_in():
    for url in ("file:///etc/passwd", "ftp://x/y", "gopher://x", "http://user:pw@media.example/"):
        with pytest.raises(UnsafeInput):
            check_url(url, allow_private=False, resolve=resolver({"media.example": [PUBLIC]}))
    assert check_url("http://lan.example:8080/a", allow_private=True,
                     resolve=resolver({"lan.example": ["10.0.0.7"]})) == ("lan.example", 8080, "10.0.0.7")


def test_what_is_no_url_is_refused_as_one_and_a_space_is_sent_encoded(tmp_path):
    """A NUL, a newline or an unbalanced IPv6 bracket raised ValueError / httpx.InvalidURL (a 500 on
    every route that takes a URL); each is `UnsafeInput` naming the field now, redirects included.
    A space is no reason to refuse: httpx sends it %-encoded, as a browser does."""
    from cluster.netguard import is_url

    for url in ("http://[::1", "http://media.example/a\x00b", "https://media.example/a\nb", "http://x/\x7f",
                "http://media.example/" + "a" * 9000):
        assert is_url(url)
        with pytest.raises(UnsafeInput) as e:
            check_url(url, allow_private=False, resolve=resolver({"media.example": [PUBLIC]}), field="audio")
        assert e.value.path == "audio" and ("not a URL" in str(e.value) or "longer than" in str(e.value))
    assert check_url("http://media.example/my speech.wav", allow_private=False,
                     resolve=resolver({"media.example": [PUBLIC]}))[0] == "media.example"
    seen = []
    with pytest.raises((UnsafeInput, UrlFetchError)):  # a redirect to what is no URL: typed (400), no 500
        download("http://media.example/a", tmp_path / "x", max_bytes=100, timeout_s=5,
                 resolve=resolver({"media.example": [PUBLIC]}),
                 connect=connector({PUBLIC: httpx.Response(302, headers={"location": "http://[::1/x"})}, seen))


def test_sdk_imports_neither_ray_nor_onnxruntime():
    code = ("import sys, cluster.client, cluster.schemas; "
            "bad = [m for m in ('ray', 'onnxruntime', 'onnx', 'cv2') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ})
    assert r.returncode == 0, r.stdout + r.stderr


def test_serve_refuses_a_public_host_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "LIPSYNC_API_TOKEN"}
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--host", "0.0.0.0", "--port", "9"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "LIPSYNC_API_TOKEN" in r.stderr and "--insecure" in r.stderr
