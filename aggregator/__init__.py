"""fleetlog aggregator: receives batches from agents and writes per-topic rolling files."""
