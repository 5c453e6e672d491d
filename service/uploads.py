"""Request bodies, bounded: multipart uploads streamed to disk as they arrive (never held in
memory), each file bounded while streaming (`LIPSYNC_MAX_UPLOAD_BYTES`); other bodies read into
memory up to a limit (`read_body`). Every body arrives within an idle deadline: a client that
stops sending mid-body gets 408 instead of holding the request (and its files) forever."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from cluster.errors import InputError, InputTooLarge, LipsyncError
from cluster.views import display_name
from service.errors import ApiProblem

#: The longest a request's body may pause between two blocks
BODY_IDLE_TIMEOUT_S = 60.0
#: The largest JSON body a route reads (a batch of many URLs fits many times over)
JSON_BODY_LIMIT = 4 * 1024 * 1024


async def body_blocks(request: Request, idle_s: float = BODY_IDLE_TIMEOUT_S):
    """The request body's blocks as they arrive; 408 when none comes for `idle_s`."""
    blocks = request.stream().__aiter__()
    while True:
        try:
            block = await asyncio.wait_for(blocks.__anext__(), idle_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise ApiProblem(408, "input.timeout", f"the request body stopped arriving (nothing for {idle_s:.0f} s)",
                             "body") from None
        yield block


async def read_body(request: Request, limit: int = JSON_BODY_LIMIT) -> bytes:
    """The whole body, at most `limit` bytes (413 past it: the declared length is checked first,
    then the bytes as they arrive, so a chunked body cannot get around it)."""
    declared = request.headers.get("content-length")
    if declared and re.fullmatch(r"[0-9]{1,19}", declared) and int(declared) > limit:
        raise ApiProblem(413, "input.too_large", f"request body of {declared} bytes exceeds the limit of {limit} "
                         f"bytes", "body")
    chunks, size = [], 0
    async for block in body_blocks(request):
        size += len(block)
        if size > limit:
            raise ApiProblem(413, "input.too_large", f"request body exceeds the limit of {limit} bytes", "body")
        chunks.append(block)
    return b"".join(chunks)


M = TypeVar("M", bound=BaseModel)


async def json_body(request: Request, model: type[M], multipart_too: bool = False) -> M:
    """The request's JSON body as `model`, read (bounded, `read_body`) only when the route asks for it,
    i.e. after its dependencies (the token check) passed: a body parameter would be read and parsed
    by FastAPI before any of them, whoever sent it. Invalid: 422 as FastAPI's own."""
    from fastapi.exceptions import RequestValidationError

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request)
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as e:
        # JSON sent under another type (`curl -d` says form-encoded) is read as JSON, as it always was; a body
        # that is not JSON under another type is said to be that type, not "Invalid JSON at line 1 column 1"
        if ctype and ctype != "application/json" and not ctype.endswith("+json") and \
                any(err.get("type") == "json_invalid" for err in e.errors()):
            raise ApiProblem(415, "input.content_type", f"a body of type {ctype!r} that is not JSON: this route "
                             "takes application/json" + (" or multipart/form-data" if multipart_too else ""),
                             "body") from None
        raise RequestValidationError(e.errors()) from None
    _refuse_repeated_keys(body)
    return parsed


def _refuse_repeated_keys(body: bytes) -> None:
    """422 for a key given twice in one object of a valid body (`{"audio": A, "audio": B}` took B while a
    proxy or log reading the body may have taken A): one value per field, as in a form."""
    try:
        loads_once_per_key(body)
    except RecursionError:  # deeper than this parser goes: the model took it, and no field of ours is so deep
        return


def loads_once_per_key(body: bytes | str):
    """`json.loads`, refusing a key given twice in one object (`_repeated`, an ApiProblem 422 naming it)."""
    import json

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen: set[str] = set()
        for key, _ in items:
            if key in seen:
                raise _repeated(key)
            seen.add(key)
        return dict(items)

    return json.loads(body, object_pairs_hook=pairs)


