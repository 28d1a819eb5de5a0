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
// activations. Prefill: a 64x64 output tile per block, weights widened
// into shared memory 64 columns at a time (correctness first; llama.cpp's
// mmq with int8 activations is the model for a faster one).

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

// y[tok, row] = x[tok, :] . w[row, :] for tok < t <= MV_TOKENS.
// Block (32, MV_ROWS); grid (ceil(rows / MV_ROWS)).
template <int T>
__device__ void matvec(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols, int t) {
    int row = blockIdx.x * MV_ROWS + threadIdx.y;
    if (row >= rows) return;
    const u8* wr = w + (size_t)row * row_bytes;
    int groups = cols >> 5;
    float acc[MV_TOKENS];
#pragma unroll
    for (int i = 0; i < MV_TOKENS; i++) acc[i] = 0.0f;
    for (int g = threadIdx.x; g < groups; g += 32) {
        float v[32];
        dequant32<T>(wr, g, v);
#pragma unroll
        for (int tok = 0; tok < MV_TOKENS; tok++) {
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
#pragma unroll
    for (int tok = 0; tok < MV_TOKENS; tok++) {
        if (tok < t) {
            float s = warp_sum(acc[tok]);
            if (threadIdx.x == 0) y[(size_t)tok * rows + row] = s;
        }
    }
}

#define TILE 64
// The tiled product: 256 threads, each 4 rows x 4 tokens of a 64 x 64 tile,
// over 64 columns (two groups) of weights and activations in shared memory
// per step, stored column-major so the inner loop reads one broadcast row
// value and four token values per column. Grid (ceil(rows/64), ceil(t/64)).
template <int T>
__device__ void gemm(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols, int t) {
    __shared__ float ws[TILE][TILE + 1];
    __shared__ float xs[TILE][TILE + 1];
    int tid = threadIdx.x;
    int row0 = blockIdx.x * TILE, tok0 = blockIdx.y * TILE;
    int ty = tid >> 4, tx = tid & 15;
    int groups = cols >> 5;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < cols; k0 += TILE) {
        if (tid < 2 * TILE) {
            // Thread tid widens group (k0/32 + tid/64) of row tid % 64.
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
}

#define MATMUL_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void matvec_##NAME(const u8* w, u64 row_bytes, const float* x, float* y, \
                                             int rows, int cols, int t) {                          \
        matvec<T>(w, row_bytes, x, y, rows, cols, t);                                              \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        gemm_##NAME(const u8* w, u64 row_bytes, const float* x, float* y, int rows, int cols,      \
                    int t) {                                                                       \
        gemm<T>(w, row_bytes, x, y, rows, cols, t);                                                \
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
__device__ __forceinline__ float weight_at(const u8* row, int c) {
    if (T == T_F32) return ((const float*)row)[c];
    u16 h = ((const u16*)row)[c];
    return T == T_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

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
                                             int rows, int cols, int t) {                          \
        ragged<T>(w, row_bytes, x, y, rows, cols, t);                                              \
    }

RAGGED_KERNEL(f32, T_F32)
RAGGED_KERNEL(f16, T_F16)
RAGGED_KERNEL(bf16, T_BF16)
