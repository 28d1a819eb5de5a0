// Matrix products straight on stored weight rows: f32, f16, bf16 and the
// GGML blocks the vault writes (q4_0, q8_0, q4_k, q5_k, q6_k).
//
// Every format is read through one primitive, `dequant32`: the 32 weights
// of group `g` of a row (elements 32g..32g+32) as f32. A 32-weight group is
// one q4_0/q8_0 block, one q4_k/q5_k sub-block with its own scale and
// minimum, or two q6_k 16-weight sub-blocks, so no group straddles a scale.
// The block layouts and dequantization formulas are ggml's (MIT, as in
// llama.cpp's ggml-quants.c and candle's quantized.cu), re-derived per
// group here rather than per super-block.
//
// Decode (few tokens): one warp per output row; lane i takes groups i,
// i + 32, ..., widens each once and dots it with every token's 32
// activations (quantized rows staged through shared memory 32 groups at a
// time with wide loads); `matvec_id`/`swiglu_id` do the same for a layer's
// chosen experts in one launch. Prefill: a 64x64 output tile per block, weights widened
// into shared memory 64 columns at a time, multiplied on the tensor cores
// in split TF32 (`gemm_id` runs a layer's grouped experts in one launch;
// llama.cpp's mmq with int8 activations is the model for a faster one).

#define T_F32 0
#define T_F16 1
#define T_BF16 2
#define T_Q4_0 3
#define T_Q8_0 4
#define T_Q4_K 5
#define T_Q5_K 6
#define T_Q6_K 7

// q4_k and q5_k pack eight 6-bit scales and minimums into 12 bytes
// (ggml's get_scale_min_k4).
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

template <int T>
__device__ __forceinline__ void dequant32(const u8* row, int g, float* out) {
    if (T == T_F32) {
        const float4* p = (const float4*)(row + (size_t)g * 128);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float4 v = p[i];
            out[4 * i] = v.x;
            out[4 * i + 1] = v.y;
            out[4 * i + 2] = v.z;
            out[4 * i + 3] = v.w;
        }
    } else if (T == T_F16 || T == T_BF16) {
        const uint4* p = (const uint4*)(row + (size_t)g * 64);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 v = p[i];
            u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                u16 lo = (u16)(w[j] & 0xFFFF), hi = (u16)(w[j] >> 16);
                out[8 * i + 2 * j] = T == T_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
                out[8 * i + 2 * j + 1] = T == T_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
            }
        }
    } else if (T == T_Q4_0) {
        // 18 bytes: f16 d, 16 bytes of nibbles (low: 0..16, high: 16..32).
        const u8* b = row + (size_t)g * 18;
        float d = ld_f16(b);
#pragma unroll
        for (int l = 0; l < 16; l++) {
            u8 q = b[2 + l];
            out[l] = d * (float)((int)(q & 0xF) - 8);
            out[l + 16] = d * (float)((int)(q >> 4) - 8);
        }
    } else if (T == T_Q8_0) {
        // 34 bytes: f16 d, 32 signed bytes.
        const u8* b = row + (size_t)g * 34;
        float d = ld_f16(b);
#pragma unroll
        for (int l = 0; l < 32; l++) out[l] = d * (float)(i8)b[2 + l];
    } else if (T == T_Q4_K) {
        // 144 bytes per 256: f16 d, f16 dmin, 12 bytes of scales, 128 of
        // nibbles; sub-block s uses bytes 32*(s/2).. (low nibbles for even s).
        const u8* b = row + (size_t)(g >> 3) * 144;
        int s = g & 7;
        float sc, m;
        scale_min_k4(s, b + 4, &sc, &m);
        float d = ld_f16(b) * sc, dm = ld_f16(b + 2) * m;
        const u8* q = b + 16 + (s >> 1) * 32;
        int shift = (s & 1) * 4;
#pragma unroll
        for (int l = 0; l < 32; l++) out[l] = d * (float)((q[l] >> shift) & 0xF) - dm;
    } else if (T == T_Q5_K) {
        // 176 bytes per 256: as q4_k with 32 bytes of high bits before the
        // nibbles; sub-block s takes bit s of each high byte.
        const u8* b = row + (size_t)(g >> 3) * 176;
        int s = g & 7;
        float sc, m;
        scale_min_k4(s, b + 4, &sc, &m);
        float d = ld_f16(b) * sc, dm = ld_f16(b + 2) * m;
        const u8* qh = b + 16;
        const u8* q = b + 48 + (s >> 1) * 32;
        int shift = (s & 1) * 4;
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int v = ((q[l] >> shift) & 0xF) | (((qh[l] >> s) & 1) << 4);
            out[l] = d * (float)v - dm;
        }
    } else if (T == T_Q6_K) {
        // 210 bytes per 256: 128 bytes of low nibbles, 64 of high 2-bit
        // pairs, 16 signed 8-bit scales, f16 d. Group gi of the super-block
        // is quarter `part` of half `n`: low nibbles from byte 32*(part&1)
        // of the half (upper nibble for part >= 2), high bits 2*part.
        const u8* b = row + (size_t)(g >> 3) * 210;
        int gi = g & 7, n = gi >> 2, part = gi & 3;
        float d = ld_f16(b + 208);
        const u8* ql = b + 64 * n + (part & 1) * 32;
        const u8* qh = b + 128 + 32 * n;
        const i8* sc = (const i8*)(b + 192) + 8 * n + 2 * part;
        int lshift = (part >> 1) * 4, hshift = 2 * part;
        float d0 = d * (float)sc[0], d1 = d * (float)sc[1];
#pragma unroll
        for (int l = 0; l < 32; l++) {
            int v = ((ql[l] >> lshift) & 0xF) | (((qh[l] >> hshift) & 3) << 4);
            out[l] = (l < 16 ? d0 : d1) * (float)(v - 32);
        }
    }
}

// Most tokens the matrix-vector kernel takes; more go to the tiled kernel.
#define MV_TOKENS 8
// Rows (warps) per matrix-vector block.
#define MV_ROWS 4
// Bytes of 32 consecutive groups of a quantized row (one group per lane):
// whole blocks in every format. MV_STAGE is the largest (q8_0).
#define MV_STAGE 1088

template <int T>
__device__ constexpr bool is_float() {
    return T == T_F32 || T == T_F16 || T == T_BF16;
}

template <int T>
__device__ constexpr int chunk_bytes() {
    return T == T_Q4_0   ? 32 * 18
           : T == T_Q8_0 ? 32 * 34
           : T == T_Q4_K ? 4 * 144
           : T == T_Q5_K ? 4 * 176
           : T == T_Q6_K ? 4 * 210
                         : 0;
}

// A warp stages a chunk of a quantized row (32 groups: whole blocks in
// every format) through shared memory with the widest loads the row's
// alignment allows (W: uint4, uint2, u32 or u16; GGML blocks have even
// sizes, and q6_k's 210-byte blocks make 8 bytes the usual width there, 16
// for the other formats). Every lane issues all its loads of a chunk
// before storing any, and the next chunk's loads go out before the
// current chunk is multiplied: a load-store loop waits out the memory
// latency once per load, which held the q6_k LM head to 570 GB/s.
template <typename W>
__device__ __forceinline__ constexpr int stage_loads() {
    return (MV_STAGE / (int)sizeof(W) + 31) / 32;
}

template <typename W>
__device__ __forceinline__ void stage_load(const u8* src, int n, W* r) {
    int lane = threadIdx.x, words = n / (int)sizeof(W);
#pragma unroll
    for (int k = 0; k < stage_loads<W>(); k++) {
        int i = lane + 32 * k;
        if (i < words) r[k] = ((const W*)src)[i];
    }
}

template <typename W>
__device__ __forceinline__ void stage_store(const W* r, int n, u8* dst) {
    int lane = threadIdx.x, words = n / (int)sizeof(W);
#pragma unroll
    for (int k = 0; k < stage_loads<W>(); k++) {
        int i = lane + 32 * k;
        if (i < words) ((W*)dst)[i] = r[k];
    }
}

// acc[tok] += v . x[tok, 32g..32g+32] for tok < t.
template <int NT>
__device__ __forceinline__ void dot32(const float* v, const float* x, int cols, int t, int g, float* acc) {
#pragma unroll
    for (int tok = 0; tok < NT; tok++) {
        if (tok < t) {
            const float4* xr = (const float4*)(x + (size_t)tok * cols + g * 32);
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float4 a = xr[i];
                s += v[4 * i] * a.x + v[4 * i + 1] * a.y + v[4 * i + 2] * a.z + v[4 * i + 3] * a.w;
            }
            acc[tok] += s;
        }
    }
}

