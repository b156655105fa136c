"""Metric names referenced by the Grafana dashboard and the Prometheus alert rules in deploy/.

Used by tests/test_deploy.py and by live-server tests, which assert that a running vllm-kvc server exports
every series the dashboard and the alerts query:

    from tests.promql_names import missing_from_exposition
    assert not missing_from_exposition(requests.get(url + "/metrics").text)

Names are returned as they appear in the text exposition (``vllm:request_success_total``,
``vllm:e2e_request_latency_seconds_bucket``), not as prometheus_client family names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "vllm-kvc-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Series Prometheus itself synthesizes for a scrape target or a rule; a server never exports them.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
                       "scrape_samples_post_metric_relabeling", "ALERTS", "ALERTS_FOR_STATE"})

# Grafana's global variables, replaced by values PromQL accepts so the expressions can be parsed.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m", "${__rate_interval}": "5m", "$__interval": "1m", "${__interval}": "1m",
    "$__range": "1h", "${__range}": "1h", "$__range_s": "3600", "$__range_ms": "3600000",
}

_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                       "bool", "offset", "atan2", "inf", "nan", "start", "end"})
_TOKEN = re.compile(r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)(?![a-zA-Z0-9_:.])
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<space>\s+)
    | (?P<other>.)
""", re.X | re.S)
_AGGREGATORS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})


def _tokens(expr: str):
    return [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr) if m.lastgroup != "space"]


def metric_names_in_expr(expr: str) -> set[str]:
    """Metric names selected by one PromQL expression (functions, keywords, labels and durations excluded)."""
    toks = _tokens(expr)
    names: set[str] = set()
    depth_brace = depth_bracket = 0
    skip_label_list = False
    label_list_depth = 0
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "{":
            depth_brace += 1
        elif text == "}":
            depth_brace -= 1
        elif text == "[":
            depth_bracket += 1
        elif text == "]":
            depth_bracket -= 1
        elif skip_label_list:
            if text == "(":
                label_list_depth += 1
            elif text == ")":
                label_list_depth -= 1
                if label_list_depth == 0:
                    skip_label_list = False
        elif kind == "ident" and depth_brace == 0 and depth_bracket == 0:
            low = text.lower()
            if low in _LABEL_LIST_KEYWORDS:
                if nxt == "(":
                    skip_label_list = True
            elif low in _KEYWORDS or nxt == "(":
                pass  # keyword (offset's duration is its own token), or a function / aggregation name
            elif low in _AGGREGATORS and nxt.lower() in ("by", "without"):
                pass  # `sum by (x) (...)`
            else:
                names.add(text)
        i += 1
    return names


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana variables so an expression from the dashboard is plain PromQL."""
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    # any remaining template variable sits inside a label matcher: match everything
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::[a-z]+)?\}?", ".*", expr)


def _walk_panels(panels):
    for p in panels:
        yield p
        yield from _walk_panels(p.get("panels", []))


def dashboard_exprs(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, raw expression) for every panel query of the dashboard."""
    dash = json.loads(Path(path).read_text())
    out = []
    for p in _walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p.get('id')} {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    return out


def dashboard_variable_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(variable name, series selector) for label_values() variable queries of the dashboard."""
    dash = json.loads(Path(path).read_text())
    out = []
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", q, re.S)
        if m:
            out.append((v["name"], m.group(1)))
        elif q:
            out.append((v["name"], q))
    return out


def alert_exprs(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(rule name, expression) for every alerting / recording rule."""
    doc = yaml.safe_load(Path(path).read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in doc["groups"] for r in g["rules"]]


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    names: set[str] = set()
    for _, expr in dashboard_exprs(path) + dashboard_variable_queries(path):
        names |= metric_names_in_expr(grafana_to_promql(expr))
    return names


def alert_metric_names(path: Path = ALERTS) -> set[str]:
    names: set[str] = set()
    for _, expr in alert_exprs(path):
        names |= metric_names_in_expr(expr)
    return names


def metric_names() -> set[str]:
    """Every metric name the dashboard and the alert rules reference (including Prometheus' synthetic `up`)."""
    return dashboard_metric_names() | alert_metric_names()


def exported_metric_names() -> set[str]:
    """The referenced names a vllm-kvc server itself must export (synthetic series removed)."""
    return metric_names() - SYNTHETIC


def exposition_sample_names(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (the body of GET /metrics)."""
    names = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)
        if m:
            names.add(m.group())
    return names


def missing_from_exposition(text: str) -> set[str]:
    """Referenced names that a /metrics body does not contain; empty when the server exports them all."""
    return exported_metric_names() - exposition_sample_names(text)


if __name__ == "__main__":
    for name in sorted(metric_names()):
        print(name)
