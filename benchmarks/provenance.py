"""Where a figure came from: the command, the machine, the versions and the load it ran under.

Every results file opens with :func:`describe`'s line (and a JSON results file carries :func:`record`), so a
figure quoted in the README or the docs can be traced to what produced it and judged by where it ran: a time
measured beside another job, or on another torch, is a different figure.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

PACKAGES = ("torch", "diffusers", "lightning", "accelerate", "peft")
STARTING_LOAD = os.getloadavg()[0]  # the benchmarks import this module first thing: the load their run started under


def record(command: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """The facts :func:`describe` writes, for a JSON results file."""
    versions = {name: version for name in PACKAGES if (version := _version(name))}
    facts: dict[str, Any] = {"command": command, "machine": platform.machine(), "cpus": os.cpu_count(),
                             "python": platform.python_version(), **versions,
                             "load_average": STARTING_LOAD}
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        facts["device"] = torch.cuda.get_device_name(device)
        facts["cuda"] = torch.version.cuda
    return facts


def describe(command: str, device: torch.device | str | None = None) -> str:
    """One line: `command` on the machine (and GPU), with the Python and package versions and the 1-minute load
    average when the command started (timings depend on what else ran)."""
    facts = record(command, device)
    where = f"{facts['machine']}, {facts['cpus']} cores" + (
        f", {facts['device']} (CUDA {facts['cuda']})" if "device" in facts else "")
    versions = ", ".join(f"{name} {facts[name]}" for name in PACKAGES if name in facts)
    return (f"`{command}` on {where}; Python {facts['python']}, {versions}; "
            f"1-minute load average when it started: {facts['load_average']:.2f}.")


def _version(package: str) -> str | None:
    """The installed version of ``package`` (``None`` when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return torch.__version__ if package == "torch" else version(package)
    except PackageNotFoundError:
        return None
