"""peagle.util.machine: the allocator setting that training applies (measured by the kernel's own counter)."""

import subprocess
import sys

import pytest

_SCRIPT = """
import resource, torch
from peagle.util.machine import keep_freed_memory

def faults():  # minor page faults of 6 allocate-touch-free rounds of a 64 MiB tensor
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(6):
        x = torch.ones(16 << 20)
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory()
for _ in range(3):  # glibc settles within ~8 rounds (the blocks mapped before the setting go first)
    faults()
print(default, int(applied), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_refaulting_freed_blocks():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True).stdout
    default, applied, kept = map(int, out.split())
    pages = (64 << 20) // 4096
    assert applied == 1
    assert default >= 5 * pages  # by default every round maps (and faults in) the block afresh
    assert kept <= 2 * pages  # kept: the rounds reuse the block the heap already holds
