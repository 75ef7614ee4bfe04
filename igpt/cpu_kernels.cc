// igpt's CPU kernels, XLA FFI custom calls computing in float32: fused attention (forward and
// backward), and for decoding, attention over the cache and matrix-vector products (whose
// weights may also be bfloat16).
//
// Attention. Why: on 2-core CPUs XLA ran attention's batched products of 32- and 64-wide heads
// at a fifth to a third of the dense products' rate, and spent as long again on the mask,
// softmax and the copies and transposes around them: 43-50% of a d=128 train step's kernel
// time for 13-16% of its FLOPs (`python -m benchmarks --profile`). Here each (batch, head) pair
// is one task, whose working set (its keys and values, one block of queries' scores) stays in
// the core's cache.
//
// The maths is flash attention's: the forward pass keeps each query's log-sum-exp of its
// scaled scores, and the backward pass recomputes the probabilities from it instead of storing
// them. Layouts are the model's own: queries, keys and values are read from the query-key-value
// projection's output as it is, (B, T, 3, H, K), the output is written as (B, T, H, K) for the
// output projection, and the gradient as (B, T, 3, H, K) for the projection's backward pass, so
// no transposes, slices or concatenations surround the call.
//
// Built by igpt/cpu_kernels.py with the host compiler for the host CPU (-march=native); the
// vectors are GCC's generic vector extensions, one register wide.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <thread>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector: one AVX-512 register, else one AVX2 one.
#ifdef __AVX512F__
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(float))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// x in every lane, written out: vf{} + x would add 0 to x first (without -ffast-math, an
// addition the compiler keeps, beside every product's broadcast).
#ifdef __AVX512F__
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
#endif
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// exp with about 2 ulp of error over [-87, 88] (inputs outside are clamped): e^x = 2^n e^r
// with n = round(x / ln 2) and a degree-7 polynomial for e^r (Cephes' expf coefficients).
inline vf vexp(vf x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  x = x > splat(88.f) ? splat(88.f) : x;
  const vf round = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + round) - round;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, for accuracy
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The shapes of one call. Row strides are in floats.
struct Dims {
  int64_t B, T, H, K;
  // The row length of the keys transposed (K, Tp) and of the scores (BR, Tp): T rounded up to
  // whole vectors, and one vector more. Rows a multiple of 4 KiB apart (T = 1,024) fall in one
  // set of the L1 cache, whose 8 ways could not hold a score tile's 64 rows of keys, nor the
  // 32 rows of scores the backward pass reads down a column; one vector more moves each row
  // to the next set.
  int64_t Tp;
  bool causal;
  int64_t qkv_row() const { return 3 * H * K; }
  int64_t out_row() const { return H * K; }
  // The last key a query at position t may read, + 1.
  int64_t limit(int64_t t) const { return causal ? t + 1 : T; }
};

constexpr int BR = 32;  // queries per block: their scores, BR x Tp floats, stay in the L2 cache
constexpr int RT = 8;   // rows of one score tile: 8 x 2 vectors of accumulators

