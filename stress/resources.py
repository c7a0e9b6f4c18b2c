"""Counts of this process's resources, for leak checks after faults."""

from __future__ import annotations

import os
from collections import Counter


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptor_kinds() -> Counter[str]:
    """Open descriptors by kind: "socket", "eventfd" (a thread's wake-up), "other"."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds["socket" if target.startswith("socket:") else
              "eventfd" if "eventfd" in target else "other"] += 1
    return kinds
