// Native CPU kernels of EM routing for capsem (see capsem/native.py, capsem/ops.py).
//
// Two TensorFlow ops:
//   CapsemEmRouting      the article's EM routing of M independent problems;
//   CapsemEmRoutingGrad  its gradient, by the same hand-derived reverse pass
//                        as capsem.ops._em_backward.
//
// The votes come either explicitly, src = votes (M, I, O, 16), or as poses
// src = (M, I, 16) with w (I, O, 16) (4x4 matrices, row-major) and optional
// offsets (I, 16): votes[m, i, o] = P[m, i] @ W[i, o] + offsets[i]. Votes
// from poses are formed one routing problem at a time in a per-thread buffer
// of I*O*16 floats, which stays in the core's L2 cache for all passes over
// it, and never exist for the whole batch.
//
// Legend: M routing problems, I input capsules, O output capsules, T
// iterations, h = 4*r + c a pose element (row r, column c), k the inner index
// of P @ W. Every (i, o) pose is one 16-float vector (`Vec`), so the loops
// over h are single vector operations (AVX-512: one register).
//
// The arithmetic and its order follow capsem.ops._em_forward/_em_backward
// (the article's formulas), except that sums over h and i are accumulated in
// other orders (float32 rounding).

#include "em_common.h"

namespace capsem {
namespace {

// The statistics of one M-step after the sums over i (per problem):
// stats = [mean (16), var (16), rr_sum, act] per o.
constexpr int kStat = 34;

struct CostStats {
  std::vector<float> cost;  // (O,)
  float cost_mean, cost_stdv;
};

// log_stdv (O Vecs), cost, cost_mean, cost_stdv and act from rr_sum and var, as _em_forward.
void Activations(const Problem& pb, float lam, const float* rr_sum, const Vec* var, Vec* stdv,
                 Vec* log_stdv, CostStats* cs, float* act) {
  const int64_t O = pb.O;
  cs->cost.resize(O);
  float sum = 0.0f;
  for (int64_t o = 0; o < O; ++o) {
    Vec s, l, vv = var[o];
    for (int h = 0; h < 16; ++h) {
      s[h] = std::sqrt(vv[h]);
      l[h] = std::log(s[h] + kEps);
    }
    stdv[o] = s;
    log_stdv[o] = l;
    cs->cost[o] = HSum(Splat(pb.beta_v[o]) + l) * rr_sum[o];
    sum += cs->cost[o];
  }
  cs->cost_mean = sum / static_cast<float>(O);
  float var_sum = 0.0f;
  for (int64_t o = 0; o < O; ++o) {
    const float d = cs->cost[o] - cs->cost_mean;
    var_sum += d * d;
  }
  float cost_var = var_sum / static_cast<float>(O);
  if (pb.stable) cost_var += kEps;
  cs->cost_stdv = std::sqrt(cost_var);
  for (int64_t o = 0; o < O; ++o) {
    const float x =
        lam * (pb.beta_a[o] + (cs->cost_mean - cs->cost[o]) / (cs->cost_stdv + kEps));
    act[o] = 1.0f / (1.0f + std::exp(-x));
  }
}

inline Vec TwoVar(Vec var, Vec stdv, bool stable) {
  return stable ? 2.0f * var : 2.0f * (stdv * stdv);
}

// Per-thread buffers. Per-(o, i) scalars are stored o-major with rows of
// i_pad = I rounded up to 16 (tails zero), so that loops over i are vector
// loops and the sweeps over the votes run column by column (one o at a time,
// its I votes then in L1 for a second sweep).
struct Scratch {
  // backward: also the buffers of the reverse pass (gv, g_log_stdv, q, g_rr,
  // dot, g_act, g_cost), which the forward op does not use.
  Scratch(const Problem& pb, bool backward)
      : i_pad((pb.I + 15) / 16 * 16),
        votes(pb.I * pb.O), gv(backward ? pb.I * pb.O : 0),
        mean(pb.O), var(pb.O), stdv(pb.O), log_stdv(pb.O), g_log_stdv(backward ? pb.O : 0),
        rr(pb.O * i_pad), rrp(pb.O * i_pad), zz(pb.O * i_pad),
        q(backward ? pb.O * i_pad : 0), g_rr(backward ? pb.O * i_pad : 0), a_pad(i_pad),
        dot(backward ? i_pad : 0), rr_sum(pb.O), act(pb.O),
        g_act(backward ? pb.O : 0), g_cost(backward ? pb.O : 0) {}
  int64_t i_pad;
  VecBuffer votes, gv;  // (O, I) Vecs
  VecBuffer mean, var, stdv, log_stdv, g_log_stdv;
  VecBuffer rr, rrp, zz, q, g_rr, a_pad, dot;  // (O, i_pad) or (i_pad) floats, as Vecs
  std::vector<float> rr_sum, act, g_act, g_cost;
  CostStats cs;
  float* Row(VecBuffer& b, int64_t o) { return reinterpret_cast<float*>(b.data()) + o * i_pad; }
  float* Flat(VecBuffer& b) { return reinterpret_cast<float*>(b.data()); }
};

// The votes of problem m as (O, I) Vecs in s->votes.
const Vec* ProblemVotes(const Problem& pb, const float* src, int64_t m, Scratch* s) {
  return VotesOfProblem(pb, src, m, s->votes.data());
}

// Copies rows (O, I) into the padded (O, i_pad) buffer, tails zero; fill if src is null.
void LoadRows(const Problem& pb, Scratch* s, const float* src, float fill, VecBuffer& dst) {
  for (int64_t o = 0; o < pb.O; ++o) {
    float* row = s->Row(dst, o);
    if (src) {
      std::memcpy(row, src + o * pb.I, sizeof(float) * pb.I);
    } else {
      std::fill(row, row + pb.I, fill);
    }
    std::fill(row + pb.I, row + s->i_pad, 0.0f);
  }
}

void LoadA(const Problem& pb, Scratch* s, const float* am) {
  float* ap = s->Flat(s->a_pad);
  std::memcpy(ap, am, sizeof(float) * pb.I);
  std::fill(ap + pb.I, ap + s->i_pad, 0.0f);
}

// rr' = rr * a (rows of rrp) and rr_sum = sum_i rr'.
void WeightedAssignments(const Problem& pb, Scratch* s) {
  const float* ap = s->Flat(s->a_pad);
  for (int64_t o = 0; o < pb.O; ++o) {
    const float* rr = s->Row(s->rr, o);
    float* rrp = s->Row(s->rrp, o);
    Vec sum = Splat(0.0f);
    for (int64_t b = 0; b < s->i_pad; b += 16) {
      const Vec r = Load(rr + b) * Load(ap + b);
      Store(rrp + b, r);
      sum += r;
    }
    s->rr_sum[o] = HSum(sum);
  }
}

// The M-step's sums over i, column by column: mean and var (O Vecs).
void MStep(const Problem& pb, const Vec* v, Scratch* s) {
  const int64_t I = pb.I, O = pb.O;
  WeightedAssignments(pb, s);
  for (int64_t o = 0; o < O; ++o) {
    const float* rrp = s->Row(s->rrp, o);
    float& rr_sum = s->rr_sum[o];
    if (pb.stable) rr_sum += kEps;
    Vec a0 = Splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 <= I; i += 4) {
      a0 += rrp[i] * v[o * I + i];
      a1 += rrp[i + 1] * v[o * I + i + 1];
      a2 += rrp[i + 2] * v[o * I + i + 2];
      a3 += rrp[i + 3] * v[o * I + i + 3];
    }
    for (; i < I; ++i) a0 += rrp[i] * v[o * I + i];
    const Vec mean = ((a0 + a1) + (a2 + a3)) / rr_sum;
    s->mean[o] = mean;
    a0 = a1 = a2 = a3 = Splat(0.0f);
    for (i = 0; i + 4 <= I; i += 4) {
      const Vec d0 = v[o * I + i] - mean, d1 = v[o * I + i + 1] - mean;
      const Vec d2 = v[o * I + i + 2] - mean, d3 = v[o * I + i + 3] - mean;
      a0 += rrp[i] * (d0 * d0);
      a1 += rrp[i + 1] * (d1 * d1);
      a2 += rrp[i + 2] * (d2 * d2);
      a3 += rrp[i + 3] * (d3 * d3);
    }
    for (; i < I; ++i) {
      const Vec d = v[o * I + i] - mean;
      a0 += rrp[i] * (d * d);
    }
    Vec var = ((a0 + a1) + (a2 + a3)) / rr_sum;
    if (pb.stable) var += kEps;
    s->var[o] = var;
  }
}

// The E-step: rr = softmax_o(log(act + eps) - sum_h dev^2 / two_var - sum_h log_stdv).
void EStep(const Problem& pb, const Vec* v, Scratch* s) {
  const int64_t I = pb.I, O = pb.O, i_pad = s->i_pad;
  Vec x[16];
  for (int64_t o = 0; o < O; ++o) {
    const Vec inv = 1.0f / TwoVar(s->var[o], s->stdv[o], pb.stable);
    const Vec mean = s->mean[o];
    const float lact = std::log(s->act[o] + kEps), lsum = HSum(s->log_stdv[o]);
    float* zz = s->Row(s->zz, o);
    for (int64_t b = 0; b < i_pad; b += 16) {
      for (int j = 0; j < 16; ++j) {
        if (b + j < I) {
          const Vec d = v[o * I + b + j] - mean;
          x[j] = d * d * inv;
        } else {
          x[j] = Splat(0.0f);
        }
      }
      Store(zz + b, lact + (-Sums16(x) - lsum));
    }
  }
  for (int64_t b = 0; b < i_pad; b += 16) {
    Vec mx = Load(s->Row(s->zz, 0) + b);
    for (int64_t o = 1; o < O; ++o) {
      const Vec z = Load(s->Row(s->zz, o) + b);
      mx = Select(z > mx, z, mx);
    }
    Vec sum = Splat(0.0f);
    for (int64_t o = 0; o < O; ++o) {
      float* zz = s->Row(s->zz, o) + b;
      const Vec e = Exp(Load(zz) - mx);
      Store(zz, e);
      sum += e;
    }
    for (int64_t o = 0; o < O; ++o) Store(s->Row(s->rr, o) + b, Load(s->Row(s->zz, o) + b) / sum);
  }
}

// Forward routing of problem m. Writes the statistics of every iteration,
// stats[t] (O, 34) = [mean (16), var (16), rr_sum, act] per o, and the
// assignments of the E-steps, saved_rr[t] (O, I).
void Forward(const Problem& pb, const float* src, const float* a, int64_t m, Scratch* s,
             float* stats, int64_t stats_stride, float* saved_rr, int64_t rr_stride) {
  const int64_t I = pb.I, O = pb.O;
  const Vec* v = ProblemVotes(pb, src, m, s);
  LoadA(pb, s, a + m * I);
  LoadRows(pb, s, nullptr, 1.0f / static_cast<float>(O), s->rr);
  for (int t = 0; t < pb.T; ++t) {
    MStep(pb, v, s);
    Activations(pb, pb.lams[t], s->rr_sum.data(), s->var.data(), s->stdv.data(),
                s->log_stdv.data(), &s->cs, s->act.data());
    float* st = stats + t * stats_stride;
    for (int64_t o = 0; o < O; ++o) {
      Store(st + kStat * o, s->mean[o]);
      Store(st + kStat * o + 16, s->var[o]);
      st[kStat * o + 32] = s->rr_sum[o];
      st[kStat * o + 33] = s->act[o];
    }
    if (t == pb.T - 1) break;
    EStep(pb, v, s);
    for (int64_t o = 0; o < O; ++o)
      std::memcpy(saved_rr + t * rr_stride + o * I, s->Row(s->rr, o), sizeof(float) * I);
  }
}

// Gradient of problem m (the reverse pass of capsem.ops._em_backward).
// Writes d votes into s->gv (O, I) Vecs, g_a (I,)
// and adds to g_beta_v, g_beta_a (O,).
void Backward(const Problem& pb, const float* src, const float* a, int64_t m, Scratch* s,
              const float* stats, int64_t stats_stride, const float* saved_rr,
              int64_t rr_stride, const float* g_mean_out, const float* g_act_out,
              float* g_a, float* g_beta_v, float* g_beta_a) {
  const int64_t I = pb.I, O = pb.O, i_pad = s->i_pad;
  const int T = pb.T;
  const Vec* v = ProblemVotes(pb, src, m, s);
  LoadA(pb, s, a + m * I);
  const float* ap = s->Flat(s->a_pad);
  float* dot = s->Flat(s->dot);
  Vec* gv = s->gv.data();  // (O, I)
  for (int64_t j = 0; j < I * O; ++j) gv[j] = Splat(0.0f);
  std::fill(g_a, g_a + I, 0.0f);
  Vec x[16];
  for (int t = T - 1; t >= 0; --t) {
    const bool last = t == T - 1;
    const float lam = pb.lams[t];
    // rr and rr' of this M-step, then its saved statistics (rr_sum as saved).
    LoadRows(pb, s, t > 0 ? saved_rr + (t - 1) * rr_stride : nullptr,
             1.0f / static_cast<float>(O), s->rr);
    WeightedAssignments(pb, s);
    const float* st = stats + t * stats_stride;
    for (int64_t o = 0; o < O; ++o) {
      s->mean[o] = Load(st + kStat * o);
      s->var[o] = Load(st + kStat * o + 16);
      s->rr_sum[o] = st[kStat * o + 32];
    }
    Activations(pb, lam, s->rr_sum.data(), s->var.data(), s->stdv.data(), s->log_stdv.data(),
                &s->cs, s->act.data());
    for (int64_t o = 0; o < O; ++o) {
      s->act[o] = st[kStat * o + 33];
      s->g_act[o] = last ? g_act_out[m * O + o] : 0.0f;
      s->g_log_stdv[o] = Splat(0.0f);
    }
    if (!last) {
      // E-step t: rr_next = softmax_o(zz); q = -d loss / d zz, from g_rr (d loss / d rr_next).
      LoadRows(pb, s, saved_rr + t * rr_stride, 0.0f, s->zz);  // rr_next
      for (int64_t b = 0; b < i_pad; b += 16) {
        Vec d = Splat(0.0f);
        for (int64_t o = 0; o < O; ++o)
          d += Load(s->Row(s->zz, o) + b) * Load(s->Row(s->g_rr, o) + b);
        Store(dot + b, d);
      }
      for (int64_t o = 0; o < O; ++o) {
        const float* rn = s->Row(s->zz, o);
        const float* grn = s->Row(s->g_rr, o);
        float* q = s->Row(s->q, o);
        Vec sum = Splat(0.0f);
        for (int64_t b = 0; b < i_pad; b += 16) {
          const Vec g_zz = Load(rn + b) * (Load(grn + b) - Load(dot + b));
          Store(q + b, -g_zz);
          sum += g_zz;
        }
        const float g_zz_sum = HSum(sum);
        s->g_act[o] += g_zz_sum / (s->act[o] + kEps);
        s->g_log_stdv[o] -= g_zz_sum;
      }
    }
    // act = sigmoid(lam * (beta_a + (cost_mean - cost) / (cost_stdv + eps)))
    const CostStats& cs = s->cs;
    const float inv = 1.0f / (cs.cost_stdv + kEps);
    float sum_gx = 0.0f, sum_gx_dcost = 0.0f;
    for (int64_t o = 0; o < O; ++o) {
      const float g_x = s->g_act[o] * s->act[o] * (1.0f - s->act[o]);
      g_beta_a[o] += lam * g_x;
      sum_gx += g_x;
      sum_gx_dcost += g_x * (cs.cost[o] - cs.cost_mean);
      s->g_cost[o] = -lam * g_x * inv;
    }
    float g_cost_mean = lam * sum_gx * inv;
    const float g_cost_var = lam * sum_gx_dcost * (inv * inv) / (2.0f * cs.cost_stdv);
    float sum_dc = 0.0f;
    for (int64_t o = 0; o < O; ++o) sum_dc += g_cost_var * 2.0f * (cs.cost[o] - cs.cost_mean);
    g_cost_mean -= sum_dc / static_cast<float>(O);
    for (int64_t o = 0; o < O; ++o) {
      s->g_cost[o] += g_cost_var * 2.0f * (cs.cost[o] - cs.cost_mean) / static_cast<float>(O);
      s->g_cost[o] += g_cost_mean / static_cast<float>(O);
    }
    for (int64_t o = 0; o < O; ++o) {
      const Vec mean = s->mean[o];
      const float rr_sum = s->rr_sum[o];
      const float* rrp = s->Row(s->rrp, o);
      const float* q = s->Row(s->q, o);
      Vec g_mean = last ? Load(g_mean_out + 16 * (m * O + o)) : Splat(0.0f);
      Vec g_var = Splat(0.0f), g_stdv = Splat(0.0f);
      Vec s_fac = Splat(0.0f);
      if (!last) {
        // sum_i q dev and sum_i q dev^2
        Vec a0 = Splat(0.0f), a1 = a0, b0 = a0, b1 = a0;
        int64_t i = 0;
        for (; i + 2 <= I; i += 2) {
          const Vec d0 = v[o * I + i] - mean, d1 = v[o * I + i + 1] - mean;
          const Vec qd0 = q[i] * d0, qd1 = q[i + 1] * d1;
          a0 += qd0;
          a1 += qd1;
          b0 += qd0 * d0;
          b1 += qd1 * d1;
        }
        for (; i < I; ++i) {
          const Vec d = v[o * I + i] - mean;
          const Vec qd = q[i] * d;
          a0 += qd;
          b0 += qd * d;
        }
        const Vec q_dev = a0 + a1, q_dev2 = b0 + b1;
        const Vec two_var = TwoVar(s->var[o], s->stdv[o], pb.stable);
        const Vec g_two_var = -q_dev2 / (two_var * two_var);
        if (pb.stable) {
          g_var += 2.0f * g_two_var;
        } else {
          g_stdv += 4.0f * s->stdv[o] * g_two_var;
        }
        s_fac = 2.0f / two_var;
        g_mean -= s_fac * q_dev;
      }
      // cost = sum_h (beta_v + log_stdv) * rr_sum
      const float g_cost = s->g_cost[o];
      float g_rr_sum = g_cost * HSum(Splat(pb.beta_v[o]) + s->log_stdv[o]);
      const Vec g_log_stdv = s->g_log_stdv[o] + g_cost * rr_sum;
      g_beta_v[o] += 16.0f * g_cost * rr_sum;
      g_stdv += g_log_stdv / (s->stdv[o] + kEps);
      g_var += g_stdv / (2.0f * s->stdv[o]);
      const Vec var_raw = pb.stable ? s->var[o] - kEps : s->var[o];
      g_rr_sum -= HSum(var_raw * g_var + mean * g_mean) / rr_sum;
      // d loss / d rr' (into g_rr, o's row) and this iteration's vote gradient:
      // gv += rr' * g_mean / rr_sum + dev * (q * s + rr' * 2 g_var / rr_sum).
      const Vec mfac = g_mean / rr_sum, ufac = 2.0f * g_var / rr_sum;
      float* g_rrp = s->Row(s->g_rr, o);
      for (int64_t b = 0; b < i_pad; b += 16) {
        for (int j = 0; j < 16; ++j) {
          const int64_t i = b + j;
          if (i >= I) {
            x[j] = Splat(0.0f);
            continue;
          }
          const Vec vv = v[o * I + i];
          const Vec d = vv - mean;
          x[j] = d * d * g_var + vv * g_mean;
          Vec scale = rrp[i] * ufac;
          if (!last) scale += q[i] * s_fac;
          gv[o * I + i] += rrp[i] * mfac + d * scale;
        }
        Store(g_rrp + b, Sums16(x) / rr_sum + g_rr_sum);
      }
    }
    // rr' = rr * a: d a and d rr' -> d rr_next of the E-step before.
    for (int64_t b = 0; b < i_pad; b += 16) {
      Vec ga = Splat(0.0f);
      const Vec av = Load(ap + b);
      for (int64_t o = 0; o < O; ++o) {
        float* g = s->Row(s->g_rr, o) + b;
        const Vec g_rrp = Load(g);
        ga += g_rrp * Load(s->Row(s->rr, o) + b);
        Store(g, g_rrp * av);
      }
      for (int j = 0; j < 16 && b + j < I; ++j) g_a[b + j] += ga[j];
    }
  }
}


// The attributes and inputs both ops share.
class EmRoutingBase : public OpKernel {
 public:
  explicit EmRoutingBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("inverse_temperatures", &lams_));
    OP_REQUIRES(ctx, !lams_.empty(),
                tensorflow::errors::InvalidArgument(
                    "CapsemEmRouting: inverse_temperatures needs one value per iteration"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("stable", &stable_));
    iterations_ = static_cast<int>(lams_.size());
  }

