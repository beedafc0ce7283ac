"""What every bench mode shares for reporting: progress while it runs, a Markdown table at the
end, the JSON file of every figure, an optional PNG plot, and the facts of the run (command
line, date, device, versions).

Torch-free at import. tqdm and matplotlib are optional: without tqdm, progress is a log line
every few seconds; without matplotlib, the plot is skipped and the log says so.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

logger = logging.getLogger("engine.bench")

PROGRESS_LOG_INTERVAL_S = 5.0
VERSIONED_PACKAGES = ("torch", "triton", "transformers", "grpcio", "numpy")


class Column(NamedTuple):
    """One table column: the row key it shows, its header, a format for the value, and a
    factor the value is multiplied by before formatting (e.g. 1e-6 for bytes as MB)."""

    key: str
    header: str
    fmt: str = "{}"
    scale: float = 1.0


def markdown_table(rows: list[dict[str, Any]], columns: list[Column]) -> str:
    """Rows as a Markdown table (pasteable into docs/benchmarks.md); None shows as '-'."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "| " + " | ".join("---:" for _ in columns) + " |"]
    for row in rows:
        cells = ["-" if row.get(c.key) is None else c.fmt.format(_scaled(row[c.key], c.scale))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scaled(value: Any, scale: float) -> Any:
    return value * scale if scale != 1.0 else value


class Progress:
    """Counts finished units: a tqdm bar when tqdm is importable, else a log line at most every
    PROGRESS_LOG_INTERVAL_S seconds (and one at the end)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        self._started = self._logged = time.monotonic()
        self._bar = None
        if importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._logged >= PROGRESS_LOG_INTERVAL_S:
            self._log()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._log()

    def _log(self) -> None:
        self._logged = time.monotonic()
        logger.info("%s: %d/%d (%.0f s)", self.desc, self.done, self.total,
                    self._logged - self._started)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def environment(device: str | None, argv: list[str]) -> dict[str, Any]:
    """Facts of this run: the command line (`tandem` and argv, the arguments main() parsed,
    which are not sys.argv when main() runs in-process), UTC date, host, Python and package
    versions, git commit, and the device's name (None for a client-only mode: the server's
    device is not known here)."""
    return {
        "command": shlex.join(["tandem", *argv]),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in VERSIONED_PACKAGES},
        "git_commit": _git_commit(),
        "device": device,
        "device_name": device_name(device) if device is not None else None,
    }


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device; the CPU model and torch's thread count otherwise."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    threads = torch.get_num_threads()
    return f"{_cpu_model()} ({threads} torch thread{'s' if threads > 1 else ''})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the checkout this code runs from, '+dirty' when it has changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def json_safe(value: Any) -> Any:
    """Infinite floats as the strings 'inf' / '-inf' and NaN as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    logger.info("wrote %s", path)


def save_plot(path: Path, draw: Callable[[Any], None]) -> bool:
    """Calls draw(pyplot) and saves the figure as PNG at `path`. Returns False (and logs that
    the plot was skipped) when matplotlib is not importable."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("plot skipped: matplotlib is not installed (the JSON has every figure)")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        draw(plt)
        path.parent.mkdir(parents=True, exist_ok=True)
        plt.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close("all")
    logger.info("wrote %s", path)
    return True
