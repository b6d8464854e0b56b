"""What the deploy tests (tests/test_deploy_*.py) share: running ansible-playbook and the tools
they check the deploy files with, and a temporary root that ``site.yml`` deploys into on
localhost (both groups, ``fleetlog_manage_services=false``).

Each test module that runs the playbook makes its own root (a module-scoped fixture), so that
pytest-xdist (``--dist loadfile``) runs the modules side by side; no root is shared across
modules. A playbook run (about a minute alone, several on a loaded machine) dominates their
time: a module runs each one once.

Nothing is written outside the tests' temporary directories except a wheelhouse of fleetlog's
dependencies (``wheelhouse_dir``), so that later runs need no network.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
ANSIBLE = DEPLOY / "ansible"
# ansible-core and ansible-lint come with the `deploy` extra, into the venv running the tests.
VENV_BIN = Path(sys.executable).parent
VENV = "/opt/fleetlog/venv"
DAEMONS = {"fleetlog-aggregator": "aggregator", "fleetlog-agent": "agent"}
PLAYBOOK_TIMEOUT_S = 400  # one site.yml run (120 s was exceeded at a load average of 9 on 2 cores)
# For the modules that run the playbook (``pytestmark``): each test's setup runs at most one
# playbook, which the suite's 300 s pytest-timeout would cut short on a loaded machine before the
# run's own bound (PLAYBOOK_TIMEOUT_S) does; plus the wheel the first fixture builds.
ONE_PLAYBOOK_PER_TEST = pytest.mark.timeout(PLAYBOOK_TIMEOUT_S + 200)
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
# Keys the roles set from their own variables (paths under fleetlog_root, keys made by the play).
ROLE_OWNED = {"output_dir", "state_dir", "curve_secret_key", "authorized_keys_dir", "admin_keys_dir",
              "curve_server_key", "topics"}


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


def recap(proc: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """The PLAY RECAP counts of an ansible-playbook run (one host)."""
    found = RECAP.findall(proc.stdout)
    assert found, output(proc)
    _host, *counts = found[-1]
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts), strict=True))


def recaps(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """The PLAY RECAP counts of an ansible-playbook run, by host."""
    found = RECAP.findall(proc.stdout)
    assert found, output(proc)
    return {host: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts), strict=True))
            for host, *counts in found}


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


def verify_unit(units: Path, unit: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``unit`` in the stubbed unit dir ``units`` (its drop-ins too)."""
    return run([systemd_analyze(), "verify", units / unit], timeout_s=60,
               env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"})


# --- the wheel and its dependencies --------------------------------------------------------------


def wheelhouse_dir(config: pytest.Config) -> Path:
    """Where fleetlog's dependencies are kept as wheels between runs: the pytest cache
    (.pytest_cache/d/fleetlog-wheelhouse), at the same place when the cache plugin is off
    (``-p no:cacheprovider``)."""
    cache = getattr(config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("fleetlog-wheelhouse"))
    path = Path(config.rootpath) / ".pytest_cache" / "d" / "fleetlog-wheelhouse"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s lock file: the deploy modules, each on its own xdist worker, fill
    and prune one wheelhouse (pip download, then the fleetlog wheel removed from it)."""
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


# --- a temporary root that site.yml deploys into -------------------------------------------------


@dataclass
class Deployment:
    """A temporary root, an inventory with localhost in both groups, and the variables every run
    into this root gets (``extra``): the root, the wheel and wheelhouse, the fetch directory, and
    sources on top of the role's defaults (``logs/*.log``, a ``misc.text`` source and ``absent``,
    which matches nothing)."""
    root: Path
    logs: Path
    inventory: Path
    extra: Path
    fetched: Path
    env: dict[str, str]

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "fleetlog"

    @property
    def keys(self) -> Path:
        return self.etc / "keys"

    @property
    def bin_dir(self) -> Path:
        return self.root / VENV.lstrip("/") / "bin"

    def config(self, short: str) -> dict[str, Any]:
        """The rendered ``/etc/fleetlog/<short>.toml`` of this root, parsed."""
        return tomllib.loads((self.etc / f"{short}.toml").read_text())

    def with_writers(self, tmp: Path) -> Path:
        """This inventory with localhost in the ``writers`` group too."""
        inventory = tmp / "inventory-writers.ini"
        text = self.inventory.read_text()
        inventory.write_text(text.replace("[agents]", "[writers]\nlocalhost\n\n[agents]"))
        return inventory

    def agents_only(self, tmp: Path) -> Path:
        """This inventory with no host in ``aggregators``: a run plays the agents' play alone
        (give fleetlog_agent_data and _control), for refusals the agents' checks make."""
        inventory = tmp / "inventory-agents.ini"
        text = self.inventory.read_text()
        inventory.write_text(text.replace("[aggregators]\nlocalhost\n", "[aggregators]\n"))
        return inventory

    def play(self, *variables: dict[str, object], tmp: Path, inventory: Path | None = None,
             extra: Path | None = None) -> subprocess.CompletedProcess[str]:
        """One ``site.yml`` run into this root with ``extra`` (default: this root's) and then
        ``variables`` (later ones win), written as JSON files under ``tmp``."""
        argv: list[str | Path] = [tool("ansible-playbook"), "-i", inventory or self.inventory,
                                  "-e", f"@{extra or self.extra}"]
        tmp.mkdir(parents=True, exist_ok=True)
        for index, values in enumerate(variables):
            path = tmp / f"vars-{index}.json"
            path.write_text(json.dumps(values))
            argv += ["-e", f"@{path}"]
        # A bound, not a wait: a run takes about a minute alone, and several under a loaded CI host.
        return run([*argv, "site.yml"], timeout_s=PLAYBOOK_TIMEOUT_S, cwd=ANSIBLE, env=self.env)

    def failed_play(self, *variables: dict[str, object], tmp: Path, inventory: Path | None = None) -> str:
        """A run that must fail on its one host; its output with whitespace runs made single spaces
        (ansible folds long messages)."""
        proc = self.play(*variables, tmp=tmp, inventory=inventory)
        assert recap(proc)["failed"] == 1, output(proc)
        return " ".join(proc.stdout.split())


