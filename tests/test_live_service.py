"""Live sessions through the real service (`lipsync serve`, Ray, the session actor, model
workers' live lane): create/read/delete, the audio socket and its refusals, idempotent POST
appends, the live playlist read by a real ffmpeg, the recording."""
from __future__ import annotations

import json
import re
import subprocess
import time

import av
import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.helpers import decoded_counts, lipsync_command

pytestmark = pytest.mark.slow


def _api(service) -> httpx.Client:
    return httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=120)


def _close_code(url: str, send=None) -> tuple[int | None, str]:
    """Open the socket, optionally send one message, return the close code and reason."""
    from websockets.exceptions import ConnectionClosed

    with connect(url, open_timeout=30) as ws:
        try:
            first = ws.recv(timeout=30)
            if send is not None:
                ws.send(send)
                ws.recv(timeout=30)
            return None, first
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else ""


def test_create_refusals(service, live_avatar, tmp_path):
    with _api(service) as api:
        r = api.post("/v1/sessions", json={"avatar_id": "ab" * 8})
        assert r.status_code == 404 and r.json()["error"]["code"] == "avatar.not_found"
        assert "lipsync avatar VIDEO" in r.json()["error"]["message"]  # as a job's unknown avatar says it
        r = api.post("/v1/sessions", json={"avatar_id": "NOTANID"})  # was "String should have at least 8 ..."
        assert r.status_code == 422 and "'NOTANID' is not valid: expected the hex id" in r.text, r.text
        preparing = service.storage_root / "avatars" / ("cd" * 8)
        preparing.mkdir(parents=True, exist_ok=True)  # a preparation under way: no avatar.json yet
        r = api.post("/v1/sessions", json={"avatar_id": "cd" * 8})
        assert r.status_code == 409 and r.json()["error"]["code"] == "avatar.not_ready"
        r = api.post("/v1/sessions", json={"avatar_id": live_avatar, "sample_rate": 22050})
        assert r.status_code == 422 and "sample_rate" in r.json()["error"]["message"]
        r = api.post("/v1/sessions", json={"avatar_id": live_avatar, "segment_seconds": 0.1})
        assert r.status_code == 422 and "segment_seconds" in r.json()["error"]["message"]
        assert httpx.post(f"{service.url}/v1/sessions", json={"avatar_id": live_avatar}).status_code == 401
        # an unknown model: the service's model names, as a job is answered (it was a path on the server)
        r = api.post("/v1/sessions", json={"avatar_id": live_avatar, "model": "nosuch"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "input.not_found" and error["field"] == "model", r.text
        assert error["message"].startswith("unknown model 'nosuch': this service has the built-in model"), error
        assert str(service.storage_root) not in error["message"], error
        # an RTMP output passes the input URLs' address guard (this service allows no private address)
        for url, words in [("rtmp://127.0.0.1:1935/live/key", "non-public"), ("http://example.com/live/k", "rtmp")]:
            r = api.post("/v1/sessions", json={"avatar_id": live_avatar, "rtmp_url": url})
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "input.unsafe" and error["field"] == "rtmp_url", r.text
            assert words in error["message"], error
    # the CLI hands --rtmp to the server: its refusal comes back as a bad input (exit 2)
    from cluster.synth import speech_like, write_audio

    lipsync = lipsync_command()
    audio = write_audio(str(tmp_path / "never-sent.wav"), speech_like(0.5, seed=2))  # checked before the session
    out = subprocess.run([lipsync, "live", "--avatar", live_avatar, "--audio", audio, "--rtmp",
                          "rtmp://127.0.0.1/live/key", "--url", service.url, "--token", service.token],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "rtmp_url" in out.stderr and "non-public" in out.stderr, (out.returncode, out.stderr)


def test_running_sessions_are_listed(service, live_avatar):
    """A probe: a client that lost a session's id could not find it (`GET /v1/sessions` answered 405) and waited for
    its idle timeout. The sessions not yet ended are listed: the API, the SDK and `lipsync sessions`."""
    from cluster.client import Client

    with _api(service) as api:
        sid = api.post("/v1/sessions", json={"avatar_id": live_avatar}).json()["id"]
        try:
            listed = api.get("/v1/sessions")
            assert listed.status_code == 200 and sid in [v["id"] for v in listed.json()], listed.text
            assert httpx.get(f"{service.url}/v1/sessions", timeout=30).status_code == 401
            with Client(service.url, token=service.token) as c:
                mine = next(v for v in c.sessions() if v.id == sid)
                assert mine.avatar_id == live_avatar and mine.hls_url.startswith("http")
            out = subprocess.run([lipsync_command(), "sessions", "--url", service.url, "--token", service.token],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and sid in out.stdout, (out.stdout, out.stderr)
        finally:
            api.delete(f"/v1/sessions/{sid}", timeout=120)
        assert sid not in [v["id"] for v in api.get("/v1/sessions").json()]


def test_socket_refusals_and_idempotent_post(service, live_avatar):
    with _api(service) as api:
        view = api.post("/v1/sessions", json={"avatar_id": live_avatar}).json()
        sid, ws_url = view["id"], view["audio_ws"]
        try:
            bad_token = ws_url.split("?token=")[0] + "?token=wrong"
            assert _close_code(bad_token)[0] == 4401
            # the stream's token (what viewers get in hls_url) does not open the audio socket: whoever
            # can watch cannot make the avatar speak; the socket's token opens the stream too
            watch_token = view["hls_url"].split("?token=")[1]
            assert watch_token != ws_url.split("?token=")[1]
            assert _close_code(ws_url.split("?token=")[0] + "?token=" + watch_token)[0] == 4401
            stream = view["hls_url"].split("?token=")[0]
            assert api.get(stream, params={"token": ws_url.split("?token=")[1]}, timeout=30).status_code != 401
            assert api.get(stream, params={"token": "wrong"}, timeout=30).status_code == 401
            # a token is scoped to its session and checked first: another id (existing or not) is refused
            # the same way, so the socket tells nobody without a token which sessions exist
            assert _close_code(ws_url.replace(sid, "f" * 16))[0] == 4401
            code, reason = _close_code(ws_url + "&sample_rate=44100")
            assert code == 4415 and "44100" in reason
            code, reason = _close_code(ws_url, send=b"\x00\x01\x02")
            assert code == 4400 and "3 bytes" in reason
            code, reason = _close_code(ws_url, send="hello")
            assert code == 4422
            with connect(ws_url, open_timeout=30) as first:  # one audio socket at a time
                assert json.loads(first.recv(timeout=30))["type"] == "ready"
                assert _close_code(ws_url)[0] == 4409
                # one silent for 10 s (or whose connection was lost) is taken over; it is told so when it
                # sends again (4409), and what it sends is not taken (it was dropped as bytes the session
                # already had, silently, from the stale offset of a socket that did not know)
                time.sleep(10.5)
                with connect(ws_url, open_timeout=30) as second:
                    assert json.loads(second.recv(timeout=30)) == {"type": "ready", "offset": 0, "sample_rate": 16000}
                    first.send(b"\x00\x01" * 800)
                    with pytest.raises(ConnectionClosed) as taken:
                        first.recv(timeout=30)
                    assert taken.value.rcvd is not None and taken.value.rcvd.code == 4409, taken.value
                    # a POST beside the open socket is refused: it took bytes, and the socket's next ones,
                    # sent from its own offset, were skipped as already had (speech lost, silently)
                    r = api.post(f"/v1/sessions/{sid}/audio", params={"offset": 0}, content=b"\x00\x01" * 800)
                    assert r.status_code == 409 and r.json()["error"]["code"] == "session.socket_open", r.text
                assert api.get(f"/v1/sessions/{sid}").json()["bytes_received"] == 0
            # POST appends: idempotent by offset (once the closed socket has let go of the session)
            pcm = (np.sin(np.arange(16000) / 8.0) * 8000).astype("<i2").tobytes()
            a, b = pcm[:12000], pcm[12000:]
            path = f"/v1/sessions/{sid}/audio"
            deadline = time.monotonic() + 30
            while (r := api.post(path, params={"offset": 0}, content=a)).status_code == 409:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            assert r.json()["offset"] == 12000
            assert api.post(path, params={"offset": 0}, content=a).json()["offset"] == 12000  # a retry
            # the session's speaking token (audio_ws's) takes a POST without the API token too: what a page given
            # the session can send where no WebSocket gets through; the watch-only token does not, nor no token
            speak_token = ws_url.split("?token=")[1]
            bare = f"{service.url}{path}"
            r = httpx.post(bare, params={"offset": 0, "token": speak_token}, content=a, timeout=30)
            assert r.status_code == 200 and r.json()["offset"] == 12000, r.text
            for refused in ({"offset": 0, "token": watch_token}, {"offset": 0}):
                r = httpx.post(bare, params=refused, content=a, timeout=30)
                assert r.status_code == 401 and r.json()["error"]["code"].startswith("auth."), (refused, r.text)
            assert api.post(path, params={"offset": 10000}, content=pcm[10000:14000]).json()["offset"] == 14000
            assert api.post(path, params={"offset": 12000}, content=b).json()["offset"] == len(pcm)
            r = api.post(path, params={"offset": len(pcm) + 2}, content=b"\x00\x00")
            assert r.status_code == 409 and r.json()["error"]["code"] == "session.offset_gap"
            # the session's own words, where to resend from, not Ray's traceback of the actor
            gap = r.json()["error"]
            assert gap["message"] == (f"offset {len(pcm) + 2} is past the {len(pcm)} bytes received (a gap): send "
                                      f"again from offset {len(pcm)}") and gap["field"] == "offset", gap
            assert api.post(path, params={"offset": len(pcm)}, content=b"\x00").status_code == 400
            # backpressure: the buffer (5 s) takes what it has room for of 6 s sent at once (it took all
            # of it); the 429 says where to resend from; the same body at the same offset, once there is
            # room, adds the rest, nothing twice
            burst = (np.sin(np.arange(16000 * 6) / 9.0) * 6000).astype("<i2").tobytes()
            r = api.post(path, params={"offset": len(pcm)}, content=burst)
            assert r.status_code == 429 and r.json()["error"]["code"] == "session.buffer_full", r.text
            assert r.headers["retry-after"]
            taken = api.get(f"/v1/sessions/{sid}").json()["bytes_received"] - len(pcm)
            assert 0 < taken < len(burst), taken
            assert f"send again from offset {len(pcm) + taken}" in r.json()["error"]["message"]
            deadline = time.monotonic() + 60
            while (r := api.post(path, params={"offset": len(pcm)}, content=burst)).status_code == 429:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            assert r.status_code == 200 and r.json()["offset"] == len(pcm) + len(burst), r.text
            pcm += burst
            # a reconnecting socket learns the offset to resume from
            with connect(ws_url, open_timeout=30) as ws:
                assert json.loads(ws.recv(timeout=30)) == {"type": "ready", "offset": len(pcm), "sample_rate": 16000}
            assert api.get(f"/v1/sessions/{sid}").json()["bytes_received"] == len(pcm)
            # behind a TLS proxy the view's URLs are the ones its client reached (X-Forwarded-Proto/-Host);
            # a forwarded host that is not a plain host[:port] is ignored
            proxied = api.get(f"/v1/sessions/{sid}", headers={"X-Forwarded-Proto": "https",
                                                               "X-Forwarded-Host": "avatars.example.com"}).json()
            assert proxied["hls_url"].startswith(f"https://avatars.example.com/v1/sessions/{sid}/hls/index.m3u8?")
            assert proxied["audio_ws"].startswith(f"wss://avatars.example.com/v1/sessions/{sid}/audio?")
            odd = api.get(f"/v1/sessions/{sid}", headers={"X-Forwarded-Host": "evil.example/x?"}).json()
            assert odd["hls_url"].startswith(service.url + "/"), odd["hls_url"]
        finally:
            api.delete(f"/v1/sessions/{sid}")


def test_a_socket_lost_in_the_middle_of_a_long_message_lets_go_of_the_session(service, live_avatar):
    """A client sent 20 s of speech in one message, then lost its connection: the server went on feeding that
    message to the session for its length, and the client's reconnects were refused (4409, "another audio
    socket is open") for over 20 s, longer than the web page and the SDK try. The lost socket stops feeding
    and lets go: the reconnect is taken at once and resumes from what the session has."""
    import socket
    import struct

    with _api(service) as api:
        view = api.post("/v1/sessions", json={"avatar_id": live_avatar}).json()
        sid, ws_url = view["id"], view["audio_ws"]
        try:
            pcm = (np.sin(np.arange(16000 * 20) / 8.0) * 8000).astype("<i2").tobytes()
            first = connect(ws_url, open_timeout=30)
            assert json.loads(first.recv(timeout=30))["type"] == "ready"
            first.send(pcm)
            time.sleep(1.5)  # being fed (the session's buffer holds 5 s of it)
            first.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.socket.close()  # a reset: the client's network went
            lost, refused = time.monotonic(), 0
            while True:
                assert time.monotonic() - lost < 8, f"still refused after {refused} tries"
                with connect(ws_url, open_timeout=30) as again:
                    try:
                        ready = json.loads(again.recv(timeout=30))
                        break
                    except ConnectionClosed as e:
                        assert e.rcvd is not None and e.rcvd.code == 4409, e
                        refused += 1
                time.sleep(0.25)
            assert ready["type"] == "ready" and 0 < ready["offset"] < len(pcm), ready
        finally:
            api.delete(f"/v1/sessions/{sid}")


def test_sdk_live_session_streams_hls_that_ffmpeg_decodes(service, live_avatar, speech_wav, tmp_path):
    from cluster.client import Client
    from cluster.config import Settings
    from cluster.media.ffmpeg import ffmpeg_binary

    with Client(service.url, token=service.token) as client:
        with client.live(live_avatar, max_seconds=1e9) as session:
            # a max_seconds past LIPSYNC_LIVE_MAX_SECONDS is capped: the view says at what (it did not say it)
            assert session.view.max_seconds == Settings().live_max_seconds, session.view  # (the service's default)
            assert session.hls_url.split("?token=")[0].endswith(f"/v1/sessions/{session.id}/hls/index.m3u8")
            assert session.view.audio_ws.endswith(f"?token={session.view.token}")  # the socket's: not in hls_url
            assert session.view.token not in session.hls_url
            # the first playlist asked for, at once: a whole segment listed (one with a part only made
            # ffmpeg and ffplay fail with "Empty segment", the README's own recipe)
            assert "#EXTINF" in httpx.get(session.hls_url, timeout=30).text
            session.send_file(speech_wav, realtime=True)
            view = session.wait_rendered(timeout=60)
            assert view.seconds_received == 3.2 and view.seconds_rendered == 3.2, view
            playlist = httpx.get(session.hls_url, timeout=30).text
            assert "#EXT-X-TARGETDURATION:1" in playlist and "?token=" in playlist
            assert "#EXT-X-ENDLIST" not in playlist  # live: the avatar idles after the speech
            # a real ffmpeg reads the live playlist (for 2 s of it) and decodes video and audio
            out = subprocess.run([ffmpeg_binary(), "-hide_banner", "-loglevel", "error", "-i", session.hls_url,
                                  "-t", "2", "-map", "0:v", "-map", "0:a", "-f", "null", "-"],
                                 capture_output=True, text=True, timeout=90)
            assert out.returncode == 0, out.stderr
            live_view = session.stats()
            assert live_view.state == "live" and live_view.latency_samples > 0
        final = session.view
        assert final.state == "ended" and final.reason == "finished"  # POST /end, everything rendered (not DELETE)
        rec = session.download_recording(tmp_path / "rec.mp4")
    import av

    with av.open(str(rec)) as container:
        assert container.streams.video and container.streams.audio
        assert container.streams.video[0].frames == round(final.recording_seconds * 25)
    assert final.recording_seconds >= 3.2
    # its two processes (the actor and its standby, ~250 MB each) leave LIPSYNC_LIVE_KEEP_ENDED_S (10 s) after
    # its end (they stayed 15 minutes); its view, stream and recording are then served from its directory
    import json

    import psutil

    from cluster.live.journal import LOCK_FILE, STANDBY_FILE
    from cluster.retention import _lock_held
    from tests.helpers import wait_until

    journal = service.storage_root / "sessions" / session.id
    # its standby marks itself once ready; on a busy machine a session of 3 s can end before it is
    marked = journal / STANDBY_FILE
    standby = json.loads(marked.read_text())["pid"] if marked.exists() else None
    wait_until(lambda: not _lock_held(journal / LOCK_FILE) and (standby is None or not psutil.pid_exists(standby)),
               60, 0.5, "the ended session's actor and standby to leave")
    with _api(service) as api:
        view = api.get(f"/v1/sessions/{session.id}").json()
        assert view["state"] == "ended" and view["recording_bytes"] == rec.stat().st_size, view
        assert view["seconds_rendered"] == final.seconds_rendered and view["recording_url"], view
        whole = api.get(f"/v1/sessions/{session.id}/recording")
        assert whole.content == rec.read_bytes() and whole.headers["accept-ranges"] == "bytes"
        # resumable and cacheable as a job's result (a Range was answered with the whole file)
        part = api.get(f"/v1/sessions/{session.id}/recording", headers={"Range": "bytes=100-"})
        assert part.status_code == 206 and part.content == whole.content[100:], part.status_code
        assert part.headers["content-range"] == f"bytes 100-{len(whole.content) - 1}/{len(whole.content)}"
        assert api.get(f"/v1/sessions/{session.id}/recording",
                       headers={"If-None-Match": whole.headers["etag"]}).status_code == 304
        playlist = httpx.get(session.hls_url, timeout=30).text
        assert "#EXT-X-ENDLIST" in playlist, playlist
        first = re.search(r"^(?!#)(\S+)$", playlist, re.M).group(1)  # its first segment, from disk
        # the journal's PCM went with the end: the recording holds that speech (it was kept until retention)
        journal = service.storage_root / "sessions" / session.id
        assert (journal / "final.json").exists() and not (journal / "audio.pcm").exists()
        segment = httpx.get(session.hls_url.split("/index.m3u8")[0] + "/" + first, timeout=30)
        assert segment.content
        # a player or CDN that asks HEAD first gets the headers a GET has, without the body
        probe = httpx.head(session.hls_url.split("/index.m3u8")[0] + "/" + first, timeout=30)
        assert probe.status_code == 200 and not probe.content, probe.status_code
        assert probe.headers["content-length"] == str(len(segment.content))
        assert httpx.head(session.hls_url, timeout=30).status_code == 200
        again = api.delete(f"/v1/sessions/{session.id}")  # a repeated DELETE: the same end
        assert again.status_code == 200 and again.json()["reason"] == "finished", again.text
        late = api.post(f"/v1/sessions/{session.id}/audio", params={"offset": 0}, content=b"\x00\x00")
        assert late.status_code == 410 and late.json()["error"]["code"] == "session.ended", late.text


class PlaylistWatcher:
    """Polls a live playlist every 0.1 s, as a player would, noting when its position (media
    sequence + segments listed) changes: `.advances` [(monotonic time, position)]."""

    def __init__(self, url: str) -> None:
        import threading

        self.url = url
        self.advances: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import re

        last = None
        while not self._done.wait(0.1):
            try:
                text = httpx.get(self.url, timeout=30).text
            except httpx.HTTPError:
                continue
            seq = re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text)
            if seq is None:
                continue
            position = int(seq.group(1)) + text.count("#EXTINF")
            if position != last:
                self.advances.append((time.monotonic(), position))
                last = position

    def stop(self) -> None:
        self._done.set()
        self._thread.join(35)

    def longest_stall(self) -> float:
        """The longest time between two advances of the playlist."""
        times = [t for t, _ in self.advances]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def test_low_latency_hls_parts_and_blocking_playlist_reload(service, live_avatar):
    """LL-HLS on a session that asked for 0.25-s segments: the playlist announces parts
    (PART-INF, PART-HOLD-BACK, CAN-BLOCK-RELOAD) and ends with the in-progress segment's part, its
    URI signed and served; `?_HLS_msn=N&_HLS_part=0` for the next part is answered once that part
    is published (the answer lists it), one already there at once; a request more than two segments
    ahead, or not a number, is refused 400."""
    import re
    from urllib.parse import urljoin

    from cluster.client import Client
    from cluster.live.encoder import playlist_has

    with Client(service.url, token=service.token) as client:
        with client.live(live_avatar, segment_seconds=0.25) as session:
            url = session.hls_url
            text = httpx.get(url, timeout=30).text
            assert "#EXT-X-PART-INF:PART-TARGET=0.250\n" in text, text
            assert "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=0.750\n" in text, text
            parts = re.findall(r'#EXT-X-PART:DURATION=[0-9.]+,URI="([^"]+)"', text)
            watch = url.split("?token=")[1]  # the playlist's own (watch-only) token, carried by its URIs
            assert parts and all(f"?token={watch}" in p for p in parts), text
            assert not text.rstrip().splitlines()[-1].startswith("seg_")  # it ends with the in-progress part
            newest = int(re.search(r"seg_(\d+)\.m4s", parts[-1]).group(1))
            assert httpx.get(urljoin(url, parts[-1]), timeout=30).content[4:8] in (b"styp", b"moof")
            far = httpx.get(urljoin(url, f"seg_{newest + 999999:06d}.m4s?token={watch}"), timeout=30)
            assert far.status_code == 404 and far.json()["error"]["code"] == "hls.not_published", far.text
            # the part after the newest: held until it (or a later one: a loaded machine may publish
            # several at once) is published, within the bound
            assert not playlist_has(text, newest + 1, 0)  # it was not there before
            for _ in range(3):  # each answer within the 3 s bound (+ slack); at the bound the playlist as it is
                # (a session slowed past 3 s by a loaded machine), and a player asks again, as here
                started = time.monotonic()
                r = httpx.get(f"{url}&_HLS_msn={newest + 1}&_HLS_part=0", timeout=30)
                waited = time.monotonic() - started
                assert r.status_code == 200 and waited < 3.0 + 2.0, (r.status_code, waited)
                if playlist_has(r.text, newest + 1, 0):
                    break
                assert waited >= 2.9, waited  # not there: answered at the bound, not at once (it blocks)
            else:
                pytest.fail(f"part {newest + 1}.0 was not published within three blocking reloads:\n{r.text}")
            # one already published: answered before the bound
            started = time.monotonic()
            assert playlist_has(httpx.get(f"{url}&_HLS_msn={newest}&_HLS_part=0", timeout=30).text, newest, 0)
            # (not held to the 3 s bound; 2.2 s was seen at once on 2 cores at a load of 13)
            assert time.monotonic() - started < 2.9
            for query in (f"_HLS_msn={newest + 10000}", "_HLS_msn=x", f"_HLS_msn={newest}&_HLS_part=-1",
                          "_HLS_part=0"):
                r = httpx.get(f"{url}&{query}", timeout=30)
                assert r.status_code == 400 and r.json()["error"]["code"] == "request.invalid", (query, r.text)


def test_a_model_worker_killed_mid_session_loses_no_speech(service, live_avatar, speech_wav, tmp_path):
    """SIGKILL the model worker while speech streams in: the stream keeps advancing (batches go
    out without the model meanwhile), the session does not end, and every second of speech is
    rendered after the gap (the recording holds it all)."""
    import os
    import signal
    import threading

    from cluster.client import Client

    with Client(service.url, token=service.token) as client:
        session = client.live(live_avatar)
        watcher = PlaylistWatcher(session.hls_url)
        sender = threading.Thread(target=session.send_file, args=(speech_wav,), kwargs={"realtime": True})
        sender.start()
        time.sleep(1.2)
        pids = service.actor_pids("ray::ModelWorker")
        assert pids, "no model worker process of this service found"
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        sender.join(60)
        view = session.wait_rendered(timeout=120)
        assert view.state == "live"
        assert view.seconds_rendered == pytest.approx(view.seconds_received, abs=0.04)
        assert view.seconds_received == pytest.approx(3.2, abs=0.01)
        time.sleep(1.0)  # the idle avatar streams on after the speech
        watcher.stop()
        final = session.close()
    assert final.state == "ended" and final.model_faults >= 1
    stall = watcher.longest_stall()
    after = [t for t, _ in watcher.advances if t > killed_at]
    print(f"\nmodel worker SIGKILLed: longest playlist stall seen by a poller (0.1 s) {stall:.2f} s, by the "
          f"session: longest_gap_s {final.longest_gap_s}, {final.model_faults} batch(es) shown without the model; "
          f"{len(after)} advances after the kill")
    assert len(after) >= 3 and stall < 6.0  # the target 2 s (measured 0.9-1.5 s); loaded-machine bound
    assert final.recording_seconds >= 3.2


def test_cli_live_prints_the_playlist_url_then_latency(service, live_avatar, speech_wav, tmp_path):
    lipsync = lipsync_command()
    out = subprocess.run([lipsync, "live", "--avatar", live_avatar, "--audio", speech_wav, "--url", service.url,
                          "--token", service.token, "--segment-seconds", "0.3"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "/hls/index.m3u8?token=" in lines[0]
    assert "ended (finished)" in lines[-1] and "3.20 s rendered" in lines[-1] and "latency p50" in lines[-1]
    assert lines[-1].endswith("segments <= 0.3 s"), lines[-1]  # the session's own segment length was asked for
    # a segment length the service does not offer is refused before any session starts, naming the field
    out = subprocess.run([lipsync, "live", "--avatar", live_avatar, "--audio", speech_wav, "--url", service.url,
                          "--token", service.token, "--segment-seconds", "0.05"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "segment_seconds" in out.stderr, (out.stdout, out.stderr)
    # the session reaches the --max-seconds asked for before the audio's end: that is no failure (it was
    # exit 1, "session.ended", no summary, no recording though one was asked for)
    recording = tmp_path / "limited.mp4"
    out = subprocess.run([lipsync, "live", "--avatar", live_avatar, "--audio", speech_wav, "--url", service.url,
                          "--token", service.token, "--realtime", "--max-seconds", "2", "--recording", str(recording)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "reached --max-seconds (2 s)" in out.stderr, (out.stdout, out.stderr)
    assert "ended (max_seconds)" in out.stdout.strip().splitlines()[-1], out.stdout
    assert recording.stat().st_size > 1000


def test_cli_prepares_and_lists_avatars(service, live_avatar, astronaut_video, tmp_path):
    """`lipsync avatar VIDEO` prints the id that `submit --avatar` and `live --avatar` take (the shell had no way
    to make one: only the SDK, curl or the page), here the one the same template was prepared as; `lipsync
    avatars` lists them with the names of their files; a video without a face, or a file that is no video, is
    refused in one line, exit 2."""
    import shutil

    from cluster.media.encode import SegmentEncoder
    from cluster.synth import astronaut_template

    lipsync = lipsync_command()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([lipsync, *args, "--url", service.url, "--token", service.token], capture_output=True,
                              text=True, timeout=240)

    out = cli("avatar", astronaut_video)
    assert out.returncode == 0 and out.stdout.strip() == live_avatar, (out.stdout, out.stderr)
    assert f"avatar {live_avatar}: 320x240  25 fps" in out.stderr, out.stderr
    # a template new to the service is named after the file it was given as; the same bytes given again
    # under another name are the same avatar, and keep their first name
    anna = astronaut_template(str(tmp_path / "anna.mp4"), seconds=1.2, fps=25, size=(320, 240), seed=47)
    out = cli("avatar", anna)
    assert out.returncode == 0, out.stderr
    anna_id = out.stdout.strip()
    shutil.copy(anna, tmp_path / "copy.mp4")
    out = cli("avatar", "--json", str(tmp_path / "copy.mp4"))
    assert out.returncode == 0 and json.loads(out.stdout)["id"] == anna_id, out.stdout
    assert json.loads(out.stdout)["name"] == "anna.mp4", out.stdout
    # prepared from a stored upload's reference (JSON): named after the file its bytes were uploaded as
    bob = astronaut_template(str(tmp_path / "bob.mp4"), seconds=1.4, fps=25, size=(320, 240), seed=48)
    auth = {"Authorization": f"Bearer {service.token}"}
    with open(bob, "rb") as f:
        ref = httpx.post(f"{service.url}/v1/uploads", headers=auth, files={"file": ("bob.mp4", f)}, timeout=60)
    assert ref.status_code == 201, ref.text
    made = httpx.post(f"{service.url}/v1/avatars", headers=auth, json={"video": ref.json()["ref"]}, timeout=300)
    assert made.status_code == 201 and made.json()["name"] == "bob.mp4", made.text
    out = cli("avatars")
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and any(line.startswith(f"{live_avatar}  320x240") for line in lines), lines
    assert any(line.startswith(f"{anna_id}  320x240  25 fps  1.2 s  30 frames  anna.mp4") for line in lines), lines
    out = cli("avatars", "--json")
    assert {live_avatar, anna_id} <= {a["id"] for a in json.loads(out.stdout)}, out.stdout
    grey = tmp_path / "grey.mp4"  # 10 frames of a plain grey picture: no face in any
    with SegmentEncoder(grey, 160, 128, 25) as enc:
        enc.write(np.full((10, 128, 160, 3), 128, np.uint8))
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(64)))  # a cut-off header
    for name, code in (("grey.mp4", "input.no_face"), ("broken.mp4", "input.")):
        out = cli("avatar", str(tmp_path / name))
        assert out.returncode == 2 and out.stdout == "", (name, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"lipsync: error: {code}") and name in lines[0], lines


def _speech_energy(pcm: np.ndarray) -> float:
    return float(np.sum(pcm.astype(np.float64) ** 2))


def test_the_session_actor_killed_mid_speech_resumes_and_loses_no_speech(service, live_avatar, speech_wav,
                                                                        tmp_path):
    """SIGKILL the session's own actor (its compositing and encoder) while speech streams in: Ray
    restarts it, it resumes from the session's journal, the open socket stays open (its appends
    are repeated by offset), the playlist goes on after a discontinuity with increasing media
    sequence numbers, the session does not end, and every second of speech is rendered once: the
    recording decodes with all of it (its energy equals the speech's, nothing lost, nothing doubled)."""
    import os
    import signal
    import threading

    import av

    from cluster.client import Client
    from cluster.media.ffmpeg import ffmpeg_binary
    from tests.helpers import wait_until

    with Client(service.url, token=service.token) as client:
        session = client.live(live_avatar)
        # the session's warm standby (LIPSYNC_LIVE_STANDBY) is ready a few seconds after its start
        wait_until(lambda: session.stats().standby == "ready", 60, 0.1, "the session's standby to be ready")
        watcher = PlaylistWatcher(session.hls_url)
        advances = watcher.advances
        sender = threading.Thread(target=session.send_file, args=(speech_wav,), kwargs={"realtime": True})
        sender.start()
        wait_until(lambda: len(advances) >= 2, 30, 0.05, "the live playlist to advance")  # mid-stream
        time.sleep(0.3)
        pid = wait_until(lambda: service.session_actor_pid(session.id), 10, 0.1, "the session's actor")
        socket_before = session._ws
        standby = json.loads((service.storage_root / "sessions" / session.id / "standby.json").read_text())["pid"]
        killed_at, killed_wall = time.monotonic(), time.time()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (service.session_actor_pid(session.id) or pid) != pid, 60, 0.05, "the restarted actor")
        encoding_again = time.monotonic() - killed_at
        sender.join(90)
        assert not sender.is_alive()
        assert socket_before is not None and session._ws is socket_before  # the same socket: never reconnected
        view = session.wait_rendered(timeout=120)
        assert view.state == "live" and view.restarts == 1, view
        new_pid = service.session_actor_pid(session.id)
        assert new_pid == standby != pid  # the warm standby took the session over, not a restart of the dead one
        assert view.seconds_received == pytest.approx(3.2, abs=0.01)
        journal = (service.storage_root / "sessions" / session.id / "speech.jsonl").read_text()
        assert view.seconds_rendered == pytest.approx(view.seconds_received, abs=1e-3), journal
        time.sleep(1.0)  # the idle avatar streams on after the speech
        playlist = httpx.get(session.hls_url, timeout=30).text
        # a player can load what the playlist lists since the takeover: the new encoder's own init
        # segment (init-1.mp4) and its segments (each URI relative, with the session token)
        base = session.hls_url.split("?")[0].rsplit("/", 1)[0]
        maps = re.findall(r'URI="([^"]+)"', playlist)
        assert any(m.startswith("init-1.mp4") for m in maps), playlist
        media = [line for line in playlist.splitlines() if line and not line.startswith("#")]
        for uri in maps + media[-3:]:
            got = httpx.get(f"{base}/{uri}", timeout=30)
            assert got.status_code == 200 and got.content, (uri, got.status_code)
        watcher.stop()
        final = session.close()
        rec = session.download_recording(tmp_path / "rec.mp4")
    assert final.state == "ended" and final.reason == "finished" and final.restarts == 1
    positions = [p for _, p in advances]
    assert positions == sorted(positions) and positions[-1] > positions[0]
    after = [t for t, _ in advances if t > killed_at + encoding_again]
    assert after, "the playlist never advanced once the restarted actor was encoding"
    stall = watcher.longest_stall()
    steps = sorted((final.restart_timeline or {}).items(), key=lambda kv: kv[1])
    print(f"\nsession actor SIGKILLed: its restarted actor encoding again after {encoding_again:.2f} s; longest "
          f"playlist stall seen by a poller (0.1 s) {stall:.2f} s, by the session: restart_gap_s "
          f"{final.restart_gap_s}, longest_gap_s {final.longest_gap_s}; the resume's steps after the kill: "
          + ", ".join(f"{name} {at - killed_wall:+.2f} s" for name, at in steps))
    # the target is 2 s (measured 0.3-0.7 s, more under heavy load); a bound that holds on a loaded
    # machine and still catches a regression to waiting for Ray's restart of the dead actor
    assert stall < 6.0
    # the restarted encoder's segments follow a discontinuity, with its own init segment
    assert "#EXT-X-DISCONTINUITY" in playlist or "#EXT-X-DISCONTINUITY-SEQUENCE:1" in playlist, playlist
    # the recording: every published frame, and all the speech, once
    with av.open(str(rec)) as container:
        assert container.streams.video and container.streams.audio
        frames, samples = decoded_counts(container)
    assert frames == round(final.recording_seconds * 25)
    assert samples / 48000 == pytest.approx(final.recording_seconds, abs=0.1)
    out = subprocess.run([ffmpeg_binary(), "-v", "error", "-i", str(rec), "-map", "0:a", "-ac", "1", "-ar", "16000",
                          "-f", "s16le", "-"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    heard = _speech_energy(np.frombuffer(out.stdout, "<i2"))
    sent = subprocess.run([ffmpeg_binary(), "-v", "error", "-i", speech_wav, "-ac", "1", "-ar", "16000", "-f", "s16le",
                           "-"], capture_output=True, timeout=60).stdout
    spoken = _speech_energy(np.frombuffer(sent, "<i2"))
    print(f"recording: {final.recording_seconds} s, its audio energy / the speech's {heard / spoken:.3f}")
    assert heard / spoken == pytest.approx(1.0, abs=0.1), (heard / spoken)


def test_a_session_whose_actor_is_gone_for_good_reads_failed(service, live_avatar):
    """What Ray leaves once a session's actor has used its restarts (`LIPSYNC_LIVE_MAX_RESTARTS`):
    a journal that never ended and no actor under the session's name. The API tells the truth
    from the journal: `failed`, naming the stage and the session, with what it had received; audio
    is refused with 410 and the socket closes with 4410; nothing waits."""
    sid = "0123456789abcdef"
    journal = service.storage_root / "sessions" / sid
    journal.mkdir(parents=True)
    (journal / "session.json").write_text(json.dumps({"avatar_id": live_avatar, "model": "builtin", "size": 96,
                                                      "crop": "x", "sample_rate": 16000, "max_seconds": None,
                                                      "created": time.time(), "started_wall": time.time()}))
    (journal / "audio.pcm").write_bytes(b"\x00\x01" * 16000)  # 1 s received
    (journal / "speech.jsonl").write_text('{"restart": 1}\n{"restart": 2}\n{"restart": 3}\n')
    (journal / "published.jsonl").write_text(json.dumps({"name": "seg_000000.m4s", "seconds": 0.48, "frames": 12,
                                                         "epoch": 0, "init": "init.mp4", "end_frame": 12}) + "\n")
    with _api(service) as api:
        t0 = time.monotonic()
        r = api.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200, r.text
        view = r.json()
        assert view["state"] == "failed" and view["error"]["code"] == "session.actor_lost", view
        assert view["error"]["stage"] == "live" and sid in view["error"]["message"], view
        assert "LIPSYNC_LIVE_MAX_RESTARTS" in view["error"]["message"] and "3 restart(s)" in view["error"]["message"]
        assert view["seconds_received"] == 1.0 and view["segments_published"] == 1
        r = api.post(f"/v1/sessions/{sid}/audio", params={"offset": 32000}, content=b"\x00\x00")
        assert r.status_code == 410 and sid in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 10
        # its one journalled segment's file is not there: no recording, and the answer says why
        r = api.get(f"/v1/sessions/{sid}/recording")
        assert r.status_code == 409 and r.json()["error"]["code"] == "session.no_recording", r.text
        assert "could not be joined" in r.json()["error"]["message"] and "init.mp4" in r.text, r.text
    code, reason = _close_code(view["audio_ws"])  # the view's own socket URL and token
    assert code == 4410 and sid in reason, (code, reason)


def test_a_session_gone_for_good_still_gives_the_recording_of_what_it_streamed(service, speech_wav,
                                                                               astronaut_video):
    """A real session run in this process, journalled where the service keeps sessions, whose end is
    then taken back (its final view and recording removed): what a session whose actors died for good
    after streaming leaves. Its view tells what was rendered (what was published), and its recording
    is joined from the published segments on request, verified, once."""
    import uuid

    from cluster.config import get_settings
    from cluster.faces.avatar import prepare_avatar
    from cluster.live.journal import SessionJournal
    from cluster.live.session import LiveSession
    from cluster.models import crop_for_spec, load_model
    from tests.test_live import _pcm16

    sid = uuid.uuid4().hex[:16]
    s = get_settings()
    model, avatar = load_model("builtin", s), prepare_avatar(astronaut_video, s)
    out = service.storage_root / "sessions" / sid
    journal = SessionJournal(out)
    assert journal.take()
    session = LiveSession(sid, template_path=avatar.template_path, track_path=avatar.track_path, model="builtin",
                          model_size=model.size, crop=crop_for_spec("builtin", None, s), generate=model.generate,
                          sample_rate=16000, out_dir=out, settings=s, journal=journal)
    journal.save_meta({"avatar_id": avatar.id, "model": "builtin", "size": model.size, "crop": "aligned",
                       "sample_rate": 16000, "max_seconds": None, "created": time.time(),
                       "started_wall": time.time(), "fps": str(session.fps)})
    session.start()
    session.append(_pcm16(speech_wav)[:16000 * 2].tobytes())
    session.finish()
    assert session.join(60) and session.stats()["state"] == "ended"
    streamed = session.stats()["seconds_streamed"]
    for name in ("final.json", "recording.mp4"):
        (out / name).unlink()
    session.playlist.ended = False  # its playlist as a session killed mid-stream leaves it: no ENDLIST, the
    session.playlist.write()  # newest segment listed by its part
    journal.close()
    with _api(service) as api:
        view = api.get(f"/v1/sessions/{sid}").json()
        assert view["state"] == "failed" and view["error"]["code"] == "session.actor_lost", view
        # no restart used: not "died and was not restarted" (a whole service killed read so)
        assert "is gone: the service or its Ray stopped while the session ran" in view["error"]["message"], view
        # the speech it published, not the stream's length (its pauses are no speech: a failed session read more
        # rendered than received); its recording offered before it is joined, and its playlist ended (players
        # followed the playlist of a session gone for good for ever)
        assert view["seconds_streamed"] == streamed and streamed >= 1.9, view
        assert view["seconds_rendered"] == pytest.approx(2.0, abs=0.04), view
        assert view["seconds_rendered"] <= view["seconds_received"], view
        assert view["recording_url"] and view["recording_seconds"] == streamed and view["stalls"] == 0, view
        playlist = httpx.get(view["hls_url"], timeout=30).text
        assert playlist.rstrip().endswith("#EXT-X-ENDLIST") and "#EXT-X-PART:" not in playlist.splitlines()[-3], \
            playlist
        r = api.get(f"/v1/sessions/{sid}/recording")
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
        rec = service.storage_root / f"{sid}.mp4"
        rec.write_bytes(r.content)
        with av.open(str(rec)) as container:
            frames, samples = decoded_counts(container)
        assert frames == round(streamed * 25) and samples / 48000 == pytest.approx(streamed, abs=0.1)
        view = api.get(f"/v1/sessions/{sid}").json()  # made once: the view now offers it
        assert view["recording_bytes"] == len(r.content) and view["recording_url"], view
        assert api.get(f"/v1/sessions/{sid}/recording").content == r.content


def test_the_job_manager_killed_mid_session_keeps_the_session(service, live_avatar, speech_wav):
    """SIGKILL the job manager while speech streams in: the session (its own actor) keeps
    streaming and renders all its speech; once Ray has restarted the manager, a new session and a
    batch job are served again (last in this module: the manager is restarted here)."""
    import os
    import signal
    import threading

    from cluster.client import Client

    def manager_pids() -> list[int]:
        return service.actor_pids("ray::JobManager")

    with Client(service.url, token=service.token) as client:
        session = client.live(live_avatar)
        sender = threading.Thread(target=session.send_file, args=(speech_wav,), kwargs={"realtime": True})
        sender.start()
        time.sleep(1.0)
        pids = manager_pids()
        assert pids, "no job manager process of this service found"
        os.kill(pids[0], signal.SIGKILL)
        sender.join(60)
        assert not sender.is_alive()
        view = session.wait_rendered(timeout=120)
        assert view.state == "live"
        assert view.seconds_received == pytest.approx(3.2, abs=0.01), view
        assert view.seconds_rendered == pytest.approx(view.seconds_received, abs=1e-3), view
        final = session.close()
        assert final.state == "ended" and final.recording_seconds >= 3.2
        # the manager is back (a new process): sessions are created and speak again
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not manager_pids() or manager_pids() == pids):
            time.sleep(0.5)
        assert manager_pids() and manager_pids() != pids
        with client.live(live_avatar) as again:
            again.send_file(speech_wav)
            assert again.wait_rendered(timeout=120).seconds_rendered == pytest.approx(3.2, abs=0.04)


def test_admission_counts_the_running_sessions_measured_load(service, live_avatar, speech_wav):
    """The shared service's live share is tiny (conftest: LIPSYNC_LIVE_CPU_SHARE=0.02) and its
    memory reserve more than the node has: with no session running one is admitted; once it has
    measured its render load, a second is refused with 429 `session.capacity`, Retry-After, and a
    message naming the measured figures (load, and memory: the session's actor and standby against
    the node's available memory); when the first has ended a session is admitted again."""
    import re

    from cluster.client import Client
    from tests.conftest import LIVE_CPU_SHARE, LIVE_MEMORY_RESERVE_MB
    from tests.helpers import wait_until

    with Client(service.url, token=service.token) as client, _api(service) as api:
        with client.live(live_avatar) as first:
            first.send_file(speech_wav)  # as fast as it is taken: the stream renders speech, then idles
            load = wait_until(lambda: first.stats().render_load, 60, 0.2, "the session to measure its load")
            assert 0 < load < 5, load
            wait_until(lambda: first.stats().standby == "ready", 60, 0.2, "the session's standby to be ready")
            r = api.post("/v1/sessions", json={"avatar_id": live_avatar})
            assert r.status_code == 429 and r.headers["retry-after"], r.text
            error = r.json()["error"]
            assert error["code"] == "session.capacity", error
            message = error["message"]
            assert "1 live session(s) running" in message and "(1 measured)" in message, message
            assert f"LIPSYNC_LIVE_CPU_SHARE={float(LIVE_CPU_SHARE):g}" in message, message
            measured = float(re.search(r"take (\d+\.\d+) s of rendering per second of stream", message).group(1))
            estimate = float(re.search(r"a new one \(estimated (\d+\.\d+)\)", message).group(1))
            assert measured == estimate and measured > 0, message  # one measured session: the estimate is its load
            # ...and memory: the session's actor and its standby, measured, against what the node has available
            memory = re.search(r"its memory \(estimated (\d+) MiB with its standby\) would leave (-?\d+) MiB of the "
                               r"node's (\d+) MiB available, under LIPSYNC_LIVE_MEMORY_RESERVE_MB=(\d+)", message)
            assert memory, message
            estimated, left, available, reserve = (int(g) for g in memory.groups())
            # each MiB figure is rounded on its own
            assert abs(left - (available - estimated)) <= 1 and reserve == int(LIVE_MEMORY_RESERVE_MB), message
            # the estimate is the resident memory of the session's actor and of its standby, as the test sees them
            import psutil

            standby = json.loads((service.storage_root / "sessions" / first.id / "standby.json").read_text())["pid"]
            rss = sum(psutil.Process(pid).memory_info().rss for pid in (service.session_actor_pid(first.id), standby))
            assert estimated == pytest.approx(rss / (1 << 20), rel=0.25), (message, rss)
            print(f"\nadmission refused: {message}; the session's own view: render_load {load}")
        with client.live(live_avatar) as again:  # the first has ended: nothing runs, one is admitted
            assert again.stats().state == "live"


def test_a_batch_job_progresses_while_a_live_session_streams(service, live_avatar, speech_wav, astronaut_video,
                                                             tmp_path):
    """A batch job submitted while a live session speaks keeps progressing (its frames advance
    throughout, it finishes: the live lane and the session's own compositing take a bounded share,
    they do not starve jobs), and the session stays live: its playlist keeps advancing and all its
    speech is rendered."""
    import threading

    from cluster.client import Client
    from cluster.synth import speech_like, write_audio

    # the job's speech is six times the session's, so the job outlasts the session's 3.2 s of real-time
    # speech on any machine (a fast one rendered 3.2 s of job in 1.0 s: the stream had no time to advance)
    job_speech = write_audio(str(tmp_path / "job_speech.wav"), speech_like(19.2, seed=2))
    with Client(service.url, token=service.token) as client:
        with client.live(live_avatar) as session:
            watcher = PlaylistWatcher(session.hls_url)
            sender = threading.Thread(target=session.send_file, args=(speech_wav,), kwargs={"realtime": True})
            sender.start()
            job = client.submit(job_speech, astronaut_video)
            submitted = time.monotonic()
            progress: list[tuple[float, int]] = []  # (when, frames done) whenever it changed
            deadline = submitted + 180
            live = None  # the session's view once its speech is sent and rendered: taken while the job runs
            # (a job slowed by a loaded machine outlasted the session's idle timeout after its speech)
            while (view := client.get(job.id)).state.terminal is False:
                if not progress or view.frames_done != progress[-1][1]:
                    progress.append((time.monotonic(), view.frames_done))
                assert time.monotonic() < deadline, f"job {job.id} still {view.state.value} after 180 s: {progress}"
                if live is None and not sender.is_alive():
                    live = session.wait_rendered(timeout=60)
                time.sleep(0.2)
            finished = time.monotonic()
            if live is None:
                sender.join(60)
                live = session.wait_rendered(timeout=60)
            watcher.stop()
        assert view.state.value == "succeeded", view
        assert view.frames_done == view.frames_total > 0
        steps = [(round(t - submitted, 2), frames) for t, frames in progress]
        advances = [t for (t, a), (_, b) in zip(progress, progress[1:]) if b > a] + [finished]
        longest = max(b - a for a, b in zip([submitted, *advances], advances))
        print(f"\nbatch job beside a live session: {view.frames_total} frames in {finished - submitted:.1f} s, "
              f"longest time without progress {longest:.1f} s, frames done over time {steps}; the session: "
              f"{live.seconds_rendered} s rendered, longest playlist stall {watcher.longest_stall():.2f} s")
        assert len({frames for _, frames in progress if 0 < frames < view.frames_total}) >= 1, steps  # seen midway
        assert longest < 60, steps  # never starved (its chunks take a few seconds each here)
        assert live.state == "live" and live.seconds_received == pytest.approx(3.2, abs=0.01)
        assert live.seconds_rendered == pytest.approx(live.seconds_received, abs=1e-3), live
        assert watcher.longest_stall() < 6.0
        during = [t for t, _ in watcher.advances if submitted <= t <= finished]
        assert len(during) >= 2, (during, steps)  # the stream advanced while the job rendered
    assert session.view.state == "ended"


def test_the_sdk_reconnects_with_a_fresh_token_once_its_own_expired(service, live_avatar):
    """A session outliving its token (LIPSYNC_LIVE_TOKEN_TTL_S): the SDK's reconnect used the token
    it was given at creation and failed with 4401; it now takes a fresh one from the session's view
    once, and resumes. (The token in hand is spoiled here, as an expired one is refused.)"""
    from cluster.client import Client

    with Client(service.url, token=service.token) as client:
        with client.live(live_avatar) as session:
            session.send(b"\x00\x01" * 1600)  # opens the socket
            session._ws.close()  # the connection goes (a network change); the client's token has expired
            session._ws = None
            session.view = session.view.model_copy(update={"audio_ws": re.sub(r"token=[^&]+", "token=expired",
                                                                              session.view.audio_ws)})
            session.send(b"\x00\x01" * 1600)
            deadline = time.monotonic() + 30
            while session.stats().bytes_received < 6400:
                assert time.monotonic() < deadline, session.view
                time.sleep(0.2)
            assert session.view.bytes_received == 6400 and "token=expired" not in session.view.audio_ws
