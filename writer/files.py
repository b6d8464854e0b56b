"""The aggregator's rolling-file sink, as the writer uses it: imported here only, so that where
it lives (aggregator/writer.py, to become aggregator/files.py) is named in one place."""

from aggregator.writer import RollingFileSink, SinkError, open_files_bound, uncompressed_rotated

__all__ = ["RollingFileSink", "SinkError", "open_files_bound", "uncompressed_rotated"]
