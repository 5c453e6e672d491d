"""Security promises of issue 12 that are properties of the code as written: every media open is
limited to the file and pipe protocols; the hostile corpus's network playlists never reach the
network (tests/test_hostile_inputs.py watches the canaries)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted([*REPO.glob("cluster/**/*.py"), *REPO.glob("actors/**/*.py"), *REPO.glob("service/**/*.py"),
                  *REPO.glob("serve_app.py")])
#: Files whose ffmpeg inputs are only files they created themselves (the test/demo synthesiser).
OWN_FILES_ONLY = {"cluster/synth.py"}


def _calls(text: str, opener: str) -> list[str]:
    """The text of each call `opener(...)` (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(opener) + r"\(", text):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        out.append(text[m.start(): i + 1])
    return out


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_media_open_is_limited_to_file_and_pipe(path):
    rel = str(path.relative_to(REPO))
    text = path.read_text()
    for call in _calls(text, "av.open"):
        assert "file_url(" in call and '"protocol_whitelist": "file"' in call, f"{rel}: {call}"
    for call in _calls(text, "ffmpeg.input"):  # ffmpeg-python
        assert "protocol_whitelist=" in call and "file_url(" in call, f"{rel}: {call}"
    if rel in OWN_FILES_ONLY or rel == "cluster/media/ffmpeg.py":
        return
    for m in re.finditer(r'"-i",\s*([^,\]\)]+)', text):  # raw ffmpeg argument lists
        assert m.group(1).strip() == '"pipe:0"', f"{rel}: ffmpeg input {m.group(0)!r} bypasses input_args()"


def test_input_args_never_turn_a_name_into_a_protocol_or_option():
    from cluster.media.ffmpeg import input_args

    for name in ("http://169.254.169.254/latest", "concat:/etc/passwd|/etc/hosts", "-f", "rtp://1.2.3.4:5",
                 "subfile,,start,0,end,0,,:/etc/passwd"):
        args = input_args(name)
        assert args[:3] == ["-protocol_whitelist", "file,pipe", "-i"]
        assert args[3].startswith("file:/"), args


@pytest.mark.ray
def test_the_embedded_ray_refuses_a_client_without_its_token(runtime, tmp_path):
    """Token authentication is on in local mode: a process that joins the session's Ray without
    the token (no RAY_AUTH_*, an empty HOME so no ~/.ray/auth_token) is refused."""
    import os
    import subprocess
    import sys

    import ray

    gcs = ray.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)
    # Ray tries a refused connection to the GCS 20 times, 1 s apart, before it gives up: 3 are
    # enough to see the refusal (the answer is the same each time); no authentication setting
    env["RAY_NUM_REDIS_GET_RETRIES"] = "3"
    script = f"import ray\nray.init(address={gcs!r}, log_to_driver=False)\nprint('JOINED')"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode != 0 and "JOINED" not in proc.stdout
    assert "AuthenticationError" in proc.stderr and "token is missing or incorrect" in proc.stderr, proc.stderr[-2000:]


def test_an_embedded_rays_token_file_is_private(tmp_path, monkeypatch):
    """The token file an embedded Ray uses: created 0600 in a 0700 directory (Ray's own format),
    an existing 0644 one (as Ray writes it) tightened and kept; none with RAY_AUTH_TOKEN."""
    import os
    import stat

    from actors.runtime import private_token_file

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "new"))
    made = private_token_file()
    assert made == tmp_path / "new" / ".ray" / "auth_token" and len(made.read_text().strip()) >= 32
    assert stat.S_IMODE(made.stat().st_mode) == 0o600 and stat.S_IMODE(made.parent.stat().st_mode) == 0o700

    path = tmp_path / "given" / "token"
    path.parent.mkdir(mode=0o755)
    path.write_text("existing")
    os.chmod(path, 0o644)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert private_token_file() == path and path.read_text() == "existing"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    monkeypatch.setenv("RAY_AUTH_TOKEN", "t" * 32)
    assert private_token_file() is None


def test_an_embedded_rays_sessions_live_in_a_private_directory(tmp_path):
    """Ray makes its root and session directories 0777 (in every worker it starts): they go inside
    a 0700 directory of this user's (tightened when wider); one of another user's is refused."""
    import os
    import stat

    from actors.runtime import private_ray_root
    from cluster.errors import RenderError

    given = tmp_path / "rt"
    given.mkdir(mode=0o755)
    os.chmod(given, 0o755)
    assert private_ray_root(str(given)) == given / "ray"
    assert stat.S_IMODE(given.stat().st_mode) == 0o700
    default = private_ray_root()
    assert default.name == "ray" and default.parent.name == f"lipsync-{os.getuid()}"
    assert stat.S_IMODE(default.parent.stat().st_mode) == 0o700
    if os.getuid() == 0:  # a directory squatted by another user (here: nobody) is not used
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        with pytest.raises(RenderError, match="belongs to another user"):
            private_ray_root(str(other))


def test_the_ingress_temporary_directory_is_this_users_own(tmp_path, monkeypatch):
    """Uploads in flight pass through the ingress's temporary directory, at a predictable path in
    a shared /tmp: one another user made first (or a link planted there) is not used."""
    import os
    import stat
    import tempfile

    from service.backend import private_dir

    fallback = tmp_path / "tmp"  # where the private ones are made (not the machine's /tmp: one per run stayed there)
    fallback.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(fallback))

    mine = private_dir(tmp_path / "mine")
    assert mine == tmp_path / "mine" and stat.S_IMODE(os.stat(mine).st_mode) == 0o700
    if os.getuid() == 0:  # only root can hand a directory to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o777)
        os.chown(theirs, 4242, 4242)  # made by another user first
        other = private_dir(theirs)
        assert other != theirs and other.parent == fallback and stat.S_IMODE(os.stat(other).st_mode) == 0o700
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "planted").symlink_to(target)
    assert private_dir(tmp_path / "planted").parent == fallback
