"""The machine a benchmark ran on: CPU model, core count and the SIMD flags that matter for ML
kernels."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict[str, str]:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    ]
    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ",".join(wanted),
        "python": platform.python_version(),
        "load_avg_1_5_15": load,
    }


def print_machine() -> dict[str, str]:
    info = machine_info()
    for k, v in info.items():
        print(f"# {k}: {v}")
    return info