 protected:
  // Checks the inputs and fills pb (w transposed into wt); returns M.
  absl::Status Prepare(OpKernelContext* ctx, Problem* pb, std::vector<float>* wt, int64_t* M) {
    pb->stable = stable_;
    pb->lams = lams_;
    TF_RETURN_IF_ERROR(CheckInputs(ctx, "CapsemEmRouting", iterations_, pb, M));
    TransposeW(pb, wt);
    return absl::OkStatus();
  }

  std::vector<float> lams_;  // one inverse temperature per iteration
  int iterations_;
  bool stable_;
};

class EmRoutingOp : public EmRoutingBase {
 public:
  using EmRoutingBase::EmRoutingBase;

  void Compute(OpKernelContext* ctx) override {
    Problem pb;
    std::vector<float> wt;
    int64_t M;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &pb, &wt, &M));
    const int T = iterations_;
    const int64_t I = pb.I, O = pb.O;
    Tensor *mean, *act, *saved_rr, *stats;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, O, 16}), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({M, O}), &act));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({T - 1, M, O, I}), &saved_rr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({T, M, O, kStat}), &stats));
    const float* src = ctx->input(0).flat<float>().data();
    const float* a = ctx->input(3).flat<float>().data();
    float* mean_p = mean->flat<float>().data();
    float* act_p = act->flat<float>().data();
    float* rr_p = saved_rr->flat<float>().data();
    float* st_p = stats->flat<float>().data();
    if (M == 0) return;
    const int64_t st_stride = M * O * kStat, rr_stride = M * I * O;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // Chunks of problems, each with one scratch buffer; several per thread
    // so that threads that finish early take over the rest.
    const int64_t chunks = std::min<int64_t>(M, std::max(1, pool->NumThreads()) * 8);
    auto work = [&](int64_t cb, int64_t ce) {
      ScopedFlushDenormal flush;
      Scratch s(pb, /*backward=*/false);
      for (int64_t m = M * cb / chunks; m < M * ce / chunks; ++m) {
        Forward(pb, src, a, m, &s, st_p + m * O * kStat, st_stride, rr_p + m * I * O, rr_stride);
        const float* last = st_p + (T - 1) * st_stride + m * O * kStat;
        for (int64_t o = 0; o < O; ++o) {
          std::memcpy(mean_p + 16 * (m * O + o), last + kStat * o, 16 * sizeof(float));
          act_p[m * O + o] = last[kStat * o + 33];
        }
      }
    };
    pool->ParallelFor(chunks, (M / chunks + 1) * I * O * 16 * 40 * T, work);
  }
};