// scores[r][c] = sum_k a[r][k] * bt[k][c] for rows r < RT of `a` (rows of K floats) and columns
// c in [c0, c0 + CV * W) of `bt` (K rows of ld floats).
template <int CV>
inline void score_tile(const float* a, const float* bt, int64_t ld, int64_t K, int64_t c0,
                       float* scores, int64_t ld_scores) {
  vf acc[RT][CV] = {};
  for (int64_t k = 0; k < K; ++k) {
    vf b[CV];
    for (int j = 0; j < CV; ++j) b[j] = load(bt + k * ld + c0 + j * W);
    for (int r = 0; r < RT; ++r) {
      vf x = splat(a[r * K + k]);
      for (int j = 0; j < CV; ++j) acc[r][j] += x * b[j];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int j = 0; j < CV; ++j) store(scores + r * ld_scores + c0 + j * W, acc[r][j]);
}

// scores = a bt for a block of BR rows of `a`, tile by tile; for causal attention a tile of
// rows reads columns only up to its last row's limit (`cols(r0)`).
template <typename Cols>
void scores_block(const float* a, const float* bt, int64_t ld, int64_t K, Cols cols,
                  float* scores) {
  for (int r0 = 0; r0 < BR; r0 += RT) {
    const int64_t n = cols(r0);
    int64_t c = 0;
    for (; c + 2 * W <= n; c += 2 * W)
      score_tile<2>(a + r0 * K, bt, ld, K, c, scores + r0 * ld, ld);
    if (c < n) score_tile<1>(a + r0 * K, bt, ld, K, c, scores + r0 * ld, ld);
  }
}

// Rows of an (R x NV vectors) output tile: at most 16 accumulators.
template <int NV>
constexpr int out_rows() {
  return NV <= 2 ? 8 : NV <= 4 ? 4 : NV <= 8 ? 2 : 1;
}

// The vectors of a row that one output tile takes: an even number of them two at a time, so
// that a tile has 8 rows and each vector it loads feeds 8 products, not 4.
//
// With the padded rows (`Dims::Tp`), for 64-wide heads at T = 1,024 (the S model's), the
// forward pass ran 1.24x as fast as with tiles of 4 rows by 4 vectors and unpadded rows, the
// forward and backward passes 1.26x, with the same bits (medians of paired ratios, 30
// alternated calls, a 2-core AMD EPYC). The padding alone: 1.01-1.12x and 1.02-1.14x in three
// runs; at T = 196 and 256 (32-wide heads, whose tiles are as before) 0.99-1.03x.
template <int NV>
constexpr int chunk() {
  return NV % 2 == 0 ? 2 : NV;
}

// out[r] = scale[r] * sum_{s < n[r]} p[r][s] * v[s] for the first `rows` of a block of BR rows
// of p (rows of ld floats), with rows v[s] of NV * W floats; out rows are out_ld floats apart.
template <int NV>
void rows_times_values(const float* p, int64_t ld, const float* v, const int64_t* n,
                       const float* scale, int rows, float* out, int64_t out_ld) {
  constexpr int C = chunk<NV>(), R = out_rows<C>();
  for (int c = 0; c < NV; c += C) {
    for (int r0 = 0; r0 < rows; r0 += R) {
      int64_t end = 0;
      for (int r = 0; r < R; ++r) end = std::max(end, n[r0 + r]);
      vf acc[R][C] = {};
      for (int64_t s = 0; s < end; ++s) {
        vf x[C];
        for (int j = 0; j < C; ++j) x[j] = load(v + s * NV * W + (c + j) * W);
        for (int r = 0; r < R; ++r) {
          vf w = splat(p[(r0 + r) * ld + s]);
          for (int j = 0; j < C; ++j) acc[r][j] += w * x[j];
        }
      }
      for (int r = 0; r < R && r0 + r < rows; ++r)
        for (int j = 0; j < C; ++j)
          store(out + (r0 + r) * out_ld + (c + j) * W, acc[r][j] * scale[r0 + r]);
    }
  }
}

// acc[s] += sum_r p[r][s] * x[r] for s < n: the BR rows of p (rows of ld floats) transposed
// times rows x[r] of NV * W floats, into rows acc[s] of NV * W floats.
template <int NV>
void columns_times_rows(const float* p, int64_t ld, const float* x, int64_t n, float* acc) {
  constexpr int C = chunk<NV>(), S = out_rows<C>();
  for (int c = 0; c < NV; c += C) {
    for (int64_t s0 = 0; s0 < n; s0 += S) {
      vf a[S][C];
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < C; ++j) a[s][j] = load(acc + (s0 + s) * NV * W + (c + j) * W);
      for (int r = 0; r < BR; ++r) {
        vf xr[C];
        for (int j = 0; j < C; ++j) xr[j] = load(x + r * NV * W + (c + j) * W);
        for (int s = 0; s < S; ++s) {
          vf w = splat(p[r * ld + s0 + s]);
          for (int j = 0; j < C; ++j) a[s][j] += w * xr[j];
        }
      }
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < C; ++j) store(acc + (s0 + s) * NV * W + (c + j) * W, a[s][j]);
    }
  }
}

// Per-thread scratch, grown as needed and reused across calls.
float* scratch(size_t floats) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// Copy rows [t0, t0 + BR) of one head of a strided (T, K) matrix into BR contiguous rows,
// zeros past T.
void gather_rows(const float* src, int64_t stride, const Dims& d, int64_t t0, float* dst) {
  for (int r = 0; r < BR; ++r) {
    if (t0 + r < d.T)
      std::memcpy(dst + r * d.K, src + (t0 + r) * stride, d.K * sizeof(float));
    else
      std::memset(dst + r * d.K, 0, d.K * sizeof(float));
  }
}

// (T, K) strided -> (K, Tp) contiguous, zeros past T. With AVX-512, W positions of one
// column are gathered into a vector at a time: element by element, the transpose took an
// eighth of a 32-wide head's forward and backward passes.
void transpose_head(const float* src, int64_t stride, const Dims& d, float* dst) {
  int64_t t0 = 0;
#ifdef __AVX512F__
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
      _mm512_set1_epi32(static_cast<int32_t>(stride)));
  for (; t0 + W <= d.T; t0 += W)
    for (int64_t k = 0; k < d.K; ++k)
      _mm512_storeu_ps(dst + k * d.Tp + t0, _mm512_i32gather_ps(rows, src + t0 * stride + k, 4));
