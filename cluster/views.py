"""The API's view of a job (`JobView`), built from the job manager's `JobStatus`; pure functions
shared by the HTTP ingress and the callback notifier."""
from __future__ import annotations

from cluster.schemas import ErrorInfo, JobState, JobStatus, JobView, OutputInfo, batch_of

STAGES = {JobState.queued: "queued", JobState.preparing: "prepare", JobState.rendering: "render",
          JobState.finalizing: "finalize", JobState.succeeded: "done", JobState.failed: "done",
          JobState.cancelled: "done"}


#: What a view says in place of the service's storage root (`without_root`)
ROOT_SHOWN = "$LIPSYNC_STORAGE_ROOT"


def without_root(error: ErrorInfo | None, storage_root: str | None) -> ErrorInfo | None:
    """`error` with the server's storage root written as `$LIPSYNC_STORAGE_ROOT` in its message, cause and
    path: a job that failed writing a segment (a full disk) told every client where the service keeps its
    files. The job manager's log keeps the whole path."""
    if error is None or not storage_root:
        return error
    return error.model_copy(update={k: text_without_root(getattr(error, k), storage_root)
                                    for k in ("message", "cause", "path") if getattr(error, k)})


def text_without_root(text: str, storage_root: str | None) -> str:
    """`text` with the paths under `storage_root` written from `$LIPSYNC_STORAGE_ROOT` (a whole path part:
    /data/lipsync2 stays as it is beside the root /data/lipsync; a root of / is left unsaid)."""
    import re

    root = (storage_root or "").rstrip("/")
    if not root:
        return text
    return re.sub(re.escape(root) + r"(?=/|$|[\s'\":,;)\]])", lambda _: ROOT_SHOWN, text)


def state_said(st: JobStatus | JobView) -> str:
    """A job's state in a word for a progress bar or a list, or what it waits for where the pool has no live worker
    of a kind (it read `rendering` for the whole wait)."""
    return f"waiting: {st.waiting_for}" if st.waiting_for else st.state.value


#: A run of this many characters without a space in an error's message is shortened (`shortened`)
LONGEST_WORD_SAID = 200


def shortened(text: str, longest: int = LONGEST_WORD_SAID) -> str:
    """`text` with each run of more than `longest` characters without a space said by its head and tail (a
    5000-character job id in a URL was echoed whole by its 404, 1 MB of a "URL" by its refusal)."""
    import re

    def cut(m: re.Match) -> str:
        word = m.group(0)
        return f"{word[:longest // 2]}...{word[-longest // 4:]} ({len(word)} characters)"

    return re.sub(r"\S{%d,}" % (longest + 1), cut, text)


def job_view(st: JobStatus, watch_url: str | None = None, storage_root: str | None = None) -> JobView:
    """The view of `st`; `watch_url` is its HLS playlist's URL (the ingress signs it); `storage_root`: the
    service's, not shown (`without_root`)."""
    out = None
    expired = st.state == JobState.succeeded and st.output is not None and st.output_bytes is None
    if expired or st.stream_gone:  # its stream is gone (or was never made): no URL to it
        watch_url = None
    if st.state == JobState.succeeded:
        if st.output_bytes is not None:
            out = OutputInfo(size=st.output_bytes, duration=st.output_seconds, url=f"/v1/jobs/{st.id}/result",
                             width=st.output_width, height=st.output_height, fps=st.output_fps)
    timings = {}
    for stage in getattr(st, "stages", None) or []:  # StageTime rows of the job manager
        seconds = getattr(stage, "seconds", None)
        if seconds is not None:
            timings[stage.stage] = round(timings.get(stage.stage, 0.0) + seconds, 3)
    req = st.request
    sync = inputs = None
    if req is not None:
        sync = "loop" if req.loop == "forward" else req.loop
        inputs = {"audio": shown_name(req.sources.get(req.audio, req.audio))}
        if req.avatar_id is not None:
            if req.avatar_name:  # the name of the file it was prepared from, where it has one
                inputs["avatar"] = display_name(req.avatar_name) or "?"
            inputs["avatar_id"] = req.avatar_id
        elif req.video is not None:
            inputs["video"] = shown_name(req.sources.get(req.video, req.video))
    rendering = st.state == JobState.rendering
    # no chunk of it on a compositor yet, or no live worker of a kind in the pool
    waiting = rendering and (st.jobs_ahead is not None or st.waiting_for is not None)
    return JobView(id=st.id, state=st.state, stage="waiting" if waiting else STAGES[st.state],
                   jobs_ahead=st.jobs_ahead if rendering else None,
                   waiting_for=st.waiting_for if rendering else None, progress=min(1.0, max(0.0, st.progress)),
                   frames_done=st.frames_done, frames_total=st.frames_total, chunks_done=st.chunks_done,
                   chunks_total=st.chunks_total, created_at=st.created_at, updated_at=st.updated_at,
                   timings=timings, error=without_root(st.error, storage_root), output=out, sync_mode=sync,
                   batch_id=batch_of(st.id), watch_url=watch_url, inputs=inputs, expired=expired)


def given_name(given: str) -> str:
    """The name a user knows an input by: a file's name, a URL's last part (no query, no server path)."""
    from urllib.parse import unquote, urlsplit

    try:
        path = urlsplit(given).path if "://" in given else given
    except ValueError:  # a malformed URL (refused at admission): its own text
        path = given
    return unquote(path.rstrip("/").rsplit("/", 1)[-1]) or given[:100]


def display_name(name: str | None, limit: int = 200) -> str | None:
    """A name as shown to people and stored beside what it names (an upload's file name, an avatar's
    `given_name`): no terminal escapes, line breaks or text-direction overrides (`printable`), at most
    `limit` characters, trimmed; None when nothing is left."""
    return printable(name or "")[:limit].strip() or None


#: Format characters that reorder what a line shows (bidi embeddings, overrides and isolates)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """`text` without control characters (Cc: escapes, bells, line breaks), line and paragraph separators and
    bidi controls; other format characters (a zero-width joiner in an emoji or a Persian name) and spaces
    (a no-break space) stay, as in the name a user typed."""
    import unicodedata

    return "".join(c for c in text if c not in _BIDI_CONTROLS and unicodedata.category(c) not in ("Cc", "Zl", "Zp"))


def shown_name(given: str) -> str:
    """The name a view shows for an input given as `given` (a path, a URL, an upload's file name)."""
    return display_name(given_name(given)) or "?"
