"""What an agent that only follows files loads (issue 18: its memory on every node).

Memory itself is a bench figure (``python -m bench.peers --workloads idle``), never asserted. What
a test can catch is an import that sneaks back in: each module below costs an idle agent RSS
(OpenSSL's libcrypto through ``ssl`` or ``_hashlib`` about 5 MiB, uvloop 2 MiB, prometheus-client
4 MiB, watchfiles 1 MiB) and is needed only by a configuration that asks for it.
"""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from harness import Harness, append_lines, check_exactly_once, free_port, make_lines, output_lines, wait_for

# Runs a daemon's own ``python -m agent`` (or ``-m aggregator``) in this process and, when it
# exits, writes the names of the modules it had loaded (argv: the file to write, then the
# daemon's own: PY -m MODULE ARGS).
_RUN_AND_LIST_MODULES = """
import atexit, runpy, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
module = sys.argv[4]  # after "-c", the file, PY, "-m"
sys.argv = [module, *sys.argv[5:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# Each only with the configuration that asks for it (README, "Memory").
NOT_FOR_FILES = {
    "ssl": "TLS: never used by the agent (asyncio imports it; agent/__init__.py hides it)",
    "_ssl": "TLS",
    "_hashlib": "OpenSSL's hashes (hashlib's built-in sha256 and blake2b serve the agent)",
    "uvloop": "only with agent.loop = \"uvloop\"",
    "prometheus_client": "only with agent.metrics_listen",
    "watchfiles": "only with force_polling or without inotify",
    "agent.journal_source": "only with [[journal]] sections",
    "agent.journal": "only with [[journal]] sections",
    "difflib": "only to suggest a key for a misspelt one",
}


def _modules_of_an_agent_shipping_a_file(h: Harness, *extra: str,
                                         check: Callable[[], None] | None = None) -> set[str]:
    """Run a real agent (with ``extra`` --set items) until a file's lines, old and new, are in
    the output, run ``check``, stop the agent and return the names of the modules it had loaded."""
    ep = h.endpoints()
    logs = h.path("logs")
    append_lines(logs / "a.log", make_lines("a", 0, 100))
    h.aggregator(ep)
    listing = h.path("modules.txt")
    agent = h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}], *extra,
                    wrap=[sys.executable, "-c", _RUN_AND_LIST_MODULES, str(listing)])
    wait_for(lambda: len(output_lines(h.path("out"), "app")) >= 100, what="the file's lines in the output")
    append_lines(logs / "a.log", make_lines("a", 100, 100))  # a live line: the read path ran too
    wait_for(lambda: len(output_lines(h.path("out"), "app")) >= 200, what="the live lines in the output")
    if check is not None:
        check()
    assert agent.stop() == 0
    check_exactly_once(output_lines(h.path("out"), "app"), {"a": 200})
    loaded = set(Path(listing).read_text().split())
    assert {"agent.daemon", "agent.inotify", "zmq", "asyncio"} <= loaded, "the listing is not the agent's"
    return loaded


def test_an_agent_following_files_loads_no_tls_uvloop_metrics_or_journal_code(h: Harness) -> None:
    loaded = _modules_of_an_agent_shipping_a_file(h)
    sneaked = {name: why for name, why in NOT_FOR_FILES.items() if name in loaded}
    assert not sneaked, f"an agent following files loaded modules it does not need: {sneaked}"


def test_uvloop_and_metrics_still_load_ssl_when_asked_for(h: Harness) -> None:
    """agent/__init__.py hides ssl only while it imports asyncio and hashlib: uvloop and
    prometheus-client, which import it, still work."""
    port = free_port()

    def scrape() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"fleetlog_agent_" in reply.read()

    loaded = _modules_of_an_agent_shipping_a_file(
        h, 'agent.loop="uvloop"', f'agent.metrics_listen="127.0.0.1:{port}"', check=scrape)
    assert {"uvloop", "prometheus_client", "ssl"} <= loaded
    assert "_hashlib" not in loaded  # hashlib was imported before: its built-in digests stay


def test_an_aggregator_writing_files_loads_no_nats_client(h: Harness) -> None:
    """nats-py and the JetStream sink (4.3 MiB of RSS) only with ``sink = "jetstream"``."""
    ep = h.endpoints()
    logs = h.path("logs")
    append_lines(logs / "a.log", make_lines("a", 0, 50))
    listing = h.path("aggregator-modules.txt")
    aggregator = h.aggregator(ep, wrap=[sys.executable, "-c", _RUN_AND_LIST_MODULES, str(listing)])
    agent = h.agent(ep, [{"paths": [f"{logs}/*.log"], "topic": "app"}])
    wait_for(lambda: len(output_lines(h.path("out"), "app")) >= 50, what="the file's lines in the output")
    assert agent.stop() == 0 and aggregator.stop() == 0
    loaded = set(Path(listing).read_text().split())
    assert {"aggregator.daemon", "zmq"} <= loaded, "the listing is not the aggregator's"
    assert not {"nats", "aggregator.jetstream"} & loaded, "a files-only aggregator loaded the NATS client"
