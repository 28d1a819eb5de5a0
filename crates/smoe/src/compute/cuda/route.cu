// Routing: one token's router logits to its top-k (expert, weight) pairs,
// as compute/routing.rs does it (the CPU reference): softmax or sigmoid
// scores; the choice on scores plus the correction bias when there is one;
// with a group limit (DeepSeek's group-limited and noaux_tc top-k) only the
// best `topk_group` groups compete, a group scored by its best expert
// (softmax) or its best two summed (sigmoid), ties to the lower group; the
// top `k` win, ties to the lower expert; weights are the unbiased scores,
// optionally renormalised, then scaled.
//
// One warp per token (`route_row`); up to ROUTE_MAX experts and
// ROUTE_MAX_GROUPS groups. A token's 128 scores are four a lane: the
// warp's shuffles do what block barriers did, and a decode step's router
// product can end in its routing (`router_route`).

#define ROUTE_MAX 1024
#define ROUTE_MAX_GROUPS 64

// Token row `l` routed by the calling warp (lane threadIdx.x % 32; no other
// warp of the block may call it) into out_ids / out_w (k each). The logits
// are read with `__ldcg` (through L2), as `router_route`'s last block reads
// logits the other blocks wrote.
__device__ void route_row(const float* l, const float* bias, int has_bias, int n, int k, int sigmoid,
                          int n_group, int topk_group, int norm, float scale, u32* out_ids, float* out_w) {
    __shared__ float score[ROUTE_MAX];
    __shared__ float choice[ROUTE_MAX];
    __shared__ float gscore[ROUTE_MAX_GROUPS];
    __shared__ int keep[ROUTE_MAX_GROUPS];
    __shared__ int chosen[ROUTE_MAX];
    int lane = threadIdx.x & 31;

    if (sigmoid) {
        for (int e = lane; e < n; e += 32) score[e] = 1.0f / (1.0f + expf(-__ldcg(l + e)));
    } else {
        float m = -INF;
        for (int e = lane; e < n; e += 32) m = fmaxf(m, __ldcg(l + e));
        m = warp_max(m);
        float s = 0.0f;
        for (int e = lane; e < n; e += 32) {
            float p = expf(__ldcg(l + e) - m);
            score[e] = p;
            s += p;
        }
        float inv = 1.0f / warp_sum(s);
        for (int e = lane; e < n; e += 32) score[e] *= inv;
    }
    for (int e = lane; e < n; e += 32) choice[e] = score[e] + (has_bias ? bias[e] : 0.0f);
    __syncwarp();

    if (n_group > 0) {
        int per = n / n_group;
        for (int g = lane; g < n_group; g += 32) {
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
            keep[g] = 0;
        }
        __syncwarp();
        if (lane == 0) {
            for (int r = 0; r < topk_group; r++) {
                int best = -1;
                for (int g = 0; g < n_group; g++) {
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                }
                keep[best] = 1;
            }
        }
        __syncwarp();
        for (int e = lane; e < n_group * per; e += 32) {
            if (!keep[e / per]) choice[e] = -INF;
        }
        __syncwarp();
    }

    // The top k: a round is a scan of shared memory (four scores a lane
    // for 128 experts) and shuffles, where a whole block's argmax cost a
    // round three barriers (9 us a decode step's routing for Qwen3's
    // k = 8). The winners' ids stay in shared memory and their sum in a
    // register until the lanes write them all at once: the weights read
    // back from global memory to be normalised were a load latency a pair.
    float total = 0.0f;
    for (int r = 0; r < k; r++) {
        float v = -INF;
        int i = 0x7fffffff;
        for (int e = lane; e < n; e += 32) {
            if (choice[e] > v || (choice[e] == v && e < i)) {
                v = choice[e];
                i = e;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(FULL_MASK, v, o);
            int oi = __shfl_xor_sync(FULL_MASK, i, o);
            if (ov > v || (ov == v && oi < i)) {
                v = ov;
                i = oi;
            }
        }
        // Only NaN scores leave no candidate: expert 0, as the CPU's
        // scan from the first expert picks then.
        if (i >= n) i = 0;
        if (lane == 0) {
            chosen[r] = i;
            choice[i] = -INF;
        }
        total += score[i];
        __syncwarp();
    }
    // The weights as the CPU makes them: each score over the sum of the
    // chosen ones (added in the order chosen), then scaled.
    for (int r = lane; r < k; r += 32) {
        int i = chosen[r];
        float w = score[i];
        if (norm) w /= total;
        if (scale != 1.0f) w *= scale;
        out_ids[r] = (u32)i;
        out_w[r] = w;
    }
    __syncwarp();
}

// Token blockIdx.x's routing; one warp a block.
extern "C" __global__ void route(const float* logits, const float* bias, int has_bias, int n, int k,
                                 int sigmoid, int n_group, int topk_group, int norm, float scale,
                                 u32* ids, float* weights) {
    grid_wait();
    size_t tok = blockIdx.x;
    route_row(logits + tok * n, bias, has_bias, n, k, sigmoid, n_group, topk_group, norm, scale,
              ids + tok * k, weights + tok * k);
}

// A few tokens' router product (as `matvec`: MV_ROWS rows a block, into
// `logits`) and their routing in one launch: the block that finishes its
// rows last (a count in `done`, left at zero again for the next launch,
// so a captured step replays) routes every token with its first warp, a
// launch and its gap fewer a layer.
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
    if (!last || threadIdx.y != 0) return;
    for (int tok = 0; tok < t; tok++)
        route_row(logits + (size_t)tok * n, bias, has_bias, n, k, sigmoid, n_group, topk_group, norm, scale,
                  ids + (size_t)tok * k, weights + (size_t)tok * k);
    if (threadIdx.x == 0) *done = 0;
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
