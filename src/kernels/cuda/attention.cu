// Lever 3 (issue 32): flash-style attention for f16 and bf16 data on tensor cores (WMMA, sm_80+),
// head dims 40, 64, 80 and 160 (SD 1.x's 40/80/160, SD 2.x's and SDXL's 64). Compiled to PTX by
// build.rs under the `cuda` feature only; launched by src/kernels/cuda/attention.rs.
//
// The composite op (src/model/attention.rs) transposes q, k and v to (b, h, tokens, d), writes the
// whole (b, h, n, m) f32 score tensor (671 MB for SD 2.1's 4096-token self-attention with CFG),
// runs a softmax over it, casts it and multiplies by v, then transposes back. Here one block owns
// 64 query rows of one (batch, head) and walks the keys in tiles (Dao's FlashAttention-2 loop):
//   S = Q K^T (f32 accumulators) -> running row max m and sum l in f32 (online softmax, log2
//   domain) -> P = exp(S - m) in the data dtype -> O = O * exp(m_old - m_new) + P V (f32
//   accumulators held in registers across tiles; rescaled through shared memory only on a tile
//   where some row's max moved), and writes O / l. Scores never reach global memory; q, k, v are read and the output written in
// the callers' (b, tokens, heads * d) layout, so no transposes. Numerically the composite's
// choices: products of the data dtype summed in f32, scores and softmax in f32, probabilities
// rounded to the data dtype for the product with v (the difference: P is rounded before the
// division by the row sum instead of after).
//
// Block: 4 warps, each owning 16 query rows. Shared memory (dynamic, sized by attention.rs with the
// same rule as `Tile<D>::bytes`, checked here against %dynamic_smem_size): the Q tile (read once
// into registers), one K and one V tile, and per warp its S (f32), P (data dtype) and O (f32, for
// rescaling and the final division) rows.
// Rows are padded (+8 halves, +4 floats) against bank conflicts; head dim 40 is padded to 48 with
// zeros. Keys past the end are zero rows and masked to -inf; queries past the end are zero rows
// whose results are not written.
//
// Built for the GPU by nvcc, and for the CPU by tests/cuda_emulation (SDFIX_HOST_EMULATION: one
// host thread per CUDA thread, WMMA emulated), so that the indexing is tested without a GPU.

#ifdef SDFIX_HOST_EMULATION
#include "emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>
#define SDFIX_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
  unsigned bytes;
  asm volatile("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
  return bytes;
}
#endif

using namespace nvcuda;

namespace attention {

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

constexpr int WARPS = 4;
constexpr int ROWS = 16 * WARPS;  // query rows per block
constexpr int THREADS = 32 * WARPS;
constexpr int VEC = 8;            // 16-bit values per 16-byte load

// The tile geometry for head dim D. attention.rs computes `bytes` with the same rule.
template <int D> struct Tile {
  static constexpr int DP = (D + 15) / 16 * 16;  // head dim padded to the WMMA k of 16
  static constexpr int BC = D > 128 ? 32 : 64;   // keys per tile
  static constexpr int LDH = DP + 8;             // 16-bit values per row of Q, K, V
  static constexpr int LDS = BC + 4;             // floats per row of S
  static constexpr int LDP = BC + 8;             // 16-bit values per row of P
  static constexpr int LDO = DP + 4;             // floats per row of O
  static constexpr unsigned q_bytes = ROWS * LDH * 2;
  static constexpr unsigned kv_bytes = BC * LDH * 2;
  static constexpr unsigned s_bytes = 16 * LDS * 4;  // per warp
  static constexpr unsigned p_bytes = 16 * LDP * 2;  // per warp
  static constexpr unsigned o_bytes = 16 * LDO * 4;  // per warp
  static constexpr unsigned bytes = q_bytes + 2 * kv_bytes + WARPS * (s_bytes + p_bytes + o_bytes);
};

// Copies `rows` rows of D values (row r at src + r * stride) into dst (row stride LDH), 16 bytes
// at a time; rows from `valid` on are zeros. The padding columns D..DP are never written here
// (zeroed once at the start).
template <typename T, int D, int LDH>
__device__ __forceinline__ void load_rows(T *dst, const T *src, int64_t stride, int rows, int valid) {
  constexpr int per_row = D / VEC;
  for (int i = threadIdx.x; i < rows * per_row; i += THREADS) {
    const int r = i / per_row, c = (i - r * per_row) * VEC;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid) value = *reinterpret_cast<const uint4 *>(src + r * stride + c);
    *reinterpret_cast<uint4 *>(dst + r * LDH + c) = value;
  }
}