def new_deployment(tmp: Path, config: pytest.Config) -> Deployment:
    """A fresh root under ``tmp`` with its wheel built from this checkout; nothing deployed yet.
    Skips where ansible-playbook, the daemons' commands or the wheels cannot be had."""
    tool("ansible-playbook")
    missing = [p for p in ("agent/__main__.py", "aggregator/__main__.py", "aggregator/ctl.py")
               if not (REPO / p).exists()]
    if missing:
        pytest.skip(f"the daemons' commands are not written yet ({', '.join(missing)} missing): "
                    "the playbook validates every config with them")
    cache = wheelhouse_dir(config)
    with locked(cache):
        wheel = build_wheel(tmp / "dist", cache)
        wheelhouse = wheelhouse_for(wheel, cache)
    root, logs, fetched = tmp / "root", tmp / "logs", tmp / "fetched-keys"
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
        "fleetlog_curve_fetch_dir": str(fetched),
        # Added to the sources of the role's defaults, which stay as documented.
        "fleetlog_agent_extra_sources": [
            {"paths": [f"{logs}/*.log"], "topic": "app", "start_at": "beginning"},
            {"paths": [f"{logs}/**/*.txt"], "topic": "misc.text", "start_at": "end", "exclude": ["*.gz"]},
            # Matches nothing: the play warns (fleetlog_agent_unmatched_sources: warn).
            {"paths": [f"{logs}/absent/*.log"], "topic": "absent"},
        ],
    }))
    return Deployment(root=root, logs=logs, inventory=inventory, extra=extra, fetched=fetched,
                      env=ansible_env(tmp / "ansible"))


# --- running what the playbook rendered ----------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def curve_public_key() -> bytes:
    """A fresh z85 public key without "{": inventory strings are Jinja templates, and "{{", "{%"
    or "{#" in a key would be read as one (group_vars/aggregators.yml says to use !unsafe)."""
    while True:
        public, _secret = zmq.curve_keypair()
        if b"{" not in public:
            return public


# --- README.md's configuration reference ---------------------------------------------------------


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


@contextmanager
def daemons_until_line(argvs: dict[str, list[Any]], errors_dir: Path, written: Path, text: str,
                       timeout_s: float = 60) -> Iterator[dict[str, Path]]:
    """Start each of ``argvs`` (name -> argv, started in that order, stderr to
    ``errors_dir/<name>.err``), wait until ``written`` holds ``text`` (failing at once when one
    of them exits, or after ``timeout_s`` with every log), and yield the logs by name; at the
    end stop them, the last started first (an agent before the aggregator it ships to)."""
    errors = {name: errors_dir / f"{name}.err" for name in argvs}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, argv in argvs.items():
            with errors[name].open("w") as stderr:
                procs.append(subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL,
                                              stderr=stderr))
        deadline = time.monotonic() + timeout_s
        while not (written.exists() and text in written.read_text()):
            for proc, err in zip(procs, errors.values(), strict=True):
                assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "\n".join(
                f"--- {e}\n{e.read_text()}" for e in errors.values())
            time.sleep(0.1)
        yield errors
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
