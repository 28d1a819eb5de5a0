#!/usr/bin/env python3
"""Weight bytes llama.cpp reads per decoded token from a GGUF: every tensor,
the routed experts' in the share top-k of n, and one row of the token
embedding. Reads only the header (no numpy, no gguf package).

python3 bench/gguf-bytes.py MODEL.gguf"""
import struct
import sys

# Bytes per block and elements per block of the ggml types a K-quant mix uses.
TYPES = {0: (4, 1), 1: (2, 1), 30: (2, 1), 2: (18, 32), 3: (20, 32), 6: (22, 32), 7: (24, 32),
         8: (34, 32), 10: (84, 256), 11: (110, 256), 12: (144, 256), 13: (176, 256), 14: (210, 256)}
f = open(sys.argv[1], "rb")
def rd(fmt):
    return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]
def string():
    return f.read(rd("Q")).decode()
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
def value(t):
    if t == 8:
        return string()
    if t == 9:
        et, n = rd("I"), rd("Q")
        return [value(et) for _ in range(n)]
    return rd(SCALAR[t])
if f.read(4) != b"GGUF":
    sys.exit(f"{sys.argv[1]}: not a GGUF file")
rd("I")
n_tensors, n_kv = rd("Q"), rd("Q")
meta = {}
for _ in range(n_kv):
    k = string()
    meta[k] = value(rd("I"))
arch = meta["general.architecture"]
used, total = meta[f"{arch}.expert_used_count"], meta[f"{arch}.expert_count"]
per_token = 0
for _ in range(n_tensors):
    name = string()
    dims = [rd("Q") for _ in range(rd("I"))]
    t = rd("I")
    rd("Q")
    if t not in TYPES:
        sys.exit(f"{name}: ggml type {t} is not in this script's table")
    bs, be = TYPES[t]
    elems = 1
    for d in dims:
        elems *= d
    size = elems // be * bs
    if name == "token_embd.weight":
        size //= dims[1]  # one row per token
    elif "_exps" in name:
        size = size * used // total
    per_token += size
print(f"{per_token / 2**20:.2f} MiB")