// q (batch, queries, heads * D), k and v (batch, keys, heads * D), out like q; grid
// (ceil(queries / ROWS), batch * heads), THREADS threads, Tile<D>::bytes of dynamic shared memory.
// `scale_log2` is log2(e) / sqrt(D).
template <typename T, int D>
__device__ void flash_attention(const T *q, const T *k, const T *v, T *out, int heads, int queries, int keys,
                                float scale_log2) {
  using G = Tile<D>;
  constexpr int DP = G::DP, BC = G::BC, LDH = G::LDH, LDS = G::LDS, LDP = G::LDP, LDO = G::LDO;
  SDFIX_DYNAMIC_SMEM(smem);
  if (dynamic_smem_bytes() < G::bytes) __trap();
  T *q_tile = reinterpret_cast<T *>(smem);
  T *k_tile = reinterpret_cast<T *>(smem + G::q_bytes);
  T *v_tile = reinterpret_cast<T *>(smem + G::q_bytes + G::kv_bytes);
  unsigned char *per_warp = smem + G::q_bytes + 2 * G::kv_bytes;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float *s_rows = reinterpret_cast<float *>(per_warp + warp * G::s_bytes);
  T *p_rows = reinterpret_cast<T *>(per_warp + WARPS * G::s_bytes + warp * G::p_bytes);
  float *o_rows = reinterpret_cast<float *>(per_warp + WARPS * (G::s_bytes + G::p_bytes) + warp * G::o_bytes);

  const int64_t inner = (int64_t)heads * D;
  const int batch = blockIdx.y / heads, head = blockIdx.y % heads;
  const int first_query = blockIdx.x * ROWS;
  const T *q_base = q + ((int64_t)batch * queries + first_query) * inner + head * D;
  const T *k_base = k + (int64_t)batch * keys * inner + head * D;
  const T *v_base = v + (int64_t)batch * keys * inner + head * D;

  // Zero everything once: the padding columns of Q, K and V stay zero, O starts at zero.
  for (unsigned i = threadIdx.x; i < G::bytes / 16; i += THREADS)
    reinterpret_cast<uint4 *>(smem)[i] = make_uint4(0, 0, 0, 0);
  __syncthreads();
  load_rows<T, D, LDH>(q_tile, q_base, inner, ROWS, min(ROWS, queries - first_query));
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> q_frag[DP / 16];
  for (int kk = 0; kk < DP / 16; ++kk) wmma::load_matrix_sync(q_frag[kk], q_tile + warp * 16 * LDH + kk * 16, LDH);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag[DP / 16];
  for (int j = 0; j < DP / 16; ++j) wmma::fill_fragment(o_frag[j], 0.0f);

  // Lanes 2r and 2r+1 own row r of this warp's 16: its running max (log2 units) and sum.
  const int row = lane / 2, half = lane % 2;
  float row_max = -INFINITY, row_sum = 0.0f;

  for (int first_key = 0; first_key < keys; first_key += BC) {
    const int valid_keys = min(BC, keys - first_key);
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_rows<T, D, LDH>(k_tile, k_base + (int64_t)first_key * inner, inner, BC, valid_keys);
    load_rows<T, D, LDH>(v_tile, v_base + (int64_t)first_key * inner, inner, BC, valid_keys);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: K's rows read as the columns of K^T (col_major).
    for (int j = 0; j < BC / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
      wmma::fill_fragment(s_frag, 0.0f);
      for (int kk = 0; kk < DP / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> k_frag;
        wmma::load_matrix_sync(k_frag, k_tile + j * 16 * LDH + kk * 16, LDH);
        wmma::mma_sync(s_frag, q_frag[kk], k_frag, s_frag);
      }
      wmma::store_matrix_sync(s_rows + j * 16, s_frag, LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax over this tile, row by row: lanes 2r and 2r+1 take row r's even and odd
    // columns (interleaved, so that the 16 rows' reads spread over the banks).
    constexpr int HALF_BC = BC / 2;
    const float *s = s_rows + row * LDS + half;
    float tile_max = -INFINITY;
    for (int c = 0; c < HALF_BC; ++c)
      if (2 * c + half < valid_keys) tile_max = fmaxf(tile_max, s[2 * c] * scale_log2);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float new_max = fmaxf(row_max, tile_max);  // finite: every tile holds a key
    const float correction = exp2f(row_max - new_max);  // 0 on the first tile
    T *p = p_rows + row * LDP + half;
    float tile_sum = 0.0f;
    for (int c = 0; c < HALF_BC; ++c) {
      const float prob = 2 * c + half < valid_keys ? exp2f(s[2 * c] * scale_log2 - new_max) : 0.0f;
      tile_sum += prob;
      p[2 * c] = from_f<T>(prob);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    row_sum = row_sum * correction + tile_sum;
    row_max = new_max;
    // O's rows are rescaled only when a row's max moved (after the first tiles, rarely; O is zero
    // before the first): the accumulators go through shared memory for it, since CUDA leaves
    // their register layout opaque.
    if (first_key > 0 && __any_sync(0xffffffffu, correction != 1.0f)) {
      for (int j = 0; j < DP / 16; ++j)
        wmma::store_matrix_sync(o_rows + j * 16, o_frag[j], LDO, wmma::mem_row_major);
      __syncwarp();
      float *o = o_rows + row * LDO + half;
      for (int c = 0; c < DP / 2; ++c) o[2 * c] *= correction;
      __syncwarp();
      for (int j = 0; j < DP / 16; ++j) wmma::load_matrix_sync(o_frag[j], o_rows + j * 16, LDO, wmma::mem_row_major);
    }
    __syncwarp();  // this warp's P rows are written

    // O += P V, in the accumulators.
    for (int kk = 0; kk < BC / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag;
      wmma::load_matrix_sync(p_frag, p_rows + kk * 16, LDP);
      for (int j = 0; j < DP / 16; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, v_tile + kk * 16 * LDH + j * 16, LDH);
        wmma::mma_sync(o_frag[j], p_frag, v_frag, o_frag[j]);
      }
    }
  }
  for (int j = 0; j < DP / 16; ++j) wmma::store_matrix_sync(o_rows + j * 16, o_frag[j], LDO, wmma::mem_row_major);
  __syncwarp();

  // out = O / l, the whole warp writing one row at a time.
  for (int r = 0; r < 16; ++r) {
    const float sum = __shfl_sync(0xffffffffu, row_sum, 2 * r);
    const int query = first_query + warp * 16 + r;
    if (query < queries) {
      T *dst = out + ((int64_t)batch * queries + query) * inner + head * D;
      const float inv = 1.0f / sum;
      for (int c = lane; c < D; c += 32) dst[c] = from_f<T>(o_rows[r * LDO + c] * inv);
    }
  }
}

}  // namespace attention

#define SDFIX_FLASH_ATTENTION(T, SUFFIX, D)                                                                      \
  extern "C" __global__ void sdfix_flash_attention_##SUFFIX##_d##D(const T *q, const T *k, const T *v, T *out,   \
                                                                   int heads, int queries, int keys,              \
                                                                   float scale_log2) {                           \
    attention::flash_attention<T, D>(q, k, v, out, heads, queries, keys, scale_log2);                            \
  }

SDFIX_FLASH_ATTENTION(__half, f16, 40)
SDFIX_FLASH_ATTENTION(__half, f16, 64)
SDFIX_FLASH_ATTENTION(__half, f16, 80)
SDFIX_FLASH_ATTENTION(__half, f16, 160)
SDFIX_FLASH_ATTENTION(__nv_bfloat16, bf16, 40)
SDFIX_FLASH_ATTENTION(__nv_bfloat16, bf16, 64)
SDFIX_FLASH_ATTENTION(__nv_bfloat16, bf16, 80)
SDFIX_FLASH_ATTENTION(__nv_bfloat16, bf16, 160)
