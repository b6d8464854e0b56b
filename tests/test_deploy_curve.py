"""``site.yml`` run for real against localhost into a temporary root, open and then with CURVE.

- first run open on purpose (``fleetlog_curve=false`` with the loud opt-in
  ``fleetlog_insecure_open_network``, announced with a warning): it builds a venv from a freshly
  built wheel (offline, from a wheelhouse), renders the configs and units, warns about a source
  that matches nothing, and a second run changes nothing;
- then, on that same root (an existing deployment turning encryption on), twice more with the
  defaults, which turn CURVE on: key pairs made on the host with the right modes, public keys passed
  through the controller's fetch directory (and nothing secret), the agent's key authorised on
  the aggregator, configs that pass ``--check-config``, an aggregator started from them that
  admits the agent's key and refuses another, and an agent started from its rendered config that
  ships a line through CURVE; the second run changes nothing.

Four playbook runs, in this order, on this module's own root (tests/playbook.py), each in its own
module-scoped fixture (so that each test's setup runs at most one).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
import zmq.auth
from playbook import (
    DAEMONS,
    ONE_PLAYBOOK_PER_TEST,
    UNITS,
    Deployment,
    curve_public_key,
    daemons_until_line,
    free_ports,
    new_deployment,
    output,
    recap,
    run,
    stubbed_unit_dir,
    verify_unit,
)

pytestmark = ONE_PLAYBOOK_PER_TEST


@dataclass
class DryRun:
    deployment: Deployment
    runs: list[subprocess.CompletedProcess[str]]
    # What the open runs rendered, kept before the CURVE runs rewrite the same files.
    configs: dict[str, str]

    @property
    def root(self) -> Path:
        return self.deployment.root

    @property
    def logs(self) -> Path:
        return self.deployment.logs

    def recap(self, index: int) -> dict[str, int]:
        return recap(self.runs[index])


OPEN_NETWORK = {"fleetlog_curve": False, "fleetlog_insecure_open_network": True}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> DryRun:
    """The first run into this module's root: open on purpose, said in so many words. One
    playbook run per fixture, so that each fits in one test's timeout on a loaded machine."""
    tmp = tmp_path_factory.mktemp("deploy")
    deployment = new_deployment(tmp, request.config)
    runs = [deployment.play(OPEN_NETWORK, tmp=tmp / "open-0")]
    configs = {name: (deployment.etc / f"{name}.toml").read_text() for name in DAEMONS.values()
               if (deployment.etc / f"{name}.toml").exists()}
    return DryRun(deployment=deployment, runs=runs, configs=configs)


@pytest.fixture(scope="module")
def dry_run_twice(dry_run: DryRun, tmp_path_factory: pytest.TempPathFactory) -> DryRun:
    """The same open run again (``runs[1]``)."""
    dry_run.runs.append(dry_run.deployment.play(OPEN_NETWORK, tmp=tmp_path_factory.mktemp("open-1")))
    return dry_run


def test_playbook_deploys_into_a_temporary_root(dry_run: DryRun) -> None:
    first = dry_run.recap(0)
    assert first["failed"] == 0 and first["unreachable"] == 0, output(dry_run.runs[0])
    assert first["changed"] > 0
    venv = dry_run.deployment.bin_dir.parent
    for command in (*DAEMONS, "aggregatorctl"):
        assert (venv / "bin" / command).exists(), command
    for path in ("etc/fleetlog/aggregator.toml", "etc/fleetlog/agent.toml",
                 "var/lib/fleetlog/aggregator", "var/lib/fleetlog/agent", "var/log/fleetlog"):
        assert (dry_run.root / path).exists(), path


def test_second_run_changes_nothing(dry_run_twice: DryRun) -> None:
    second = dry_run_twice.recap(1)
    assert second["failed"] == 0 and second["changed"] == 0, output(dry_run_twice.runs[1])


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_rendered_config_passes_check_config(dry_run: DryRun, daemon: str, tmp_path: Path) -> None:
    config = tmp_path / f"{DAEMONS[daemon]}.toml"
    config.write_text(dry_run.configs[DAEMONS[daemon]])
    command = dry_run.deployment.bin_dir / daemon
    proc = run([command, "--check-config", "--config", config], timeout_s=60)
    assert proc.returncode == 0, output(proc) + "\n--- config\n" + config.read_text()


