"""What produced a result: the resolved config, library versions, the machine and what changes numerics.

The ``numerics`` section of ``provenance.json`` records what can change an evaluation's floating-point
results, and so flip single images between machines: the CPU model and the instruction set torch's kernels
were dispatched to (``cpu_capability``: e.g. AVX2 vs AVX512 take different code paths), the thread counts
(reduction order), the device, the torch, oneDNN and BLAS builds, and whether deterministic algorithms were
on. Reports list the machines of the runs they merge from it.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from dent.distribution import DISTRIBUTION

#: The libraries a result's provenance records: label -> distribution name.
LIBRARIES = {"dent": DISTRIBUTION, "torch": "torch", "pyautoattack": "pyautoattack", "numpy": "numpy",
             "pydantic": "pydantic"}


def library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for label, distribution in LIBRARIES.items():
        try:
            versions[label] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    return versions


#: The source tree of the running dent when it runs from a checkout (``pip install -e``): ``<root>/src/dent``.
SOURCE_DIR = Path(__file__).resolve().parents[2]


def source_description() -> dict[str, Any]:
    """The code that produces a result: dent's version and, when it runs from a git checkout, the commit and
    whether the working tree had changes (``dirty``: the commit alone does not reproduce the result)."""
    info: dict[str, Any] = {"version": _dent_version(), "commit": None, "dirty": None}
    if Path(__file__).resolve().parent != SOURCE_DIR / "src" / "dent" or not (SOURCE_DIR / ".git").exists():
        return info  # installed into site-packages: whatever repository encloses it is not dent's source
    try:
        commit = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return info  # not a checkout (an installed wheel) or no git
    info.update(commit=commit, dirty=bool(status))
    return info


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def _dent_version() -> str:
    from dent import __version__

    return __version__


def version_text() -> str:
    """``dent --version``: the version, and the commit of a git checkout (``+dirty`` with local changes)."""
    source = source_description()
    if source["commit"] is None:
        return f"dent {source['version']}"
    return f"dent {source['version']} (commit {source['commit'][:12]}{'+dirty' if source['dirty'] else ''})"


def machine_description() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cpu_model_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere the platform's processor string)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_info(pattern: str) -> str | None:
    """A field of torch's build description (``torch.__config__.show()``), None if absent."""
    match = re.search(pattern, torch.__config__.show())
    return match.group(1) if match else None


def numerics_description(device: str = "auto") -> dict[str, Any]:
    """What changes floating-point results on this machine (see the module docstring).

    ``device``: the config's device; the CUDA device name is recorded when the run uses CUDA.
    """
    on_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    index = int(device.split(":")[1]) if on_cuda and ":" in device else 0
    info: dict[str, Any] = {
        "cpu_model": cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "device_name": torch.cuda.get_device_name(index) if on_cuda else "cpu",
        "torch": torch.__version__,
        "onednn": _build_info(r"(?:MKL-DNN|oneDNN) v([\w.]+)") if torch.backends.mkldnn.is_available() else None,
        "mkl": _build_info(r"Math Kernel Library Version ([\w.]+)") if torch.backends.mkl.is_available() else None,
        "blas": _build_info(r"BLAS_INFO=(\w+)"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    if on_cuda:
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def write_run_metadata(run_dir: Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``config.yaml`` (the resolved config) and ``provenance.json`` into ``run_dir``; ``extra``: more
    entries of the provenance (a training run's world size)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    provenance = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "source": source_description(),
        "machine": machine_description(),
        "numerics": numerics_description(str(config.get("device", "auto"))),
        "argv": sys.argv,
        **(extra or {}),
    }
    (run_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
