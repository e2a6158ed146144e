r"""Helpers shared by the benchmarks: machine load and process memory.

A timing taken while other jobs share the CPU is pessimistic by an unknown
factor. Every benchmark records the load average before and after it times
(:func:`machine_load`) and prints :func:`load_warning`'s line in its table
when the machine was busy. Memory per stage comes from Linux's own counters
(``/proc/self/status``): :func:`reset_peak_rss` clears the high-water mark
so that :func:`peak_rss_gib` is the peak of one stage.
"""
from __future__ import annotations

import os
from typing import Optional

GIB = 2**30


def machine_load() -> dict[str, float]:
    r"""The 1-minute load average and the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load1": os.getloadavg()[0], "cpus": float(cpus or 1)}


def is_loaded(before: dict[str, float], after: dict[str, float], own_threads: int = 1,
              slack: float = 0.5) -> bool:
    r"""Whether other work shared the CPU: a 1-minute load average above the
    benchmark's own threads (plus ``slack``) before or after the timing.

    The load average counts the benchmark itself once it has run for a while,
    hence ``own_threads``; a run of a few seconds barely moves it, so the
    reading before the timing is the other jobs' load."""
    limit = max(own_threads, 1) + slack
    return max(before["load1"], after["load1"]) > limit


def load_line(before: dict[str, float], after: dict[str, float], own_threads: int = 1) -> str:
    r"""One line for a results table: the load average before and after, and a
    warning when the run was loaded."""
    text = (f"Load average (1 min) before / after timing: {before['load1']:.2f} / "
            f"{after['load1']:.2f} on {before['cpus']:.0f} CPUs, {own_threads} thread(s) used.")
    if is_loaded(before, after, own_threads):
        text += (" **WARNING: loaded machine**: other jobs shared the CPU, absolute times are "
                 "pessimistic (ratios of interleaved rounds are less affected).")
    return text


def load_warning(before: dict[str, float], after: dict[str, float],
                 own_threads: int = 1) -> Optional[str]:
    r"""The warning printed under a loaded run's table, :obj:`None` when quiet."""
    if not is_loaded(before, after, own_threads):
        return None
    return (f"WARNING: loaded machine (load average {before['load1']:.2f} before, "
            f"{after['load1']:.2f} after, {own_threads} thread(s) of our own): "
            f"absolute times are pessimistic")


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_gib() -> float:
    r"""Resident memory of this process now (GiB)."""
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: psutil if present
        import psutil
        return psutil.Process().memory_info().rss / GIB
    return kib / 2**20


def peak_rss_gib() -> float:
    r"""High-water mark of the resident memory since the process started or
    since the last :func:`reset_peak_rss` (GiB). Linux folds each thread's
    page faults into these counters in batches, so a stage's peak can read low
    by up to ~128 MiB per thread where pages are transparent huge pages; the
    benchmarks' peaks are GiB-scale, well above that."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return kib / 2**20


def reset_peak_rss() -> bool:
    r"""Reset the high-water mark to the current RSS (Linux >= 4.0:
    ``echo 5 > /proc/self/clear_refs``); :obj:`False` where unsupported, and
    then :func:`peak_rss_gib` stays the process's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
