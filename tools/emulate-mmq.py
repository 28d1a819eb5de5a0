#!/usr/bin/env python3
# matmul.cu's int8 tiled product (`mmq`, q4_k and q6_k) emulated thread by
# thread in Python where no GPU is: the tile fills as each thread writes
# shared memory, each lane's fragment registers loaded from the addresses
# the kernel reads, the tensor-core product taken by the PTX ISA's
# m16n8k32 .s8 fragment layout (not by the kernel's intent), and the
# kernel's epilogue per lane. Compared against ggml's dequantization of the
# same rows times the same int8-rounded activations; prints the largest
# difference over the outputs' RMS per case (float rounding: ~1e-7).
#
#   tools/emulate-mmq.py        ragged tiles (rows and tokens short of 64), two super-blocks
import random
import struct
import sys

sys.path.insert(0, __import__('os').path.dirname(__file__))
mmvq = __import__('emulate-mmvq')  # its block helpers (it runs its own check on import)
f16, scale_min_k4, s8, vsub4 = mmvq.f16, mmvq.scale_min_k4, mmvq.s8, mmvq.vsub4
deq_q4k, deq_q6k, quant_x = mmvq.deq_q4k, mmvq.deq_q6k, mmvq.quant_x

TILE, PITCH = 64, 272


def u32(b, o):
    return b[o] | b[o + 1] << 8 | b[o + 2] << 16 | b[o + 3] << 24


def to_bytes(word):
    return [s8((word >> 8 * i) & 255) for i in range(4)]


def fill_w(kind, rows_bytes, rows, row0, sb, t):
    """mmq_fill_w: thread (r, c) = (tid >> 2, tid & 3)."""
    for tid in range(256):
        r, c = tid >> 2, tid & 3
        inn = row0 + r < rows
        row = rows_bytes[row0 + r] if inn else None
        lo, hi = [0] * 8, [0] * 8
        if kind == 'q4_k':
            ga, gb = 2 * c, 2 * c + 1
            b = row[sb * 144:(sb + 1) * 144] if inn else None
            d = dmin = sc0 = m0 = sc1 = m1 = 0.0
            if inn:
                d, dmin = f16(b, 0), f16(b, 2)
                sc0, m0 = scale_min_k4(ga, b[4:16])
                sc1, m1 = scale_min_k4(gb, b[4:16])
            for i in range(8):
                q = u32(b, 16 + 32 * c + 4 * i) if inn else 0
                lo[i] = q & 0x0F0F0F0F
                hi[i] = (q >> 4) & 0x0F0F0F0F
            t['wd'][r][2 * ga] = t['wd'][r][2 * ga + 1] = d * sc0
            t['wd'][r][2 * gb] = t['wd'][r][2 * gb + 1] = d * sc1
            t['wm'][r][ga], t['wm'][r][gb] = dmin * m0, dmin * m1
        else:
            n, pp = c >> 1, c & 1
            ga, gb = 4 * n + pp, 4 * n + pp + 2
            b = row[sb * 210:(sb + 1) * 210] if inn else None
            d = f16(b, 208) if inn else 0.0
            for i in range(8):
                ql = u32(b, 64 * n + 32 * pp + 4 * i) if inn else 0
                qh = u32(b, 128 + 32 * n + 4 * i) if inn else 0
                qa = (ql & 0x0F0F0F0F) | (((qh >> (2 * pp)) & 0x03030303) << 4)
                qb = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (2 * pp + 4)) & 0x03030303) << 4)
                lo[i], hi[i] = vsub4(qa, 0x20202020), vsub4(qb, 0x20202020)
            sc = [s8(v) for v in b[192 + 8 * n:200 + 8 * n]] if inn else [0] * 8
            t['wd'][r][2 * ga] = d * sc[2 * pp]
            t['wd'][r][2 * ga + 1] = d * sc[2 * pp + 1]
            t['wd'][r][2 * gb] = d * sc[2 * pp + 4]
            t['wd'][r][2 * gb + 1] = d * sc[2 * pp + 5]
            t['wm'][r][ga] = t['wm'][r][gb] = 0.0
        for i in range(8):
            t['w'][r][32 * ga + 4 * i:32 * ga + 4 * i + 4] = to_bytes(lo[i])
            t['w'][r][32 * gb + 4 * i:32 * gb + 4 * i + 4] = to_bytes(hi[i])


