"""The web page (`GET /`) in a real browser: Debian's chromium driven by Playwright against the
session's real `lipsync serve` (token on). One test: the page asks for the token, uploads two files
for a job on a slowed model (the page's Model option set to `latency:<ms>`, so that playing before
`succeeded` is no race on 2 cores), plays the job's stream while it renders, then downloads the mp4
through its button.

Needs `/usr/bin/chromium` (`apt-get install -y chromium`; `.ci/run` installs it) and the `playwright`
package (the `dev` extra); it skips, saying which is missing, without them. Playwright launches the
system chromium (`executable_path`, `--no-sandbox` when run as root): no browser download.
The screenshot is left under `test-artifacts/` (or `$LIPSYNC_TEST_ARTIFACTS`).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from tests.helpers import hold_event_stream, wait_until

MS_PER_FRAME = 60          # the slowed model: 150 frames (6 s) take >= 9 s of model time
AUDIO_SECONDS = 6.0
FPS = 25
ARTIFACTS = Path(os.environ.get("LIPSYNC_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """The system chromium, for Playwright (skips when it or playwright is absent). Session-scoped and
    first in the test's arguments, so a skip comes before the session's service is started for it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e '.[dev]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def fake_microphone(tmp_path_factory) -> str:
    """The speech chromium's fake microphone plays (in a loop) to the Live tab."""
    from cluster.synth import speech_like, write_audio

    return write_audio(str(tmp_path_factory.mktemp("mic") / "speech.wav"), speech_like(4.0, seed=11))


@pytest.fixture(scope="module")
def browser(chromium_executable, fake_microphone):
    """Debian's chromium under Playwright: the system binary, no browser download. Its microphone is
    the fake device playing `fake_microphone`, granted without asking."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={fake_microphone}"]
        chromium = p.chromium.launch(executable_path=chromium_executable, args=args)
        yield chromium
        chromium.close()


def mse_codec_string(mp4: bytes) -> str:
    """The `codecs` of an mp4 (or fMP4 init segment) as MSE names them, e.g. `avc1.64000d, mp4a.40.2`:
    profile, constraints and level from the avcC record, the AAC object type from its
    AudioSpecificConfig (the top 5 bits)."""
    import av

    with av.open(io.BytesIO(mp4)) as container:
        video = container.streams.video[0].codec_context
        audio = container.streams.audio[0].codec_context
        avcc, asc = video.extradata, audio.extradata
        assert video.name == "h264" and avcc and avcc[0] == 1, (video.name, avcc)
        assert audio.name == "aac" and asc, (audio.name, asc)
        return f"avc1.{avcc[1]:02x}{avcc[2]:02x}{avcc[3]:02x}, mp4a.40.{asc[0] >> 3}"


def init_segment(http: httpx.Client, watch_url: str) -> bytes:
    """The fMP4 init segment named by the playlist's first `#EXT-X-MAP` (what hls.js hands to MSE),
    once the playlist lists a segment."""
    def mapped():
        playlist = http.get(watch_url)
        assert playlist.status_code == 200, playlist.text
        found = re.search(r'#EXT-X-MAP:URI="([^"]+)"', playlist.text)
        return found and urljoin(str(playlist.url), found.group(1))

    init = http.get(wait_until(mapped, 60, 0.2, "the first segment in the job's playlist"))
    assert init.status_code == 200
    return init.content


def wait_for_routes(page, held: list, what: str, timeout: float = 30) -> None:
    """Wait for `page.route` handlers to have put a request in `held`. Playwright's sync API calls its
    handlers only while the test is inside one of its calls: a plain `wait_until(lambda: held)` sleeps
    without letting them run, and passed only when the request came during the call before (a loaded CI
    machine: "timed out waiting for the page's upload" while the upload had been sent)."""
    wait_until(lambda: held or page.wait_for_timeout(50), timeout, 0.0, what)


FAKE_AVATAR = "0123456789abcdef"


def open_live_tab(page, service) -> None:
    """Sign in and show the Live tab once its avatar list holds the fake avatar (`fake_avatar`, routed first)."""
    sign_in(page, service)
    page.click("[data-tab=live]")
    page.locator(f"#live-avatar option[value='{FAKE_AVATAR}']").wait_for(state="attached", timeout=10_000)


def fake_avatar(page) -> None:
    """The page's avatar lists (read with a token) answer one avatar that the service does not hold: the Live
    tab's Speak can start without preparing one (no session is made on it: tests that use it answer or hold
    POST /v1/sessions, or have it refused before the avatar is looked up)."""
    import json

    from cluster.schemas import AvatarView

    body = json.dumps([AvatarView(id=FAKE_AVATAR, name="face.mp4", frames=50, width=320, height=240, fps=25.0,
                                  duration=2.0).model_dump(mode="json")])
    page.route("**/v1/avatars", lambda route: route.fulfill(status=200, content_type="application/json", body=body)
               if "authorization" in route.request.headers and route.request.method == "GET" else route.continue_())


def sign_in(page, service) -> None:
    """Open the page: it is public, the API is not, so it asks for the token once."""
    page.goto(service.url + "/")
    page.locator("#token-form").wait_for(state="visible", timeout=15_000)
    page.fill("#token-input", service.token)
    page.click("#token-form button[type=submit]")
    page.locator("#token-form").wait_for(state="hidden", timeout=5_000)


def answer_job_list(route, jobs: list, next_before: str | None = None) -> None:
    """Answer one of the page's reads of the jobs list (a Playwright route) with `jobs` (JobViews, or their JSON),
    as the API would."""
    from cluster.schemas import JobPage

    route.fulfill(status=200, content_type="application/json",
                  body=JobPage(jobs=jobs, next_before=next_before).model_dump_json())


def open_jobs_tab(browser, service, answer, **page_options):
    """A new page, signed in, on its Jobs tab, whose reads of the jobs list `answer` answers (a route handler)."""
    page = browser.new_page(**page_options)
    page.route("**/v1/jobs?*", answer)
    sign_in(page, service)
    page.click("[data-tab=jobs]")
    return page


@pytest.mark.service
@pytest.mark.slow
def test_page_plays_a_job_while_it_renders_and_downloads_it(chromium_executable, service, browser, tmp_path):
    from cluster.media.probe import count_video_frames, read_media_info
    from cluster.synth import astronaut_template, speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(AUDIO_SECONDS, seed=5))
    video = astronaut_template(str(tmp_path / "person.mp4"), seconds=2.0, fps=FPS, size=(320, 240))
    frames = round(AUDIO_SECONDS * FPS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"},
                       timeout=30)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        # the page is public; the API is not: the page asks for the token once
        sign_in(page, service)

        # a refused upload shows the API's message, not its JSON
        page.set_input_files("#audio", audio)
        page.set_input_files("#video", audio)
        page.click("#submit-button")
        error = page.locator("#submit-error")
        error.wait_for(state="visible", timeout=30_000)
        assert "no video stream" in error.inner_text() and "{" not in error.inner_text(), error.inner_text()

        # two files through the page's form
        page.set_input_files("#video", video)
        page.select_option("#sync-mode", "pingpong")
        page.click("details.more summary")
        page.fill("#model", f"latency:{MS_PER_FRAME}")
        page.click("#submit-button")
        page.locator("#job-card").wait_for(state="visible", timeout=60_000)
        job_id = page.inner_text("#job-id").strip()

        # the stream: Chromium's Media Source Extensions take what the server makes (a failure, not a skip)
        watch_url = wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json().get("watch_url"), 30, 0.2,
                               "the job's watch_url")
        codecs = mse_codec_string(init_segment(api, watch_url))
        assert page.evaluate(f"MediaSource.isTypeSupported('video/mp4; codecs=\"{codecs}\"')"), codecs

        # the <video> plays while the job renders: currentTime advances, then the API still says rendering
        playing: list[tuple[float, str]] = []
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            position = page.evaluate("document.getElementById('player').currentTime")
            state = api.get(f"/v1/jobs/{job_id}").json()["state"]  # read after the position
            playing.append((position, state))
            if state == "succeeded" or position >= 1.0:
                break
            time.sleep(0.1)
        before = [(pos, st) for pos, st in playing if st != "succeeded"]
        assert before and before[-1][0] >= 1.0, f"the video did not play 1 s before the job succeeded: {playing}"
        page.screenshot(path=str(ARTIFACTS / "web-page-playing.png"), full_page=True)

        # once succeeded: the page says so and its download button hands over the mp4
        page.locator("#job-state.s-succeeded").wait_for(timeout=60_000)
        assert "320x240 at 25 fps" in page.inner_text("#job-detail")  # what the file holds
        with page.expect_download(timeout=30_000) as download:
            page.click("#download-button")
        out = tmp_path / "downloaded.mp4"
        download.value.save_as(out)
        assert download.value.suggested_filename == f"{job_id}.mp4"
        view = api.get(f"/v1/jobs/{job_id}").json()
        assert view["frames_total"] == frames and out.stat().st_size == view["output"]["size"]
        info = read_media_info(str(out))
        assert info.video.codec == "h264" and (info.video.width, info.video.height) == (320, 240)
        assert info.audio.codec == "aac" and abs(info.audio.duration - AUDIO_SECONDS) < 0.1, info.audio
        assert count_video_frames(str(out)) == frames
        assert mse_codec_string(out.read_bytes()) == codecs  # the stream and the file hold the same packets
        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

        # a job whose input is an upload's ref: a long unbroken name in the list (it widened a phone's page)
        refs = [api.post("/v1/uploads", files={"file": (Path(p).name, open(p, "rb"))}).json()["ref"]
                for p in (audio, video)]
        assert api.post("/v1/jobs", json={"audio": refs[0], "video": refs[1]}).status_code == 202
        # the jobs list shows it with its state, on the first page (newest first) unless many jobs came
        # after it, then behind "Older jobs"; nothing is wider than a phone
        page.click("[data-tab=jobs]")
        row = page.locator(".job-row", has_text=job_id)
        deadline = time.monotonic() + 30
        while not row.count():
            assert time.monotonic() < deadline, f"job {job_id} is not in the page's jobs list"
            more = page.locator("#jobs-more")
            if more.is_visible():
                more.click()
            time.sleep(0.3)
        row.locator(".s-succeeded").wait_for(timeout=10_000)
        assert "320x240 at 25 fps" in row.inner_text()
        page.set_viewport_size({"width": 360, "height": 740})
        for tab in ("jobs", "render", "avatars"):
            page.click(f"[data-tab={tab}]")
            width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert width[0] <= width[1], (tab, width)
        assert problems == []
    finally:
        page.close()
        api.close()


@pytest.mark.service
def test_the_jobs_list_follows_its_unfinished_jobs_on_the_older_pages_too(chromium_executable, service, browser):
    """Once "Older jobs" had added a page below the first, the list was never read again: a job on it read
    "rendering" long after it succeeded (H18, 1 of 1). The list's reads are Playwright's answers here (the
    page's own code, the service's real page): the first page, an older one with a rendering job, then that
    job succeeded."""
    from cluster.schemas import JobView, utcnow

    def view(job_id: str, state: str) -> dict:
        done = state == "succeeded"
        return JobView(id=job_id, state=state, stage="done" if done else "render", progress=1.0 if done else 0.5,
                       frames_done=100 if done else 50, frames_total=100, created_at=utcnow(),
                       updated_at=utcnow()).model_dump(mode="json")

    ended = []

    def answer(route):
        if "before=" in route.request.url:
            answer_job_list(route, [view("older-job", "rendering")])
        elif ended:
            answer_job_list(route, [view("newer-job", "succeeded"), view("older-job", "succeeded")])
        else:
            answer_job_list(route, [view("newer-job", "succeeded")], next_before="newer-job")

    page = open_jobs_tab(browser, service, answer, viewport={"width": 1000, "height": 1100})
    try:
        page.locator("#jobs-more").click()
        older = page.locator(".job-row", has_text="older-job")
        older.locator(".s-rendering").wait_for(timeout=10_000)
        ended.append(True)  # it succeeds: the list, older page included, reads it so within its 2 s
        older.locator(".s-succeeded").wait_for(timeout=10_000)
    finally:
        page.close()


@pytest.mark.service
def test_the_jobs_list_says_which_jobs_wait_for_a_worker_and_which_videos_were_removed(chromium_executable, service,
                                                                                      browser):
    """A job waiting for its first compositor read "render · 0 %", and a job whose files were removed read as any
    success: the rows say "waiting for a worker · N jobs ahead" and "video removed" (the list's read is answered
    by Playwright here, the page's own code running)."""
    from cluster.schemas import JobView, utcnow

    waiting = JobView(id="waiting-job", state="rendering", stage="waiting", jobs_ahead=3, progress=0.0, frames_done=0,
                      frames_total=100, created_at=utcnow(), updated_at=utcnow())
    removed = JobView(id="removed-job", state="succeeded", stage="done", progress=1.0, frames_done=100,
                      frames_total=100, created_at=utcnow(), updated_at=utcnow(), expired=True)
    page = open_jobs_tab(browser, service, lambda route: answer_job_list(route, [waiting, removed]),
                         viewport={"width": 1000, "height": 1100})
    try:
        row = page.locator(".job-row", has_text="waiting-job")
        row.wait_for(timeout=10_000)
        assert "waiting for a worker · 3 jobs ahead" in row.inner_text() and "0 %" not in row.inner_text()
        assert "video removed" in page.locator(".job-row", has_text="removed-job").inner_text()
    finally:
        page.close()


@pytest.mark.service
def test_a_reload_comes_back_on_the_tab_it_left(chromium_executable, service, browser):
    """An operator watching the Jobs tab reloaded the page and was back on Render (H18)."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        sign_in(page, service)
        page.click("[data-tab=jobs]")
        page.reload()
        page.locator("[data-panel=jobs]").wait_for(state="visible", timeout=10_000)
        assert page.locator("[data-panel=render]").is_hidden()
        assert page.get_attribute("[data-tab=jobs]", "aria-selected") == "true"
        page.locator("#jobs-list li").first.wait_for(timeout=10_000)  # its list read, as a click reads it
    finally:
        page.close()


@pytest.mark.service
def test_page_follows_a_job_by_polling_while_the_servers_event_streams_are_all_taken(
        chromium_executable, service, browser, tmp_path):
    """The session service keeps 4 job event streams at most (conftest): with 4 held open, the page
    is refused its stream (429) and follows its job by polling, saying so, to the job's end."""
    import contextlib

    from cluster.synth import astronaut_template, speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(2.0, seed=7))
    video = astronaut_template(str(tmp_path / "person.mp4"), seconds=1.0, fps=FPS, size=(320, 240))
    long_audio = write_audio(str(service.input_root / "speech-page-busy.wav"), speech_like(120.0, seed=8))
    face = astronaut_template(str(service.input_root / "face-page-busy.mp4"), seconds=1.0, fps=FPS, size=(320, 240))
    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=30)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    busy_job = api.post("/v1/jobs", json={"audio": long_audio, "video": face}).json()["id"]
    try:
        with contextlib.ExitStack() as held:
            for _ in range(4):  # every stream of the service taken
                hold_event_stream(api, busy_job, held)
            sign_in(page, service)
            page.set_input_files("#audio", audio)
            page.set_input_files("#video", video)
            page.click("#submit-button")
            page.locator("#job-card").wait_for(state="visible", timeout=60_000)
            wait_until(lambda: "polled" in page.inner_text("#job-detail"), timeout=30, what="the page saying it polls")
            page.locator("#job-state.s-succeeded").wait_for(timeout=120_000)
            assert api.get(f"/v1/jobs/{busy_job}").json()["state"] not in ("succeeded", "failed", "cancelled")
    finally:
        api.delete(f"/v1/jobs/{busy_job}")
        page.close()
        api.close()


