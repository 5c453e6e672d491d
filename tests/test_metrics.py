"""The metric table of actors/metrics.py. Every metric is scraped from a real run, moving, in
tests/test_deploy_local.py; the Grafana board is checked against this table in tests/test_grafana.py."""
from __future__ import annotations

from actors.metrics import METRICS


def test_metric_table_is_consistent():
    for spec in METRICS.values():
        assert spec.name.startswith("lipsync_") and spec.kind in ("counter", "gauge", "histogram")
        assert bool(spec.boundaries) == (spec.kind == "histogram"), spec.name
        assert list(spec.boundaries) == sorted(spec.boundaries)
        assert spec.help.endswith((".", ")")), spec.name
