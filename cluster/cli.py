"""`lipsync`: render on an embedded Ray (or the cluster at RAY_ADDRESS), or the bundled demo.

Exit status: 0 ok, 2 bad input (one line naming the file and the problem), 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.config import Settings
from cluster.errors import LipsyncError
from cluster.schemas import ErrorInfo, JobState, RenderRequest


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "workers", None):
        overrides["model_workers"] = args.workers
    if getattr(args, "compositors", None):
        overrides["compositors"] = args.compositors
    if getattr(args, "chunk_seconds", None):
        overrides["chunk_seconds"] = args.chunk_seconds
    if getattr(args, "model", None):
        overrides["model"] = _model_spec(args.model)
    return Settings(**overrides)


def _model_spec(model: str) -> str:
    """'builtin[:S]' as is; a model file as an absolute path (workers do not share our cwd)."""
    return model if model.startswith("builtin") else str(Path(model).expanduser().resolve())


def _fail_line(err: ErrorInfo) -> str:
    where = f" (stage {err.stage}" + (f", chunk {err.chunk}" if err.chunk is not None else "") + ")" if err.stage else ""
    return f"lipsync: error: {err.code}: {err.message}{where}"


class _ProgressBar:
    """A tqdm bar created on its first update, so that an input refused before any progress
    leaves exactly one line (the reason) on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None

    def show(self, done: int, total: int, postfix: str | None = None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=0, unit="frame", desc="render", disable=self.quiet, dynamic_ncols=True)
        self.bar.total = total or self.bar.total
        self.bar.n = done
        if postfix is not None:
            self.bar.set_postfix_str(postfix)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _render(audio: str, video: str, output: str, settings: Settings, loop: str, local: bool,
            quiet: bool, model: str | None = None, chunk_seconds: float | None = None,
            cluster_options: list[str] = ()) -> int:
    out = Path(output).expanduser().resolve()
    # Per-job options travel with the job (a joined cluster has its own defaults).
    request = RenderRequest(audio=str(Path(audio).expanduser().resolve()),
                            video=str(Path(video).expanduser().resolve()), loop=loop, output=str(out),
                            model=_model_spec(model) if model else None, chunk_seconds=chunk_seconds)
    bar = _ProgressBar(quiet)
    try:
        if local:
            from cluster.render import render_local

            render_local(request, settings, progress=bar.show)
            bar.close()
            print(f"wrote {out}", file=sys.stderr)
            return 0

        from actors.runtime import Runtime, connect
        from cluster.owners import process_identity
        from cluster.render import check_inputs, new_job_id

        check_inputs(request, settings)  # bad input fails here, before Ray starts
        embedded = connect(settings)
        if not embedded and cluster_options:
            print(f"lipsync: note: {', '.join(cluster_options)} size a new job manager; the running cluster at "
                  f"RAY_ADDRESS keeps its own, so they were not applied", file=sys.stderr)
        rt = Runtime(settings, owner=process_identity() if embedded else None)
        job_id = new_job_id()
        rt.submit(request, job_id=job_id)  # the inputs travel through Ray to the job manager

        def show(st) -> None:
            bar.show(st.frames_done, st.frames_total, st.state.value)

        try:
            st = rt.wait(job_id, on_status=show)
        except KeyboardInterrupt:
            rt.cancel(job_id)
            raise
        bar.close()
        if st.state == JobState.succeeded:
            rt.download_output(job_id, out)  # the output travels back the same way
            print(f"wrote {out}", file=sys.stderr)
            return 0
        err = st.error or ErrorInfo(code="unknown", message=f"job ended {st.state.value}")
        print(_fail_line(err), file=sys.stderr)
        return 2 if err.code.startswith("input.") else 1
    except LipsyncError as e:
        bar.close()
        print(_fail_line(e.to_info()), file=sys.stderr)
        return e.exit_code
    finally:
        bar.close()


def _cluster_options(args: argparse.Namespace) -> list[str]:
    return [flag for flag, value in (("--workers", getattr(args, "workers", None)),
                                     ("--compositors", getattr(args, "compositors", None))) if value]


def cmd_render(args: argparse.Namespace) -> int:
    return _render(args.audio, args.video, args.output, _settings(args), args.loop, args.local, args.quiet,
                   args.model, args.chunk_seconds, _cluster_options(args))


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.synth import make_demo_inputs

    settings = _settings(args)
    audio, video = make_demo_inputs(str(settings.dir("demo")), settings=settings)
    return _render(audio, video, args.output, settings, "pingpong", args.local, args.quiet, args.model,
                   args.chunk_seconds, _cluster_options(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lipsync", description="Lip-sync rendering cluster.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-o", "--output", required=True, help="output .mp4")
        sp.add_argument("--model", help="'builtin' (default) or a Wav2Lip-class .onnx file")
        sp.add_argument("--workers", type=int, help="model workers (default: one per GPU, else 1)")
        sp.add_argument("--compositors", type=int, help="compositor actors (default: from CPUs)")
        sp.add_argument("--chunk-seconds", type=float, help="seconds of output per chunk (default 2)")
        sp.add_argument("--local", action="store_true", help="render in this process, without Ray")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("render", help="render a lip-synced video")
    r.add_argument("--audio", required=True, help="speech audio (any format ffmpeg reads)")
    r.add_argument("--video", required=True, help="template video of the person")
    r.add_argument("--loop", choices=["pingpong", "forward"], default="pingpong")
    common(r)
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("demo", help="render the bundled example (generated speech + a real face)")
    common(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("lipsync: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