def fill_x(xq, xds, cols, tt, tok0, sb, s):
    """mmq_fill_x: 16 words of int8 and 2 (d, d*sum) pairs per thread."""
    nblk = cols >> 5
    for tid in range(256):
        for i in range(16):
            idx = tid + 256 * i
            tok, word = idx >> 6, idx & 63
            for k in range(4):
                v = xq[(tok0 + tok) * cols + sb * 256 + 4 * word + k] if tok0 + tok < tt else 0
                s['x'][tok][4 * word + k] = v
        for i in range(2):
            idx = tid + 256 * i
            tok, g = idx >> 3, idx & 7
            d = ds = 0.0
            if tok0 + tok < tt:
                d, ds = xds[(tok0 + tok) * nblk + sb * 8 + g]
            s['xd'][tok][g], s['xs'][tok][g] = d, ds


def ld(tile, row, col):
    """A 4-byte load from an int8 tile: its four values, lowest address first."""
    return tile[row][col:col + 4]


def mma(a_regs, b_regs):
    """m16n8k32 s8 by the PTX ISA's fragment layout: a_regs[lane] = a0..a3,
    b_regs[lane] = b0, b1 (each four int8); returns c0..c3 per lane."""
    A = [[0] * 32 for _ in range(16)]
    B = [[0] * 8 for _ in range(32)]
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        a = a_regs[lane]
        for e in range(4):
            A[gid][4 * tig + e] = a[0][e]
            A[gid + 8][4 * tig + e] = a[1][e]
            A[gid][16 + 4 * tig + e] = a[2][e]
            A[gid + 8][16 + 4 * tig + e] = a[3][e]
            B[4 * tig + e][gid] = b_regs[lane][0][e]
            B[16 + 4 * tig + e][gid] = b_regs[lane][1][e]
    C = [[sum(A[i][k] * B[k][j] for k in range(32)) for j in range(8)] for i in range(16)]
    out = []
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        out.append([C[gid][2 * tig], C[gid][2 * tig + 1], C[gid + 8][2 * tig], C[gid + 8][2 * tig + 1]])
    return out


