"""batchclassify: classify very many images through a Roboflow-compatible HTTP API."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: where each public name lives: imported on first use, so that a command (or ``--help``)
#: pays only for the modules it needs (aiohttp alone takes a tenth of a second)
_HOMES = {
    "ClassifyClient": "client",
    "ClientOptions": "client",
    "ApiError": "errors",
    "BatchClassifyError": "errors",
    "ConfigError": "errors",
    "FatalApiError": "errors",
    "InputError": "errors",
    "ItemRejectedError": "errors",
    "RequestError": "errors",
    "RequestTimeout": "errors",
    "RunAborted": "errors",
    "TransientApiError": "errors",
    "TransportError": "errors",
    "ErrorInfo": "model",
    "Item": "model",
    "Result": "model",
    "Pipeline": "pipeline",
    "PipelineOptions": "pipeline",
    "iter_results": "pipeline",
    "PrepareOptions": "prepare",
    "RetryPolicy": "retry",
    "JobState": "runner",
    "run": "runner",
    "SourceOptions": "sources",
    "RunStats": "summary",
    "ThrottleOptions": "throttle",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("batchclassify")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0.0.0"
    elif name in _HOMES:
        value = getattr(importlib.import_module(f"batchclassify.{_HOMES[name]}"), name)
    else:
        raise AttributeError(f"module 'batchclassify' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
