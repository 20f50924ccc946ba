"""What every benchmark CSV row carries, and how it is written."""

from __future__ import annotations

import csv
import importlib.metadata
import shlex
import sys
from pathlib import Path

import torch


def provenance() -> dict:
    """The versions and the command behind a result row."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    return {"torch": torch.__version__, "triton": triton,
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
