"""Errors that the CLI turns into distinct exit codes.

Every message names what is wrong (the spec field path, the file, the shard, the row) so a user can fix it
without reading a traceback.
"""

from __future__ import annotations


class StreamsslError(Exception):
    """Base class; `exit_code` is what `streamssl` exits with."""

    exit_code = 1


class SpecError(StreamsslError):
    """The experiment spec (or a --set override) is invalid."""

    exit_code = 2


class DataError(StreamsslError):
    """A data source, shard or manifest is missing, corrupt or inconsistent."""

    exit_code = 3


class TrainingError(StreamsslError):
    """Training or evaluation failed."""

    exit_code = 4


class TrackingError(StreamsslError):
    """The MLflow tracking store cannot be reached or refused a write."""

    exit_code = 5


class ClusterError(StreamsslError):
    """The Ray cluster (Jobs API) cannot be reached, refused a request, or a submitted job failed."""

    exit_code = 6


class IncompleteRecordError(StreamsslError):
    """A run ended with chunks that have no chunk run or no evaluation run in MLflow (`--resume` completes it)."""

    exit_code = 7


class ReportError(StreamsslError):
    """`streamssl report` cannot be built: the experiment is unknown, or holds no streamssl plan run."""

    exit_code = 8
