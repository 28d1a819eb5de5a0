// Causal (optionally sliding-window) attention of `t` new queries over a
// layer's cache, grouped-query: query head h reads KV head
// h / (n_heads / n_kv_heads). Keys and values are position-major, as the
// CPU cache keeps them: key p of KV head j at keys + p * k_stride +
// j * head_dim, its value at values + p * v_stride + j * v_dim (latent
// attention passes its latent as both).
//
// One block per (query head, token, split of the keys), ATT_WARPS warps.
// The query, scaled, sits in shared memory; warp w takes keys lo + w,
// lo + w + ATT_WARPS, ... of its split and keeps a FlashAttention-style
// online softmax (running max, sum and output, rescaled when the max
// grows); lane i holds output elements i, i + 32, ... The warps' partial
// results are merged at the end. A decode step has one token, so without
// splits its grid would be the 32 heads, a quarter of an H200's SMs, each
// walking hundreds of keys one dependent load after another (156 us a
// layer at 600 keys): split over the keys ("flash-decoding"), each block
// writes its unnormalized output with its max and sum, and the split that
// finishes last merges them (`combine_splits`; a counter per (head, token)
// in `done`, left at zero again for the next launch, so a captured step
// needs no second kernel). Prefill has blocks enough and
// runs unsplit, normalizing in place.
#define ATT_WARPS 8
#define ATT_MAX_HEAD 1024
#define ATT_MAX_V 512
#define ATT_V_PER_LANE (ATT_MAX_V / 32)
// Keys a warp of `attention` has in flight at once.
#define ATT_STEP 4

