"""Benchmarks. ``python -m bench.backlog`` (``make bench``): a backlog through fleetlog and a bare floor."""
