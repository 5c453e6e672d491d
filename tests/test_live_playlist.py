"""The live playlist's `#EXT-X-PROGRAM-DATE-TIME`: the arrival of the speech a segment shows.

A session (in process, with its journal, as the session actor runs it) receives silence, then a tone,
at real time. Read back from the session's recording, the media time where the tone begins maps,
through the playlist's PROGRAM-DATE-TIME, to the wall clock when the tone's first chunk was handed
to the session: what a player's `playingDate` (hls.js) relies on to tell glass-to-glass delay."""
from __future__ import annotations

import time

import numpy as np


def test_program_date_time_maps_media_time_to_the_speech_arrival(astronaut_video, tmp_path):
    from cluster.audio import load_audio
    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.encoder import PUBLISHED, program_date_time
    from cluster.live.journal import SessionJournal
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model
    from tests.helpers import wait_until

    s = get_settings()
    model = load_model("builtin", s)
    avatar = prepare_avatar(astronaut_video, s)
    out = tmp_path / "session"
    session = LiveSession("pdt", template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=out, settings=s, journal=SessionJournal(out))
    rate, silence_s, tone_s = 16000, 0.6, 1.2
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(int(tone_s * rate)) / rate)).astype(np.int16)
    pcm = np.concatenate([np.zeros(int(silence_s * rate), np.int16), tone, np.zeros(int(0.4 * rate), np.int16)])
    pcm = pcm.astype("<i2").tobytes()
    chunk = 640  # 20 ms
    session.start()
    try:
        wait_until(lambda: session.segments_published >= 1, 30, 0.05, "the first (idle) segment")
        sent, returned = {}, {}  # the wall clock before each append, and once it returned
        t0 = time.monotonic()
        for i in range(0, len(pcm), chunk):
            sent[i] = time.time()
            assert session.append(pcm[i:i + chunk])["accepted"]
            returned[i] = time.time()
            time.sleep(max(0.0, t0 + (i + chunk) / (2 * rate) - time.monotonic()))
        session.finish()
        assert session.join(60)
    finally:
        session.stop()
    assert session.state == "ended", session.stats()
    entries = session.playlist.entries
    # before any speech: no date; a segment showing speech: the date its speech arrived (to the ms)
    assert entries[0].get("pdt") is None
    dated = [e for e in entries if e.get("pdt")]
    assert dated, entries
    # a chunk's arrival is stamped inside append (after `sent`, before `returned`); a date is rounded
    # to the millisecond
    first_sent, last_returned = min(sent.values()), max(returned.values())
    for e in dated:
        assert first_sent - 0.5 <= e["pdt"] <= last_returned + 0.0005, (e, first_sent, last_returned)
        assert e["at"] > e["pdt"]  # published after the speech it shows arrived
    text = (out / "hls" / PUBLISHED).read_text()
    shown = entries[-s.live_playlist_segments:]
    expected = [f"#EXT-X-PROGRAM-DATE-TIME:{program_date_time(e['pdt'])}" for e in shown if e.get("pdt")]
    assert [ln for ln in text.splitlines() if ln.startswith("#EXT-X-PROGRAM-DATE-TIME:")] == expected
    # the tone's onset in the stream (the recording holds every published frame from media time 0)
    audio = load_audio(str(session.recording), sample_rate=rate)
    onset = int(np.argmax(np.abs(audio) > 0.2)) / rate
    start = 0.0
    for segment in entries:
        if start <= onset < start + segment["seconds"]:
            break
        start += segment["seconds"]
    assert segment.get("pdt"), (onset, segment)
    shown_as = segment["pdt"] + (onset - start)  # a player's date for that media time
    arrived = sent[int(silence_s * rate) * 2]  # the chunk holding the tone's first sample
    assert abs(shown_as - arrived) < 0.12, (shown_as - arrived, onset, segment)


def test_program_date_time_never_goes_backwards():
    """Each segment's time is the median arrival of the chunks it closes, less their distance from its first
    frame: two segments' medians can come out a few ms apart the wrong way (a docs probe saw 17 ms back),
    which a player takes as the clock jumping. It never goes before the previous segment's now."""
    import collections
    import time
    from fractions import Fraction
    from types import SimpleNamespace

    from cluster.live.session import LiveSession

    now = time.monotonic()
    session = SimpleNamespace(fps=Fraction(25), clock=time.monotonic, _last_pdt=0.0,
                              _rendered=collections.deque([(now - 1.0, 0), (now - 1.02, 12)]))
    first = LiveSession._speech_arrival(session, 0, 12)
    second = LiveSession._speech_arrival(session, 12, 24)  # its own median: 20 ms before the first's
    assert second == first == session._last_pdt
    session._rendered.append((now - 0.3, 24))
    assert LiveSession._speech_arrival(session, 24, 36) > first
