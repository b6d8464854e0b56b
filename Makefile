# The targets the README and CI use. Everything is installed from here, from nothing but
# Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test lint bench bench-peers bench-backpressure bench-fleet bench-catchup dist clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,deploy]'
	touch $(STAMP)

# Programs the scenario tests drive for real (logrotate; systemd-journal-remote, which writes the
# journal files the [[journal]] tests read). Installed from Debian when we can; the tests that
# need them skip with a reason elsewhere.
JOURNAL_REMOTE := $(firstword $(wildcard /lib/systemd/systemd-journal-remote /usr/lib/systemd/systemd-journal-remote))

system-deps:
	@command -v logrotate >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq logrotate >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq logrotate >/dev/null 2>&1)) || \
	    echo "note: could not install logrotate; rotation tests will be skipped"; \
	  else echo "note: logrotate missing and not root; rotation tests will be skipped"; fi; }
	@[ -n "$(JOURNAL_REMOTE)" ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq systemd-journal-remote >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq systemd-journal-remote >/dev/null 2>&1)) || \
	    echo "note: could not install systemd-journal-remote; journal tests will be skipped"; \
	  else echo "note: systemd-journal-remote missing and not root; journal tests will be skipped"; fi; }

run: $(STAMP)
	$(BIN)/python -m fleetlog.demo

test: $(STAMP) system-deps
	$(BIN)/ruff check agent aggregator fleetlog tests bench
	$(BIN)/mypy agent aggregator fleetlog
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check agent aggregator fleetlog tests bench
	$(BIN)/mypy agent aggregator fleetlog

# The file backlog table, then the journal row (entries/s, CPU per million entries).
bench: $(STAMP)
	$(BIN)/python -m bench.backlog
	$(BIN)/python -m bench.journal

# rsyslog and syslog-ng side by side (installs them from Debian when missing; runs them privately).
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers

# Agent memory with a 1.5M line backlog while the aggregator is down, then the catch-up.
bench-backpressure: $(STAMP)
	$(BIN)/python -m bench.backpressure

# 1,000 simulated agents against one aggregator.
bench-fleet: $(STAMP)
	$(BIN)/python -m bench.fleet

# 24 real agents with backlogs catching up at once: the aggregator's memory.
bench-catchup: $(STAMP)
	$(BIN)/python -m bench.catchup

dist: $(STAMP)
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .ruff_cache
