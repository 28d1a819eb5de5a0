// Row-wise and element-wise ops of the transformer block, written to give
// the CPU backend's results (kernels/ops.rs) up to f32 summation order.

// A norm's row values a thread holds in registers between its two passes:
// rows up to ROW_REGS * 512 wide (the launcher's 512 threads: every
// released model's hidden size) never go back to memory; wider ones
// re-read the rest. A decode step normalises one row on one block, so its
// time is the latency of each thread's loads: a loop that waited on a load
// a turn, twice (sum of squares, then scale), took 11 us over 2,048
// values; here every load is issued before any is used. A warp stops at
// its last slot inside the row (`row_slots`): the slots past it, issued
// predicated off, were most of `norm_q8`'s 12 us on the H200.
#define ROW_REGS 16

// Slots of ROW_REGS this thread's warp holds inside a row `width` wide:
// slot k is element threadIdx.x + k * blockDim.x. The same for every lane
// of a warp, so loops may stop there without diverging.
__device__ __forceinline__ int row_slots(int width) {
    int base = threadIdx.x & ~31;
    return base < width ? min(ROW_REGS, (width - base + (int)blockDim.x - 1) / (int)blockDim.x) : 0;
}

// First pass of a norm of row xr (plus dr, when not null, the sum written
// back to xr): this thread's values and their weights into v and wv; its
// share of the sum of squares, in the order a strided loop would add them
// (so the results are those of that loop, bit for bit).
__device__ __forceinline__ float norm_load(float* xr, const float* dr, const float* w, int width,
                                           float* v, float* wv) {
    float ss = 0.0f;
    int slots = row_slots(width);
#pragma unroll
    for (int k = 0; k < ROW_REGS; k++) {
        int i = threadIdx.x + k * blockDim.x;
        v[k] = i < width ? xr[i] : 0.0f;
        wv[k] = i < width ? w[i] : 0.0f;
        if (dr && i < width) v[k] += dr[i];
        if (k + 1 >= slots) break;
    }
#pragma unroll
    for (int k = 0; k < ROW_REGS; k++) {
        if (k >= slots) break;
        int i = threadIdx.x + k * blockDim.x;
        if (dr && i < width) xr[i] = v[k];
        ss += v[k] * v[k];
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < width; i += blockDim.x) {
        float x = xr[i];
        if (dr) {
            x += dr[i];
            xr[i] = x;
        }
        ss += x * x;
    }
    return ss;
}

// 1 / sqrt(mean + eps) of a row whose threads' sums of squares are ss, as
// the CPU computes it (then w * (x * inv)).
__device__ __forceinline__ float norm_inv(float ss, int width, float eps) {
    __shared__ float sh[32];
    ss = block_sum(ss, sh);
    return 1.0f / sqrtf(ss / (float)width + eps);
}

// RMSNorm of row xr (plus dr, as norm_load) into orow, which may be xr:
// each thread reads and writes only its own elements. blockDim.x a
// multiple of 32.
__device__ void rms_row(float* xr, const float* dr, float* orow, const float* w, int width, float eps) {
    float v[ROW_REGS], wv[ROW_REGS];
    float inv = norm_inv(norm_load(xr, dr, w, width, v, wv), width, eps);
    int slots = row_slots(width);
#pragma unroll
    for (int k = 0; k < ROW_REGS; k++) {
        if (k >= slots) break;
        int i = threadIdx.x + k * blockDim.x;
        if (i < width) orow[i] = wv[k] * (v[k] * inv);
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < width; i += blockDim.x) orow[i] = w[i] * (xr[i] * inv);
}

// Row blockIdx.x of x into the same row of out (x only read: no dr).
extern "C" __global__ void rms_norm(const float* x, float* out, const float* w, int width,
                                    float eps) {
    grid_wait();
    size_t at = (size_t)blockIdx.x * width;
    rms_row((float*)x + at, nullptr, out + at, w, width, eps);
}

// x += d, then RMSNorm of the sum into out, row blockIdx.x: a residual
// add and the next norm in one launch.
extern "C" __global__ void add_rms_norm(float* x, const float* d, float* out, const float* w, int width,
                                        float eps) {
    grid_wait();
    size_t at = (size_t)blockIdx.x * width;
    rms_row(x + at, d + at, out + at, w, width, eps);
}

