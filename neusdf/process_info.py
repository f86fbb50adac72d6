"""Facts about the running process from the operating system (Linux /proc; None elsewhere).

Standard library only: the command line imports this before anything heavy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["process_started_at", "resident_memory_mib"]


def process_started_at() -> float | None:
    """When the operating system started this process (UNIX seconds, to about 10 ms), or None
    where /proc does not say (not Linux).

    For a multirun's worker process: the start of the part of the start-up before its first
    job (the interpreter, then the imports).
    """
    try:
        # field 22 of /proc/self/stat, the start in clock ticks after boot (fields counted
        # after the command name, which may hold spaces)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def resident_memory_mib() -> float | None:
    """This process's resident host memory now (MiB), or None where /proc does not say."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
