"""URL inputs against real HTTP servers, run by tests/test_url_guard.py inside a network namespace
that has only loopback (`unshare --net --map-root-user`, then `ip link set lo up`): even a broken
guard could reach nothing beyond this process's own loopback servers.

Prints one JSON line: case -> {"code", "seconds"} (or {"ok": bytes}), plus the paths each local
server was asked for.
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from cluster.errors import LipsyncError
from cluster.netguard import download

HITS: list[str] = []
PUBLIC = "93.184.216.34"  # what the injected resolver answers for public-looking names (unreachable here)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        HITS.append(self.path)
        p = self.path
        if p == "/ok":
            body = b"\0\0\0\x18ftypmp42" + b"\0" * 1000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif p.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", p.split("=", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif p == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif p == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(40):  # 10 s of drip
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.25)
            except OSError:
                pass
        elif p == "/huge":  # no length, endless
            self.send_response(200)
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"\0" * 65536)
            except OSError:
                pass
        elif p == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024**3))
            self.end_headers()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = f"127.0.0.1:{port}"
    names = {"public.example": [PUBLIC], "metadata.internal": ["169.254.169.254"], "intranet.example": ["10.1.2.3"],
             "mixed.example": [PUBLIC, "127.0.0.1"], "v6local.example": ["::1"]}

    def resolve(host: str, _port: int) -> list[str]:
        if host in names:
            return names[host]
        raise OSError(f"unknown host {host}")

    def to_local(address: str) -> httpx.BaseTransport:
        """Every vetted connection goes to our loopback server instead of `address`."""
        class Local(httpx.HTTPTransport):
            def handle_request(self, request):
                request.url = request.url.copy_with(host="127.0.0.1", port=port)
                return super().handle_request(request)
        return Local()

    pub = f"http://public.example:{port}"
    cases = {
        # refused before any connection: addresses and names that are not public
        "loopback": {"url": f"http://{local}/ok"},
        "localhost_name": {"url": f"http://localhost:{port}/ok", "system": True},
        "loopback_v6": {"url": f"http://[::1]:{port}/ok"},
        "loopback_decimal": {"url": f"http://2130706433:{port}/ok", "system": True},
        "private_10": {"url": "http://10.0.0.1/x"},
        "private_192": {"url": "http://192.168.1.1/x"},
        "private_172": {"url": "http://172.16.0.1/x"},
        "link_local": {"url": "http://169.254.1.1/x"},
        "metadata": {"url": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"},
        "metadata_v6_mapped": {"url": "http://[::ffff:169.254.169.254]/latest"},
        "unspecified": {"url": "http://0.0.0.0/x"},
        "multicast": {"url": "http://224.0.0.1/x"},
        "name_to_metadata": {"url": "http://metadata.internal/latest"},
        "name_to_private": {"url": "http://intranet.example/x"},
        "name_mixed": {"url": "http://mixed.example/x"},
        "name_to_v6_loopback": {"url": "http://v6local.example/x"},
        "scheme_file": {"url": "file:///etc/passwd"},
        "scheme_ftp": {"url": "ftp://public.example/x"},
        "credentials": {"url": f"http://user:pw@public.example:{port}/ok"},
        # first hop public, then refused or bounded
        "redirect_to_metadata": {"url": f"{pub}/redirect?to=http://169.254.169.254/latest/meta-data/"},
        "redirect_to_name": {"url": f"{pub}/redirect?to=http://metadata.internal/latest"},
        "redirect_to_loopback": {"url": f"{pub}/redirect?to=http://127.0.0.1:{port}/ok"},
        "redirect_loop": {"url": f"{pub}/loop"},
        "slow": {"url": f"{pub}/slow"},
        "huge": {"url": f"{pub}/huge"},
        "huge_declared": {"url": f"{pub}/huge-declared"},
        # the control: a public name that is fine
        "public_ok": {"url": f"{pub}/ok"},
    }
    out: dict = {}
    work = Path(tempfile.mkdtemp(prefix="urlguard-"))
    for name, c in cases.items():
        dest = work / f"{name}.bin"
        t0 = time.monotonic()
        kw = {} if c.get("system") else {"resolve": resolve, "connect": to_local}
        try:
            n = download(c["url"], dest, max_bytes=1 << 20, timeout_s=2.0, max_redirects=4, **kw)
            out[name] = {"ok": n, "seconds": round(time.monotonic() - t0, 2)}
        except LipsyncError as e:
            out[name] = {"code": e.code, "message": e.message, "seconds": round(time.monotonic() - t0, 2),
                         "left_file": dest.exists() and dest.stat().st_size > 0}
    server.shutdown()
    print(json.dumps({"cases": out, "hits": HITS}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