// The quantized half of `dot_row`, W-wide loads: chunk c staged and
// multiplied while chunk c + 1 is on its way.
template <int T, int NT, typename W>
__device__ __forceinline__ void dot_chunks(const u8* wr, int cols, const float* x, int t, float* acc, u8* stage) {
    const int cb = chunk_bytes<T>();
    int lane = threadIdx.x, groups = cols >> 5;
    W r[stage_loads<W>()];
    int n = min(32, groups);
    stage_load<W>(wr, n * cb / 32, r);
    for (int g0 = 0; g0 < groups; g0 += 32) {
        stage_store<W>(r, n * cb / 32, stage);
        __syncwarp();
        int next = g0 + 32, n_next = min(32, groups - next);
        if (n_next > 0) stage_load<W>(wr + (size_t)(next >> 5) * cb, n_next * cb / 32, r);
        if (lane < n) {
            float v[32];
            dequant32<T>(stage, lane, v);
            dot32<NT>(v, x, cols, t, g0 + lane, acc);
        }
        __syncwarp();
        n = n_next;
    }
}

// One warp's partial dot products of stored row `wr` (whole 32-weight
// groups) with t <= NT activation rows, per lane into acc. Float rows are
// read in place (16-byte loads already); a quantized row goes through the
// warp's `stage` in chunks of 32 groups, loaded with wide coalesced loads
// rather than each lane's byte loads scattered over 32 blocks.
template <int T, int NT>
__device__ __forceinline__ void dot_row(const u8* wr, int cols, const float* x, int t, float* acc, u8* stage) {
    int lane = threadIdx.x, groups = cols >> 5;
    if constexpr (is_float<T>()) {
        float v[32];
        // Two groups' loads in flight (a router row of 2,048 is two a lane).
#pragma unroll 2
        for (int g = lane; g < groups; g += 32) {
            dequant32<T>(wr, g, v);
            dot32<NT>(v, x, cols, t, g, acc);
        }
    } else {
        // Every chunk's start and length share the row's, the chunk size's
        // and the last chunk's alignment.
        const int cb = chunk_bytes<T>();
        int tail = (groups & 31) * cb / 32;
        size_t a = (size_t)wr | (size_t)cb | (size_t)tail;
        if ((a & 15) == 0) {
            dot_chunks<T, NT, uint4>(wr, cols, x, t, acc, stage);
        } else if ((a & 7) == 0) {
            dot_chunks<T, NT, uint2>(wr, cols, x, t, acc, stage);
        } else if ((a & 3) == 0) {
            dot_chunks<T, NT, u32>(wr, cols, x, t, acc, stage);
        } else {
            dot_chunks<T, NT, u16>(wr, cols, x, t, acc, stage);
        }
    }
}

// y[tok, row] = x[tok, :] . w[row, :] for tok < t <= MV_TOKENS.
// Block (32, MV_ROWS); grid (ceil(rows / MV_ROWS)).
template <int T>
__device__ void matvec(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols, int t) {
    __shared__ __align__(16) u8 stage[MV_ROWS][MV_STAGE];
    int row = blockIdx.x * MV_ROWS + threadIdx.y;
    if (row >= rows) return;
    float acc[MV_TOKENS];
#pragma unroll
    for (int i = 0; i < MV_TOKENS; i++) acc[i] = 0.0f;
    dot_row<T, MV_TOKENS>(w + (size_t)row * row_bytes, cols, x, t, acc, stage[threadIdx.y]);
#pragma unroll
    for (int tok = 0; tok < MV_TOKENS; tok++) {
        if (tok < t) {
            float s = warp_sum(acc[tok]);
            if (threadIdx.x == 0) y[(size_t)tok * rows + row] = s;
        }
    }
}

// Weight c of a float row.
template <int T>
__device__ __forceinline__ float weight_at(const u8* row, int c) {
    if (T == T_F32) return ((const float*)row)[c];
    u16 h = ((const u16*)row)[c];
    return T == T_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}


// The whole warp's dot product of row `wr` with one activation row; float
// rows of any width (the test models' 24 and 48 too).
template <int T>
__device__ __forceinline__ float row_dot(const u8* wr, int cols, const float* x, u8* stage) {
    float acc[1] = {0.0f};
    if constexpr (is_float<T>()) {
        if (cols & 31) {
            for (int c = threadIdx.x; c < cols; c += 32) acc[0] += weight_at<T>(wr, c) * x[c];
            return warp_sum(acc[0]);
        }
    }
    dot_row<T, 1>(wr, cols, x, 1, acc, stage);
    return warp_sum(acc[0]);
}

// Routed experts without leaving the device (decode): pair p (token
// p / x_div's slot) takes expert ids[p], whose matrix starts at
// experts[ids[p]] (all of a layer's experts share type and shape), so one
// launch runs every chosen expert, reading the ids the `route` kernel wrote.
// y[p, row] = w_ids[p][row, :] . x[p / x_div, :]. An id past n_exp (which
// `route` never writes) gives 0 rather than reading past the table.
// Block (32, MV_ROWS); grid (ceil(rows / MV_ROWS), pairs).
template <int T>
__device__ void matvec_id(const u64* experts, const u32* ids, int n_exp, u64 row_bytes, const float* x,
                          int x_div, float* y, int rows, int cols) {
    __shared__ __align__(16) u8 stage[MV_ROWS][MV_STAGE];
    int row = blockIdx.x * MV_ROWS + threadIdx.y, p = blockIdx.y;
    if (row >= rows) return;
    u32 e = ids[p];
    float s = 0.0f;
    if (e < (u32)n_exp) {
        const u8* wr = (const u8*)experts[e] + (size_t)row * row_bytes;
        s = row_dot<T>(wr, cols, x + (size_t)(p / x_div) * cols, stage[threadIdx.y]);
    }
    if (threadIdx.x == 0) y[(size_t)p * rows + row] = s;
}

// As matvec_id through an expert's gate and up rows at once, giving
// y[p, row] = silu(gate . x) * (up . x) (the `silu_mul` formula) for the
// token of pair p (p / k).
template <int T>
__device__ void swiglu_id(const u64* gates, const u64* ups, const u32* ids, int n_exp, u64 row_bytes,
                          const float* x, int k, float* y, int rows, int cols) {
    __shared__ __align__(16) u8 stage[MV_ROWS][MV_STAGE];
    int row = blockIdx.x * MV_ROWS + threadIdx.y, p = blockIdx.y;
    if (row >= rows) return;
    u32 e = ids[p];
    float out = 0.0f;
    if (e < (u32)n_exp) {
        const float* xr = x + (size_t)(p / k) * cols;
        size_t at = (size_t)row * row_bytes;
        float g = row_dot<T>((const u8*)gates[e] + at, cols, xr, stage[threadIdx.y]);
        float u = row_dot<T>((const u8*)ups[e] + at, cols, xr, stage[threadIdx.y]);
        out = g / (1.0f + expf(-g)) * u;
    }
    if (threadIdx.x == 0) y[(size_t)p * rows + row] = out;
}

#define TILE 64
// Shared-memory row pitch of the tiles: 72 = 8 mod 32 puts the eight
// values a tensor-core fragment load reads per k-row (and its four k-rows)
// in 32 different banks.
#define TILE_PITCH 72

#if __CUDA_ARCH__ >= 800
// f32 as TF32 (its bits), rounded to nearest.
__device__ __forceinline__ u32 to_tf32(float v) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}

// v = big + small, both TF32: the pair carries about 21 of f32's 24 bits.
__device__ __forceinline__ void split_tf32(float v, u32* big, u32* small) {
    *big = to_tf32(v);
    *small = to_tf32(v - __uint_as_float(*big));
}

// v's TF32 halves when `exact` (3xTF32 products), else v rounded to TF32
// alone (one product, TF32's precision: the experiment `exact` = 0 runs).
__device__ __forceinline__ void tf32_parts(float v, int exact, u32* big, u32* small) {
    if (exact) {
        split_tf32(v, big, small);
    } else {
        *big = to_tf32(v);
        *small = 0;
    }
}