@pytest.mark.service
def test_an_upload_that_stalls_is_given_up_with_a_message(chromium_executable, service, browser, tmp_path):
    """The page's upload (XMLHttpRequest, for its progress) has deadlines like every other call: one
    that sends nothing for 60 s is given up, with the reason on the page, and the form is usable again
    (then 600 s for the answer once the last byte is sent, the SDK's bound). Playwright holds the request
    (the browser hands it the body: no byte reaches a server), and the page's clock is Playwright's."""
    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(1.0, seed=9))
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    held = []
    try:
        page.clock.install()
        sign_in(page, service)
        page.route("**/v1/jobs", lambda route: held.append(route) if route.request.method == "POST"
                   else route.continue_())
        page.set_input_files("#audio", audio)
        page.set_input_files("#video", audio)
        page.click("#submit-button")
        wait_for_routes(page, held, "the page's upload")
        page.clock.run_for(55_000)
        assert page.locator("#submit-error").is_hidden(), page.inner_text("#submit-error")
        assert page.locator("#submit-button").is_disabled()
        page.clock.run_for(6_000)
        error = page.locator("#submit-error")
        error.wait_for(state="visible", timeout=10_000)
        assert "The upload made no progress for 60 s" in error.inner_text(), error.inner_text()
        assert page.locator("#submit-button").is_enabled()
    finally:
        for route in held:
            route.abort()
        page.close()