#endif
  for (int64_t k = 0; k < d.K; ++k) {
    float* row = dst + k * d.Tp;
    for (int64_t t = t0; t < d.T; ++t) row[t] = src[t * stride + k];
    for (int64_t t = d.T; t < d.Tp; ++t) row[t] = 0.f;
  }
}

// (T, K) strided -> (Tp, K) contiguous, zeros past T.
void pack_head(const float* src, int64_t stride, const Dims& d, float* dst) {
  for (int64_t t = 0; t < d.Tp; ++t) {
    if (t < d.T)
      std::memcpy(dst + t * d.K, src + t * stride, d.K * sizeof(float));
    else
      std::memset(dst + t * d.K, 0, d.K * sizeof(float));
  }
}

// Runs f(0) ... f(n - 1) on the calling thread and XLA's intra-op thread pool. The caller
// waits only for tasks that were started: a helper the pool starts late finds no work left and
// touches nothing but the shared counters, so the call cannot deadlock on a busy pool.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &f] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// The lanes' indices, 0 ... W - 1.
inline vi lanes() {
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  return lane;
}

// Softmax pieces of one block of BR rows of scores (row r: query t0 + r; rows of Tp floats):
// n[r], the limit of the keys the query reads (0 past T); then in place
// p[r][s] = exp(scale * scores[r][s] - shift[r]) for s < n[r] and zeros up to `cols`. With
// shift = nullptr the shift is the row's maximum, and lse[r] (the log-sum-exp) and inv[r]
// (1 / the sum) are returned.
void softmax_block(float* scores, const Dims& d, int64_t t0, float scale, const float* shift,
                   int64_t cols, int64_t* n, float* lse, float* inv) {
  const vi lane = lanes();
  for (int r = 0; r < BR; ++r) {
    const int64_t t = t0 + r;
    float* row = scores + r * d.Tp;
    n[r] = t < d.T ? d.limit(t) : 0;
    const int64_t nv = round_up(n[r], W);
    std::fill(row + nv, row + std::max(nv, cols), 0.f);
    if (n[r] == 0) continue;
    const vi inside = lane < static_cast<int32_t>(n[r] - (nv - W));  // of the last vector
    float m;
    if (shift) {
      m = shift[r];
    } else {
      vf mv = splat(-INFINITY);
      for (int64_t s = 0; s < nv; s += W) {
        vf z = load(row + s) * scale;
        if (s + W == nv) z = inside ? z : splat(-INFINITY);
        mv = mv > z ? mv : z;
      }
      m = hmax(mv);
    }
    vf sum = {};
    for (int64_t s = 0; s < nv; s += W) {
      vf p = vexp(load(row + s) * scale - m);
      if (s + W == nv) p = inside ? p : vf{};
      store(row + s, p);
      sum += p;
    }
    if (!shift) {
      const float total = hsum(sum);
      lse[r] = m + std::log(total);
      inv[r] = 1.f / total;
    }
  }
}

// The columns of scores a tile of RT rows from query t0 + r0 needs: up to its last query's
// limit, in whole vectors (none past T).
inline int64_t tile_cols(const Dims& d, int64_t t0, int r0) {
  const int64_t last = std::min(t0 + r0 + RT, d.T) - 1;
  return last < t0 + r0 ? 0 : round_up(d.limit(last), W);
}

template <int NV>
void forward_head(const float* qkv, const Dims& d, float scale, int64_t b, int64_t h,
                  float* out, float* lse) {
  const int64_t K = NV * W, row = d.qkv_row();
  const float* q = qkv + b * d.T * row + h * K;
  const float* k = q + d.H * K;
  const float* v = k + d.H * K;
  float* kt = scratch(2 * d.Tp * K + BR * K + BR * d.Tp);
  float* vs = kt + d.Tp * K;
  float* qb = vs + d.Tp * K;
  float* scores = qb + BR * K;
  transpose_head(k, row, d, kt);
  pack_head(v, row, d, vs);
  float* o = out + b * d.T * d.out_row() + h * K;
  float* l = lse + (b * d.H + h) * d.T;
  for (int64_t t0 = 0; t0 < d.T; t0 += BR) {
    const int rows = static_cast<int>(std::min<int64_t>(BR, d.T - t0));
    const int64_t cols = round_up(d.limit(t0 + rows - 1), W);
    gather_rows(q, row, d, t0, qb);
    scores_block(qb, kt, d.Tp, K, [&](int r0) { return tile_cols(d, t0, r0); }, scores);
    int64_t n[BR];
    float block_lse[BR], inv[BR];
    softmax_block(scores, d, t0, scale, nullptr, cols, n, block_lse, inv);
    rows_times_values<NV>(scores, d.Tp, vs, n, inv, rows, o + t0 * d.out_row(), d.out_row());
    std::copy(block_lse, block_lse + rows, l + t0);
  }
}

