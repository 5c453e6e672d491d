"""Inputs on the job manager's node: path inputs confined to input_roots, uploads content-addressed."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cluster.config import Settings
from cluster.errors import InputError, InputNotFound, InputOutsideRoots, InputTooLarge
from cluster.inputs import UploadCorrupt, UploadNotFound, UploadStore, resolve_input_path, upload_ref_path


@pytest.fixture()
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    secret = tmp_path / "secret"
    allowed.mkdir()
    secret.mkdir()
    (allowed / "a.wav").write_bytes(b"a")
    (secret / "s.wav").write_bytes(b"s")
    settings = Settings(storage_root=tmp_path / "storage", input_roots=f"{allowed}")
    return settings, allowed, secret


def test_path_under_a_root_resolves(roots):
    settings, allowed, _ = roots
    assert resolve_input_path(str(allowed / "a.wav"), settings) == (allowed / "a.wav").resolve()


@pytest.mark.parametrize("how", ["dotdot", "symlink", "outside", "relative"])
def test_paths_leaving_the_roots_are_refused_by_name(roots, how):
    settings, allowed, secret = roots
    if how == "dotdot":
        path = f"{allowed}/../secret/s.wav"
    elif how == "symlink":
        os.symlink(secret / "s.wav", allowed / "link.wav")
        path = str(allowed / "link.wav")
    elif how == "outside":
        path = str(secret / "s.wav")
    else:
        path = "allowed/a.wav"
    with pytest.raises(InputOutsideRoots) as e:
        resolve_input_path(path, settings)
    assert e.value.code == "input.outside_roots" and path in e.value.message and e.value.path == path
    assert e.value.exit_code == 2 and not e.value.retryable


def test_a_path_outside_the_roots_is_not_looked_at_nor_said_where_it_leads(roots):
    """A service's answer told where a path outside the roots led: "/proc/self/exe (resolved:
    /root/.pyenv/.../python3.11)", the ingress's open files through /proc/self/fd/N, `~postgres/x.wav`
    (resolved: /var/lib/postgresql/x.wav), and "Permission denied" for /proc/1/cwd. Now each is refused as
    written, and a symlink out of a root is refused without its target."""
    settings, allowed, secret = roots
    os.symlink(secret / "s.wav", allowed / "link.wav")
    for path in ("/proc/self/exe", "/proc/self/fd/0", "/proc/1/cwd/x.wav", "~root/x.wav", "~/x.wav",
                 f"{allowed}/../secret/s.wav", str(allowed / "link.wav")):
        with pytest.raises(InputOutsideRoots) as e:
            resolve_input_path(path, settings)
        said = e.value.message.replace(path, "<path>").replace(str(allowed), "<root>")
        assert "/" not in said and e.value.path == path, said  # no path but the one given and the root


def test_no_roots_configured_refuses_every_path(roots):
    settings, allowed, _ = roots
    with pytest.raises(InputOutsideRoots, match="none configured"):
        resolve_input_path(str(allowed / "a.wav"), settings.model_copy(update={"input_roots": ""}))


def test_paths_the_system_cannot_take_are_the_inputs_mistake(roots):
    """A NUL character, a name longer than the file system takes, a symlink loop: the system's ValueError
    and OSError (ENAMETOOLONG, ELOOP) became the job manager's `render.failed`, HTTP 500. Now each is
    `input.invalid` naming the path (HTTP 400)."""
    settings, allowed, _ = roots
    os.symlink(allowed / "loop.wav", allowed / "loop.wav")
    for path in (f"{allowed}/a\0.wav", f"{allowed}/{'x' * 300}.wav", str(allowed / "loop.wav")):
        with pytest.raises(InputError) as e:
            resolve_input_path(path, settings)
        assert e.value.code == "input.invalid" and e.value.path == path, e.value


def test_missing_file_under_a_root_is_not_found(roots):
    settings, allowed, _ = roots
    with pytest.raises(InputNotFound):
        resolve_input_path(str(allowed / "nope.wav"), settings)


def test_upload_in_parts_is_content_addressed(tmp_path):
    settings = Settings(storage_root=tmp_path / "storage")
    store = UploadStore(settings)
    data = os.urandom(3000)
    refs = []
    for _ in range(2):
        up = store.begin("speech.WAV")
        assert store.part(up, data[:1000]) == 1000
        assert store.part(up, data[1000:]) == 3000
        refs.append(store.finish(up, hashlib.sha256(data).hexdigest()))
    assert refs[0] == refs[1]
    assert refs[0].ref == f"upload:{hashlib.sha256(data).hexdigest()}.wav" and refs[0].size == 3000
    assert upload_ref_path(refs[0].ref, settings).read_bytes() == data
    assert list((settings.storage_root / "uploads").iterdir()) == []  # no part files left


def test_errors_and_views_of_an_uploaded_input_name_its_file_not_its_reference(tmp_path, monkeypatch):
    """A JSON job or batch naming `upload:<sha256>.wav` (the SDK's batches upload first) was told
    "upload:1d7a…5a.wav is not a readable audio/video file": five audios, no way to tell which. The
    stored upload keeps the name it came under, and admission names the file by it (errors, the view)."""
    from cluster.render import admit_on_manager
    from cluster.schemas import JobStatus, RenderRequest, utcnow
    from cluster.views import job_view

    settings = Settings(storage_root=tmp_path / "storage")
    store = UploadStore(settings)
    refs = {}
    for name, data in (("bad take 3.wav", b"not audio"), ("face.mp4", b"not video either")):
        up = store.begin(name)
        store.part(up, data)
        refs[name] = store.finish(up).ref
    with pytest.raises(InputError) as refused:
        admit_on_manager("job-1", RenderRequest(audio=refs["bad take 3.wav"], video=refs["face.mp4"]), settings)
    assert "bad take 3.wav" in refused.value.message and "upload:" not in refused.value.message, refused.value
    assert refused.value.field == "audio"  # the API's `field` (its path names the file, not the reference)
    from cluster.synth import speech_like, write_audio

    # one file as both: the field of the probe that refused it (a speech file as the video was said as "audio")
    speech = write_audio(str(tmp_path / "speech.wav"), speech_like(0.5, seed=3))
    up = store.begin("speech.wav")
    store.part(up, Path(speech).read_bytes())
    ref = store.finish(up).ref
    with pytest.raises(InputError) as refused:
        admit_on_manager("job-3", RenderRequest(audio=ref, video=ref), settings)
    assert refused.value.code == "input.no_video_stream" and refused.value.field == "video", refused.value
    assert "inputs/" not in refused.value.message
    # the view's inputs (the Jobs tab's row) by name too: the request as admission hands it on to be stored
    import cluster.render

    admitted = []
    monkeypatch.setattr(cluster.render, "admit", lambda job_id, request, s, link: admitted.append(request))
    admit_on_manager("job-2", RenderRequest(audio=refs["bad take 3.wav"], video=refs["face.mp4"]), settings)
    view = job_view(JobStatus(id="job-2", state="queued", created_at=utcnow(), request=admitted[0]))
    assert view.inputs == {"audio": "bad take 3.wav", "video": "face.mp4"}, view.inputs


def test_an_uploads_name_is_kept_without_control_characters(tmp_path):
    """The name an upload came under is shown in errors, the Jobs tab and a shell's listing: a client's
    escape sequence or line break in it is dropped (it reached a user's terminal as it was sent), and the
    last upload of the same bytes names them."""
    from cluster.inputs import upload_name

    settings = Settings(storage_root=tmp_path / "storage")
    store = UploadStore(settings)
    for name, shown in (("dir/take\x1b[31m 3\n.wav", "take[31m 3.wav"),
                        ("again.wav", "again.wav")):
        up = store.begin(name)
        store.part(up, b"the same bytes")
        assert upload_name(upload_ref_path(store.finish(up).ref, settings), settings) == shown, name


def test_an_upload_part_sent_again_is_stored_once(tmp_path):
    """The service's gateway and the batch client send a part again when its answer was lost or
    late although the part had arrived: with its offset it is stored once (without one the
    input would hold it twice and render as another file); a part that leaves a gap is refused."""
    settings = Settings(storage_root=tmp_path / "storage")
    store = UploadStore(settings)
    data = os.urandom(3000)
    up = store.begin("speech.wav")
    assert store.part(up, data[:1000], 0) == 1000
    assert store.part(up, data[:1000], 0) == 1000  # the retry of a part that had arrived
    assert store.part(up, data[1000:2000], 1000) == 2000
    with pytest.raises(UploadCorrupt, match="byte 2500"):
        store.part(up, data[2500:], 2500)  # a part lost in between
    assert store.part(up, data[2000:], 2000) == 3000
    stored = store.finish(up, hashlib.sha256(data).hexdigest())
    assert upload_ref_path(stored.ref, settings).read_bytes() == data


def test_upload_limits_checksum_and_unknown_ids(tmp_path):
    settings = Settings(storage_root=tmp_path / "storage", max_upload_bytes=100)
    store = UploadStore(settings)
    up = store.begin("big.mp4")
    with pytest.raises(InputTooLarge, match="big.mp4"):
        store.part(up, b"x" * 101)
    with pytest.raises(UploadNotFound):  # aborted with the error
        store.part(up, b"x")
    up = store.begin("v.mp4")
    store.part(up, b"abc")
    with pytest.raises(UploadCorrupt):
        store.finish(up, "0" * 64)
    with pytest.raises(InputNotFound):
        upload_ref_path("upload:../../etc/passwd", settings)
    assert list((settings.storage_root / "uploads").iterdir()) == []


def test_hard_links_and_non_files_under_a_root_are_refused(roots):
    settings, allowed, secret = roots
    os.link(secret / "s.wav", allowed / "hard.wav")
    with pytest.raises(InputOutsideRoots, match="hard link"):
        resolve_input_path(str(allowed / "hard.wav"), settings)
    (allowed / "dir.wav").mkdir()  # a directory is a mistake (input.invalid), not outside the roots
    with pytest.raises(InputError, match="is a directory, not a file") as info:
        resolve_input_path(str(allowed / "dir.wav"), settings)
    assert info.value.code == "input.invalid"
    os.mkfifo(allowed / "pipe.wav")  # a pipe would block whoever reads it
    with pytest.raises(InputOutsideRoots, match="not a regular file"):
        resolve_input_path(str(allowed / "pipe.wav"), settings)


def test_an_upload_idle_past_the_timeout_is_removed_and_a_live_one_kept(tmp_path):
    """A client killed mid-upload (an ingress replica, a whole service) leaves a part file; the job
    manager sweeps it once idle, and leaves uploads that are still receiving parts alone."""
    settings = Settings(storage_root=tmp_path / "storage", upload_idle_timeout_s=60)
    store = UploadStore(settings)
    orphan, live = store.begin("a.wav"), store.begin("v.mp4")
    store.part(orphan, b"x" * 10)
    store.part(live, b"y" * 10)
    orphan_path = settings.dir("uploads") / f"{orphan}.part"
    old = orphan_path.stat().st_mtime - 120
    os.utime(orphan_path, (old, old))
    stranger = settings.dir("uploads") / "left-by-an-earlier-manager.part"  # not in this store's table
    stranger.write_bytes(b"z")
    os.utime(stranger, (old, old))

    assert store.expire() == 2
    assert not orphan_path.exists() and not stranger.exists()
    with pytest.raises(UploadNotFound):
        store.part(orphan, b"more")
    assert store.part(live, b"y") == 11 and store.finish(live).size == 11


def test_an_upload_on_a_full_or_read_only_disk_is_refused_as_resource_disk_and_keeps_no_half_part(
        tmp_path, monkeypatch):
    """ENOSPC or EROFS while an upload is stored answered HTTP 500 `render.failed` ("job manager
    upload_part failed: [Errno 28]"); it is `resource.disk` (507), and a part the disk cut off is not
    kept: the client's retry of the same part appends after the bytes counted, not after half a part."""
    import errno
    import io

    import cluster.inputs as inputs
    from cluster.errors import DiskFull
    from service.errors import http_status

    store = UploadStore(Settings(storage_root=tmp_path / "store"))
    up = store.begin("speech.wav")
    assert store.part(up, b"a" * 100, offset=0) == 100
    real_open = open

    class HalfWritten(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", self.name)

    monkeypatch.setattr(inputs, "open", lambda path, mode="r", *a, **k: HalfWritten(path, "a") if "a" in mode
                        else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(DiskFull) as full:
        store.part(up, b"b" * 100, offset=100)
    assert full.value.code == "resource.disk" and http_status(full.value) == 507
    assert full.value.message.startswith("the disk filled up during upload")
    monkeypatch.undo()
    assert store.part(up, b"b" * 100, offset=100) == 200  # the retry, once there is room
    stored = store.finish(up)
    assert upload_ref_path(stored.ref, store.s).read_bytes() == b"a" * 100 + b"b" * 100

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "store" / "uploads" / "x.part"))

    monkeypatch.setattr(inputs.Path, "write_bytes", read_only)
    with pytest.raises(DiskFull, match="the storage is read-only during upload"):
        store.begin("speech.wav")


def test_a_server_file_replaced_under_its_path_is_another_input(roots, tmp_path):
    """The same id sent again naming the same server path, whose file was replaced meanwhile, was answered the
    old job and its video (the job's key names paths, not contents). `changed_server_input` compares the file
    with the copy the job was admitted with: the job manager then refuses it as `job.conflict`. The same bytes,
    an upload reference, a file gone since, or a copy retention removed are the same job, as before."""
    from actors.orchestrator import changed_server_input
    from cluster.schemas import RenderRequest

    settings, allowed, _ = roots
    (allowed / "v.mp4").write_bytes(b"video")
    copies = tmp_path / "job" / "inputs"
    copies.mkdir(parents=True)
    (copies / "audio.wav").write_bytes(b"a")
    (copies / "video.mp4").write_bytes(b"video")
    had = RenderRequest(audio=str(copies / "audio.wav"), video=str(copies / "video.mp4"))
    again = RenderRequest(audio=str(allowed / "a.wav"), video=str(allowed / "v.mp4"))
    assert changed_server_input(again, had, settings) is None
    (allowed / "a.wav").write_bytes(b"b")  # replaced: the same size, other bytes
    assert "the audio file" in changed_server_input(again, had, settings)
    (allowed / "a.wav").write_bytes(b"a")
    (allowed / "v.mp4").write_bytes(b"another video")
    assert "the video file" in changed_server_input(again, had, settings)
    (allowed / "v.mp4").unlink()  # gone since: the job has its copy
    assert changed_server_input(again, had, settings) is None
    (copies / "audio.wav").unlink()  # its copy removed by retention: nothing to compare
    (allowed / "a.wav").write_bytes(b"c")
    assert changed_server_input(again, had, settings) is None
    upload = RenderRequest(audio="upload:" + "0" * 64 + ".wav", video=str(copies / "video.mp4"))
    assert changed_server_input(upload, had, settings) is None


def test_a_conflicting_resubmission_is_told_what_differs():
    """`job.conflict` said "already exists with other inputs or options", leaving the user to guess which:
    `request_differences` names them in the API's terms, and an input given as it was then (its path, the
    upload reference of the same bytes, a form's file) is not one of them."""
    from actors.orchestrator import request_differences
    from cluster.schemas import RenderRequest

    ref = "upload:" + "ab" * 32 + ".mp4"
    had = RenderRequest(audio="/job/inputs/audio.wav", video="/job/inputs/video.mp4", crf=18,
                        sources={"/srv/in/a.wav": "/srv/in/a.wav", "/job/inputs/audio.wav": "/srv/in/a.wav",
                                 "/store/inputs/" + ref[7:]: "face.mp4", "/job/inputs/video.mp4": "face.mp4"})
    same = RenderRequest(audio="/srv/in/a.wav", video=ref, crf=18)
    assert request_differences(same, had) == "the output path or the way an input was given differs"
    said = request_differences(same.model_copy(update={"crf": 20, "loop": "forward"}), had)
    assert said == "sync_mode loop, not pingpong; crf 20, not 18", said  # the API's value (forward inside)
    said = request_differences(same.model_copy(update={"audio": "/srv/in/b.wav", "video": None,
                                                       "avatar_id": "abcd1234"}), had)
    assert said == "avatar_id abcd1234, not unset; another audio; video not given now, given then", said
    assert request_differences(same, None) == "the job's request is no longer known"


def test_a_root_written_through_a_symlink_takes_paths_under_it_as_written_or_resolved(tmp_path):
    """A root configured through a symlink (macOS's /tmp, a mounted volume's link): a path under it as written,
    or under its target, is taken; a path through another alias of the target is refused, and the refusal names
    the root as configured with its target (it named only the target, which the path was in fact under)."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.wav").write_bytes(b"a")
    (tmp_path / "rootlink").symlink_to(real)
    (tmp_path / "alias").symlink_to(real)
    settings = Settings(storage_root=tmp_path / "storage", input_roots=str(tmp_path / "rootlink"))
    for given in (tmp_path / "rootlink" / "a.wav", real / "a.wav"):
        assert resolve_input_path(str(given), settings) == real / "a.wav"
    with pytest.raises(InputOutsideRoots) as refused:
        resolve_input_path(str(tmp_path / "alias" / "a.wav"), settings)
    assert f"{tmp_path / 'rootlink'} (= {real})" in refused.value.message, refused.value.message


def test_a_name_keeps_what_a_person_typed_and_loses_what_moves_a_terminal():
    """`display_name` dropped every character `isprintable()` refuses, a zero-width joiner in an emoji or a
    Persian name and a no-break space among them; controls, line breaks and bidi overrides go, and a name
    stored before names were cleaned is cleaned when read (`upload_name`)."""
    from cluster.views import display_name

    assert display_name("family \U0001F468\u200d\U0001F469.mp4") == "family \U0001F468\u200d\U0001F469.mp4"
    assert display_name("می\u200cخواهم\u00a0take.wav") == "می\u200cخواهم\u00a0take.wav"
    assert display_name("\x1b]0;x\x07a\u202egnp.wav\u2028\n") == "]0;xagnp.wav"


def test_an_upload_name_stored_before_names_were_cleaned_is_cleaned_when_read(tmp_path):
    from cluster.inputs import UPLOAD_NAMES, upload_name

    settings = Settings(storage_root=tmp_path / "storage")
    (settings.dir(UPLOAD_NAMES) / ("ab" * 32 + ".wav")).write_text("old\x1b[2J take.wav", encoding="utf-8")
    assert upload_name(tmp_path / ("ab" * 32 + ".wav"), settings) == "old[2J take.wav"