// c += a . b on the tensor cores: a 16x8 (row-major) by b 8x8 (column-major)
// TF32 product into a 16x8 f32 accumulator (PTX's m16n8k8 fragments).
__device__ __forceinline__ void mma_tf32(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Columns k0..k0+64 of the tile's 64 weight rows (widened) and 64 tokens'
// activations into shared memory, k-major, zero past the edges. Threads
// 0..127 widen one group of a row each; all 256 load activations.
template <int T>
__device__ __forceinline__ void fill_tiles(const u8* w, u64 row_bytes, const float* x, int rows, int cols,
                                           int t, int row0, int tok0, int k0, float (*ws)[TILE_PITCH],
                                           float (*xs)[TILE_PITCH]) {
    int tid = threadIdx.x, groups = cols >> 5;
    if (tid < 2 * TILE) {
        int r = tid & (TILE - 1), half = tid >> 6;
        int g = (k0 >> 5) + half;
        float v[32];
        if (row0 + r < rows && g < groups) {
            dequant32<T>(w + (size_t)(row0 + r) * row_bytes, g, v);
        } else {
#pragma unroll
            for (int l = 0; l < 32; l++) v[l] = 0.0f;
        }
#pragma unroll
        for (int l = 0; l < 32; l++) ws[half * 32 + l][r] = v[l];
    }
#pragma unroll
    for (int i = 0; i < (TILE * TILE) / 256; i++) {
        int idx = tid + 256 * i;
        int k = idx & (TILE - 1), tok = idx >> 6;
        float v = 0.0f;
        if (tok0 + tok < t && k0 + k < cols) v = x[(size_t)(tok0 + tok) * cols + k0 + k];
        xs[k][tok] = v;
    }
}

// The tiled product: a 64-token x 64-row output tile per 256-thread block
// over 64 columns of widened weights and activations in shared memory per
// step, columns kb..ke (whole tiles but the last). Grid (ceil(rows/64),
// ceil(t/64), splits): with several splits, split z takes columns
// z*kc..(z+1)*kc into its own t x rows part of y, and `sum_parts` adds
// the parts (a few output tiles, a router's, leave most SMs idle
// otherwise).
//
// On Ampere and newer, on the tensor cores: each of the 8 warps owns 16
// tokens x 32 rows, per 8 columns one A fragment (tokens) and four B
// fragments (rows), each operand split into two TF32 halves and multiplied
// as big*big + big*small + small*big (the "3xTF32" scheme), which keeps
// f32's accuracy at a third of TF32's tensor rate, so results differ from
// the CPU's by f32 summation order only; with `exact` 0, the big halves'
// product alone (TF32's precision, a third of the tensor work: an
// experiment, `Gpu::set_exact_gemm`). On Turing (no TF32 mma), f32 FMAs,
// each thread 4 rows x 4 tokens.
template <int T>
__device__ void gemm(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols, int t,
                     int exact, int kb, int ke) {
    __shared__ __align__(16) float ws[TILE][TILE_PITCH];
    __shared__ __align__(16) float xs[TILE][TILE_PITCH];
    int tid = threadIdx.x;
    int row0 = blockIdx.x * TILE, tok0 = blockIdx.y * TILE;
    if (tok0 >= t) return;
#if __CUDA_ARCH__ >= 800
    int warp = tid >> 5, lane = tid & 31;
    int gid = lane >> 2, tig = lane & 3;
    int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 32;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[j][r] = 0.0f;
    for (int k0 = kb; k0 < ke; k0 += TILE) {
        fill_tiles<T>(w, row_bytes, x, rows, cols, t, row0, tok0, k0, ws, xs);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE; kk += 8) {
            u32 ab[4], as[4];
            tf32_parts(xs[kk + tig][m0 + gid], exact, &ab[0], &as[0]);
            tf32_parts(xs[kk + tig][m0 + gid + 8], exact, &ab[1], &as[1]);
            tf32_parts(xs[kk + tig + 4][m0 + gid], exact, &ab[2], &as[2]);
            tf32_parts(xs[kk + tig + 4][m0 + gid + 8], exact, &ab[3], &as[3]);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                u32 bb[2], bs[2];
                int n = n0 + 8 * j + gid;
                tf32_parts(ws[kk + tig][n], exact, &bb[0], &bs[0]);
                tf32_parts(ws[kk + tig + 4][n], exact, &bb[1], &bs[1]);
                // The small terms first, so the big product lands last.
                if (exact) {
                    mma_tf32(acc[j], as, bb);
                    mma_tf32(acc[j], ab, bs);
                }
                mma_tf32(acc[j], ab, bb);
            }
        }
        __syncthreads();
    }
    // Accumulator r of fragment j: token m0 + gid (+8 for r >= 2), row
    // n0 + 8j + 2 * tig (+1 for odd r).
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int tok = tok0 + m0 + gid + 8 * (r >> 1);
            int row = row0 + n0 + 8 * j + 2 * tig + (r & 1);
            if (tok < t && row < rows) y[(size_t)tok * rows + row] = acc[j][r];
        }
    }
#else
    int ty = tid >> 4, tx = tid & 15;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    for (int k0 = kb; k0 < ke; k0 += TILE) {
        fill_tiles<T>(w, row_bytes, x, rows, cols, t, row0, tok0, k0, ws, xs);
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < TILE; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = ws[k][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = xs[k][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = row0 + ty * 4 + i;
        if (row >= rows) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int tok = tok0 + tx * 4 + j;
            if (tok < t) y[(size_t)tok * rows + row] = acc[i][j];
        }
    }
#endif
}

// A layer's chosen experts over their gathered rows in one launch (prefill):
// block z runs expert used[z] (its matrix at experts[used[z]]) over rows
// start[e]..start[e + 1] of x into the same rows of y, as `gemm` would one
// expert at a time. Grid (ceil(rows/64), ceil(most rows of one expert/64),
// experts used); blocks past an expert's rows return at once.
template <int T>
__device__ void gemm_id(const u64* experts, const u32* used, const u32* start, u64 row_bytes,
                        const float* x, float* y, int rows, int cols, int exact) {
    u32 e = used[blockIdx.z];
    u32 s = start[e];
    int n = (int)(start[e + 1] - s);
    gemm<T>((const u8*)experts[e], row_bytes, x + (size_t)s * cols, y + (size_t)s * rows, rows, cols, n,
            exact, 0, cols);
}

#define MATMUL_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void matvec_##NAME(const u8* w, u64 row_bytes, const float* x, float* y, \
                                             int rows, int cols, int t) { grid_wait();             \
        matvec<T>(w, row_bytes, x, y, rows, cols, t);                                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        gemm_##NAME(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols,      \
                    int t, int exact, int kc) { grid_wait();                                       \
        int kb = blockIdx.z * kc;                                                                  \
        gemm<T>(w, row_bytes, x, y + (size_t)blockIdx.z * t * rows, rows, cols, t, exact, kb,      \
                min(cols, kb + kc));                                                               \
    }                                                                                              \
    extern "C" __global__ void matvec_id_##NAME(const u64* experts, const u32* ids, int n_exp,     \
                                                u64 row_bytes, const float* x, int x_div, float* y, \
                                                int rows, int cols) { grid_wait();                 \
        matvec_id<T>(experts, ids, n_exp, row_bytes, x, x_div, y, rows, cols);                     \
    }                                                                                              \
    extern "C" __global__ void swiglu_id_##NAME(const u64* gates, const u64* ups, const u32* ids,  \
                                                int n_exp, u64 row_bytes, const float* x, int k,   \
                                                float* y, int rows, int cols) { grid_wait();       \
        swiglu_id<T>(gates, ups, ids, n_exp, row_bytes, x, k, y, rows, cols);                      \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        gemm_id_##NAME(const u64* experts, const u32* used, const u32* start, u64 row_bytes,       \
                       const float* x, float* y, int rows, int cols, int exact) { grid_wait();     \
        gemm_id<T>(experts, used, start, row_bytes, x, y, rows, cols, exact);                      \
    }

MATMUL_KERNELS(f32, T_F32)
MATMUL_KERNELS(f16, T_F16)
MATMUL_KERNELS(bf16, T_BF16)
MATMUL_KERNELS(q4_0, T_Q4_0)
MATMUL_KERNELS(q8_0, T_Q8_0)
MATMUL_KERNELS(q4_k, T_Q4_K)
MATMUL_KERNELS(q5_k, T_Q5_K)
MATMUL_KERNELS(q6_k, T_Q6_K)

