// Shared parts of capsem's native EM routing kernels (em_routing.cc, the
// article's routing; em_routing_paper.cc, the paper's): 16-float vectors and
// their permutations and sums, a vectorised exp, per-thread buffers, the
// votes P @ W (+ offsets) of one routing problem and the gradients of poses
// and w from the gradient of its votes, and the checks of the vote sources.
//
// Legend: M routing problems, I input capsules, O output capsules, T
// iterations, h = 4*r + c a pose element (row r, column c), k the inner index
// of P @ W. Every (i, o) pose is one 16-float vector (`Vec`).
//
// Included by each kernel source (everything is in an unnamed namespace:
// each library source gets its own copy).

#ifndef CAPSEM_NATIVE_EM_COMMON_H_
#define CAPSEM_NATIVE_EM_COMMON_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
// GCC targeting AVX2 without AVX-512: `Vec` as two 8-float halves (see below).
#if !defined(__clang__) && defined(__AVX2__) && !defined(__AVX512F__)
#define CAPSEM_VEC_HALVES 1
#include <immintrin.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace capsem {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;

constexpr float kEps = 1e-9f;

// A pose is one 16-float vector. With AVX-512 (and with Clang) it is a 64-byte
// GCC vector: one register. Without AVX-512 GCC gives a 64-byte vector no
// register and keeps every one in memory, moving its pieces and lanes through
// the stack, and permutes its 16 lanes one by one (training steps 3.3-3.5 times
// slower on an AVX2 CPU, docs/performance.md). There, with AVX2 and GCC, `Vec`
// is a pair of 8-float vectors (two registers) with the same operators,
// computing lane by lane the same arithmetic; a vector condition is written
// `Select(mask, a, b)` for both.
#if defined(CAPSEM_VEC_HALVES)
typedef float Vec8 __attribute__((vector_size(32)));
typedef int32_t IVec8 __attribute__((vector_size(32)));

struct IVec {
  IVec8 lo, hi;  // lanes 0-7, 8-15
  IVec() = default;
  IVec(IVec8 l, IVec8 h) : lo(l), hi(h) {}
  IVec(int32_t a0, int32_t a1, int32_t a2, int32_t a3, int32_t a4, int32_t a5, int32_t a6,
       int32_t a7, int32_t a8, int32_t a9, int32_t a10, int32_t a11, int32_t a12,
       int32_t a13, int32_t a14, int32_t a15)
      : lo{a0, a1, a2, a3, a4, a5, a6, a7}, hi{a8, a9, a10, a11, a12, a13, a14, a15} {}
};
inline IVec operator+(IVec a, int32_t b) { return {a.lo + b, a.hi + b}; }
inline IVec operator<<(IVec a, int b) { return {a.lo << b, a.hi << b}; }

struct Vec {
  Vec8 lo, hi;  // lanes 0-7, 8-15
  Vec() = default;
  Vec(Vec8 l, Vec8 h) : lo(l), hi(h) {}
  float operator[](int j) const { return j < 8 ? lo[j] : hi[j - 8]; }
  float& operator[](int j) { return reinterpret_cast<float*>(this)[j]; }
};
#define CAPSEM_VEC_BINARY(op)                                                        \
  inline Vec operator op(Vec a, Vec b) { return {a.lo op b.lo, a.hi op b.hi}; }      \
  inline Vec operator op(Vec a, float b) { return {a.lo op b, a.hi op b}; }          \
  inline Vec operator op(float a, Vec b) { return {a op b.lo, a op b.hi}; }          \
  inline Vec& operator op##=(Vec& a, Vec b) { return a = a op b; }                   \
  inline Vec& operator op##=(Vec& a, float b) { return a = a op b; }
