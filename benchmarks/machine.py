"""What every side-by-side benchmark prints and checks about the machine it ran on, and how it reports a noisy
figure (the median of its repeats, with their range)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any


def facts(**threads: int) -> dict[str, Any]:
    """Cores, CPU model, load average and the torch threads each side of the comparison computes with."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    load1, _, _ = os.getloadavg()
    return {"cores": os.cpu_count(), "cpu": model, "load_1min_at_start": round(load1, 2),
            "torch_threads_here": torch.get_num_threads(), **{f"threads_{k}": v for k, v in threads.items()}}


def refuse_mismatch(**threads: int) -> None:
    """Exit when the sides of a comparison compute with different thread counts: the ratio would measure the
    threads, not the code."""
    if len(set(threads.values())) > 1:
        sys.exit(f"refusing a mismatched comparison: torch threads per side {threads}; give each side the same "
                 "number of cores (see the script's --set options)")


def summary(values: Sequence[float], digits: int = 2) -> dict[str, Any]:
    """Median of the repeats, their range and every value, rounded."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def print_results(results: dict[str, Any]) -> None:
    """The results as JSON, one top-level key per line (a figure and its repeats stay on one line)."""
    import json

    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in results.items()]
    print("{\n" + ",\n".join(lines) + "\n}")