def mmq(kind, rows_bytes, xq, xds, rows, cols, tt, bx, by):
    """One block (bx, by) of mmq<T>: its outputs as {(tok, row): value}."""
    row0, tok0 = bx * TILE, by * TILE
    zero4 = [0, 0, 0, 0]
    acc = {}
    s = {'w': [[0] * PITCH for _ in range(TILE)], 'x': [[0] * PITCH for _ in range(TILE)],
         'wd': [[0.0] * 16 for _ in range(TILE)], 'wm': [[0.0] * 8 for _ in range(TILE)],
         'xd': [[0.0] * 8 for _ in range(TILE)], 'xs': [[0.0] * 8 for _ in range(TILE)]}
    for warp in range(8):
        for lane in range(32):
            acc[(warp, lane)] = [[0.0] * 4 for _ in range(4)]
    for sb in range(cols >> 8):
        fill_w(kind, rows_bytes, rows, row0, sb, s)
        fill_x(xq, xds, cols, tt, tok0, sb, s)
        for warp in range(8):
            m0, n0 = (warp >> 1) * 16, (warp & 1) * 32
            for g in range(8):
                a_regs, dx, sx = [], [], []
                for lane in range(32):
                    gid, tig = lane >> 2, lane & 3
                    col = 32 * g + 4 * tig
                    a_regs.append([ld(s['x'], m0 + gid, col), ld(s['x'], m0 + gid + 8, col),
                                   ld(s['x'], m0 + gid, col + 16), ld(s['x'], m0 + gid + 8, col + 16)])
                    dx.append([s['xd'][m0 + gid][g], s['xd'][m0 + gid + 8][g]])
                    sx.append([s['xs'][m0 + gid][g], s['xs'][m0 + gid + 8][g]])
                for j in range(4):
                    b_regs = []
                    for lane in range(32):
                        gid, tig = lane >> 2, lane & 3
                        n = n0 + 8 * j + gid
                        b_regs.append([ld(s['w'], n, 32 * g + 4 * tig), ld(s['w'], n, 32 * g + 16 + 4 * tig)])
                    if kind == 'q4_k':
                        c = mma(a_regs, b_regs)
                    else:
                        lo = mma(a_regs, [[b[0], zero4] for b in b_regs])
                        hi = mma(a_regs, [[zero4, b[1]] for b in b_regs])
                    for lane in range(32):
                        tig = lane & 3
                        rr = n0 + 8 * j + 2 * tig
                        a = acc[(warp, lane)]
                        for r in range(4):
                            row, tk = rr + (r & 1), r >> 1
                            if kind == 'q4_k':
                                a[j][r] += dx[lane][tk] * s['wd'][row][2 * g] * c[lane][r] - sx[lane][tk] * s['wm'][row][g]
                            else:
                                a[j][r] += dx[lane][tk] * (s['wd'][row][2 * g] * lo[lane][r]
                                                           + s['wd'][row][2 * g + 1] * hi[lane][r])
    y = {}
    for warp in range(8):
        m0, n0 = (warp >> 1) * 16, (warp & 1) * 32
        for lane in range(32):
            gid, tig = lane >> 2, lane & 3
            for j in range(4):
                for r in range(4):
                    tok = tok0 + m0 + gid + 8 * (r >> 1)
                    row = row0 + n0 + 8 * j + 2 * tig + (r & 1)
                    if tok < tt and row < rows:
                        y[(tok, row)] = acc[(warp, lane)][j][r]
    return y


def main():
    random.seed(7)
    worst = 0.0
    for kind, size, deq in [('q4_k', 144, deq_q4k), ('q6_k', 210, deq_q6k)]:
        rows, tt, nsb = 40, 20, 2
        cols = 256 * nsb
        rows_bytes = []
        for _ in range(rows):
            row = []
            for _ in range(nsb):
                b = [random.randrange(256) for _ in range(size)]
                dpos = 0 if kind == 'q4_k' else 208
                b[dpos:dpos + 2] = list(struct.pack('<e', random.uniform(0.001, 0.02)))
                if kind == 'q4_k':
                    b[2:4] = list(struct.pack('<e', random.uniform(0.001, 0.02)))
                row += b
            rows_bytes.append(row)
        x = [random.uniform(-1, 1) for _ in range(tt * cols)]
        xq, xds = [], []
        for tok in range(tt):
            q, d = quant_x(x[tok * cols:(tok + 1) * cols])
            xq += q
            xds += d
        xr = [xds[i // 32][0] * xq[i] for i in range(len(xq))]
        wf = [sum((deq(row[size * k:size * (k + 1)]) for k in range(nsb)), []) for row in rows_bytes]
        got = mmq(kind, rows_bytes, xq, xds, rows, cols, tt, 0, 0)
        want = {(tok, r): sum(a * b for a, b in zip(wf[r], xr[tok * cols:(tok + 1) * cols]))
                for tok in range(tt) for r in range(rows)}
        assert set(got) == set(want), f'{kind}: outputs written {len(got)}, expected {len(want)}'
        rms = (sum(v * v for v in want.values()) / len(want)) ** 0.5
        err = max(abs(got[k] - want[k]) for k in want) / rms
        worst = max(worst, err)
        print(f'{kind} [{rows}, {cols}] t={tt}: max err {err:.2e} of RMS {rms:.3e}')
    sys.exit(0 if worst < 1e-5 else 1)


main()
