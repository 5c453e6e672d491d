"""The targets table of docs/PERFORMANCE.md, rebuilt from bench/results/*.json after every benchmark."""
from __future__ import annotations

import json

from bench.common import RESULTS


def _load(name: str) -> dict | None:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _fmt(v: float | None, unit: str = "x") -> str:
    return "not measured" if v is None else f"{v:.2f}{unit}"


def targets_rows() -> list[list[str]]:
    rows: list[list[str]] = []

    def add(what: str, target: str, measured: float | None, ok: bool | None, unit: str = "x", src: str = "") -> None:
        verdict = "not measured" if measured is None or ok is None else ("met" if ok else "**not met**")
        rows.append([what, target, _fmt(measured, unit) + (f" ({src})" if src and measured is not None else ""),
                     verdict])

    classic = _load("classic")
    runs = classic["figures"]["runs"] if classic else []

    def speed(situation: str, model: str, secs: float = 30.0) -> float | None:
        for r in runs:
            if r["model"] == model and r["speech_s"] == secs:
                return r[situation]["speed_vs_classic"]
        return None

    for situation, label, targets in (
            ("oneshot", "one-shot `lipsync render`, cold avatar, vs classic", {"builtin": 1.3, "wav2lip96": 1.5}),
            ("warm_cold", "warm service, cold avatar, vs classic", {"builtin": 2.0, "wav2lip96": 1.7}),
            ("warm_prepared", "warm service, prepared avatar, vs classic", {"builtin": 4.0})):
        for model, t in targets.items():
            v = speed(situation, model)
            add(f"{label} ({model}, 30 s)", f">= {t}x", v, None if v is None else v >= t)

    floor = _load("floor")
    if floor:
        for model, r in floor["figures"]["models"].items():
            add(f"end to end vs floor ({model}, warm service, cold avatar)", "<= 1.25x", r["cold_vs_floor"],
                r["cold_vs_floor"] <= 1.25, src=f"dominant stage: {r['dominant']}")
            busy = r.get("model_busy_fraction")
            if model == "wav2lip96":
                add("Wav2Lip-sized model, render phase: model workers busy", ">= 85 %",
                    None if busy is None else 100 * busy, None if busy is None else busy >= 0.85, unit=" %")
    else:
        add("end to end vs floor", "<= 1.25x", None, None)

    scaling = _load("scaling")
    if scaling:
        rows_k = scaling["figures"]["rows"]
        worst = min(rows_k, key=lambda r: r["efficiency"])
        add("scaling, k = 1..8: throughput / (k x throughput at k = 1)", ">= 0.9",
            worst["efficiency"], worst["efficiency"] >= 0.9, unit="", src=f"worst at k = {worst['k']}")
        v = scaling["figures"]["object_store_vs_crop"]
        add("object-store bytes per frame vs crop bytes", "<= 2.5x", v, v <= 2.5)
    else:
        add("scaling, k = 1..8", ">= 0.9 k", None, None)

    mem30 = next((r["warm_prepared"]["memory_vs_classic"] for r in runs
                  if r["speech_s"] == 30.0 and r["model"] == "builtin"), None)
    add("peak memory, 30 s, vs classic (warm service, whole process tree, PSS)", "<= 0.33x", mem30,
        None if mem30 is None else mem30 <= 1 / 3)
    by_len = {}
    for r in runs:
        if r["model"] == "builtin":
            by_len[r["speech_s"]] = r["oneshot"]["peak_pss_mb"]
    growth = by_len[300.0] / by_len[30.0] if 30.0 in by_len and 300.0 in by_len else None
    add("peak memory, 5 min vs 30 s (one-shot, PSS)", "<= 1.2x", growth, None if growth is None else growth <= 1.2)

    first = _load("first_segment")
    if first and "runs" in first["figures"]:  # submit -> ffmpeg's first frame over HLS (issue 20)
        for r in first["figures"]["runs"]:
            v = r["median_first_frame_s"]
            add(f"first frame over HLS, prepared avatar, warm service ({r['model']}, {r['speech_s']:g} s speech)",
                "<= 1 s", v, v <= 1.0, unit=" s")
    elif first:  # results of the earlier benchmark: submit -> first chunk done
        for model, r in first["figures"]["models"].items():
            v = r["median_first_segment_s"]
            add(f"first segment, prepared avatar, warm service ({model})", "<= 1 s", v, v <= 1.0, unit=" s")
    else:
        add("first segment, prepared avatar, warm service", "<= 1 s", None, None)

    conc = _load("concurrency")
    if conc:
        for model, r in conc["figures"]["models"].items():
            rows.append([f"8 jobs at once vs one after another ({model})", "(no target)",
                         f"{r['speedup']:.2f}x", ""])
    return rows


def targets_markdown() -> str:
    from bench.common import md_table

    return md_table(["what", "target", "measured", "verdict"], targets_rows())


def write_targets() -> str:
    """Rewrite the targets section of docs/PERFORMANCE.md from the stored results."""
    from bench.common import _replace_section

    table = targets_markdown()
    _replace_section("targets", f"<!-- bench:targets -->\n{table}\n<!-- /bench:targets -->")
    return table


if __name__ == "__main__":  # python -m bench.summary
    print(write_targets())
