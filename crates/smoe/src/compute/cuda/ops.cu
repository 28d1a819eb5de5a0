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
