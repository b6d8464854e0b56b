"""Agents with several aggregators, deployed for real against localhost (tests/playbook.py):
two aggregator hosts (localhost and agg-b, a local host with a root of its own), CURVE on, the
agent given both (``fleetlog_agent_aggregators``) and the aggregators one key pair
(``fleetlog_curve_aggregators_share_key``). The rendered agent.toml lists both and passes
``--check-config``; agg-b's aggregator and the agent, started from their rendered configs, ship a
line through CURVE while the agent's other aggregator is down. Aggregators with pairs of their own
in one agent's list are refused. Two playbook runs, into this module's own roots.
"""

from __future__ import annotations

import json
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playbook import (
    ONE_PLAYBOOK_PER_TEST,
    Deployment,
    daemons_until_line,
    free_ports,
    new_deployment,
    output,
    recaps,
    run,
)

from agent import failover

pytestmark = ONE_PLAYBOOK_PER_TEST


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Deployment:
    return new_deployment(tmp_path_factory.mktemp("deploy"), request.config)


# --- several aggregators: the agent's failover list and one shared key pair ----------------------


@dataclass
class FailoverRun:
    proc: subprocess.CompletedProcess[str]
    inventory: Path
    extra: Path
    variables: dict[str, Any]
    root_b: Path
    endpoints: list[dict[str, str]]


def first_choice_dead(agent_name: str) -> tuple[str, str, str, str]:
    """Free loopback endpoints (data and control of two aggregators) such that the agent ranks the
    first pair first (agent/failover.py's rendezvous hash of its name and each control endpoint)."""
    while True:
        data_a, control_a, data_b, control_b = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
        if failover.weight(agent_name, control_a) > failover.weight(agent_name, control_b):
            return data_a, control_a, data_b, control_b