// Float rows whose width is not a multiple of 32 (tiny test models only:
// every released model's widths are): one warp per row as in `matvec`, any
// number of tokens, one weight at a time.
template <int T>
__device__ void ragged(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols, int t) {
    int row = blockIdx.x * MV_ROWS + threadIdx.y;
    if (row >= rows) return;
    const u8* wr = w + (size_t)row * row_bytes;
    for (int tok = 0; tok < t; tok++) {
        const float* xr = x + (size_t)tok * cols;
        float s = 0.0f;
        for (int c = threadIdx.x; c < cols; c += 32) s += weight_at<T>(wr, c) * xr[c];
        s = warp_sum(s);
        if (threadIdx.x == 0) y[(size_t)tok * rows + row] = s;
    }
}

#define RAGGED_KERNEL(NAME, T)                                                                    \
    extern "C" __global__ void ragged_##NAME(const u8* w, u64 row_bytes, const float* x, float* y, \
                                             int rows, int cols, int t) { grid_wait();             \
        ragged<T>(w, row_bytes, x, y, rows, cols, t);                                              \
    }

RAGGED_KERNEL(f32, T_F32)
RAGGED_KERNEL(f16, T_F16)
RAGGED_KERNEL(bf16, T_BF16)

// Embedding rows: x[tok] = row ids[tok] of the table w, widened (the
// table kept in VRAM, so a decode step uploads its token id, not its
// row). Quantized rows a 32-weight group per thread, float rows (of any
// width) a weight per thread. Grid (ceil(groups or cols / 128), t).
template <int T>
__device__ void get_rows(const u8* w, u64 row_bytes, u32 rows, const u32* ids, float* x, int cols) {
    int tok = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    float* xr = x + (size_t)tok * cols;
    // An id past the table (which the model's input check refuses first)
    // reads nothing: its row is zeros.
    if (ids[tok] >= rows) {
        for (int c = i; c < cols; c += gridDim.x * blockDim.x) xr[c] = 0.0f;
        return;
    }
    const u8* row = w + (size_t)ids[tok] * row_bytes;
    if constexpr (is_float<T>()) {
        if (i < cols) xr[i] = weight_at<T>(row, i);
    } else if (i < (cols >> 5)) {
        float v[32];
        dequant32<T>(row, i, v);
#pragma unroll
        for (int k = 0; k < 32; k++) xr[i * 32 + k] = v[k];
    }
}

#define GET_ROWS_KERNEL(NAME, T)                                                                     \
    extern "C" __global__ void get_rows_##NAME(const u8* w, u64 row_bytes, u32 rows, const u32* ids, \
                                               float* x, int cols) { grid_wait();                    \
        get_rows<T>(w, row_bytes, rows, ids, x, cols);                                               \
    }

GET_ROWS_KERNEL(f32, T_F32)
GET_ROWS_KERNEL(f16, T_F16)
GET_ROWS_KERNEL(bf16, T_BF16)
GET_ROWS_KERNEL(q4_0, T_Q4_0)
GET_ROWS_KERNEL(q8_0, T_Q8_0)
GET_ROWS_KERNEL(q4_k, T_Q4_K)
GET_ROWS_KERNEL(q5_k, T_Q5_K)
GET_ROWS_KERNEL(q6_k, T_Q6_K)

// ---- Matrix-vector products on int8 activations (decode's default,
// `matvec` the fallback; llama.cpp's mmvq is the model, written anew here).
//
// The activations are rounded once per call to 8 bits per 32-block
// (`quantize_q8`: 32 int8 and the pair (scale d, d * their sum)), as the
// CPU backend rounds them, and each lane multiplies four weights at a time
// with `__dp4a` on 4 bytes of the stored block, no float widening (see
// `q8_units` for how a row's work is split). Blocks are MQ_WARPS warps.
#define MQ_WARPS 4

// Rounds a warp's 32 consecutive values (one block of 32: `at` is the
// index of this lane's value) to int8 with the block's scale d (its
// largest magnitude over 127) and the pair (d, d * the sum of the int8s).
// `quantize_q8` and the norms that round as they write (`norm_q8`) share it.
__device__ __forceinline__ void round_q8(float v, size_t at, i8* xq, float* xds) {
    float amax = warp_max(fabsf(v));
    float dq = amax / 127.0f;
    int q = amax == 0.0f ? 0 : __float2int_rn(v / dq);
    xq[at] = (i8)q;
    float sum = warp_sum((float)q);
    if ((threadIdx.x & 31) == 0) {
        size_t blk = at >> 5;
        xds[2 * blk] = dq;
        xds[2 * blk + 1] = dq * sum;
    }
}

// `round_q8` where each lane holds four consecutive values (`at`: the
// index of v.x, a multiple of 4): eight lanes make a 32-block. The same
// scale, rounding and sum, so the same bytes as `quantize_q8` writes. Every
// lane of the warp calls it; eight lanes with `in` false (a whole block
// past the row's end) take part in the shuffles and write nothing.
__device__ __forceinline__ void round_q8x4(float4 v, size_t at, bool in, i8* xq, float* xds) {
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
    float dq = amax / 127.0f;
    int a = 0, b = 0, c = 0, d = 0;
    if (amax != 0.0f) {
        a = __float2int_rn(v.x / dq);
        b = __float2int_rn(v.y / dq);
        c = __float2int_rn(v.z / dq);
        d = __float2int_rn(v.w / dq);
    }
    if (in) *(u32*)(xq + at) = (u32)(u8)a | ((u32)(u8)b << 8) | ((u32)(u8)c << 16) | ((u32)(u8)d << 24);
    float sum = (float)(a + b + c + d);
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(FULL_MASK, sum, o);
    if (in && (at & 31) == 0) {
        size_t blk = at >> 5;
        xds[2 * blk] = dq;
        xds[2 * blk + 1] = dq * sum;
    }
}

// `blocks` blocks of 32 of the t * cols activations, four a warp, each
// lane four consecutive values (`round_q8x4`): a value a lane took ten
// shuffles per 32 values and ran at a fifth of the memory's rate on a
// prompt's rows (57 launches, 2.15 ms of a 512-token prefill on the H100).
// Loads stay scalar: views may start anywhere a 32-block does.
extern "C" __global__ void quantize_q8(const float* x, i8* xq, float* xds, u64 blocks) {
    grid_wait();
    u64 warp = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    // A whole warp leaves or stays: its lanes shuffle together.
    if (warp * 4 >= blocks) return;
    u64 at = warp * 128 + 4 * (threadIdx.x & 31);
    bool in = at < blocks * 32;
    float4 v = in ? make_float4(x[at], x[at + 1], x[at + 2], x[at + 3]) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    round_q8x4(v, at, in, xq, xds);
}

// Four bytes at a 2-byte aligned address (q6_k's 210-byte blocks).
__device__ __forceinline__ int ld_u32_2(const u8* p) {
    const u16* h = (const u16*)p;
    return (int)((u32)h[0] | ((u32)h[1] << 16));
}

// A lane's work is a unit: 32 weights of a row (an eighth of a 256-weight
// super-block) against the same 32 columns of each token's activations,
// eight `dp4a`s on weights loaded 16 bytes at a time straight from global
// memory (q4_k's 16 bytes of nibbles; q6_k's 16 of low and 16 of high
// bits), one scale decode per unit. `lanes` (8, 16 or 32) lanes of
// a warp share a row, lane `sub` taking units sub, sub + lanes, ...,
// MQ_UNROLL of them loaded before any is multiplied, so that every lane has
// its loads in flight at once and no warp waits on another. The first
// version staged each row through shared memory with a warp a row and
// walked its super-blocks one after another: a load latency a super-block,
// 300-650 GB/s on the H100/H200 and an SM half busy with staging
// (`tools/ncu-decode.sh`: 10-16% of DRAM bandwidth, 53% of issue slots).
#define MQ_UNROLL 2

// q4_k unit u of a row: super-block u / 8, sub-block pair c = u / 2 % 4
// (sub-blocks 2c and 2c + 1, the low and high nibbles of bytes 32c..32c+32
// of qs), half hh = u % 2 (elements 16hh..16hh+16 of each). The block's
// first 16 bytes (d, dmin and the twelve bytes of 6-bit scales and
// minimums) and the unit's 16 bytes of nibbles, both 16-byte aligned: a
// row is whole 144-byte blocks and starts 16-byte aligned.
struct UnitQ4K {
    uint4 h, q;
};