@pytest.mark.service
@pytest.mark.slow
def test_a_late_401_of_a_call_sent_before_the_token_keeps_the_token_typed_since(chromium_executable, service,
                                                                                 browser):
    """On a loaded machine a call the page made before its token was typed (its first list of jobs) answered
    401 after the token was typed: that 401 wiped the new token ("The server did not accept this token"), and
    the next call went without one (CI: the Live tab's Speak answered auth.invalid_token). A 401 now speaks
    only of the token its own call carried."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    held, avatars = [], []
    try:
        page.route("**/v1/jobs?*", lambda route: held.append(route) if not held else route.continue_())
        # the avatars' first call is held too until the jobs' is: its 401, answered first, would keep the jobs'
        # from being sent (the page sends no call it knows the service refuses without a token)
        page.route("**/v1/avatars", lambda route: avatars.append(route) if not avatars else route.continue_())
        # on the Jobs tab (remembered from before), the page lists jobs as it loads, as it reads the avatars
        page.add_init_script("sessionStorage.setItem('lipsync.tab', 'jobs')")
        page.goto(service.url + "/")
        wait_for_routes(page, held, "the page's first list of jobs (sent without a token)")
        wait_for_routes(page, avatars, "the page's first list of avatars (sent without a token)")
        avatars.pop().continue_()
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)  # (the avatars' 401)
        page.fill("#token-input", service.token)
        page.click("#token-form button[type=submit]")
        page.locator("#token-form").wait_for(state="hidden", timeout=5_000)
        with page.expect_response(lambda r: "/v1/jobs?" in r.url and r.status == 401, timeout=30_000):
            held.pop().continue_()  # its 401 arrives now, after the token
        page.wait_for_timeout(500)
        assert page.evaluate("sessionStorage.getItem('lipsync.token')") == service.token
        assert page.locator("#token-form").is_hidden() and page.locator("#token-error").is_hidden()
        assert page.evaluate("window.lipsync.apiJson('/v1/avatars').then(() => 'ok', (e) => e.code)") == "ok"
    finally:
        for route in held + avatars:
            route.abort()
        page.close()


@pytest.mark.service
@pytest.mark.slow
def test_live_tab_microphone_drives_the_avatar_stream(chromium_executable, service, live_avatar, browser, tmp_path):
    """The Live tab in the real chromium, its microphone the fake device playing speech: a socket the
    server refuses shows its close code and reason; Speak streams the microphone's PCM to a session
    whose live HLS plays in the page's <video>; Stop ends the speech; End session ends the session,
    and its recording (downloaded through the page) holds the microphone's speech and the video."""
    import numpy as np

    from cluster.media.probe import read_media_info

    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=30)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    sessions: list[str] = []
    player = "(() => { const v = document.getElementById('live-player'); " \
             "return [v.currentTime, v.videoWidth, v.readyState]; })()"
    try:
        page.goto(service.url + "/")
        # the token typed on the Live tab: its avatar list, left empty by the 401 before, is read again
        # (it stayed empty, and Speak said "Prepare an avatar first")
        page.click("[data-tab=live]")
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.fill("#token-input", service.token)
        page.press("#token-input", "Enter")
        page.locator(f"#live-avatar option[value='{live_avatar}']").wait_for(state="attached", timeout=15_000)
        page.select_option("#live-avatar", live_avatar)

        # an RTMP URL the address guard refuses (this service allows no loopback): the API's message
        page.click("[data-panel=live] details.more summary")
        page.fill("#live-rtmp", "rtmp://127.0.0.1:1935/live/key")
        page.click("#live-speak")
        error = page.locator("#live-error")
        error.wait_for(state="visible", timeout=30_000)
        assert "RTMP server: " in error.inner_text() and "non-public" in error.inner_text(), error.inner_text()
        assert not page.is_visible("#live-note")  # not "Starting a live session…" above why it did not start
        page.fill("#live-rtmp", "")

        # a socket the server refuses shows its code and reason (the session's token spoiled on its way to
        # the page, so the server really answers 4401)
        def spoil_token(route):
            response = route.fetch()
            body = response.json()
            body["audio_ws"] = re.sub(r"token=[^&]+", "token=spoiled", body["audio_ws"])
            route.fulfill(response=response, json=body)

        page.route("**/v1/sessions", spoil_token)
        page.click("#live-speak")
        page.locator("#live-error", has_text="4401").wait_for(timeout=60_000)
        assert "4401" in error.inner_text() and "token" in error.inner_text(), error.inner_text()
        sid = page.inner_text("#live-id").strip()
        sessions.append(sid)
        page.unroute("**/v1/sessions")
        assert page.is_enabled("#live-speak") and not page.is_enabled("#live-stop")

        # Speak again: the same session, a fresh token; the microphone drives it and its stream plays
        page.click("#live-speak")
        page.locator("#live-stop:not([disabled])").wait_for(timeout=30_000)
        assert page.inner_text("#live-id").strip() == sid
        assert page.is_hidden("#live-error"), page.inner_text("#live-error")
        start = wait_until(lambda: (lambda p: p if p[2] >= 2 else None)(page.evaluate(player)), 60, 0.2,
                           "the live <video> to have data")
        played = wait_until(lambda: (lambda p: p if p[0] >= start[0] + 1.0 else None)(page.evaluate(player)), 30,
                            0.2, "the live <video> to play 1 s")
        assert played[1] == 320, played  # the avatar's frames (videoWidth)
        view = wait_until(lambda: (lambda v: v if v["seconds_rendered"] > 0.5 else None)(
            api.get(f"/v1/sessions/{sid}").json()), 30, 0.2, "the session to render the microphone's speech")
        assert view["state"] == "live" and view["seconds_received"] > 0.5
        assert view["sample_rate"] in (16000, 24000, 48000)
        # the page asks for 0.25-s segments (closer to live): the playlist's segments are that short
        assert view["segment_seconds"] == 0.25, view
        playlist = api.get(view["hls_url"]).text  # signed: the session token in the query
        durations = [float(line.split(":")[1].rstrip(",")) for line in playlist.splitlines()
                     if line.startswith("#EXTINF:")]
        assert durations and max(durations) <= 0.25, playlist
        wait_until(lambda: float(page.inner_text("#live-received").split()[0]) > 0.5, 10, 0.2,
                   "the page to show the speech received")  # (wait_for_function's eval is refused by the CSP)
        page.screenshot(path=str(ARTIFACTS / "web-page-live.png"), full_page=True)

        # Stop: {"type": "end"} ends the speech; the session stays (the avatar idles), receiving nothing more
        page.click("#live-stop")
        page.locator("#live-speak:not([disabled])").wait_for(timeout=10_000)
        page.locator("#live-note", has_text="Speech ended").wait_for(timeout=120_000)  # the server's "ended"
        received = api.get(f"/v1/sessions/{sid}").json()["seconds_received"]
        time.sleep(1.0)
        after = api.get(f"/v1/sessions/{sid}").json()
        assert after["state"] == "live" and after["seconds_received"] == received, (received, after)
        # leaving the page (a reload, a closed tab) would end the session: the browser asks first; declined,
        # the page and its session stay
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        asked = []
        page.once("dialog", lambda dialog: (asked.append(dialog.type), dialog.dismiss()))
        with pytest.raises(PlaywrightTimeout):  # declined: the reload never happens
            page.reload(timeout=3000)
        assert asked == ["beforeunload"] and page.is_enabled("#live-end"), asked
        assert api.get(f"/v1/sessions/{sid}").json()["state"] == "live"

        # End session at once: the speech it still holds is said first (the page used DELETE, which drops
        # it: 2.7 s of 9 were never rendered), and the page closes its socket itself (the server's 4410
        # close read as a refusal); then its recording through the page
        page.click("#live-end")
        page.locator("#live-recording").wait_for(state="visible", timeout=120_000)
        ended = page.inner_text("#live-note")  # what is left to do, not "Speak again, or End session"
        assert ended.startswith("The session has ended: what it heard was said.") and "End session" not in ended, ended
        final = api.get(f"/v1/sessions/{sid}").json()
        assert final["seconds_rendered"] == pytest.approx(final["seconds_received"], abs=1e-3), final
        assert final["seconds_received"] == received and page.is_hidden("#live-error"), page.inner_text("#live-error")
        with page.expect_download(timeout=30_000) as download:
            page.click("#live-recording")
        out = tmp_path / "live.mp4"
        download.value.save_as(out)
        info = read_media_info(str(out))
        assert info.video.codec == "h264" and (info.video.width, info.video.height) == (320, 240)
        assert info.audio.codec == "aac" and info.audio.duration >= received
        import av

        with av.open(str(out)) as container:
            pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        window = info.audio.sample_rate // 2
        loudest = max(np.sqrt(np.mean(pcm[i:i + window].astype(np.float64) ** 2)) for i in range(0, len(pcm), window))
        assert loudest > 0.02, f"the recording's audio is silent (loudest 0.5 s RMS {loudest:.4f})"

        # nothing wider than a phone
        page.set_viewport_size({"width": 360, "height": 740})
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], width
        assert problems == []
    finally:
        page.close()
        for sid in sessions:
            api.delete(f"/v1/sessions/{sid}")
        api.close()


