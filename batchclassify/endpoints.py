"""Where requests go, and what each kind of host gets by default.

    --endpoint     URL                               key sent as   upload     upload limit
    serverless     https://serverless.roboflow.com   header        base64     20 MB (documented)
    eu             https://serverless.roboflow.eu    header        base64     20 MB (documented)
    legacy         https://classify.roboflow.com     header        base64     the server's 413
    local          http://localhost:9001             both          multipart  the server's 413
    any other URL  a self-hosted Roboflow Inference  both          multipart  the server's 413

Why (``shared/PROTOCOL.md``): a key in a URL ends up in proxy and access logs, so a hosted
Roboflow host gets it as ``Authorization: Bearer`` only (every hosted host runs the current
server); a self-hosted server may predate the header (release 1.5.0), so it gets both, which
``inference-sdk`` documents as safe with every version (query > header). Raw ``multipart``
uploads (25 % fewer bytes, no base64 work) are certain only for the self-hosted route, so
hosted hosts get base64 text. The 20 MB limit is documented for the serverless hosts only.

With no ``--endpoint``, the region picks the host, as the ``roboflow`` package does:
``ROBOFLOW_REGION=eu`` (or the region saved by ``roboflow auth set-region``) is the EU host.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from batchclassify.errors import ConfigError

__all__ = [
    "NAMED_ENDPOINTS",
    "EndpointDefaults",
    "KeyTransport",
    "Upload",
    "default_endpoint",
    "endpoint_defaults",
    "resolve_endpoint",
    "roboflow_config",
    "saved_api_key",
]

KeyTransport = Literal["header", "query", "both"]
Upload = Literal["base64", "multipart"]

_MB = 1024 * 1024
SERVERLESS = "https://serverless.roboflow.com"
SERVERLESS_EU = "https://serverless.roboflow.eu"
LEGACY = "https://classify.roboflow.com"
#: the short names ``--endpoint`` accepts besides URLs
NAMED_ENDPOINTS: Mapping[str, str] = {
    "serverless": SERVERLESS,
    "eu": SERVERLESS_EU,
    "legacy": LEGACY,
    "local": "http://localhost:9001",
}
_HOSTED = {
    "serverless.roboflow.com": 20 * _MB,
    "serverless.roboflow.eu": 20 * _MB,
    "classify.roboflow.com": None,  # 5 MB in translated docs only: the server's 413 decides
}


@dataclass(frozen=True, slots=True)
class EndpointDefaults:
    """What a host gets unless the user says otherwise."""

    hosted: bool
    key_transport: KeyTransport
    upload: Upload
    #: the documented limit on a request body, ``None`` where none is documented
    upload_limit: int | None


def resolve_endpoint(text: str) -> str:
    """A short name (``serverless``, ``eu``, ``legacy``, ``local``) or a URL -> the URL."""
    named = NAMED_ENDPOINTS.get(text.strip().lower())
    return named if named is not None else text.strip()


def default_endpoint(environ: Mapping[str, str]) -> str:
    """The hosted API of the user's region: ``ROBOFLOW_REGION`` (environment, then the
    ``roboflow`` package's config file), US unless it says ``eu``."""
    region = environ.get("ROBOFLOW_REGION") or roboflow_config(environ).get("ROBOFLOW_REGION")
    return SERVERLESS_EU if str(region or "").strip().lower() == "eu" else SERVERLESS


def endpoint_defaults(url: str) -> EndpointDefaults:
    host = (urlsplit(url).hostname or "").lower()
    if host in _HOSTED:
        return EndpointDefaults(
            hosted=True, key_transport="header", upload="base64", upload_limit=_HOSTED[host]
        )
    return EndpointDefaults(
        hosted=False, key_transport="both", upload="multipart", upload_limit=None
    )


def roboflow_config(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``roboflow`` package's saved settings (``roboflow login``): the JSON file named by
    ``ROBOFLOW_CONFIG_DIR`` (a file path, despite its name), else
    ``~/.config/roboflow/config.json``. Missing or unreadable: empty."""
    path = _roboflow_config_path(environ)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the roboflow config file {str(path)!r}: {exc}") from None
    return data if isinstance(data, dict) else {}


def saved_api_key(environ: Mapping[str, str], workspace: str | None) -> tuple[str, str] | None:
    """The key ``roboflow login`` saved, as the ``roboflow`` package picks it: the workspace
    named in the model id (``workspace/project/3``), else the default workspace. Returns the
    key and where it came from (never the key's text in that description)."""
    config = roboflow_config(environ)
    workspaces = config.get("workspaces")
    if not isinstance(workspaces, dict):
        return None
    by_url = {entry.get("url"): entry for entry in workspaces.values() if isinstance(entry, dict)}
    wanted = workspace or config.get("RF_WORKSPACE")
    entry = by_url.get(wanted)
    if entry is None and workspace is not None:
        entry = by_url.get(config.get("RF_WORKSPACE"))
    if entry is None:
        return None
    key = entry.get("apiKey")
    if not isinstance(key, str) or not key.strip():
        return None
    path = _roboflow_config_path(environ)
    return key.strip(), f"roboflow login ({path}, workspace {entry.get('url')!r})"


def _roboflow_config_path(environ: Mapping[str, str]) -> Path | None:
    named = environ.get("ROBOFLOW_CONFIG_DIR")
    if named:
        return Path(named)
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".config" / "roboflow" / "config.json" if home else None


# --- what to call: the model, and the protocol's own limits ------------------------------------

#: the server's own thresholds, passed to it by name
CONFIDENCE_KEYWORDS = ("best", "default")
#: default bound on an answer's size: a classify answer is a few KB even with thousands of classes
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_MODEL = re.compile(r"^(?:[^/\s]+/)?([^/\s]+)/(\d+)$")


def model_workspace(text: str) -> str | None:
    """``"workspace/project/3"`` -> ``"workspace"`` (``None`` without one)."""
    parts = text.strip().strip("/").split("/")
    return parts[0] if len(parts) == 3 and parts[0] else None


def parse_model(text: str) -> tuple[str, int]:
    """``"project/3"`` or ``"workspace/project/3"`` -> ``("project", 3)``, as the ``roboflow``
    package and ``inference-sdk`` take model ids."""
    match = _MODEL.match(text.strip().strip("/"))
    if not match or int(match.group(2)) < 1:
        raise ConfigError(
            f"--model must look like PROJECT/VERSION (e.g. flowers-abc12/3), got {text!r}"
        )
    return match.group(1), int(match.group(2))
