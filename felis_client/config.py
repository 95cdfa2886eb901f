"""Where the client finds its server and key: arguments, then environment, then a config file.

``~/.config/felis/config.toml`` (or ``$FELIS_CONFIG``, or ``$XDG_CONFIG_HOME/felis/config.toml``)::

    url = "https://felis.example.com"
    api_key = "fk_..."
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str | None


def config_path() -> Path:
    if os.environ.get("FELIS_CONFIG"):
        return Path(os.environ["FELIS_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "felis" / "config.toml"


def _read_file(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read the felis config file {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def load_config(url: str | None = None, api_key: str | None = None, path: Path | str | None = None) -> ClientConfig:
    """Each value from the first place that has it: the argument, FELIS_URL / FELIS_API_KEY, the file."""
    file = _read_file(Path(path).expanduser() if path else config_path())
    resolved_url = url or os.environ.get("FELIS_URL") or file.get("url") or DEFAULT_URL
    resolved_key = api_key or os.environ.get("FELIS_API_KEY") or file.get("api_key") or None
    return ClientConfig(url=str(resolved_url).rstrip("/"), api_key=str(resolved_key) if resolved_key else None)
