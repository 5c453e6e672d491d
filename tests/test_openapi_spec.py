"""The API's OpenAPI description (`/openapi.json`, built in process without Ray) tells what the
routes really answer: every 422 is the API's error body (FastAPI's own `HTTPValidationError`,
which no route answers, was declared on the HLS and compat routes), the statuses the routes
answer are declared, and the compat routes declare their bodies."""
from __future__ import annotations

import json


def test_the_description_declares_the_bodies_and_statuses_the_routes_answer(tmp_path):
    from cluster.config import Settings
    from service.app import create_app

    spec = create_app(Settings(storage_root=tmp_path), None).openapi()
    assert "HTTPValidationError" not in json.dumps(spec)
    paths = spec["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            answer = operation["responses"].get("422")
            if answer is not None:
                assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ApiError"}, \
                    (method, path)
    assert {"404", "410", "401"} <= set(paths["/v1/sessions/{session_id}/hls/{name}"]["get"]["responses"])
    assert {"410", "416"} <= set(paths["/v1/jobs/{job_id}/result"]["get"]["responses"])
    assert "410" in paths["/v1/jobs/{job_id}/hls/index.m3u8"]["get"]["responses"]  # an expired stream
    assert "401" in paths["/easy/submit"]["post"]["responses"]
    submit = paths["/easy/submit"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"audio_url", "video_url", "code", "pn"} <= set(submit["properties"])
    assert "file" in paths["/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]


def test_a_client_id_with_the_batch_separator_is_refused():
    """`<batch>--NNN` are a batch's jobs: a job the client named `zz--000` was shown as a member of a
    batch `zz` it never was (`batch_id`, `GET /v1/batches/zz`), and a later batch `zz` adopted it."""
    import pytest
    from pydantic import ValidationError

    from cluster.schemas import BatchCreate, JobCreate

    for model, fields in ((JobCreate, {"audio": "a.wav", "id": "zz--000"}),
                          (BatchCreate, {"audios": ["a.wav"], "id": "a--b"})):
        with pytest.raises(ValidationError, match="'--' is reserved"):
            model(**fields)
    assert JobCreate(audio="a.wav", id="a-b_c.1").id == "a-b_c.1"


def test_an_empty_input_is_refused_by_its_field():
    """`"video": ""` in JSON was looked for as a server path (400, no field); `"audios": [""]` too."""
    import pytest
    from pydantic import ValidationError

    from cluster.schemas import BatchCreate, JobCreate

    with pytest.raises(ValidationError) as e:
        JobCreate(audio="a.wav", video="")
    assert e.value.errors()[0]["loc"] == ("video",)
    with pytest.raises(ValidationError) as e:
        BatchCreate(audios=["a.wav", ""], video="v.mp4")
    assert e.value.errors()[0]["loc"] == ("audios", 1)


def test_a_crf_of_true_or_false_is_refused():
    """JSON `"crf": true` was taken as CRF 1 (a near-lossless encode at four times the bytes, shown nowhere);
    a number, and a form field's text of one, stay accepted."""
    import pytest
    from pydantic import ValidationError

    from cluster.schemas import BatchCreate, JobCreate

    for model, fields in ((JobCreate, {"audio": "a.wav"}), (BatchCreate, {"audios": ["a.wav"]})):
        for flag in (True, False):
            with pytest.raises(ValidationError, match="not true or false") as e:
                model(**fields, crf=flag)
            assert e.value.errors()[0]["loc"] == ("crf",)
        assert model(**fields, crf=20).crf == model(**fields, crf="20").crf == 20
