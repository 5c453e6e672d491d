"""Multipart bodies as `service.uploads.Upload` reads them (in process, a real Starlette request):
a field given twice is refused with 422 `input.invalid` naming it, text field or file alike (a
second `id` silently became the job's idempotency key; a second file was a 400)."""
from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from service.errors import ApiProblem
from service.uploads import Upload


def _multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--B\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + b"--B--\r\n"


def _read(body: bytes, tmp_path) -> Upload:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"",
                       "headers": [(b"content-type", b"multipart/form-data; boundary=B")]}, receive)
    upload = Upload(tmp_path, max_bytes=1 << 20)
    asyncio.run(upload.read(request))
    return upload


def test_one_value_per_field_is_read(tmp_path):
    upload = _read(_multipart(("audio", "a.wav", b"RIFF"), ("id", None, b"job-1")), tmp_path)
    assert upload.fields == {"id": "job-1"} and upload.files["audio"][1] == "a.wav"


@pytest.mark.parametrize("parts,field", [
    ((("id", None, b"dupa"), ("id", None, b"dupb")), "id"),
    ((("audio", "a.wav", b"RIFF"), ("audio", "b.wav", b"RIFF")), "audio"),
    ((("video", None, b"https://example.com/v.mp4"), ("video", "v.mp4", b"....")), "video"),
])
def test_a_field_given_twice_is_refused_naming_it(parts, field, tmp_path):
    with pytest.raises(ApiProblem) as refused:
        _read(_multipart(*parts), tmp_path)
    assert (refused.value.status, refused.value.code, refused.value.field) == (422, "input.invalid", field)
    assert "given more than once" in refused.value.message


def test_a_body_cut_short_is_refused_not_taken_for_whole(tmp_path):
    """A body that ends before its closing boundary (a client or proxy that gave up mid-upload)
    was read as complete: its last file, half a wav, rendered a half-length video that succeeded."""
    whole = _multipart(("video", "v.mp4", b"...."), ("audio", "a.wav", b"RIFF" + b"\0" * 1000))
    cut = whole[:whole.index(b"--B--") - 500]
    with pytest.raises(ApiProblem) as refused:
        _read(cut, tmp_path)
    assert (refused.value.status, refused.value.code, refused.value.field) == (400, "input.invalid", "audio")
    assert "cut short" in refused.value.message
    assert _read(whole, tmp_path).files.keys() == {"video", "audio"}


@pytest.mark.parametrize("ctype,body,refused", [
    ("application/x-www-form-urlencoded", b"audio=x&video=y", True),
    ("text/plain", b"hello", True),
    ("application/x-www-form-urlencoded", b'{"audio": "a.wav"}', False),  # `curl -d '{...}'`: JSON, as always
    ("text/plain", b'{"audio": "a.wav"}', False),                         # fetch() with a string body
    ("application/json; charset=utf-8", b'{"audio": "a.wav"}', False), ("", b'{"audio": "a.wav"}', False),
    ("application/merge-patch+json", b'{"audio": "a.wav"}', False)])
def test_a_json_route_names_a_body_of_another_type_that_is_not_json(ctype, body, refused):
    """`curl -d 'audio=x&video=y'` (form-encoded) was 'Invalid JSON: expected value at line 1';
    JSON sent under another type is still read."""
    from cluster.schemas import JobCreate
    from service.uploads import json_body

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", ctype.encode())] if ctype else []
    request = Request({"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"", "headers": headers},
                      receive)
    if refused:
        with pytest.raises(ApiProblem) as e:
            asyncio.run(json_body(request, JobCreate, multipart_too=True))
        assert (e.value.status, e.value.code) == (415, "input.content_type") and ctype in e.value.message
        assert "multipart/form-data" in e.value.message
    else:
        assert asyncio.run(json_body(request, JobCreate)).audio == "a.wav"


@pytest.mark.parametrize("size", [44, 40_000])
def test_a_file_under_a_field_that_takes_none_is_refused_naming_the_field(size, tmp_path):
    """`-F sound=@speech.wav`: a large file was read as a text field ("sound: form field longer than 16384
    bytes", no field named), a small one was an extra input; either way the field is the mistake."""
    from cluster.errors import InputError

    with pytest.raises(InputError) as refused:
        _read(_multipart(("sound", "speech.wav", b"\0" * size), ("video", "v.mp4", b"....")), tmp_path)
    assert refused.value.field == "sound" and "a file in a form field that takes none" in refused.value.message


@pytest.mark.parametrize("size", [1000, 40_000])
def test_a_file_part_without_a_filename_is_told_it_needs_one(tmp_path, size):
    """A client that sends the audio's bytes without a filename in its part: they are read as a text field,
    and "audio: form field longer than 16384 bytes" did not say why; a small one was taken as a path, and the
    refusal echoed its binary bytes back (3.2 KB of escapes for 1000 bytes of WAV)."""
    from cluster.errors import InputError

    wav = b"RIFF\x8d8\x01\x00WAVEfmt " + bytes(range(256)) * (size // 256 + 1)
    with pytest.raises(InputError) as refused:
        _read(_multipart(("audio", None, wav[:size]), ("video", "v.mp4", b"....")), tmp_path)
    assert refused.value.field == "audio" and "its part has no filename" in refused.value.message, refused.value
    assert "RIFF" not in refused.value.message and len(refused.value.message) < 300, refused.value.message
    # a path or URL given as text is still a field
    fields = _read(_multipart(("audio", None, b"/data/speech.wav"), ("video", "v.mp4", b"....")), tmp_path)
    assert fields.fields["audio"] == "/data/speech.wav"


def test_a_json_key_given_twice_is_refused():
    """`{"audio": "/etc/passwd", "audio": "<good>"}` was taken, the last value winning, while a proxy or a log
    reading the body may take the first: one value per field, 422 naming it, as a form's repeated field."""
    from cluster.schemas import BatchCreate, JobCreate
    from service.uploads import json_body

    def read(body: bytes, model):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request({"type": "http", "method": "POST", "path": "/v1/jobs", "query_string": b"",
                           "headers": [(b"content-type", b"application/json")]}, receive)
        return asyncio.run(json_body(request, model))

    for body, model, key in ((b'{"audio": "/etc/passwd", "audio": "a.wav"}', JobCreate, "audio"),
                             (b'{"audios": ["a.wav"], "video": "v.mp4", "crf": 18, "crf": 30}', BatchCreate, "crf")):
        with pytest.raises(ApiProblem) as e:
            read(body, model)
        assert (e.value.status, e.value.code, e.value.field) == (422, "input.invalid", key), e.value.message
    assert read(b'{"audio": "a.wav", "video": "v.mp4"}', JobCreate).video == "v.mp4"