// The gradient of one head: dq, dk and dv written into dqkv's slots.
template <int NV>
void backward_head(const float* qkv, const float* out, const float* lse, const float* dout,
                   const Dims& d, float scale, int64_t b, int64_t h, float* dqkv) {
  const int64_t K = NV * W, row = d.qkv_row(), orow = d.out_row();
  const float* q = qkv + b * d.T * row + h * K;
  const float* k = q + d.H * K;
  const float* v = k + d.H * K;
  const float* o = out + b * d.T * orow + h * K;
  const float* g = dout + b * d.T * orow + h * K;  // the output's gradient
  const float* l = lse + (b * d.H + h) * d.T;
  float* dq = dqkv + b * d.T * row + h * K;
  float* dk = dq + d.H * K;
  float* dv = dk + d.H * K;

  float* kt = scratch(5 * d.Tp * K + 2 * BR * K + 2 * BR * d.Tp);
  float* vt = kt + d.Tp * K;
  float* ks = vt + d.Tp * K;
  float* dk_acc = ks + d.Tp * K;
  float* dv_acc = dk_acc + d.Tp * K;
  float* qb = dv_acc + d.Tp * K;
  float* gb = qb + BR * K;
  float* p = gb + BR * K;
  float* ds = p + BR * d.Tp;
  transpose_head(k, row, d, kt);
  transpose_head(v, row, d, vt);
  pack_head(k, row, d, ks);
  std::fill(dk_acc, dk_acc + 2 * d.Tp * K, 0.f);

  float ones[BR];  // dq's rows are not rescaled
  std::fill(ones, ones + BR, 1.f);
  for (int64_t t0 = 0; t0 < d.T; t0 += BR) {
    const int rows = static_cast<int>(std::min<int64_t>(BR, d.T - t0));
    const int64_t keys = d.limit(t0 + rows - 1), cols = round_up(keys, W);
    auto tile = [&](int r0) { return tile_cols(d, t0, r0); };
    gather_rows(q, row, d, t0, qb);
    gather_rows(g, orow, d, t0, gb);
    scores_block(qb, kt, d.Tp, K, tile, p);
    scores_block(gb, vt, d.Tp, K, tile, ds);  // the probabilities' gradient
    int64_t n[BR];
    softmax_block(p, d, t0, scale, l + t0, cols, n, nullptr, nullptr);
    // The scores' gradient, scale * p * (dp - sum_k g o): softmax's backward pass.
    for (int r = 0; r < BR; ++r) {
      float* dsr = ds + r * d.Tp;
      const int64_t nv = round_up(n[r], W);
      std::fill(dsr + nv, dsr + std::max(nv, cols), 0.f);
      if (n[r] == 0) continue;
      float go = 0.f;
      for (int64_t j = 0; j < K; ++j) go += gb[r * K + j] * o[(t0 + r) * orow + j];
      const float* pr = p + r * d.Tp;
      for (int64_t s = 0; s < nv; s += W)
        store(dsr + s, load(pr + s) * (load(dsr + s) - go) * scale);
    }
    rows_times_values<NV>(ds, d.Tp, ks, n, ones, rows, dq + t0 * row, row);
    columns_times_rows<NV>(p, d.Tp, gb, keys, dv_acc);
    columns_times_rows<NV>(ds, d.Tp, qb, keys, dk_acc);
  }
  for (int64_t t = 0; t < d.T; ++t) {
    std::memcpy(dk + t * row, dk_acc + t * K, K * sizeof(float));
    std::memcpy(dv + t * row, dv_acc + t * K, K * sizeof(float));
  }
}

// The widest heads the kernel takes, in floats.
constexpr int kMaxWidth = 128;

// Calls f(std::integral_constant<int, NV>()) for the head width K = NV * W.
template <int NV = 1, typename F>
ffi::Error with_width(int64_t K, const F& f) {
  if constexpr (NV * W > kMaxWidth) {
    return ffi::Error::InvalidArgument("igpt attention: the head width must be a multiple of " +
                                       std::to_string(W) + " up to " +
                                       std::to_string(kMaxWidth));
  } else {
    if (K != NV * W) return with_width<NV + 1>(K, f);
    f(std::integral_constant<int, NV>());
    return ffi::Error::Success();
  }
}

ffi::Error dims_of(const ffi::Buffer<ffi::F32>& qkv, int32_t causal, Dims* d) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 5 || dims[2] != 3)
    return ffi::Error::InvalidArgument("igpt attention: qkv must be (B, T, 3, H, K)");
  *d = Dims{dims[0], dims[1], dims[3], dims[4], round_up(dims[1], W) + W, causal != 0};
  return ffi::Error::Success();
}