@pytest.mark.service
def test_a_wrong_token_is_said_to_be_wrong_and_stays_in_the_field_to_be_corrected(chromium_executable, service,
                                                                                  browser, tmp_path):
    """A wrong token was reported as a missing one ("This service needs its API token: type it above"), and the
    field was emptied: the page dropped the stored token before wording the 401. Typed wrong, or gone bad
    later (here: a job's upload), it reads "did not accept this token", and the field holds it to correct."""
    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(1.0, seed=3))
    page = browser.new_page(viewport={"width": 1000, "height": 1100})

    def submit_refused(timeout_ms: int) -> str:
        """Render pressed (the file as audio and video: refused before it matters), what it then says."""
        page.set_input_files("#audio", audio)
        page.set_input_files("#video", audio)
        page.click("#submit-button")
        page.locator("#submit-error").wait_for(state="visible", timeout=timeout_ms)
        return page.inner_text("#submit-error")

    try:
        page.goto(service.url + "/")
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.fill("#token-input", "not-the-token")
        page.click("#token-form button[type=submit]")
        page.locator("#token-error").wait_for(state="visible", timeout=10_000)
        said = page.inner_text("#token-error")
        assert "did not accept this token" in said and "needs its API token" not in said, said
        assert page.input_value("#token-input") == "not-the-token"
        # Render pressed then says the same of the token typed (it said "needs its API token: type it above")
        said = submit_refused(10_000)
        assert "did not accept this token" in said and "needs its API token" not in said, said

        # corrected: the right token; then it goes bad while the page is in use
        page.fill("#token-input", service.token)
        page.click("#token-form button[type=submit]")
        page.locator("#token-form").wait_for(state="hidden", timeout=5_000)
        page.evaluate("sessionStorage.setItem('lipsync.token', 'gone-bad')")
        said = submit_refused(30_000)
        assert "did not accept this token" in said and "needs its API token" not in said, said
        assert page.is_visible("#token-form") and page.input_value("#token-input") == "gone-bad"
    finally:
        page.close()


@pytest.mark.service
def test_a_reload_comes_back_on_the_tab_it_left_after_a_job_was_opened(chromium_executable, service, browser):
    """Once a job had been opened, a reload on Jobs or Live came back on Render: the address kept the job's
    `#job=ID`, which overrides the remembered tab. The address names the job only while Render shows it."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        sign_in(page, service)
        page.evaluate("location.hash = '#job=some-job'")  # a job link followed in this tab
        page.locator("#job-card").wait_for(state="visible", timeout=10_000)
        page.click("[data-tab=jobs]")
        assert "#job=" not in page.url, page.url
        page.click("[data-tab=render]")  # the job is on screen again, and in the address
        assert page.url.endswith("#job=some-job"), page.url
        page.reload()  # a job's address opens it on Render
        page.locator("#job-id", has_text="some-job").wait_for(timeout=10_000)
        assert page.locator("[data-panel=render]").is_visible()
        for tab in ("jobs", "live"):
            page.click(f"[data-tab={tab}]")
            assert "#job=" not in page.url, page.url
            page.reload()
            page.locator(f"[data-panel={tab}]").wait_for(state="visible", timeout=10_000)
            assert page.locator("[data-panel=render]").is_hidden()
            assert page.get_attribute(f"[data-tab={tab}]", "aria-selected") == "true"
    finally:
        page.close()


@pytest.mark.service
def test_leaving_a_live_session_is_said_under_speak_and_asked_while_it_starts(chromium_executable, service, browser):
    """Leaving the page ends its live session: the Live tab says so under Speak, and the browser asks before a
    reload, also while Speak is still asking for the session (the model may load for a minute first: it
    asked only once the session was there, and a session left while it started was never ended)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    held = []
    try:
        fake_avatar(page)
        page.route("**/v1/sessions", lambda route: held.append(route) if route.request.method == "POST"
                   else route.continue_())
        sign_in(page, service)
        page.click("[data-tab=live]")
        leaving = page.locator("[data-panel=live] .actions + .hint")  # right under the buttons
        assert "Leaving or reloading this page ends" in leaving.inner_text(), leaving.inner_text()
        page.locator(f"#live-avatar option[value='{FAKE_AVATAR}']").wait_for(state="attached", timeout=10_000)
        page.click("#live-speak")
        wait_for_routes(page, held, "the page's POST /v1/sessions")
        asked = []
        page.once("dialog", lambda dialog: (asked.append(dialog.type), dialog.dismiss()))
        with pytest.raises(PlaywrightTimeout):  # declined: the reload never happens
            page.reload(timeout=3000)
        assert asked == ["beforeunload"], asked
    finally:
        for route in held:
            route.abort()
        page.close()


@pytest.mark.service
def test_a_token_error_on_the_live_tab_goes_once_the_token_is_given(chromium_executable, service, browser):
    """Speak refused for its token said so on the Live tab; once the right token was typed its form went, and
    that error stayed, asking for a token already given (Render and Avatars cleared theirs)."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        fake_avatar(page)
        open_live_tab(page, service)
        page.evaluate("sessionStorage.setItem('lipsync.token', 'gone-bad')")  # the service's token changed
        page.click("#live-speak")
        page.locator("#live-error", has_text="token").wait_for(timeout=30_000)
        page.fill("#token-input", service.token)
        page.click("#token-form button[type=submit]")
        page.locator("#token-form").wait_for(state="hidden", timeout=5_000)
        page.locator("#live-error").wait_for(state="hidden", timeout=5_000)
    finally:
        page.close()


@pytest.mark.service
def test_the_live_tabs_hint_promises_no_delay_the_machine_may_not_keep(chromium_executable, service, browser):
    """The Live tab said "the avatar says it about a second later", while a 2-core machine measured a latency
    p50 of 2.0-2.6 s: its hint names no figure, and points at the session's Latency the tab shows."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        sign_in(page, service)
        page.click("[data-tab=live]")
        hint = page.locator("[data-panel=live] .hint").first.inner_text()
        assert hint.startswith("Speak into the microphone") and "Latency" in hint, hint
        assert not re.search(r"\bseconds?\b|\d", hint), hint
    finally:
        page.close()


@pytest.mark.service
def test_a_new_submission_takes_the_last_jobs_card_away(chromium_executable, service, browser, tmp_path):
    """A submission refused at once showed its error above the last job's card ("Job 902b... failed - no face
    found"), which read as the new one's failure: the last job's card goes when a new submission is made."""
    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(1.0, seed=4))
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        sign_in(page, service)
        page.evaluate("location.hash = '#job=the-last-job'")  # its card says it is not found: an error shown
        page.locator("#job-error").wait_for(state="visible", timeout=10_000)
        page.set_input_files("#audio", audio)
        page.set_input_files("#video", audio)  # refused at once: no video stream
        page.click("#submit-button")
        page.locator("#submit-error").wait_for(state="visible", timeout=30_000)
        assert page.locator("#job-card").is_hidden() and "#job=" not in page.url, page.url
    finally:
        page.close()


@pytest.mark.service
def test_the_jobs_player_is_scrolled_into_view_once_it_shows(chromium_executable, service, browser, tmp_path):
    """After Render the job card started at y~592 of 900 and its player mostly below the fold: once it has its
    size the player is scrolled into view (at once here: the browser asks for reduced motion, so no smooth
    scroll)."""
    from cluster.synth import astronaut_template, speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(2.0, seed=6))
    video = astronaut_template(str(tmp_path / "person.mp4"), seconds=1.0, fps=FPS, size=(320, 240))
    page = browser.new_page(viewport={"width": 1366, "height": 900}, reduced_motion="reduce")
    player = "(() => { const r = document.getElementById('player').getBoundingClientRect(); " \
             "return [r.top, r.bottom, innerHeight, document.getElementById('player').readyState]; })()"
    try:
        sign_in(page, service)
        page.set_input_files("#audio", audio)
        page.set_input_files("#video", video)
        page.click("#submit-button")
        page.locator("#player").wait_for(state="visible", timeout=120_000)
        wait_until(lambda: page.evaluate(player)[3] >= 1, 60, 0.2, "the player to have the stream's size")
        top, bottom, height, _ = wait_until(lambda: (lambda p: p if p[1] <= p[2] else None)(page.evaluate(player)),
                                            2, 0.1, "the player to be scrolled into view")
        assert 0 <= top and bottom <= height and page.evaluate("scrollY") > 0, (top, bottom, height)
    finally:
        page.close()