class EmRoutingGradOp : public EmRoutingBase {
 public:
  using EmRoutingBase::EmRoutingBase;

  void Compute(OpKernelContext* ctx) override {
    Problem pb;
    std::vector<float> wt;
    int64_t M;
    OP_REQUIRES_OK(ctx, Prepare(ctx, &pb, &wt, &M));
    const int T = iterations_;
    const int64_t I = pb.I, O = pb.O;
    const float* src = ctx->input(0).flat<float>().data();
    const float* a = ctx->input(3).flat<float>().data();
    const float* rr_p = ctx->input(6).flat<float>().data();
    const float* st_p = ctx->input(7).flat<float>().data();
    const float* g_mean = ctx->input(8).flat<float>().data();
    const float* g_act = ctx->input(9).flat<float>().data();
    OP_REQUIRES(ctx, ctx->input(6).NumElements() == (T - 1) * M * I * O &&
                         ctx->input(7).NumElements() == T * M * O * kStat &&
                         ctx->input(8).NumElements() == M * O * 16 &&
                         ctx->input(9).NumElements() == M * O,
                tensorflow::errors::InvalidArgument("CapsemEmRoutingGrad: inconsistent shapes"));
    Tensor *g_src, *g_w, *g_a, *g_bv, *g_ba;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &g_src));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, pb.from_poses ? ctx->input(1).shape() : TensorShape({0}), &g_w));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({M, I}), &g_a));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({O}), &g_bv));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({O}), &g_ba));
    float* g_src_p = g_src->flat<float>().data();
    if (M == 0) {
      std::fill(g_w->flat<float>().data(), g_w->flat<float>().data() + g_w->NumElements(), 0.0f);
      std::fill(g_bv->flat<float>().data(), g_bv->flat<float>().data() + O, 0.0f);
      std::fill(g_ba->flat<float>().data(), g_ba->flat<float>().data() + O, 0.0f);
      return;
    }
    float* g_a_p = g_a->flat<float>().data();
    const int64_t st_stride = M * O * kStat, rr_stride = M * I * O;

    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    // Reductions over m (d w, d beta) go to one accumulator per chunk of
    // problems, summed in chunk order. The chunks are fixed (not per
    // thread), so the result depends neither on timing nor on the number of
    // threads; 16 of them balance the load over a few threads.
    const int64_t chunks = std::min<int64_t>(M, kGradChunks);
    const int64_t wsize = pb.from_poses ? I * O * 16 : 0;
    std::vector<float> acc_w(chunks * wsize, 0.0f), acc_b(chunks * 2 * O, 0.0f);
    auto work = [&](int64_t cb, int64_t ce) {
      ScopedFlushDenormal flush;
      Scratch s(pb, /*backward=*/true);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t begin = M * c / chunks, end = M * (c + 1) / chunks;
        float* bv = acc_b.data() + c * 2 * O;
        for (int64_t m = begin; m < end; ++m) {
          Backward(pb, src, a, m, &s, st_p + m * O * kStat, st_stride, rr_p + m * I * O,
                   rr_stride, g_mean, g_act, g_a_p + m * I, bv, bv + O);
          if (pb.from_poses) {
            PoseGradients(pb, src + m * I * 16, s.gv.data(), g_src_p + m * I * 16,
                          acc_w.data() + c * wsize);
          } else {  // d votes (I, O, 16)
            float* g_votes = g_src_p + m * I * O * 16;
            for (int64_t i = 0; i < I; ++i)
              for (int64_t o = 0; o < O; ++o) Store(g_votes + 16 * (i * O + o), s.gv[o * I + i]);
          }
        }
      }
    };
    pool->ParallelFor(chunks, (M / chunks + 1) * I * O * 16 * 60 * T, work);
    float* gw = g_w->flat<float>().data();
    if (pb.from_poses) {
      std::fill(gw, gw + wsize, 0.0f);
      for (int64_t c = 0; c < chunks; ++c)  // (O, I, 16) accumulators -> (I, O, 16)
        for (int64_t o = 0; o < O; ++o)
          for (int64_t i = 0; i < I; ++i)
            for (int h = 0; h < 16; ++h)
              gw[16 * (i * O + o) + h] += acc_w[c * wsize + 16 * (o * I + i) + h];
    }
    float* gbv = g_bv->flat<float>().data();
    float* gba = g_ba->flat<float>().data();
    std::fill(gbv, gbv + O, 0.0f);
    std::fill(gba, gba + O, 0.0f);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t o = 0; o < O; ++o) {
        gbv[o] += acc_b[c * 2 * O + o];
        gba[o] += acc_b[c * 2 * O + O + o];
      }
  }
};

}  // namespace
}  // namespace capsem