// Runs f(nv, d, b, h) for every batch row b and head h of qkv on the thread pool, where nv is
// std::integral_constant<int, NV> for the head width NV * W.
template <typename F>
ffi::Error for_each_head(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& qkv, int32_t causal,
                         const F& f) {
  Dims d;
  if (ffi::Error e = dims_of(qkv, causal, &d); e.failure()) return e;
  return with_width(d.K, [&](auto nv) {
    parallel_for(pool, d.B * d.H, [&](int64_t i) { f(nv, d, i / d.H, i % d.H); });
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   int32_t causal) {
  const float s = scale.typed_data()[0];
  return for_each_head(pool, qkv, causal, [&](auto nv, const Dims& d, int64_t b, int64_t h) {
    forward_head<decltype(nv)::value>(qkv.typed_data(), d, s, b, h, out->typed_data(),
                                      lse->typed_data());
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dqkv,
                    int32_t causal) {
  const float s = scale.typed_data()[0];
  return for_each_head(pool, qkv, causal, [&](auto nv, const Dims& d, int64_t b, int64_t h) {
    backward_head<decltype(nv)::value>(qkv.typed_data(), out.typed_data(), lse.typed_data(),
                                       dout.typed_data(), d, s, b, h, dqkv->typed_data());
  });
}

// Matrix-vector products: y = x w for x of at most kMaxRows rows (a decode step's tokens).
//
// Why: a decode step reads every weight once per token, so sampling at batch 1 runs at the
// rate at which the weights stream from memory. XLA:CPU's products of one row read the S
// model's weights at 16-22 GB/s (10 GB/s for four rows), where a plain sum streams 28. Here
// each task reads a band of kTaskRows whole rows of w in memory order, kBand rows at a time,
// prefetching ahead (`prefetch_target`), into the task's own (M, N) sums, which stay
// in L1; the tasks' sums are added at the end, in task order. The tasks run on threads of
// igpt's own that spin between calls (`Spinners`); small tasks let the caller take over the
// work of one that is late.

constexpr int kMaxRows = 4;
constexpr int kBand = 8;
constexpr int kTaskRows = 128;  // 1.08x as fast as 64 on the AMD EPYC (`prefetch_target`)
constexpr int64_t kMaxWorkers = 8;
// Less than this much of the cache to read, and decode attention runs on the calling thread.
constexpr size_t kMinParallelBytes = 256 << 10;

// A weight's floats: float32 as it is, bfloat16 (its bits, the top half of a float32's)
// widened.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline vf load(const uint16_t* p) {
#ifdef __AVX512F__
  // One widening load: GCC compiles the generic form below to two halves and an insert.
  const __m512i bits = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<vf>(_mm512_castsi512_ps(bits));
#else
  typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));
  typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// The address to prefetch, into the L2 cache (`prefetch`), while row r of a band (of N
// columns) is read at column n: the same column of the next band's row r, so that each band's
// reads bring in the next band, one line per line read. Past w's end (the last band's
// prefetches) nothing is read: prefetches do not fault. Integer arithmetic, as a pointer past
// the end of an array is undefined behaviour.
//
// Measured alternated in one process over a chain of the S model's 96 products (302 MB of
// float32 weights, past the caches). On a 2-core AMD EPYC (Zen 4), against the earlier policy
// (float32 weights: 1 KiB further along the row; bfloat16: the next band; both into L1, in
// tasks of 64 rows): float32 1.25x as fast at one row (medians 20 -> 25 GB/s, where a plain
// sum read 27.5), 1.42x at four rows; bfloat16 1.32x and 1.47x. Into L1 instead the next band
// ran 0.84x as fast as into L2, two bands ahead 0.93x. (On an Intel Xeon, the next band into
// L1 had run bfloat16 1.13-1.25x as fast as 1 KiB along the row, float32 0.91x; L2 was not
// measured there.)
template <typename T>
inline const void* prefetch_target(const T* band, int64_t r, int64_t N, int64_t n) {
  return reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(band + r * N + n) +
                                       kBand * N * sizeof(T));
}
inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }

