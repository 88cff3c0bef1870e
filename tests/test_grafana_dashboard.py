"""The Grafana dashboard (deploy/grafana/registry-mirror.json) against the metrics the
mirror exposes: every metric a panel or a template variable queries must be on
`/metrics`, so a renamed metric cannot leave a panel silently empty.

Queries are parsed as PromQL (promql-parser) after Grafana's variables are given
values; the names of their series selectors are resolved against the exposition the
way Prometheus stores it: a counter `x` is the series `x_total`, a histogram `x` is
`x_bucket`, `x_sum` and `x_count`, a gauge is its own name. The fast checks read the
app's own exposition without a socket; the slow ones pull through a real mirror from a
real registry, read `/metrics` over HTTP, and run every query, as Grafana sends it, on
a real Prometheus that scraped the mirror.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import promql_parser
import pytest
from aiohttp import web
from conftest import TAG, Mirror, MirrorFactory, Upstream
from prometheus_client.parser import text_string_to_metric_families
from support.net import eventually_async, free_port
from support.prometheus import PrometheusServer
from test_pull_through import pull_dir

from mirror.app import create_app
from mirror.config import load_config
from mirror.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "registry-mirror.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
ROWS = {
    "Overview",
    "Request latency",
    "Upstreams",
    "Cache",
    "Downloads in flight",
    "Peers and fleet",
}
# The series suffixes a metric family of each type has in Prometheus.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "unknown": ("",),
    "info": ("_info",),
    "stateset": ("",),
}
# Grafana's interval and range macros, and the template variables (all of them "All").
GRAFANA_DURATION = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?(?!_)")
GRAFANA_VARIABLE = re.compile(r"\$\{?(?:job|instance|upstream)\}?\b")
# Panel targets a pull does not feed: they stay empty until their event happens.
EMPTY_WITHOUT_THEIR_EVENT = {
    ("Upstream errors by cause", "A"),  # a 5xx or a 429
    ("Rate-limit remaining", "A"),  # Docker Hub's RateLimit headers
    ("Fallbacks", "A"),  # a fallback configured and used
    ("Stale answers", "A"),  # an upstream failing a revalidation
    ("Peer fills by outcome", "A"),  # fleet mode
}
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$", re.DOTALL)


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query template variable."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = LABEL_VALUES.match(text)
        assert match, f"variable {variable['name']}: not a label_values(selector, label) query"
        yield f"variable {variable['name']!r}", match["selector"]


def as_promql(expr: str) -> str:
    """A Grafana query as Grafana sends it, every variable "All" (`.*`)."""
    return GRAFANA_VARIABLE.sub(".*", GRAFANA_DURATION.sub("1m", expr))


def metric_names(expr: str) -> set[str]:
    """The metric names of every series selector in a Grafana PromQL expression."""
    parsed = promql_parser.parse(as_promql(expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if not isinstance(node, promql_parser.VectorSelector):
            return
        by_label = [
            m.value
            for m in node.matchers.matchers
            if m.name == "__name__" and str(m.op) == str(promql_parser.MatchOp.Equal)
        ]
        assert node.name or by_label, f"a selector without a metric name in {expr!r}"
        names.update([node.name] if node.name else by_label)

    promql_parser.walk(parsed, visit)
    return names


def exposed_series(exposition: str) -> set[str]:
    """The series names Prometheus stores from a `/metrics` body, declared families
    without samples yet included (a labelled counter before its first event)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def missing_metrics(dashboard: dict[str, Any], exposition: str) -> dict[str, set[str]]:
    """Queried names the exposition does not have, by where they are queried."""
    exposed = exposed_series(exposition)
    missing = {where: metric_names(expr) - exposed for where, expr in queries(dashboard)}
    return {where: names for where, names in missing.items() if names}


# --- the extractor ------------------------------------------------------------------