CAPSEM_VEC_BINARY(+)
CAPSEM_VEC_BINARY(-)
CAPSEM_VEC_BINARY(*)
CAPSEM_VEC_BINARY(/)
#undef CAPSEM_VEC_BINARY
inline Vec operator-(Vec a) { return {-a.lo, -a.hi}; }
inline IVec operator>(Vec a, Vec b) { return {a.lo > b.lo, a.hi > b.hi}; }
inline IVec operator<(Vec a, Vec b) { return {a.lo < b.lo, a.hi < b.hi}; }
// mask[j] ? a[j] : b[j] (mask lanes 0 or -1, as from a comparison).
inline Vec Select(IVec mask, Vec a, Vec b) {
  return {mask.lo ? a.lo : b.lo, mask.hi ? a.hi : b.hi};
}
inline IVec TruncateToInt(Vec x) {
  return {__builtin_convertvector(x.lo, IVec8), __builtin_convertvector(x.hi, IVec8)};
}
inline Vec ToFloat(IVec x) {
  return {__builtin_convertvector(x.lo, Vec8), __builtin_convertvector(x.hi, Vec8)};
}
#else
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
inline Vec Select(IVec mask, Vec a, Vec b) { return mask ? a : b; }
inline IVec TruncateToInt(Vec x) { return __builtin_convertvector(x, IVec); }
inline Vec ToFloat(IVec x) { return __builtin_convertvector(x, Vec); }
#endif