__device__ __forceinline__ void unit_load(UnitQ4K& w, const u8* row, int u) {
    const u8* b = row + (size_t)(u >> 3) * 144;
    w.h = *(const uint4*)b;
    w.q = *(const uint4*)(b + 16 + 16 * (u & 7));
}

// Sub-block s of a q4_k super-block is d * sc_s * q - dmin * m_s, so its
// dot with int8 activations (scale dx, sum sx) is d sc_s dx (q . xq) -
// dmin m_s dx sx; the minimum's term belongs to the whole sub-block, so
// only the unit with hh = 0 adds it. The scales and minimums of the pair
// (2c, 2c + 1) are two bytes of one 16-bit half of the scale words
// (ggml's get_scale_min_k4, two at a time, no indexing into registers).
template <int NT>
__device__ __forceinline__ void unit_dot(const UnitQ4K& w, int u, const i8* xq, const float* xds, int cols,
                                         int t, float* acc) {
    int c = (u >> 1) & 3, hh = u & 1, j0 = (u >> 3) * 8 + 2 * c;
    float d = f16_to_f32((u16)(w.h.x & 0xFFFF)), dmin = f16_to_f32((u16)(w.h.x >> 16));
    int sh = (c & 1) * 16;
    u32 a = (w.h.y >> sh) & 0xFFFF, b = (w.h.z >> sh) & 0xFFFF, e = (w.h.w >> sh) & 0xFFFF;
    u32 sc = c < 2 ? a & 0x3F3F : (e & 0x0F0F) | ((a & 0xC0C0) >> 2);
    u32 mn = c < 2 ? b & 0x3F3F : ((e >> 4) & 0x0F0F) | ((b & 0xC0C0) >> 2);
    float sc0 = d * (float)(sc & 0xFF), sc1 = d * (float)(sc >> 8);
    float m0 = dmin * (float)(mn & 0xFF), m1 = dmin * (float)(mn >> 8);
    const int q[4] = {(int)w.q.x, (int)w.q.y, (int)w.q.z, (int)w.q.w};
    int nblk = cols >> 5;
#pragma unroll
    for (int tok = 0; tok < NT; tok++) {
        if (tok < t) {
            const i8* xr = xq + (size_t)tok * cols + j0 * 32 + 16 * hh;
            int4 xa = *(const int4*)xr, xb = *(const int4*)(xr + 32);
            float4 ds = *(const float4*)(xds + 2 * ((size_t)tok * nblk + j0));
            const int lo[4] = {xa.x, xa.y, xa.z, xa.w}, hi[4] = {xb.x, xb.y, xb.z, xb.w};
            int s0 = 0, s1 = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s0 = __dp4a(q[i] & 0x0F0F0F0F, lo[i], s0);
                s1 = __dp4a((q[i] >> 4) & 0x0F0F0F0F, hi[i], s1);
            }
            float v = sc0 * ds.x * (float)s0 + sc1 * ds.z * (float)s1;
            if (hh == 0) v -= m0 * ds.y + m1 * ds.w;
            acc[tok] += v;
        }
    }
}

// 16 bytes at a 2-byte aligned address (q6_k's 210-byte blocks): five
// aligned words, shifted. The fifth word stays inside the block for every
// unit's ql and qh below (at most byte 196 of 210).
__device__ __forceinline__ uint4 ld16_2(const u8* p) {
    const u32* a = (const u32*)((size_t)p & ~(size_t)3);
    u32 s = ((u32)(size_t)p & 2) * 8, w0 = a[0], w1 = a[1], w2 = a[2], w3 = a[3], w4 = a[4];
    return make_uint4(__funnelshift_r(w0, w1, s), __funnelshift_r(w1, w2, s), __funnelshift_r(w2, w3, s),
                      __funnelshift_r(w3, w4, s));
}

// q6_k unit u: super-block u / 8, half n = u / 4 % 2 (elements 128n..),
// part pair pp = u / 2 % 2 (parts pp and pp + 2: the low and high nibbles
// of ql's bytes 64n + 32pp.., with qh's bit pairs 2pp and 2pp + 4), l-half
// lh = u % 2 (elements l = 16lh..16lh+16 of each part): element
// 128n + 32 part + l is d * sc[8n + l / 16 + 2 part] * (q - 32).
struct UnitQ6K {
    uint4 ql, qh;
    int sa, sb;
    float d;
};

__device__ __forceinline__ void unit_load(UnitQ6K& w, const u8* row, int u) {
    const u8* b = row + (size_t)(u >> 3) * 210;
    int n = (u >> 2) & 1, pp = (u >> 1) & 1, lh = u & 1;
    w.ql = ld16_2(b + 64 * n + 32 * pp + 16 * lh);
    w.qh = ld16_2(b + 128 + 32 * n + 16 * lh);
    const i8* sc = (const i8*)(b + 192) + 8 * n + lh + 2 * pp;
    w.sa = sc[0];
    w.sb = sc[4];
    w.d = ld_f16(b + 208);
}

template <int NT>
__device__ __forceinline__ void unit_dot(const UnitQ6K& w, int u, const i8* xq, const float* xds, int cols,
                                         int t, float* acc) {
    int n = (u >> 2) & 1, pp = (u >> 1) & 1, lh = u & 1;
    int ja = (u >> 3) * 8 + 4 * n + pp, jb = ja + 2;
    const u32 ql[4] = {w.ql.x, w.ql.y, w.ql.z, w.ql.w}, qh[4] = {w.qh.x, w.qh.y, w.qh.z, w.qh.w};
    int va[4], vb[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 a = (ql[i] & 0x0F0F0F0F) | (((qh[i] >> (2 * pp)) & 0x03030303) << 4);
        u32 b = ((ql[i] >> 4) & 0x0F0F0F0F) | (((qh[i] >> (2 * pp + 4)) & 0x03030303) << 4);
        va[i] = (int)__vsub4(a, 0x20202020u);
        vb[i] = (int)__vsub4(b, 0x20202020u);
    }
    float fa = w.d * (float)w.sa, fb = w.d * (float)w.sb;
    int nblk = cols >> 5;
#pragma unroll
    for (int tok = 0; tok < NT; tok++) {
        if (tok < t) {
            const i8* xr = xq + (size_t)tok * cols + 16 * lh;
            int4 xa = *(const int4*)(xr + ja * 32), xb = *(const int4*)(xr + jb * 32);
            const float* ds = xds + 2 * (size_t)tok * nblk;
            const int ta[4] = {xa.x, xa.y, xa.z, xa.w}, tb[4] = {xb.x, xb.y, xb.z, xb.w};
            int s0 = 0, s1 = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                s0 = __dp4a(va[i], ta[i], s0);
                s1 = __dp4a(vb[i], tb[i], s1);
            }
            acc[tok] += fa * ds[2 * ja] * (float)s0 + fb * ds[2 * jb] * (float)s1;
        }
    }
}

template <int T>
struct Q8Unit;
template <>
struct Q8Unit<T_Q4_K> {
    typedef UnitQ4K type;
};
template <>
struct Q8Unit<T_Q6_K> {
    typedef UnitQ6K type;
};

// R rows' (an expert's gate and up together: both rows' loads in flight)
// partial dots, this lane's units of them, with t <= NT activation rows
// into acc[row][tok].
template <int T, int NT, int R>
__device__ __forceinline__ void q8_units(const u8* const* wr, const i8* xq, const float* xds, int cols, int t,
                                         int sub, int lanes, float (*acc)[NT]) {
    typedef typename Q8Unit<T>::type Unit;
    int units = cols >> 5;
    for (int u0 = sub; u0 < units; u0 += MQ_UNROLL * lanes) {
        Unit w[R][MQ_UNROLL];
#pragma unroll
        for (int k = 0; k < MQ_UNROLL; k++)
            if (u0 + k * lanes < units)
#pragma unroll
                for (int i = 0; i < R; i++) unit_load(w[i][k], wr[i], u0 + k * lanes);
#pragma unroll
        for (int k = 0; k < MQ_UNROLL; k++)
            if (u0 + k * lanes < units)
#pragma unroll
                for (int i = 0; i < R; i++) unit_dot<NT>(w[i][k], u0 + k * lanes, xq, xds, cols, t, acc[i]);
    }
}

