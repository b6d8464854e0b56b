"""Code shared by the fleetlog agent and aggregator: the wire format and process plumbing."""

__version__ = "0.1.0"