// The splits of `attention` for (head h, token tok) merged, by the block
// that finished last: out = sum_s o_s e^(m_s - m) / sum_s l_s e^(m_s - m),
// m the largest m_s.
__device__ void combine_splits(const float* parts, float* out, int n_heads, int v_dim, int splits, int h,
                               int tok) {
    const float* pr = parts + ((size_t)tok * n_heads + h) * splits * (v_dim + 2);
    float mx = NEG;
    for (int s = 0; s < splits; s++) mx = fmaxf(mx, pr[(size_t)s * (v_dim + 2)]);
    float total = 0.0f;
    for (int s = 0; s < splits; s++) {
        const float* ps = pr + (size_t)s * (v_dim + 2);
        total += ps[1] * expf(ps[0] - mx);
    }
    float* orow = out + ((size_t)tok * n_heads + h) * v_dim;
    for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float* ps = pr + (size_t)s * (v_dim + 2);
            acc += ps[2 + d] * expf(ps[0] - mx);
        }
        orow[d] = acc / total;
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention(const float* q, const float* keys, const float* values, float* out, float* parts,
              int n_heads, int n_kv_heads, int head_dim, int v_dim, int k_stride, int v_stride,
              float scale, int pos0, const u32* pos_at, int window, int splits, u32* done) {
    grid_wait();
    __shared__ float qs[ATT_MAX_HEAD];
    __shared__ float part_m[ATT_WARPS], part_l[ATT_WARPS];
    __shared__ float part_o[ATT_WARPS][ATT_MAX_V];
    int h = blockIdx.x, tok = blockIdx.y, split = blockIdx.z;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int kvh = h / (n_heads / n_kv_heads);
    // A captured decode step reads its position from the device, so that
    // the same graph replays at every position.
    if (pos_at) pos0 = (int)*pos_at;
    int end = pos0 + tok + 1;
    int begin = window > 0 && end > window ? end - window : 0;
    int chunk = (end - begin + splits - 1) / splits;
    int lo = begin + split * chunk, hi = min(end, lo + chunk);

    const float* qr = q + ((size_t)tok * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = qr[d] * scale;
    __syncthreads();

    float m = NEG, l = 0.0f;
    float o[ATT_V_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_V_PER_LANE; i++) o[i] = 0.0f;
    const float* kb = keys + (size_t)kvh * head_dim;
    const float* vb = values + (size_t)kvh * v_dim;
    // A warp takes ATT_STEP of its keys a turn (lo + warp, + ATT_WARPS, ...),
    // their loads issued together: one key a turn waited on a key's loads,
    // then its value's, per key (12 us a layer at 80 keys as at 600: the
    // latency of one warp's walk, not bandwidth).
    for (int p0 = lo + warp; p0 < hi; p0 += ATT_WARPS * ATT_STEP) {
        const float* kr[ATT_STEP];
        bool in[ATT_STEP];
        float s[ATT_STEP];
#pragma unroll
        for (int j = 0; j < ATT_STEP; j++) {
            int p = p0 + j * ATT_WARPS;
            in[j] = p < hi;
            kr[j] = kb + (size_t)(in[j] ? p : p0) * k_stride;
            s[j] = 0.0f;
        }
#pragma unroll 4
        for (int d = lane; d < head_dim; d += 32) {
            float qd = qs[d];
#pragma unroll
            for (int j = 0; j < ATT_STEP; j++)
                if (in[j]) s[j] += qd * kr[j][d];
        }
        float mn = m;
#pragma unroll
        for (int j = 0; j < ATT_STEP; j++) {
            s[j] = warp_sum(s[j]);
            if (in[j]) mn = fmaxf(mn, s[j]);
        }
        float corr = expf(m - mn), e[ATT_STEP];
        const float* vr[ATT_STEP];
#pragma unroll
        for (int j = 0; j < ATT_STEP; j++) {
            e[j] = in[j] ? expf(s[j] - mn) : 0.0f;
            vr[j] = vb + (size_t)(in[j] ? p0 + j * ATT_WARPS : p0) * v_stride;
        }
        l *= corr;
#pragma unroll
        for (int j = 0; j < ATT_STEP; j++) l += e[j];
#pragma unroll
        for (int i = 0; i < ATT_V_PER_LANE; i++) {
            int d = lane + 32 * i;
            if (d < v_dim) {
                float acc = o[i] * corr;
#pragma unroll
                for (int j = 0; j < ATT_STEP; j++)
                    if (in[j]) acc += e[j] * vr[j][d];
                o[i] = acc;
            }
        }
        m = mn;
    }
    if (lane == 0) {
        part_m[warp] = m;
        part_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATT_V_PER_LANE; i++) {
        int d = lane + 32 * i;
        if (d < v_dim) part_o[warp][d] = o[i];
    }
    __syncthreads();
    float mx = NEG;
    for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, part_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) total += part_l[w] * expf(part_m[w] - mx);
    if (splits == 1) {
        float* orow = out + ((size_t)tok * n_heads + h) * v_dim;
        for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
            float acc = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) acc += part_o[w][d] * expf(part_m[w] - mx);
            orow[d] = acc / total;
        }
        return;
    }
    // This split's max, sum and unnormalized output; an empty split (more
    // splits than keys) writes NEG, 0 and zeros, which weigh nothing.
    float* pr = parts + (((size_t)tok * n_heads + h) * splits + split) * (v_dim + 2);
    if (threadIdx.x == 0) {
        pr[0] = mx;
        pr[1] = total;
    }
    for (int d = threadIdx.x; d < v_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) acc += part_o[w][d] * expf(part_m[w] - mx);
        pr[2 + d] = acc;
    }
    // The last split of (h, tok) to get here merges them all: its own
    // writes and every other split's are visible once the counter says
    // the others are done (each fenced before counting).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        u32* c = done + (size_t)tok * n_heads + h;
        last = atomicAdd(c, 1u) == (u32)splits - 1;
        if (last) *c = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    combine_splits(parts, out, n_heads, v_dim, splits, h, tok);
}

