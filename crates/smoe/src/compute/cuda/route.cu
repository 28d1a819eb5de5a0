// Routing: one token's router logits to its top-k (expert, weight) pairs,
// as compute/routing.rs does it (the CPU reference): softmax or sigmoid
// scores; the choice on scores plus the correction bias when there is one;
// with a group limit (DeepSeek's group-limited and noaux_tc top-k) only the
// best `topk_group` groups compete, a group scored by its best expert
// (softmax) or its best two summed (sigmoid), ties to the lower group; the
// top `k` win, ties to the lower expert; weights are the unbiased scores,
// optionally renormalised, then scaled.
//
// One block per token (`route_block`, every thread of it, of any shape);
// up to ROUTE_MAX experts and ROUTE_MAX_GROUPS groups. The winners are
// found by rank, not by k rounds of argmax: each thread counts the
// experts that beat each of its own (a higher choice, or an equal one of
// a lower index: the same order k argmax rounds take them in), so the
// choice is one pass over shared memory instead of k dependent rounds of
// shuffles (a decode step's router and routing took 11 us a layer on the
// H100, more than the layer's q/k/v product). A decode step's router
// product can end in its routing (`router_route`).

#define ROUTE_MAX 1024
#define ROUTE_MAX_GROUPS 64

// Token row `l` routed by the calling block (every thread calls; blockDim.x
// * blockDim.y a multiple of 32) into out_ids / out_w (k each). The logits
// are read with `__ldcg` (through L2), as `router_route`'s last block reads
// logits the other blocks wrote.
__device__ void route_block(const float* l, const float* bias, int has_bias, int n, int k, int sigmoid,
                            int n_group, int topk_group, int norm, float scale, u32* out_ids, float* out_w) {
    __shared__ float score[ROUTE_MAX];
    __shared__ float choice[ROUTE_MAX];
    __shared__ float gscore[ROUTE_MAX_GROUPS];
    __shared__ int keep[ROUTE_MAX_GROUPS];
    __shared__ int chosen[ROUTE_MAX];
    __shared__ float red[32];
    __shared__ float total;
    int tid = threadIdx.y * blockDim.x + threadIdx.x, nt = blockDim.x * blockDim.y;

    if (sigmoid) {
        for (int e = tid; e < n; e += nt) score[e] = 1.0f / (1.0f + expf(-__ldcg(l + e)));
    } else {
        float m = -INF;
        for (int e = tid; e < n; e += nt) m = fmaxf(m, __ldcg(l + e));
        m = block_max(m, red);
        float s = 0.0f;
        for (int e = tid; e < n; e += nt) {
            float p = expf(__ldcg(l + e) - m);
            score[e] = p;
            s += p;
        }
        float inv = 1.0f / block_sum(s, red);
        for (int e = tid; e < n; e += nt) score[e] *= inv;
    }
    // A NaN choice would beat nothing and be beaten by nothing, so two
    // experts could share a rank: it ranks as the lowest score instead.
    for (int e = tid; e < n; e += nt) {
        float c = score[e] + (has_bias ? bias[e] : 0.0f);
        choice[e] = c == c ? c : -INF;
    }
    __syncthreads();

    if (n_group > 0) {
        int per = n / n_group;
        for (int g = tid; g < n_group; g += nt) {
            const float* c = choice + g * per;
            float a = -INF, b = -INF;
            for (int e = 0; e < per; e++) {
                if (c[e] > a) {
                    b = a;
                    a = c[e];
                } else if (c[e] > b) {
                    b = c[e];
                }
            }
            gscore[g] = sigmoid ? a + b : a;
        }
        __syncthreads();
        // The best topk_group groups by rank, ties to the lower group.
        for (int g = tid; g < n_group; g += nt) {
            float s = gscore[g];
            int rank = 0;
            for (int j = 0; j < n_group; j++) rank += gscore[j] > s || (gscore[j] == s && j < g);
            keep[g] = rank < topk_group;
        }
        __syncthreads();
        for (int e = tid; e < n_group * per; e += nt) {
            if (!keep[e / per]) choice[e] = -INF;
        }
        __syncthreads();
    }

    // Each expert's place in the choice order; the first k are chosen.
    for (int e = tid; e < n; e += nt) {
        float c = choice[e];
        int rank = 0;
#pragma unroll 8
        for (int j = 0; j < n; j++) rank += choice[j] > c || (choice[j] == c && j < e);
        if (rank < k) chosen[rank] = e;
    }
    __syncthreads();
    // The weights as the CPU makes them: each score over the sum of the
    // chosen ones (added in the order chosen), then scaled.
    if (tid == 0) {
        float s = 0.0f;
        for (int r = 0; r < k; r++) s += score[chosen[r]];
        total = s;
    }
    __syncthreads();
    for (int r = tid; r < k; r += nt) {
        int i = chosen[r];
        float w = score[i];
        if (norm) w /= total;
        if (scale != 1.0f) w *= scale;
        out_ids[r] = (u32)i;
        out_w[r] = w;
    }
    // The next token's call reuses the shared arrays.
    __syncthreads();
}

// Token blockIdx.x's routing; a block each.
extern "C" __global__ void route(const float* logits, const float* bias, int has_bias, int n, int k,
                                 int sigmoid, int n_group, int topk_group, int norm, float scale,
                                 u32* ids, float* weights) {
    grid_wait();
    size_t tok = blockIdx.x;
    route_block(logits + tok * n, bias, has_bias, n, k, sigmoid, n_group, topk_group, norm, scale,
                ids + tok * k, weights + tok * k);
}

// A few tokens' router product (as `matvec`: MV_ROWS rows a block, into
// `logits`) and their routing in one launch: the block that finishes its
// rows last (a count in `done`, left at zero again for the next launch,
// so a captured step replays) routes every token, a launch and its gap
// fewer a layer.
template <int T>
__device__ void router_route(const u8* w, u64 row_bytes, const float* x, float* logits, int n, int cols,
                             int t, const float* bias, int has_bias, int k, int sigmoid, int n_group,
                             int topk_group, int norm, float scale, u32* ids, float* weights, u32* done) {
    __shared__ bool last;
    matvec<T>(w, row_bytes, x, logits, n, cols, t);
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    for (int tok = 0; tok < t; tok++)
        route_block(logits + (size_t)tok * n, bias, has_bias, n, k, sigmoid, n_group, topk_group, norm,
                    scale, ids + (size_t)tok * k, weights + (size_t)tok * k);
    if (threadIdx.x == 0 && threadIdx.y == 0) *done = 0;
}

#define ROUTER_KERNEL(NAME, T)                                                                           \
    extern "C" __global__ void router_route_##NAME(                                                      \
        const u8* w, u64 row_bytes, const float* x, float* logits, int n, int cols, int t,               \
        const float* bias, int has_bias, int k, int sigmoid, int n_group, int topk_group, int norm,      \
        float scale, u32* ids, float* weights, u32* done) { grid_wait();                                 \
        router_route<T>(w, row_bytes, x, logits, n, cols, t, bias, has_bias, k, sigmoid, n_group,       \
                        topk_group, norm, scale, ids, weights, done);                                    \
    }

ROUTER_KERNEL(f32, T_F32)
ROUTER_KERNEL(f16, T_F16)
ROUTER_KERNEL(bf16, T_BF16)
