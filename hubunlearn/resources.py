"""Folders shipped with the package: inside the wheel, or at the repository's top level in a checkout."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).parent


def resource_dir(packaged_name: str, repository_name: str) -> Path:
    """``hubunlearn/<packaged_name>`` in an installed wheel, else ``<repo>/<repository_name>`` in a checkout."""
    packaged = PACKAGE / packaged_name
    return packaged if packaged.is_dir() else PACKAGE.parent / repository_name
