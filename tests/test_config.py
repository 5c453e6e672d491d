"""Settings (`cluster.config`, env prefix LIPSYNC_): values that would break later are refused now."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster.config import Settings


@pytest.mark.parametrize("field", ["probe_timeout_s", "ffmpeg_timeout_s", "batch_timeout_s", "chunk_timeout_s",
                                   "stall_timeout_s", "model_load_timeout_s", "actor_call_timeout_s",
                                   "job_timeout_s"])
def test_a_deadline_of_zero_or_less_is_refused(field, tmp_path):
    """`LIPSYNC_ACTOR_CALL_TIMEOUT_S=0` made every submission time out at once."""
    for value in (0, -1):
        with pytest.raises(ValidationError, match=field):
            Settings(storage_root=tmp_path, **{field: value})


def test_an_empty_storage_root_is_refused_and_a_model_under_home_is_expanded(monkeypatch, tmp_path):
    """`LIPSYNC_STORAGE_ROOT=` was the current directory; `LIPSYNC_MODEL=~/m.onnx` was looked for
    under a directory named `~`."""
    monkeypatch.setenv("LIPSYNC_STORAGE_ROOT", "")
    with pytest.raises(ValidationError, match="storage_root"):
        Settings()
    monkeypatch.setenv("LIPSYNC_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("LIPSYNC_MODEL", "~/models/m.onnx")
    assert Settings().model == str(Path.home() / "models" / "m.onnx")
    monkeypatch.setenv("LIPSYNC_MODEL", "builtin")
    assert Settings().model == "builtin"
    monkeypatch.setenv("LIPSYNC_MODEL", " ")  # was made the current directory, and failed to load as one
    with pytest.raises(ValidationError, match="(?s)model.*is empty: expected 'builtin'"):
        Settings()


def test_a_gpu_share_above_one_must_be_whole(tmp_path):
    """Ray places fractions of one GPU only: 1.5 was accepted and failed at placement."""
    with pytest.raises(ValidationError, match="worker_gpus"):
        Settings(storage_root=tmp_path, worker_gpus=1.5)
    assert Settings(storage_root=tmp_path, worker_gpus=2).worker_gpus == 2
    assert Settings(storage_root=tmp_path, worker_gpus=0.25).worker_gpus == 0.25


def test_serve_replicas_get_what_the_builder_was_given_and_read_the_rest_themselves(monkeypatch, tmp_path):
    """Serve's build task may run on another node than the ingress replicas: a setting that node
    lacks (its default, e.g. no API token) must not override the replicas' own environment; what
    the builder was given (the config's args, its LIPSYNC_* environment) is passed on, the token as
    its value."""
    from service.deployment import build_app

    for name in [k for k in os.environ if k.startswith("LIPSYNC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LIPSYNC_STORAGE_ROOT", str(tmp_path))
    (args,) = build_app({"crf": 20})._bound_deployment.init_args
    assert args == {"storage_root": str(tmp_path), "crf": 20}  # no api_token: the replica's env decides
    monkeypatch.setenv("LIPSYNC_API_TOKEN", "s3cret-token")
    monkeypatch.setenv("LIPSYNC_CALLBACK_SECRET", "hook-secret")
    (args,) = build_app()._bound_deployment.init_args
    assert args["api_token"] == "s3cret-token"
    # every secret travels as its value (a JSON dump masks it as "**********": callbacks were signed with that)
    assert Settings(**args).callback_key() == "hook-secret"
    assert Settings(**Settings().overrides()).callback_key() == "hook-secret"
    # the ingress goes where the job manager goes (`lipsync serve` on a cluster placed it on any node)
    assert build_app()._bound_deployment.ray_actor_options == {"num_cpus": 0}
    monkeypatch.setenv("LIPSYNC_MANAGER_RESOURCE", "lipsync_head")
    assert build_app()._bound_deployment.ray_actor_options["resources"] == {"lipsync_head": 0.01}


def test_callbacks_are_signed_with_their_own_secret_where_one_is_set(tmp_path):
    """A webhook receiver verifies signatures with the key they were made with: the callback
    secret where one is set (it then never holds the API token), else the API token."""
    from cluster.callbacks import sign, verify

    both = Settings(storage_root=tmp_path, api_token="api-token-1", callback_secret="hook-secret")
    assert both.callback_key() == "hook-secret"
    assert verify(b"{}", "hook-secret", sign(b"{}", both.callback_key()))
    assert not verify(b"{}", "api-token-1", sign(b"{}", both.callback_key()))
    assert Settings(storage_root=tmp_path, api_token="api-token-1").callback_key() == "api-token-1"
    assert Settings(storage_root=tmp_path).callback_key() is None


def test_docs_settings_lists_every_setting_with_what_it_does():
    """docs/SETTINGS.md is `python -m cluster.config`'s output: every setting there with its default and a
    description (sixteen settings, the deadlines among them, were documented nowhere)."""
    from cluster.config import settings_reference

    undescribed = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not undescribed, f"settings without a description: {undescribed}"
    reference = settings_reference()
    for name in Settings.model_fields:
        assert f"| `LIPSYNC_{name.upper()}` |" in reference, name
    docs = Path(__file__).resolve().parents[1] / "docs" / "SETTINGS.md"
    assert docs.read_text() == reference, "docs/SETTINGS.md is stale: python -m cluster.config > docs/SETTINGS.md"


@pytest.mark.parametrize("variable", ["LIPSYNC_API_TOKEN", "LIPSYNC_CALLBACK_SECRET"])
def test_a_secret_that_is_set_but_blank_is_refused(variable, monkeypatch, tmp_path):
    """`LIPSYNC_API_TOKEN=` (a k8s secret without its key, an empty EnvironmentFile line) was a
    token that is not None, so `lipsync serve --host 0.0.0.0` let it pass as "a token is set",
    while the app read it as false and installed no authentication: an open API on the network."""
    monkeypatch.setenv("LIPSYNC_STORAGE_ROOT", str(tmp_path))
    for blank in ("", "  "):
        monkeypatch.setenv(variable, blank)
        with pytest.raises(ValidationError, match=f"is set but empty \\({variable}=\\)"):
            Settings()
    monkeypatch.setenv(variable, "a-value")
    assert Settings().callback_key() == "a-value"


def test_a_retention_time_the_sweep_cannot_use_is_refused(tmp_path):
    """`LIPSYNC_RETENTION_DAYS=inf` (or 1e10) made every sweep fail with OverflowError, for ever."""
    for value in (float("inf"), 1e10):
        with pytest.raises(ValidationError, match="retention_days"):
            Settings(storage_root=tmp_path, retention_days=value)
    assert Settings(storage_root=tmp_path, retention_days=30).retention_days == 30


def test_settings_read_only_at_a_jobs_encode_are_checked_at_start(tmp_path):
    """`LIPSYNC_AUDIO_BITRATE=abc` was parsed at each job's AAC encode (a traceback for `render --local`,
    `render.failed` after 21 s through Ray, every job of a service failed); a misspelt x264 preset failed
    every job's normalisation. Both are refused when the settings are read."""
    for bad in ("abc", "-5k", "600k", "7999"):
        with pytest.raises(ValidationError, match="not an AAC bitrate of 8k-512k"):
            Settings(storage_root=tmp_path, audio_bitrate=bad)
    assert Settings(storage_root=tmp_path, audio_bitrate=" 96k").audio_bitrate == "96k"
    assert Settings(storage_root=tmp_path, audio_bitrate="128000").audio_bitrate == "128000"
    assert Settings(storage_root=tmp_path, audio_bitrate="96000.5").audio_bitrate == "96000"  # what AAC takes
    for field in ("preset", "live_preset"):
        with pytest.raises(ValidationError, match="'ultrafast', 'superfast'"):
            Settings(storage_root=tmp_path, **{field: "bogus"})