// v summed over the `lanes` lanes sharing a row (aligned groups of a
// warp), returned to all of them. Every lane of the warp must call it.
__device__ __forceinline__ float lanes_sum(float v, int lanes) {
    for (int o = lanes >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// A block is MQ_WARPS warps of 32 / lanes rows each.
struct Q8Row {
    int row, sub;
    bool valid;
};

__device__ __forceinline__ Q8Row q8_row_in(int block, int rows, int lanes) {
    int per_warp = 32 / lanes;
    int row = (block * MQ_WARPS + (int)threadIdx.y) * per_warp + (int)threadIdx.x / lanes;
    return Q8Row{row, (int)threadIdx.x % lanes, row < rows};
}

__device__ __forceinline__ Q8Row q8_row(int rows, int lanes) { return q8_row_in(blockIdx.x, rows, lanes); }

__device__ __forceinline__ bool q8_writes(const Q8Row& r) { return r.valid && r.sub == 0; }

// y[tok, row] = x[tok] . w[row] for tok < t <= MV_TOKENS, as `matvec`;
// `w` holds the rows from row0 on (`mmvq_q6k_staged` passes its copy).
template <int T>
__device__ void mmvq(const u8* w, u64 row_bytes, const i8* xq, const float* xds, float* y, int rows, int cols,
                     int t, int lanes, int block, int row0 = 0) {
    Q8Row r = q8_row_in(block, rows, lanes);
    float acc[1][MV_TOKENS];
#pragma unroll
    for (int i = 0; i < MV_TOKENS; i++) acc[0][i] = 0.0f;
    const u8* wr = w + (size_t)(r.row - row0) * row_bytes;
    if (r.valid) q8_units<T, MV_TOKENS, 1>(&wr, xq, xds, cols, t, r.sub, lanes, acc);
#pragma unroll
    for (int tok = 0; tok < MV_TOKENS; tok++) {
        if (tok < t) {
            float s = lanes_sum(acc[0][tok], lanes);
            if (q8_writes(r)) y[(size_t)tok * rows + r.row] = s;
        }
    }
}

// `mmvq` for q6_k rows staged through shared memory (`extern` smem of
// MQ_WARPS * 32 / lanes rows): each warp copies its rows with 16-byte
// loads of consecutive addresses, all in flight at once, then multiplies
// from shared memory. q6_k's 210-byte blocks leave a unit's bytes only
// 2-byte aligned, so `unit_load` from global memory takes thirteen loads
// of 1-4 bytes a unit, the lanes of a warp spread over several blocks of
// two rows: each load instruction costs the L1 a pass per line touched,
// which held the q6_k LM head to 2.1 TB/s (121 us on the H100). Rows
// 16-byte aligned (row_bytes a multiple of 16).
#define STAGE_LOADS 8
__device__ void mmvq_q6k_staged(const u8* w, u64 row_bytes, const i8* xq, const float* xds, float* y, int rows,
                                int cols, int t, int lanes) {
    extern __shared__ __align__(16) u8 staged[];
    int per_warp = 32 / lanes, lane = threadIdx.x;
    int first = (blockIdx.x * MQ_WARPS + threadIdx.y) * per_warp;
    int n = max(0, min(per_warp, rows - first));
    u8* st = staged + (size_t)threadIdx.y * per_warp * row_bytes;
    const uint4* src = (const uint4*)(w + (size_t)first * row_bytes);
    uint4* dst = (uint4*)st;
    int words = (int)(n * row_bytes / 16);
    for (int base = 0; base < words; base += STAGE_LOADS * 32) {
        uint4 r[STAGE_LOADS];
#pragma unroll
        for (int k = 0; k < STAGE_LOADS; k++) {
            int i = base + lane + 32 * k;
            if (i < words) r[k] = __ldcs(src + i);
        }
#pragma unroll
        for (int k = 0; k < STAGE_LOADS; k++) {
            int i = base + lane + 32 * k;
            if (i < words) dst[i] = r[k];
        }
    }
    __syncwarp();
    mmvq<T_Q6_K>(st, row_bytes, xq, xds, y, rows, cols, t, lanes, blockIdx.x, first);
}

extern "C" __global__ void mmvq_q6_k_staged(const u8* w, u64 row_bytes, const i8* xq, const float* xds, float* y,
                                            int rows, int cols, int t, int lanes) {
    grid_wait();
    mmvq_q6k_staged(w, row_bytes, xq, xds, y, rows, cols, t, lanes);
}

// As `matvec_id`, pair p's activations being row p / x_div of xq/xds.
template <int T>
__device__ void mmvq_id(const u64* experts, const u32* ids, int n_exp, u64 row_bytes, const i8* xq,
                        const float* xds, int x_div, float* y, int rows, int cols, int lanes) {
    Q8Row r = q8_row(rows, lanes);
    int p = blockIdx.y;
    u32 e = ids[p];
    if (e >= (u32)n_exp) {
        if (q8_writes(r)) y[(size_t)p * rows + r.row] = 0.0f;
        return;
    }
    size_t x = (size_t)(p / x_div);
    const u8* wr = (const u8*)experts[e] + (size_t)r.row * row_bytes;
    float acc[1][1] = {{0.0f}};
    if (r.valid) q8_units<T, 1, 1>(&wr, xq + x * cols, xds + 2 * x * (cols >> 5), cols, 1, r.sub, lanes, acc);
    float s = lanes_sum(acc[0][0], lanes);
    if (q8_writes(r)) y[(size_t)p * rows + r.row] = s;
}

// As `swiglu_id`: y[p, row] = silu(gate . x) * (up . x) for pair p's token
// (p / k). With yq (else null), y is also rounded to int8 into yq/yds as
// `quantize_q8` would round it, for the down projection (a launch fewer a
// layer; rows a multiple of 32): the last of the blocks writing a 32-block
// of y to finish (a count a 32-block in `done`, left at zero) rounds it.
template <int T>
__device__ void mmvq_swiglu_id(const u64* gates, const u64* ups, const u32* ids, int n_exp, u64 row_bytes,
                               const i8* xq, const float* xds, int k, float* y, int rows, int cols, int lanes,
                               i8* yq, float* yds, u32* done) {
    __shared__ bool last;
    Q8Row r = q8_row(rows, lanes);
    int p = blockIdx.y;
    u32 e = ids[p];
    float v = 0.0f;
    // An id past n_exp (which `route` never writes) gives 0; the same for
    // the whole block, so every lane reaches lanes_sum.
    if (e < (u32)n_exp) {
        size_t x = (size_t)(p / k), at = (size_t)r.row * row_bytes;
        const u8* wr[2] = {(const u8*)gates[e] + at, (const u8*)ups[e] + at};
        float acc[2][1] = {{0.0f}, {0.0f}};
        if (r.valid)
            q8_units<T, 1, 2>(wr, xq + x * cols, xds + 2 * x * (cols >> 5), cols, 1, r.sub, lanes, acc);
        float g = lanes_sum(acc[0][0], lanes);
        float u = lanes_sum(acc[1][0], lanes);
        v = g / (1.0f + expf(-g)) * u;
    }
    if (q8_writes(r)) y[(size_t)p * rows + r.row] = v;
    if (!yq) return;
    // A block's rows (MQ_WARPS * 32 / lanes of them) divide 32.
    int per = MQ_WARPS * (32 / lanes), first = (blockIdx.x * per) & ~31;
    u32* c = done + (size_t)p * (rows >> 5) + (first >> 5);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(c, 1u) == 32 / per - 1;
    __syncthreads();
    if (!last || threadIdx.y != 0) return;
    size_t at = (size_t)p * rows + first + threadIdx.x;
    round_q8(__ldcg(y + at), at, yq, yds);
    if (threadIdx.x == 0) *c = 0;
}

// The chosen experts' down projections and their weighted sum in one
// launch (decode; `mmvq_id` then `moe_combine` otherwise): block (row r,
// token tok) gives each of the token's k pairs a group of `lanes` lanes
// (32 / lanes groups a warp, blockDim.y warps; groups take pairs g, g +
// groups, ...), pair p's activations being row p of xq/xds, then sums w[p]
// times their dots from zero in ascending expert id (ties by slot), as
// `moe_combine` and the CPU do.
#define SUM_MAX_K 32
template <int T>
__device__ void mmvq_id_sum(const u64* experts, const u32* ids, int n_exp, u64 row_bytes, const i8* xq,
                            const float* xds, const float* w, int k, float* y, int rows, int cols, int lanes) {
    __shared__ float dots[SUM_MAX_K];
    __shared__ int order[SUM_MAX_K];
    int r = blockIdx.x, tok = blockIdx.y, lane = threadIdx.x;
    int per_warp = 32 / lanes, groups = blockDim.y * per_warp;
    int g = threadIdx.y * per_warp + lane / lanes, sub = lane % lanes;
    const u32* id = ids + (size_t)tok * k;
    // The token's pairs in ascending (expert id, slot), each lane of the
    // first warp placing its own pair (k <= 32): the order moe_combine sums
    // in, without one thread searching k times.
    if (threadIdx.y == 0 && lane < k) {
        int rank = 0;
        u32 e = id[lane];
        for (int i = 0; i < k; i++) rank += id[i] < e || (id[i] == e && i < lane);
        order[rank] = lane;
    }
    // Rounds uniform over the block, so that every lane reaches lanes_sum.
    for (int j0 = 0; j0 < k; j0 += groups) {
        int j = j0 + g;
        float acc[1][1] = {{0.0f}};
        // An id past n_exp (which `route` never writes) gives 0.
        if (j < k && id[j] < (u32)n_exp) {
            size_t p = (size_t)tok * k + j;
            const u8* wr = (const u8*)experts[id[j]] + (size_t)r * row_bytes;
            q8_units<T, 1, 1>(&wr, xq + p * cols, xds + 2 * p * (cols >> 5), cols, 1, sub, lanes, acc);
        }
        float d = lanes_sum(acc[0][0], lanes);
        if (j < k && sub == 0) dots[j] = d;
    }
    __syncthreads();
    if (threadIdx.y != 0 || lane != 0) return;
    float sum = 0.0f;
    for (int s = 0; s < k; s++) {
        int j = order[s];
        sum += w[(size_t)tok * k + j] * dots[j];
    }
    y[(size_t)tok * rows + r] = sum;
}

#define MMVQ_KERNELS(NAME, T)                                                                           \
    extern "C" __global__ void mmvq_##NAME(const u8* w, u64 row_bytes, const i8* xq, const float* xds,  \
                                           float* y, int rows, int cols, int t, int lanes) { grid_wait();            \
        mmvq<T>(w, row_bytes, xq, xds, y, rows, cols, t, lanes, blockIdx.x);                             \
    }                                                                                                    \
    extern "C" __global__ void mmvq_id_##NAME(const u64* experts, const u32* ids, int n_exp,            \
                                              u64 row_bytes, const i8* xq, const float* xds, int x_div, \
                                              float* y, int rows, int cols, int lanes) { grid_wait();   \
        mmvq_id<T>(experts, ids, n_exp, row_bytes, xq, xds, x_div, y, rows, cols, lanes);                \
    }                                                                                                    \
    extern "C" __global__ void mmvq_id_sum_##NAME(const u64* experts, const u32* ids, int n_exp,        \
                                                  u64 row_bytes, const i8* xq, const float* xds,        \
                                                  const float* w, int k, float* y, int rows, int cols,  \
                                                  int lanes) { grid_wait();                             \
        mmvq_id_sum<T>(experts, ids, n_exp, row_bytes, xq, xds, w, k, y, rows, cols, lanes);             \
    }                                                                                                    \
    extern "C" __global__ void mmvq_swiglu_id_##NAME(const u64* gates, const u64* ups, const u32* ids,  \
                                                     int n_exp, u64 row_bytes, const i8* xq,            \
                                                     const float* xds, int k, float* y, int rows,       \
                                                     int cols, int lanes, i8* yq, float* yds,           \
                                                     u32* done) {                                       \
        grid_wait();                                                                                     \
        mmvq_swiglu_id<T>(gates, ups, ids, n_exp, row_bytes, xq, xds, k, y, rows, cols, lanes, yq, yds,  \
                          done);                                                                         \
    }