// acc (M x N) += x[:, k0:k1] w[k0:k1, :], for x (M x K) and w (K x N), both row-major; w's
// elements are float32 or bfloat16 (T = uint16_t).
template <int M, typename T>
void matvec_band(const float* x, int64_t K, const T* w, int64_t N, int64_t k0, int64_t k1,
                 float* acc) {
  const int64_t full = N / W * W;
  for (int64_t k = k0; k < k1; k += kBand) {
    const int rows = static_cast<int>(std::min<int64_t>(kBand, k1 - k));
    const T* band = w + k * N;
    float a[M][kBand] = {};
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < rows; ++r) a[m][r] = x[m * K + k + r];
    if (rows == kBand) {
      vf av[M][kBand];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < kBand; ++r) av[m][r] = splat(a[m][r]);
      for (int64_t n = 0; n < full; n += W) {
        vf y[M];
        for (int m = 0; m < M; ++m) y[m] = load(acc + m * N + n);
        for (int r = 0; r < kBand; ++r) {
          prefetch(prefetch_target(band, r, N, n));
          const vf v = load(band + r * N + n);
          for (int m = 0; m < M; ++m) y[m] += av[m][r] * v;
        }
        for (int m = 0; m < M; ++m) store(acc + m * N + n, y[m]);
      }
    } else {
      for (int64_t n = 0; n < full; n += W)
        for (int m = 0; m < M; ++m) {
          vf y = load(acc + m * N + n);
          for (int r = 0; r < rows; ++r) y += splat(a[m][r]) * load(band + r * N + n);
          store(acc + m * N + n, y);
        }
    }
    for (int64_t n = full; n < N; ++n)  // the columns past whole vectors
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < rows; ++r) acc[m * N + n] += a[m][r] * widen(band[r * N + n]);
  }
}

// A spinning thread's pause between two looks at shared state.
inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Threads of igpt's own that run the matvec kernel's tasks beside the caller. Between two
// products of a decode step (a few to tens of microseconds apart) they spin, so that each call
// finds them awake: a thread of XLA's pool, woken per call, started too late to help with a
// 1 MiB product. After kSpin of no work they sleep until the next call.
class Spinners {
 public:
  explicit Spinners(int64_t helpers) : helpers_(helpers) {
    for (int64_t i = 1; i <= helpers; ++i) std::thread([this, i] { Loop(i); }).detach();
  }
  int64_t workers() const { return helpers_ + 1; }

  // Runs f(i, worker) for i = 0 ... n - 1, each once, on the caller (worker 0) and the
  // helpers; returns when all are done.
  template <typename F>
  void Run(int64_t n, const F& f) {
    auto job = std::make_shared<Job>();
    job->n = n;
    job->f = [&f](int64_t i, int64_t worker) { f(i, worker); };
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    Work(*job, 0);
    while (job->done.load(std::memory_order_acquire) < n) relax();
  }

 private:
  struct Job {
    int64_t n = 0;
    std::function<void(int64_t, int64_t)> f;
    std::atomic<int64_t> next{0}, done{0};
  };
  static constexpr auto kSpin = std::chrono::microseconds(200);

  static void Work(Job& job, int64_t worker) {
    for (int64_t i; (i = job.next.fetch_add(1)) < job.n;) {
      job.f(i, worker);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void Loop(int64_t worker) {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      while (generation_.load(std::memory_order_acquire) == seen) {
        if (std::chrono::steady_clock::now() - start < kSpin) {
          relax();
          continue;
        }
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_.load() != seen; });
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
        seen = generation_.load();
      }
      Work(*job, worker);
    }
  }

  const int64_t helpers_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  std::mutex mu_;
  std::condition_variable cv_;
};

// The decoding kernels' threads, started on first use: at most kMaxWorkers, the caller
// included (measured on 2 cores only; a few cores' reads fill a memory channel, and threads
// past that would only spin).
Spinners* decode_threads(ffi::ThreadPool& pool) {
  static Spinners* spinners =  // never freed
      new Spinners(std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), kMaxWorkers) - 1));
  return spinners;
}

// Each task sums its band of rows of w into a slot of its own, and the slots are added in task
// order, so the result does not depend on which thread ran which task. (Sums kept per thread
// did: 81 of 100 calls of a (2048, 512) product gave distinct bits, and bfloat16 sampling with
// one key drew different images from run to run.)
template <int M, typename T>
void matvec(ffi::ThreadPool& pool, const float* x, const T* w, int64_t K, int64_t N, float* y) {
  Spinners* spinners = decode_threads(pool);
  const int64_t tasks = (K + kTaskRows - 1) / kTaskRows;
  const int64_t size = M * N;
  // The calling thread's, reused from call to call. The lambda takes its address: named in
  // another thread, a thread_local is that thread's own.
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(tasks * size)) buffer.resize(tasks * size);
  float* sums = buffer.data();
  spinners->Run(tasks, [&](int64_t i, int64_t) {
    float* acc = sums + i * size;
    std::memset(acc, 0, size * sizeof(float));
    matvec_band<M>(x, K, w, N, i * kTaskRows, std::min<int64_t>(K, (i + 1) * kTaskRows), acc);
  });
  std::memcpy(y, sums, size * sizeof(float));
  for (int64_t i = 1; i < tasks; ++i) {
    const float* s = sums + i * size;
    for (int64_t j = 0; j < size; ++j) y[j] += s[j];
  }
}