def test_rendered_configs_hold_the_inventory(dry_run: DryRun) -> None:
    aggregator = tomllib.loads(dry_run.configs["aggregator"])["aggregator"]
    assert aggregator["output_dir"] == f"{dry_run.root}/var/log/fleetlog"
    assert aggregator["state_dir"] == f"{dry_run.root}/var/lib/fleetlog/aggregator"
    # fleetlog_insecure_open_network: every interface, without keys.
    assert aggregator["pull"] == "tcp://0.0.0.0:5555"
    assert aggregator["control"] == ["tcp://0.0.0.0:5558", f"ipc://{dry_run.root}/run/fleetlog/control.sock"]
    assert aggregator["window_budget_bytes"] == 64 * 1024 * 1024
    assert aggregator["expected_agents"] == ["localhost"]  # the inventory's agents
    assert "curve_secret_key" not in aggregator
    agent = tomllib.loads(dry_run.configs["agent"])
    assert "curve_secret_key" not in agent["agent"]
    assert agent["agent"]["name"] == "localhost"
    assert agent["agent"]["state_dir"] == f"{dry_run.root}/var/lib/fleetlog/agent"
    assert agent["agent"]["data"] == "tcp://localhost:5555"
    assert agent["agent"]["control"] == "tcp://localhost:5558"
    assert [s["topic"] for s in agent["sources"]] == ["packages", "app", "misc.text", "absent"]
    assert agent["sources"][1]["paths"] == [f"{dry_run.logs}/*.log"]
    assert agent["sources"][2]["exclude"] == ["*.gz"]
    assert "exclude" not in agent["sources"][0]
    # Stock Debian 12 logs to the journal only: shipped by default.
    assert agent["journal"] == [{"topic": "journal", "start_at": "end"}]

def test_open_network_opt_in_is_announced(dry_run_twice: DryRun) -> None:
    for proc in dry_run_twice.runs:
        assert "WARNING: fleetlog_curve is false and fleetlog_insecure_open_network is true" in proc.stdout, \
            output(proc)


def test_source_matching_nothing_is_warned_about(dry_run: DryRun) -> None:
    out = dry_run.runs[0].stdout
    assert f"WARNING: source absent ({dry_run.logs}/absent/*.log) matches no file on localhost" in \
        " ".join(out.split()), output(dry_run.runs[0])
    assert "WARNING: source app " not in out


def test_installed_units_are_the_repo_units(dry_run: DryRun, tmp_path: Path) -> None:
    installed = dry_run.root / "etc" / "systemd" / "system"
    for unit in DAEMONS:
        assert (installed / f"{unit}.service").read_text() == (UNITS / f"{unit}.service").read_text()
        assert (installed / f"{unit}.service.d" / "10-ansible.conf").exists()
    # The drop-ins the roles add must verify together with the units.
    units = stubbed_unit_dir(installed, tmp_path)
    for unit in DAEMONS:
        proc = verify_unit(units, f"{unit}.service")
        assert proc.returncode == 0 and not proc.stderr.strip(), output(proc)



# --- the defaults (CURVE on) on the same root ----------------------------------------------------


@dataclass
class CurveRun:
    deployment: Deployment
    curve: dict[str, object]  # the variables of its runs
    root: Path
    bin_dir: Path
    keys: Path
    fetched: Path
    admin_file_key: bytes
    admin_inline_key: bytes
    runs: list[subprocess.CompletedProcess[str]]

    def recap(self, index: int) -> dict[str, int]:
        return recap(self.runs[index])


@pytest.fixture(scope="module")
def curve_run(dry_run_twice: DryRun, tmp_path_factory: pytest.TempPathFactory) -> CurveRun:
    """The defaults (CURVE on) on the root the open runs deployed: an existing deployment turning
    encryption on."""
    dry_run = dry_run_twice  # after both open runs: the CURVE runs change that root
    first = dry_run.recap(0)
    if first["failed"]:
        pytest.skip("the plain dry run failed (see test_playbook_deploys_into_a_temporary_root)")
    deployment = dry_run.deployment
    tmp = tmp_path_factory.mktemp("curve")
    admin_dir = tmp / "admin"
    proc = run([deployment.bin_dir / "aggregatorctl", "keygen", "ops", "--dir", admin_dir], timeout_s=30)
    assert proc.returncode == 0, output(proc)
    admin_file_key = zmq.auth.load_certificate(admin_dir / "ops.key")[0]
    admin_inline_key = curve_public_key()
    fetched = tmp / "fetched-keys"
    # No fleetlog_curve: CURVE is the default.
    curve = {
        "fleetlog_curve_fetch_dir": str(fetched),
        "fleetlog_aggregator_admin_keys": [
            {"name": "ops", "file": str(admin_dir / "ops.key")},
            {"name": "alice", "public_key": admin_inline_key.decode()},
        ],
    }
    runs = [deployment.play(curve, tmp=tmp / "run-0")]
    return CurveRun(deployment=deployment, curve=curve, root=deployment.root, bin_dir=deployment.bin_dir,
                    keys=deployment.keys, fetched=fetched, admin_file_key=admin_file_key,
                    admin_inline_key=admin_inline_key, runs=runs)


