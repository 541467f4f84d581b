"""Peak resident-set growth of one call on Linux: how the CPU benchmarks measure memory.

tracemalloc does not see torch's CPU allocations, so a call's memory is read from the kernel: the
peak resident set (VmHWM) is reset to the current one through /proc/self/clear_refs, the call runs,
and the new peak minus the resident set before it is the call's growth (its output included).
``ru_maxrss`` is no use for this: it never resets, and after fork+exec it keeps the parent's peak.
Freed memory must leave the resident set for the next measurement to count its own:
:func:`mmap_large_allocations` asks glibc to serve allocations over 64 KiB by mmap, returned when freed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def mmap_large_allocations() -> bool:
    """Have glibc mmap every allocation over 64 KiB and unmap it when freed (a fixed threshold also stops
    glibc from raising it after frees). False where this is not glibc."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth_mib(fn: Callable[[], object]) -> float | None:
    """MiB the peak resident set grows by while ``fn()`` runs once, beyond the resident set before it
    (its result included); None where /proc/self/clear_refs cannot be written (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        before = status_kib("VmRSS")
        out = fn()
        peak = status_kib("VmHWM")
    except OSError:
        return None
    del out
    return (peak - before) / 1024


def child_json(script: str, *args: str, timeout: float = 900) -> tuple[dict | None, list[str]]:
    """Run ``python script *args`` (a benchmark file's memory mode, in a fresh process whose allocator
    nothing else has touched) → (the JSON object on its last stdout line, []), or (None, its last
    stderr line) when it failed."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return None, proc.stderr.strip().splitlines()[-1:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), []