@pytest.mark.service
def test_the_keyboard_moves_between_tabs_and_lands_on_a_job_opened(chromium_executable, service, browser):
    """A job opened from the Jobs list with the keyboard left the focus on BODY (its button went with its tab):
    it lands on the job card's heading. The tabs (role=tab) follow WAI-ARIA's tabs pattern: each names its
    panel (aria-controls), only the chosen one is in the Tab order, the arrow keys, Home and End move between
    them and show the one moved to."""

    from cluster.schemas import JobView, utcnow

    listed = JobView(id="listed-job", state="failed", stage="done", progress=1.0, frames_done=0, frames_total=0,
                     created_at=utcnow(), updated_at=utcnow()).model_dump(mode="json")
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        page.route("**/v1/jobs?*", lambda route: answer_job_list(route, [listed]))
        sign_in(page, service)
        for tab in page.locator("[role=tab]").all():
            panel = page.locator("#" + tab.get_attribute("aria-controls"))
            assert panel.get_attribute("role") == "tabpanel"
            assert panel.get_attribute("data-panel") == tab.get_attribute("data-tab")

        def at() -> tuple:
            return page.evaluate("[document.activeElement.dataset.tab, "
                                 "document.querySelector('[aria-selected=true]').dataset.tab, "
                                 "document.querySelector('[data-panel]:not([hidden])').dataset.panel, "
                                 "Array.from(document.querySelectorAll('[role=tab]')).map((t) => t.tabIndex)]")

        page.focus("[data-tab=render]")
        moves = [("ArrowRight", "jobs"), ("End", "live"), ("ArrowRight", "render"), ("ArrowLeft", "live"),
                 ("Home", "render"), ("ArrowRight", "jobs")]
        for key, tab in moves:
            page.keyboard.press(key)
            focused, selected, shown, order = at()
            assert (focused, selected, shown) == (tab, tab, tab), (key, focused, selected, shown)
            assert sorted(order) == [-1, -1, -1, 0], order

        # on Jobs: Enter on the listed job opens it; the focus is on its card's heading
        page.locator(".job-row button", has_text="listed-job").focus()
        page.keyboard.press("Enter")
        page.locator("#job-id", has_text="listed-job").wait_for(timeout=10_000)
        focused = page.evaluate("[document.activeElement.tagName, document.activeElement.textContent]")
        assert focused[0] == "H2" and "listed-job" in focused[1], focused
    finally:
        page.close()


@pytest.mark.service
def test_a_refused_rtmp_url_is_said_in_the_labels_words_and_its_input_marked(chromium_executable, service, browser):
    """An RTMP URL the service refused was said in the API's field name ("rtmp_url: only rtmp and rtmps URLs are
    accepted ..."), and its input was not marked: the error says the label's words and the input is marked, as
    the Render form marks its fields, until Speak is pressed again."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        fake_avatar(page)
        open_live_tab(page, service)
        page.click("[data-panel=live] details.more summary")
        page.fill("#live-rtmp", "https://example.com/live/key")
        page.click("#live-speak")
        error = page.locator("#live-error")
        error.wait_for(state="visible", timeout=30_000)
        said = error.inner_text()
        assert said.startswith("RTMP server: only rtmp and rtmps URLs") and "rtmp_url" not in said, said
        assert "invalid" in page.get_attribute("#live-rtmp", "class").split()
        assert page.get_attribute("#live-rtmp", "aria-invalid") == "true"
        page.fill("#live-rtmp", "")
        page.click("#live-speak")  # (then refused for its avatar, which the service does not hold)
        page.locator("#live-error", has_text="Avatar: ").wait_for(timeout=30_000)
        assert "invalid" not in (page.get_attribute("#live-rtmp", "class") or "").split()
        assert "invalid" in page.get_attribute("#live-avatar", "class").split()
    finally:
        page.close()


@pytest.mark.service
def test_a_refused_avatar_template_is_said_in_the_labels_words(chromium_executable, service, browser, tmp_path):
    """The Avatars tab said the API's field ("video: junk.mp4 is not a readable audio/video file"), where the
    Render tab says its label's words."""
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    page = browser.new_page()
    try:
        sign_in(page, service)
        page.click("[data-tab=avatars]")
        page.set_input_files("#avatar-video", str(junk))
        page.click("#avatar-button")
        error = page.locator("#avatar-error")
        error.wait_for(state="visible", timeout=60_000)
        said = error.inner_text()
        assert said.startswith("Template video (or a photo): junk.mp4 ") and "video:" not in said, said
    finally:
        page.close()


@pytest.mark.service
def test_player_behind_live_goes_once_the_session_has_ended(chromium_executable, service, browser):
    """"Player behind live" kept showing after the session had ended (no live edge to be behind any more). The
    session's views are Playwright's answers here (live, then ended), the page's code and the service's page."""
    import json

    from cluster.schemas import SessionView

    ended = []

    def view(state: str) -> str:
        base = service.url + "/v1/sessions/fake-session"
        return json.dumps(SessionView(id="fake-session", state=state, reason="finished" if state == "ended" else None,
                                      avatar_id=FAKE_AVATAR, sample_rate=48000, hls_url=base + "/live.m3u8",
                                      audio_ws=base.replace("http", "ws", 1) + "/audio",
                                      audio_url=base + "/audio").model_dump(mode="json"))

    def answer(route):
        state = "ended" if ended else "live"
        route.fulfill(status=201 if route.request.method == "POST" else 200, content_type="application/json",
                      body=view(state))

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        speak_in_a_fake_session(page, service, answer)
        assert page.is_visible("#live-player-latency") and page.is_visible("#live-stats dt:has-text('Player behind')")
        ended.append(True)
        page.locator("#live-state.s-ended").wait_for(timeout=10_000)
        assert page.is_hidden("#live-player-latency") and page.is_hidden("#live-stats dt:has-text('Player behind')")
        assert page.is_visible("#live-latency")  # the session's own figures stay
    finally:
        page.close()


def contrast(a: str, b: str) -> float:
    """WCAG's contrast ratio of two CSS colours given as `rgb(r, g, b)`."""
    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", css)[:3]]
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


