"""lipsync-cluster: speech audio + template video -> lip-synced H.264/AAC mp4, on Ray."""

import functools

__version__ = "0.1.0"


@functools.cache
def code_version() -> str:
    """A short hash of this installation's Python sources (cluster, actors, service): two processes of one
    cluster run the same code exactly when they agree (`__version__` does not change from commit to commit).
    A service joining a cluster replaces the detached actors another code left there (`service.launch`)."""
    import hashlib
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for package in ("cluster", "actors", "service"):
        for f in sorted((here / package).rglob("*.py")):
            h.update(str(f.relative_to(here)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]
