"""Session-wide fixtures: an isolated storage root, generated media, one Ray instance."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Every test of the session stores under its own temporary root (set before settings are read).
_ROOT = Path(tempfile.mkdtemp(prefix="lipsync-test-"))
os.environ["LIPSYNC_STORAGE_ROOT"] = str(_ROOT / "storage")
os.environ["XDG_STATE_HOME"] = str(_ROOT / "state")  # the job stores' unwritten ends (cluster/jobstore.py), not ~'s
os.environ.setdefault("OMP_NUM_THREADS", "1")

from hypothesis import settings as hyp_settings  # noqa: E402

hyp_settings.register_profile("ci", deadline=None, max_examples=60)
hyp_settings.load_profile("ci")

from tests.helpers import one_x264_thread  # noqa: E402

one_x264_thread()  # this process's encodes (the references Ray's output is compared with) as a compositor's


# Modules whose every test starts Ray, a service or a CLI process, and tests that render whole
# videos end to end: `slow` too, so `pytest -m "not slow"` stays a quick inner loop.
SLOW_MODULES = {"test_cli", "test_service", "test_service_restart", "test_service_chaos", "test_service_hostile",
                "test_soak", "test_lipsync_quality", "test_deploy_local", "test_perf", "test_multinode"}
SLOW_TESTS = ("test_lipsync_render_", "test_large_templates", "test_valid_but_odd_input_renders_correctly",
              "test_a_disk_that_fills_mid_job")


#: The session-wide fixtures that start a Ray (the `runtime` fixture's and the `service`'s `lipsync
#: serve`): under pytest-xdist (`-n 3` in pyproject.toml, `--dist loadgroup`) every test that uses one
#: runs on the same worker as the others that use it, so each starts once.
SESSION_GROUPS = (("service", "session-service"), ("runtime", "session-ray"))

#: The groups that take longest (seconds under `-n 3` on a 2-core Intel Xeon, 2026-12-05: the session
#: service ~380, multinode ~220, the session Ray ~200, the restart file ~180, the CLI ~170, deploy ~100,
#: the soak ~70, render cases ~40), handed to the workers first (`--no-loadscope-reorder`: in this
#: order, not by test count), so that no long group starts last on one worker while the others are idle.
LONGEST_GROUPS = ("session-service", "test_multinode", "test_service_restart", "session-ray", "test_deploy_local",
                  "test_cli", "test_soak", "test_render_cases", "test_scheduling", "test_hostile_inputs")
#: Small groups that mostly wait (a slow-drip time limit, retries' backoff, sleeps), handed out next:
#: at the end of the run, when the cores have room, only groups that keep them busy are left.
WAITING_GROUPS = ("test_url_guard", "test_client_retries", "test_perf", "test_live", "test_live_playlist")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which turns `xdist_group` into the nodeid's "@group"
def pytest_collection_modifyitems(config, items):
    """Every test that needs Ray, or is listed above, is also `slow`: `pytest -m "not slow"` is
    the quick inner loop; plain `pytest` runs everything.
    Each test also gets its `xdist_group` (`--dist loadgroup`): the group of the session fixture it
    uses, else its module (so a module's own fixtures start once). With `--dist load` each worker
    started its own session service and session Ray: 632 s on 2 cores, against 545 s on the same
    machine an hour apart (2026-12-05; fresh clones since: 505-584 s)."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (item.get_closest_marker("ray") is not None or module in SLOW_MODULES
                or item.name.startswith(SLOW_TESTS)):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("xdist_group") is None:
            fixtures = set(getattr(item, "fixturenames", ()))
            group = next((g for name, g in SESSION_GROUPS if name in fixtures), module)
            item.add_marker(pytest.mark.xdist_group(group))
    rank = {group: k for k, group in enumerate(LONGEST_GROUPS + WAITING_GROUPS)}
    items.sort(key=lambda item: rank.get(item.get_closest_marker("xdist_group").args[0], len(rank)))


#: Session fixtures that start processes (`SESSION_GROUPS`), stopped once their group's last test
#: has run instead of idling beside the other groups until the worker ends (their teardown, at the
#: session's end, is then a no-op): name -> stop function, filled when the fixture starts.
_STOPPERS: dict = {}
_STOPPED: set = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name in list(_STOPPERS):
        if name in getattr(item, "fixturenames", ()) and (
                nextitem is None or name not in getattr(nextitem, "fixturenames", ())):
            _STOPPERS.pop(name)()
            _STOPPED.add(name)


def pytest_runtest_setup(item):
    stopped = _STOPPED & set(getattr(item, "fixturenames", ()))
    if stopped:  # cannot happen while each session fixture's tests run together (loadgroup): say so if it does
        pytest.fail(f"the session fixture(s) {sorted(stopped)} were stopped after their group's last test")


