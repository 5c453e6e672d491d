"""Whether a TCP port can be listened on, and a free one: the checks `lipsync serve` makes before (and, on a
joined cluster, after) reaching Ray."""
from __future__ import annotations

import socket
import time

#: How long `lipsync serve` waits for its port: a service just stopped or SIGKILLed holds it a few seconds more
PORT_WAIT_S = 15.0


def port_in_use(host: str, port: int, wait_s: float = PORT_WAIT_S) -> str | None:
    """Why `host:port` cannot be listened on (e.g. another process listens there), or None. A port
    held by a service that is going away (a restart right after the last one was killed: its Serve
    proxy dies a few seconds later) is waited for up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
                return None
        except OSError as e:
            if time.monotonic() >= deadline:
                return (e.strerror or str(e)) + (f" for {wait_s:g} s" if wait_s else "")
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
