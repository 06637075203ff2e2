"""What the measuring tools share: this machine's description, the process's memory, and writing results to --out.

Imported by plain name (`from measure import write_results`): a tool runs as `python tools/NAME.py`, which puts
tools/ first on the path, and the tests put it there too (pyproject.toml). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

from savpack_runtime.files import atomic_write


# The labelled data sets (sst2, hymenoptera_ants_bees, ...): $SAVPACK_DATA, else shared/data beside the repository.
DATA_ROOT = Path(os.environ.get("SAVPACK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def machine_description() -> dict[str, Any]:
    """The CPU, its cores, the memory and the Python this run had (ratios travel, absolute times need this)."""
    cpu = next((line.split(":", 1)[1].strip() for line in _proc_lines("cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory = next((int(line.split()[1]) * 1024 for line in _proc_lines("meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory, "python": platform.python_version()}


def memory_available() -> int:
    """Bytes the kernel says a new allocation can take now (MemAvailable), 0 where it does not say."""
    return next((int(line.split()[1]) * 1024 for line in _proc_lines("meminfo") if line.startswith("MemAvailable:")), 0)


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux >= 4.0: /proc/self/clear_refs); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss(field_name: str = "VmRSS", pid: int | None = None) -> int | None:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process (or process `pid`) in bytes; None
    off Linux."""
    status = f"{pid}/status" if pid is not None else "self/status"
    return next((int(line.split()[1]) * 1024 for line in _proc_lines(status) if line.startswith(field_name + ":")), None)


def gigabytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def write_results(path: Path, report: Any, compact: bool = False, default: Callable[[Any], Any] | None = None) -> Path:
    """The JSON results, written atomically to `path` (its folder made if missing); compact: one line, no spaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, separators=(",", ":"), default=default) if compact else \
        json.dumps(report, indent=1, default=default) + "\n"
    return atomic_write(path, lambda handle: handle.write(text.encode()), force=True)


def _proc_lines(name: str) -> list[str]:
    try:
        return Path("/proc", name).read_text().splitlines()
    except OSError:
        return []