// Decode's attention (one query a head) with the heads of a KV group
// together: block (KV head j, split) takes every query head reading j, so
// each key and value of its split is loaded once for the group, 16 bytes a
// lane, the key and the value in the same turn. `attention` loads them once
// per query head (8 times for Qwen3's 32 over 4) and waits on a key's
// score before loading its value: 22.9 us a layer at 600 keys on the H100
// (ncu), where the bytes take about one.
//
// GM (4, 8 or 16) bounds the group; heads past it have zero queries and
// are never written, so every loop is unrolled and branch-free: a turn's
// GM x STEP scores reduce in independent shuffles and their softmax
// updates overlap (a first version walked heads one after another behind
// a branch: 17 us at 600 keys, slower than `attention`).
//
// A split takes at least GQA_MIN_KEYS keys, so at a short context only the
// first few splits of the grid have keys and the rest leave at once: the
// grid is sized once for the cache's capacity (a captured step replays at
// every position) and the merge reads only the splits used. Lane i holds
// dims 4i..4i+3 (heads and values at most 128 wide). The block merges its
// warps eight heads at a time, a warp a head, into its split's (max, sum,
// output); the split finishing last merges the splits, each head's weights
// computed once by one warp. With `xq`, that block also rounds the output
// to int8 per 32-block as `quantize_q8` would (the output projection's
// int8 input), one launch for two.
#define GQA_MAX_SPLITS 64
#define GQA_MIN_KEYS 32
template <int GM>
__device__ void attention_group(const float* q, const float* keys, const float* values, float* out, float* parts,
                                int n_heads, int n_kv_heads, int head_dim, int v_dim, int k_stride, int v_stride,
                                float scale, int pos0, const u32* pos_at, int window, u32* done, i8* xq,
                                float* xds) {
    // Keys a warp loads at once: GM x STEP scores in flight.
    constexpr int STEP = GM >= 16 ? 2 : 32 / GM;
    constexpr int MERGE = GM < ATT_WARPS ? GM : ATT_WARPS;
    __shared__ float4 qs[GM][32];
    __shared__ float4 wo[ATT_WARPS][MERGE][32];
    __shared__ float wm[ATT_WARPS][MERGE], wl[ATT_WARPS][MERGE];
    __shared__ float sw[GM][GQA_MAX_SPLITS];
    __shared__ bool last;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    int j = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = n_heads / n_kv_heads;
    if (pos_at) pos0 = (int)*pos_at;
    int end = pos0 + 1;
    int begin = window > 0 && end > window ? end - window : 0;
    int chunk = max(GQA_MIN_KEYS, (end - begin + splits - 1) / splits);
    int used = (end - begin + chunk - 1) / chunk;
    if (split >= used) return;
    int lo = begin + split * chunk, hi = min(end, lo + chunk);
    // Row stride of `parts`: max, sum, two unused, the output (16-byte aligned).
    int pw = v_dim + 4;

    for (int e = threadIdx.x; e < GM * 32; e += blockDim.x) {
        int g = e >> 5, d = (e & 31) * 4;
        float4 x = zero;
        if (g < group && d < head_dim) {
            x = *(const float4*)(q + (size_t)(j * group + g) * head_dim + d);
            x = make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
        }
        qs[g][e & 31] = x;
    }
    __syncthreads();

    float m[GM], l[GM];
    float4 o[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        m[g] = NEG;
        l[g] = 0.0f;
        o[g] = zero;
    }
    const float* kb = keys + (size_t)j * head_dim + 4 * lane;
    const float* vb = values + (size_t)j * v_dim + 4 * lane;
    bool kin = 4 * lane < head_dim, vin = 4 * lane < v_dim;
    for (int p0 = lo + warp; p0 < hi; p0 += ATT_WARPS * STEP) {
        float4 k4[STEP], v4[STEP];
#pragma unroll
        for (int s = 0; s < STEP; s++) {
            int p = p0 + s * ATT_WARPS;
            k4[s] = p < hi && kin ? *(const float4*)(kb + (size_t)p * k_stride) : zero;
            v4[s] = p < hi && vin ? *(const float4*)(vb + (size_t)p * v_stride) : zero;
        }
        float sc[GM][STEP];
#pragma unroll
        for (int g = 0; g < GM; g++) {
            float4 qv = qs[g][lane];
#pragma unroll
            for (int s = 0; s < STEP; s++)
                sc[g][s] = qv.x * k4[s].x + qv.y * k4[s].y + qv.z * k4[s].z + qv.w * k4[s].w;
        }
#pragma unroll
        for (int o_ = 16; o_ > 0; o_ >>= 1)
#pragma unroll
            for (int g = 0; g < GM; g++)
#pragma unroll
                for (int s = 0; s < STEP; s++) sc[g][s] += __shfl_xor_sync(FULL_MASK, sc[g][s], o_);
#pragma unroll
        for (int g = 0; g < GM; g++) {
            float mn = m[g];
#pragma unroll
            for (int s = 0; s < STEP; s++)
                if (p0 + s * ATT_WARPS < hi) mn = fmaxf(mn, sc[g][s]);
            float corr = expf(m[g] - mn);
            float4 acc = make_float4(o[g].x * corr, o[g].y * corr, o[g].z * corr, o[g].w * corr);
            float sum = l[g] * corr;
#pragma unroll
            for (int s = 0; s < STEP; s++) {
                float e = p0 + s * ATT_WARPS < hi ? expf(sc[g][s] - mn) : 0.0f;
                sum += e;
                acc = make_float4(acc.x + e * v4[s].x, acc.y + e * v4[s].y, acc.z + e * v4[s].z,
                                  acc.w + e * v4[s].w);
            }
            o[g] = acc;
            l[g] = sum;
            m[g] = mn;
        }
    }

    // The warps merged MERGE heads at a time, warp w taking head g0 + w,
    // into this split's row of `parts`.
#pragma unroll
    for (int g0 = 0; g0 < GM; g0 += MERGE) {
#pragma unroll
        for (int i = 0; i < MERGE; i++) {
            if (lane == 0) {
                wm[warp][i] = m[g0 + i];
                wl[warp][i] = l[g0 + i];
            }
            wo[warp][i][lane] = o[g0 + i];
        }
        __syncthreads();
        int g = g0 + warp;
        if (warp < MERGE && g < group) {
            float mx = NEG;
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, wm[w][warp]);
            float total = 0.0f;
            float4 acc = zero;
#pragma unroll
            for (int w = 0; w < ATT_WARPS; w++) {
                float c = expf(wm[w][warp] - mx);
                float4 x = wo[w][warp][lane];
                total += wl[w][warp] * c;
                acc = make_float4(acc.x + c * x.x, acc.y + c * x.y, acc.z + c * x.z, acc.w + c * x.w);
            }
            float* pr = parts + ((size_t)(j * group + g) * splits + split) * pw;
            if (lane == 0) {
                pr[0] = mx;
                pr[1] = total;
            }
            if (vin) *(float4*)(pr + 4 + 4 * lane) = acc;
        }
        __syncthreads();
    }

    // The last split of KV head j merges them all (see `attention`).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(done + j, 1u) == (u32)used - 1;
        if (last) done[j] = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Each head's weight per split, e^(m_s - m) / sum_s l_s e^(m_s - m).
    for (int g = warp; g < group; g += ATT_WARPS) {
        const float* pg = parts + (size_t)(j * group + g) * splits * pw;
        float mx = NEG;
        for (int s = lane; s < used; s += 32) mx = fmaxf(mx, pg[(size_t)s * pw]);
        mx = warp_max(mx);
        float total = 0.0f;
        for (int s = lane; s < used; s += 32) total += pg[(size_t)s * pw + 1] * expf(pg[(size_t)s * pw] - mx);
        total = warp_sum(total);
        for (int s = lane; s < used; s += 32) sw[g][s] = expf(pg[(size_t)s * pw] - mx) / total;
    }
    __syncthreads();
    // Warp-uniform: group * 32 is a whole number of warps.
    for (int e = threadIdx.x; e < group * 32; e += blockDim.x) {
        int g = e >> 5, h = j * group + g;
        const float* pg = parts + (size_t)h * splits * pw + 4 + 4 * lane;
        float4 acc = zero;
        if (vin) {
#pragma unroll 8
            for (int s = 0; s < used; s++) {
                float c = sw[g][s];
                float4 x = *(const float4*)(pg + (size_t)s * pw);
                acc = make_float4(acc.x + c * x.x, acc.y + c * x.y, acc.z + c * x.z, acc.w + c * x.w);
            }
            *(float4*)(out + (size_t)h * v_dim + 4 * lane) = acc;
        }
        // v_dim a multiple of 32: eight lanes' 32 values are all in or all out.
        if (xq) round_q8x4(acc, (size_t)h * v_dim + 4 * lane, vin, xq, xds);
    }
}