template <typename T>
void matvec_rows(ffi::ThreadPool& pool, int64_t M, const float* x, const T* w, int64_t K,
                 int64_t N, float* y) {
  switch (M) {
    case 1: matvec<1>(pool, x, w, K, N, y); break;
    case 2: matvec<2>(pool, x, w, K, N, y); break;
    case 3: matvec<3>(pool, x, w, K, N, y); break;
    default: matvec<4>(pool, x, w, K, N, y); break;
  }
}

ffi::Error Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || xd[0] > kMaxRows ||
      !(bf16 || w.element_type() == ffi::DataType::F32))
    return ffi::Error::InvalidArgument("igpt matvec: x must be (M, K) with M <= " +
                                       std::to_string(kMaxRows) +
                                       " and w (K, N), float32 or bfloat16");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (bf16)
    matvec_rows(pool, M, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), K, N,
                y->typed_data());
  else
    matvec_rows(pool, M, x.typed_data(), static_cast<const float*>(w.untyped_data()), K, N,
                y->typed_data());
  return ffi::Error::Success();
}

// Attention of one new token per sequence over a decoding cache: keys (B, H, K, S) and values
// (B, H, S, K) as the model caches them, of which the first `start` positions are filled, and
// the new token's own query, key and value from the projection's (B, 1, 3, H, K) output, which
// it then writes into the cache at `start` (in place: the caches are aliased to the outputs).
//
// Why: XLA's decode step reads the whole cache, filled or not, in two batched products per
// layer (at 10-12 GB/s in the S sampler), with the softmax and its mask between them in
// separate kernels. Here each (batch row, head) task reads only the filled positions, once,
// with its scores and the values' sum in registers. XLA's update of the cache was two more
// kernels per layer, whose writes of one key across the keys' rows (K cache lines a head)
// took 76 us a layer at batch 16; here those lines are the ones the scores just read.

// e[s] = sum_k q[k] row_k[s] for the CV vectors of positions from s0, in registers: the keys'
// rows (K of them, S floats apart) read once each.
template <int CV>
inline void decode_scores(const float* q, const float* kc, int64_t K, int64_t S, int64_t s0,
                          float* e) {
  vf acc[CV] = {};
  for (int64_t k = 0; k < K; ++k) {
    const vf qk = splat(q[k]);
    for (int c = 0; c < CV; ++c) acc[c] += qk * load(kc + k * S + s0 + c * W);
  }
  for (int c = 0; c < CV; ++c) store(e + s0 + c * W, acc[c]);
}

