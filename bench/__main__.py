"""`python -m bench NAME [--quick]` runs one benchmark, `python -m bench all` runs the seven of
`BENCHMARKS` (the reliability runs only by name).

Each prints its ratios, writes bench/results/NAME.json (machine, date, command, figures) and its
table in docs/PERFORMANCE.md. `--quick` runs a short version on small inputs (a smoke check; it
writes bench/results/NAME.quick.json and leaves the docs alone).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

BENCHMARKS = {
    "classic": "bench.classic",          # 1. against the classic single-process pipeline
    "floor": "bench.floor",              # 2. end to end against the sum of the stages alone
    "scaling": "bench.scaling",          # 3. latency-only model on k logical GPUs
    "first_segment": "bench.first_segment",  # 4. prepared avatar: submit -> first frame played over HLS
    "concurrency": "bench.concurrency",  # 5. 8 jobs at once vs one after another
    "throughput": "bench.throughput",    # 6. a node's frames/s vs N classic pipelines side by side (issue 19)
    "live": "bench.live",                # 7. live sessions: chunk arrival -> published segment, stalls
}
#: Reliability runs (docs/RELIABILITY.md), by name only: they check promises and fail loudly.
RELIABILITY = {
    "chaos": "bench.chaos",              # jobs under random kills of workers, compositors, manager, nodes
    "soak": "bench.soak",                # many short jobs through the service; memory start/peak/end
    "long": "bench.long",                # an hour of speech in one job vs 5 minutes: memory, frames/s
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("name", choices=[*BENCHMARKS, *RELIABILITY, "all"])
    p.add_argument("--quick", action="store_true", help="short version on small inputs (smoke check)")
    p.add_argument("--seconds", type=float, action="append",
                   help="speech lengths to run (classic, floor, throughput, long; repeatable), instead of the defaults")
    p.add_argument("--model", action="append", choices=["builtin", "wav2lip96"],
                   help="models to run (repeatable); default both")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="chaos only: N processes that keep a CPU busy for the whole run (an overloaded machine)")
    p.add_argument("--only", type=lambda v: [s.strip() for s in v.split(",") if s.strip()], metavar="A,B",
                   help="live only: the sections to run (alone, batch, 720p, wav2lip, ramp, player; default all); "
                        "the others keep their last figures")
    p.add_argument("--ramp", type=lambda v: [int(s) for s in v.split(",") if s.strip()], metavar="N,M",
                   help="live only: the session counts the ramp tries, in order (default 1..8), with the first "
                        "--model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    if args.load and names != ["chaos"]:
        build_parser().error("--load is for the chaos run only")
    if (args.only or args.ramp) and names != ["live"]:
        build_parser().error("--only and --ramp are for the live run only")
    for name in names:
        module = importlib.import_module({**BENCHMARKS, **RELIABILITY}[name])
        t0 = time.perf_counter()
        print(f"=== {name}{' (quick)' if args.quick else ''} ===", flush=True)
        extra = {"load": args.load} if name == "chaos" else {"only": args.only, "ramp": args.ramp} \
            if name == "live" else {}
        module.run(quick=args.quick, seconds=args.seconds, models=args.model, **extra)
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
