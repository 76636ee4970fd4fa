// Lever 4 (issue 32): fused group norm (+ SiLU) and GEGLU for f32, f16 and bf16 data, every sum
// and every product in f32. Compiled to PTX by build.rs under the `cuda` feature only; launched by
// src/kernels/cuda/fused.rs.
//
// Group norm, two launches in place of candle's nine (reshape/to_dtype, mean, sub, sqr, mean,
// add+sqrt, div, to_dtype, mul, add, then silu): each (batch, group) is split into `chunks` chunks
// so that even the VAE's 32 groups of a million values fill the card;
//   1. gn_stats: each block reduces its chunk to (mean, M2, count) with Welford's update per
//      thread and Chan et al.'s pairwise merge across threads (no sum-of-squares cancellation);
//   2. gn_apply: each block merges its group's chunk partials (at most 64), then writes
//      (x - mean) * rstd * weight[c] + bias[c], then SiLU when asked.
// GEGLU: out[r, j] = x[r, j] * gelu_erf(x[r, hidden + j]), one pass in place of candle's chunk,
// copy, gelu and product.

#ifdef SDFIX_HOST_EMULATION
#include "emulation.h"  // tests/cuda_emulation: this file run on the CPU
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#endif

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Chan et al.'s merge of (mean_b, m2_b, n_b) into (mean, m2, n).
__device__ __forceinline__ void merge(float &mean, float &m2, float &n, float mean_b, float m2_b, float n_b) {
  if (n_b == 0.0f) return;
  float total = n + n_b;
  float delta = mean_b - mean;
  float frac = n_b / total;
  mean += delta * frac;
  m2 += m2_b + delta * delta * n * frac;
  n = total;
}

constexpr int THREADS = 256;

// One block per (chunk, batch * groups + group): partials[3 * (group_index * chunks + chunk)].
template <typename T>
__device__ void gn_stats(const T *x, float *partials, int64_t group_len, int64_t chunk_len) {
  const int64_t chunk = blockIdx.x, chunks = gridDim.x, group_index = blockIdx.y;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min(begin + chunk_len, group_len);
  const T *base = x + group_index * group_len;
  float mean = 0.0f, m2 = 0.0f, n = 0.0f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = to_f(base[i]);
    n += 1.0f;
    float delta = v - mean;
    mean += delta / n;
    m2 += delta * (v - mean);
  }
  // Warp merge, then one value per warp through shared memory.
  for (int offset = 16; offset > 0; offset >>= 1) {
    float mean_b = __shfl_down_sync(0xffffffff, mean, offset);
    float m2_b = __shfl_down_sync(0xffffffff, m2, offset);
    float n_b = __shfl_down_sync(0xffffffff, n, offset);
    merge(mean, m2, n, mean_b, m2_b, n_b);
  }
  __shared__ float shared[3][THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared[0][warp] = mean;
    shared[1][warp] = m2;
    shared[2][warp] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) merge(mean, m2, n, shared[0][w], shared[1][w], shared[2][w]);
    float *out = partials + 3 * (group_index * chunks + chunk);
    out[0] = mean;
    out[1] = m2;
    out[2] = n;
  }
}

template <typename T>
__device__ void gn_apply(const T *x, const T *weight, const T *bias, const float *partials, T *y, int64_t group_len,
                         int64_t chunk_len, int64_t positions, int channels_per_group, int groups, float eps, int silu) {
  const int64_t chunk = blockIdx.x, chunks = gridDim.x, group_index = blockIdx.y;
  __shared__ float stats[2];
  if (threadIdx.x == 0) {
    const float *p = partials + 3 * group_index * chunks;
    float mean = p[0], m2 = p[1], n = p[2];
    for (int64_t c = 1; c < chunks; ++c) merge(mean, m2, n, p[3 * c], p[3 * c + 1], p[3 * c + 2]);
    float var = fmaxf(m2 / fmaxf(n, 1.0f), 0.0f);
    stats[0] = mean;
    stats[1] = rsqrtf(var + eps);
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const int first_channel = (int)(group_index % groups) * channels_per_group;
  const int64_t begin = chunk * chunk_len;
  const int64_t end = min(begin + chunk_len, group_len);
  const T *src = x + group_index * group_len;
  T *dst = y + group_index * group_len;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    int c = first_channel + (int)(i / positions);
    float scale = to_f(weight[c]) * rstd;
    float v = (to_f(src[i]) - mean) * scale + to_f(bias[c]);
    if (silu) v = v / (1.0f + expf(-v));
    dst[i] = from_f<T>(v);
  }
}

// out (rows, hidden) from x (rows, 2 * hidden): value * gelu_erf(gate), grid-stride.
template <typename T>
__device__ void geglu(const T *x, T *y, int64_t n, int64_t hidden) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t row = i / hidden, j = i - row * hidden;
    float value = to_f(x[row * 2 * hidden + j]);
    float gate = to_f(x[row * 2 * hidden + hidden + j]);
    y[i] = from_f<T>(value * 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f)));
  }
}

#define INSTANTIATE(T, SUFFIX)                                                                                       \
  extern "C" __global__ void sdfix_gn_stats_##SUFFIX(const T *x, float *partials, int64_t group_len,               \
                                                     int64_t chunk_len) {                                          \
    gn_stats<T>(x, partials, group_len, chunk_len);                                                                \
  }                                                                                                                \
  extern "C" __global__ void sdfix_gn_apply_##SUFFIX(const T *x, const T *weight, const T *bias,                   \
                                                     const float *partials, T *y, int64_t group_len,               \
                                                     int64_t chunk_len, int64_t positions, int channels_per_group, \
                                                     int groups, float eps, int silu) {                            \
    gn_apply<T>(x, weight, bias, partials, y, group_len, chunk_len, positions, channels_per_group, groups, eps,    \
                silu);                                                                                             \
  }                                                                                                                \
  extern "C" __global__ void sdfix_geglu_##SUFFIX(const T *x, T *y, int64_t n, int64_t hidden) {                  \
    geglu<T>(x, y, n, hidden);                                                                                     \
  }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
