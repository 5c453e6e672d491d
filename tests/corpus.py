"""The hostile input corpus (issue 12), generated small and fast, plus the canaries that prove
nothing outside the allowed roots is ever opened.

`build_corpus(root, outside)` writes every case under `root` (the directory an operator would
allow as an input root) and the targets of the escaping cases under `outside`:

- a *secret file* whose content is a random marker: it must never appear in an error, a log or
  an output;
- a *canary FIFO*: a watcher thread notices the moment anything opens it for reading (an open
  for writing with O_NONBLOCK succeeds only while a reader has it open) and records the hit;
- a *loopback listener*: playlists name `http://127.0.0.1:<port>/...`; any connection is a hit.
  No case names a non-loopback address: those live only in the network-namespace tests.

Each `Case` says which input it is (`role`), and what must happen to it: a typed error `code`
raised at `stage` ("admit": by `cluster.render.admit` before any job file is written;
"prepare": by `prepare_job`, e.g. no face), or `code=None`: valid-but-odd, it renders to a
verified output. The session fixtures `hostile_corpus` and `good_inputs` are registered in
tests/conftest.py.
"""
from __future__ import annotations

import io
import os
import secrets
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.config import Settings
from cluster.media.ffmpeg import run_ffmpeg
from cluster.synth import astronaut_template, speech_like, write_audio

SR = 16000
#: A bad input must be refused within this many seconds (through admission).
REFUSAL_DEADLINE_S = 10.0

#: Every case: name -> (role, expected error code or None for valid-but-odd, stage). Static, so
#: that tests can be parametrised by name before the files exist; `build_corpus` writes exactly
#: these.
CASES: dict[str, tuple[str, str | None, str]] = {
    "empty_video": ("video", "input.unreadable", "admit"),
    "empty_audio": ("audio", "input.unreadable", "admit"),
    "text_as_mp4": ("video", "input.unreadable", "admit"),
    "zip_as_mp4": ("video", "input.unreadable", "admit"),
    "tar_as_mp4": ("video", "input.unreadable", "admit"),
    "truncated_mp4": ("video", "input.unreadable", "admit"),
    # a WAV cut short (its data chunk declares more than the file holds): it rendered the part there was
    "truncated_wav": ("audio", "input.unreadable", "admit"),
    "audio_as_video": ("video", "input.no_video_stream", "admit"),
    "video_as_audio": ("audio", "input.no_audio_stream", "admit"),
    "frames_8k": ("video", "input.too_large", "admit"),
    "frames_20000x20": ("video", "input.too_large", "admit"),
    "hls_local": ("video", "input.unsafe", "admit"),
    "hls_network_as_mp4": ("video", "input.unsafe", "admit"),
    "hls_audio": ("audio", "input.unsafe", "admit"),
    "ffconcat_local": ("video", "input.unsafe", "admit"),
    "ffconcat_as_mov": ("video", "input.unsafe", "admit"),
    "sdp": ("video", "input.unsafe", "admit"),
    "sdp_as_mp4": ("video", "input.unsafe", "admit"),
    # no signature the sniffing knows: ffmpeg's sdp demuxer takes it, and fails at once because
    # its RTP/UDP protocols are not whitelisted (file/pipe only)
    "sdp_unsigned_as_mp4": ("video", "input.unreadable", "admit"),
    "no_face": ("video", "input.no_face", "prepare"),
    "mp3_corrupt_middle": ("audio", None, "render"),
    "audio_0s1": ("audio", None, "render"),
    "silent_audio": ("audio", None, "render"),
    "two_faces": ("video", None, "render"),
    "nonmonotonic_pts": ("video", None, "render"),
    "phone_240fps_vfr_rotated": ("video", None, "render"),
}


@dataclass(frozen=True)
class Case:
    name: str
    role: str              # "audio" or "video": which input of the job this file is
    path: Path
    code: str | None       # expected error code; None: valid-but-odd, renders to a verified output
    stage: str             # where the typed error is raised: "admit" or "prepare"; "render": valid
    note: str = ""