def test_relative_paths_in_settings_are_made_absolute_for_processes_that_run_elsewhere(tmp_path, monkeypatch):
    """An embedded Ray's processes run in a directory of their own (not the user's, which Ray put on their
    module path): a storage root, model, ffmpeg, compat directory or input root given relative to the
    user's directory is made absolute, in the settings handed to them and in the environment they inherit;
    names that are not paths are left as they are."""
    import os

    from actors.runtime import absolute_path_variables
    from cluster.config import Settings

    monkeypatch.chdir(tmp_path)
    s = Settings(storage_root="store", model="models/x.onnx", ffmpeg="bin/ffmpeg", compat_data_dir="compat",
                 input_roots="media:/srv/in")
    assert (s.storage_root, s.model, s.ffmpeg, s.compat_data_dir, s.input_roots) == (
        (tmp_path / "store").resolve(), str(tmp_path / "models/x.onnx"), str(tmp_path / "bin/ffmpeg"),
        (tmp_path / "compat").resolve(), f"{tmp_path / 'media'}:/srv/in")
    for model in ("builtin", "builtin:96", "latency:5", "latency:2.5:96"):
        assert Settings(model=model).model == model
    assert Settings(ffmpeg="ffmpeg").ffmpeg == "ffmpeg"  # looked up on PATH
    for name, value in (("LIPSYNC_STORAGE_ROOT", "store"), ("LIPSYNC_MODEL", "builtin:96"),
                        ("LIPSYNC_FFMPEG", "ffmpeg"), ("LIPSYNC_INPUT_ROOTS", "media::/srv/in"),
                        ("LIPSYNC_COMPAT_DATA_DIR", "compat")):
        monkeypatch.setenv(name, value)
    absolute_path_variables()
    assert os.environ["LIPSYNC_STORAGE_ROOT"] == str(tmp_path / "store")
    assert os.environ["LIPSYNC_MODEL"] == "builtin:96" and os.environ["LIPSYNC_FFMPEG"] == "ffmpeg"
    assert os.environ["LIPSYNC_INPUT_ROOTS"] == f"{tmp_path / 'media'}::/srv/in"
    assert os.environ["LIPSYNC_COMPAT_DATA_DIR"] == str(tmp_path / "compat")


