"""The CPU a benchmark ran on, in words: its name, cores and the vector ISA torch's kernels use
(AVX512, AVX2, ...), which sets the speed of a CPU run more than the model does."""

from __future__ import annotations

import os
import platform

import torch


def describe_cpu() -> str:
    """E.g. ``2-core AMD EPYC (x86_64, AVX2)``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{cpus}-core {_cpu_name()} ({platform.machine()}, {isa})"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"
