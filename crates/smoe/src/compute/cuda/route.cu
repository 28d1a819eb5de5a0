// Routing: one token's router logits to its top-k (expert, weight) pairs,
// as compute/routing.rs does it (the CPU reference): softmax or sigmoid
// scores; the choice on scores plus the correction bias when there is one;
// with a group limit (DeepSeek's group-limited and noaux_tc top-k) only the
// best `topk_group` groups compete, a group scored by its best expert
// (softmax) or its best two summed (sigmoid), ties to the lower group; the
// top `k` win, ties to the lower expert; weights are the unbiased scores,
// optionally renormalised, then scaled.
//
// One block of 256 threads per token; up to ROUTE_MAX experts and
// ROUTE_MAX_GROUPS groups.

#define ROUTE_MAX 1024
#define ROUTE_MAX_GROUPS 64

extern "C" __global__ void route(const float* logits, const float* bias, int has_bias, int n, int k,
                                 int sigmoid, int n_group, int topk_group, int norm, float scale,
                                 u32* ids, float* weights) {
    __shared__ float score[ROUTE_MAX];
    __shared__ float choice[ROUTE_MAX];
    __shared__ float gscore[ROUTE_MAX_GROUPS];
    __shared__ int keep[ROUTE_MAX_GROUPS];
    __shared__ int chosen[ROUTE_MAX];
    __shared__ float sh[32];
    const float* l = logits + (size_t)blockIdx.x * n;

    if (sigmoid) {
        for (int e = threadIdx.x; e < n; e += blockDim.x) score[e] = 1.0f / (1.0f + expf(-l[e]));
    } else {
        float m = -INF;
        for (int e = threadIdx.x; e < n; e += blockDim.x) m = fmaxf(m, l[e]);
        m = block_max(m, sh);
        float s = 0.0f;
        for (int e = threadIdx.x; e < n; e += blockDim.x) {
            float p = expf(l[e] - m);
            score[e] = p;
            s += p;
        }
        float inv = 1.0f / block_sum(s, sh);
        for (int e = threadIdx.x; e < n; e += blockDim.x) score[e] *= inv;
    }
    for (int e = threadIdx.x; e < n; e += blockDim.x) choice[e] = score[e] + (has_bias ? bias[e] : 0.0f);
    __syncthreads();

    if (n_group > 0) {
        int per = n / n_group;
        if (threadIdx.x < n_group) {
            const float* c = choice + threadIdx.x * per;
            float a = -INF, b = -INF;
            for (int e = 0; e < per; e++) {
                if (c[e] > a) {
                    b = a;
                    a = c[e];
                } else if (c[e] > b) {
                    b = c[e];
                }
            }
            gscore[threadIdx.x] = sigmoid ? a + b : a;
            keep[threadIdx.x] = 0;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int r = 0; r < topk_group; r++) {
                int best = -1;
                for (int g = 0; g < n_group; g++) {
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                }
                keep[best] = 1;
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < n_group * per; e += blockDim.x) {
            if (!keep[e / per]) choice[e] = -INF;
        }
        __syncthreads();
    }

    // The top k by the first warp alone: a round is a scan of shared
    // memory (four scores a lane for 128 experts) and shuffles, where the
    // whole block's argmax cost a round three barriers (9 us a decode
    // step's routing for Qwen3's k = 8). The winners' ids stay in shared
    // memory and their sum in a register until the lanes write them all
    // at once: the weights read back from global memory to be normalised
    // were a load latency a pair.
    if (threadIdx.x >= 32) return;
    float total = 0.0f;
    for (int r = 0; r < k; r++) {
        float v = -INF;
        int i = 0x7fffffff;
        for (int e = threadIdx.x; e < n; e += 32) {
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
        if (threadIdx.x == 0) {
            chosen[r] = i;
            choice[i] = -INF;
        }
        total += score[i];
        __syncwarp();
    }
    // The weights as the CPU makes them: each score over the sum of the
    // chosen ones (added in the order chosen), then scaled.
    u32* out_ids = ids + (size_t)blockIdx.x * k;
    float* out_w = weights + (size_t)blockIdx.x * k;
    for (int r = threadIdx.x; r < k; r += 32) {
        int i = chosen[r];
        float w = score[i];
        if (norm) w /= total;
        if (scale != 1.0f) w *= scale;
        out_ids[r] = (u32)i;
        out_w[r] = w;
    }
}