class Canaries:
    """The secret file, the canary FIFO and the loopback listener, watched while a test runs."""

    def __init__(self, outside: Path) -> None:
        outside.mkdir(parents=True, exist_ok=True)
        self.marker = "CNRY" + secrets.token_hex(6)
        self.secret = outside / "secret.txt"
        # starts like a script, so that a sniffing that quoted the file's first bytes would leak it
        self.secret.write_text(f"#!{self.marker}\nexport TOKEN={self.marker}\n")
        self.fifo = outside / "canary.fifo"
        if not self.fifo.exists():
            os.mkfifo(self.fifo)
        self.hits: list[str] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/stolen.ts"
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # RTP/RTCP of an SDP
        self._udp.bind(("127.0.0.1", self.port))
        self._udp.settimeout(0.05)
        self._threads = [threading.Thread(target=self._watch_fifo, daemon=True, name="canary-fifo"),
                         threading.Thread(target=self._watch_socket, daemon=True, name="canary-http"),
                         threading.Thread(target=self._watch_udp, daemon=True, name="canary-udp")]
        for t in self._threads:
            t.start()

    def _watch_fifo(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody has it open for reading
                time.sleep(0.01)
                continue
            self.hits.append(f"fifo {self.fifo} opened")
            try:
                os.write(fd, (self.marker + "\n").encode())
            except OSError:
                pass
            os.close(fd)
            time.sleep(0.05)

    def _watch_socket(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:  # socket.timeout is an OSError
                continue
            self.hits.append(f"connection to canary listener from {addr}")
            conn.close()

    def _watch_udp(self) -> None:
        while not self._stop.is_set():
            try:
                _, addr = self._udp.recvfrom(2048)
            except OSError:  # socket.timeout is an OSError
                continue
            self.hits.append(f"datagram to canary port from {addr}")

    def assert_untouched(self, *texts: str | bytes | None) -> None:
        """No canary was opened or connected to, and no text carries the secret's content."""
        assert not self.hits, f"a file or address outside the roots was reached: {self.hits}"
        for t in texts:
            if t is None:
                continue
            data = t.encode() if isinstance(t, str) else t
            assert self.marker.encode() not in data, "the secret file's content leaked"

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._sock.close()
        self._udp.close()


@dataclass
class Corpus:
    root: Path                 # the allowed input root holding every case
    outside: Path              # outside every root: the secret and the canaries
    canaries: Canaries
    speech: Path               # a good 1.2 s speech wav (the other input of refused video cases)
    speech_short: Path         # a good 0.5 s speech wav (the other input of valid-but-odd video cases)
    template: Path             # a good 1 s 320x240 astronaut template (the other input of audio cases)
    cases: dict[str, Case] = field(default_factory=dict)
    escapes: dict[str, str] = field(default_factory=dict)  # name -> a path string leaving the root

    def by_stage(self, stage: str, valid: bool = False) -> list[Case]:
        return [c for c in self.cases.values() if c.stage == stage and (c.code is None) == valid]


def _ffmpeg(s: Settings, *args: str) -> None:
    run_ffmpeg(["-loglevel", "error", *args], timeout=120, settings=s, stage="corpus")


def _h264(preset: str = "ultrafast") -> list[str]:
    return ["-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p"]


def build_corpus(root: Path, outside: Path, settings: Settings | None = None) -> Corpus:
    """Write the corpus (about 25 files, a few MB, a few seconds of ffmpeg on one core)."""
    s = settings or Settings()
    root.mkdir(parents=True, exist_ok=True)
    canaries = Canaries(outside)
    speech = Path(write_audio(str(root / "speech.wav"), speech_like(1.2, seed=3)))
    template = Path(astronaut_template(str(root / "template.mp4"), seconds=1.0, fps=25, size=(320, 240),
                                       settings=s))
    speech_short = Path(write_audio(str(root / "speech_short.wav"), speech_like(0.5, seed=8)))
    c = Corpus(root=root, outside=outside, canaries=canaries, speech=speech, speech_short=speech_short,
               template=template)

    def add(name: str, role: str, filename: str, code: str | None, stage: str = "admit", note: str = "") -> Path:
        p = root / filename
        assert CASES[name] == (role, code, stage if code else "render"), name
        c.cases[name] = Case(name, role, p, code, stage if code else "render", note)
        return p

    # --- not media at all ---------------------------------------------------------------------
    add("empty_video", "video", "empty.mp4", "input.unreadable").write_bytes(b"")
    add("empty_audio", "audio", "empty.wav", "input.unreadable").write_bytes(b"")
    add("text_as_mp4", "video", "notes.mp4", "input.unreadable").write_text(
        "Meeting notes. The quarterly render numbers look fine; nothing to see here.\n" * 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("clip.mp4", template.read_bytes())
    add("zip_as_mp4", "video", "archive_zip.mp4", "input.unreadable").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        t.add(str(template), arcname="clip.mp4")
    add("tar_as_mp4", "video", "archive_tar.mp4", "input.unreadable",
        note="an uncompressed tar holds the whole mp4 after a 512-byte header").write_bytes(buf.getvalue())

    # --- broken media ---------------------------------------------------------------------------
    faststart = root / ".faststart_src.mp4"
    _ffmpeg(s, "-i", str(template), "-c", "copy", "-movflags", "+faststart", str(faststart))
    data = faststart.read_bytes()
    add("truncated_mp4", "video", "truncated.mp4", "input.unreadable").write_bytes(data[: len(data) // 2])
    faststart.unlink()
    add("truncated_wav", "audio", "truncated.wav", "input.unreadable").write_bytes(
        speech.read_bytes()[:len(speech.read_bytes()) // 3])
    m4a = add("audio_as_video", "video", "speech_only.m4a", "input.no_video_stream")
    write_audio(str(m4a), speech_like(1.0, seed=4), settings=s)
    add("video_as_audio", "audio", "template_only.mp4", "input.no_audio_stream").write_bytes(template.read_bytes())

    mp3 = root / ".clean.mp3"
    write_audio(str(mp3), speech_like(1.5, seed=5), settings=s)
    raw = bytearray(mp3.read_bytes())
    rng = np.random.default_rng(5)
    mid = len(raw) // 2
    raw[mid: mid + 1200] = rng.bytes(1200)  # a few frames of garbage, headers included
    add("mp3_corrupt_middle", "audio", "corrupt_middle.mp3", None,
        note="the decoder skips the damaged frames; the job renders the rest").write_bytes(bytes(raw))
    mp3.unlink()

    # --- odd but valid audio -------------------------------------------------------------------
    write_audio(str(add("audio_0s1", "audio", "blip.wav", None, note="0.1 s: 3 output frames")),
                speech_like(0.1, seed=6))
    write_audio(str(add("silent_audio", "audio", "silence.wav", None, note="digital silence")),
                np.zeros(int(0.8 * SR), np.float32))

    # --- templates ------------------------------------------------------------------------------
    _ffmpeg(s, "-f", "lavfi", "-i", "color=c=0x808080:s=320x240:r=25:d=1", *_h264(),
            str(add("no_face", "video", "wall.mp4", "input.no_face", stage="prepare")))
    _ffmpeg(s, "-i", str(template), "-i", str(template), "-filter_complex", "[0:v][1:v]hstack", *_h264(),
            str(add("two_faces", "video", "two_faces.mp4", None, note="one subject is tracked")))
    # presentation timestamps out of order (decode order stays monotonic): 0 1 2 13 4 5 ...
    _ffmpeg(s, "-i", str(template), *_h264(), "-bf", "0",
            "-bsf:v", "setts=pts=if(eq(N\\,3)\\,PTS+10\\,PTS)", "-f", "matroska",
            str(add("nonmonotonic_pts", "video", "jumpy.mkv", None, note="re-timed to constant rate")))
    _ffmpeg(s, "-f", "lavfi", "-i", "color=c=gray:s=7680x4320:r=25:d=0.08", *_h264(), "-frames:v", "2",
            str(add("frames_8k", "video", "eight_k.mp4", "input.too_large")))
    _ffmpeg(s, "-f", "lavfi", "-i", "color=c=gray:s=20000x20:r=25:d=0.08", "-c:v", "ffv1", "-frames:v", "2",
            str(add("frames_20000x20", "video", "strip.mkv", "input.too_large")))
    # a phone clip: 240 fps, variable rate (frames dropped), stored sideways with a display matrix
    upright = root / ".phone_upright.mp4"
    astronaut_template(str(upright), seconds=0.4, fps=240, size=(240, 320), rotation=90, settings=s)
    vfr = root / ".phone_vfr.mp4"
    _ffmpeg(s, "-noautorotate", "-i", str(upright), "-vf", "select='not(eq(mod(n\\,5)\\,2))'",
            "-fps_mode", "vfr", *_h264(), str(vfr))
    _ffmpeg(s, "-display_rotation", "-90", "-i", str(vfr), "-c", "copy",
            str(add("phone_240fps_vfr_rotated", "video", "phone.mp4", None,
                    note="normalised to constant rate, rotation applied")))
    upright.unlink()
    vfr.unlink()

    # --- files that make a demuxer open other files or URLs ------------------------------------
    secret, fifo, url = canaries.secret, canaries.fifo, canaries.url
    add("hls_local", "video", "local.m3u8", "input.unsafe").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{fifo}\n#EXTINF:10,\n{secret}\n#EXT-X-ENDLIST\n")
    add("hls_network_as_mp4", "video", "stream.mp4", "input.unsafe").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{url}\n#EXT-X-ENDLIST\n")
    add("hls_audio", "audio", "voice.m3u8", "input.unsafe").write_text(
        f"#EXTM3U\n#EXTINF:10,\n{url}\n#EXT-X-ENDLIST\n")
    add("ffconcat_local", "video", "list.ffconcat", "input.unsafe").write_text(
        f"ffconcat version 1.0\nfile '{fifo}'\nfile '{secret}'\n")
    add("ffconcat_as_mov", "video", "clip.mov", "input.unsafe").write_text(
        f"ffconcat version 1.0\nfile '{url}'\n")
    sdp = (f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=cam\nc=IN IP4 127.0.0.1\nt=0 0\n"
           f"m=video {canaries.port} RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    add("sdp", "video", "camera.sdp", "input.unsafe").write_text(sdp)
    add("sdp_as_mp4", "video", "camera.mp4", "input.unsafe").write_text(sdp)
    add("sdp_unsigned_as_mp4", "video", "camera2.mp4", "input.unreadable").write_text(
        sdp.replace("v=0\n", "").replace("o=- 0 0 IN IP4 127.0.0.1\n", ""))

    # --- paths that leave the root (for interfaces that take server paths) ---------------------
    (root / "link_out.mp4").symlink_to(secret)
    try:
        os.link(secret, root / "hardlink_out.mp4")
        c.escapes["hard_link_out"] = str(root / "hardlink_out.mp4")
    except OSError:  # another filesystem: no hard link possible, nothing to test
        pass
    c.escapes.update({
        "dotdot": str(root / ".." / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd"),
        "dotdot_to_secret": os.path.relpath(secret, root),  # relative: resolved against the root
        "absolute": str(secret),
        "etc_passwd": "/etc/passwd",
        "symlink_out": str(root / "link_out.mp4"),
    })
    assert set(c.cases) == set(CASES), set(CASES) ^ set(c.cases)
    return c
