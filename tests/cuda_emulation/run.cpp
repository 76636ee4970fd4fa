// Runs our CUDA kernels on the CPU through emulation.h and compares each with a reference computed
// here in f64 from the same (rounded) inputs. Built and run by tests/cuda_emulation.rs:
//
//   c++ -std=c++20 -O2 -pthread -I tests/cuda_emulation tests/cuda_emulation/run.cpp -o run && ./run
//
// Prints one line per case ("ok" or "FAIL", the worst difference relative to the reference's
// largest value, the tolerance) and the flash attention's shared-memory bytes per head dim, which
// the Rust test compares with src/kernels/cuda/attention.rs's rule. Exits 1 when a case fails.
// The launch geometry is the one src/kernels/cuda/{attention,fused}.rs use, except that GEGLU is
// launched on two blocks to exercise its grid-stride loop.

#define SDFIX_HOST_EMULATION
#include "emulation.h"

#include "../../src/kernels/cuda/attention.cu"
#include "../../src/kernels/cuda/fused.cu"

#include <algorithm>
#include <random>
#include <string>

namespace {

int failures = 0;

void report(const std::string &name, double diff, double tolerance) {
  const bool ok = diff <= tolerance && std::isfinite(diff);
  if (!ok) ++failures;
  std::printf("%s %s max_rel_diff %.3g tolerance %.3g\n", ok ? "ok" : "FAIL", name.c_str(), diff, tolerance);
}

double max_rel_diff(const std::vector<double> &ours, const std::vector<double> &reference) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    const double d = std::fabs(ours[i] - reference[i]);
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    scale = std::max(scale, std::fabs(reference[i]));
  }
  return diff / std::max(scale, 1e-12);
}

template <typename T> T narrow(float x);
template <> float narrow<float>(float x) { return x; }
template <> __half narrow<__half>(float x) { return __float2half(x); }
template <> __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
double wide(float x) { return x; }
double wide(__half x) { return __half2float(x); }
double wide(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> std::vector<T> random_values(size_t n, float mean, float std_dev, std::mt19937 &rng) {
  std::normal_distribution<float> normal(mean, std_dev);
  std::vector<T> out(n);
  for (auto &x : out) x = narrow<T>(normal(rng));
  return out;
}

template <typename T> std::vector<double> widened(const std::vector<T> &xs) {
  std::vector<double> out(xs.size());
  std::transform(xs.begin(), xs.end(), out.begin(), [](T x) { return wide(x); });
  return out;
}

// ---- flash attention ----


template <typename T, int D> void attention_case(const char *dtype, void (*kernel)(const T *, const T *, const T *, T *, int, int, int, float),
                                                 int batch, int heads, int queries, int keys, float q_std,
                                                 double tolerance, std::mt19937 &rng) {
  const int64_t inner = (int64_t)heads * D;
  auto q = random_values<T>(batch * queries * inner, 0.0f, q_std, rng);
  auto k = random_values<T>(batch * keys * inner, 0.0f, 1.0f, rng);
  auto v = random_values<T>(batch * keys * inner, 0.0f, 1.0f, rng);
  std::vector<T> out(q.size(), narrow<T>(NAN));
  const float scale_log2 = 1.4426950408889634f / std::sqrt((float)D);
  const dim3 grid{(unsigned)((queries + attention::ROWS - 1) / attention::ROWS), (unsigned)(batch * heads), 1};
  emu::launch(grid, attention::THREADS, attention::Tile<D>::bytes,
              [&] { kernel(q.data(), k.data(), v.data(), out.data(), heads, queries, keys, scale_log2); });

  const auto qd = widened(q), kd = widened(k), vd = widened(v);
  std::vector<double> reference(q.size());
  std::vector<double> scores(keys);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < queries; ++i) {
        const double *qi = &qd[(b * queries + i) * inner + h * D];
        double max_score = -INFINITY;
        for (int j = 0; j < keys; ++j) {
          const double *kj = &kd[(b * keys + j) * inner + h * D];
          double dot = 0;
          for (int c = 0; c < D; ++c) dot += qi[c] * kj[c];
          scores[j] = dot / std::sqrt((double)D);
          max_score = std::max(max_score, scores[j]);
        }
        double sum = 0;
        for (int j = 0; j < keys; ++j) sum += scores[j] = std::exp(scores[j] - max_score);
        for (int c = 0; c < D; ++c) {
          double acc = 0;
          for (int j = 0; j < keys; ++j) acc += scores[j] * vd[(b * keys + j) * inner + h * D + c];
          reference[(b * queries + i) * inner + h * D + c] = acc / sum;
        }
      }
  char name[160];
  std::snprintf(name, sizeof name, "flash_attention %s d%d batch %d heads %d queries %d keys %d q_std %g", dtype, D,
                batch, heads, queries, keys, q_std);
  report(name, max_rel_diff(widened(out), reference), tolerance);
}