@pytest.fixture(scope="module")
def curve_run_twice(curve_run: CurveRun, tmp_path_factory: pytest.TempPathFactory) -> CurveRun:
    """The same CURVE run again (``runs[1]``)."""
    curve_run.runs.append(curve_run.deployment.play(curve_run.curve, tmp=tmp_path_factory.mktemp("curve-1")))
    return curve_run


def test_curve_rollout_reloads_the_aggregator_before_agents_restart(curve_run: CurveRun) -> None:
    """On the first CURVE run the aggregator reads the new agent keys before the agents restart
    with them (handlers run in the order the role lists them)."""
    out = curve_run.runs[0].stdout
    reload = out.find("RUNNING HANDLER [fleetlog_agent : Reload fleetlog-aggregator for new agent keys]")
    restart = out.find("RUNNING HANDLER [fleetlog_agent : Restart fleetlog-agent]")
    assert 0 <= reload < restart, output(curve_run.runs[0])


def test_curve_run_succeeds_then_changes_nothing(curve_run_twice: CurveRun) -> None:
    first, second = curve_run_twice.recap(0), curve_run_twice.recap(1)
    assert first["failed"] == 0 and first["unreachable"] == 0, output(curve_run_twice.runs[0])
    assert first["changed"] > 0
    assert second["failed"] == 0 and second["changed"] == 0, output(curve_run_twice.runs[1])
    # A new agent key on the aggregator notifies the reload (SIGHUP) handler, and only then.
    reload = "RUNNING HANDLER [fleetlog_agent : Reload fleetlog-aggregator for new agent keys]"
    assert reload in curve_run_twice.runs[0].stdout
    assert reload not in curve_run_twice.runs[1].stdout


def test_curve_key_files_have_safe_modes(curve_run: CurveRun) -> None:
    keys = curve_run.keys

    def mode(path: Path) -> int:
        st = path.stat()
        assert st.st_uid == os.getuid(), path  # a dry run keeps the invoking user
        return stat.S_IMODE(st.st_mode)

    assert mode(keys) == 0o750
    for name in ("aggregator", "agent"):
        assert mode(keys / f"{name}.key_secret") == 0o600, name
        assert mode(keys / f"{name}.key") == 0o644, name
        public, secret = zmq.auth.load_certificate(keys / f"{name}.key_secret")
        assert secret and zmq.auth.load_certificate(keys / f"{name}.key")[0] == public
    for sub in ("agents", "admins"):
        assert mode(keys / sub) == 0o750, sub
    for path in (keys / "server.key", *(keys / "agents").iterdir(), *(keys / "admins").iterdir()):
        assert mode(path) == 0o644, path
        assert zmq.auth.load_certificate(path)[1] is None, f"{path} holds a secret key"


def test_curve_public_keys_are_distributed(curve_run: CurveRun) -> None:
    keys, fetched = curve_run.keys, curve_run.fetched

    def public(path: Path) -> bytes:
        return zmq.auth.load_certificate(path)[0]

    aggregator, agent = public(keys / "aggregator.key"), public(keys / "agent.key")
    assert aggregator != agent
    # Only public keys went through the controller.
    assert sorted(str(p.relative_to(fetched)) for p in fetched.rglob("*") if p.is_file()) == [
        "agents/localhost.key", "aggregators/localhost.key"]
    assert public(fetched / "aggregators" / "localhost.key") == aggregator
    assert public(fetched / "agents" / "localhost.key") == agent
    # The agent's key is authorised on the aggregator under its inventory name; the agent trusts
    # the aggregator's key; the admin keys are both there, one from a file and one inline.
    assert sorted(p.name for p in (keys / "agents").iterdir()) == ["localhost.key"]
    assert public(keys / "agents" / "localhost.key") == agent
    assert public(keys / "server.key") == aggregator
    assert sorted(p.name for p in (keys / "admins").iterdir()) == ["alice.key", "ops.key"]
    assert zmq.auth.load_certificates(keys / "admins") == {
        curve_run.admin_file_key: True, curve_run.admin_inline_key: True}


