"""The SDK's retry rules, against an in-process transport (no socket is opened).

A submission carries an id chosen by the SDK, so a bare 500 from the Serve proxy (the ingress
replica died under the request) is retried and answered with the same job; our own typed 500s
are not retried; GETs are retried on a bare 500 too.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from cluster.client import ApiError, AsyncClient, Client


def _flaky(answers: list[httpx.Response], seen: list[httpx.Request]):
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0) if len(answers) > 1 else answers[0]
    return handler


def _accepted(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    return httpx.Response(202, json={"id": body["id"], "state": "queued"})


def test_a_submission_is_retried_after_a_bare_500_with_the_same_id():
    seen: list[httpx.Request] = []
    calls = iter([httpx.Response(500, text="Internal Server Error"), None])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = next(calls)
        return answer if answer is not None else _accepted(request)

    with Client("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
        job = client.submit("/data/a.wav", "/data/v.mp4")  # paths on the server: sent as JSON
    ids = [json.loads(r.content)["id"] for r in seen]
    assert len(seen) == 2 and ids[0] == ids[1] == job.id, ids


def test_our_typed_500_is_not_retried_and_keeps_its_code():
    seen: list[httpx.Request] = []
    typed = httpx.Response(500, json={"error": {"code": "render.internal", "message": "boom", "field": None}})
    with Client("http://api.test", transport=httpx.MockTransport(_flaky([typed], seen)), backoff_s=0.01) as client:
        with pytest.raises(ApiError) as info:
            client.submit("/data/a.wav", "/data/v.mp4")
    assert len(seen) == 1 and info.value.code == "render.internal" and info.value.status == 500


def test_a_get_is_retried_after_a_bare_500_async_twin_too():
    view = {"id": "j1", "state": "queued"}
    seen: list[httpx.Request] = []
    answers = [httpx.Response(500, text="Internal Server Error"), httpx.Response(200, json=view)]

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    async def main():
        async with AsyncClient("http://api.test", transport=httpx.MockTransport(handler), backoff_s=0.01) as client:
            return await client.request("GET", "/v1/jobs/j1")

    r = asyncio.run(main())
    assert r.status_code == 200 and len(seen) == 2
