"""fleetlog agent: follows log files on a node and ships their lines to the aggregator."""