def test_a_variable_that_names_no_setting_is_found_and_kubernetes_service_links_are_not():
    """`unknown_variables`: a misspelt setting is named with the one it may have meant; what Kubernetes sets in
    every pod for the namespace's Services (`lipsync-api` gives LIPSYNC_API_SERVICE_HOST, ...) and the variables
    of the client, tests and benchmarks are not settings, and not mistakes."""
    from cluster.config import unknown_variables

    fine = ["LIPSYNC_API_SERVICE_HOST", "LIPSYNC_API_SERVICE_PORT", "LIPSYNC_API_SERVICE_PORT_HTTP", "LIPSYNC_API_PORT",
            "LIPSYNC_API_PORT_8000_TCP", "LIPSYNC_API_PORT_8000_TCP_ADDR", "LIPSYNC_API_PORT_8000_TCP_PROTO",
            "LIPSYNC_HEAD_SVC_SERVICE_PORT_GCS_SERVER", "LIPSYNC_BATCH_HEAD_SVC_PORT_6379_TCP_PORT", "LIPSYNC_URL",
            "LIPSYNC_TEST_ARTIFACTS", "LIPSYNC_BENCH_CACHE", "LIPSYNC_CRF", "lipsync_crf", "PATH"]
    assert unknown_variables({name: "x" for name in fine}) == []
    assert unknown_variables({"LIPSYNC_API_TOKNE": "s", "LIPSYNC_NOTHING_LIKE_IT": "1"}) == [
        "LIPSYNC_API_TOKNE is not a setting (did you mean LIPSYNC_API_TOKEN?)",
        "LIPSYNC_NOTHING_LIKE_IT is not a setting"]


def test_deadlines_that_nest_must_nest(tmp_path, capsys, monkeypatch):
    """A chunk deadline of 30 s under batches of 20 s (two held per model worker) killed compositors whose
    batches waited for a stalled model worker, before the batch's own deadline sent them elsewhere (a
    probe; the job still succeeded). Refused now, naming the variables, by the settings and by `lipsync`."""
    with pytest.raises(ValidationError, match=r"LIPSYNC_CHUNK_TIMEOUT_S \(30\) must exceed LIPSYNC_BATCH_TIMEOUT_S"):
        Settings(storage_root=tmp_path, chunk_timeout_s=30, batch_timeout_s=20)
    assert Settings(storage_root=tmp_path, job_timeout_s=600).job_timeout_s == 600  # (it bounds everything: allowed)
    assert Settings(storage_root=tmp_path, chunk_timeout_s=41, batch_timeout_s=20).chunk_timeout_s == 41

    from cluster import cli

    monkeypatch.setenv("LIPSYNC_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("LIPSYNC_CHUNK_TIMEOUT_S", "30")
    monkeypatch.setenv("LIPSYNC_BATCH_TIMEOUT_S", "20")
    assert cli.main(["render", "--audio", "a.wav", "--video", "v.mp4", "-o", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lipsync: error: settings.invalid: LIPSYNC_CHUNK_TIMEOUT_S (30) must exceed"), err
    assert "Value error" not in err and "LIPSYNC_SETTINGS" not in err
