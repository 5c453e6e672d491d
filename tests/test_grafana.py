"""The Grafana board (k8s/grafana/lipsync.json) queries only metrics that exist (actors/metrics.py's
table, which tests/test_deploy_local.py scrapes from a real run) and shows every one of them."""
from __future__ import annotations

import json
import re
from pathlib import Path

from actors.metrics import METRICS

BOARD = Path(__file__).resolve().parent.parent / "k8s" / "grafana" / "lipsync.json"


def exported_series() -> dict[str, str]:
    """Every series name Prometheus can see -> the metric it belongs to."""
    out = {}
    for spec in METRICS.values():
        names = [spec.exported]
        if spec.kind == "histogram":
            names = [spec.exported + suffix for suffix in ("_bucket", "_sum", "_count")]
        out.update({n: spec.name for n in names})
    return out


def series_in(expr: str) -> list[str]:
    """Metric names of a PromQL expression (label matchers and `by (...)` clauses removed)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\bby\s*\([^)]*\)", "", expr)
    return [t for t in re.findall(r"[A-Za-z_:][\w:]*", expr) if t.startswith(("ray_", "lipsync_"))]


def board_exprs() -> list[str]:
    board = json.loads(BOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_series_parser():
    assert series_in('sum by (le, stage) (rate(ray_lipsync_stage_seconds_bucket{ray_io_cluster=~"$c"}[5m]))') == [
        "ray_lipsync_stage_seconds_bucket"]
    assert series_in("label_values(ray_lipsync_jobs, ray_io_cluster)") == ["ray_lipsync_jobs", "ray_io_cluster"]


def test_board_references_only_existing_metrics_and_all_of_them():
    known = exported_series()
    used = set()
    for expr in board_exprs():
        names = [n for n in series_in(expr) if n != "ray_io_cluster" or "label_values" not in expr]
        assert names, expr
        unknown = [n for n in names if n not in known]
        assert not unknown, f"{expr}: no such metric {unknown}"
        used |= {known[n] for n in names}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_board_is_importable():
    board = json.loads(BOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] == "lipsync-cluster"
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("throughput", "latency", "queue", "failures", "utilisation"):
        assert topic in titles, topic
    for p in board["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["refId"] for t in p["targets"])
