"""`keep_freed_memory`: freed blocks stay in the process, so re-allocating them takes no page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dosewise.allocator import keep_freed_memory

# Two 16 MB blocks and a 4 MB one freed together, twenty times, as a training step frees its
# activations: glibc's default trims the freed top of the heap and faults it back in every time.
WORKLOAD = """
import resource, sys
import numpy as np
from dosewise.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    a, b, c = np.ones(2_000_000), np.ones(2_000_000), np.ones(500_000)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_reallocating_freed_blocks_takes_no_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator is left alone")
    default, kept = minor_faults("default"), minor_faults("keep")
    assert default > 10_000  # ~9000 pages a step are faulted back in without the setting
    assert kept < 200, f"{kept} minor page faults with the setting (default: {default})"
