"""Where a job's inputs come from, on the job manager's node: uploaded bytes (content-addressed
under the storage root) or server-side paths under `settings.input_roots`.

Plain Python: the job manager calls these (in a thread) for the bytes clients send through Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.config import Settings
from cluster.errors import InputError, InputNotFound, InputOutsideRoots, InputTooLarge, os_reason
from cluster.resources import disk_full_guard
from cluster.schemas import StoredInput
from cluster.views import display_name

UPLOAD_PREFIX = "upload:"
_REF = re.compile(r"^upload:([0-9a-f]{64})(\.[A-Za-z0-9]{1,10})?$")


class UploadNotFound(InputError):
    """An upload id this job manager does not know (never begun, finished, aborted, or the
    manager restarted mid-upload: begin again)."""
    code = "upload.not_found"


class UploadCorrupt(InputError):
    code = "upload.checksum_mismatch"


def resolve_input_path(path: str, settings: Settings) -> Path:
    """The real path of a server-side input, which must lie under one of `settings.input_roots`
    (symlinks and '..' resolved first). Raises `input.outside_roots` naming the path otherwise,
    and `input.not_found` for a missing file. Nothing is said of a file outside the roots, nor of
    where a path outside them leads: a path that is not under a root as written is not looked at
    (resolving it answered "/proc/self/fd/3 (resolved: .../raylet.out)", and `~user` told which
    users have a home directory), and one that leads out through a symlink is refused without saying
    where to."""
    if "\0" in path:  # (the system refuses it: said as the input's mistake, not the job manager's failure)
        raise InputError(f"input path {path!r} holds a NUL character", path=path)
    given = Path(path)
    if not given.is_absolute():  # `~` too: a client's home directory is not the server's
        raise InputOutsideRoots(f"input path {path} is not absolute (server-side paths must be absolute "
                                f"and lie under LIPSYNC_INPUT_ROOTS)", path=path)
    roots = settings.input_root_paths
    # the roots as configured, and where one is written through a symlink what it is (a path through another
    # alias of it is not under it as written: naming only the resolved root called such a path outside it)
    allowed = ", ".join(str(w) if w == r else f"{w} (= {r})" for w, r in
                        zip(settings.input_root_paths_as_written, roots)) or \
        "none configured (LIPSYNC_INPUT_ROOTS is empty)"
    as_written = Path(os.path.normpath(path))
    if not any(_under(as_written, root) for root in [*roots, *settings.input_root_paths_as_written]):
        raise InputOutsideRoots(f"input path {path} is outside the allowed input roots: {allowed}", path=path)

    def unusable(e: Exception) -> InputError:  # a name longer than the file system takes (ENAMETOOLONG), a
        # symlink loop (ELOOP; Python's resolve says it as a RuntimeError)
        reason = "a symlink loop" if isinstance(e, RuntimeError) else os_reason(e)
        return InputError(f"input path {path} cannot be used: {reason}", path=path)

    try:
        real = given.resolve()
    except (OSError, RuntimeError) as e:
        raise unusable(e) from None
    if not any(_under(real, root) for root in roots):
        raise InputOutsideRoots(f"input path {path} leads outside the allowed input roots (through a symlink): "
                                f"{allowed}", path=path)
    try:  # (only under a root: nothing is said of a file outside them)
        st = real.stat() if real.exists() else None
    except OSError as e:
        raise unusable(e) from None
    if st is None:
        raise InputNotFound(f"input file {path} does not exist", path=path)
    if stat.S_ISDIR(st.st_mode):  # a mistake, not an attempt: said as one
        raise InputError(f"input path {path} is a directory, not a file", path=path)
    if not stat.S_ISREG(st.st_mode):  # a device or a pipe: never read
        raise InputOutsideRoots(f"input path {path} is not a regular file (a device or a pipe)", path=path)
    if st.st_nlink > 1:  # a hard link inside a root may be a file from anywhere: realpath cannot tell
        raise InputOutsideRoots(f"input path {path} is a hard link ({st.st_nlink} links); it may name a file "
                                f"outside the input roots, so it is refused: copy the file instead", path=path)
    return real


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


#: Under the storage root: the file name each stored upload last came under (`upload-names/<sha256><.ext>`),
#: so that errors and views of a job naming `upload:...` name the user's file. A nicety, never a condition:
#: a name that is missing (retention, a failed write) leaves the reference itself.
UPLOAD_NAMES = "upload-names"


def remember_upload_name(stored: Path, filename: str, settings: Settings) -> None:
    """Store the name a client uploaded the bytes of `stored` under (`cluster.fsutil.store_name`: the last
    upload's name wins)."""
    from cluster.fsutil import store_name

    store_name(settings.dir(UPLOAD_NAMES) / stored.name, Path(filename or "").name, limit=255)


def upload_name(stored: Path, settings: Settings) -> str | None:
    """The file name the bytes of the stored upload `stored` (`upload_ref_path`) were last uploaded under,
    where known (`cluster.fsutil.read_name`)."""
    from cluster.fsutil import read_name

    return read_name(settings.storage_root / UPLOAD_NAMES / stored.name, limit=255)


def name_of_upload_ref(given: str, stored: Path, settings: Settings) -> str | None:
    """The name a user knows the input `given` by when it is an upload reference (the file its bytes were
    uploaded under, `upload_name` of its stored copy `stored`); None for any other input, or none known."""
    return upload_name(stored, settings) if is_upload_ref(given) else None


def is_upload_ref(value: str | None) -> bool:
    return bool(value) and value.startswith(UPLOAD_PREFIX)


def upload_ref_path(ref: str, settings: Settings) -> Path:
    """The stored file of an `upload:<sha256><.ext>` reference (refused unless well-formed and present)."""
    m = _REF.match(ref)
    if m is None:
        raise InputNotFound(f"{ref!r} is not an upload reference (expected upload:<sha256><.ext>)", path=ref)
    path = settings.dir("inputs") / f"{m.group(1)}{(m.group(2) or '').lower()}"
    if not path.is_file():
        raise InputNotFound(f"upload {ref} is not stored on this service (give the ref as its upload answered it, "
                            f"extension included; or upload the file again)", path=ref)
    return path


def resolve_input(value: str, settings: Settings) -> Path:
    """An input of a request: an upload reference or an allowed server-side path."""
    return upload_ref_path(value, settings) if is_upload_ref(value) else resolve_input_path(value, settings)


@dataclass
class _Upload:
    path: Path
    suffix: str
    filename: str
    size: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)  # a part and its retry never interleave