@pytest.mark.service
def test_the_borders_of_inputs_and_buttons_stand_out_from_their_background(chromium_executable, service, browser):
    """The inputs' and selects' borders (#d8dde3 on white) were 1.37:1, where a control's boundary needs 3:1
    (WCAG 1.4.11): each control's border against the background it stands on."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    colours = """(selector) => {
        const el = document.querySelector(selector);
        let under = el.parentElement;
        while (getComputedStyle(under).backgroundColor === 'rgba(0, 0, 0, 0)') under = under.parentElement;
        return [getComputedStyle(el).borderTopColor, getComputedStyle(under).backgroundColor];
    }"""
    try:
        sign_in(page, service)
        for selector in ("#audio", "#video", "#sync-mode", "#model", "#avatar-select", "#token-input", "#live-avatar",
                         "#live-rtmp", "#avatar-video", "#jobs-refresh", "#live-stop"):
            border, under = page.evaluate(colours, selector)
            assert contrast(border, under) >= 3, (selector, border, under, round(contrast(border, under), 2))
    finally:
        page.close()


@pytest.mark.service
def test_the_page_sends_no_call_it_knows_the_service_refuses_without_a_token(chromium_executable, service, browser):
    """The page's first load made two calls before it asked for the token (the avatars, the jobs list), each a
    401 and an error in the browser's console; every reload, two more. Now one call finds that the service
    needs a token, and until one is typed no call is sent (a reload asks for the token at once)."""
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    refused = []
    page.on("console", lambda message: message.type == "error" and "401" in message.text and refused.append(message))
    try:
        page.goto(service.url + "/")
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.wait_for_timeout(1000)
        assert len(refused) == 1, [m.text for m in refused]
        page.reload()
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.click("[data-tab=jobs]")  # a tab that reads the API reads nothing without the token either
        page.wait_for_timeout(1000)
        assert len(refused) == 1, [m.text for m in refused]
        page.fill("#token-input", service.token)
        page.click("#token-form button[type=submit]")
        page.locator("#jobs-list li").first.wait_for(timeout=10_000)  # then the tab reads its list
        assert len(refused) == 1 and page.is_hidden("#jobs-error"), [m.text for m in refused]
    finally:
        page.close()


# --- without a browser: which routes are public, and how the page's files are served ----------------
@pytest.fixture(scope="module")
def app_client():
    """The service's app (token set) in-process, without a job manager: the one public route that
    asks for it (/readyz) finds none answering, as when it is down."""
    from fastapi.testclient import TestClient

    from actors.service_support import ManagerUnavailable
    from cluster.config import Settings
    from service.app import create_app

    class NoManager:
        async def ready(self, timeout: float):
            raise ManagerUnavailable("no job manager in this test")

    with TestClient(create_app(Settings(api_token="secret"), gateway=NoManager())) as client:
        yield client


def test_public_routes_are_exactly_the_page_its_files_the_api_docs_and_healthz(app_client):
    from fastapi.routing import APIRoute
    from starlette.routing import Mount

    def routes(table):  # FastAPI >= 0.16x keeps an included router as one entry holding its routes
        for route in table:
            included = getattr(route, "original_router", None)
            yield from routes(included.routes) if included is not None else [route]

    public = set()
    for route in routes(app_client.app.routes):
        if isinstance(route, Mount):
            probes = [("GET", route.path + "/app.js")]
        elif isinstance(route, APIRoute) or hasattr(route, "methods"):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            probes = [(method, path) for method in sorted(route.methods)]
        else:
            continue
        for method, path in probes:
            if app_client.request(method, path).status_code != 401:
                public.add(f"{method} {route.path}")
    assert app_client.get("/readyz").status_code == 503  # public (probes carry no token): not ready here
    assert app_client.head("/healthz").status_code == 200  # uptime monitors probe with HEAD: it was a 405
    assert public == {"GET /", "HEAD /", "GET /static", "GET /healthz", "HEAD /healthz", "GET /readyz",
                      "HEAD /readyz", "GET /openapi.json", "GET /docs",
                      "HEAD /docs", "GET /docs/oauth2-redirect", "HEAD /docs/oauth2-redirect", "GET /redoc",
                      "HEAD /redoc", "HEAD /openapi.json"}, sorted(public)


def test_page_and_static_files_content_types_and_cache(app_client):
    page = app_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    scripts = re.findall(r'<script src="([^"]+)"', page.text)
    styles = re.findall(r'<link rel="stylesheet" href="([^"]+)"', page.text)
    assert scripts == ["/static/vendor/hls.js-1.7.4/hls.light.min.js", "/static/app.js", "/static/live.js"]
    assert styles == ["/static/style.css"]
    for url in scripts + styles + ["/static/pcm-worklet.js"]:
        r = app_client.get(url)
        assert r.status_code == 200 and len(r.content) > 1000, url
        kind = "text/javascript" if url.endswith(".js") else "text/css"
        assert r.headers["content-type"] == f"{kind}; charset=utf-8", url
        assert r.headers["x-content-type-options"] == "nosniff"
        cache = "public, max-age=31536000, immutable" if "/vendor/" in url else "no-cache"
        assert r.headers["cache-control"] == cache, url
        again = app_client.get(url, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304, url
    assert app_client.get("/static/vendor/hls.js-1.7.4/LICENSE").text.startswith("Copyright (c) 2017 Dailymotion")
    for missing in ("/static/nope.js", "/static/..%2f..%2fapp.py", "/static/../routers/web.py"):
        r = app_client.get(missing)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (missing, r.text)


@pytest.mark.service
def test_the_jobs_list_names_a_jobs_avatar(chromium_executable, service, browser):
    """A job by avatar_id read "avatar c666db251025364d" in the Jobs list: it reads as the avatar's name (the
    file it was prepared from, `inputs.avatar`), and as its id where the job has no name of it."""

    from cluster.schemas import JobView, utcnow

    def job(job_id: str, inputs: dict) -> dict:
        return JobView(id=job_id, state="succeeded", stage="done", progress=1.0, frames_done=1, frames_total=1,
                       created_at=utcnow(), updated_at=utcnow(), inputs=inputs).model_dump(mode="json")

    jobs = [job("named-job", {"audio": "hello.wav", "avatar": "Anna studio.mp4", "avatar_id": "c666db251025364d"}),
            job("unnamed-job", {"audio": "hi.wav", "avatar_id": "ab12cd34ef567890"})]
    page = open_jobs_tab(browser, service, lambda route: answer_job_list(route, jobs))
    try:
        rows = page.locator("#jobs-list li")
        rows.nth(1).wait_for(timeout=10_000)
        assert "hello.wav + avatar Anna studio.mp4" in rows.nth(0).inner_text(), rows.nth(0).inner_text()
        assert "hi.wav + avatar ab12cd34ef567890" in rows.nth(1).inner_text(), rows.nth(1).inner_text()
    finally:
        page.close()


@pytest.mark.service
def test_the_token_card_lines_up_with_the_page_and_keeps_off_a_phones_edges(chromium_executable, service, browser):
    """The token card (outside main) was 2rem wider than main's cards at 1366 px, and touched the screen's
    edges at 390 px."""
    for width in (1366, 390):
        page = browser.new_page(viewport={"width": width, "height": 900})
        try:
            page.goto(service.url + "/")
            token = page.locator("#token-form")
            token.wait_for(state="visible", timeout=15_000)
            box = token.bounding_box()
            card = page.locator("main .card").first.bounding_box()
            assert box["x"] >= 8 and box["x"] + box["width"] <= width - 8, (width, box)
            assert abs(box["x"] - card["x"]) < 1 and abs(box["width"] - card["width"]) < 1, (width, box, card)
        finally:
            page.close()


@pytest.mark.service
def test_speak_before_the_token_says_to_give_the_token(chromium_executable, service, browser):
    """Speak pressed while the page waits for its token said "Prepare an avatar first": no avatar could be
    listed without the token, whatever the service holds. It says to type the token, until it is given."""
    page = browser.new_page()
    try:
        page.goto(service.url + "/")
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.click("[data-tab=live]")
        page.click("#live-speak")
        error = page.locator("#live-error")
        error.wait_for(state="visible", timeout=10_000)
        assert "needs its API token: type it above" in error.inner_text(), error.inner_text()
        page.fill("#token-input", service.token)  # given: the error goes, as the other token errors do
        page.click("#token-form button[type=submit]")
        error.wait_for(state="hidden", timeout=10_000)
    finally:
        page.close()


# --- a service that restarts, a list read elsewhere, a reload: the page's calls answered by Playwright ----------------
# Ray Serve's own answer while the service (re)starts and its app's routes do not exist yet (about a second): a 404 in
# plain text, not the API's JSON error
def serve_starting(route) -> None:
    path = route.request.url.split("://", 1)[1].split("/", 1)[1].split("?")[0]
    route.fulfill(status=404, content_type="text/plain; charset=utf-8",
                  body=f"Path '/{path}' not found. Ping http://127.0.0.1:8000/-/routes for available routes.")


def fake_session_view(service, state: str, reason: str | None = None, recording: bool = False) -> str:
    import json

    from cluster.schemas import SessionView

    base = service.url + "/v1/sessions/fake-session"
    return json.dumps(SessionView(id="fake-session", state=state, reason=reason, avatar_id=FAKE_AVATAR,
                                  sample_rate=48000, hls_url=base + "/live.m3u8",
                                  audio_ws=base.replace("http", "ws", 1) + "/audio", audio_url=base + "/audio",
                                  recording_url=base + "/recording" if recording else None,
                                  seconds_received=1.5, seconds_rendered=1.5).model_dump(mode="json"))


def fake_audio_socket(page, sockets: list | None = None) -> None:
    """The fake session's audio socket: Playwright's, which takes the speech and says it is ready (each one opened
    is added to `sockets`)."""
    def opened(ws) -> None:
        if sockets is not None:
            sockets.append(ws)
        ws.send('{"type": "ready"}')

    page.route_web_socket(re.compile(r"/v1/sessions/fake-session/audio"), opened)


def speak_in_a_fake_session(page, service, answer, sockets: list | None = None) -> None:
    """The Live tab speaking in the fake session whose API answers are `answer`'s (its audio socket faked: each one
    opened is added to `sockets`), once its pill says live and Stop can be pressed."""
    fake_avatar(page)
    fake_audio_socket(page, sockets)
    page.route("**/v1/sessions", answer)
    page.route("**/v1/sessions/fake-session", answer)
    open_live_tab(page, service)
    page.click("#live-speak")
    page.locator("#live-state.s-live").wait_for(timeout=30_000)
    page.locator("#live-stop:not([disabled])").wait_for(timeout=30_000)


@pytest.mark.service
def test_the_live_tab_follows_its_session_across_a_service_restart(chromium_executable, service, browser):
    """A service stopped and started again while the Live tab followed its session: one poll landed in the second
    where Ray Serve answers a plain-text 404 before the app's routes exist, and the tab stopped following for good
    (pill `live`, End session shown, "The server answered 404 Not Found"), while the service had ended the session
    (`service_stopped`) and kept its recording. Such a 404 is the service starting: the tab keeps asking, then says
    the session ended because the service was restarted, offers its recording, and the "does not answer" line goes."""
    phase: list[str] = ["live"]
    asked: list[str] = []

    def answer(route):
        if route.request.method == "POST":
            return route.fulfill(status=201, content_type="application/json", body=fake_session_view(service, "live"))
        asked.append(phase[0])
        if phase[0] == "away":  # the service is down: nothing answers (three polls)
            if asked.count("away") >= 3:
                phase[0] = "starting"
            return route.abort("connectionrefused")
        if phase[0] == "starting":  # its first second back: Serve's plain 404 (two polls)
            if asked.count("starting") >= 2:
                phase[0] = "back"
            return serve_starting(route)
        state = ("ended", "service_stopped", True) if phase[0] == "back" else ("live", None, False)
        route.fulfill(status=200, content_type="application/json", body=fake_session_view(service, *state))

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        speak_in_a_fake_session(page, service, answer)
        phase[0] = "away"
        page.locator("#live-error", has_text="still trying").wait_for(timeout=15_000)
        page.locator("#live-state.s-ended").wait_for(timeout=20_000)
        assert asked.count("starting") == 2, asked
        said = page.inner_text("#live-note")
        assert "the service was restarted" in said and "service_stopped" not in said, said
        assert page.is_visible("#live-recording") and page.is_hidden("#live-end")
        assert page.is_hidden("#live-error"), page.inner_text("#live-error")
        assert page.is_enabled("#live-speak") and page.is_disabled("#live-stop")
    finally:
        page.close()


@pytest.mark.service
def test_the_live_tab_says_at_once_that_a_stopping_service_ended_its_session(chromium_executable, service, browser):
    """A probe stopped the service while the Live tab spoke: the service ended the session and closed the audio
    socket (4410 "... the service stopped"), but the pill read `live` with "still trying" until the service was
    back. The tab says the session ended now, and offers its recording once the service answers again."""
    phase: list[str] = ["live"]
    sockets: list = []

    def answer(route):
        if route.request.method == "POST":
            return route.fulfill(status=201, content_type="application/json", body=fake_session_view(service, "live"))
        if phase[0] == "away":
            return route.abort("connectionrefused")
        state = ("ended", "service_stopped", True) if phase[0] == "back" else ("live", None, False)
        route.fulfill(status=200, content_type="application/json", body=fake_session_view(service, *state))

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        speak_in_a_fake_session(page, service, answer, sockets)
        phase[0] = "away"
        sockets[-1].close(code=4410, reason="session fake-session is ended: the service stopped")
        page.locator("#live-state.s-ended").wait_for(timeout=5_000)
        assert "the service stopped" in page.inner_text("#live-note")
        assert page.is_hidden("#live-end") and page.is_enabled("#live-speak") and page.is_disabled("#live-stop")
        page.wait_for_timeout(4_500)  # three polls unanswered: no "still trying" over what was said
        assert page.is_hidden("#live-error") or "still trying" not in page.inner_text("#live-error")
        phase[0] = "back"
        page.locator("#live-recording:not([hidden])").wait_for(timeout=10_000)
    finally:
        page.close()


@pytest.mark.service
def test_the_job_card_follows_its_job_across_a_service_restart(chromium_executable, service, browser):
    """The job card stopped for good on any 404: with the plain-text 404 of a service starting (Ray Serve's, before
    the app's routes exist) it froze at "rendering" with "The server answered 404 Not Found" while the job went on to
    finish. Only the API's own 404 says the job is gone (the card's "not found" for an unknown job is kept)."""
    import json

    from cluster.schemas import JobView, utcnow

    succeeded = json.dumps(JobView(id="fake-job", state="succeeded", stage="done", progress=1.0, frames_done=125,
                                   frames_total=125, created_at=utcnow(), updated_at=utcnow()).model_dump(mode="json"))
    starting: list[str] = []

    def events(route):
        if len(starting) < 2:
            starting.append(route.request.url)
            return serve_starting(route)
        route.fulfill(status=200, content_type="text/event-stream", body=f"event: status\ndata: {succeeded}\n\n")

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        page.route("**/v1/jobs/fake-job/events", events)
        page.route("**/v1/jobs/fake-job", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                      body=succeeded))
        sign_in(page, service)
        page.evaluate("location.hash = '#job=fake-job'")
        page.locator("#job-state.s-succeeded").wait_for(timeout=20_000)
        assert len(starting) == 2, starting
        assert page.is_hidden("#job-error"), page.inner_text("#job-error")
        assert page.is_enabled("#download-button")

        page.evaluate("location.hash = '#job=no-such-job'")  # the API's 404: gone, said so, not asked again
        page.locator("#job-error", has_text="job.not_found").wait_for(timeout=10_000)
        assert page.is_hidden("#download-button")
    finally:
        page.close()


@pytest.mark.service
def test_the_jobs_tab_recovers_from_a_failed_read_and_shows_jobs_submitted_elsewhere(chromium_executable, service,
                                                                                       browser):
    """The Jobs tab read its list again only while a listed job was unfinished, and never after a failed read: after a
    service restart it said "Could not reach the server" above a stale row for good, and a job submitted from another
    browser tab never showed. While shown it reads the list again (every 5 s, sooner after a failure, then backing
    off), clears the error once a read succeeds, and reads nothing while another tab is shown."""
    from cluster.schemas import JobView, utcnow

    def view(job_id: str) -> dict:
        return JobView(id=job_id, state="succeeded", stage="done", progress=1.0, frames_done=1, frames_total=1,
                       created_at=utcnow(), updated_at=utcnow()).model_dump(mode="json")

    listed = ["job-a"]
    failing = [True]
    reads: list[float] = []

    def answer(route):
        reads.append(time.monotonic())
        if failing[0]:
            return route.abort("connectionrefused")
        answer_job_list(route, [view(job_id) for job_id in reversed(listed)])

    page = open_jobs_tab(browser, service, answer, viewport={"width": 1000, "height": 1100})
    try:
        error = page.locator("#jobs-error")
        error.wait_for(state="visible", timeout=10_000)
        assert "Could not reach the server" in error.inner_text(), error.inner_text()
        failing[0] = False  # the service is back: the next read (within 15 s) lists the job, the error goes
        page.locator(".job-row", has_text="job-a").wait_for(timeout=20_000)
        error.wait_for(state="hidden", timeout=5_000)

        page.locator(".job-row button", has_text="job-a").focus()
        listed.append("job-b")  # submitted elsewhere: shown within the list's 5 s, all its jobs finished
        page.locator(".job-row", has_text="job-b").wait_for(timeout=10_000)
        assert page.evaluate("document.activeElement.textContent") == "job-a"  # the row kept the focus

        page.click("[data-tab=render]")  # another tab shown: the list is not read
        page.wait_for_timeout(500)
        count = len(reads)
        page.wait_for_timeout(6000)
        assert len(reads) == count, reads
    finally:
        page.close()


@pytest.mark.service
def test_the_token_form_moves_the_focus_to_the_tab_and_renders_words_name_no_api_field(chromium_executable, service,
                                                                                       browser, tmp_path):
    """Enter in the token field hid its form and left the focus on BODY: it lands on the shown tab's first control.
    Render chosen with "a prepared avatar" and none prepared said "avatar_id: Choose a prepared avatar ...", an API
    field name in the page's own words; an API error about a field names it by its label, as the Live tab does."""
    from cluster.synth import speech_like, write_audio

    audio = write_audio(str(tmp_path / "speech.wav"), speech_like(1.0, seed=12))
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        # none prepared (read with the token; without it the service's own 401 asks for the token)
        page.route("**/v1/avatars", lambda route: route.fulfill(status=200, content_type="application/json", body="[]")
                   if "authorization" in route.request.headers else route.continue_())
        page.goto(service.url + "/")
        page.locator("#token-form").wait_for(state="visible", timeout=15_000)
        page.fill("#token-input", service.token)
        page.press("#token-input", "Enter")
        page.locator("#token-form").wait_for(state="hidden", timeout=5_000)
        assert page.evaluate("document.activeElement.id") == "audio"

        page.locator("#avatar-empty").wait_for(state="attached", timeout=10_000)
        page.check("input[name=template][value=avatar]")
        page.set_input_files("#audio", audio)
        page.click("#submit-button")
        error = page.locator("#submit-error")
        error.wait_for(state="visible", timeout=10_000)
        said = error.inner_text()
        assert "avatar_id" not in said and "prepare one in the Avatars tab" in said, said
        assert page.get_attribute("#avatar-select", "aria-invalid") == "true"

        refusal = '{"error": {"code": "input.invalid", "message": "avatar_id: not an avatar id", "field": "avatar_id"}}'
        page.route("**/v1/jobs", lambda route: route.fulfill(status=422, content_type="application/json", body=refusal))
        page.evaluate("(() => { const s = document.getElementById('avatar-select'); s.hidden = false; "
                      "s.append(new Option('x', 'abc')); s.value = 'abc'; })()")
        page.click("#submit-button")
        page.locator("#submit-error", has_text="not an avatar id").wait_for(timeout=30_000)
        said = error.inner_text()
        assert said.startswith("Avatar: not an avatar id") and "avatar_id" not in said, said
    finally:
        page.close()


