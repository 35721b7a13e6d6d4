"""batchclassify: classify very many images through a Roboflow-compatible HTTP API."""

from importlib.metadata import PackageNotFoundError, version

from batchclassify.client import ClassifyClient, ClientOptions
from batchclassify.errors import (
    ApiError,
    BatchClassifyError,
    ConfigError,
    FatalApiError,
    InputError,
    ItemRejectedError,
    RequestError,
    RequestTimeout,
    RunAborted,
    TransientApiError,
    TransportError,
)
from batchclassify.model import ErrorInfo, Item, Result
from batchclassify.pipeline import Pipeline, PipelineOptions, iter_results
from batchclassify.prepare import PrepareOptions
from batchclassify.retry import RetryPolicy
from batchclassify.runner import JobState, run
from batchclassify.sources import SourceOptions
from batchclassify.summary import RunStats
from batchclassify.throttle import ThrottleOptions

try:
    __version__ = version("batchclassify")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "ApiError",
    "BatchClassifyError",
    "ClassifyClient",
    "ClientOptions",
    "ConfigError",
    "ErrorInfo",
    "FatalApiError",
    "InputError",
    "Item",
    "ItemRejectedError",
    "JobState",
    "Pipeline",
    "PipelineOptions",
    "PrepareOptions",
    "RequestError",
    "RequestTimeout",
    "Result",
    "RetryPolicy",
    "RunAborted",
    "RunStats",
    "SourceOptions",
    "ThrottleOptions",
    "TransientApiError",
    "TransportError",
    "__version__",
    "iter_results",
    "run",
]