// `add_rms_norm` (d null: `rms_norm`, x only read) whose output is also
// rounded to int8 per 32-block as `quantize_q8` rounds it, for the int8
// kernels that read it next (attention's projections, a decode step's
// experts): a launch and a pass over the row fewer. width a multiple of
// 32 (and blockDim.x too), so each warp's 32 consecutive outputs are one
// block and `i < width` holds for a whole warp or none of it.
extern "C" __global__ void norm_q8(float* x, const float* d, float* out, const float* w, int width, float eps,
                                   i8* xq, float* xds) {
    grid_wait();
    size_t at = (size_t)blockIdx.x * width;
    float *xr = x + at, *orow = out + at;
    float v[ROW_REGS], wv[ROW_REGS];
    float inv = norm_inv(norm_load(xr, d ? d + at : nullptr, w, width, v, wv), width, eps);
    // Slots are whole warps inside the row (width and blockDim.x multiples
    // of 32): each warp stops at its last.
    int slots = row_slots(width);
#pragma unroll
    for (int k = 0; k < ROW_REGS; k++) {
        if (k >= slots) break;
        int i = threadIdx.x + k * blockDim.x;
        float o = wv[k] * (v[k] * inv);
        orow[i] = o;
        round_q8(o, at + i, xq, xds);
    }
    for (int i = threadIdx.x + ROW_REGS * blockDim.x; i < width; i += blockDim.x) {
        float o = w[i] * (xr[i] * inv);
        orow[i] = o;
        round_q8(o, at + i, xq, xds);
    }
}

// Per-head RMSNorm then NeoX rotary embedding of q's and k's heads (`head`
// wide, t rows of q_heads and k_heads), in place, one warp per head and
// QK_WARPS heads a block: q's heads first, then k's. As rms_norm_in_place
// then rope on each, in one launch instead of four. A head is a few
// hundred bytes: a block of the norms' 512 threads per head left three
// quarters of its threads idle and waited on a block-wide sum, 112 us a
// layer for a 512-token prompt's 18,432 heads on the H100. With `pos_at`
// (else null), also the layer's cache writes `kv_write` would make next:
// each k head as rotated, and v's t rows (vw wide) copied by the blocks
// after the heads', at the position pos_at holds: a launch a layer fewer
// in a decode step.
#define QK_WARPS 8
extern "C" __global__ void qk_norm_rope(float* q, float* k, const float* wq, const float* wk,
                                        const float* cos_t, const float* sin_t, int head, int q_heads,
                                        int k_heads, int t, float eps, const float* v, float* keys,
                                        float* values, int vw, const u32* pos_at) {
    grid_wait();
    int qn = t * q_heads, heads_all = qn + t * k_heads;
    int head_blocks = (heads_all + QK_WARPS - 1) / QK_WARPS, b = blockIdx.x;
    if (b >= head_blocks) {
        u64 pos = *pos_at, n = (u64)t * vw, step = (u64)(gridDim.x - head_blocks) * blockDim.x;
        for (u64 i = (u64)(b - head_blocks) * blockDim.x + threadIdx.x; i < n; i += step)
            values[pos * vw + i] = v[i];
        return;
    }
    int hb = b * QK_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    // A whole warp leaves or stays: the sum below shuffles over all lanes.
    if (hb >= heads_all) return;
    bool is_q = hb < qn;
    int h = is_q ? hb : hb - qn, tok = h / (is_q ? q_heads : k_heads);
    float* r = (is_q ? q : k) + (size_t)h * head;
    const float* w = is_q ? wq : wk;
    float ss = 0.0f;
    for (int i = lane; i < head; i += 32) ss += r[i] * r[i];
    float inv = 1.0f / sqrtf(warp_sum(ss) / (float)head + eps);
    int half = head / 2;
    const float *c = cos_t + (size_t)tok * half, *s = sin_t + (size_t)tok * half;
    // k's row h of t * k_heads is at h * head of k, and so at position
    // pos + h / k_heads of the cache, whose rows are k_heads * head wide.
    float* cached = !is_q && pos_at ? keys + (size_t)*pos_at * k_heads * head + (size_t)h * head : nullptr;
    for (int i = lane; i < half; i += 32) {
        float x0 = w[i] * (r[i] * inv), x1 = w[i + half] * (r[i + half] * inv);
        float y0 = x0 * c[i] - x1 * s[i], y1 = x1 * c[i] + x0 * s[i];
        r[i] = y0;
        r[i + half] = y1;
        if (cached) {
            cached[i] = y0;
            cached[i + half] = y1;
        }
    }
}

// The first `width` values of row blockIdx.x (rows `stride` apart), in place.
extern "C" __global__ void rms_norm_in_place(float* x, const float* w, int width, int stride,
                                             float eps) {
    grid_wait();
    float* r = x + (size_t)blockIdx.x * stride;
    rms_row(r, nullptr, r, w, width, eps);
}

