"""fleetlog-writer: reads the NATS JetStream stream the aggregators write into and makes the
same per-topic rolling files as the aggregator's files sink, exactly once."""
