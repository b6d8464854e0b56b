"""--check-config on both daemons, and the pure config loaders."""

from __future__ import annotations

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
