"""The one description of this machine that every results file carries."""

import datetime
import os
import platform


def machine() -> str:
    """'2 cores, x86_64 (Intel(R) Xeon ...), Python 3.11.7, torch 2.13.0': enough to tell two machines apart."""
    import torch  # imported here: the harness itself does not need torch

    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        cpu += f" ({model})" if model else ""
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()} cores, {cpu}{gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def stamp() -> str:
    """'Date: 2026-11-23; machine: ...', the line under a results file's command."""
    return f"Date: {datetime.date.today()}; machine: {machine()}"
