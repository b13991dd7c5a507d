"""Models that ship inside the package."""

from __future__ import annotations

from pathlib import Path

from quanta import envs

ASSETS = Path(__file__).resolve().parent
DEFAULT_MODEL = "quanta-tiny"


def default_model_path() -> Path:
    """The embedded model folder (or $QUANTA_DEFAULT_MODEL, or ../shared's stories260K while it is absent)."""
    env = envs.get("QUANTA_DEFAULT_MODEL")
    if env:
        return Path(env)
    embedded = ASSETS / DEFAULT_MODEL
    if (embedded / "config.json").is_file():
        return embedded
    shared = Path(envs.get("QUANTA_SHARED")) / "models" / "stories260K"
    if shared.is_dir():
        return shared
    raise FileNotFoundError(f"no embedded model at {embedded}; pass --model or set QUANTA_DEFAULT_MODEL")