using tensorflow::shape_inference::InferenceContext;

REGISTER_OP("CapsemEmRouting")
    .Input("src: float")
    .Input("w: float")
    .Input("offsets: float")
    .Input("a: float")
    .Input("beta_v: float")
    .Input("beta_a: float")
    .Attr("inverse_temperatures: list(float)")
    .Attr("stable: bool = false")
    .Output("mean: float")
    .Output("act: float")
    .Output("saved_rr: float")
    .Output("stats: float")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<float> lams;
      TF_RETURN_IF_ERROR(c->GetAttr("inverse_temperatures", &lams));
      const int64_t iterations = static_cast<int64_t>(lams.size());
      auto src = c->input(0);
      auto m = c->Dim(src, 0), i = c->Dim(src, 1);
      auto o = c->Rank(src) == 4 ? c->Dim(src, 2) : c->Dim(c->input(1), 1);
      c->set_output(0, c->MakeShape({m, o, 16}));
      c->set_output(1, c->MakeShape({m, o}));
      c->set_output(2, c->MakeShape({iterations - 1, m, o, i}));
      c->set_output(3, c->MakeShape({iterations, m, o, capsem::kStat}));
      return absl::OkStatus();
    });

REGISTER_OP("CapsemEmRoutingGrad")
    .Input("src: float")
    .Input("w: float")
    .Input("offsets: float")
    .Input("a: float")
    .Input("beta_v: float")
    .Input("beta_a: float")
    .Input("saved_rr: float")
    .Input("stats: float")
    .Input("g_mean: float")
    .Input("g_act: float")
    .Attr("inverse_temperatures: list(float)")
    .Attr("stable: bool = false")
    .Output("g_src: float")
    .Output("g_w: float")
    .Output("g_a: float")
    .Output("g_beta_v: float")
    .Output("g_beta_a: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Rank(c->input(0)) == 3 ? c->input(1) : c->MakeShape({0}));
      c->set_output(2, c->input(3));
      auto o = c->NumElements(c->input(4));
      c->set_output(3, c->Vector(o));
      c->set_output(4, c->Vector(o));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("CapsemEmRouting").Device(tensorflow::DEVICE_CPU),
                        capsem::EmRoutingOp);
REGISTER_KERNEL_BUILDER(Name("CapsemEmRoutingGrad").Device(tensorflow::DEVICE_CPU),
                        capsem::EmRoutingGradOp);
