"""CPU priority of a replica process: work that shares cores with the student yields to it."""

from __future__ import annotations

import contextlib
import os


def lower_priority(nice: int) -> None:
    """Raise the niceness of every thread of this process to `nice` (threads started later
    inherit it from their parent thread): the kernel then runs them after normal work."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has just exited
            os.setpriority(os.PRIO_PROCESS, int(tid), max(nice, os.getpriority(
                os.PRIO_PROCESS, int(tid))))