#if defined(CAPSEM_VEC_HALVES)
inline Vec Load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void Store(float* p, Vec v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
#else
inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
#endif
inline Vec Splat(float x) { return Vec{} + x; }
inline IVec LoadInts(const int32_t* p) {
  IVec v;
  std::memcpy(&v, p, sizeof(IVec));
  return v;
}

// Lane permutations: Shuffle(x, idx)[j] = x[idx[j]] and, of two sources,
// Shuffle(a, b, idx)[j] = (a ++ b)[idx[j]]. GCC's __builtin_shuffle takes the
// indices as a vector value; Clang has no such builtin (its
// __builtin_shufflevector needs constant indices), so there they are spelled
// lane by lane, which Clang compiles to vector permutes for the constant index
// tables below. With the two halves of CAPSEM_VEC_HALVES each half of the
// result comes from 8-lane shuffles (AVX2 vpermps) and a select. Either way the
// lanes are only moved: the numbers are the same.
#if defined(__clang__)
inline Vec Shuffle(Vec x, IVec idx) {
  Vec r;
  for (int j = 0; j < 16; ++j) r[j] = x[idx[j] & 15];
  return r;
}
inline Vec Shuffle(Vec a, Vec b, IVec idx) {
  Vec r;
  for (int j = 0; j < 16; ++j) {
    const int k = idx[j] & 31;
    r[j] = k < 16 ? a[k] : b[k - 16];
  }
  return r;
}
#elif defined(CAPSEM_VEC_HALVES)
inline Vec Shuffle(Vec x, IVec idx) {
  return {__builtin_shuffle(x.lo, x.hi, idx.lo), __builtin_shuffle(x.lo, x.hi, idx.hi)};
}
inline Vec8 ShuffleHalf(Vec a, Vec b, IVec8 k) {  // k: 0-15 a's lanes, 16-31 b's
  const Vec8 from_a = __builtin_shuffle(a.lo, a.hi, k);  // indices taken modulo 16
  const Vec8 from_b = __builtin_shuffle(b.lo, b.hi, k);
  return (k & 16) != 0 ? from_b : from_a;
}
inline Vec Shuffle(Vec a, Vec b, IVec idx) {
  return {ShuffleHalf(a, b, idx.lo), ShuffleHalf(a, b, idx.hi)};
}
#else
inline Vec Shuffle(Vec x, IVec idx) { return __builtin_shuffle(x, idx); }
inline Vec Shuffle(Vec a, Vec b, IVec idx) { return __builtin_shuffle(a, b, idx); }
#endif

inline float HSum(Vec x) {
  x += Shuffle(x, IVec{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += Shuffle(x, IVec{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += Shuffle(x, IVec{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x += Shuffle(x, IVec{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return x[0];
}

// Permutations of a 4x4 matrix X (16 floats, row-major), for h = 4r + c:
//   ColK(X, k)[h] = X[r][k]   (column k broadcast along each row)
//   RowK(X, k)[h] = X[k][c]   (row k repeated for every r)
const IVec kCol[4] = {
    {0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12},
    {1, 1, 1, 1, 5, 5, 5, 5, 9, 9, 9, 9, 13, 13, 13, 13},
    {2, 2, 2, 2, 6, 6, 6, 6, 10, 10, 10, 10, 14, 14, 14, 14},
    {3, 3, 3, 3, 7, 7, 7, 7, 11, 11, 11, 11, 15, 15, 15, 15}};
const IVec kRow[4] = {
    {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3},
    {4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7},
    {8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11},
    {12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15, 12, 13, 14, 15}};
// For the weight gradient: Perm(X, kPT[r])[4k + c] = X[r][k].
const IVec kPT[4] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

inline Vec Perm(Vec x, const IVec& idx) { return Shuffle(x, idx); }

// RowK of the 4x4 matrix at w, and of a matrix in a Vec: row k repeated for
// every r. With the two halves of CAPSEM_VEC_HALVES each half holds rows r and
// r + 1, so both are row k twice: one 128-bit broadcast, no permutation.
#if defined(CAPSEM_VEC_HALVES)
inline Vec RowK(const float* w, int k) {
  const Vec8 row = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(w + 4 * k));
  return {row, row};
}
inline Vec RowK(Vec x, int k) {
  const Vec8 half = k < 2 ? x.lo : x.hi;
  const Vec8 row = (k & 1) ? _mm256_permute2f128_ps(half, half, 0x11)
                           : _mm256_permute2f128_ps(half, half, 0x00);
  return {row, row};
}
#else
inline Vec RowK(const float* w, int k) { return Perm(Load(w), kRow[k]); }
inline Vec RowK(Vec x, int k) { return Perm(x, kRow[k]); }
#endif

// Sums of 16 vectors: out[j] = sum_h x[j][h], by a tree of two-source
// shuffles (cheaper than 16 horizontal sums). After the level with c partial
// sums per source, lane j holds partial sum j % c of source j / c.
struct SumMasks {
  IVec left[4], right[4];
  SumMasks() {
    int level = 0;
    for (int c = 8; c >= 1; c /= 2, ++level) {
      const int n_in = 16 / (2 * c);  // sources per input vector
      int32_t l[16], r_[16];
      for (int j = 0; j < 16; ++j) {
        const int src = j / c, r = j % c;
        const int idx = src < n_in ? src * 2 * c + r : 16 + (src - n_in) * 2 * c + r;
        l[j] = idx;
        r_[j] = idx + c;
      }
      left[level] = LoadInts(l);
      right[level] = LoadInts(r_);
    }
  }
};
const SumMasks kSum;

inline Vec Sums16(const Vec* x) {
  Vec a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = Shuffle(x[2 * j], x[2 * j + 1], kSum.left[0]) +
           Shuffle(x[2 * j], x[2 * j + 1], kSum.right[0]);
  for (int j = 0; j < 4; ++j)
    b[j] = Shuffle(a[2 * j], a[2 * j + 1], kSum.left[1]) +
           Shuffle(a[2 * j], a[2 * j + 1], kSum.right[1]);
  for (int j = 0; j < 2; ++j)
    c[j] = Shuffle(b[2 * j], b[2 * j + 1], kSum.left[2]) +
           Shuffle(b[2 * j], b[2 * j + 1], kSum.right[2]);
  return Shuffle(c[0], c[1], kSum.left[3]) + Shuffle(c[0], c[1], kSum.right[3]);
}

// exp of 16 floats (Cephes' expf: range reduction by ln 2 and a degree-6
// polynomial, relative error ~1e-7); inputs below -88.38 give 0.
inline Vec Exp(Vec x) {
  const Vec hi = Splat(88.3762626647950f), lo = Splat(-88.3762626647949f);
  x = Select(x > hi, hi, x);
  const IVec tiny = x < lo;
  x = Select(tiny, lo, x);
  Vec fx = x * 1.44269504088896341f + 0.5f;
  IVec n = TruncateToInt(fx);
  Vec fn = ToFloat(n);
  fn = Select(fn > fx, fn - 1.0f, fn);        // floor
  x = x - fn * 0.693359375f;
  x = x + fn * 2.12194440e-4f;
  const Vec z = x * x;
  Vec y = Splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  n = TruncateToInt(fn);
  const IVec bits = (n + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  y = y * scale;
  return Select(tiny, Splat(0.0f), y);
}

// Flushes denormal results and inputs to zero while in scope (as TensorFlow's
// own kernels run): tiny assignments and their products would otherwise make
// the loops many times slower.
class ScopedFlushDenormal {
 public:
#if defined(__SSE__)
  ScopedFlushDenormal() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~ScopedFlushDenormal() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Aligned scratch of n Vecs.
class VecBuffer {
 public:
  explicit VecBuffer(int64_t n)
      : data_(static_cast<Vec*>(std::aligned_alloc(64, std::max<int64_t>(n, 1) * 64))) {}
  ~VecBuffer() { std::free(data_); }
  VecBuffer(const VecBuffer&) = delete;
  VecBuffer& operator=(const VecBuffer&) = delete;
  Vec* data() { return data_; }
  Vec& operator[](int64_t i) { return data_[i]; }

 private:
  Vec* data_;
};

struct Problem {
  int64_t I, O;
  int T;
  bool stable;
  bool from_poses;   // src = poses (M, I, 16) and w; else src = votes (M, I, O, 16)
  bool has_offsets;
  const float* w;        // (I, O, 16) if from_poses
  const float* wt;       // w transposed to (O, I, 16)
  const float* offsets;  // (I, 16) if has_offsets
  const float* beta_v;   // (O,)
  const float* beta_a;   // (O,)
  std::vector<float> lams;
};

constexpr int64_t kGradChunks = 16;  // see EmRoutingGradOp
constexpr int64_t kBlock = 32;  // input capsules per block of Votes / PoseGradients

// Votes of problem m, (O, I) Vecs: v[o][i] = P[i] @ W[i, o] (+ offsets[i]).
void Votes(const Problem& pb, const float* poses, Vec* v) {
  const int64_t I = pb.I, O = pb.O;
  Vec pk[kBlock][4];
  for (int64_t i0 = 0; i0 < I; i0 += kBlock) {
    const int64_t n = std::min(kBlock, I - i0);
    for (int64_t j = 0; j < n; ++j) {
      const Vec p = Load(poses + 16 * (i0 + j));
      for (int k = 0; k < 4; ++k) pk[j][k] = Perm(p, kCol[k]);
    }
    for (int64_t o = 0; o < O; ++o) {
      const float* w = pb.wt + 16 * (o * I + i0);
      Vec* vo = v + o * I + i0;
      for (int64_t j = 0; j < n; ++j) {
        const float* wj = w + 16 * j;
        Vec x = pk[j][0] * RowK(wj, 0) + pk[j][1] * RowK(wj, 1) + pk[j][2] * RowK(wj, 2) +
                pk[j][3] * RowK(wj, 3);
        if (pb.has_offsets) x += Load(pb.offsets + 16 * (i0 + j));
        vo[j] = x;
      }
    }
  }
}

// The votes of problem m as (O, I) Vecs in v: from poses and w, or copied from
// explicit votes (M, I, O, 16).
const Vec* VotesOfProblem(const Problem& pb, const float* src, int64_t m, Vec* v) {
  if (pb.from_poses) {
    Votes(pb, src + m * pb.I * 16, v);
  } else {
    const float* votes = src + m * pb.I * pb.O * 16;  // (I, O, 16)
    for (int64_t i = 0; i < pb.I; ++i)
      for (int64_t o = 0; o < pb.O; ++o) v[o * pb.I + i] = Load(votes + 16 * (i * pb.O + o));
  }
  return v;
}

// d poses (I, 16) of problem m, and d w added to g_wt (O, I, 16), from the
// vote gradient gv (O, I) Vecs. With G = d votes[i, o] (4x4):
//   d W[k][c] = sum_r P[r][k] G[r][c];  d P[r][k] = sum_o sum_c G[r][c] W[k][c],
// the latter as sum_c of Y_k[4r + c] = sum_o G[r][c] W[k][c].
void PoseGradients(const Problem& pb, const float* poses, const Vec* gv, float* g_p,
                   float* g_wt) {
  const int64_t I = pb.I, O = pb.O;
  Vec pt[kBlock][4], y[kBlock][4];
  for (int64_t i0 = 0; i0 < I; i0 += kBlock) {
    const int64_t n = std::min(kBlock, I - i0);
    for (int64_t j = 0; j < n; ++j) {
      const Vec p = Load(poses + 16 * (i0 + j));
      for (int r = 0; r < 4; ++r) {
        pt[j][r] = Perm(p, kPT[r]);
        y[j][r] = Splat(0.0f);
      }
    }
    for (int64_t o = 0; o < O; ++o) {
      const float* w = pb.wt + 16 * (o * I + i0);
      float* gw = g_wt + 16 * (o * I + i0);
      const Vec* g = gv + o * I + i0;
      for (int64_t j = 0; j < n; ++j) {
        const Vec G = g[j];
        const Vec dw = pt[j][0] * RowK(G, 0) + pt[j][1] * RowK(G, 1) + pt[j][2] * RowK(G, 2) +
                       pt[j][3] * RowK(G, 3);
        Store(gw + 16 * j, Load(gw + 16 * j) + dw);
        for (int k = 0; k < 4; ++k) y[j][k] += G * RowK(w + 16 * j, k);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      float* out = g_p + 16 * (i0 + j);
      for (int r = 0; r < 4; ++r)
        for (int k = 0; k < 4; ++k)
          out[4 * r + k] = (y[j][k][4 * r] + y[j][k][4 * r + 1]) +
                           (y[j][k][4 * r + 2] + y[j][k][4 * r + 3]);
    }
  }
}

// w (I, O, 16) -> pb->wt (O, I, 16), the layout of the per-problem loops.
void TransposeW(Problem* pb, std::vector<float>* wt) {
  if (!pb->from_poses) return;
  const int64_t I = pb->I, O = pb->O;
  wt->resize(I * O * 16);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t i = 0; i < I; ++i)
      std::memcpy(wt->data() + 16 * (o * I + i), pb->w + 16 * (i * O + o), 16 * sizeof(float));
  pb->wt = wt->data();
}

// Checks the vote source, a, beta_v and beta_a of an op named `op` and fills pb
// (w, offsets, beta_v, beta_a, I, O, T); *M = the number of routing problems.
absl::Status CheckInputs(OpKernelContext* ctx, const char* op, int T, Problem* pb,
                         int64_t* M) {
  const Tensor& src = ctx->input(0);
  const Tensor& w = ctx->input(1);
  const Tensor& off = ctx->input(2);
  const Tensor& a = ctx->input(3);
  const Tensor& bv = ctx->input(4);
  const Tensor& ba = ctx->input(5);
  if (src.dims() == 3) {
    pb->from_poses = true;
    if (src.dim_size(2) != 16 || w.dims() != 3 || w.dim_size(2) != 16 ||
        w.dim_size(0) != src.dim_size(1))
      return tensorflow::errors::InvalidArgument(
          op, ": poses must be (M, I, 16) and w (I, O, 16), got ",
          src.shape().DebugString(), " and ", w.shape().DebugString());
    pb->O = w.dim_size(1);
  } else if (src.dims() == 4) {
    pb->from_poses = false;
    if (src.dim_size(3) != 16)
      return tensorflow::errors::InvalidArgument(
          op, ": votes must be (M, I, O, 16), got ", src.shape().DebugString());
    pb->O = src.dim_size(2);
  } else {
    return tensorflow::errors::InvalidArgument(
        op, ": src must be poses (M, I, 16) or votes (M, I, O, 16), got ",
        src.shape().DebugString());
  }
  *M = src.dim_size(0);
  pb->I = src.dim_size(1);
  pb->has_offsets = off.NumElements() > 0;
  if (pb->has_offsets && (!pb->from_poses || off.dims() != 2 || off.dim_size(0) != pb->I ||
                          off.dim_size(1) != 16))
    return tensorflow::errors::InvalidArgument(
        op, ": offsets must be (I, 16) with poses, got ", off.shape().DebugString());
  if (a.dims() != 2 || a.dim_size(0) != *M || a.dim_size(1) != pb->I)
    return tensorflow::errors::InvalidArgument(op, ": a must be (M, I), got ",
                                               a.shape().DebugString());
  if (bv.NumElements() != pb->O || ba.NumElements() != pb->O)
    return tensorflow::errors::InvalidArgument(op, ": beta_v and beta_a need O values");
  pb->T = T;
  pb->w = pb->from_poses ? w.flat<float>().data() : nullptr;
  pb->offsets = pb->has_offsets ? off.flat<float>().data() : nullptr;
  pb->beta_v = bv.flat<float>().data();
  pb->beta_a = ba.flat<float>().data();
  return absl::OkStatus();
}

}  // namespace
}  // namespace capsem

#endif  // CAPSEM_NATIVE_EM_COMMON_H_