MMVQ_KERNELS(q4_k, T_Q4_K)
MMVQ_KERNELS(q6_k, T_Q6_K)

// Up to three matrices over the same rounded activations in one launch
// (attention's q, k and v; two launches fewer a layer): matrix i, of type
// ty_i (q4_k or q6_k), takes the next n_i = ceil(rows_i / rows a block)
// blocks, each as `mmvq` would run it; rows_i 0 leaves a matrix out.
extern "C" __global__ void mmvq_each(const u8* w0, const u8* w1, const u8* w2, u64 rb0, u64 rb1, u64 rb2,
                                     int rows0, int rows1, int rows2, int ty0, int ty1, int ty2, float* y0,
                                     float* y1, float* y2, const i8* xq, const float* xds, int cols, int t,
                                     int lanes) {
    grid_wait();
    int per = MQ_WARPS * (32 / lanes), b = blockIdx.x;
    int n0 = (rows0 + per - 1) / per, n1 = (rows1 + per - 1) / per;
    const u8* w = w0;
    u64 rb = rb0;
    int rows = rows0, ty = ty0;
    float* y = y0;
    if (b >= n0 + n1) {
        b -= n0 + n1;
        w = w2, rb = rb2, rows = rows2, ty = ty2, y = y2;
    } else if (b >= n0) {
        b -= n0;
        w = w1, rb = rb1, rows = rows1, ty = ty1, y = y1;
    }
    if (ty == T_Q4_K)
        mmvq<T_Q4_K>(w, rb, xq, xds, y, rows, cols, t, lanes, b);
    else
        mmvq<T_Q6_K>(w, rb, xq, xds, y, rows, cols, t, lanes, b);
}

// ---- Tiled products on int8 activations (prefill's default for q4_k and
// q6_k rows on sm_80 and newer, `gemm` the fallback; llama.cpp's mmq the
// model, written anew here).
//
// A 64-token x 64-row output tile per 256-thread block, as `gemm`, one
// 256-column super-block per step. Shared memory holds the step's weights
// unpacked to int8 with their scales per 32 columns (q4_k: d * sc and the
// minimum dmin * m; q6_k: one scale per 16) and the activations as
// `quantize_q8` rounded them, with their (d, d * sum) pairs. Each 32-column
// group is one int8 tensor-core product (m16n8k32) per fragment, scaled
// into f32: w . x = dw dx (qw . qx) - mw (dx sum qx). q6_k's two scales
// per group take two products, each with the other half of the weights
// zeroed. Where `gemm` widens every weight to f32 and multiplies in 3xTF32,
// this moves a quarter of the bytes through shared memory and does the
// products at the int8 rate.
//
// PTX fragments of m16n8k32 (s8): with gid = lane / 4 and tig = lane % 4,
// a[0..4] hold A[gid][4 tig..], A[gid + 8][4 tig..], A[gid][16 + 4 tig..],
// A[gid + 8][16 + 4 tig..] (four int8 each); b[0..2] B[4 tig..][gid] and
// B[16 + 4 tig..][gid]; c[0..4] C[gid][2 tig], C[gid][2 tig + 1],
// C[gid + 8][2 tig], C[gid + 8][2 tig + 1]. A is 16 tokens, B 8 rows.

// Row pitch of the int8 tiles: 272 bytes = 68 words = 4 mod 32, so the
// eight rows and four words a fragment load reads fall in 32 banks.
#define MQ_PITCH 272

struct MmqTiles {
    i8 w[TILE][MQ_PITCH];
    i8 x[TILE][MQ_PITCH];
    // Per row: the weights' scale per 16 columns (q4_k repeats it per 32).
    float wd[TILE][16];
    float wm[TILE][8];
    // Per token and 32-block: d and d * sum of the int8 values.
    float xd[TILE][8];
    float xs[TILE][8];
};

