"""Multipart uploads streamed to disk as they arrive (never held in memory), each file bounded
while streaming (`LIPSYNC_MAX_UPLOAD_BYTES`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request

from cluster.errors import InputError, InputTooLarge, LipsyncError
from service.errors import ApiProblem


class Upload:
    """A multipart body parsed as it arrives: file parts go to files in `tmpdir` (each bounded by
    `max_bytes` while streaming), small text parts to `fields`."""

    TEXT_LIMIT = 16 * 1024

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
            state["headers"][state["hname"].decode("latin-1").lower()] = state["hvalue"].decode("utf-8", "replace")
            state["hname"], state["hvalue"] = b"", b""

        def on_headers_finished():
            _, p = parse_options_header(state["headers"].get("content-disposition", ""))
            name = p.get(b"name", b"").decode("utf-8", "replace")
            filename = p.get(b"filename")
            state["name"], state["size"] = name, 0
            if filename is not None and name in ("audio", "video", "file"):
                fname = Path(filename.decode("utf-8", "replace")).name or name
                path = self.tmpdir / f"{name}{Path(fname).suffix.lower()[:12]}"
                state["file"] = open(path, "wb")
                self.files[name] = (path, fname)
            else:
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
                    problem.append(InputError(f"{state['name']}: form field longer than {self.TEXT_LIMIT} bytes",
                                              path=state["name"]))
                    return
                state["text"] += data[start:end]

        def on_part_end():
            if state.get("file") is not None:
                state["file"].close()
            elif "text" in state and state.get("name"):
                self.fields[state["name"]] = bytes(state["text"]).decode("utf-8", "replace")
            state["headers"] = {}
            state.pop("text", None)
            state["file"] = None

        parser = MultipartParser(boundary, dict(
            on_header_field=on_header_field, on_header_value=on_header_value, on_header_end=on_header_end,
            on_headers_finished=on_headers_finished, on_part_data=on_part_data, on_part_end=on_part_end))
        try:
            async for block in request.stream():
                parser.write(block)
                if problem:
                    raise problem[0]
            parser.finalize()
        except LipsyncError:
            raise
        except Exception as e:
            raise ApiProblem(400, "input.invalid", f"malformed multipart body: {e}", "body") from e
        finally:
            if state.get("file") is not None and not state["file"].closed:
                state["file"].close()