// One (batch row b, head h) of DecodeAttention: attention over the first n positions of the
// cache and the new token, into out; then the new key and value into position `at`.
template <int NV>
void decode_head(const float* qkv, float* keys, float* values, int64_t H, int64_t S,
                 int64_t n, int64_t at, float scale, int64_t b, int64_t h, float* out) {
  constexpr int64_t K = NV * W;
  const float* q = qkv + b * 3 * H * K + h * K;
  const float* k_new = q + H * K;
  const float* v_new = k_new + H * K;
  float* kc = keys + (b * H + h) * K * S;    // K rows of S
  float* vc = values + (b * H + h) * S * K;  // S rows of K
  // Whole vectors of positions as far as the cache's rows hold them (the scores past n are
  // not used); the rest one by one.
  const int64_t full = std::min(round_up(n, W), S / W * W);
  float* e = scratch(std::max(full, n + 1));  // the scores, then their exponentials
  int64_t s0 = 0;
  for (; s0 + 8 * W <= full; s0 += 8 * W) decode_scores<8>(q, kc, K, S, s0, e);
  for (; s0 + 2 * W <= full; s0 += 2 * W) decode_scores<2>(q, kc, K, S, s0, e);
  for (; s0 < full; s0 += W) decode_scores<1>(q, kc, K, S, s0, e);
  for (int64_t s = full; s < n; ++s) {
    float x = 0.f;
    for (int64_t k = 0; k < K; ++k) x += q[k] * kc[k * S + s];
    e[s] = x;
  }
  float own = 0.f;
  for (int64_t k = 0; k < K; ++k) own += q[k] * k_new[k];
  e[n] = own;  // past the cache's scores, which `full` may round beyond n
  float top = -INFINITY;
  for (int64_t s = 0; s <= n; ++s) top = std::max(top, e[s] *= scale);
  float total = 0.f;
  vf totals = splat(0.f);
  const int64_t whole = n / W * W;
  for (int64_t s = 0; s < whole; s += W) {
    const vf x = vexp(load(e + s) - top);
    store(e + s, x);
    totals += x;
  }
  for (int64_t s = whole; s <= n; ++s) total += e[s] = std::exp(e[s] - top);
  total += hsum(totals);
  // The values' weighted sum in registers: two sets of accumulators, for even and odd
  // positions, so that consecutive products do not wait on each other.
  vf acc[2][NV];
  for (int j = 0; j < NV; ++j) {
    acc[0][j] = splat(e[n]) * load(v_new + j * W);
    acc[1][j] = splat(0.f);
  }
  int64_t s = 0;
  for (; s + 2 <= n; s += 2)
    for (int i = 0; i < 2; ++i) {
      const vf p = splat(e[s + i]);
      for (int j = 0; j < NV; ++j) acc[i][j] += p * load(vc + (s + i) * K + j * W);
    }
  if (s < n)
    for (int j = 0; j < NV; ++j) acc[0][j] += splat(e[s]) * load(vc + s * K + j * W);
  float* o = out + (b * H + h) * K;
  for (int j = 0; j < NV; ++j) store(o + j * W, (acc[0][j] + acc[1][j]) * (1.f / total));
  for (int64_t k = 0; k < K; ++k) kc[k * S + at] = k_new[k];
  std::memcpy(vc + at * K, v_new, K * sizeof(float));
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::F32> scale,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> new_keys,
                           ffi::ResultBuffer<ffi::F32> new_values) {
  const auto d = qkv.dimensions(), kd = keys.dimensions(), vd = values.dimensions();
  if (d.size() != 5 || d[1] != 1 || d[2] != 3 || kd.size() != 4 || vd.size() != 4 ||
      kd[0] != d[0] || kd[1] != d[3] || kd[2] != d[4] || vd[0] != d[0] || vd[1] != d[3] ||
      vd[2] != kd[3] || vd[3] != d[4] || kd[3] < 1 || d[4] % W != 0 || d[4] > kMaxWidth)
    return ffi::Error::InvalidArgument(
        "igpt decode attention: qkv must be (B, 1, 3, H, K), keys (B, H, K, S) and values "
        "(B, H, S, K), with S >= 1 and K a multiple of " + std::to_string(W) + " up to " +
        std::to_string(kMaxWidth));
  if (new_keys->typed_data() != keys.typed_data() ||
      new_values->typed_data() != values.typed_data())
    return ffi::Error::InvalidArgument(
        "igpt decode attention: the new caches must alias the old ones (input_output_aliases)");
  const int64_t B = d[0], H = d[3], K = d[4], S = kd[3];
  const int64_t first = start.typed_data()[0];
  const int64_t n = std::clamp<int64_t>(first, 0, S);
  // Where the new token goes: where dynamic_update_slice would put it, in the cache.
  const int64_t at = std::clamp<int64_t>(first, 0, S - 1);
  const float s = scale.typed_data()[0];
  return with_width(K, [&](auto nv) {
    auto head = [&](int64_t i, int64_t) {
      decode_head<decltype(nv)::value>(qkv.typed_data(), new_keys->typed_data(),
                                       new_values->typed_data(), H, S, n, at, s, i / H, i % H,
                                       out->typed_data());
    };
    // A cache that small is read faster than another thread wakes. Past it, the matvec
    // kernel's spinning threads where that kernel runs between these calls (decode steps of
    // up to kMaxRows sequences), so that they are awake; else XLA's pool, which wakes faster
    // than they do from sleep: in the S sampler at batch 16, 1.18x as fast (1.15-1.22) so,
    // and at batches 1 and 4 0.95x and 0.94x (alternated in one process).
    if (2 * B * H * n * K * sizeof(float) < kMinParallelBytes) {
      for (int64_t i = 0; i < B * H; ++i) head(i, 0);
    } else if (B <= kMaxRows) {
      decode_threads(pool)->Run(B * H, head);
    } else {
      parallel_for(pool, B * H, [&](int64_t i) { head(i, 0); });
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IgptAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<int32_t>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(IgptAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // the out's gradient
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dqkv
                                  .Attr<int32_t>("causal"));

// The head widths the kernel takes are multiples of this, up to igpt_attention_max_width().
extern "C" int igpt_attention_vector_width() { return W; }
extern "C" int igpt_attention_max_width() { return kMaxWidth; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(IgptMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w: float32 or bfloat16
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y

// The most rows of x igpt_matvec takes.
extern "C" int igpt_matvec_max_rows() { return kMaxRows; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(IgptDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // keys, aliased
                                  .Ret<ffi::Buffer<ffi::F32>>());  // values, aliased
