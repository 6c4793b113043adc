"""core/host_memory.py: with the mmap threshold fixed, memory freed by a streaming job leaves RSS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lance_deploy.core.host_memory import fix_mmap_threshold

# A 16 MiB block freed raises glibc's threshold, so 50 x 8 MiB come from the heap; the last one
# kept pins the 400 MiB below it in RSS unless each block has its own mapping.
PROGRAM = """
import os, sys, torch
from lance_deploy.core.host_memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
big = torch.ones(4 << 20); del big
base = rss()
blocks = [torch.ones(2 << 20) for _ in range(50)]
keep = blocks[-1]; del blocks
print((rss() - base) / 2**20)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


@glibc
def test_fixing_the_threshold_takes_effect():
    assert fix_mmap_threshold() is True


@glibc
def test_freed_blocks_leave_rss_once_the_threshold_is_fixed():
    def grown(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert grown("dynamic") > 200  # glibc's default keeps the freed heap resident
    assert grown("fixed") < 40  # the kept 8 MiB block, and little else


FAULTS = """
import resource, sys
from lance_deploy.cli import cli  # the CLI asks for huge pages before it imports torch
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(256 << 20, dtype=torch.uint8)
x.fill_(1)  # touches 256 MiB: 65,536 faults on 4 KiB pages, ~128 on huge pages
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this kernel")
def test_the_cli_puts_big_tensors_on_huge_pages():
    import os

    def faults(**env) -> int:
        base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        run = subprocess.run([sys.executable, "-c", FAULTS], env={**base, **env}, capture_output=True, text=True,
                             check=True)
        return int(run.stdout.split()[-1])

    huge, small = faults(), faults(THP_MEM_ALLOC_ENABLE="0")  # the user's own setting wins
    assert small > 60_000 and huge < small / 10, (huge, small)