@pytest.fixture(scope="module")
def failover_run(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> FailoverRun:
    """A second aggregator, agg-b (a local host deploying into a root of its own, so fleetlog_root
    is a host variable here, not an extra one), fleetlog_curve_aggregators_share_key, and the agent
    given both aggregators on loopback ports where nothing listens yet."""
    tmp = tmp_path_factory.mktemp("failover")
    root_b = tmp / "root-b"
    inventory = tmp / "inventory.ini"
    inventory.write_text(deployment.inventory.read_text().replace(
        "[aggregators]\nlocalhost\n",
        f"[aggregators]\nlocalhost fleetlog_root={deployment.root}\nagg-b fleetlog_root={root_b}\n"))
    base = json.loads(deployment.extra.read_text())
    del base["fleetlog_root"]
    extra = tmp / "vars-base.json"
    extra.write_text(json.dumps(base))
    # localhost's aggregator (never started) ranks first for this agent: it must fail over to agg-b.
    data_a, control_a, data_b, control_b = first_choice_dead("localhost")
    endpoints = [{"data": data_a, "control": control_a, "host": "localhost"},
                 {"data": data_b, "control": control_b, "host": "agg-b"}]
    variables = {"fleetlog_curve_aggregators_share_key": True, "fleetlog_agent_aggregators": endpoints}
    proc = deployment.play(variables, tmp=tmp, inventory=inventory, extra=extra)
    return FailoverRun(proc=proc, inventory=inventory, extra=extra, variables=variables, root_b=root_b,
                       endpoints=endpoints)


def test_agent_fails_over_between_aggregators_sharing_one_key(deployment: Deployment,
                                                             failover_run: FailoverRun,
                                                             tmp_path: Path) -> None:
    """fleetlog_agent_aggregators renders agent.toml's `aggregators` list (no data/control), which
    passes --check-config; with fleetlog_curve_aggregators_share_key agg-b gets localhost's key
    pair (the agent has one curve_server_key for both) and the agent's key is authorised on both.
    Then agg-b's aggregator and the agent, from their rendered configs: the agent's other
    aggregator is down, and a line still arrives through CURVE at agg-b."""
    proc, root_b = failover_run.proc, failover_run.root_b
    assert set(recaps(proc)) == {"localhost", "agg-b"}, output(proc)
    for host, counts in recaps(proc).items():
        assert counts["failed"] == 0 and counts["unreachable"] == 0, (host, output(proc))
    keys_b = root_b / "etc" / "fleetlog" / "keys"
    for name in ("aggregator.key", "aggregator.key_secret"):
        assert (keys_b / name).read_bytes() == (deployment.keys / name).read_bytes(), name
    # 0640 root:fleetlog for real (a dry run keeps the invoking user)
    assert stat.S_IMODE((keys_b / "aggregator.key_secret").stat().st_mode) == 0o600
    assert "aggregator.key_secret" not in {p.name for p in deployment.fetched.rglob("*")}
    agent_key = (deployment.keys / "agent.key").read_text()
    assert (keys_b / "agents" / "localhost.key").read_text() == agent_key
    assert (deployment.keys / "agents" / "localhost.key").read_text() == agent_key
    agent = deployment.config("agent")["agent"]
    listed = [{"data": e["data"], "control": e["control"]} for e in failover_run.endpoints]
    assert agent["aggregators"] == listed
    assert "data" not in agent and "control" not in agent
    assert agent["curve_server_key"] == f"{deployment.keys}/server.key"
    check = run([deployment.bin_dir / "fleetlog-agent", "--check-config", "--config",
                 deployment.etc / "agent.toml"], timeout_s=60)
    assert check.returncode == 0, output(check)

    # agg-b's rendered aggregator on the ports the agent was given for it; localhost's stays down.
    bin_b, etc_b = root_b / "opt" / "fleetlog" / "venv" / "bin", root_b / "etc" / "fleetlog"
    data_b, control_b = failover_run.endpoints[1]["data"], failover_run.endpoints[1]["control"]
    xsub, xpub = (f"tcp://127.0.0.1:{port}" for port in free_ports(2))
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("shipped to the other aggregator\n")
    argvs = {
        "aggregator": [
            bin_b / "fleetlog-aggregator", "--config", etc_b / "aggregator.toml",
            "--set", f"aggregator.pull={data_b}", "--set", f"aggregator.xsub={xsub}",
            "--set", f"aggregator.xpub={xpub}", "--set", f'aggregator.control=["{control_b}"]',
            "--set", 'aggregator.metrics_listen=""', "--set", f'aggregator.output_dir="{out}"',
            "--set", f'aggregator.state_dir="{tmp_path / "agg-state"}"'],
        "agent": [
            deployment.bin_dir / "fleetlog-agent", "--config", deployment.etc / "agent.toml",
            "--set", f'agent.state_dir="{tmp_path / "agent-state"}"', "--set", "journal=[]",
            "--set", f'sources=[{{paths=["{logs}/*.log"], topic="app", start_at="beginning"}}]'],
    }
    # The agent is stopped first, while agg-b still answers (an agent stopped during a move once
    # hung: fixed, and tested in test_failover.py).
    written = out / "app" / "app.log"
    with daemons_until_line(argvs, tmp_path, written, "shipped to the other aggregator") as logs_by_name:
        assert "refused" not in logs_by_name["aggregator"].read_text()
        assert "switching aggregator" in logs_by_name["agent"].read_text()  # it did fail over


def test_failover_list_between_aggregators_with_keys_of_their_own_is_refused(
        deployment: Deployment, failover_run: FailoverRun, tmp_path: Path) -> None:
    """agg-b with a key pair of its own (made anew, fleetlog_curve_aggregators_share_key off): an
    agent listing both could trust only one of them, so its play stops and says what to set."""
    keys_b = failover_run.root_b / "etc" / "fleetlog" / "keys"
    for name in ("aggregator.key", "aggregator.key_secret"):
        (keys_b / name).unlink()
    proc = deployment.play({**failover_run.variables, "fleetlog_curve_aggregators_share_key": False},
                           tmp=tmp_path, inventory=failover_run.inventory, extra=failover_run.extra)
    assert recaps(proc)["localhost"]["failed"] == 1, output(proc)
    assert (keys_b / "aggregator.key").read_bytes() != (deployment.keys / "aggregator.key").read_bytes()
    assert ("this agent fails over between localhost, agg-b (fleetlog_agent_aggregators), whose public "
            "keys differ") in " ".join(proc.stdout.split()), output(proc)
    assert "fleetlog_curve_aggregators_share_key: true" in " ".join(proc.stdout.split())
