// Row-wise and element-wise ops of the transformer block, written to give
// the CPU backend's results (kernels/ops.rs) up to f32 summation order.

// RMSNorm of one row of `width` values from xr into orow (which may be xr:
// each thread reads and writes only its own elements). 256 threads.
__device__ void rms_row(const float* xr, float* orow, const float* w, int width, float eps) {
    __shared__ float sh[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, sh);
    // As the CPU: 1 / sqrt(mean + eps), then w * (x * inv).
    float inv = 1.0f / sqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) orow[i] = w[i] * (xr[i] * inv);
}

// Row blockIdx.x of x into the same row of out.
extern "C" __global__ void rms_norm(const float* x, float* out, const float* w, int width,
                                    float eps) {
    size_t at = (size_t)blockIdx.x * width;
    rms_row(x + at, out + at, w, width, eps);
}

// x += d, then RMSNorm of the sum into out, row blockIdx.x: a residual
// add and the next norm in one launch (each thread reads back only the
// sums it wrote).
extern "C" __global__ void add_rms_norm(float* x, const float* d, float* out, const float* w, int width,
                                        float eps) {
    __shared__ float sh[32];
    size_t at = (size_t)blockIdx.x * width;
    float *xr = x + at, *orow = out + at;
    const float* dr = d + at;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = xr[i] + dr[i];
        xr[i] = v;
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) orow[i] = w[i] * (xr[i] * inv);
}

// `add_rms_norm` (d null: `rms_norm`, x only read) whose output is also
// rounded to int8 per 32-block as `quantize_q8` rounds it, for the int8
// kernels that read it next (attention's projections, a decode step's
// experts): a launch and a pass over the row fewer. width a multiple of
// 32, so each warp's 32 consecutive outputs are one block.
extern "C" __global__ void norm_q8(float* x, const float* d, float* out, const float* w, int width, float eps,
                                   i8* xq, float* xds) {
    __shared__ float sh[32];
    size_t at = (size_t)blockIdx.x * width;
    float *xr = x + at, *orow = out + at;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = xr[i];
        if (d) {
            v += d[at + i];
            xr[i] = v;
        }
        ss += v * v;
    }
    ss = block_sum(ss, sh);
    float inv = 1.0f / sqrtf(ss / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = w[i] * (xr[i] * inv);
        orow[i] = v;
        float amax = warp_max(fabsf(v));
        float dq = amax / 127.0f;
        int q = amax == 0.0f ? 0 : __float2int_rn(v / dq);
        xq[at + i] = (i8)q;
        float sum = warp_sum((float)q);
        if ((threadIdx.x & 31) == 0) {
            size_t blk = (at + i) >> 5;
            xds[2 * blk] = dq;
            xds[2 * blk + 1] = dq * sum;
        }
    }
}

// Per-head RMSNorm then NeoX rotary embedding of q's and k's heads (`head`
// wide, t rows of q_heads and k_heads), in place, one block per head: q's
// heads first, then k's. As rms_norm_in_place then rope on each, in one
// launch instead of four.
extern "C" __global__ void qk_norm_rope(float* q, float* k, const float* wq, const float* wk,
                                        const float* cos_t, const float* sin_t, int head, int q_heads,
                                        int k_heads, int t, float eps) {
    int b = blockIdx.x, qn = t * q_heads;
    bool is_q = b < qn;
    int hb = is_q ? b : b - qn, heads = is_q ? q_heads : k_heads;
    int tok = hb / heads;
    float* r = (is_q ? q : k) + (size_t)hb * head;
    rms_row(r, r, is_q ? wq : wk, head, eps);
    __syncthreads();
    int half = head / 2;
    const float *c = cos_t + (size_t)tok * half, *s = sin_t + (size_t)tok * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x0 = r[i], x1 = r[i + half];
        r[i] = x0 * c[i] - x1 * s[i];
        r[i + half] = x1 * c[i] + x0 * s[i];
    }
}

// The first `width` values of row blockIdx.x (rows `stride` apart), in place.
extern "C" __global__ void rms_norm_in_place(float* x, const float* w, int width, int stride,
                                             float eps) {
    float* r = x + (size_t)blockIdx.x * stride;
    rms_row(r, r, w, width, eps);
}

// Rotary embedding in place over `t` rows `width` wide of heads `head`
// wide, from element `skip` of each head; `cos`/`sin` hold `half` values
// per row. NeoX pairs (i, i + half) or interleaved pairs (2i, 2i + 1).
// One thread per pair.
extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, int t, int width,
                                int head, int skip, int interleaved) {
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
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
}

// y = the sum of `splits` parts of n values each, in part order (a split
// product's partial sums: the same order every run).
extern "C" __global__ void sum_parts(const float* parts, float* y, u64 n, int splits) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.0f;
    for (int z = 0; z < splits; z++) s += parts[(size_t)z * n + i];
    y[i] = s;
}

// y += x.
extern "C" __global__ void add(float* y, const float* x, u64 n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// row added to every `width`-wide row of y (a bias).
extern "C" __global__ void add_rows(float* y, const float* row, u64 n, int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += row[i % width];
}

extern "C" __global__ void clamp(float* x, u64 n, float limit) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = fminf(fmaxf(x[i], -limit), limit);
}

// y[tok] += sigmoid(g[tok]) * x[tok], rows `width` wide (Qwen2-MoE's gated
// shared expert).
extern "C" __global__ void gated_add(float* y, const float* x, const float* g, u64 n, int width) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 1.0f / (1.0f + expf(-g[i / width]));
    y[i] += s * x[i];
}

// Row r of out is row order[r] / k of x: a layer's (token, slot) pairs in
// expert order. Rows past x's `rows` (a bad order) are left alone.
extern "C" __global__ void gather(const float* x, const u32* order, int k, int width, int rows,
                                  float* out, u64 n) {
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
