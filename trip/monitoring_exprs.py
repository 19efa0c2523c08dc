"""Every PromQL expression the platform ships, read from the one dashboard and rules file.

Why it exists: the Grafana dashboard (`monitoring/grafana/trip-dashboard.json`) and the
alert rules (`monitoring/prometheus/trip-alerts.rules.yaml`) are data, so nothing would
notice an expression that no longer parses or names a metric nobody exports. This module
lists them all (dashboard template variables such as `$run` and `$__rate_interval`
replaced by concrete values) so that tests can hand them to `promtool` and to a live
Prometheus scraping a real training run, and can wrap them into a rules file that
`promtool check rules` parses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The image installs `trip` into site-packages and puts monitoring/ at /opt/trip (Dockerfile).
MONITORING_DIR = Path(os.environ.get("TRIP_MONITORING_DIR", REPO_ROOT / "monitoring"))
DASHBOARD_PATH = MONITORING_DIR / "grafana" / "trip-dashboard.json"
RULES_PATH = MONITORING_DIR / "prometheus" / "trip-alerts.rules.yaml"

# Values a dashboard variable takes when an expression is evaluated outside Grafana.
# Regex variables become ".*" (Grafana's "All"), which also matches an absent label.
DEFAULT_VARIABLES: dict[str, str] = {
    "run": ".*",
    "namespace": ".*",
    "gpu_host": ".*",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}

Source = Literal["trip", "ray", "dcgm"]
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_METRIC = re.compile(r"\b(trip_[a-z0-9_]+|ray_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")

# Metrics a CPU training run cannot produce: a live check against one leaves them out.
GPU_ONLY_METRICS = frozenset({"trip_gpu_memory_allocated_bytes", "trip_gpu_memory_reserved_bytes"})


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and where it comes from.

    `where` names it for error messages ("dashboard panel 'Loss' target A", "rule
    TripTrainingNoProgress"); `source` says which exporter its metrics come from, so a
    test against a trainer-only Prometheus can leave out Ray and DCGM expressions.
    """

    where: str
    expr: str
    source: Source


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (`$run`, `${run}`, `$__rate_interval`) with values.

    Raises KeyError naming the variable when no value is known for it.
    """
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in: {expr}")
        return values[name]

    return _VARIABLE.sub(repl, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (TRIP's, Ray's and DCGM's), e.g. for a live check
    that each one exists in Prometheus."""
    return set(_METRIC.findall(expr))


def source_of(expr: str) -> Source:
    """Which exporter an expression depends on: DCGM, Ray's metrics port, or TRIP's own."""
    if "DCGM_" in expr:
        return "dcgm"
    if re.search(r"\bray_", expr):
        return "ray"
    return "trip"


def dashboard_expressions(
    variables: Mapping[str, str] | None = None, path: Path = DASHBOARD_PATH
) -> list[Expression]:
    """Every panel target's `expr` in the dashboard, variables substituted."""
    dashboard = json.loads(path.read_text())
    out: list[Expression] = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if "expr" not in target:
                continue
            expr = substitute(target["expr"], variables)
            where = f"dashboard panel {panel.get('title')!r} target {target.get('refId')}"
            out.append(Expression(where, expr, source_of(expr)))
    return out


def rule_expressions(path: Path = RULES_PATH) -> list[Expression]:
    """Every alerting/recording rule's `expr` in the rules file."""
    doc = yaml.safe_load(path.read_text())
    out: list[Expression] = []
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            expr = str(rule["expr"]).strip()
            out.append(Expression(f"rule {name}", expr, source_of(expr)))
    return out


def all_expressions(variables: Mapping[str, str] | None = None) -> list[Expression]:
    """Dashboard and rule expressions together (dashboard first)."""
    return dashboard_expressions(variables) + rule_expressions()


def training_run_expressions(variables: Mapping[str, str] | None = None) -> list[Expression]:
    """Expressions that a CPU training run's exporters alone can answer: TRIP's own metrics,
    without preprocessing and GPU-only ones (what a live test against a 2-worker CPU run
    can check for existing metrics)."""
    return [e for e in all_expressions(variables)
            if e.source == "trip"
            and not any(m.startswith("trip_preprocess_") or m in GPU_ONLY_METRICS
                        for m in metric_names(e.expr))]


def as_rules_file(expressions: list[Expression]) -> dict[str, Any]:
    """Wrap expressions as recording rules so `promtool check rules` parses each one.

    Returns a rules-file mapping (dump it with yaml.safe_dump); rule i records
    `trip:expr_check:<i>` so promtool's error messages point back to the list index.
    """
    rules = [{"record": f"trip:expr_check:{i}", "expr": e.expr} for i, e in enumerate(expressions)]
    return {"groups": [{"name": "trip-expression-check", "rules": rules}]}


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten panels, including those nested in collapsed rows."""
    flat: list[dict[str, Any]] = []
    for p in panels:
        flat.append(p)
        flat.extend(_panels(p.get("panels", [])))
    return flat
