"""Live sessions: speech streamed in, a lip-synced live HLS stream out.

Plain Python (no Ray), in the order the data flows:
- `cluster.live.speech`: PCM in (16/24/48 kHz) -> 16 kHz speech -> mel columns as soon as they are
  final (only the lookahead the model's window needs);
- `cluster.live.schedule`: one decision per output frame: the next speech frame when one is
  ready, else an idle frame (silent mouth); the template's ping-pong phase runs on regardless;
- `cluster.live.encoder`: one long-lived ffmpeg per session writing a live HLS playlist of
  short fMP4 segments (video + audio), and the whole session as one verified mp4 at the end;
- `cluster.live.session`: the render loop that ties them together at real-time pace, with
  latency, stall and render-load figures;
- `cluster.live.journal`: what must outlive the session's process (speech, publication, the lock
  that says which process runs it); `cluster.live.admission`: whether one more session fits,
  from the running sessions' measured render load.
"""

from cluster.errors import LipsyncError


class SessionNotFound(LipsyncError):
    code = "session.not_found"
    retryable = False


class SessionEnded(LipsyncError):
    code = "session.ended"
    retryable = False


class SessionOffsetGap(LipsyncError):
    """An append whose byte offset is past what the session has received, or off a sample boundary:
    the sender must send again from the session's offset (HTTP 409, socket close 1011)."""
    code = "session.offset_gap"
    retryable = False


class SessionStandby(LipsyncError):
    """This actor is the session's standby, not the one running it: ask the other (the ingress
    does, `actors.live.SessionActors`); retryable, it may be taking the session over now."""
    code = "session.standby"


class LiveCapacity(LipsyncError):
    """`LIPSYNC_MAX_LIVE_SESSIONS` sessions are running (HTTP 429 with Retry-After)."""
    code = "session.capacity"


class AvatarNotReady(LipsyncError):
    """The avatar exists but its preparation has not finished (HTTP 409)."""
    code = "avatar.not_ready"
    retryable = False


def avatar_state(avatar_id: str, settings) -> str:
    """'ready' (prepared), 'preparing' (its directory exists, not yet complete) or 'unknown'."""
    import re

    from cluster.faces.avatar import AVATAR_FILE

    if not isinstance(avatar_id, str) or not re.fullmatch(r"[0-9a-f]{8,64}", avatar_id):
        return "unknown"
    d = settings.storage_root / "avatars" / avatar_id
    if (d / AVATAR_FILE).is_file():
        return "ready"
    return "preparing" if d.is_dir() else "unknown"
