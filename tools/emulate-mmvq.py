#!/usr/bin/env python3
# The lane arithmetic of matmul.cu's mmvq_q4k / mmvq_q6k, emulated in Python on
# random blocks, against ggml's dequantization of the same blocks times the
# same 8-bit activations: the index and nibble math checked where no GPU is.
# Prints the two sums per trial; they agree to float rounding.
import random, struct
random.seed(1)
def f16(b, o): return struct.unpack('<e', bytes(b[o:o+2]))[0]
def scale_min_k4(j, q):
    if j < 4: return q[j] & 63, q[j+4] & 63
    return (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4), (q[j+4] >> 4) | ((q[j] >> 6) << 4)
def s8(v): return v - 256 if v > 127 else v
def dp4a(a, b, c):
    for i in range(4):
        c += s8((a >> (8*i)) & 255) * s8((b >> (8*i)) & 255)
    return c
def vsub4(a, b):
    r = 0
    for i in range(4):
        r |= ((((a >> 8*i) & 255) - ((b >> 8*i) & 255)) & 255) << 8*i
    return r
def u32(b, o): return b[o] | b[o+1] << 8 | b[o+2] << 16 | b[o+3] << 24
def quant_x(x):
    xq, xd = [], []
    for j in range(len(x)//32):
        blk = x[32*j:32*j+32]; amax = max(abs(v) for v in blk); d = amax/127
        q = [0 if amax == 0 else round(v/d) for v in blk]
        xq += q; xd += [(d, d*sum(q))]
    return xq, xd
def rnd_block(n):
    b = [random.randrange(256) for _ in range(n)]
    return b
# q4_k reference
def deq_q4k(b):
    d, dmin = f16(b,0), f16(b,2); sc = b[4:16]; qs = b[16:144]; y = []
    for j in range(4):
        s1, m1 = scale_min_k4(2*j, sc); s2, m2 = scale_min_k4(2*j+1, sc)
        y += [d*s1*(qs[32*j+l] & 15) - dmin*m1 for l in range(32)]
        y += [d*s2*(qs[32*j+l] >> 4) - dmin*m2 for l in range(32)]
    return y
def emu_q4k(b, xq, xd, sb):
    acc = 0.0
    for lane in range(32):
        c, p = lane >> 3, (lane & 7)*4
        word = u32(b, 16 + 32*c + p)
        dd, dmin = f16(b,0), f16(b,2)
        sc0, m0 = scale_min_k4(2*c, b[4:16]); sc1, m1 = scale_min_k4(2*c+1, b[4:16])
        lo, hi = word & 0x0F0F0F0F, (word >> 4) & 0x0F0F0F0F
        j0 = sb*8 + 2*c
        xw0 = sum((xq[j0*32+p+i] & 255) << 8*i for i in range(4))
        xw1 = sum((xq[(j0+1)*32+p+i] & 255) << 8*i for i in range(4))
        s0, s1 = dp4a(lo, xw0, 0), dp4a(hi, xw1, 0)
        v = dd*(sc0*xd[j0][0]*s0 + sc1*xd[j0+1][0]*s1)
        if p == 0: v -= dmin*(m0*xd[j0][1] + m1*xd[j0+1][1])
        acc += v
    return acc
def deq_q6k(b):
    ql, qh, sc, d = b[0:128], b[128:192], [s8(v) for v in b[192:208]], f16(b, 208); y = [0]*256
    for n in range(2):
        for l in range(32):
            is_ = l // 16
            q1 = ((ql[64*n+l] & 15) | (((qh[32*n+l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[64*n+l+32] & 15) | (((qh[32*n+l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[64*n+l] >> 4) | (((qh[32*n+l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[64*n+l+32] >> 4) | (((qh[32*n+l] >> 6) & 3) << 4)) - 32
            y[128*n+l] = d*sc[8*n+is_]*q1; y[128*n+l+32] = d*sc[8*n+is_+2]*q2
            y[128*n+l+64] = d*sc[8*n+is_+4]*q3; y[128*n+l+96] = d*sc[8*n+is_+6]*q4
    return y
def emu_q6k(b, xq, xd, sb):
    acc = 0.0
    for lane in range(32):
        n, pp, l0 = lane >> 4, (lane >> 3) & 1, (lane & 7)*4
        ql = u32(b, 64*n + 32*pp + l0); qh = u32(b, 128 + 32*n + l0)
        d = f16(b, 208); sc = [s8(v) for v in b[192:208]]
        base = 8*n + l0//16
        sa, sb2 = d*sc[base + 2*pp], d*sc[base + 2*(pp+2)]
        qa = (ql & 0x0F0F0F0F) | (((qh >> (2*pp)) & 0x03030303) << 4)
        qb = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (2*pp+4)) & 0x03030303) << 4)
        va, vb = vsub4(qa, 0x20202020), vsub4(qb, 0x20202020)
        ja = sb*8 + 4*n + pp; jb = ja + 2
        xa = sum((xq[ja*32+l0+i] & 255) << 8*i for i in range(4))
        xb = sum((xq[jb*32+l0+i] & 255) << 8*i for i in range(4))
        acc += sa*xd[ja][0]*dp4a(va, xa, 0) + sb2*xd[jb][0]*dp4a(vb, xb, 0)
    return acc
for kind, size, deq, emu in [('q4_k', 144, deq_q4k, emu_q4k), ('q6_k', 210, deq_q6k, emu_q6k)]:
    for trial in range(5):
        nsb = 3
        blocks = []
        for _ in range(nsb):
            b = rnd_block(size)
            # sane f16 scales
            dpos = 0 if kind == 'q4_k' else 208
            b[dpos:dpos+2] = list(struct.pack('<e', random.uniform(0.001, 0.02)))
            if kind == 'q4_k': b[2:4] = list(struct.pack('<e', random.uniform(0.001, 0.02)))
            blocks.append(b)
        x = [random.uniform(-1, 1) for _ in range(256*nsb)]
        xq, xd = quant_x(x)
        xr = [xd[i//32][0]*xq[i] for i in range(len(x))]
        ref = sum(sum(w*v for w, v in zip(deq(b), xr[256*i:256*i+256])) for i, b in enumerate(blocks))
        got = sum(emu(b, xq, xd, i) for i, b in enumerate(blocks))
        print(kind, trial, f'{ref:.6f} {got:.6f} diff {abs(ref-got):.2e}')
