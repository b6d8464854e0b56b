"""The command-line tools behave like Unix tools: quiet on a closed pipe, a one-line error for a
bad endpoint, an answer at once when nothing listens, a user's --help, typos answered with the
nearest key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from harness import PY, Harness, append_lines, free_port, make_lines, wait_for

CTL = [PY, "-m", "aggregator.ctl"]


def run(argv: list[str], timeout: float = 15, **kw: object) -> subprocess.CompletedProcess[str]:
    # A bounded wait: a client that waited out its own --timeout (30 s) would fail here.
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def test_status_into_a_pipe_closed_early_exits_quietly(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 10))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "app"}])
    wait_for(lambda: (s := h.agent_status()) is not None and s["aggregator"], what="agent connected")
    ctl = " ".join(CTL)
    agent = f"{PY} -m agent status --set agent.state_dir={h.path('st-node1')}"
    for command in (f"{ctl} --control {ep.control} status", f"{ctl} --control {ep.control} status --json",
                    agent, f"{agent} --json"):
        # Many lines into a reader that leaves after the first byte.
        # (Three runs: the second and third write into a closed pipe; each is a fresh Python,
        # which on a loaded machine takes seconds, so the bound is the loop's, not one run's.)
        r = run(["bash", "-c", f"for i in 1 2 3; do {command}; done | head -c 1"], timeout=60)
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, (command, r.stderr)


@pytest.mark.parametrize("endpoint", ["foo", "tcp://nohost", "udp://1.2.3.4:5"])
def test_bad_control_endpoint_is_one_line(endpoint: str) -> None:
    r = run([*CTL, "--control", endpoint, "status"])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "not an endpoint" in r.stderr


def test_nothing_listening_is_said_at_once(short_tmp: Path) -> None:
    for endpoint in (f"tcp://127.0.0.1:{free_port()}", f"ipc://{short_tmp}/none.sock"):
        r = run([*CTL, "--control", endpoint, "--timeout", "30", "status"])
        assert r.returncode == 3, r.stderr
        assert "is it running?" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A socket file left by a killed daemon: nothing listens on it.
    stale = short_tmp / "stale.sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    r = run([*CTL, "--control", f"ipc://{stale}", "--timeout", "30", "status"])
    assert r.returncode == 3, r.stderr
    r = run([PY, "-m", "agent", "status", "--timeout", "30", "--set", f"agent.state_dir={short_tmp}/st"])
    assert r.returncode == 3 and "is it running?" in r.stderr, r.stderr


@pytest.mark.parametrize("argv", [CTL, [PY, "-m", "agent"], [PY, "-m", "aggregator"]])
def test_help_is_for_users(argv: list[str]) -> None:
    r = run([*argv, "--help"])
    assert r.returncode == 0
    assert "Exit status" in r.stdout and "Examples" in r.stdout
    assert "``" not in r.stdout and "argv" not in r.stdout  # not a developer's docstring


def test_a_typo_in_a_key_names_the_file_and_the_nearest_key(short_tmp: Path) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text("[agent]\nrescan_intervall_ms = 100\n")
    r = run([PY, "-m", "agent", "--config", str(cfg), "--check-config"])
    assert r.returncode == 2
    assert f"{cfg}: agent.rescan_intervall_ms: unknown key; did you mean rescan_interval_ms?" in r.stderr


def test_tail_of_a_topic_that_does_not_exist_says_so(h: Harness) -> None:
    ep = h.endpoints()
    h.aggregator(ep)
    append_lines(h.path("logs", "a.log"), make_lines("a", 0, 3))
    h.agent(ep, [{"paths": [f"{h.path('logs')}/*.log"], "topic": "real"}])
    wait_for(lambda: h.lines("real"), what="topic real written")
    r = h.ctl(ep, "tail", "nope")
    assert r.returncode == 1 and "no topic 'nope' (topics: real)" in r.stderr, r.stderr