template <typename T, int D>
void attention_cases(const char *dtype, void (*kernel)(const T *, const T *, const T *, T *, int, int, int, float),
                     double tolerance, std::mt19937 &rng) {
  // A partial query block and a partial key tile; several key tiles with peaked scores (the
  // running max moves); one query row and one key.
  attention_case<T, D>(dtype, kernel, 2, 2, 70, 77, 1.0f, tolerance, rng);
  attention_case<T, D>(dtype, kernel, 1, 1, 64, 200, 4.0f, tolerance, rng);
  attention_case<T, D>(dtype, kernel, 1, 3, 1, 1, 1.0f, tolerance, rng);
}

// ---- group norm and GEGLU (src/kernels/cuda/fused.rs's launch geometry) ----

template <typename T>
void group_norm_case(const char *dtype, void (*stats)(const T *, float *, int64_t, int64_t),
                     void (*apply)(const T *, const T *, const T *, const float *, T *, int64_t, int64_t, int64_t, int,
                                   int, float, int),
                     int batch, int channels, int positions, int groups, bool silu, double tolerance,
                     std::mt19937 &rng) {
  const int64_t group_len = (int64_t)channels / groups * positions;
  const int batch_groups = batch * groups;
  const int64_t chunks = std::clamp<int64_t>((group_len + 8191) / 8192, 1, 64);
  const int64_t chunk_len = (group_len + chunks - 1) / chunks;
  auto x = random_values<T>((size_t)batch * channels * positions, 20.0f, 3.0f, rng);
  auto weight = random_values<T>(channels, 1.0f, 0.5f, rng);
  auto bias = random_values<T>(channels, 0.0f, 0.5f, rng);
  std::vector<float> partials(3 * batch_groups * chunks, 0.0f);
  std::vector<T> y(x.size(), narrow<T>(NAN));
  const dim3 grid{(unsigned)chunks, (unsigned)batch_groups, 1};
  emu::launch(grid, 256, 0, [&] { stats(x.data(), partials.data(), group_len, chunk_len); });
  emu::launch(grid, 256, 0, [&] {
    apply(x.data(), weight.data(), bias.data(), partials.data(), y.data(), group_len, chunk_len, positions,
          channels / groups, groups, 1e-5f, silu ? 1 : 0);
  });

  const auto xd = widened(x), wd = widened(weight), bd = widened(bias);
  std::vector<double> reference(x.size());
  for (int g = 0; g < batch_groups; ++g) {
    const double *xs = &xd[g * group_len];
    double mean = 0, var = 0;
    for (int64_t i = 0; i < group_len; ++i) mean += xs[i];
    mean /= group_len;
    for (int64_t i = 0; i < group_len; ++i) var += (xs[i] - mean) * (xs[i] - mean);
    var /= group_len;
    for (int64_t i = 0; i < group_len; ++i) {
      const int c = (g % groups) * (channels / groups) + (int)(i / positions);
      double value = (xs[i] - mean) / std::sqrt(var + 1e-5) * wd[c] + bd[c];
      if (silu) value = value / (1.0 + std::exp(-value));
      reference[g * group_len + i] = value;
    }
  }
  char name[160];
  std::snprintf(name, sizeof name, "group_norm %s (%d, %d, %d) groups %d silu %d chunks %lld", dtype, batch, channels,
                positions, groups, silu, (long long)chunks);
  report(name, max_rel_diff(widened(y), reference), tolerance);
}