@pytest.mark.service
def test_a_reloaded_live_tab_shows_the_session_it_ended_and_its_recording(chromium_executable, service, browser):
    """Reloading the page during a live session ends it (the browser asks first), and the reloaded Live tab showed no
    trace of it, although its recording existed: the tab remembers its last session and shows it, ended, its
    recording offered."""
    reloaded: list[bool] = []

    def answer(route):
        if route.request.method == "POST":
            return route.fulfill(status=201, content_type="application/json", body=fake_session_view(service, "live"))
        body = fake_session_view(service, "ended", "deleted", True) if reloaded else fake_session_view(service, "live")
        route.fulfill(status=200, content_type="application/json", body=body)

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        speak_in_a_fake_session(page, service, answer)
        page.once("dialog", lambda dialog: (reloaded.append(True), dialog.accept()))
        page.reload()
        assert reloaded == [True]
        page.locator("#live-state.s-ended").wait_for(timeout=15_000)
        assert page.inner_text("#live-id").strip() == "fake-session"
        assert page.is_visible("#live-recording") and page.is_hidden("#live-end")
        assert "ended at once" in page.inner_text("#live-note"), page.inner_text("#live-note")
    finally:
        page.close()


@pytest.mark.service
def test_forgetting_the_token_during_a_live_session_ends_the_session(chromium_executable, service, live_avatar,
                                                                     browser):
    """"forget" (the token) during a live session reloaded the page with the token already gone: the session's end,
    sent as the page left, went without it, was refused, and the session ran on (holding a live slot) until its idle
    timeout. The end goes with the token now; the token goes as the page does. (A real session: Playwright sees no
    request sent as a page unloads.)"""
    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=30)
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    sid = None
    try:
        sign_in(page, service)
        page.click("[data-tab=live]")
        page.locator(f"#live-avatar option[value='{live_avatar}']").wait_for(state="attached", timeout=15_000)
        page.select_option("#live-avatar", live_avatar)
        page.click("#live-speak")
        page.locator("#live-stop:not([disabled])").wait_for(timeout=60_000)
        sid = page.inner_text("#live-id").strip()
        assert api.get(f"/v1/sessions/{sid}").json()["state"] in ("starting", "live")
        # "Stay" at the browser's question: the page, its token and its session stay (and the wish lapses)
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#token-forget")
        page.wait_for_timeout(3500)
        assert page.evaluate("sessionStorage.getItem('lipsync.token')") == service.token
        assert page.evaluate("forgetting") is False and page.is_hidden("#token-form")
        assert api.get(f"/v1/sessions/{sid}").json()["state"] in ("starting", "live")
        asked: list[bool] = []
        page.once("dialog", lambda dialog: (asked.append(True), dialog.accept()))  # (leaving ends the session: asked)
        page.click("#token-forget")
        page.locator("#token-form:not([hidden])").wait_for(timeout=15_000)  # the page again, without its token
        view = wait_until(lambda: (lambda v: v if v["state"] not in ("starting", "live") else None)(
            api.get(f"/v1/sessions/{sid}").json()), 20, 0.5, "the session to end")
        assert asked == [True] and view["reason"] == "deleted", view
    finally:
        if sid:
            api.delete(f"/v1/sessions/{sid}")
        page.close()
        api.close()


