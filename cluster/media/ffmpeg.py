"""Resolving and running the ffmpeg binary."""
from __future__ import annotations

import functools
import os
import shutil

from cluster.config import Settings, get_settings


@functools.lru_cache(maxsize=8)
def _resolve(configured: str | None) -> str:
    if configured:
        return configured
    env = os.environ.get("LIPSYNC_FFMPEG")
    if env:
        return env
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_binary(settings: Settings | None = None) -> str:
    """`LIPSYNC_FFMPEG`, else `ffmpeg` on PATH, else the binary bundled by imageio-ffmpeg."""
    s = settings or get_settings()
    return _resolve(s.ffmpeg)