def pytest_configure(config):
    """Ray's token file is created (0600) before any worker starts a Ray: two Rays started
    at once by two xdist workers must not each write their own token to it."""
    if not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None):
        from actors.runtime import private_token_file

        private_token_file()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    d = _ROOT / "media"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def speech_wav(media_dir) -> str:
    """3.2 s of speech-like audio with pauses, 16-bit wav."""
    from cluster.synth import speech_like, write_audio

    return write_audio(str(media_dir / "speech.wav"), speech_like(3.2, seed=1))


@pytest.fixture(scope="session")
def astronaut_video(media_dir) -> str:
    """A 2 s, 320x240, 25 fps template of a real photographed face with head motion (no audio)."""
    from cluster.synth import astronaut_template

    return astronaut_template(str(media_dir / "astronaut.mp4"), seconds=2.0, fps=25, size=(320, 240))


# --- Ray: one instance for the whole session --------------------------------------------------
RAY_TEST_SETTINGS = dict(model_workers=2, compositors=2, chunk_seconds=1.0, batch_size=8,
                         batch_timeout_s=10.0, stall_timeout_s=60.0, max_chunk_attempts=2,
                         model_load_timeout_s=180.0, keep_segments=True)


@pytest.fixture(scope="session")
def ray_settings():
    from cluster.config import Settings

    return Settings(**RAY_TEST_SETTINGS)


@pytest.fixture(scope="session")
def runtime(ray_settings):
    """The job manager on a session-wide Ray with 8 logical CPUs and 2 logical GPUs."""
    import ray

    from actors.runtime import EMBEDDED_RAY_SYSTEM_CONFIG, Runtime, _ray_params_for_jobs

    for attempt in (1, 2, 3):
        try:
            # as `lipsync render` starts its Ray: no worker prestarted per logical CPU, no monitors
            # (these tests read no Ray logs and need no autoscaler), less for 2 cores to carry
            with _ray_params_for_jobs():
                ray.init(address="local", num_cpus=8, num_gpus=2, namespace=ray_settings.namespace,
                         include_dashboard=False, log_to_driver=False, _system_config=EMBEDDED_RAY_SYSTEM_CONFIG)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this one
            # Ray gives its raylet a fixed 30 s to register: an overloaded machine misses it (as
            # `lipsync serve` does, actors/runtime.py, start again)
            if "timed out during startup" not in str(e) or attempt == 3:
                raise
            ray.shutdown()
    rt = Runtime(ray_settings)
    state = rt.ready(timeout=240)
    assert any(m["health"] == "live" for m in state["models"]), state
    _STOPPERS["runtime"] = ray.shutdown
    yield rt
    ray.shutdown()


@pytest.fixture(scope="session")
def speech4_wav(media_dir) -> str:
    """4 s of speech-like audio: 100 frames at 25 fps, 4 chunks of 1 s in the Ray tests."""
    from cluster.synth import speech_like, write_audio

    return write_audio(str(media_dir / "speech4.wav"), speech_like(4.0, seed=7))


# --- the hostile input corpus (tests/corpus.py) -----------------------------------------------
@pytest.fixture(scope="session")
def hostile_corpus():
    """Every hostile and odd input of issue 12 under one input root, with canaries outside it."""
    from tests.corpus import build_corpus

    corpus = build_corpus(_ROOT / "corpus" / "root", _ROOT / "corpus" / "outside")
    yield corpus
    corpus.canaries.close()


# --- the HTTP service: one real `lipsync serve` for the session --------------------------------
LIVE_CPU_SHARE = "0.02"
LIVE_MEMORY_RESERVE_MB = "100000000"  # more than any node has: a second session is refused for memory too


@pytest.fixture(scope="session")
def service():
    """A running `lipsync serve` on a free loopback port (token auth on, input root and compat data
    directory set): `.url`, `.token`, `.storage_root`, `.input_root`, `.compat_dir`. Its live
    capacity is tiny (`LIVE_CPU_SHARE`, `LIVE_MEMORY_RESERVE_MB`): one live session runs at a time (a
    node with none running always admits one), a second is refused by its measured load and memory
    (test_live_service). At most 4 job event streams are open at once (test_service)."""
    from tests.service_process import ServiceProcess

    svc = ServiceProcess(_ROOT / "service", env={"LIPSYNC_LIVE_CPU_SHARE": LIVE_CPU_SHARE,
                                                 "LIPSYNC_LIVE_MEMORY_RESERVE_MB": LIVE_MEMORY_RESERVE_MB,
                                                 "LIPSYNC_MAX_EVENT_STREAMS": "4"}).start()
    _STOPPERS["service"] = svc.cleanup
    yield svc
    svc.cleanup()


@pytest.fixture(scope="session")
def live_avatar(service, astronaut_video) -> str:
    """An avatar prepared on the session's service from the 2 s 320x240 template (live sessions,
    the web page's Live tab)."""
    import httpx

    with open(astronaut_video, "rb") as f:
        r = httpx.post(f"{service.url}/v1/avatars", headers={"Authorization": f"Bearer {service.token}"},
                       files={"video": ("astronaut.mp4", f, "video/mp4")}, timeout=300)
    assert r.status_code == 201, r.text
    return r.json()["id"]
