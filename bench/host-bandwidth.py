#!/usr/bin/env python3
"""The host-RAM roofline of a streamed CUDA row (bench/cuda.sh): how fast
this machine's RAM gives up bytes to its cores, to the GPU's copy engine
from page-locked memory, and to both at once, which is what a step whose
experts live in host RAM reads them with (the CPU computes some, PCIe
carries the rest). Prints one JSON object, GB/s, medians.

    python3 bench/host-bandwidth.py [THREADS]

Needs torch with CUDA (the GPU machine has it). The buffers are 2 GiB
(the CPU's) and 256 MiB (the copies'), well past any cache.
"""
import json
import os
import statistics
import sys
import threading
import time

import torch

threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
torch.set_num_threads(threads)
cpu = torch.ones(1 << 29, dtype=torch.float32)  # 2 GiB
src = torch.ones(1 << 26, dtype=torch.float32).pin_memory()  # 256 MiB
dst = torch.empty_like(src, device="cuda")


def cpu_pass():
    cpu.sum().item()
    return cpu.numel() * 4


def copy_pass():
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return src.numel() * 4


def rate(f, n=7):
    f()
    runs = []
    for _ in range(n):
        t = time.perf_counter()
        b = f()
        runs.append(b / (time.perf_counter() - t) / 1e9)
    return statistics.median(runs)


def together(seconds=2.0):
    """Both at once for `seconds`: the bytes each moved over the time."""
    moved = {"copies": 0}
    stop = threading.Event()

    def copies():
        while not stop.is_set():
            moved["copies"] += copy_pass()

    th = threading.Thread(target=copies)
    start = time.perf_counter()
    th.start()
    read = 0
    while time.perf_counter() - start < seconds:
        read += cpu_pass()
    stop.set()
    th.join()
    wall = time.perf_counter() - start
    return read / wall / 1e9, moved["copies"] / wall / 1e9


cpu_gbs = rate(cpu_pass)
pcie_gbs = rate(copy_pass)
both = [together() for _ in range(3)]
both.sort(key=lambda r: r[0] + r[1])
cpu_both, pcie_both = both[1]
print(
    json.dumps(
        {
            "threads": threads,
            "cpu_read_gb_s": round(cpu_gbs, 1),
            "pinned_h2d_gb_s": round(pcie_gbs, 1),
            "together_cpu_gb_s": round(cpu_both, 1),
            "together_h2d_gb_s": round(pcie_both, 1),
            "together_gb_s": round(cpu_both + pcie_both, 1),
        }
    )
)
