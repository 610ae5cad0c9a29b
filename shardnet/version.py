"""The installed shardnet's version, read from its package metadata (one number, kept in pyproject.toml)."""

from __future__ import annotations

import importlib.metadata


def installed_version() -> str:
    """The version of the installed ``shardnet`` distribution, from its package metadata."""
    try:
        return importlib.metadata.version("shardnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (shardnet is not installed; run pip install -e .)"


__version__ = installed_version()