class UploadStore:
    """Uploads in progress (appended in parts under `uploads/`), then content-addressed under
    `inputs/<sha256><.ext>`: the same bytes uploaded twice are stored once."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self._open: dict[str, _Upload] = {}

    @disk_full_guard("upload")  # a full or read-only storage root: resource.disk, not a 500
    def begin(self, filename: str) -> str:
        suffix = Path(filename).suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,10}", suffix or ""):
            suffix = ""
        upload_id = uuid.uuid4().hex
        path = self.s.dir("uploads") / f"{upload_id}.part"
        path.write_bytes(b"")
        # the client's name, as errors and listings show it (`display_name`: no terminal escapes)
        self._open[upload_id] = _Upload(path, suffix, display_name(Path(filename).name, limit=255) or "")
        return upload_id

    def _get(self, upload_id: str) -> _Upload:
        up = self._open.get(upload_id)
        if up is None:
            raise UploadNotFound(f"no upload in progress with id {upload_id!r}")
        return up

    @disk_full_guard("upload")  # a full or read-only storage root: resource.disk, not a 500
    def part(self, upload_id: str, data: bytes, offset: int | None = None) -> int:
        """Append `data`; returns the bytes received so far. With `offset` (where `data` starts in
        the file) a part is stored once however often it is sent: a caller that retried a call
        that had in fact arrived (its answer was lost or late) sends the same part again, and a
        part that would leave a gap or overlap differently is refused."""
        up = self._get(upload_id)
        if not up.lock.acquire(timeout=self.s.actor_call_timeout_s):
            raise UploadCorrupt(f"upload {up.filename}: an earlier part is still being written", path=up.filename)
        try:
            if offset is not None and offset != up.size:
                if offset + len(data) == up.size:  # this part again: already stored
                    return up.size
                raise UploadCorrupt(f"upload {up.filename}: a part at byte {offset} does not follow the "
                                    f"{up.size} bytes received", path=up.filename)
            if up.size + len(data) > self.s.max_upload_bytes:
                self.abort(upload_id)
                raise InputTooLarge(f"upload {up.filename} is larger than the limit of {self.s.max_upload_bytes} "
                                    f"bytes (LIPSYNC_MAX_UPLOAD_BYTES)", path=up.filename)
            try:
                with open(up.path, "ab") as f:
                    f.write(data)
            except OSError:  # (a full disk) none of the part is kept: its retry appends after what is counted
                with contextlib.suppress(OSError):
                    os.truncate(up.path, up.size)
                raise
            up.digest.update(data)
            up.size += len(data)
            return up.size
        finally:
            up.lock.release()

    @disk_full_guard("upload")  # a full or read-only storage root: resource.disk, not a 500
    def finish(self, upload_id: str, sha256: str | None = None) -> StoredInput:
        up = self._get(upload_id)
        digest = up.digest.hexdigest()
        if sha256 is not None and sha256.lower() != digest:
            self.abort(upload_id)
            raise UploadCorrupt(f"upload {up.filename}: sha256 {digest} of the bytes received differs from the "
                                f"{sha256} the client sent", path=up.filename)
        dest = self.s.dir("inputs") / f"{digest}{up.suffix}"
        with open(up.path, "rb+") as f:
            os.fsync(f.fileno())
        # also where the same bytes are stored already: a new file, used now (retention judges stored inputs by
        # their last use), which a sweep removing the old one meanwhile leaves (a touch of the old one could not)
        os.replace(up.path, dest)
        del self._open[upload_id]  # (not before: a finish the disk refused leaves it for `abort` to remove)
        remember_upload_name(dest, up.filename, self.s)
        return StoredInput(ref=f"{UPLOAD_PREFIX}{digest}{up.suffix}", size=up.size, sha256=digest)

    def abort(self, upload_id: str) -> None:
        up = self._open.pop(upload_id, None)
        if up is not None:
            up.path.unlink(missing_ok=True)

    def expire(self) -> int:
        """Remove uploads that received no part for `upload_idle_timeout_s` (their client died
        mid-upload, or a restarted manager lost track of them); judged by the part file's mtime,
        so another manager's live upload on the same storage root is left alone. Returns how many."""
        cutoff = time.time() - self.s.upload_idle_timeout_s
        removed = 0
        for path in self.s.dir("uploads").glob("*.part"):
            try:
                stale = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if stale:
                self._open.pop(path.stem, None)
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def same_content(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (sizes first, then the bytes)."""
    import filecmp

    return filecmp.cmp(a, b, shallow=False)
