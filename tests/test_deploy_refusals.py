"""``site.yml`` without CURVE, and what the play refuses, run for real against localhost into a
temporary root (tests/playbook.py).

- ``fleetlog_curve=false`` without the opt-in ``fleetlog_insecure_open_network`` deploys a
  working root (this module's only full run) bound to loopback only;
- on that root the play refuses an open endpoint without CURVE, an agent elsewhere without
  CURVE, an install without a pinned version or a wheel, agents whose sources match nothing, and
  a failover list entry without its aggregator's inventory host (with CURVE),
  each with a message that says what to do. One run each: most stop at their check, before
  anything is changed; the agents' refusals play the agents' play alone.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from playbook import ONE_PLAYBOOK_PER_TEST, Deployment, new_deployment, output, recap

pytestmark = ONE_PLAYBOOK_PER_TEST


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Deployment:
    return new_deployment(tmp_path_factory.mktemp("deploy"), request.config)


@pytest.fixture(scope="module")
def loopback_run(deployment: Deployment,
                 tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    """The root deployed without CURVE (and without the open-network opt-in); the refusals below
    run on it, so that they find fleetlog installed."""
    return deployment.play({"fleetlog_curve": False}, tmp=tmp_path_factory.mktemp("loopback"))


def test_without_curve_the_aggregator_listens_on_loopback_only(
        deployment: Deployment, loopback_run: subprocess.CompletedProcess[str]) -> None:
    assert recap(loopback_run)["failed"] == 0, output(loopback_run)
    assert "WARNING: fleetlog_curve is false" not in loopback_run.stdout
    aggregator = deployment.config("aggregator")["aggregator"]
    assert [aggregator[k] for k in ("pull", "xsub", "xpub")] == [
        "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557"]
    assert aggregator["control"] == ["tcp://127.0.0.1:5558", f"ipc://{deployment.root}/run/fleetlog/control.sock"]
    assert "curve_secret_key" not in aggregator
    agent = deployment.config("agent")["agent"]
    assert (agent["data"], agent["control"]) == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5558")
    assert "curve_secret_key" not in agent


@pytest.fixture
def installed(deployment: Deployment, loopback_run: subprocess.CompletedProcess[str]) -> Deployment:
    """This module's root after the loopback run (whether or not it passed: a refusal needs only
    the installed venv, and a failed first run is reported by the test above)."""
    return deployment


def test_open_endpoint_without_curve_is_refused(installed: Deployment, tmp_path: Path) -> None:
    out = installed.failed_play({"fleetlog_curve": False, "fleetlog_aggregator_pull": "tcp://0.0.0.0:5555"},
                                tmp=tmp_path)
    assert "fleetlog_curve is false, so tcp://0.0.0.0:5555 would let anyone" in out


# The agents' refusals play the agents' play alone (the aggregator play would change nothing).
LOOPBACK_AGGREGATOR = {"fleetlog_agent_data": "tcp://127.0.0.1:5555", "fleetlog_agent_control": "tcp://127.0.0.1:5558"}


def test_agent_elsewhere_without_curve_is_refused(installed: Deployment, tmp_path: Path) -> None:
    out = installed.failed_play({"fleetlog_curve": False, "fleetlog_agent_data": "tcp://10.0.0.10:5555"},
                                tmp=tmp_path, inventory=installed.agents_only(tmp_path))
    assert "the aggregator listens on loopback only and this agent (localhost, shipping to " \
           "tcp://10.0.0.10:5555) cannot reach it" in out


@pytest.mark.parametrize("variables", [
    {"fleetlog_wheel": ""},
    {"fleetlog_wheel": "", "fleetlog_pip_spec": "fleetlog"},
], ids=["nothing", "bare-name"])
def test_install_without_pinned_version_or_wheel_is_refused(deployment: Deployment, tmp_path: Path,
                                                            variables: dict[str, object]) -> None:
    out = deployment.failed_play(variables, tmp=tmp_path)  # the first check: no install needed
    assert "say which fleetlog to install" in out and 'never the bare name "fleetlog"' in out
    assert "TASK [fleetlog : Install fleetlog into the virtualenv]" not in out


def test_agent_shipping_nothing_is_refused(installed: Deployment, tmp_path: Path) -> None:
    absent = f"{installed.logs}/absent/*.log"
    out = installed.failed_play(LOOPBACK_AGGREGATOR, {
        "fleetlog_agent_journal": [], "fleetlog_agent_sources": [],
        "fleetlog_agent_extra_sources": [{"paths": [absent], "topic": "absent"}]},
        tmp=tmp_path, inventory=installed.agents_only(tmp_path))
    assert f"this agent would ship nothing: on localhost, source absent match no file ({absent})" in out


def test_unmatched_sources_fail_when_asked(installed: Deployment, tmp_path: Path) -> None:
    out = installed.failed_play(LOOPBACK_AGGREGATOR, {"fleetlog_agent_unmatched_sources": "fail"},
                                tmp=tmp_path, inventory=installed.agents_only(tmp_path))
    logs = installed.logs
    assert (f"on localhost, source misc.text, source absent match no file ({logs}/**/*.txt, "
            f"{logs}/absent/*.log)") in out


def test_failover_list_entry_without_its_aggregator_host_is_refused(installed: Deployment,
                                                                    tmp_path: Path) -> None:
    """With CURVE the play must know on which inventory host to authorise the agent's key."""
    out = installed.failed_play({"fleetlog_agent_aggregators": [
        {"data": "tcp://10.0.0.2:5555", "control": "tcp://10.0.0.2:5558"}]},
        tmp=tmp_path, inventory=installed.agents_only(tmp_path))
    assert ('bad entry {"data": "tcp://10.0.0.2:5555", "control": "tcp://10.0.0.2:5558"} of '
            "fleetlog_agent_aggregators: each is {data, control, host}") in out
    assert "TASK [fleetlog_agent : Render agent.toml]" not in out
