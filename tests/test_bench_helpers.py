r"""experiments/_bench.py: the load flag and the per-stage peak memory that the
benchmarks record."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from _bench import (  # noqa: E402
    is_loaded,
    load_line,
    load_warning,
    machine_load,
    peak_rss_gib,
    reset_peak_rss,
    rss_gib,
)


def load(value, cpus=2.0):
    return {"load1": value, "cpus": cpus}


def test_machine_load_reads_the_os():
    import os
    m = machine_load()
    assert m["load1"] == pytest.approx(os.getloadavg()[0], abs=2.0)
    assert m["cpus"] >= 1


@pytest.mark.parametrize("before,after,threads,loaded", [
    (0.3, 1.2, 1, False),   # our own thread only
    (0.3, 2.4, 2, False),   # our two threads
    (2.0, 2.1, 1, True),    # another job was running before we started
    (0.2, 4.0, 2, True),    # others joined during the timing
])
def test_loaded_flag(before, after, threads, loaded):
    assert is_loaded(load(before), load(after), threads) == loaded
    line = load_line(load(before), load(after), threads)
    assert f"{before:.2f} / {after:.2f}" in line
    assert ("WARNING" in line) == loaded
    assert (load_warning(load(before), load(after), threads) is not None) == loaded


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_rss_is_per_stage():
    if not reset_peak_rss():
        pytest.skip("clear_refs not writable here")
    start = rss_gib()
    # The kernel's RSS counters may lag: a thread's page faults are folded in
    # every 64 faults, and with transparent huge pages a fault is 2 MiB, so up
    # to ~128 MiB per thread can be unseen (a 64 MiB block filled by torch's
    # worker threads read as no growth on CI). One thread, 256 MiB: at least
    # half of it is counted whatever the page size.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block = torch.ones(256 * 2**20 // 4)  # touched
    finally:
        torch.set_num_threads(threads)
    peak_with = peak_rss_gib()
    assert peak_with - start >= 0.1
    del block
    reset_peak_rss()  # the peak restarts from the RSS of now
    assert peak_rss_gib() <= rss_gib() + 0.01