def test_curve_configs_carry_the_keys_and_pass_check_config(curve_run: CurveRun) -> None:
    etc, keys = curve_run.root / "etc" / "fleetlog", curve_run.keys
    aggregator = tomllib.loads((etc / "aggregator.toml").read_text())["aggregator"]
    assert aggregator["curve_secret_key"] == f"{keys}/aggregator.key_secret"
    assert aggregator["authorized_keys_dir"] == f"{keys}/agents"
    assert aggregator["admin_keys_dir"] == f"{keys}/admins"
    agent = tomllib.loads((etc / "agent.toml").read_text())["agent"]
    assert agent["curve_server_key"] == f"{keys}/server.key"
    assert agent["curve_secret_key"] == f"{keys}/agent.key_secret"
    for daemon, short in DAEMONS.items():
        proc = run([curve_run.bin_dir / daemon, "--check-config", "--config",
                    etc / f"{short}.toml"], timeout_s=60)
        assert proc.returncode == 0, output(proc) + "\n--- config\n" + (etc / f"{short}.toml").read_text()

def test_curve_aggregator_admits_the_agent_key_only(curve_run: CurveRun, tmp_path: Path) -> None:
    """The rendered aggregator config, on loopback ports of its own: the agent's key (as rendered
    into agent.toml) gets a status, a key the playbook never saw does not."""
    bin_dir, keys = curve_run.bin_dir, curve_run.keys
    pull, xsub, xpub, control = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
    errors = tmp_path / "aggregator.err"

    def status(secret: Path) -> subprocess.CompletedProcess[str]:
        return run([bin_dir / "aggregatorctl", "--control", control, "--timeout", "2", "--curve-key", secret,
                    "--server-key", keys / "server.key", "status", "--json"], timeout_s=30)

    with errors.open("w") as stderr:
        aggregator = subprocess.Popen(
            [bin_dir / "fleetlog-aggregator", "--config", curve_run.root / "etc/fleetlog/aggregator.toml",
             "--set", f"aggregator.pull={pull}", "--set", f"aggregator.xsub={xsub}",
             "--set", f"aggregator.xpub={xpub}", "--set", f'aggregator.control=["{control}"]',
             "--set", 'aggregator.metrics_listen=""'],
            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        while (proc := status(keys / "agent.key_secret")).returncode != 0 and time.monotonic() < deadline:
            assert aggregator.poll() is None, errors.read_text()
            time.sleep(0.2)
        assert proc.returncode == 0, output(proc) + errors.read_text()
        assert "agents" in json.loads(proc.stdout)
        stranger = tmp_path / "stranger"
        keygen = run([bin_dir / "aggregatorctl", "keygen", "stranger", "--dir", stranger], timeout_s=30)
        assert keygen.returncode == 0, output(keygen)
        refused = status(stranger / "stranger.key_secret")
        assert refused.returncode != 0, output(refused)
        assert "refused unknown key from" in errors.read_text()
    finally:
        aggregator.terminate()
        aggregator.wait(timeout=30)


def test_curve_agent_ships_through_curve(curve_run: CurveRun, tmp_path: Path) -> None:
    """Both daemons from their rendered configs (keys as rendered), on loopback ports and
    directories of their own: a line written to a followed file arrives on the aggregator, which
    admits nothing without an authorised key."""
    bin_dir, etc = curve_run.bin_dir, curve_run.root / "etc" / "fleetlog"
    pull, xsub, xpub, control = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("shipped through curve\n")
    aggregator_argv = [
        bin_dir / "fleetlog-aggregator", "--config", etc / "aggregator.toml",
        "--set", f"aggregator.pull={pull}", "--set", f"aggregator.xsub={xsub}",
        "--set", f"aggregator.xpub={xpub}", "--set", f'aggregator.control=["{control}"]',
        "--set", 'aggregator.metrics_listen=""', "--set", f'aggregator.output_dir="{out}"',
        "--set", f'aggregator.state_dir="{tmp_path / "agg-state"}"']
    agent_argv = [
        bin_dir / "fleetlog-agent", "--config", etc / "agent.toml",
        "--set", f'agent.data="{pull}"', "--set", f'agent.control="{control}"',
        "--set", f'agent.state_dir="{tmp_path / "agent-state"}"', "--set", "journal=[]",
        "--set", f'sources=[{{paths=["{logs}/*.log"], topic="app", start_at="beginning"}}]']
    agent_config = tomllib.loads((etc / "agent.toml").read_text())["agent"]
    assert agent_config["curve_secret_key"] and agent_config["curve_server_key"]
    with daemons_until_line({"aggregator": aggregator_argv, "agent": agent_argv}, tmp_path,
                            out / "app" / "app.log", "shipped through curve", timeout_s=30) as logs_by_name:
        assert "refused" not in logs_by_name["aggregator"].read_text()

