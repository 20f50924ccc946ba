"""What every benchmark CSV row carries, and how it is written."""

from __future__ import annotations

import csv
import importlib.metadata
import platform
import re
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


def cpu_device(threads: int) -> str:
    """The CPU in words: its model name, torch's vector capability, the thread count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu {name} ({platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {threads} threads)"


def slug(text: str) -> str:
    """``text`` as a file-name part."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows may differ in their keys: the columns are their union, in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
