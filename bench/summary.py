"""The targets table of docs/PERFORMANCE.md, rebuilt from bench/results/*.json after every benchmark."""
from __future__ import annotations

import json

from bench.common import RESULTS


def _load(name: str) -> dict | None:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _stored(name: str) -> list[dict]:
    """NAME.json and the dated NAME.*.json kept beside it (not the quick runs' NAME.quick.json)."""
    docs = []
    for path in sorted(RESULTS.glob(f"{name}*.json")):
        if path.name.endswith(".quick.json") or not (path.stem == name or path.stem.startswith(name + ".")):
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc.get("figures"), dict) and "date" in doc:
            docs.append(doc)
    return docs


def _newest(name: str, entries) -> dict:
    """Key -> the newest stored figures of that key (`entries(figures)` yields (key, figures) of one
    result), each with its result's date under "date"."""
    newest: dict = {}
    for doc in _stored(name):
        for key, row in entries(doc["figures"]):
            if key not in newest or doc["date"] > newest[key]["date"]:
                newest[key] = {**row, "date": doc["date"]}
    return newest


def _newest_runs(name: str) -> list[dict]:
    """Every run of NAME's stored results, the newest per (model, speech length)."""
    return list(_newest(name, lambda f: (((r["model"], r["speech_s"]), r) for r in f.get("runs", []))).values())


def _newest_models(name: str) -> dict[str, dict]:
    """Model -> its newest stored figures (results keyed by model: floor, concurrency)."""
    return _newest(name, lambda f: (f.get("models") or {}).items())


def _newest_pair(name: str, model: str, a: float, b: float) -> tuple[dict, dict] | None:
    """The runs of MODEL at speech lengths A and B from the newest stored result that holds both."""
    best = None
    for doc in _stored(name):
        runs = {r["speech_s"]: r for r in doc["figures"].get("runs", []) if r["model"] == model}
        if a in runs and b in runs and (best is None or doc["date"] > best[1]["date"]):
            best = ({**runs[a], "date": doc["date"]}, {**runs[b], "date": doc["date"]})
    return best


def _day(date: str | None) -> str:
    return (date or "")[:10]


def _fmt(v: float | None, unit: str = "x") -> str:
    return "not measured" if v is None else f"{v:.2f}{unit}"


def targets_rows() -> list[list[str]]:
    rows: list[list[str]] = []

    def add(what: str, target: str, measured: float | None, ok: bool | None, unit: str = "x", src: str = "",
            date: str | None = None) -> None:
        verdict = "not measured" if measured is None or ok is None else ("met" if ok else "**not met**")
        rows.append([what, target, _fmt(measured, unit) + (f" ({src})" if src and measured is not None else ""),
                     verdict, _day(date) if measured is not None else ""])

    runs = _newest_runs("classic")

    def run_of(model: str, secs: float) -> dict | None:
        return next((r for r in runs if r["model"] == model and r["speech_s"] == secs), None)

    for situation, label, targets in (
            ("oneshot", "one-shot `lipsync render`, cold avatar, vs classic", {"builtin": 1.3, "wav2lip96": 1.5}),
            ("warm_cold", "warm service, cold avatar, vs classic", {"builtin": 2.0, "wav2lip96": 1.7}),
            ("warm_prepared", "warm service, prepared avatar, vs classic", {"builtin": 4.0})):
        for model, t in targets.items():
            r = run_of(model, 30.0)
            v = r[situation]["speed_vs_classic"] if r else None
            add(f"{label} ({model}, 30 s)", f">= {t}x", v, None if v is None else v >= t, date=r and r["date"])

    floor = _newest_models("floor")
    if floor:
        for model, r in floor.items():
            add(f"end to end vs floor ({model}, warm service, cold avatar)", "<= 1.25x", r["cold_vs_floor"],
                r["cold_vs_floor"] <= 1.25, src=f"dominant stage: {r['dominant']}", date=r["date"])
            busy = r.get("model_busy_fraction")
            if model == "wav2lip96":
                add("Wav2Lip-sized model, render phase: model workers busy", ">= 85 %",
                    None if busy is None else 100 * busy, None if busy is None else busy >= 0.85, unit=" %",
                    date=r["date"])
    else:
        add("end to end vs floor", "<= 1.25x", None, None)

    scaling = _load("scaling")
    if scaling:
        rows_k = scaling["figures"]["rows"]
        worst = min(rows_k, key=lambda r: r["efficiency"])
        add("scaling, k = 1..8: throughput / (k x throughput at k = 1)", ">= 0.9",
            worst["efficiency"], worst["efficiency"] >= 0.9, unit="", src=f"worst at k = {worst['k']}",
            date=scaling["date"])
        v = scaling["figures"]["object_store_vs_crop"]
        add("object-store bytes per frame vs crop bytes", "<= 2.5x", v, v <= 2.5, date=scaling["date"])
    else:
        add("scaling, k = 1..8", ">= 0.9 k", None, None)

    r30 = run_of("builtin", 30.0)
    mem30 = r30["warm_prepared"]["memory_vs_classic"] if r30 else None
    add("peak memory, 30 s, vs classic (warm service, whole process tree, PSS)", "<= 0.33x", mem30,
        None if mem30 is None else mem30 <= 1 / 3, date=r30 and r30["date"])
    pair = _newest_pair("classic", "builtin", 30.0, 300.0)  # both lengths from one run, not from two days
    growth = pair[1]["oneshot"]["peak_pss_mb"] / pair[0]["oneshot"]["peak_pss_mb"] if pair else None
    add("peak memory, 5 min vs 30 s (one-shot, PSS)", "<= 1.2x", growth, None if growth is None else growth <= 1.2,
        date=pair and pair[1]["date"])

    for r in sorted(_newest_runs("first_segment"), key=lambda r: (r["model"], r["speech_s"])):
        v = r["median_first_frame_s"]  # submit -> ffmpeg's first frame over HLS (issue 20)
        add(f"first frame over HLS, prepared avatar, warm service ({r['model']}, {r['speech_s']:g} s speech)",
            "<= 1 s", v, v <= 1.0, unit=" s", date=r["date"])

    for model, r in _newest_models("concurrency").items():
        rows.append([f"8 jobs at once vs one after another ({model})", "(no target)",
                     f"{r['speedup']:.2f}x", "", _day(r["date"])])
    return rows


def targets_markdown() -> str:
    from bench.common import md_table

    return ("Each figure is from the newest stored run of its benchmark (`bench/results/`, dated in the last "
            "column; a partial run, e.g. `--model builtin`, renews only its own rows).\n\n"
            + md_table(["what", "target", "measured", "verdict", "measured on"], targets_rows()))


def write_targets() -> str:
    """Rewrite the targets section of docs/PERFORMANCE.md from the stored results."""
    from bench.common import _replace_section

    table = targets_markdown()
    _replace_section("targets", f"<!-- bench:targets -->\n{table}\n<!-- /bench:targets -->")
    return table


if __name__ == "__main__":  # python -m bench.summary
    print(write_targets())
