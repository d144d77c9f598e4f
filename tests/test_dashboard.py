"""docker/grafana/lmc-dashboard.json: valid JSON, every panel has a title and a query, and every
PromQL expression names only metrics the server exports (container/metrics.py METRICS), with
label matchers and groupings on labels those metrics carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from container.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parent.parent / "docker" / "grafana" / "lmc-dashboard.json"
# Digits too: lmc_[a-z_]+ would read lmc_e2e_request_latency_seconds as "lmc_e".
NAME = re.compile(r"lmc_[a-z0-9_]+")
SELECTOR = re.compile(r"(lmc_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# What Prometheus appends to a histogram's name for its series.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in all_panels(dashboard) if p.get("type") != "row"]


def expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


def base_name(name: str) -> str:
    """The METRICS name a series name belongs to: a histogram's _bucket/_sum/_count dropped."""
    if name in METRICS:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)]
    return name


def test_parses_and_is_a_grafana_10_dashboard(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.x/10.x schema
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query"
    assert model["query"]["query"] == "label_values(lmc_requests_total, model)"
    assert model["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_every_panel_has_a_title_and_a_target(dashboard):
    panels = query_panels(dashboard)
    assert len(panels) >= 20
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in all_panels(dashboard):
        assert p.get("title"), p
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no target"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r}: empty expression"
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_metric_name_is_exported(dashboard):
    used = set()
    for expr in expressions(dashboard):
        names = NAME.findall(expr)
        assert names, f"no lmc_ metric in {expr!r}"
        for name in names:
            base = base_name(name)
            assert base in METRICS, f"{name!r} (in {expr!r}) is not in container/metrics.py"
            used.add(base)
    # The dashboard covers every exported metric but the raw KV block counts (the usage ratio
    # is their quotient).
    assert set(METRICS) - used <= {"lmc_kv_cache_blocks"}, set(METRICS) - used


def test_histogram_suffixes_only_on_histograms(dashboard):
    for expr in expressions(dashboard):
        for name in NAME.findall(expr):
            if base_name(name) not in METRICS:
                continue  # test_every_metric_name_is_exported names it
            kind = METRICS[base_name(name)][0]
            if kind == "histogram":
                assert name.endswith(HISTOGRAM_SUFFIXES), f"{name!r}: query a histogram's series"
            if "histogram_quantile" in expr and name.endswith("_bucket"):
                assert re.search(r"by \([^)]*\ble\b", expr), f"{expr!r} must keep le"


def test_labels_exist_on_the_metrics(dashboard):
    for expr in expressions(dashboard):
        for name, matchers in SELECTOR.findall(expr):
            if base_name(name) not in METRICS:
                continue
            labels = set(METRICS[base_name(name)][1])
            if name.endswith("_bucket"):
                labels.add("le")
            for label in MATCHER.findall(matchers):
                assert label in labels, f"{expr!r}: {name} has no label {label!r}"
        metrics_in = {base_name(n) for n in NAME.findall(expr)} & set(METRICS)
        known = set().union(*(METRICS[m][1] for m in metrics_in)) | {"le"}
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in known, f"{expr!r}: grouping by unknown label {label!r}"
