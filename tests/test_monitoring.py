"""The alerting rules and the dashboard, tested for real: promtool runs the rules' unit tests,
and every metric the rules and the dashboard use exists on the running daemons' /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import zmq
from harness import Harness, append_lines, count_lines, free_port, make_lines, wait_for
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import JETSTREAM_COUNTERS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "fleetlog-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "fleetlog-dashboard.json"
METRIC = re.compile(r"\bfleetlog_(?:aggregator|agent)_[a-z_]+\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool (Debian's prometheus package; make system-deps installs it) is missing")
    return path


def test_rules_are_valid_and_pass_their_unit_tests() -> None:
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", RULES.name], cwd=RULES.parent, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool, "test", "rules", "fleetlog-rules.test.yml"], cwd=RULES.parent,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def used_metrics() -> set[str]:
    """Every fleetlog metric name the rules' and the dashboard's expressions read."""
    exprs = [line for line in RULES.read_text().splitlines() if "expr:" in line]
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        exprs += [t["expr"] for t in panel["targets"]]
    return {name for e in exprs for name in METRIC.findall(e)}


def scrape(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_of_the_rules_and_the_dashboard_exists(h: Harness) -> None:
    ep = h.endpoints()
    agg_port, agent_port = free_port(), free_port()
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 100))
    h.aggregator(ep, f"aggregator.metrics_listen=127.0.0.1:{agg_port}")
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "m"}],
            f"agent.metrics_listen=127.0.0.1:{agent_port}")
    wait_for(lambda: count_lines(h.path("out", "m", "m.log")) == 100, what="lines")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    try:  # one malformed message, so that the drops have a sample
        push.connect(ep.pull)
        push.send_multipart([b"m", b"not json"])
        wait_for(lambda: h.status(ep)["totals"]["malformed_dropped"] == 1, what="malformed counted")
    finally:
        push.close(linger=0)
        ctx.term()
    exposed = wait_for(lambda: (x := scrape(agg_port) | scrape(agent_port))
                       and "fleetlog_aggregator_commit_seconds_bucket" in x and x, what="metrics")
    used = used_metrics()
    assert len(used) >= 15
    assert not used - exposed, f"used by the rules or the dashboard but not exposed: {sorted(used - exposed)}"
    assert "fleetlog_aggregator_info" in exposed and "fleetlog_agent_info" in exposed
    assert not [n for n in exposed if n.endswith("_info_info")]


def test_every_jetstream_sink_metric_is_in_the_readme() -> None:
    """The README's list of the JetStream sink's metrics and status counters is complete."""
    readme = (DEPLOY.parent / "README.md").read_text()
    missing = [f"{name}_total" for _, name, _ in JETSTREAM_COUNTERS if f"`{name}_total`" not in readme]
    missing += [field for field, _, _ in JETSTREAM_COUNTERS if f"`{field}`" not in readme]
    assert not missing, f"not in the README: {missing}"
