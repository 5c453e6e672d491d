"""Progressive output: every job as HLS (fMP4) from its first verified chunk (cluster/hls.py).

In process (no Ray): the decoded HLS of a job equals its final mp4 (frames exact, audio the same
samples, no gap or overlap at any segment boundary); a re-rendered chunk packages to the same
bytes and a published file is never replaced. Over HTTP (the session's `lipsync serve`): a real
ffmpeg reads a running job's signed playlist without a header; the playlist grows while the job
renders and ends; segments never change; signatures are checked; SSE segment events only when
asked, so an SDK of today still reads every event as a job view.
"""
from __future__ import annotations

import io
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

FRAME_BYTES = 320 * 240 * 3 // 2  # yuv420p


def _ffmpeg() -> str:
    from cluster.config import Settings
    from cluster.media.ffmpeg import ffmpeg_binary

    return ffmpeg_binary(Settings())


def decode_video(src: str, *before: str) -> bytes:
    """Every frame as decoded (no frame rate conversion), yuv420p."""
    r = subprocess.run([_ffmpeg(), "-v", "error", *before, "-i", src, "-map", "0:v:0", "-fps_mode", "passthrough",
                        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return r.stdout


def decode_audio(path: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(samples of channel 0, [(pts, samples)] per decoded frame) with PyAV, no edit-list trimming."""
    import av

    out, frames = [], []
    with av.open(path) as c:
        for frame in c.decode(audio=0):
            frames.append((frame.pts, frame.samples))
            out.append(frame.to_ndarray()[0])
    return np.concatenate(out), frames


def hls_bytes(directory: Path, names: list[str]) -> bytes:
    return b"".join((directory / n).read_bytes() for n in ["init.mp4", *names])


@pytest.fixture(scope="module")
def local_job(tmp_path_factory, speech_wav, astronaut_video):
    """A 3.2 s job rendered in process with 1 s chunks (a 0.25 s first chunk), segments kept."""
    from cluster.config import Settings
    from cluster.render import admit, finalize_job, prepare_job, render_chunk
    from cluster.schemas import RenderRequest

    root = tmp_path_factory.mktemp("hls-local")
    s = Settings(storage_root=root / "store", chunk_seconds=1.0, keep_segments=True)
    from cluster.hls import HlsPublisher
    from cluster.models import load_model

    model = load_model("builtin", s)
    request = admit("hls-local", RenderRequest(audio=speech_wav, video=astronaut_video, output=str(root / "o.mp4")), s)
    plan = prepare_job("hls-local", request, s, model_size=model.size)
    publisher = HlsPublisher(plan, s).start()
    for chunk in reversed(plan.chunks):  # out of order: published only as a contiguous prefix
        render_chunk(plan, chunk, model.generate, s)
        publisher.chunk_done(chunk.index)
        if chunk.index > 0:
            time.sleep(0.3)
            assert not list((Path(plan.job_dir) / "hls").glob("*.m4s")), "published past a missing chunk"
    publisher.drain(120)
    publisher.close()
    info = finalize_job(plan, s)
    return {"plan": plan, "settings": s, "model": model, "output": info.path}


def test_a_rendered_jobs_stream_is_published_until_its_files_are_removed(local_job):
    """`stream_published` (an ended job's watch_url is given only where it holds) on a job rendered as the service
    renders it: true once its chunks are published, false once retention or a purge removed its files. (Its first
    version looked for a playlist on disk, which the service never writes: every ended job lost its watch_url.)"""
    import shutil

    from cluster.hls import stream_published
    from cluster.retention import remove_job_files
    from cluster.schemas import JobState, JobStatus

    plan = local_job["plan"]
    assert stream_published(plan.job_dir)
    copy = Path(plan.job_dir).parent / "hls-local-copy"
    shutil.copytree(plan.job_dir, copy)  # (the module's other tests read the job's own files)
    assert stream_published(copy)
    root = Path(plan.job_dir).parent.parent
    assert remove_job_files(JobStatus(id=copy.name, state=JobState.succeeded), root.resolve())
    assert not stream_published(copy)


def test_decoded_hls_equals_the_final_mp4(local_job, tmp_path):
    from cluster.hls import hls_dir, published_chunks

    plan = local_job["plan"]
    directory = hls_dir(plan.job_dir)
    markers = published_chunks(directory, len(plan.chunks))
    assert [m["chunk"] for m in markers] == [c.index for c in plan.chunks]
    names = [p["name"] for m in markers for p in m["parts"]]
    whole = tmp_path / "hls.mp4"  # init + every media segment: one fragmented mp4
    whole.write_bytes(hls_bytes(directory, names))
    hls_frames, mp4_frames = decode_video(str(whole)), decode_video(local_job["output"])
    assert len(hls_frames) == plan.frames_total * FRAME_BYTES
    assert hls_frames == mp4_frames  # the same packets, frame for frame
    # audio: the same samples once the encoder's priming (played explicitly, no edit list) is skipped
    hls_audio, hls_audio_frames = decode_audio(str(whole))
    mp4_audio, _ = decode_audio(local_job["output"])
    for (pts, n), (next_pts, _) in zip(hls_audio_frames, hls_audio_frames[1:]):
        assert next_pts == pts + n, "a gap or an overlap in the HLS audio"
    priming = 1024
    n = min(len(hls_audio) - priming, len(mp4_audio))
    assert abs((len(hls_audio) - priming) - len(mp4_audio)) <= 1024  # within one AAC frame
    assert np.abs(hls_audio[priming:priming + n] - mp4_audio[:n]).max() < 1e-6
    # each segment's audio starts where the previous one's ended, and with the video (timeline shift)
    import av

    with av.open(str(whole)) as c:
        v0 = next(p for p in c.demux(video=0) if p.size).pts * c.streams.video[0].time_base
    with av.open(str(whole)) as c:
        a0 = next(p for p in c.demux(audio=0) if p.size).pts * c.streams.audio[0].time_base
        rate = c.streams.audio[0].rate
    assert abs(float(v0 - a0) - priming / rate) < 1 / rate + 1e-6  # the first real sample with frame 0


def test_a_rerendered_chunk_publishes_the_same_bytes_and_first_write_wins(local_job, tmp_path):
    from cluster.hls import Timeline, gop_frames, hls_dir, package_chunk, plan_parts, published_chunks, write_once
    from cluster.media.aac import AacTrack
    from cluster.render import render_chunk

    plan, s = local_job["plan"], local_job["settings"]
    chunk = plan.chunks[1]
    published = {p["name"]: (hls_dir(plan.job_dir) / p["name"]).read_bytes()
                 for m in published_chunks(hls_dir(plan.job_dir), len(plan.chunks)) for p in m["parts"]
                 if m["chunk"] == chunk.index}
    again = plan.model_copy(update={"job_dir": str(tmp_path / "again")})  # a retry after a fault, elsewhere
    render_chunk(again, chunk, local_job["model"].generate, s)
    track = AacTrack(plan.audio_path, plan.audio_duration, s.audio_bitrate).encode()
    all_parts = plan_parts(plan.chunks, gop_frames(s, plan.fps))
    parts = [p for p in all_parts if p.chunk == chunk.index]
    _, segments = package_chunk(again, chunk, parts, all_parts.index(parts[0]), track,
                                Timeline.of(plan.fps, track.sample_rate, track.priming), plan.frames_total, 30)
    assert {part.name: data for part, data in segments} == published
    target = hls_dir(plan.job_dir) / parts[0].name
    assert write_once(target, b"a late retry") is False and target.read_bytes() == published[parts[0].name]


def test_a_publisher_that_starts_again_removes_what_a_killed_one_left_staged(local_job):
    """A job manager SIGKILLed while it staged a file (`stage_file`: `.init.avcc.<hex>.tmp`) leaves it
    behind; the resumed job's publisher removes it and keeps every published file."""
    from cluster.hls import HlsPublisher, hls_dir
    from tests.helpers import writer_killed_mid_write

    plan, s = local_job["plan"], local_job["settings"]
    d = hls_dir(plan.job_dir)
    published = {p.name: p.read_bytes() for p in d.iterdir()}
    stale = d / ".init.avcc.0123abcd.tmp"
    stale.write_bytes(b"half an avcC")
    killed_mid_save = writer_killed_mid_write(d / "audio.m4a")  # as the saved AAC's writer leaves it
    publisher = HlsPublisher(plan, s).start()
    publisher.close()
    assert not stale.exists() and not killed_mid_save.exists()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == published



def test_aac_packets_are_kept_in_a_file_and_read_back_by_time(speech_wav, tmp_path):
    """A job's AAC packets live in an unnamed file in the job's directory, not in the job
    manager's memory (an hour is ~70 MB): read back by time range they are the packets a saved
    and loaded track holds; closing the track removes the file."""
    import os

    from cluster.errors import EncodeError
    from cluster.media.aac import FRAME, AacTrack

    spill = tmp_path / "spill"
    spill.mkdir()

    def open_in_spill() -> list[str]:  # descriptors of this process on (unlinked) files there
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")]
        return [f for f in fds if f.startswith(str(spill))]

    track = AacTrack(speech_wav, 3.2, spill_dir=spill).encode()
    everything = track.between(None, None)
    assert track.done and len(everything) == track.packet_count > 40
    assert [pts for pts, _ in everything] == [-track.priming + k * FRAME for k in range(len(everything))]
    assert len(open_in_spill()) == 1 and not os.listdir(spill)  # unnamed: nothing to clean up after a crash
    lo, hi = 16000, 32000  # one second of 16 kHz audio
    assert track.between(lo, hi) == [(pts, d) for pts, d in everything if lo <= pts < hi]
    assert track.between(lo, hi, upto=20) == [(pts, d) for pts, d in everything[:20] if lo <= pts < hi]
    track.save(tmp_path / "a.m4a")
    loaded = AacTrack.load(tmp_path / "a.m4a", speech_wav, 3.2, "160k", spill_dir=spill)
    assert loaded.between(None, None) == everything and loaded.priming == track.priming
    track.close()
    loaded.close()
    assert open_in_spill() == []
    with pytest.raises(EncodeError):
        track.between(None, None)


def test_parts_cut_at_idr_frames_and_target_duration():
    from fractions import Fraction

    from cluster.hls import plan_parts, target_duration
    from cluster.plan import make_chunks

    chunks = make_chunks(25 * 150, Fraction(25), 60.0, 0.25)  # 150 s in 60 s chunks
    parts = plan_parts(chunks, 50)
    assert all(p.frames <= 50 for p in parts) and sum(p.frames for p in parts) == 25 * 150
    assert target_duration(parts, Fraction(25)) == 2
    assert [p.start for p in parts] == sorted(p.start for p in parts)


def test_playlist_maps_each_init_and_ends():
    from cluster.hls import render_playlist
    from cluster.schemas import HlsIndex, HlsSegment, JobState

    segs = [HlsSegment(index=i, name=f"0000{i}-000.m4s", start=i, duration=2.0, init=init)
            for i, init in enumerate(["init.mp4", "init.mp4", "init-00002.mp4", "init.mp4"])]
    text = render_playlist(HlsIndex(job_id="j", state=JobState.rendering, ended=False, target_duration=2,
                                    segments=segs), "?token=1.ab")
    lines = text.splitlines()
    assert lines[:6] == ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-TARGETDURATION:2", "#EXT-X-MEDIA-SEQUENCE:0",
                         "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS"]
    maps = [line for line in lines if line.startswith("#EXT-X-MAP")]
    assert maps == ['#EXT-X-MAP:URI="init.mp4?token=1.ab"', '#EXT-X-MAP:URI="init-00002.mp4?token=1.ab"',
                    '#EXT-X-MAP:URI="init.mp4?token=1.ab"']  # other SPS/PPS: their own init segment
    assert "00003-000.m4s?token=1.ab" in lines and "#EXT-X-ENDLIST" not in text
    ended = render_playlist(HlsIndex(job_id="j", state=JobState.failed, ended=True, target_duration=2,
                                     segments=segs[:1]))
    assert ended.rstrip().endswith("#EXT-X-ENDLIST") and ended.count("#EXTINF") == 1


def test_a_watch_url_lasts_its_ttl_and_at_most_twice_a_short_one():
    """The expiry was rounded up to the hour: a 60 s TTL (set for security) gave URLs valid for up to an
    hour. It is rounded to a step of the TTL or an hour, the shorter: the URL stays the same between polls."""
    from cluster.hls import watch_expiry

    for ttl in (60, 600, 3600, 86400):
        for now in (1_796_569_523.4, 1_796_572_799.9, 1_796_572_800.0):
            expires = watch_expiry(now, ttl)
            assert ttl <= expires - now <= ttl + min(ttl, 3600), (ttl, now, expires)
            assert watch_expiry(now + 0.5 * min(ttl, 3600) - 1, ttl) in (expires, expires + min(ttl, 3600))
    assert watch_expiry(1_796_569_523.4, 60) == watch_expiry(1_796_569_530.0, 60)  # the same URL between polls


def test_watch_signatures():
    from cluster.hls import check_watch, sign_watch, watch_key

    key = watch_key("secret")
    token = sign_watch(key, "job1", int(time.time()) + 60)
    assert check_watch(key, "job1", token)
    assert not check_watch(key, "job2", token)
    assert not check_watch(watch_key("other"), "job1", token)
    assert not check_watch(key, "job1", token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert not check_watch(key, "job1", sign_watch(key, "job1", int(time.time()) - 1))
    for odd in ("²." + token.partition(".")[2], "9" * 5000 + ".ab", token.partition(".")[0] + ".é" * 32, "", ".",
                token + "0", token.upper()):  # refused, never raised on
        assert not check_watch(key, "job1", odd)
    from cluster.callbacks import sign as sign_callback

    assert sign_callback(b"x", "secret") != sign_watch(key, "x", 0)  # not the callbacks' key


# --- over HTTP -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hls_media(service):
    from cluster.synth import astronaut_template, speech_like, write_audio

    root = service.input_root
    return {"video": astronaut_template(str(root / "hls-face.mp4"), seconds=1.0, fps=25, size=(320, 240)),
            "audio": write_audio(str(root / "hls-speech.wav"), speech_like(4.0, seed=5))}


def _playlist_state(text: str) -> tuple[int, bool]:
    return text.count("#EXTINF"), "#EXT-X-ENDLIST" in text


@pytest.mark.service
def test_ffmpeg_plays_a_running_job_from_its_signed_playlist(service, hls_media, tmp_path):
    from cluster.client import Client

    job_id = f"hls-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {service.token}"}
    with Client(service.url, token=service.token) as c:
        watch = c.submit(hls_media["audio"], hls_media["video"], id=job_id, model="latency:60").watch_url
    assert watch.startswith(f"{service.url}/v1/jobs/{job_id}/hls/index.m3u8?token=")
    live_video, live_audio = tmp_path / "live.yuv", tmp_path / "live.f32"
    anon = httpx.Client(timeout=30, trust_env=False)
    with httpx.Client(base_url=service.url, headers=headers, timeout=30, trust_env=False) as http:
        states, seen, ffmpeg = [], {}, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = http.get(f"/v1/jobs/{job_id}").json()
            r = anon.get(watch)  # no header: the signed URL
            assert r.status_code == 200 and r.headers["cache-control"] == "no-cache", r.text
            assert r.headers["referrer-policy"] == "no-referrer"
            count, ended = _playlist_state(r.text)
            if not states or states[-1][:2] != (count, ended):
                states.append((count, ended, view["frames_done"] / max(1, view["frames_total"])))
            if count and ffmpeg is None:  # a real ffmpeg plays the live playlist from its first segment
                ffmpeg = subprocess.Popen(
                    [_ffmpeg(), "-v", "error", "-allowed_extensions", "ALL", "-live_start_index", "0", "-i", watch,
                     "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "yuv420p",
                     str(live_video), "-map", "0:a:0", "-f", "f32le", "-ac", "1", str(live_audio)],
                    stderr=subprocess.PIPE)
            for line in r.text.splitlines():  # every listed segment, fetched as a player does
                if line and not line.startswith("#") and line.split("?")[0] not in seen:
                    seg = anon.get(watch.replace("index.m3u8?", line.split("?")[0] + "?"))
                    assert seg.status_code == 200 and "immutable" in seg.headers["cache-control"]
                    seen[line.split("?")[0]] = seg.content
            if ended:
                break
            time.sleep(0.15)
        assert ffmpeg is not None, states
        out, err = ffmpeg.communicate(timeout=120)
        assert ffmpeg.returncode == 0, err.decode()[-2000:]
        growing = [s for s in states if not s[1] and s[0] > 0]
        assert len(growing) >= 3, states  # >= 3 playlist states with growing segment counts before ENDLIST
        assert [s[0] for s in growing] == sorted({s[0] for s in growing}), states
        assert growing[0][2] < 0.5, states  # the first one while less than half the frames were done
        final = http.get(f"/v1/jobs/{job_id}").json()
        assert final["state"] == "succeeded" and states[-1][1]
        # every segment is byte-identical when fetched again; the init segment too
        for name, data in seen.items():
            assert http.get(f"/v1/jobs/{job_id}/hls/{name}").content == data, name
        init = http.get(f"/v1/jobs/{job_id}/hls/init.mp4")
        assert init.status_code == 200 and init.content[4:8] == b"ftyp"
        # what ffmpeg decoded live is the final mp4, frame for frame; its audio the same samples
        mp4 = tmp_path / "out.mp4"
        mp4.write_bytes(http.get(f"/v1/jobs/{job_id}/result").content)
        assert live_video.read_bytes() == decode_video(str(mp4))
        mp4_audio, _ = decode_audio(str(mp4))
        live = np.fromfile(live_audio, np.float32)
        assert abs(len(live) - 1024 - len(mp4_audio)) <= 1024
        n = min(len(live) - 1024, len(mp4_audio))
        assert np.abs(live[1024:1024 + n] - mp4_audio[:n]).max() < 1e-4
    anon.close()


@pytest.mark.service
def test_hls_signatures_errors_and_a_cancelled_job(service, hls_media):
    from cluster.hls import sign_watch, watch_key

    headers = {"Authorization": f"Bearer {service.token}"}
    job_id = f"hlsc-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=service.url, headers=headers, timeout=30, trust_env=False) as http, \
            httpx.Client(base_url=service.url, timeout=30, trust_env=False) as anon:
        r = http.post("/v1/jobs", json={"id": job_id, "audio": hls_media["audio"], "video": hls_media["video"],
                                        "model": "latency:200"})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 120
        while True:
            view = http.get(f"/v1/jobs/{job_id}").json()
            text = http.get(f"/v1/jobs/{job_id}/hls/index.m3u8").text  # the bearer token works too
            if "#EXTINF" in text:
                break
            assert time.monotonic() < deadline and view["state"] not in ("failed", "succeeded"), view
            time.sleep(0.1)
        assert "?token=" not in text  # asked with the header: URIs without a signature
        watch = view["watch_url"]
        path, _, token = watch.partition("?token=")
        assert anon.get(path).status_code == 401  # neither header nor signature
        altered = token[:-1] + ("0" if token[-1] != "0" else "1")
        for bad in (altered, sign_watch(watch_key(service.token), job_id, int(time.time()) - 5),
                    sign_watch(watch_key(service.token), "another-job", int(time.time()) + 600),
                    sign_watch(watch_key("not-the-token"), job_id, int(time.time()) + 600)):
            for url in (path, path.replace("index.m3u8", "init.mp4")):
                r = anon.get(url, params={"token": bad})
                assert r.status_code == 401 and r.json()["error"]["code"] == "auth.invalid_signature", r.text
        own = anon.get(watch, headers={"Origin": service.url})  # CORS: the service's own page only
        assert own.status_code == 200 and own.headers["access-control-allow-origin"] == service.url
        assert "access-control-allow-origin" not in anon.get(watch, headers={"Origin": "https://evil.example"}).headers
        for url in (watch, watch.replace("index.m3u8", "init.mp4")):  # HEAD (a player or CDN probing first)
            got, probe = anon.get(url), anon.head(url)
            assert probe.status_code == 200 and not probe.content, (url, probe.status_code)
            assert probe.headers["content-length"] == str(len(got.content))
            assert probe.headers["content-type"] == got.headers["content-type"]
        assert anon.head(path).status_code == 401  # the same access as GET
        assert http.get("/v1/jobs/no-such-job/hls/index.m3u8").status_code == 404
        unpublished = http.get(f"/v1/jobs/{job_id}/hls/99999-000.m4s")  # the job exists: not job.not_found
        assert unpublished.status_code == 404 and unpublished.json()["error"]["code"] == "hls.not_published"
        assert http.get(f"/v1/jobs/{job_id}/hls/..%2Fmel.npy").status_code == 404
        malformed = http.get(f"/v1/jobs/{job_id}/hls/9-0.m4s")  # none of a stream's names: not a missing route
        assert malformed.status_code == 404 and malformed.json()["error"]["code"] == "hls.not_published"
        unknown = http.get("/v1/jobs/no-such-job/hls/9-0.m4s")  # no such job: said first
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job.not_found", unknown.text
        # cancelled mid-run: the playlist ends (ENDLIST) after what was published, and stays so
        assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
        text = anon.get(watch).text
        count, ended = _playlist_state(text)
        assert ended and count >= 1
        time.sleep(1.0)
        assert anon.get(watch).text == text
    assert token not in service.tail(1 << 20)  # signed tokens never logged: not by the service,
    for ray_dir in service._ray_dirs:  # nor in Serve's access logs (routes, never query strings)
        for log_file in Path(ray_dir).rglob("*.log"):
            assert token not in log_file.read_text(errors="replace"), log_file


@pytest.mark.service
def test_sse_segments_only_when_asked_and_the_sdk(service, hls_media):
    from cluster.client import Client
    from cluster.schemas import HlsSegment, JobView

    job_id = f"hlss-{uuid.uuid4().hex[:8]}"
    headers = {"Authorization": f"Bearer {service.token}"}
    with Client(service.url, token=service.token) as c:
        job = c.submit(hls_media["audio"], hls_media["video"], id=job_id, model="latency:20")
        results: dict = {}

        def old_sdk() -> None:  # today's SDK: every data: line is a job view
            with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", headers=headers, timeout=120,
                              trust_env=False) as r:
                results["old"] = [JobView.model_validate_json(line[5:].strip())
                                  for line in r.iter_lines() if line.startswith("data:")]

        thread = threading.Thread(target=old_sdk)
        thread.start()
        segments = list(job.segments(timeout=120))
        thread.join(130)
        assert results["old"] and results["old"][-1].state.value == "succeeded"
        assert [s.index for s in segments] == list(range(len(segments))) and len(segments) >= 4
        assert all(isinstance(s, HlsSegment) and s.url.startswith(service.url) for s in segments)
        assert httpx.get(segments[0].url, trust_env=False).status_code == 200  # signed: no header needed
        # its init segment too (a bare name was all a client had: fetching it failed), and the two decode
        init = httpx.get(segments[0].init_url, trust_env=False)
        assert init.status_code == 200 and segments[0].init_url.startswith(service.url)
        with av.open(io.BytesIO(init.content + c.fetch(segments[0]))) as container:
            assert sum(1 for _ in container.decode(video=0)) > 0
        assert job.watch_url.startswith(service.url + f"/v1/jobs/{job_id}/hls/index.m3u8?token=")
        with httpx.stream("GET", f"{service.url}/v1/jobs/{job_id}/events", params={"segments": 1},
                          headers=headers, timeout=60, trust_env=False) as r:
            kinds = [line.split(":", 1)[1].strip() for line in r.iter_lines() if line.startswith("event:")]
        assert kinds.count("segment") == len(segments) and kinds[-1] == "status"
        assert json.loads(httpx.get(f"{service.url}/v1/jobs/{job_id}", headers=headers,
                                    trust_env=False).text)["watch_url"]


@pytest.mark.service
def test_cli_submit_watch_prints_the_url_once_a_segment_exists(service, hls_media):
    import os
    import sys

    env = {**os.environ, "LIPSYNC_URL": service.url, "LIPSYNC_API_TOKEN": service.token}
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "submit", hls_media["audio"], hls_media["video"],
                        "--model", "latency:20", "--watch"], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    url = r.stdout.strip()
    assert url.startswith(service.url + "/v1/jobs/") and "/hls/index.m3u8?token=" in url, r.stdout
    playlist = httpx.get(url, trust_env=False)  # no header: the signed URL
    assert playlist.status_code == 200 and "#EXTINF" in playlist.text


@pytest.mark.parametrize("layout", ["hot float", "5.1", "hot 5.1", "offset"])
def test_the_jobs_audio_stays_within_full_scale(tmp_path, speech_wav, layout):
    """A float file 12 dB beyond full scale, and a 5.1 file whose six channels swresample summed into stereo at
    +6 dB, made AAC that clipped on every player (a probe: peaks 3.3 and 2.05; 1.23 for a hot 5.1 file once its
    waves were bent under 0.9); so did a file with a DC offset (peak 0.96, its AAC 1.29 at the offset's step).
    `OutputLevel`: a gain under LIMIT_PEAK from the first sample beyond full scale on; the offset taken off where the
    plan found one; a usual file passes bit for bit."""
    import av

    from cluster.audio import load_audio
    from cluster.media.aac import LIMIT_PEAK, AacTrack, OutputLevel
    from cluster.media.ffmpeg import ffmpeg_binary
    from cluster.synth import write_audio

    longer = write_audio(str(tmp_path / "longer.wav"), np.tile(load_audio(speech_wav), 4))  # 12.8 s (a review)
    source = str(tmp_path / "source.wav")
    six = "pan=5.1|c0=c0|c1=c0|c2=c0|c3=c0|c4=c0|c5=c0"
    args = {"hot float": ["-af", "volume=12dB", "-c:a", "pcm_f32le"],
            "5.1": ["-af", f"volume=-1dB,{six}", "-c:a", "pcm_s16le"],
            "hot 5.1": ["-af", f"volume=12dB,{six}", "-c:a", "pcm_f32le"],
            "offset": ["-af", "volume=0.3,aeval=val(0)*1+0.7", "-c:a", "pcm_s16le"]}[layout]
    subprocess.run([ffmpeg_binary(), "-v", "error", "-y", "-i", longer, *args, source], check=True, timeout=60)
    track = AacTrack(source, 12.8, dc_block=layout == "offset").encode()
    track.save(tmp_path / "a.m4a")
    track.close()
    with av.open(str(tmp_path / "a.m4a")) as c:
        peak = max(float(np.abs(f.to_ndarray()).max()) for f in c.decode(audio=0))
    assert peak < 1.0, peak  # (AAC's own overshoot included)

    def frame(values):
        out = av.AudioFrame.from_ndarray(np.array([values] * 2, np.float32), format="fltp", layout="stereo")
        out.sample_rate = 48000
        return out

    level = OutputLevel(48000)
    within = frame([0.5, 0.99, -1.0])
    assert level(within, "stereo") is within  # a usual file: untouched
    limited = level(frame([0.5, 0.95, 3.0, -7.0]), "stereo").to_ndarray()[0]
    assert np.abs(limited).max() <= LIMIT_PEAK + 1e-6 and level.engaged
    assert level(frame([0.9]), "stereo").to_ndarray()[0][0] < 0.9  # the gain comes back over LIMIT_RELEASE_S
