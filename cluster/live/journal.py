"""What a live session keeps on disk so that its actor can die and come back without losing speech.

Under the session's directory (`<storage root>/sessions/<id>/`):

- `session.json`: how it began (avatar, model, crop and size, rate, limits, wall-clock start, the
  vetted RTMP target); written once, before the render loop starts.
- `audio.pcm`: every PCM byte received, in order. A byte is written here (to the OS: it survives
  the process, not a power loss of the host, which ends the session's node anyway) before `append`
  reports it received, so the acknowledged offset never runs ahead of the file.
- `speech.jsonl`: the events that shape the speech, with the byte offset they happened at
  (`{"end": N}` an utterance ended there, `{"finish": true}`, `{"stop": reason}`,
  `{"restart": wall time}`).
- `published.jsonl`: one line per published live segment (name, seconds, frames, encoder epoch,
  its init segment) with the resume point after it: the output frames published so far and the
  last speech frame they hold (utterance, frame, PCM samples taken, speech frames done). A
  restarted actor continues from the last line: frames rendered but not published are rendered
  again; nothing published is rendered twice.
- `final.json`: the session's final view once it has ended (its recording beside it); a session
  that ended with its recording has `audio.pcm` removed then (the recording holds that speech).
- `active.lock`: locked (`flock`, exclusive) by the one process that runs the session. The kernel
  releases it the moment that process dies, however it dies: the session's standby, waiting for
  it, takes the session over at once (`actors.live`), and two processes never both write here.
- `standby.json`: the standby's process id, written once it is ready to take over (the
  running session reports it in its view), removed when it takes over.

Plain Python; `actors.live` drives it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SESSION_FILE = "session.json"
AUDIO_FILE = "audio.pcm"
EVENTS_FILE = "speech.jsonl"
PUBLISHED_FILE = "published.jsonl"
FINAL_FILE = "final.json"
LOCK_FILE = "active.lock"
STANDBY_FILE = "standby.json"


def _read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of `path` (a line cut short by a crash is dropped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _drop_torn_line(f) -> None:
    """Cut an append-only JSON-lines file back to its last complete line (to nothing when none is)."""
    size = os.fstat(f.fileno()).st_size
    end = size
    while end > 0:
        start = max(0, end - 65536)
        f.seek(start)
        block = f.read(end - start)
        if end == size and block.endswith(b"\n"):
            return
        cut = block.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(f.fileno(), start + cut + 1)
            return
        end = start
    os.ftruncate(f.fileno(), 0)


class SessionJournal:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._audio = None
        self._events = None
        self._published = None
        self._lock = None  # the open `active.lock`
        self._held = False  # ...locked by this process
        self._closed = False  # the session ended: its journal takes no more events or segments

    # --- one process runs the session -------------------------------------------------------------
    def take(self) -> bool:
        """Become the process that runs the session: True once this process holds `active.lock`
        (it keeps it until it exits), False while another process holds it. Never blocks."""
        import fcntl

        if self._held:
            return True
        if self._lock is None:  # kept open between tries (a standby tries every 20 ms)
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / LOCK_FILE, "a+b")  # not inherited by child processes (ffmpeg)
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._held = True
        return True

    # --- how it began ---------------------------------------------------------------------------
    def begun(self) -> bool:
        return (self.dir / SESSION_FILE).is_file()

    def save_meta(self, meta: dict) -> None:
        from cluster.fsutil import write_atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / SESSION_FILE, json.dumps(meta))
        os.chmod(self.dir / SESSION_FILE, 0o600)  # it may hold an RTMP stream key

    def forget(self) -> None:
        """The session never began (its start failed): remove `session.json`."""
        (self.dir / SESSION_FILE).unlink(missing_ok=True)

    def meta(self) -> dict:
        return json.loads((self.dir / SESSION_FILE).read_text())

    def mark_standby(self, pid: int) -> None:
        from cluster.fsutil import write_atomic

        write_atomic(self.dir / STANDBY_FILE, json.dumps({"pid": pid}))

    def clear_standby(self, pid: int) -> None:
        """`pid` stands by no more (it took the session over): its mark goes, another's stays."""
        try:
            if int(json.loads((self.dir / STANDBY_FILE).read_text())["pid"]) == pid:
                (self.dir / STANDBY_FILE).unlink(missing_ok=True)
        except (OSError, ValueError, KeyError):
            return

    def standby_pid(self) -> int | None:
        """The process standing by (ready to take the session over), if any is marked."""
        try:
            return int(json.loads((self.dir / STANDBY_FILE).read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def standby_ready(self) -> bool:
        """A standby process is ready to take the session over (and still alive)."""
        pid = self.standby_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return pid != os.getpid()

    # --- speech in ------------------------------------------------------------------------------
    def audio(self) -> bytes:
        """The PCM received (whole samples: a byte of a sample cut by a crash is dropped)."""
        path = self.dir / AUDIO_FILE
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return b""
        if size % 2:
            os.truncate(path, size - 1)
        return path.read_bytes()

    def write_audio(self, pcm: bytes) -> None:
        """Append PCM; returns once the OS has it. A write that fails midway (a full disk) leaves
        none of `pcm` behind: the client sends it again from the same offset, and the file's bytes
        stay the session's bytes at their offsets (a restored session reads them back)."""
        if self._audio is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._audio = open(self.dir / AUDIO_FILE, "ab", buffering=0)
        start = os.fstat(self._audio.fileno()).st_size
        view = memoryview(pcm)
        try:
            while view:
                view = view[self._audio.write(view):]
        except BaseException:
            os.ftruncate(self._audio.fileno(), start)
            raise

    def drop_audio(self) -> None:
        """Remove the PCM received: once the session has ended with its recording, which holds that
        speech, the journal's copy (there for a restarted actor) is 115 MB an hour at 16 kHz kept
        for nothing."""
        if self._audio is not None:
            self._audio.close()
            self._audio = None
        (self.dir / AUDIO_FILE).unlink(missing_ok=True)

    def note(self, event: dict) -> None:
        if self._closed:  # a late call (a finish racing the session's end) writes nothing after the end
            return
        self._events = self._append_line(self._events, EVENTS_FILE, event)

    def events(self) -> list[dict]:
        return _read_lines(self.dir / EVENTS_FILE)

    # --- stream out -----------------------------------------------------------------------------
    def publish(self, entry: dict) -> None:
        if self._closed:
            return
        self._published = self._append_line(self._published, PUBLISHED_FILE, entry)

    def published(self) -> list[dict]:
        return _read_lines(self.dir / PUBLISHED_FILE)

    def _append_line(self, f, name: str, record: dict):
        """Append one JSON line whole or not at all: a short write is continued, a failed one cut
        back, and a line a crash cut short is cut off when the file is opened (else the next
        record would be glued to it and both lost on reading)."""
        if f is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            f = open(self.dir / name, "a+b", buffering=0)
            _drop_torn_line(f)
        start = os.fstat(f.fileno()).st_size
        view = memoryview((json.dumps(record) + "\n").encode())
        try:
            while view:
                view = view[f.write(view):]
        except BaseException:
            os.ftruncate(f.fileno(), start)
            raise
        return f

    # --- the end --------------------------------------------------------------------------------
    def save_final(self, view: dict) -> None:
        from cluster.fsutil import write_atomic

        write_atomic(self.dir / FINAL_FILE, json.dumps(view, default=str))

    def final(self) -> dict | None:
        try:
            return json.loads((self.dir / FINAL_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def close(self) -> None:
        for f in (self._audio, self._events, self._published):
            if f is not None:
                f.close()
        self._audio = self._events = self._published = None
        self._closed = True