// Rotary embedding in place over `t` rows `width` wide of heads `head`
// wide, from element `skip` of each head; `cos`/`sin` hold `half` values
// per row. NeoX pairs (i, i + half) or interleaved pairs (2i, 2i + 1).
// One thread per pair.
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int t, int width,
                                int head, int skip, int interleaved) {
    grid_wait();
    int half = (head - skip) / 2, heads = width / head;
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)t * heads * half) return;
    int i = (int)(idx % half);
    int h = (int)((idx / half) % heads);
    int tok = (int)(idx / ((size_t)half * heads));
    float* p = x + (size_t)tok * width + h * head + skip;
    float c = cos_t[(size_t)tok * half + i], s = sin_t[(size_t)tok * half + i];
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float x0 = p[a], x1 = p[b];
    p[a] = x0 * c - x1 * s;
    p[b] = x1 * c + x0 * s;
}

// gate = silu(gate) * up, element-wise.
extern "C" __global__ void silu_mul(float* gate, const float* up, u64 n) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

// y = the sum of `splits` parts of n values each, in part order (a split
// product's partial sums: the same order every run).
extern "C" __global__ void sum_parts(const float* parts, float* y, u64 n, int splits) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.0f;
    for (int z = 0; z < splits; z++) s += parts[(size_t)z * n + i];
    y[i] = s;
}

// y += x.
extern "C" __global__ void add(float* y, const float* x, u64 n) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// row added to every `width`-wide row of y (a bias).
extern "C" __global__ void add_rows(float* y, const float* row, u64 n, int width) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += row[i % width];
}

extern "C" __global__ void clamp(float* x, u64 n, float limit) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fminf(fmaxf(x[i], -limit), limit);
}

// y[tok] += sigmoid(g[tok]) * x[tok], rows `width` wide (Qwen2-MoE's gated
// shared expert).
extern "C" __global__ void gated_add(float* y, const float* x, const float* g, u64 n, int width) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 1.0f / (1.0f + expf(-g[i / width]));
    y[i] += s * x[i];
}

// Row r of out is row order[r] / k of x: a layer's (token, slot) pairs in
// expert order. Rows past x's `rows` (a bad order) are left alone.
extern "C" __global__ void gather(const float* x, const u32* order, int k, int width, int rows,
                                  float* out, u64 n) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t r = i / width;
    u32 src = order[r] / (u32)k;
    if (src < (u32)rows) out[i] = x[(size_t)src * width + i % width];
}

// Row tok of y is its k expert outputs (rows pos[tok * k + j] of ys, in the
// ascending order the host sorted them into) times their weights, summed
// from zero in that order, as the CPU sums them.
extern "C" __global__ void scatter(const float* ys, const u32* pos, const float* w, int k, int width,
                                   int rows, float* y, u64 n) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t tok = i / width, c = i % width;
    float acc = 0.0f;
    for (int j = 0; j < k; j++) {
        u32 p = pos[tok * k + j];
        if (p < (u32)rows) acc += w[tok * k + j] * ys[(size_t)p * width + c];
    }
    y[i] = acc;
}

// Row tok of y is its k expert outputs (rows tok * k + j of ys, j in the
// `route` kernel's choice order) times their weights, summed from zero in
// ascending expert id (ties by j): the order the CPU sums them in, where
// the pairs are grouped by expert. For the decode path that keeps routing
// on the device (`matvec_id`); k is small, so the order is found by
// selection.
extern "C" __global__ void moe_combine(const float* ys, const u32* ids, const float* w, int k, int width,
                                       float* y, u64 n) {
    grid_wait();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    size_t tok = i / width, c = i % width;
    const u32* id = ids + tok * k;
    float acc = 0.0f;
    u32 last = 0;
    int last_j = -1;
    for (int step = 0; step < k; step++) {
        int best = -1;
        for (int j = 0; j < k; j++) {
            bool after = id[j] > last || (id[j] == last && j > last_j);
            if (after && (best < 0 || id[j] < id[best])) best = j;
        }
        size_t p = tok * k + best;
        acc += w[p] * ys[p * width + c];
        last = id[best];
        last_j = best;
    }
    y[i] = acc;
}