def test_metric_names_strip_functions_matchers_groupings_and_ranges() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, kind) (rate(a_seconds_bucket{job=~"$job",'
        ' kind="blob"}[$__rate_interval]))) / on (instance) group_left'
        " max_over_time(b_bytes[${__range}] offset 5m)"
        ' + sum without (x) (increase({__name__="c_total", y!="z"}[1h:5m]))'
        ' - label_replace(d, "n", "$1", "m", "(.*)") * -count(e) or vector(1)'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_bytes", "c_total", "d", "e"}


def test_a_selector_without_a_metric_name_is_refused() -> None:
    with pytest.raises(AssertionError, match="without a metric name"):
        metric_names('sum(rate({__name__=~"mirror_.*"}[5m]))')


def test_names_resolve_against_the_suffixes_of_their_family_type() -> None:
    exposition = (
        '# TYPE r counter\nr_total{kind="blob"} 1\n# TYPE s histogram\n# TYPE g gauge\ng 1\n'
    )
    exposed = exposed_series(exposition)
    assert {"r_total", "s_bucket", "s_sum", "s_count", "g"} <= exposed
    # Names no series has: a counter's or a histogram's bare name, a gauge with a suffix.
    assert not {"r", "s", "g_total", "r_bucket"} & exposed


def test_a_wrong_metric_name_in_the_dashboard_is_found(app_metrics: str) -> None:
    dashboard = load_dashboard()
    exposition = app_metrics
    assert missing_metrics(dashboard, exposition) == {}
    first = next(p for p in all_panels(dashboard["panels"]) if p.get("targets"))
    first["targets"][0]["expr"] = "sum(rate(mirror_requests_totl[5m])) + mirror_cache_bytes"
    assert missing_metrics(dashboard, exposition) == {
        f"panel {first['title']!r} target A": {"mirror_requests_totl"}
    }


# --- the dashboard's shape ----------------------------------------------------------


def test_dashboard_shape() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "registry-mirror"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # assigned by the Grafana that imports it

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance", "upstream"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == DATASOURCE

    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {p["title"] for p in panels if p["type"] == "row"} == ROWS
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge"}, panel["title"]
        assert panel["description"], panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no targets"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            # The chosen job and instance narrow every panel.
            assert '"$job"' in target["expr"], target
            assert '"$instance"' in target["expr"], target


def test_latency_panels_are_quantiles_of_histograms() -> None:
    exprs = [
        t["expr"]
        for p in all_panels(load_dashboard()["panels"])
        if "latency" in p["title"].lower()
        for t in p.get("targets", [])
    ]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({quantile},") for e in exprs), quantile
    assert all(n.endswith("_bucket") for e in exprs for n in metric_names(e))
    assert any("by (le, kind)" in e and "mirror_request_seconds_bucket" in e for e in exprs)


# --- against the mirror -------------------------------------------------------------


@pytest.fixture
async def app_metrics(tmp_path: Path) -> str:
    """What a started mirror app (its resources and state sources wired as `serve`
    wires them) answers on `/metrics`, with no socket and no upstream contacted."""
    config = load_config(
        None,
        listen="127.0.0.1:0",
        storage={"root": str(tmp_path / "mirror"), "max_size": "1GiB"},
        upstreams={"never": {"url": "http://127.0.0.1:9"}},
        log={"level": "warning", "format": "json"},
    )
    runner = web.AppRunner(create_app(config))
    await runner.setup()  # runs the cleanup_ctx that opens the core; binds no port
    try:
        body, _ = runner.app[METRICS].render()
    finally:
        await runner.cleanup()
    return body.decode()


def test_every_queried_metric_is_declared_by_the_app(app_metrics: str) -> None:
    assert missing_metrics(load_dashboard(), app_metrics) == {}


async def mirror_with_a_dead_upstream(make_mirror: MirrorFactory, upstream: Upstream) -> Mirror:
    """A mirror of the open registry (`local`), and of `dead`, where nothing listens."""
    return await make_mirror(
        {
            "local": {"url": upstream.url, "tag_ttl": "1h"},
            "dead": {"url": f"http://127.0.0.1:{free_port()}"},
        },
        default_upstream="local",
        storage={"max_size": "1GiB"},
    )


async def pull(mirror: Mirror, dest: Path) -> None:
    """skopeo pulls an image through the mirror, and the downloads finish."""
    await pull_dir(mirror.host, "oci", dest)
    await mirror.settled()


async def ask_dead_upstream(http: aiohttp.ClientSession, mirror: Mirror) -> None:
    async with http.get(f"{mirror.url}/v2/dead/{Upstream.repo('oci')}/manifests/{TAG}") as r:
        assert r.status == 503


async def test_every_queried_metric_is_on_metrics_after_a_pull(
    make_mirror: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    mirror = await mirror_with_a_dead_upstream(make_mirror, upstream)
    for attempt in ("miss", "hit"):
        await pull(mirror, tmp_path / attempt)
    async with aiohttp.ClientSession() as http:
        await ask_dead_upstream(http, mirror)
        async with http.get(f"{mirror.url}/metrics") as r:
            assert r.status == 200
            exposition = await r.text()

    assert missing_metrics(load_dashboard(), exposition) == {}
    # The pull made the labelled series the overview and latency panels draw.
    samples = {
        (s.name, frozenset(s.labels.items()))
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }

    def has(name: str, **labels: str) -> bool:
        return any(n == name and set(labels.items()) <= set(ls) for n, ls in samples)

    for kind in ("manifest", "blob"):
        for cache in ("miss", "hit"):
            assert has("mirror_requests_total", upstream="local", kind=kind, cache=cache)
            assert has("mirror_request_seconds_bucket", kind=kind, cache=cache, le="+Inf")
    for source in ("cache", "upstream"):
        assert has("mirror_served_bytes_total", source=source)
    assert has("mirror_upstream_requests_total", upstream="local", method="GET", status="200")
    assert has("mirror_upstream_request_seconds_bucket", upstream="local")
    assert has("mirror_upstream_errors_total", upstream="dead", cause="connect")
    assert has("mirror_cache_limit_bytes")


async def test_every_query_runs_on_prometheus_scraping_a_mirror(
    make_mirror: MirrorFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """The queries as Grafana sends them, on a real Prometheus that scraped a mirror
    through a pull: each is valid PromQL there, and each panel the pull feeds has data
    (so its label matchers name real label values)."""
    dashboard = load_dashboard()
    mirror = await mirror_with_a_dead_upstream(make_mirror, upstream)
    prometheus = PrometheusServer(tmp_path / "prometheus", [mirror.host])
    await asyncio.to_thread(prometheus.start)
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str, **params: str) -> Any:
                async with http.get(f"{prometheus.url}/api/v1/{path}", params=params) as r:
                    body = await r.json()
                assert body["status"] == "success", (params, body)
                return body["data"]

            async def query(promql: str) -> list[Any]:
                data = await get("query", query=promql)
                result: list[Any] = data["result"]
                return result

            async def scraped(series: str, times: int) -> bool:
                counted = await query(f"count_over_time({series}[1m])")
                return bool(counted) and float(counted[0]["value"][1]) >= times

            # A miss, scraped; then a hit, scraped twice, so rate() has two points.
            await pull(mirror, tmp_path / "miss")
            await eventually_async(
                lambda: scraped('mirror_requests_total{kind="blob", cache="miss"}', 1), 30
            )
            await pull(mirror, tmp_path / "hit")
            await ask_dead_upstream(http, mirror)
            await eventually_async(
                lambda: scraped('mirror_upstream_errors_total{cause="connect"}', 2), 30
            )

            empty = set()
            for panel in all_panels(dashboard["panels"]):
                for target in panel.get("targets", []):
                    if not await query(as_promql(target["expr"])):
                        empty.add((panel["title"], target["refId"]))
            assert empty == EMPTY_WITHOUT_THEIR_EVENT

            for variable in dashboard["templating"]["list"]:
                if variable["type"] == "query":
                    match = LABEL_VALUES.match(variable["query"]["query"])
                    assert match
                    label = match[0].rsplit(",", 1)[1].strip(" )")
                    selector = as_promql(match["selector"])
                    values = await get(f"label/{label}/values", **{"match[]": selector})
                    assert values, variable["name"]
    finally:
        await asyncio.to_thread(prometheus.stop)