template <typename T>
void geglu_case(const char *dtype, void (*kernel)(const T *, T *, int64_t, int64_t), int rows, int hidden,
                double tolerance, std::mt19937 &rng) {
  auto x = random_values<T>((size_t)rows * 2 * hidden, 0.0f, 2.0f, rng);
  std::vector<T> y((size_t)rows * hidden, narrow<T>(NAN));
  emu::launch(dim3{2, 1, 1}, 256, 0, [&] { kernel(x.data(), y.data(), (int64_t)y.size(), hidden); });
  const auto xd = widened(x);
  std::vector<double> reference(y.size());
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < hidden; ++j) {
      const double value = xd[r * 2 * hidden + j], gate = xd[r * 2 * hidden + hidden + j];
      reference[r * hidden + j] = value * 0.5 * gate * (1.0 + std::erf(gate / std::sqrt(2.0)));
    }
  char name[96];
  std::snprintf(name, sizeof name, "geglu %s rows %d hidden %d", dtype, rows, hidden);
  report(name, max_rel_diff(widened(y), reference), tolerance);
}

template <typename T>
void fused_cases(const char *dtype, void (*stats)(const T *, float *, int64_t, int64_t),
                 void (*apply)(const T *, const T *, const T *, const float *, T *, int64_t, int64_t, int64_t, int, int,
                               float, int),
                 void (*geglu_kernel)(const T *, T *, int64_t, int64_t), double tolerance, std::mt19937 &rng) {
  group_norm_case<T>(dtype, stats, apply, 2, 6, 35, 3, true, tolerance, rng);
  group_norm_case<T>(dtype, stats, apply, 1, 4, 10000, 2, false, tolerance, rng);  // 3 chunks per group
  geglu_case<T>(dtype, geglu_kernel, 7, 300, tolerance, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(32);
  // The tolerances of src/kernels/cuda/parity.rs.
  attention_cases<__half, 40>("f16", sdfix_flash_attention_f16_d40, 4e-3, rng);
  attention_cases<__half, 64>("f16", sdfix_flash_attention_f16_d64, 4e-3, rng);
  attention_cases<__half, 80>("f16", sdfix_flash_attention_f16_d80, 4e-3, rng);
  attention_cases<__half, 160>("f16", sdfix_flash_attention_f16_d160, 4e-3, rng);
  attention_cases<__nv_bfloat16, 40>("bf16", sdfix_flash_attention_bf16_d40, 2e-2, rng);
  attention_cases<__nv_bfloat16, 64>("bf16", sdfix_flash_attention_bf16_d64, 2e-2, rng);
  attention_cases<__nv_bfloat16, 80>("bf16", sdfix_flash_attention_bf16_d80, 2e-2, rng);
  attention_cases<__nv_bfloat16, 160>("bf16", sdfix_flash_attention_bf16_d160, 2e-2, rng);
  fused_cases<float>("f32", sdfix_gn_stats_f32, sdfix_gn_apply_f32, sdfix_geglu_f32, 1e-5, rng);
  fused_cases<__half>("f16", sdfix_gn_stats_f16, sdfix_gn_apply_f16, sdfix_geglu_f16, 4e-3, rng);
  fused_cases<__nv_bfloat16>("bf16", sdfix_gn_stats_bf16, sdfix_gn_apply_bf16, sdfix_geglu_bf16, 2e-2, rng);
  std::printf("smem d40 %u\nsmem d64 %u\nsmem d80 %u\nsmem d160 %u\n", attention::Tile<40>::bytes,
              attention::Tile<64>::bytes, attention::Tile<80>::bytes, attention::Tile<160>::bytes);
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