def openapi_json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` of a route that reads its body with `json_body`: the docs show the model."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


#: The form fields that take a file (or, as text, a path or URL)
FILE_FIELDS = ("audio", "video", "file")


def _no_filename(name: str) -> str:
    return (f'its part has no filename, so it was read as text: a file\'s part needs one, e.g. Content-Disposition: '
            f'form-data; name="{name}"; filename="x.wav"')


def _is_text(data: bytes) -> bool:
    """Whether a form field's bytes read as text (UTF-8; a NUL or a newline in a path or URL is that input's
    mistake, said by its own check)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _repeated(name: str) -> ApiProblem:
    """A multipart field given more than once: refused like any other invalid field (422)."""
    return ApiProblem(422, "input.invalid", f"{name}: given more than once (one value per field)", name)


class Upload:
    """A multipart body parsed as it arrives: file parts go to files in `tmpdir` (each bounded by
    `max_bytes` while streaming), small text parts to `fields`."""

    TEXT_LIMIT = 16 * 1024
    FIELDS_LIMIT = 64  # text fields in one body

    def __init__(self, tmpdir: Path, max_bytes: int) -> None:
        self.tmpdir, self.max_bytes = tmpdir, max_bytes
        self.files: dict[str, tuple[Path, str]] = {}  # field -> (path, client filename)
        self.fields: dict[str, str] = {}

    async def read(self, request: Request) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if not boundary:
            raise ApiProblem(400, "input.invalid", "multipart body without a boundary", "body")
        state: dict[str, Any] = {"headers": {}, "hname": b"", "hvalue": b""}
        problem: list[Exception] = []

        def on_header_field(data, start, end):
            state["hname"] += data[start:end]

        def on_header_value(data, start, end):
            state["hvalue"] += data[start:end]

        def on_header_end():
            # the value's raw bytes: a file name is UTF-8 there (browsers, curl, httpx), and decoding it to
            # text first made the parser encode it back as Latin-1 (a name with 話 was a 400, é garbled)
            state["headers"][state["hname"].decode("latin-1").lower()] = state["hvalue"]
            state["hname"], state["hvalue"] = b"", b""

        def on_headers_finished():
            _, p = parse_options_header(state["headers"].get("content-disposition", b""))
            name = p.get(b"name", b"").decode("utf-8", "replace")
            filename = p.get(b"filename")
            state["name"], state["size"] = name, 0
            if filename is not None and name not in ("audio", "video", "file"):  # read as text, it was told it was
                # "longer than 16384 bytes", or (a small one) an extra input: the field is the mistake
                wrong = InputError(f"{name}: a file in a form field that takes none (a job's files go in the fields "
                                   f"audio and video, an avatar's in video, an upload's in file)", path=name,
                                   field=name)
                problem.append(wrong)
                state["file"], state["text"] = None, bytearray()
                return
            if filename is not None:
                if name in self.files or name in self.fields:  # one value per field: no silent choice, and
                    problem.append(_repeated(name))          # a body cannot fill the disk with repeats
                    state["file"], state["text"] = None, bytearray()
                    return
                # the client's file name as errors, views and listings show it: printable characters only
                fname = display_name(Path(filename.decode("utf-8", "replace")).name, limit=255) or name
                path = self.tmpdir / f"{name}{Path(fname).suffix.lower()[:12]}"
                state["file"] = open(path, "wb")
                self.files[name] = (path, fname)
            else:
                if len(self.fields) >= self.FIELDS_LIMIT:
                    problem.append(InputError(f"more than {self.FIELDS_LIMIT} form fields", path="body"))
                state["file"], state["text"] = None, bytearray()

        def on_part_data(data, start, end):
            if problem:
                return
            n = end - start
            state["size"] += n
            if state["file"] is not None:
                if state["size"] > self.max_bytes:
                    problem.append(InputTooLarge(f"{state['name']}: upload is larger than the limit of "
                                                 f"{self.max_bytes} bytes (LIPSYNC_MAX_UPLOAD_BYTES)",
                                                 path=state["name"]))
                    return
                state["file"].write(data[start:end])
            else:
                if state["size"] > self.TEXT_LIMIT:
                    name = state["name"]
                    why = f" ({_no_filename(name)})" if name in FILE_FIELDS else ""
                    problem.append(InputError(f"{name}: form field longer than {self.TEXT_LIMIT} bytes{why}",
                                              path=name, field=name))
                    return
                state["text"] += data[start:end]

        def on_part_end():
            if state.get("file") is not None:
                state["file"].close()
            elif "text" in state and state.get("name"):
                name, text = state["name"], bytes(state["text"])
                if name in self.fields or name in self.files:
                    problem.append(_repeated(name))  # e.g. two `id`s: which one is the job's key?
                elif name in FILE_FIELDS and not _is_text(text):  # a file's bytes: not echoed back as a "path"
                    problem.append(InputError(f"{name}: {len(text)} bytes that are not text ({_no_filename(name)})",
                                              path=name, field=name))
                else:
                    self.fields[name] = text.decode("utf-8", "replace")
            state["headers"] = {}
            state.pop("text", None)
            state["file"] = None

        def on_end():
            state["complete"] = True

        parser = MultipartParser(boundary, dict(
            on_header_field=on_header_field, on_header_value=on_header_value, on_header_end=on_header_end,
            on_headers_finished=on_headers_finished, on_part_data=on_part_data, on_part_end=on_part_end,
            on_end=on_end))
        try:
            async for block in body_blocks(request):
                parser.write(block)
                if problem:
                    raise problem[0]
            parser.finalize()
            if problem:
                raise problem[0]
            if not state.get("complete"):  # the parser takes a body cut short (a client or proxy that gave
                # up mid-upload) for whole: its last file would be rendered as if it were the whole file
                raise ApiProblem(400, "input.invalid", "multipart body ended before its closing boundary: the "
                                 "upload was cut short" + (f" in field {state['name']!r}" if state.get("name") else ""),
                                 state.get("name") or "body")
        except (LipsyncError, ApiProblem):
            raise
        except Exception as e:
            raise ApiProblem(400, "input.invalid", f"malformed multipart body: {e}", "body") from e
        finally:
            if state.get("file") is not None and not state["file"].closed:
                state["file"].close()