// Super-block sb of the tile's 64 rows into t.w/wd/wm, one (row, quarter)
// per thread: q4_k's quarter c is the 32 bytes of nibbles shared by groups
// 2c (low) and 2c + 1 (high); q6_k's is half n = c / 2, parity pp = c % 2:
// groups 4n + pp (low nibbles) and 4n + pp + 2 (high), both from the same
// 32 bytes of low bits and of high bit pairs.
template <int T>
__device__ __forceinline__ void mmq_fill_w(const u8* w, u64 row_bytes, int rows, int row0, int sb, MmqTiles& t) {
    int r = threadIdx.x >> 2, c = threadIdx.x & 3;
    bool in = row0 + r < rows;
    const u8* wr = w + (size_t)(row0 + r) * row_bytes;
    int ga, gb;
    int lo[8], hi[8];
    if (T == T_Q4_K) {
        ga = 2 * c;
        gb = ga + 1;
        const u8* b = wr + (size_t)sb * 144;
        float sc0 = 0.0f, m0 = 0.0f, sc1 = 0.0f, m1 = 0.0f, d = 0.0f, dmin = 0.0f;
        if (in) {
            d = ld_f16(b);
            dmin = ld_f16(b + 2);
            scale_min_k4(ga, b + 4, &sc0, &m0);
            scale_min_k4(gb, b + 4, &sc1, &m1);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int q = in ? *(const int*)(b + 16 + 32 * c + 4 * i) : 0;
            lo[i] = q & 0x0F0F0F0F;
            hi[i] = (q >> 4) & 0x0F0F0F0F;
        }
        t.wd[r][2 * ga] = t.wd[r][2 * ga + 1] = d * sc0;
        t.wd[r][2 * gb] = t.wd[r][2 * gb + 1] = d * sc1;
        t.wm[r][ga] = dmin * m0;
        t.wm[r][gb] = dmin * m1;
    } else {
        int n = c >> 1, pp = c & 1;
        ga = 4 * n + pp;
        gb = ga + 2;
        const u8* b = wr + (size_t)sb * 210;
        float d = in ? ld_f16(b + 208) : 0.0f;
        const i8* sc = (const i8*)(b + 192) + 8 * n;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int ql = in ? ld_u32_2(b + 64 * n + 32 * pp + 4 * i) : 0;
            int qh = in ? ld_u32_2(b + 128 + 32 * n + 4 * i) : 0;
            int qa = (ql & 0x0F0F0F0F) | (((qh >> (2 * pp)) & 0x03030303) << 4);
            int qb = ((ql >> 4) & 0x0F0F0F0F) | (((qh >> (2 * pp + 4)) & 0x03030303) << 4);
            // Out of range: 0 - 32 with a scale of 0.
            lo[i] = (int)__vsub4((u32)qa, 0x20202020u);
            hi[i] = (int)__vsub4((u32)qb, 0x20202020u);
        }
        // Group 4n + part's halves take scales 2 part and 2 part + 1.
        t.wd[r][2 * ga] = in ? d * (float)sc[2 * pp] : 0.0f;
        t.wd[r][2 * ga + 1] = in ? d * (float)sc[2 * pp + 1] : 0.0f;
        t.wd[r][2 * gb] = in ? d * (float)sc[2 * pp + 4] : 0.0f;
        t.wd[r][2 * gb + 1] = in ? d * (float)sc[2 * pp + 5] : 0.0f;
        t.wm[r][ga] = t.wm[r][gb] = 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        *(int*)&t.w[r][32 * ga + 4 * i] = lo[i];
        *(int*)&t.w[r][32 * gb + 4 * i] = hi[i];
    }
}

// Super-block sb of the tile's 64 tokens' int8 activations (rows of cols)
// and their pairs into t.x/xd/xs, zero past the last token.
__device__ __forceinline__ void mmq_fill_x(const i8* xq, const float* xds, int cols, int t, int tok0, int sb,
                                           MmqTiles& s) {
    int tid = threadIdx.x, nblk = cols >> 5;
#pragma unroll
    for (int i = 0; i < (TILE * 64) / 256; i++) {
        int idx = tid + 256 * i, tok = idx >> 6, word = idx & 63;
        int v = 0;
        if (tok0 + tok < t) v = ((const int*)(xq + (size_t)(tok0 + tok) * cols + (size_t)sb * 256))[word];
        *(int*)&s.x[tok][4 * word] = v;
    }
#pragma unroll
    for (int i = 0; i < (TILE * 8) / 256; i++) {
        int idx = tid + 256 * i, tok = idx >> 3, g = idx & 7;
        float d = 0.0f, ds = 0.0f;
        if (tok0 + tok < t) {
            const float* p = xds + 2 * ((size_t)(tok0 + tok) * nblk + (size_t)sb * 8 + g);
            d = p[0];
            ds = p[1];
        }
        s.xd[tok][g] = d;
        s.xs[tok][g] = ds;
    }
}

#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma_s8(int* c, const int* a, int b0, int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// y[tok, row] = x[tok] . w[row] for t tokens of int8 activations (xq, xds
// as `quantize_q8` wrote them) through q4_k or q6_k rows, cols a multiple of
// 256. Block 256; grid (ceil(rows/64), ceil(t/64)). Ampere and newer only:
// the caller keeps older GPUs on `gemm`.
template <int T>
__device__ void mmq(const u8* w, u64 row_bytes, const i8* xq, const float* xds, float* y, int rows, int cols,
                    int t) {
#if __CUDA_ARCH__ >= 800
    __shared__ __align__(16) MmqTiles s;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int gid = lane >> 2, tig = lane & 3;
    int row0 = blockIdx.x * TILE, tok0 = blockIdx.y * TILE;
    if (tok0 >= t) return;
    // Each warp: 16 tokens from m0, 32 rows from n0 (four 8-row fragments).
    int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 32;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[j][r] = 0.0f;
    for (int sb = 0; sb < (cols >> 8); sb++) {
        mmq_fill_w<T>(w, row_bytes, rows, row0, sb, s);
        mmq_fill_x(xq, xds, cols, t, tok0, sb, s);
        __syncthreads();
#pragma unroll
        for (int g = 0; g < 8; g++) {
            const i8* xa = &s.x[m0 + gid][32 * g + 4 * tig];
            int a[4] = {*(const int*)xa, *(const int*)(xa + 8 * MQ_PITCH), *(const int*)(xa + 16),
                        *(const int*)(xa + 8 * MQ_PITCH + 16)};
            // Tokens gid and gid + 8 of the warp's 16.
            float dx[2] = {s.xd[m0 + gid][g], s.xd[m0 + gid + 8][g]};
            float sx[2] = {s.xs[m0 + gid][g], s.xs[m0 + gid + 8][g]};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const i8* wb = &s.w[n0 + 8 * j + gid][32 * g + 4 * tig];
                int b0 = *(const int*)wb, b1 = *(const int*)(wb + 16);
                // Rows 2 tig and 2 tig + 1 of the fragment.
                int rr = n0 + 8 * j + 2 * tig;
                if (T == T_Q4_K) {
                    int c[4] = {0, 0, 0, 0};
                    mma_s8(c, a, b0, b1);
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        int row = rr + (r & 1), tk = r >> 1;
                        acc[j][r] += dx[tk] * s.wd[row][2 * g] * (float)c[r] - sx[tk] * s.wm[row][g];
                    }
                } else {
                    int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
                    mma_s8(lo, a, b0, 0);
                    mma_s8(hi, a, 0, b1);
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        int row = rr + (r & 1), tk = r >> 1;
                        acc[j][r] += dx[tk] * (s.wd[row][2 * g] * (float)lo[r] + s.wd[row][2 * g + 1] * (float)hi[r]);
                    }
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int tok = tok0 + m0 + gid + 8 * (r >> 1);
            int row = row0 + n0 + 8 * j + 2 * tig + (r & 1);
            if (tok < t && row < rows) y[(size_t)tok * rows + row] = acc[j][r];
        }
    }
#endif
}

// `gemm_id` on int8 activations: block z runs expert used[z] over its rows
// start[e]..start[e + 1] of the rounded activations.
template <int T>
__device__ void mmq_id(const u64* experts, const u32* used, const u32* start, u64 row_bytes, const i8* xq,
                       const float* xds, float* y, int rows, int cols) {
    u32 e = used[blockIdx.z];
    u32 s = start[e];
    int n = (int)(start[e + 1] - s);
    mmq<T>((const u8*)experts[e], row_bytes, xq + (size_t)s * cols, xds + 2 * (size_t)s * (cols >> 5),
           y + (size_t)s * rows, rows, cols, n);
}

// Two blocks an SM (at most 128 registers a thread): the grouped kernel
// took 142 and so one block, with nothing to hide a block's tile fills.
#define MMQ_KERNELS(NAME, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                 \
        mmq_##NAME(const u8* w, u64 row_bytes, const i8* xq, const float* xds, float* y, int rows,       \
                   int cols, int t) { grid_wait();                                                       \
        mmq<T>(w, row_bytes, xq, xds, y, rows, cols, t);                                                  \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                 \
        mmq_id_##NAME(const u64* experts, const u32* used, const u32* start, u64 row_bytes,              \
                      const i8* xq, const float* xds, float* y, int rows, int cols) { grid_wait();       \
        mmq_id<T>(experts, used, start, row_bytes, xq, xds, y, rows, cols);                               \
    }

MMQ_KERNELS(q4_k, T_Q4_K)
MMQ_KERNELS(q6_k, T_Q6_K)