@pytest.mark.service
def test_the_job_player_takes_a_fresh_watch_url_when_its_own_is_refused(chromium_executable, service, browser,
                                                                        speech_wav, astronaut_video):
    """The job's player asked its first signed watch URL again and again once the service refused it (the service's
    API token changed under the page, or the URL expired): frozen at its first frames, even after the job had
    succeeded, while the job's views carried a fresh URL. A refused stream now takes the newest view's URL, reading
    the job again for it."""
    import json

    from cluster.hls import sign_watch, watch_key

    api = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {service.token}"}, timeout=60)
    refs = [api.post("/v1/uploads", files={"file": (Path(p).name, open(p, "rb"))}).json()["ref"]
            for p in (speech_wav, astronaut_video)]
    job_id = api.post("/v1/jobs", json={"audio": refs[0], "video": refs[1]}).json()["id"]
    view = wait_until(lambda: (lambda v: v if v["state"] == "succeeded" else None)(
        api.get(f"/v1/jobs/{job_id}").json()), 120, 0.5, "the job to succeed")
    first = view["watch_url"]
    fresh = re.sub(r"token=[^&]+", "token=" + sign_watch(watch_key(service.token), job_id, int(time.time()) + 3600),
                   first)
    assert fresh != first
    refused: list[str] = []
    asked: list[str] = []

    def with_url(url: str) -> str:
        return json.dumps({**view, "watch_url": url})

    def job_view(route):  # the job's reads: its first URL until that was refused, then a fresh one
        body = with_url(fresh if refused else first)
        if route.request.url.endswith("/events"):
            return route.fulfill(status=200, content_type="text/event-stream", body=f"event: status\ndata: {body}\n\n")
        route.fulfill(status=200, content_type="application/json", body=body)

    def stream(route):  # the first URL's segments refused as the service refuses a URL it no longer signs
        asked.append(route.request.url)
        if "token=" + first.split("token=")[1] in route.request.url and ".m3u8" not in route.request.url:
            refused.append(route.request.url)
            return route.fulfill(status=401, content_type="application/json", body='{"error": {"code": "auth"}}')
        route.continue_()

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        page.route(f"**/v1/jobs/{job_id}", job_view)
        page.route(f"**/v1/jobs/{job_id}/events", job_view)
        page.route(f"**/v1/jobs/{job_id}/hls/**", stream)
        sign_in(page, service)
        page.evaluate(f"location.hash = '#job={job_id}'")
        page.locator("#job-state.s-succeeded").wait_for(timeout=20_000)
        ready = "document.getElementById('player').readyState"
        wait_until(lambda: page.evaluate(ready) >= 2 or None, 30, 0.2, "the player to have data")
        assert refused, asked  # (the first URL was tried, and refused)
        assert any(fresh.split("token=")[1] in url for url in asked), asked
    finally:
        page.close()
        api.close()


@pytest.mark.service
def test_render_from_the_keyboard_leaves_the_focus_on_the_new_job_or_the_field_refused(chromium_executable, service,
                                                                                      browser, tmp_path):
    """Render disables its button while it sends: the focus fell to BODY (a screen reader lost its place, a probe).
    It lands on the new job's card heading, or on the field the service refused."""
    import json

    from cluster.schemas import JobView, utcnow

    accepted = json.dumps(JobView(id="keyboard-job", state="queued", stage="queued", progress=0.0, frames_done=0,
                                  frames_total=0, created_at=utcnow(), updated_at=utcnow()).model_dump(mode="json"))
    refusal = '{"error": {"code": "input.invalid", "message": "sync_mode: not a mode", "field": "sync_mode"}}'
    answers = [(422, refusal), (202, accepted)]
    audio, video = tmp_path / "speech.wav", tmp_path / "person.mp4"
    audio.write_bytes(b"RIFF")  # (the answers are the test's: the files are not read)
    video.write_bytes(b"\0")
    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        page.route("**/v1/jobs", lambda route: route.fulfill(status=answers[0][0], content_type="application/json",
                                                             body=answers.pop(0)[1])
                   if route.request.method == "POST" else route.continue_())
        page.route("**/v1/jobs/keyboard-job**", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                            body=accepted))
        sign_in(page, service)
        page.set_input_files("#audio", str(audio))
        page.set_input_files("#video", str(video))

        def focused() -> str:
            return page.evaluate("document.activeElement.id || document.activeElement.tagName")

        page.focus("#submit-button")
        page.keyboard.press("Enter")
        page.locator("#submit-error", has_text="not a mode").wait_for(timeout=10_000)
        page.wait_for_function("document.getElementById('submit-button').textContent === 'Render'", timeout=10_000)
        assert focused() == "sync-mode", focused()
        page.focus("#submit-button")
        page.keyboard.press("Enter")
        page.locator("#job-id", has_text="keyboard-job").wait_for(timeout=10_000)
        page.wait_for_function("document.getElementById('submit-button').textContent === 'Render'", timeout=10_000)
        assert focused() == "job-title", focused()
    finally:
        page.close()


@pytest.mark.service
def test_speak_and_stop_from_the_keyboard_keep_the_focus_on_the_live_tabs_buttons(chromium_executable, service,
                                                                                  browser):
    """Speak and Stop disable themselves, and the focus fell to BODY (a keyboard or screen reader user lost their
    place, a probe): it goes to the button that comes next, Stop after Speak, Speak after Stop."""
    def answer(route):
        if route.request.method == "POST":
            return route.fulfill(status=201, content_type="application/json", body=fake_session_view(service, "live"))
        route.fulfill(status=200, content_type="application/json", body=fake_session_view(service, "live"))

    page = browser.new_page(viewport={"width": 1000, "height": 1100})

    def focused() -> str:
        return page.evaluate("document.activeElement.id || document.activeElement.tagName")

    try:
        fake_avatar(page)
        fake_audio_socket(page)
        page.route("**/v1/sessions", answer)
        page.route("**/v1/sessions/fake-session", answer)
        open_live_tab(page, service)
        page.focus("#live-speak")
        page.keyboard.press("Enter")
        page.locator("#live-stop:not([disabled])").wait_for(timeout=30_000)
        wait_until(lambda: focused() == "live-stop" or None, 5, 0.1, "the focus on Stop")
        page.keyboard.press("Enter")
        page.locator("#live-speak:not([disabled])").wait_for(timeout=30_000)
        wait_until(lambda: focused() == "live-speak" or None, 5, 0.1, "the focus on Speak")
    finally:
        page.close()


@pytest.mark.service
def test_an_ended_sessions_speech_left_unrendered_is_not_said_to_be_waiting(chromium_executable, service, browser):
    """An ended session's speech it never rendered read "(1.60 s waiting)", as if it were still to come (a probe):
    it is said never rendered."""
    import json

    phase = ["live"]

    def answer(route):
        if route.request.method == "POST":
            return route.fulfill(status=201, content_type="application/json", body=fake_session_view(service, "live"))
        view = json.loads(fake_session_view(service, *(("ended", "service_stopped", True) if phase[0] == "ended"
                                                       else ("live",))))
        route.fulfill(status=200, content_type="application/json", body=json.dumps({**view, "buffered_seconds": 1.6}))

    page = browser.new_page(viewport={"width": 1000, "height": 1100})
    try:
        speak_in_a_fake_session(page, service, answer)
        page.locator("#live-rendered", has_text="waiting").wait_for(timeout=10_000)
        phase[0] = "ended"
        page.locator("#live-state.s-ended").wait_for(timeout=15_000)
        said = page.inner_text("#live-rendered")
        assert "never rendered" in said and "waiting" not in said, said
    finally:
        page.close()