// Latent attention (DeepSeek): head h's query absorbed into latent space,
// qa[tok, h, r] = sum_i q[tok, h, i] * kv_b[h * (nope + vd) + i, r] for
// r < rank (kv_b widened to f32, `rank` wide), then its rotary part copied.
// One thread per output; correct first, a tiled product is the fast one.
extern "C" __global__ void mla_absorb(const float* q, const float* kv_b, float* qa, int t, int nh,
                                      int nope, int rope, int vd, int rank) {
    grid_wait();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    int row = rank + rope;
    if (idx >= (size_t)t * nh * row) return;
    int r = (int)(idx % row);
    size_t th = idx / row;
    int h = (int)(th % nh);
    const float* qr = q + th * (nope + rope);
    if (r < rank) {
        const float* wc = kv_b + (size_t)h * (nope + vd) * rank + r;
        float s = 0.0f;
        for (int i = 0; i < nope; i++) s += qr[i] * wc[(size_t)i * rank];
        qa[idx] = s;
    } else {
        qa[idx] = qr[nope + r - rank];
    }
}

// Head h's latent output through its value rows: out[tok, h, d] =
// sum_r lat[tok, h, r] * kv_b[h * (nope + vd) + nope + d, r].
extern "C" __global__ void mla_values(const float* lat, const float* kv_b, float* out, int t, int nh,
                                      int nope, int vd, int rank) {
    grid_wait();
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)t * nh * vd) return;
    int d = (int)(idx % vd);
    size_t th = idx / vd;
    int h = (int)(th % nh);
    const float* l = lat + th * rank;
    const float* wr = kv_b + ((size_t)h * (nope + vd) + nope + d) * rank;
    float s = 0.0f;
    for (int r = 0; r < rank; r++) s += l[r] * wr[r];
    out[idx] = s;
}

// The sampler's greedy pick (sampler.rs `argmax`) of each row of x (rows n
// wide, blockIdx.y) into out: the largest value, the lowest index among
// equal ones (== : -0 and 0 tie), NaN never chosen, 0 for a row of NaN
// alone. A decode step's 151,936 logits are read here, from L2 where the
// LM head just wrote them, instead of crossing PCIe for the host to read.
// Each of gridDim.x blocks takes a contiguous part of the row (one block
// over the whole row waited on a load at a time: 68 us on the H100) and
// leaves its pick in `parts`; the row's last block to finish (a count in
// `done`, left at zero again) picks among them. NONE (no index yet) loses
// every tie, so a row of -inf gives its first index.
#define NONE 0xffffffffu
__device__ __forceinline__ void argmax_merge(float& m, u32& at, float om, u32 oa) {
    if (om > m || (om == m && oa < at)) {
        m = om;
        at = oa;
    }
}

// The block's pick, to thread 0. blockDim.x a multiple of 32.
__device__ void block_argmax(float& m, u32& at) {
    __shared__ float sm[32];
    __shared__ u32 sa[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(m, at, __shfl_xor_sync(FULL_MASK, m, o), __shfl_xor_sync(FULL_MASK, at, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sm[warp] = m;
        sa[warp] = at;
    }
    __syncthreads();
    m = lane < nw ? sm[lane] : -INF;
    at = lane < nw ? sa[lane] : NONE;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        argmax_merge(m, at, __shfl_xor_sync(FULL_MASK, m, o), __shfl_xor_sync(FULL_MASK, at, o));
}

extern "C" __global__ void argmax_rows(const float* x, int n, u32* parts, u32* done, u32* out) {
    grid_wait();
    int row = blockIdx.y, part = blockIdx.x, np = gridDim.x;
    const float* r = x + (size_t)row * n;
    int chunk = (n + np - 1) / np, lo = part * chunk, hi = min(n, lo + chunk);
    float m = -INF;
    u32 at = NONE;
    // Ascending within a thread: the first of equal values is kept.
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float v = r[i];
        if (v > m || (at == NONE && v == m)) {
            m = v;
            at = (u32)i;
        }
    }
    block_argmax(m, at);
    u32* pr = parts + (size_t)row * np * 2;
    __shared__ bool last;
    if (threadIdx.x == 0) {
        pr[part] = __float_as_uint(m);
        pr[np + part] = at;
        __threadfence();
        last = atomicAdd(done + row, 1u) == (u32)np - 1;
    }
    __syncthreads();
    if (!last) return;
    m = -INF;
    at = NONE;
    // Past L1: the other blocks wrote these from other SMs.
    for (int j = threadIdx.x; j < np; j += blockDim.x) argmax_merge(m, at, __uint_as_float(__ldcg(pr + j)), __ldcg(pr + np + j));
    block_argmax(m, at);
    if (threadIdx.x == 0) {
        out[row] = at == NONE ? 0 : at;
        done[row] = 0;
    }
}
#undef NONE
