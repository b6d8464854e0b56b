"""--check-config on both daemons, and the pure config loaders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config as load_agent
from aggregator.config import load_config as load_aggregator
from fleetlog.tomlconf import ConfigError


def check(module: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)


def test_good_configs_pass(short_tmp: Path) -> None:
    agg = short_tmp / "aggregator.toml"
    agg.write_text(f"""
[aggregator]
output_dir = "{short_tmp}/out"
state_dir  = "{short_tmp}/state"
pull       = "tcp://0.0.0.0:5555"
xsub       = "tcp://0.0.0.0:5556"
xpub       = "tcp://0.0.0.0:5557"
control    = ["tcp://0.0.0.0:5558", "ipc://{short_tmp}/control.sock"]
""")
    agent = short_tmp / "agent.toml"
    agent.write_text(f"""
[agent]
name      = "web-01"
state_dir = "{short_tmp}/agent"
mode      = "pub"
data      = "tcp://logs.example:5556"
control   = "tcp://logs.example:5558"

[[sources]]
paths = ["/var/log/nginx/*.log", "/var/log/app/**/*.log"]
topic = "nginx"
start_at = "end"
""")
    for module, path in (("aggregator", agg), ("agent", agent)):
        r = check(module, path)
        assert r.returncode == 0, r.stderr
        assert "ok" in r.stdout


def test_every_problem_is_reported_with_its_key(short_tmp: Path) -> None:
    agg = short_tmp / "aggregator.toml"
    agg.write_text("""
[aggregator]
output_dir = 5
pull = "tcp://nowhere"
control = []
commit_interval_ms = -1
colour = "blue"
[aggregator.topics."../etc"]
format = "xml"
""")
    r = check("aggregator", agg)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    for key in ("aggregator.output_dir", "aggregator.pull", "aggregator.control",
                "aggregator.commit_interval_ms", "aggregator.colour: unknown key",
                "aggregator.topics.../etc.format"):
        assert key in r.stderr, (key, r.stderr)


def test_agent_problems_name_sources_by_index(short_tmp: Path) -> None:
    agent = short_tmp / "agent.toml"
    agent.write_text("""
[agent]
mode = "carrier-pigeon"
data = "udp://x:1"
[[sources]]
paths = ["relative/*.log"]
topic = ".hidden"
[[sources]]
topic = "ok"
multiline_start = "(unclosed"
""")
    r = check("agent", agent)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    for key in ("agent.mode", "agent.data", "sources[0].paths", "sources[0].topic",
                "sources[1].paths: missing", "sources[1].multiline_start"):
        assert key in r.stderr, (key, r.stderr)


@pytest.mark.parametrize("content, message", [
    ("[agent\nname=", "not valid TOML"),
    (None, "no such file"),
])
def test_unreadable_config_files(short_tmp: Path, content: str | None, message: str) -> None:
    path = short_tmp / "agent.toml"
    if content is not None:
        path.write_text(content)
    r = check("agent", path)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_unwritable_state_dir_is_an_error(short_tmp: Path) -> None:
    blocker = short_tmp / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as exc:
        load_aggregator(None, [f"aggregator.state_dir={blocker}/sub", f"aggregator.output_dir={short_tmp}"])
    assert any("aggregator.state_dir" in p for p in exc.value.problems)


def test_set_overrides_take_toml_values(short_tmp: Path) -> None:
    cfg = load_agent(None, [f"agent.state_dir={short_tmp}", "agent.name=web-02", "agent.batch_max_lines=7",
                            f'sources=[{{paths=["{short_tmp}/*.log"], topic="t"}}]'])
    assert cfg.agent.name == "web-02" and cfg.agent.batch_max_lines == 7
    assert cfg.sources[0].paths == (f"{short_tmp}/*.log",)


def test_endpoints_used_twice_are_refused(short_tmp: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_aggregator(None, [f"aggregator.state_dir={short_tmp}/s", f"aggregator.output_dir={short_tmp}/o",
                               "aggregator.xsub=tcp://127.0.0.1:5555"])
    assert any("used twice" in p for p in exc.value.problems)


# Tests run as root, for whom every directory is readable and writable. setpriv runs the check
# as root without capabilities: then a directory owned by another user with mode 0700 is closed
# to it, as it would be to the fleetlog service user.
SETPRIV = shutil.which("setpriv")
NOBODY = 65534


def check_unprivileged(module: str, path: Path) -> subprocess.CompletedProcess[str]:
    argv = [SETPRIV, "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-m", module,
            "--check-config", "--config", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(SETPRIV is None or os.geteuid() != 0, reason="needs root and setpriv (util-linux)")
def test_directories_closed_to_the_service_user_are_reported(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    closed = short_tmp / "closed"       # another user's, mode 0700: neither readable nor writable
    (closed / "logs").mkdir(parents=True)
    foreign = short_tmp / "foreign"     # another user's, mode 0755: readable, not writable
    foreign.mkdir()
    for d in (closed, closed / "logs", foreign):
        os.chown(d, NOBODY, NOBODY)
    closed.chmod(0o700)
    agent = short_tmp / "agent.toml"
    agent.write_text(f"""
[agent]
state_dir = "{foreign}/agent"
[[sources]]
paths = ["{closed}/logs/*.log"]
topic = "t"
""")
    aggregator = short_tmp / "aggregator.toml"
    aggregator.write_text(f"""
[aggregator]
output_dir = "{foreign}"
state_dir  = "{closed}/state"
""")
    r = check_unprivileged("agent", agent)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{closed}" in r.stderr and "agent.state_dir" in r.stderr, r.stderr
    r = check_unprivileged("aggregator", aggregator)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "aggregator.output_dir" in r.stderr and "aggregator.state_dir" in r.stderr, r.stderr
    # The same configs pass for a user who may use the directories (root with its privileges).
    assert check("agent", agent).returncode == 0
    assert check("aggregator", aggregator).returncode == 0


def test_a_secret_key_others_can_read_is_refused(short_tmp: Path) -> None:
    keys = short_tmp / "keys"
    keys.mkdir()
    r = subprocess.run([sys.executable, "-m", "aggregator.ctl", "keygen", "web-01", "--dir", str(keys)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    secret = keys / "web-01.key_secret"
    agent = short_tmp / "agent.toml"
    agent.write_text(f"""
[agent]
state_dir = "{short_tmp}/agent"
curve_secret_key = "{secret}"
curve_server_key = "{keys}/web-01.key"
[[sources]]
paths = ["{short_tmp}/logs/*.log"]
topic = "t"
""")
    assert check("agent", agent).returncode == 0
    secret.chmod(0o644)
    r = check("agent", agent)
    assert r.returncode != 0 and "agent.curve_secret_key" in r.stderr and "chmod 600" in r.stderr, r.stderr


def test_agent_status_socket_empty_is_the_documented_default(tmp_path: Path) -> None:
    """README: ``status_socket = ""`` means the default socket under state_dir."""
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{tmp_path}"\nstatus_socket = ""\n'
                   f'[[sources]]\npaths = ["{tmp_path}/*.log"]\ntopic = "x"\n')
    r = subprocess.run([sys.executable, "-m", "agent", "--config", str(cfg), "--check-config"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
