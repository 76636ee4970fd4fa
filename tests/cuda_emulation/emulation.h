// Just enough of CUDA to run our kernels (src/kernels/cuda/*.cu) on the CPU, so that their
// indexing, tiling and synchronisation are tested without a GPU (tests/cuda_emulation.rs). A
// block runs as one host thread per CUDA thread, blocks one after another (so `__shared__`
// statics are per block); barriers are real barriers; warp shuffles exchange through memory.
//
// WMMA is emulated by its meaning, not its register layout (which CUDA leaves opaque): every lane
// holds the whole 16x16 tile, loads read it all, `mma_sync` computes it in f32, and only lane 0
// stores, so a lane that reads a stored tile before `__syncwarp` races as it would on a GPU.
// `__half` is the compiler's `_Float16` and `__nv_bfloat16` rounds to nearest even, as CUDA's
// conversions do. Not emulated: anything our kernels do not use.

#ifndef SDFIX_CUDA_EMULATION_H
#define SDFIX_CUDA_EMULATION_H

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using __half = _Float16;
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half(float x) { return (__half)x; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  uint32_t u = (uint32_t)x.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {(uint16_t)0x7fc0};
  u += 0x7fff + ((u >> 16) & 1);
  return {(uint16_t)(u >> 16)};
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t smem_bytes)
      : block_barrier(threads), exchange((threads + 31) / 32), smem_bytes(smem_bytes) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    // 128-byte aligned and filled with a NaN pattern, as a GPU's is left with anything.
    smem = static_cast<unsigned char *>(std::aligned_alloc(128, (smem_bytes + 127) / 128 * 128 + 128));
    std::memset(smem, 0xff, smem_bytes);
  }
  ~Block() { std::free(smem); }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<std::array<uint32_t, 32>> exchange;
  unsigned char *smem;
  size_t smem_bytes;
};

inline thread_local Block *block = nullptr;

}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

inline void __syncthreads() { emu::block->block_barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "__trap() in block (%u, %u), thread %u\n", blockIdx.x, blockIdx.y, threadIdx.x);
  std::abort();
}

namespace emu {
// Every lane publishes `value`, then reads lane `source(lane)`'s (its own when out of range).
inline float shuffle(float value, const std::function<int(int)> &source) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  block->exchange[warp][lane] = bits;
  __syncwarp();
  int from = source((int)lane);
  if (from < 0 || from > 31) from = (int)lane;
  bits = block->exchange[warp][from];
  __syncwarp();
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}
}  // namespace emu

inline float __shfl_xor_sync(unsigned, float value, int mask) {
  return emu::shuffle(value, [mask](int lane) { return lane ^ mask; });
}
inline float __shfl_sync(unsigned, float value, int source) {
  return emu::shuffle(value, [source](int) { return source; });
}
inline float __shfl_down_sync(unsigned, float value, unsigned delta) {
  return emu::shuffle(value, [delta](int lane) { return lane + (int)delta; });
}

// Whether any lane's `predicate` holds (every lane gets the answer).
inline int __any_sync(unsigned, int predicate) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  emu::block->exchange[warp][lane] = predicate != 0;
  __syncwarp();
  int any = 0;
  for (uint32_t vote : emu::block->exchange[warp]) any |= (int)vote;
  __syncwarp();
  return any;
}

#define SDFIX_DYNAMIC_SMEM(name) unsigned char *name = emu::block->smem
inline unsigned dynamic_smem_bytes() { return (unsigned)emu::block->smem_bytes; }

namespace emu {
// Runs `kernel` over `grid` blocks of `threads` threads (x only), one block at a time.
inline void launch(dim3 grid, unsigned threads, size_t smem_bytes, const std::function<void()> &kernel) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block state(threads, smem_bytes);
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            block = &state;
            threadIdx = dim3{t, 0, 0};
            blockIdx = dim3{x, y, z};
            kernel();
          });
        for (auto &thread : pool) thread.join();
      }
}
}  // namespace emu

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float widen(float x) { return x; }
inline float widen(__half x) { return (float)x; }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// The whole m x n (a: m x k, b: k x n) tile in every lane, as f32 (our inputs widen exactly).
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  float v[16 * 16];
};

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout> &f, const T *p, unsigned ldm) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.v[i * 16 + j] = widen(std::is_same_v<Layout, row_major> ? p[i * ldm + j] : p[j * ldm + i]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float> &f, const float *p, unsigned ldm, layout_t l) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i * 16 + j] = l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i];
}
inline void store_matrix_sync(float *p, const fragment<accumulator, 16, 16, 16, float> &f, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ldm + j] : p[j * ldm + i]) = f.v[i * 16 + j];
}
template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout> &f, float value) {
  for (float &x : f.v) x = value;
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float> &d, const fragment<matrix_a, 16, 16, 16, T, LA> &a,
                     const fragment<matrix_b, 16, 16, 16, T, LB> &b,
                     const fragment<accumulator, 16, 16, 16, float> &c) {
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum += a.v[i * 16 + k] * b.v[k * 16 + j];
      out[i * 16 + j] = sum;
    }
  std::memcpy(d.v, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda

#endif
