// Shared by every kernel file; the Rust side concatenates the sources into
// one NVRTC program. NVRTC has no <cstdint>, so the integer types are ours.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Below any real score and finite, so that NEG - NEG is 0, not NaN (as in
// the CPU attention kernel).
#define NEG (-1e30f)
#define FULL_MASK 0xffffffffu
// NVRTC has no <cmath> either.
#define INF __int_as_float(0x7f800000)

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Every GGML block is 2-byte aligned (its size is even and rows start at
// whole blocks), so its f16 scales load as one u16.
__device__ __forceinline__ float ld_f16(const u8* p) {
    return f16_to_f32(*(const u16*)p);
}

// Programmatic dependent launch: every kernel starts here. Launched with
// the programmatic-serialization attribute (sm_90 on), a kernel's blocks
// are placed while the one before it on the stream still runs and wait
// here until that one's writes are visible, rather than the kernel being
// launched only once the one before is done (about 1.5 us a kernel between
// a decode step's ~100 small ones). Past the wait, a block lets the next
// kernel be placed in turn: one kernel ahead at most, so that waiting
// blocks never crowd out running ones. Both return at once for a kernel
// launched the ordinary way.
__device__ __forceinline__ void grid_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// A thread's place in its block and the block's threads, for blocks of
// any shape (`router_route`'s are a matrix product's (32, warps)).
__device__ __forceinline__ int flat_tid() { return threadIdx.y * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int flat_threads() { return blockDim.x * blockDim.y; }

// Sum over the block, returned to every thread. `sh` holds 32 floats; the
// block's threads are a multiple of 32.
__device__ float block_sum(float v, float* sh) {
    int tid = flat_tid(), lane = tid & 31, warp = tid >> 5, nw = flat_threads() >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* sh) {
    int tid = flat_tid(), lane = tid & 31, warp = tid >> 5, nw = flat_threads() >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : NEG;
    return warp_max(v);
}