#define ATTENTION_GROUP(GM)                                                                                   \
    extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32) attention_group##GM(                        \
        const float* q, const float* keys, const float* values, float* out, float* parts, int n_heads,       \
        int n_kv_heads, int head_dim, int v_dim, int k_stride, int v_stride, float scale, int pos0,         \
        const u32* pos_at, int window, u32* done, i8* xq, float* xds) { grid_wait();                        \
        attention_group<GM>(q, keys, values, out, parts, n_heads, n_kv_heads, head_dim, v_dim, k_stride,     \
                            v_stride, scale, pos0, pos_at, window, done, xq, xds);                            \
    }
ATTENTION_GROUP(4)
ATTENTION_GROUP(8)
ATTENTION_GROUP(16)

// A prompt's attention with its keys and values read once per block
// rather than once per query (`attention` walks every key of a layer's
// cache for each (head, token)). Block (KV head j, tile): query rows R =
// tile * PR_ROWS + r of the enumeration R -> (token R / group, head
// j * group + R % group), PR_QR rows per warp; keys and values through
// shared memory PR_KEYS at a time, each row over its own causal (and
// window) range, the same online softmax as `attention` a step of keys at
// a time (FlashAttention's). The keys go across the lanes: lane i scores
// key i of the step against each of its warp's rows (the rows' queries
// read from shared memory, the same address for every lane), so a step
// takes two reductions a row where the first version, lanes across the
// head's dimensions, took a five-shuffle sum and two exponentials a key
// a row (3.7 ms of a 512-token prefill's 20.3 ms of kernels on the H100).
// Lane i then holds dims 4i..4i+3 of each row's output (head_dim and v_dim
// at most 128, multiples of 4), the step's weights read back from shared
// memory.
#define PR_WARPS 4
#define PR_QR 4
#define PR_ROWS (PR_WARPS * PR_QR)
#define PR_KEYS 32
extern "C" __global__ void __launch_bounds__(PR_WARPS * 32)
    attention_rows(const float* q, const float* keys, const float* values, float* out, int n_heads,
                   int n_kv_heads, int head_dim, int v_dim, int k_stride, int v_stride, float scale, int pos0,
                   const u32* pos_at, int window, int t) {
    grid_wait();
    // A key's row padded by 16 bytes: lane i reading row i, chunk c, is in
    // bank group (i + c) % 8, so each quarter-warp's eight loads differ.
    __shared__ float4 ks[PR_KEYS][33], vs[PR_KEYS][32], qs[PR_ROWS][32];
    __shared__ float es[PR_WARPS][PR_QR][PR_KEYS];
    int j = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = n_heads / n_kv_heads, chunks = head_dim / 4;
    if (pos_at) pos0 = (int)*pos_at;
    int first = blockIdx.y * PR_ROWS, rows = t * group;
    // The block's keys: from the first row's range start to the last row's end.
    int tok_lo = first / group, tok_hi = (min(rows, first + PR_ROWS) - 1) / group;
    int end_hi = pos0 + tok_hi + 1, end_lo = pos0 + tok_lo + 1;
    int begin = window > 0 && end_lo > window ? end_lo - window : 0;
    const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    // The tile's queries, scaled (zero past the rows and head_dim).
    for (int e = threadIdx.x; e < PR_ROWS * 32; e += blockDim.x) {
        int rr = e >> 5, c = e & 31, r = first + rr;
        float4 x = zero;
        if (r < rows && c < chunks) {
            int tok = r / group, h = j * group + r % group;
            x = *(const float4*)(q + ((size_t)tok * n_heads + h) * head_dim + 4 * c);
            x = make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
        }
        qs[rr][c] = x;
    }

    float4 o[PR_QR];
    float m[PR_QR], l[PR_QR];
    int lo[PR_QR], hi[PR_QR], warp_lo = 0x7fffffff, warp_hi = 0;
#pragma unroll
    for (int i = 0; i < PR_QR; i++) {
        int r = first + warp * PR_QR + i, tok = r / group;
        o[i] = zero;
        m[i] = NEG;
        l[i] = 0.0f;
        lo[i] = 0;
        hi[i] = 0;
        if (r < rows) {
            hi[i] = pos0 + tok + 1;
            lo[i] = window > 0 && hi[i] > window ? hi[i] - window : 0;
            warp_lo = min(warp_lo, lo[i]);
            warp_hi = max(warp_hi, hi[i]);
        }
    }
    const float* kb = keys + (size_t)j * head_dim;
    const float* vb = values + (size_t)j * v_dim;
    for (int p0 = begin; p0 < end_hi; p0 += PR_KEYS) {
        // Also orders the queries' writes before their first reads.
        __syncthreads();
        for (int e = threadIdx.x; e < PR_KEYS * 32; e += blockDim.x) {
            int kk = e >> 5, c = e & 31, p = p0 + kk;
            bool in = p < end_hi;
            ks[kk][c] = in && 4 * c < head_dim ? *(const float4*)(kb + (size_t)p * k_stride + 4 * c) : zero;
            vs[kk][c] = in && 4 * c < v_dim ? *(const float4*)(vb + (size_t)p * v_stride + 4 * c) : zero;
        }
        __syncthreads();
        // No key of this step in any of the warp's rows (the same for the
        // whole warp; every warp still reaches the barriers above).
        if (p0 >= warp_hi || p0 + PR_KEYS <= warp_lo) continue;
        float s[PR_QR];
#pragma unroll
        for (int i = 0; i < PR_QR; i++) s[i] = 0.0f;
#pragma unroll 8
        for (int c = 0; c < chunks; c++) {
            float4 k4 = ks[lane][c];
#pragma unroll
            for (int i = 0; i < PR_QR; i++) {
                float4 q4 = qs[warp * PR_QR + i][c];
                s[i] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
            }
        }
        int p = p0 + lane;
#pragma unroll
        for (int i = 0; i < PR_QR; i++) {
            bool in = p >= lo[i] && p < hi[i];
            float mn = fmaxf(m[i], warp_max(in ? s[i] : -INF));
            float e = in ? expf(s[i] - mn) : 0.0f;
            float corr = expf(m[i] - mn);
            l[i] = l[i] * corr + warp_sum(e);
            o[i] = make_float4(o[i].x * corr, o[i].y * corr, o[i].z * corr, o[i].w * corr);
            m[i] = mn;
            es[warp][i][lane] = e;
        }
        __syncwarp();
        int n = min(PR_KEYS, end_hi - p0);
        for (int kk = 0; kk < n; kk++) {
            float4 v4 = vs[kk][lane];
#pragma unroll
            for (int i = 0; i < PR_QR; i++) {
                float e = es[warp][i][kk];
                o[i].x += e * v4.x;
                o[i].y += e * v4.y;
                o[i].z += e * v4.z;
                o[i].w += e * v4.w;
            }
        }
        // The weights are rewritten next step.
        __syncwarp();
    }
#pragma unroll
    for (int i = 0; i < PR_QR; i++) {
        int r = first + warp * PR_QR + i, tok = r / group, h = j * group + r % group;
        if (r < rows && 4 * lane < v_dim) {
            float inv = 1.0f / l[i];
            *(float4*)(out + ((size_t)tok * n_heads + h) * v_dim + 4 * lane) =
                make_float4(o[i].x * inv, o[i].y * inv, o[i].z * inv, o[i].w * inv);
        }
    }
}


// `t` rows of new keys (k, [t, kw]) and values (v, [t, vw]; none when vw
// is 0) into a layer's cache at the position the device holds (*pos_at),
// as `attention` reads it: the write is the same launch at every position.
extern "C" __global__ void kv_write(const float* k, float* keys, int kw, const float* v, float* values, int vw,
                                   int t, const u32* pos_at) {
    grid_wait();
    u64 pos = *pos_at, nk = (u64)t * kw, n = nk + (u64)t * vw;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        if (i < nk)
            keys[pos * kw + i] = k[i];
        else
            values[pos * vw + (i - nk)] = v[i - nk];
    }
}
