#!/usr/bin/env python3
"""The memory a smoe container needs, from smoe's own memory plan.

    deploy/k8s/memory.py MODEL --ram-budget SIZE [--ctx N] [--smoe PATH] [other `smoe plan` flags]

MODEL is a vault, a checkpoint or a bare config.json, as for `smoe plan`;
--ram-budget is the expert cache the container will be started with
(`smoe serve --ram-budget SIZE`). smoe plans the RAM as backbone + KV cache
+ activations + expert cache + headroom, where the headroom (binary,
tokenizer, stacks) is a tenth of the memory and at least 192 MiB
(crates/smoe/src/memory.rs, `headroom`). This finds the least memory M, in
MiB, on which `smoe plan --ram M` plans that cache, and prints it as a
Kubernetes quantity for the container's memory request and limit.
"""

import argparse
import json
import math
import subprocess
import sys

MIB = 1 << 20
MIN_HEADROOM = 192 * MIB

# smoe plan measures the machine unless given figures; the memory plan does
# not depend on them, so any will do and nothing is measured.
NO_MEASURE = ["--disk-gbps", "1", "--mem-gbps", "10", "--cores", "1"]


def plan(smoe, args, ram):
    """smoe's RAM plan on a machine of `ram` bytes, or its error."""
    cmd = [smoe, "plan", *args, "--ram", f"{ram}B", "--json", *NO_MEASURE]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return None, f"{' '.join(cmd)}: {out.stderr.strip()}"
    return json.loads(out.stdout)["memory"]["ram"], None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoe", default="smoe", help="the smoe binary (default: smoe on PATH)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ours, rest = p.parse_known_args()
    if "--ram-budget" not in rest:
        sys.exit("give --ram-budget SIZE: the expert cache the container runs with")
    # A machine far larger than any plan, so that the cache is the budget
    # asked for and not what the RAM leaves.
    big, err = plan(ours.smoe, rest, 1 << 50)
    if err:
        sys.exit(err)
    # Solving M = fixed + headroom(M) gives a start; the budget asked may
    # be a little over the whole slots it buys, so search up from there.
    fixed = (
        big["backbone_bytes"]
        + big["kv_bytes"]
        + big["activation_bytes"]
        + big["expert_cache_bytes"]
    )
    low = math.ceil(max(fixed + MIN_HEADROOM, fixed / 0.9) / MIB) - 1
    high, step = low + 1, 1
    while (exact := plan(ours.smoe, rest, high * MIB)[0]) is None:
        low, high, step = high, high + step, step * 2
    while high - low > 1:
        mid = (low + high) // 2
        if (fits := plan(ours.smoe, rest, mid * MIB)[0]) is None:
            low = mid
        else:
            high, exact = mid, fits
    mib = high
    if exact["expert_cache_bytes"] != big["expert_cache_bytes"]:
        sys.exit(f"smoe plans another cache on {mib} MiB: {exact}")
    figures = {
        "memory": f"{mib}Mi",
        "backbone_bytes": exact["backbone_bytes"],
        "kv_bytes": exact["kv_bytes"],
        "ctx": exact["ctx"],
        "activation_bytes": exact["activation_bytes"],
        "expert_cache_bytes": exact["expert_cache_bytes"],
        "headroom_bytes": exact["headroom_bytes"],
    }
    if ours.json:
        print(json.dumps(figures))
        return
    gib = lambda b: f"{b / (1 << 30):.2f} GiB"
    print(
        f"# backbone {gib(exact['backbone_bytes'])} + KV {gib(exact['kv_bytes'])} ({exact['sequences']} x {exact['ctx']} tokens)"
        f" + activations {gib(exact['activation_bytes'])}"
        f" + expert cache {gib(exact['expert_cache_bytes'])} + headroom {gib(exact['headroom_bytes'])}"
    )
    print("resources:")
    print("  requests:")
    print(f'    memory: "{mib}Mi"')
    print("  limits:")
    print(f'    memory: "{mib}Mi"')


if __name__ == "__main__":
    main()
