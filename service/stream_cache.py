"""What an ingress process keeps of the live streams its viewers watch, so that the session's actor (which
renders the stream) serves each file about once per process, not once per viewer.

- The published playlist: one read in flight per session, and a read is shared with every request that
  asks within `PLAYLIST_FRESH_S` of it (the period at which a blocking playlist reload looks again): each
  waiting viewer asked the session's actor 25 times a second.
- Segments and init segments: immutable once listed (a restarted encoder numbers its segments on after the
  published ones and names its init segment after its epoch), so a file listed in a playlist this process
  read is kept, least recently used first out past `MAX_BYTES`; a file it has not seen listed (written
  but not yet published, which a takeover may write again) is read each time and not kept.

Plain Python (no Ray): the reads are coroutines the caller gives (`cluster`'s actor calls).
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from actors import task_apart

#: A playlist read this recently is the answer (a blocking reload looks again at this period anyway)
PLAYLIST_FRESH_S = 0.04
#: The segment bytes kept per ingress process (about 40 s of a 720p live stream)
MAX_BYTES = 64 * 1024 * 1024
#: The sessions whose listed names are remembered (their names drop out with the oldest)
MAX_SESSIONS = 256

_URI = re.compile(r'^(?!#)(\S+)$|URI="([^"]+)"', re.M)


class StreamCache:
    def __init__(self, max_bytes: int = MAX_BYTES, fresh_s: float = PLAYLIST_FRESH_S) -> None:
        self.max_bytes, self.fresh_s = max_bytes, fresh_s
        self._playlists: dict[str, tuple[float, asyncio.Future]] = {}  # session -> (read at, its read)
        self._listed: OrderedDict[str, set[str]] = OrderedDict()  # session -> file names its playlists listed
        self._files: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.bytes = 0
        self.reads = 0  # reads made through the given coroutines (for tests and the curious)

    async def playlist(self, session_id: str, read: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        """The session's published playlist: the read in flight or made within `fresh_s`, else a new one."""
        now = time.monotonic()
        known = self._playlists.get(session_id)
        if known is None or (known[1].done() and now - known[0] > self.fresh_s):
            # in a context of its own, not the request's that starts it: Ray cancels the calls a cancelled request
            # made (Serve, as its client goes away: the first viewer leaving), and every viewer awaits this one
            future = task_apart(self._read_playlist(session_id, read))
            # its failure retrieved here: where every request waiting on it has given up, asyncio said "Task
            # exception was never retrieved" at each restart of a session with viewers
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            known = (now, future)
            self._playlists[session_id] = known
            if len(self._playlists) > MAX_SESSIONS:
                self._playlists.pop(next(iter(self._playlists)))
        return await asyncio.shield(known[1])

    async def _read_playlist(self, session_id: str, read: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        self.reads += 1
        try:
            data = await read()
        except BaseException:
            self._playlists.pop(session_id, None)  # (a failed read is not shared with later requests)
            raise
        if data:  # the names it lists now (a name that slid out is kept while its bytes are: `_files`)
            names = {a or b for a, b in _URI.findall(data.decode(errors="replace"))}
            self._listed[session_id] = {n.split("?")[0] for n in names}
            self._listed.move_to_end(session_id)
            while len(self._listed) > MAX_SESSIONS:
                self._listed.popitem(last=False)
        return data

    async def file(self, session_id: str, name: str, read: Callable[[], Awaitable[bytes | None]]) -> bytes | None:
        """A segment or init segment of the session: kept once read where a playlist listed it."""
        key = (session_id, name)
        data = self._files.get(key)
        if data is not None:
            self._files.move_to_end(key)
            return data
        listed = name in self._listed.get(session_id, ())  # before the read: a file listed only once it was read
        self.reads += 1  # may have been read before it was whole
        data = await read()
        if data is not None and listed and len(data) <= self.max_bytes:
            self._files[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, dropped = self._files.popitem(last=False)
                self.bytes -= len(dropped)
        return data

    def forget(self, session_id: str) -> None:
        """Drop what is kept of a session (its files are served from its stored stream once it is over)."""
        self._playlists.pop(session_id, None)
        self._listed.pop(session_id, None)
        for key in [k for k in self._files if k[0] == session_id]:
            self.bytes -= len(self._files.pop(key))
