// Native CPU kernels of the paper's EM routing (capsem.paper_routing,
// routing="paper"), the sibling of em_routing.cc (the article's routing).
//
// Two TensorFlow ops:
//   CapsemEmRoutingPaper      em_routing_paper of N examples;
//   CapsemEmRoutingPaperGrad  its gradient, a hand-derived reverse pass equal
//                             to TensorFlow's autodiff of em_routing_paper
//                             (with or without the gradient through the
//                             E-steps' assignments).
//
// Legend:
//   N   examples; P output positions per example (OH*OW, or 1)
//   M   routing problems, M = N*P, m = n*P + p (an output position of one example)
//   I   children (input capsules) routed to one output position; a "slot" is
//       one (m, i). Conv layers: I = K*K*C, i = k*C + c (k the window slot,
//       c the child type)
//   O   parent (output capsule) types; T iterations
//   S   children of one example: H*W*C in a conv layer (the grid positions
//       times the child types), P*I without a child map (every slot its own
//       child)
//   h   a pose element (16 per pose, one Vec)
//
// The votes come as in em_routing.cc: src = votes (M, I, O, 16), or poses
// (M, I, 16) with w (I, O, 16) and optional offsets (I, 16), formed per
// problem in a per-thread buffer (em_common.h).
//
// Two M-step costs (the attribute `cost`, capsem.paper_routing.M_STEPS), each
// a policy struct below that the phases are instantiated with at the kernel
// entry (Run): NormalisedCost (m_step_paper) and UnnormalisedCost
// (m_step_unnormalised, YuxianMeng's M-step). The inverse temperatures are the
// attribute `inverse_temperatures` (one per iteration), or, when the input
// `inverse_temperature` holds one value (--lambda_schedule=ramp: a value that
// training changes between steps), that value at every iteration.
//
// Unlike the article's routing, the E-step of a conv layer couples the
// output positions of one example: a child's assignments are normalised over
// every (position, type) whose window holds it. Each iteration is therefore
// a sequence of phases, per problem m or per example n:
//
//   forward, iteration t
//     A (per m): rr_t (the normalised E-step output of t - 1, or the initial
//        split); the M-step -> stats[t]; unless t is the last, the E-step's
//        numerators e = exp(zz - max_o zz) per slot, with the slot's max and
//        sum over o (an online softmax)
//     R (per n): per child, the max and the sum over its slots -> the
//        factor that normalises each slot's e: rr_{t+1} = e * scale
//   backward, iteration t = T-1 .. 0 (only T-1 without the assignment
//   gradient), then V
//     B (per m): from d rr_{t+1} (the softmax's reverse needs the per-child
//        dot product sum rr g_rr of R) the E-step's d zz; the reverse of the
//        M-step -> d rr_t, d a, d beta and the factors of the vote gradient
//     R (per n): per child, sum over its slots of rr_t * d rr_t
//     V (per m): the vote gradient of every iteration from its factors, then
//        d poses and d w (or d votes)
//
// Two schedules run these phases on TensorFlow's intra-op thread pool, with
// the same numbers (each phase of each m or n does the same operations in the
// same order, and the reduction of d w over m goes to fixed chunks, see
// EmRoutingPaperGradOp):
//   by example (N >= 2 * threads, see PaperBase::ByExample): one ParallelFor
//     per op over the examples (the gradient: over its chunks of whole
//     examples), each task running every phase of its examples in turn, so
//     no thread waits for the others between phases; one example's votes
//     (P*I*O Vecs) are formed once into a per-thread buffer and reused by
//     every phase when they fit in kVoteCacheBytes (else formed again per
//     phase and problem, as below);
//   by phase (fewer examples): one ParallelFor per phase, over the M problems
//     (A, B), the N examples (R) or the chunks (V), the votes formed again in
//     each phase of each problem.
//
// The arithmetic follows capsem.paper_routing.m_step_paper (or
// m_step_unnormalised) / e_step_paper (the M-step's sums divided by R_j + eps,
// the variance floor, the cost of the policy, a = sigmoid(lambda (beta_a - cost))),
// with sums over h, i and slots accumulated in other orders (float32
// rounding), and the softmax over a child's parents computed from per-slot
// partial results (mathematically the same numbers).

#include <functional>
#include <limits>
#include <string>

#include "em_common.h"

namespace capsem {
namespace {

// stats[t] per (m, o): [mean (16), var (16, with the floor), R_j = sum_i rr a, act].
constexpr int kPaperStat = 34;
// Vote-gradient factors per (t, m, o): [mfac (16), ufac (16)], see BackwardPhase.
constexpr int kFactors = 32;

// The children of one example and the slots that hold them (the C++ side of
// capsem.paper_routing.ChildMap; the identity without a child map).
struct Children {
  int64_t per_example = 0;           // S
  std::vector<int32_t> slot_child;   // (P*I,): child of slot p*I + i
  std::vector<float> rr0;            // (P*I,): the first M-step's assignment, 1 / (O * parents)

  // child_index (P*K*K,): grid position of window slot k of position p
  // (ChildMap.index); num_sources: H*W, 0 without a child map. layer_split:
  // the initial assignments of cost="unnormalised", 1 / (O * P) for every slot
  // of a conv layer (initial_assignments), instead of 1 / (O * parents).
  absl::Status Build(int64_t P, int64_t I, int64_t O, const std::vector<int64_t>& child_index,
                     int64_t num_sources, bool layer_split) {
    slot_child.assign(P * I, 0);
    std::vector<int64_t> count;
    if (num_sources == 0) {  // class layout: every slot is its own child, 1 / O each
      per_example = P * I;
      for (int64_t s = 0; s < P * I; ++s) slot_child[s] = static_cast<int32_t>(s);
      count.assign(P * I, 1);
    } else {
      const int64_t area = P > 0 ? static_cast<int64_t>(child_index.size()) / P : 0;
      if (area < 1 || area * P != static_cast<int64_t>(child_index.size()) || I % area)
        return tensorflow::errors::InvalidArgument(
            "CapsemEmRoutingPaper: child_index must hold positions * K*K entries with I = "
            "K*K*C, got ", child_index.size(), " entries for ", P, " positions and I = ", I);
      const int64_t C = I / area;
      per_example = num_sources * C;
      count.assign(per_example, 0);
      for (int64_t p = 0; p < P; ++p)
        for (int64_t k = 0; k < area; ++k) {
          const int64_t g = child_index[p * area + k];  // grid position in [0, H*W)
          if (g < 0 || g >= num_sources)
            return tensorflow::errors::InvalidArgument(
                "CapsemEmRoutingPaper: child_index entry ", g, " outside [0, ", num_sources, ")");
          for (int64_t c = 0; c < C; ++c) {  // slot i = k*C + c holds child (g, c)
            slot_child[p * I + k * C + c] = static_cast<int32_t>(g * C + c);
            ++count[g * C + c];
          }
        }
    }
    rr0.resize(P * I);
    for (int64_t s = 0; s < P * I; ++s) {  // as initial_assignments: in double, then float
      const int64_t parents = layer_split && num_sources > 0 ? P : count[slot_child[s]];
      rr0[s] = static_cast<float>(1.0 / (static_cast<double>(O) *
                                         static_cast<double>(parents)));
    }
    return absl::OkStatus();
  }
};

struct PaperProblem {
  Problem pb;            // I, O, T, the vote source, beta_v, beta_a, the lambdas
  int64_t N = 0, P = 1;  // M = N*P
  float floor = 0.0f;    // the variance floor
  float data_scale = 0;  // O / I (Gritzman 2019, pitfall 3)
  Children children;
};

// Per-thread buffers: per-(o, i) scalars in rows of i_pad = I rounded up to 16
// (tails zero), as in em_routing.cc.
struct PaperScratch {
  PaperScratch(const PaperProblem& pp, bool backward)
      : I(pp.pb.I), O(pp.pb.O), i_pad((pp.pb.I + 15) / 16 * 16),
        votes(I * O), gv(backward ? I * O : 0), mean(O), var(O), g_mean(O), g_var(O),
        rr(O * i_pad), rrp(O * i_pad), zz(O * i_pad), a_pad(i_pad), rs(O), act(O) {}
  int64_t I, O, i_pad;
  VecBuffer votes, gv;  // (O, I) Vecs
  VecBuffer mean, var, g_mean, g_var;  // (O) Vecs
  VecBuffer rr, rrp, zz, a_pad;  // (O, i_pad) or (i_pad) floats, as Vecs
  std::vector<float> rs, act;  // (O,)
  float* Row(VecBuffer& b, int64_t o) { return reinterpret_cast<float*>(b.data()) + o * i_pad; }
  float* Flat(VecBuffer& b) { return reinterpret_cast<float*>(b.data()); }
};

// The M-step costs. Each gives the variance from the weighted one (raw, no
// floor), the cost of parent o, and the reverse of both: from d cost and d var
// (the E-step's, in *g_var) it adds d beta_v, returns d R_j, turns *g_var into
// d raw and gives the raw variance (for the reverse of the weighted sums).

// m_step_paper (cost="normalised"): var = raw + floor (Gritzman 2019, pitfall 2);
// cost = sum_h (beta_v + 0.5 log var) * R_j * O / I (paper Sec. 3; the data
// normalised, pitfall 3).
struct NormalisedCost {
  static Vec Variance(Vec raw, float floor) { return raw + floor; }
  static Vec LogStdv(Vec var) {
    Vec log_stdv;
    for (int h = 0; h < 16; ++h) log_stdv[h] = 0.5f * std::log(var[h]);
    return log_stdv;
  }
  static float Cost(const PaperProblem& pp, int64_t o, Vec var, float rs) {
    return HSum(Splat(pp.pb.beta_v[o]) + LogStdv(var)) * (rs * pp.data_scale);
  }
  static float Reverse(const PaperProblem& pp, int64_t o, Vec var, float rs, float g_cost,
                       float* g_beta_v, Vec* g_var, Vec* raw) {
    const float g_rs = g_cost * HSum(Splat(pp.pb.beta_v[o]) + LogStdv(var)) * pp.data_scale;
    const float g_sum_h = g_cost * (rs * pp.data_scale);  // d sum_h (beta_v + L_h)
    *g_beta_v += 16.0f * g_sum_h;
    *g_var += 0.5f * g_sum_h / var;
    *raw = var - pp.floor;
    return g_rs;
  }
};

// m_step_unnormalised (cost="unnormalised", YuxianMeng's PyTorch M-step):
// var = max(raw, floor); cost = sum_h (beta_v + log var) * R_j. The reverse of
// the max passes d var where raw > floor (TensorFlow's passes it where raw >=
// floor: the two differ only where raw equals the floor exactly).
struct UnnormalisedCost {
  static Vec Variance(Vec raw, float floor) {
    const Vec fl = Splat(floor);
    return Select(raw > fl, raw, fl);
  }
  static Vec LogVar(Vec var) {
    Vec log_var;
    for (int h = 0; h < 16; ++h) log_var[h] = std::log(var[h]);
    return log_var;
  }
  static float Cost(const PaperProblem& pp, int64_t o, Vec var, float rs) {
    return HSum(Splat(pp.pb.beta_v[o]) + LogVar(var)) * rs;
  }
  static float Reverse(const PaperProblem& pp, int64_t o, Vec var, float rs, float g_cost,
                       float* g_beta_v, Vec* g_var, Vec* raw) {
    const float g_rs = g_cost * HSum(Splat(pp.pb.beta_v[o]) + LogVar(var));
    const float g_sum_h = g_cost * rs;  // d sum_h (beta_v + log var_h)
    *g_beta_v += 16.0f * g_sum_h;
    const Vec g = *g_var + g_sum_h / var;
    const Vec fl = Splat(pp.floor), zero = Splat(0.0f);
    *g_var = Select(var > fl, g, zero);  // d raw: 0 where the floor holds
    *raw = var;  // where d raw is not 0
    return g_rs;
  }
};

// a of problem m into s->a_pad (I,), tails zero.
void LoadActivations(PaperScratch* s, const float* am) {
  float* ap = s->Flat(s->a_pad);
  std::memcpy(ap, am, sizeof(float) * s->I);
  std::fill(ap + s->I, ap + s->i_pad, 0.0f);
}

// rr_t of problem m into s->rr (O, i_pad): the initial split (t == 0, rr0 of
// its slots) or the saved E-step output saved_rr (O, I) of problem m.
void LoadAssignments(const PaperProblem& pp, int64_t m, const float* saved, PaperScratch* s) {
  const int64_t I = s->I, O = s->O;
  const float* rr0 = pp.children.rr0.data() + (m % pp.P) * I;  // (I,)
  for (int64_t o = 0; o < O; ++o) {
    float* row = s->Row(s->rr, o);
    std::memcpy(row, saved ? saved + o * I : rr0, sizeof(float) * I);
    std::fill(row + I, row + s->i_pad, 0.0f);
  }
}

// rr' = rr * a (rows of s->rrp) and R_j = sum_i rr' (s->rs).
void WeightedRows(PaperScratch* s) {
  const float* ap = s->Flat(s->a_pad);
  for (int64_t o = 0; o < s->O; ++o) {
    const float* rr = s->Row(s->rr, o);
    float* rrp = s->Row(s->rrp, o);
    Vec sum = Splat(0.0f);
    for (int64_t b = 0; b < s->i_pad; b += 16) {
      const Vec r = Load(rr + b) * Load(ap + b);
      Store(rrp + b, r);
      sum += r;
    }
    s->rs[o] = HSum(sum);
  }
}

// The M-step of one problem from s->rrp and s->rs: mean, var (O Vecs) and act (O).
//   mean = sum_i rr' V / (R_j + eps);  var = Cost::Variance(sum_i rr' (V - mean)^2 / (R_j + eps))
//   act = sigmoid(lambda (beta_a - Cost::Cost))
template <class Cost>
void MStep(const PaperProblem& pp, float lam, const Vec* v, PaperScratch* s) {
  const int64_t I = s->I, O = s->O;
  for (int64_t o = 0; o < O; ++o) {
    const float* rrp = s->Row(s->rrp, o);
    const Vec* vo = v + o * I;  // (I) Vecs
    const float denom = s->rs[o] + kEps;
    Vec a0 = Splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 4 <= I; i += 4) {
      a0 += rrp[i] * vo[i];
      a1 += rrp[i + 1] * vo[i + 1];
      a2 += rrp[i + 2] * vo[i + 2];
      a3 += rrp[i + 3] * vo[i + 3];
    }
    for (; i < I; ++i) a0 += rrp[i] * vo[i];
    const Vec mean = ((a0 + a1) + (a2 + a3)) / denom;
    a0 = a1 = a2 = a3 = Splat(0.0f);
    for (i = 0; i + 4 <= I; i += 4) {
      const Vec d0 = vo[i] - mean, d1 = vo[i + 1] - mean;
      const Vec d2 = vo[i + 2] - mean, d3 = vo[i + 3] - mean;
      a0 += rrp[i] * (d0 * d0);
      a1 += rrp[i + 1] * (d1 * d1);
      a2 += rrp[i + 2] * (d2 * d2);
      a3 += rrp[i + 3] * (d3 * d3);
    }
    for (; i < I; ++i) {
      const Vec d = vo[i] - mean;
      a0 += rrp[i] * (d * d);
    }
    const Vec var = Cost::Variance(((a0 + a1) + (a2 + a3)) / denom, pp.floor);
    s->mean[o] = mean;
    s->var[o] = var;
    const float cost = Cost::Cost(pp, o, var, s->rs[o]);
    s->act[o] = 1.0f / (1.0f + std::exp(-(lam * (pp.pb.beta_a[o] - cost))));
  }
}

// The forward buffers shared by the phases.
struct ForwardBuffers {
  float* stats;      // (T, M, O, kPaperStat)
  float* saved_rr;   // (T-1, M, O, I): e-numerators, then (phase A of t + 1) rr_{t+1}
  float* slot_max;   // (M, I): max_o zz; after phase R the slot's scale
  float* slot_sum;   // (M, I): sum_o exp(zz - max)
};

// Phase A of iteration t for problem m (see the top of the file). votes: the
// problem's (O, I) votes if already formed, else (null) formed into s->votes.
template <class Cost>
void ForwardPhase(const PaperProblem& pp, const float* src, const float* a, int64_t m, int t,
                  const ForwardBuffers& fb, PaperScratch* s, const Vec* votes = nullptr) {
  const Problem& pb = pp.pb;
  const int64_t I = pb.I, O = pb.O, M = pp.N * pp.P, i_pad = s->i_pad;
  const Vec* v = votes ? votes : VotesOfProblem(pb, src, m, s->votes.data());  // (O, I) Vecs
  LoadActivations(s, a + m * I);
  if (t == 0) {
    LoadAssignments(pp, m, nullptr, s);
  } else {  // rr_t = e * scale, normalised in place in saved_rr[t - 1]
    float* saved = fb.saved_rr + ((t - 1) * M + m) * O * I;  // (O, I)
    const float* scale = fb.slot_max + m * I;  // (I,)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) saved[o * I + i] *= scale[i];
    LoadAssignments(pp, m, saved, s);
  }
  WeightedRows(s);
  MStep<Cost>(pp, pb.lams[t], v, s);
  float* st = fb.stats + (t * M + m) * O * kPaperStat;  // (O, kPaperStat)
  for (int64_t o = 0; o < O; ++o) {
    Store(st + kPaperStat * o, s->mean[o]);
    Store(st + kPaperStat * o + 16, s->var[o]);
    st[kPaperStat * o + 32] = s->rs[o];
    st[kPaperStat * o + 33] = s->act[o];
  }
  if (t == pb.T - 1) return;
  // e_step_paper: zz = log(act + eps) - sum_h (V - mean)^2 * 0.5 / var - 0.5 sum_h log var
  Vec x[16];
  for (int64_t o = 0; o < O; ++o) {
    const Vec inv = 0.5f / s->var[o];
    const Vec mean = s->mean[o];
    Vec log_var;
    for (int h = 0; h < 16; ++h) log_var[h] = std::log(s->var[o][h]);
    const float lact = std::log(s->act[o] + kEps), lsum = 0.5f * HSum(log_var);
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
  // Per slot: max_o zz, e = exp(zz - max) (into saved_rr[t]) and sum_o e.
  float* e_out = fb.saved_rr + (t * M + m) * O * I;  // (O, I)
  float* smax = fb.slot_max + m * I;
  float* ssum = fb.slot_sum + m * I;
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
    for (int j = 0; j < 16 && b + j < I; ++j) {
      smax[b + j] = mx[j];
      ssum[b + j] = sum[j];
    }
  }
  for (int64_t o = 0; o < O; ++o) std::memcpy(e_out + o * I, s->Row(s->zz, o), sizeof(float) * I);
}

// Phase R of the forward pass for example n: the normalisation over all
// parents of each child (normalise_over_parents). With e = exp(zz - max_s) of
// slot s, sum_s its sum over o and c(s) its child:
//   top_c = max_{s of c} max_s;  total_c = sum_{s of c} sum_s exp(max_s - top_c)
//   scale_s = exp(max_s - top_c) / total_c, so rr = e * scale_s = exp(zz - top_c) / total_c.
// Overwrites slot_max (P*I,) of the example with scale_s; child_max and
// child_sum are (S,) scratch.
void NormaliseOverParents(const Children& ch, int64_t n, int64_t slots, float* slot_max,
                          const float* slot_sum, std::vector<float>* child_max,
                          std::vector<float>* child_sum) {
  float* smax = slot_max + n * slots;  // (P*I,)
  const float* ssum = slot_sum + n * slots;  // (P*I,)
  const int32_t* child = ch.slot_child.data();
  child_max->assign(ch.per_example, -std::numeric_limits<float>::infinity());
  child_sum->assign(ch.per_example, 0.0f);
  float* cmax = child_max->data();
  float* csum = child_sum->data();
  for (int64_t s = 0; s < slots; ++s) cmax[child[s]] = std::max(cmax[child[s]], smax[s]);
  for (int64_t s = 0; s < slots; ++s) {
    smax[s] = std::exp(smax[s] - cmax[child[s]]);  // exp(max_s - top_c)
    csum[child[s]] += ssum[s] * smax[s];
  }
  for (int64_t s = 0; s < slots; ++s) smax[s] /= csum[child[s]];
}

// The backward buffers shared by the phases.
struct BackwardBuffers {
  const float* stats;     // (T, M, O, kPaperStat)
  const float* saved_rr;  // (T-1, M, O, I): rr_1 .. rr_{T-1}
  const float* g_mean_out;  // (M, O, 16)
  const float* g_act_out;   // (M, O)
  float* g_rr;      // (M, O, I): d loss / d rr_{t+1}, then (phase B of t) / d rr_t
  float* slot_dot;  // (M, I): sum_o rr g_rr; after phase R the child's sum
  float* q;         // (T-1, M, O, I): -d loss / d zz of the E-step of each t
  float* factors;   // (T, M, O, kFactors)
  float* g_a;       // (M, I)
  float* g_beta;    // (M, 2*O): d beta_v, d beta_a of each problem
};

// Phase B of iteration t for problem m: the reverse of the M-step t and of the
// E-step t (whose output rr_{t+1} has the gradient g_rr), by hand:
//
//   E-step (t < T-1, with the assignment gradient): rr_{t+1} = softmax over
//   the child's parents of zz, so d zz = rr_{t+1} (g_rr - sum_parents rr_{t+1}
//   g_rr) (that sum from phase R); q = -d zz. With
//   zz = log(act + eps) - sum_h dev^2 0.5 / var - 0.5 sum_h log var:
//     d act += -sum_i q / (act + eps)
//     d var += -0.5 sum_i q dev^2 / var^2 + 0.5 sum_i q / var
//     d mean += -sum_i q dev / var;   d V += q dev / var
//   M-step: act = sigmoid(x), x = lambda (beta_a - cost):
//     g_x = d act act (1 - act);  d beta_a += lambda g_x;  d cost = -lambda g_x
//   cost and var from raw (Cost::Reverse), e.g. for NormalisedCost
//   cost = sum_h (beta_v + L_h) R_j ds, L = 0.5 log var, ds = O / I:
//     d R_j += d cost sum_h (beta_v + L_h) ds;  d beta_v += 16 d cost R_j ds
//     d var += 0.5 d cost R_j ds / var;  d raw = d var
//   raw = sum_i rr' dev^2 / D, mean = sum_i rr' V / D, D = R_j + eps:
//     d mean += -(2 d raw / D) sum_i rr' dev = -(2 d raw / D) eps mean
//     d rr'_i = sum_h (d raw dev^2 + d mean V)_ih / D + d R_j
//               - sum_h (d raw raw + d mean mean) / D
//     d V += rr' (d mean / D) + dev rr' (2 d raw / D)
//   rr' = rr_t a:  d a += sum_o d rr' rr_t;  d rr_t = d rr' a.
//
// The vote gradient of iteration t is rr' mfac + dev (rr' ufac + q / var) with
// mfac = d mean / D and ufac = 2 d raw / D, which phase V forms from the
// saved factors; phase B writes d rr_t into g_rr and sum_o rr_t d rr_t into
// slot_dot (for phase R before phase B of t - 1). votes: as in ForwardPhase.
template <class Cost>
void BackwardPhase(const PaperProblem& pp, const float* src, const float* a, int64_t m, int t,
                   bool assignment_gradient, const BackwardBuffers& bb, PaperScratch* s,
                   const Vec* votes = nullptr) {
  const Problem& pb = pp.pb;
  const int64_t I = pb.I, O = pb.O, M = pp.N * pp.P, i_pad = s->i_pad;
  const int T = pb.T;
  const bool last = t == T - 1;
  const float lam = pb.lams[t];
  const Vec* v = votes ? votes : VotesOfProblem(pb, src, m, s->votes.data());  // (O, I) Vecs
  LoadActivations(s, a + m * I);
  LoadAssignments(pp, m, t > 0 ? bb.saved_rr + ((t - 1) * M + m) * O * I : nullptr, s);
  WeightedRows(s);
  const float* st = bb.stats + (t * M + m) * O * kPaperStat;  // (O, kPaperStat)
  float* g_rr = bb.g_rr + m * O * I;  // (O, I)
  float* q = last ? nullptr : bb.q + (t * M + m) * O * I;  // (O, I)
  float* g_beta_v = bb.g_beta + m * 2 * O;
  float* g_beta_a = g_beta_v + O;
  if (!last) {
    // q = -d zz = -rr_{t+1} (g_rr - dot), dot = the child's sum_parents rr_{t+1} g_rr.
    const float* rr_next = bb.saved_rr + (t * M + m) * O * I;  // (O, I)
    const float* dot = bb.slot_dot + m * I;  // (I,)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i)
        q[o * I + i] = -(rr_next[o * I + i] * (g_rr[o * I + i] - dot[i]));
  }
  float* factors = bb.factors + (t * M + m) * O * kFactors;  // (O, kFactors)
  Vec x[16];
  for (int64_t o = 0; o < O; ++o) {
    const Vec mean = Load(st + kPaperStat * o), var = Load(st + kPaperStat * o + 16);
    const float rs = st[kPaperStat * o + 32], act = st[kPaperStat * o + 33];
    const float denom = rs + kEps;
    const Vec* vo = v + o * I;  // (I) Vecs
    float g_act = last ? bb.g_act_out[m * O + o] : 0.0f;
    Vec g_mean = last ? Load(bb.g_mean_out + 16 * (m * O + o)) : Splat(0.0f);
    Vec g_var = Splat(0.0f);
    if (!last) {
      // sum_i q, sum_i q dev, sum_i q dev^2 (h-wise)
      const float* qo = q + o * I;
      Vec a0 = Splat(0.0f), a1 = a0, b0 = a0, b1 = a0;
      float q_sum = 0.0f;
      int64_t i = 0;
      for (; i + 2 <= I; i += 2) {
        const Vec d0 = vo[i] - mean, d1 = vo[i + 1] - mean;
        const Vec qd0 = qo[i] * d0, qd1 = qo[i + 1] * d1;
        a0 += qd0;
        a1 += qd1;
        b0 += qd0 * d0;
        b1 += qd1 * d1;
        q_sum += qo[i] + qo[i + 1];
      }
      for (; i < I; ++i) {
        const Vec d = vo[i] - mean;
        const Vec qd = qo[i] * d;
        a0 += qd;
        b0 += qd * d;
        q_sum += qo[i];
      }
      const Vec q_dev = a0 + a1, q_dev2 = b0 + b1;
      g_act -= q_sum / (act + kEps);
      g_var += (-0.5f * q_dev2 / var + 0.5f * q_sum) / var;
      g_mean -= q_dev / var;
    }
    // act = sigmoid(lambda (beta_a - cost))
    const float g_x = g_act * act * (1.0f - act);
    g_beta_a[o] += lam * g_x;
    const float g_cost = -lam * g_x;
    Vec raw;  // g_var becomes d raw
    float g_rs = Cost::Reverse(pp, o, var, rs, g_cost, &g_beta_v[o], &g_var, &raw);
    // raw and mean: the sums over i divided by D = R_j + eps
    const Vec ufac = 2.0f * g_var / denom;
    g_mean -= ufac * (kEps * mean);  // (2 d raw / D) sum_i rr' dev, = eps mean
    const Vec mfac = g_mean / denom;
    g_rs -= HSum(g_var * raw + g_mean * mean) / denom;
    Store(factors + kFactors * o, mfac);
    Store(factors + kFactors * o + 16, ufac);
    // d rr'_i = sum_h (d raw dev^2 + d mean V) / D + d R_j, into the row o of s->zz.
    float* g_rrp = s->Row(s->zz, o);
    for (int64_t b = 0; b < i_pad; b += 16) {
      for (int j = 0; j < 16; ++j) {
        if (b + j < I) {
          const Vec vv = vo[b + j];
          const Vec d = vv - mean;
          x[j] = d * d * g_var + vv * g_mean;
        } else {
          x[j] = Splat(0.0f);
        }
      }
      Store(g_rrp + b, Sums16(x) / denom + g_rs);
    }
  }
  // rr' = rr_t a: d a, d rr_t (into g_rr) and sum_o rr_t d rr_t (into slot_dot).
  const bool need_g_rr = assignment_gradient && t > 0;
  const float* ap = s->Flat(s->a_pad);
  float* g_a = bb.g_a + m * I;
  float* dot = bb.slot_dot + m * I;
  for (int64_t b = 0; b < i_pad; b += 16) {
    Vec ga = Splat(0.0f), dt = Splat(0.0f);
    const Vec av = Load(ap + b);
    for (int64_t o = 0; o < O; ++o) {
      const Vec g_rrp = Load(s->Row(s->zz, o) + b);
      const Vec r = Load(s->Row(s->rr, o) + b);
      ga += g_rrp * r;
      const Vec g = g_rrp * av;  // d rr_t
      dt += r * g;
      if (need_g_rr)
        for (int j = 0; j < 16 && b + j < I; ++j) g_rr[o * I + b + j] = g[j];
    }
    for (int j = 0; j < 16 && b + j < I; ++j) {
      g_a[b + j] += ga[j];
      if (need_g_rr) dot[b + j] = dt[j];
    }
  }
}

// Phase R of the backward pass for example n: slot_dot (P*I,) of the example
// becomes the sum over each slot's child: sum_parents rr g_rr.
void SumOverParents(const Children& ch, int64_t n, int64_t slots, float* slot_dot,
                    std::vector<float>* child_dot) {
  float* sd = slot_dot + n * slots;
  const int32_t* child = ch.slot_child.data();
  child_dot->assign(ch.per_example, 0.0f);
  float* cd = child_dot->data();
  for (int64_t s = 0; s < slots; ++s) cd[child[s]] += sd[s];
  for (int64_t s = 0; s < slots; ++s) sd[s] = cd[child[s]];
}

// Phase V for problem m: the vote gradient (O, I) Vecs into s->gv,
//   d V = sum_t rr'_t mfac_t + (V - mean_t) (rr'_t ufac_t + q_t / var_t)
// over the iterations whose gradient flows (all, or the last). votes: as in
// ForwardPhase.
void VoteGradient(const PaperProblem& pp, const float* src, const float* a, int64_t m,
                  int t_first, const BackwardBuffers& bb, PaperScratch* s,
                  const Vec* votes = nullptr) {
  const Problem& pb = pp.pb;
  const int64_t I = pb.I, O = pb.O, M = pp.N * pp.P;
  const int T = pb.T;
  const Vec* v = votes ? votes : VotesOfProblem(pb, src, m, s->votes.data());  // (O, I) Vecs
  Vec* gv = s->gv.data();  // (O, I)
  for (int64_t j = 0; j < I * O; ++j) gv[j] = Splat(0.0f);
  LoadActivations(s, a + m * I);
  for (int t = T - 1; t >= t_first; --t) {
    LoadAssignments(pp, m, t > 0 ? bb.saved_rr + ((t - 1) * M + m) * O * I : nullptr, s);
    WeightedRows(s);
    const float* st = bb.stats + (t * M + m) * O * kPaperStat;  // (O, kPaperStat)
    const float* factors = bb.factors + (t * M + m) * O * kFactors;  // (O, kFactors)
    const float* q = t < T - 1 ? bb.q + (t * M + m) * O * I : nullptr;  // (O, I)
    for (int64_t o = 0; o < O; ++o) {
      const Vec mean = Load(st + kPaperStat * o);
      const Vec inv_var = 1.0f / Load(st + kPaperStat * o + 16);
      const Vec mfac = Load(factors + kFactors * o), ufac = Load(factors + kFactors * o + 16);
      const float* rrp = s->Row(s->rrp, o);
      const Vec* vo = v + o * I;
      Vec* go = gv + o * I;
      if (q) {
        const float* qo = q + o * I;
        for (int64_t i = 0; i < I; ++i)
          go[i] += rrp[i] * mfac + (vo[i] - mean) * (rrp[i] * ufac + qo[i] * inv_var);
      } else {
        for (int64_t i = 0; i < I; ++i) go[i] += rrp[i] * mfac + (vo[i] - mean) * (rrp[i] * ufac);
      }
    }
  }
}

// The largest per-thread buffer of one example's votes (see PaperBase::CacheVotes).
constexpr int64_t kVoteCacheBytes = int64_t{4} << 20;

// Checks the inputs and fills pp (w transposed into wt).
class PaperBase : public OpKernel {
 public:
  explicit PaperBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("inverse_temperatures", &lams_));
    OP_REQUIRES(ctx, !lams_.empty(),
                tensorflow::errors::InvalidArgument(
                    "CapsemEmRoutingPaper: inverse_temperatures needs one value per iteration"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("variance_floor", &floor_));
    OP_REQUIRES(ctx, floor_ > 0.0f,
                tensorflow::errors::InvalidArgument(
                    "CapsemEmRoutingPaper: variance_floor must be > 0"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("positions", &positions_));
    OP_REQUIRES(ctx, positions_ >= 1,
                tensorflow::errors::InvalidArgument(
                    "CapsemEmRoutingPaper: positions must be >= 1"));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("child_index", &child_index_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_sources", &num_sources_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("assignment_gradient", &assignment_gradient_));
    std::string cost;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("cost", &cost));
    unnormalised_ = cost == "unnormalised";
    iterations_ = static_cast<int>(lams_.size());
  }

 protected:
  // lam_input: the index of the input inverse_temperature.
  absl::Status Prepare(OpKernelContext* ctx, int lam_input, PaperProblem* pp,
                       std::vector<float>* wt) {
    Problem& pb = pp->pb;
    pb.stable = true;  // unused: the paper's routing is always guarded
    pb.lams = lams_;
    const Tensor& lam = ctx->input(lam_input);
    if (lam.NumElements() > 1)
      return tensorflow::errors::InvalidArgument(
          "CapsemEmRoutingPaper: inverse_temperature must hold 0 values (the attribute "
          "inverse_temperatures) or 1, got shape ", lam.shape().DebugString());
    if (lam.NumElements() == 1) {  // --lambda_schedule=ramp: one value at every iteration
      const float value = lam.flat<float>()(0);
      if (!(value > 0.0f))
        return tensorflow::errors::InvalidArgument(
            "CapsemEmRoutingPaper: inverse_temperature must be > 0, got ", value);
      pb.lams.assign(iterations_, value);
    }
    int64_t M;
    TF_RETURN_IF_ERROR(CheckInputs(ctx, "CapsemEmRoutingPaper", iterations_, &pb, &M));
    if (M % positions_)
      return tensorflow::errors::InvalidArgument(
          "CapsemEmRoutingPaper: the number of routing problems ", M,
          " is not a multiple of positions = ", positions_);
    if (pb.I < 1 || pb.O < 1)
      return tensorflow::errors::InvalidArgument("CapsemEmRoutingPaper: I and O must be >= 1");
    pp->P = positions_;
    pp->N = M / positions_;
    pp->floor = floor_;
    pp->data_scale =
        static_cast<float>(static_cast<double>(pb.O) / static_cast<double>(pb.I));
    TF_RETURN_IF_ERROR(
        pp->children.Build(pp->P, pb.I, pb.O, child_index_, num_sources_, unnormalised_));
    TransposeW(&pb, wt);
    return absl::OkStatus();
  }

  // Runs fn(begin, end) over [0, n) on the intra-op pool in chunks of items
  // (several per thread, so that threads that finish early take over the rest).
  static void Parallel(OpKernelContext* ctx, int64_t n, int64_t cost,
                       const std::function<void(int64_t, int64_t)>& fn) {
    if (n == 0) return;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    const int64_t chunks = std::min<int64_t>(n, std::max(1, pool->NumThreads()) * 8);
    pool->ParallelFor(chunks, (n / chunks + 1) * cost, [&](int64_t cb, int64_t ce) {
      ScopedFlushDenormal flush;
      fn(n * cb / chunks, n * ce / chunks);
    });
  }

  // Whether to route example by example (all phases of one example in one
  // task, one ParallelFor per op) rather than phase by phase (a ParallelFor
  // per phase over the problems or the examples): with enough examples to
  // keep every thread busy. The numbers are the same either way.
  static bool ByExample(OpKernelContext* ctx, int64_t N) {
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    return N >= 2 * std::max(1, pool->NumThreads());
  }

  // Whether one example's votes (P*I*O Vecs) are kept in a per-thread buffer
  // by the example-by-example schedule, rather than formed again in every phase.
  static bool CacheVotes(const PaperProblem& pp) {
    return pp.P * pp.pb.I * pp.pb.O * static_cast<int64_t>(sizeof(Vec)) <= kVoteCacheBytes;
  }

  std::vector<float> lams_;  // one inverse temperature per iteration
  float floor_;
  int64_t positions_, num_sources_;
  std::vector<int64_t> child_index_;
  int iterations_;
  bool assignment_gradient_;  // the gradient flows through the E-steps' assignments
  bool unnormalised_;  // cost="unnormalised" (UnnormalisedCost), else NormalisedCost
};

class EmRoutingPaperOp : public PaperBase {
 public:
  using PaperBase::PaperBase;

  void Compute(OpKernelContext* ctx) override {
    if (unnormalised_)
      Run<UnnormalisedCost>(ctx);
    else
      Run<NormalisedCost>(ctx);
  }

 private:
  template <class Cost>
  void Run(OpKernelContext* ctx) {
    PaperProblem pp;
    std::vector<float> wt;
    OP_REQUIRES_OK(ctx, Prepare(ctx, /*lam_input=*/6, &pp, &wt));
    const int T = iterations_;
    const int64_t I = pp.pb.I, O = pp.pb.O, M = pp.N * pp.P, slots = pp.P * I;
    Tensor *mean, *act, *saved_rr, *stats;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({M, O, 16}), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({M, O}), &act));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({T - 1, M, O, I}), &saved_rr));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({T, M, O, kPaperStat}), &stats));
    if (M == 0) return;
    const float* src = ctx->input(0).flat<float>().data();
    const float* a = ctx->input(3).flat<float>().data();
    std::vector<float> slot_max(T > 1 ? M * I : 0), slot_sum(T > 1 ? M * I : 0);  // (M, I)
    ForwardBuffers fb{stats->flat<float>().data(), saved_rr->flat<float>().data(),
                      slot_max.data(), slot_sum.data()};
    const int64_t cost = I * O * 16 * 40;
    if (ByExample(ctx, pp.N)) {
      const int64_t P = pp.P;
      const bool cache = CacheVotes(pp);
      Parallel(ctx, pp.N, cost * T * P, [&](int64_t begin, int64_t end) {
        PaperScratch s(pp, /*backward=*/false);
        VecBuffer votes(cache ? P * I * O : 0);  // (P, O, I) Vecs
        std::vector<float> child_max, child_sum;
        for (int64_t n = begin; n < end; ++n) {
          if (cache)
            for (int64_t p = 0; p < P; ++p)
              VotesOfProblem(pp.pb, src, n * P + p, votes.data() + p * I * O);
          for (int t = 0; t < T; ++t) {
            for (int64_t p = 0; p < P; ++p)
              ForwardPhase<Cost>(pp, src, a, n * P + p, t, fb, &s,
                           cache ? votes.data() + p * I * O : nullptr);
            if (t == T - 1) break;
            NormaliseOverParents(pp.children, n, slots, fb.slot_max, fb.slot_sum, &child_max,
                                 &child_sum);
          }
        }
      });
    } else {
      for (int t = 0; t < T; ++t) {
        Parallel(ctx, M, cost, [&](int64_t begin, int64_t end) {
          PaperScratch s(pp, /*backward=*/false);
          for (int64_t m = begin; m < end; ++m) ForwardPhase<Cost>(pp, src, a, m, t, fb, &s);
        });
        if (t == T - 1) break;
        Parallel(ctx, pp.N, slots * 40, [&](int64_t begin, int64_t end) {
          std::vector<float> child_max, child_sum;
          for (int64_t n = begin; n < end; ++n)
            NormaliseOverParents(pp.children, n, slots, fb.slot_max, fb.slot_sum, &child_max,
                                 &child_sum);
        });
      }
    }
    // The outputs: mean and act of the last M-step.
    const float* last = fb.stats + (T - 1) * M * O * kPaperStat;  // (M, O, kPaperStat)
    float* mean_p = mean->flat<float>().data();
    float* act_p = act->flat<float>().data();
    for (int64_t j = 0; j < M * O; ++j) {
      std::memcpy(mean_p + 16 * j, last + kPaperStat * j, 16 * sizeof(float));
      act_p[j] = last[kPaperStat * j + 33];
    }
  }
};

class EmRoutingPaperGradOp : public PaperBase {
 public:
  using PaperBase::PaperBase;

  void Compute(OpKernelContext* ctx) override {
    if (unnormalised_)
      Run<UnnormalisedCost>(ctx);
    else
      Run<NormalisedCost>(ctx);
  }

 private:
  template <class Cost>
  void Run(OpKernelContext* ctx) {
    PaperProblem pp;
    std::vector<float> wt;
    OP_REQUIRES_OK(ctx, Prepare(ctx, /*lam_input=*/10, &pp, &wt));
    const Problem& pb = pp.pb;
    const int T = iterations_;
    const int64_t I = pb.I, O = pb.O, M = pp.N * pp.P, slots = pp.P * I;
    OP_REQUIRES(ctx, ctx->input(6).NumElements() == (T - 1) * M * I * O &&
                         ctx->input(7).NumElements() == T * M * O * kPaperStat &&
                         ctx->input(8).NumElements() == M * O * 16 &&
                         ctx->input(9).NumElements() == M * O,
                tensorflow::errors::InvalidArgument(
                    "CapsemEmRoutingPaperGrad: inconsistent shapes"));
    Tensor *g_src, *g_w, *g_a, *g_bv, *g_ba;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(0).shape(), &g_src));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, pb.from_poses ? ctx->input(1).shape() : TensorShape({0}), &g_w));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({M, I}), &g_a));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, TensorShape({O}), &g_bv));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(4, TensorShape({O}), &g_ba));
    const float* src = ctx->input(0).flat<float>().data();
    const float* a = ctx->input(3).flat<float>().data();
    float* g_src_p = g_src->flat<float>().data();
    float* gw = g_w->flat<float>().data();
    const int64_t wsize = pb.from_poses ? I * O * 16 : 0;
    std::fill(gw, gw + wsize, 0.0f);
    float* gbv = g_bv->flat<float>().data();
    float* gba = g_ba->flat<float>().data();
    std::fill(gbv, gbv + O, 0.0f);
    std::fill(gba, gba + O, 0.0f);
    if (M == 0) return;

    // Iterations whose gradient flows: all, or (assignments as constants) the last.
    const int t_first = assignment_gradient_ ? 0 : T - 1;
    const bool with_e = assignment_gradient_ && T > 1;
    std::vector<float> g_rr(with_e ? M * O * I : 0), slot_dot(with_e ? M * I : 0);
    std::vector<float> q(with_e ? (T - 1) * M * O * I : 0);
    std::vector<float> factors(T * M * O * kFactors), g_beta(M * 2 * O, 0.0f);
    float* g_a_p = g_a->flat<float>().data();
    std::fill(g_a_p, g_a_p + M * I, 0.0f);
    BackwardBuffers bb{ctx->input(7).flat<float>().data(), ctx->input(6).flat<float>().data(),
                       ctx->input(8).flat<float>().data(), ctx->input(9).flat<float>().data(),
                       g_rr.data(), slot_dot.data(), q.data(), factors.data(), g_a_p,
                       g_beta.data()};
    const int64_t cost = I * O * 16 * 40, P = pp.P, N = pp.N;
    // Reductions over m (d w) go to one accumulator per fixed chunk of
    // problems, summed in chunk order: the result depends neither on timing
    // nor on the number of threads. With several examples the chunks hold
    // whole examples (chunk c: examples [N c / chunks, N (c + 1) / chunks)),
    // else problems (chunk c: [M c / chunks, M (c + 1) / chunks)).
    const bool example_chunks = N >= 2;
    const int64_t chunks = std::min<int64_t>(example_chunks ? N : M, kGradChunks);
    auto chunk_begin = [&](int64_t c) {  // the first problem of chunk c
      return example_chunks ? P * (N * c / chunks) : M * c / chunks;
    };
    std::vector<float> acc_w(chunks * wsize, 0.0f);
    // Phase V of problem m of chunk c (s->gv from the votes, cached or not).
    auto vote_gradient = [&](int64_t m, int64_t c, PaperScratch* s, const Vec* votes) {
      VoteGradient(pp, src, a, m, t_first, bb, s, votes);
      if (pb.from_poses) {
        PoseGradients(pb, src + m * I * 16, s->gv.data(), g_src_p + m * I * 16,
                      acc_w.data() + c * wsize);
      } else {  // d votes (I, O, 16)
        float* g_votes = g_src_p + m * I * O * 16;
        for (int64_t i = 0; i < I; ++i)
          for (int64_t o = 0; o < O; ++o) Store(g_votes + 16 * (i * O + o), s->gv[o * I + i]);
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    if (ByExample(ctx, N)) {  // (then example_chunks) one task per chunk of examples
      const bool cache = CacheVotes(pp);
      pool->ParallelFor(chunks, (M / chunks + 1) * cost * 2 * (T - t_first), [&](int64_t cb,
                                                                                   int64_t ce) {
        ScopedFlushDenormal flush;
        PaperScratch s(pp, /*backward=*/true);
        VecBuffer votes(cache ? P * I * O : 0);  // (P, O, I) Vecs
        std::vector<float> child_dot;
        for (int64_t c = cb; c < ce; ++c)
          for (int64_t n = chunk_begin(c) / P; n < chunk_begin(c + 1) / P; ++n) {
            if (cache)
              for (int64_t p = 0; p < P; ++p)
                VotesOfProblem(pb, src, n * P + p, votes.data() + p * I * O);
            for (int t = T - 1; t >= t_first; --t) {
              for (int64_t p = 0; p < P; ++p)
                BackwardPhase<Cost>(pp, src, a, n * P + p, t, assignment_gradient_, bb, &s,
                              cache ? votes.data() + p * I * O : nullptr);
              if (with_e && t > 0) SumOverParents(pp.children, n, slots, bb.slot_dot, &child_dot);
            }
            for (int64_t p = 0; p < P; ++p)
              vote_gradient(n * P + p, c, &s, cache ? votes.data() + p * I * O : nullptr);
          }
      });
    } else {
      for (int t = T - 1; t >= t_first; --t) {
        Parallel(ctx, M, cost, [&](int64_t begin, int64_t end) {
          PaperScratch s(pp, /*backward=*/false);
          for (int64_t m = begin; m < end; ++m)
            BackwardPhase<Cost>(pp, src, a, m, t, assignment_gradient_, bb, &s);
        });
        if (with_e && t > 0)
          Parallel(ctx, N, slots * 10, [&](int64_t begin, int64_t end) {
            std::vector<float> child_dot;
            for (int64_t n = begin; n < end; ++n)
              SumOverParents(pp.children, n, slots, bb.slot_dot, &child_dot);
          });
      }
      // Phase V: the vote gradients.
      pool->ParallelFor(chunks, (M / chunks + 1) * cost * (T - t_first), [&](int64_t cb,
                                                                               int64_t ce) {
        ScopedFlushDenormal flush;
        PaperScratch s(pp, /*backward=*/true);
        for (int64_t c = cb; c < ce; ++c)
          for (int64_t m = chunk_begin(c); m < chunk_begin(c + 1); ++m)
            vote_gradient(m, c, &s, nullptr);
      });
    }
    if (pb.from_poses)
      for (int64_t c = 0; c < chunks; ++c)  // (O, I, 16) accumulators -> (I, O, 16)
        for (int64_t o = 0; o < O; ++o)
          for (int64_t i = 0; i < I; ++i)
            for (int h = 0; h < 16; ++h)
              gw[16 * (i * O + o) + h] += acc_w[c * wsize + 16 * (o * I + i) + h];
    for (int64_t m = 0; m < M; ++m)  // d beta_v, d beta_a in the order of m
      for (int64_t o = 0; o < O; ++o) {
        gbv[o] += g_beta[m * 2 * O + o];
        gba[o] += g_beta[m * 2 * O + O + o];
      }
  }
};

}  // namespace
}  // namespace capsem

using tensorflow::shape_inference::InferenceContext;

REGISTER_OP("CapsemEmRoutingPaper")
    .Input("src: float")
    .Input("w: float")
    .Input("offsets: float")
    .Input("a: float")
    .Input("beta_v: float")
    .Input("beta_a: float")
    .Input("inverse_temperature: float")
    .Attr("inverse_temperatures: list(float)")
    .Attr("variance_floor: float")
    .Attr("positions: int = 1")
    .Attr("child_index: list(int) = []")
    .Attr("num_sources: int = 0")
    .Attr("assignment_gradient: bool = true")
    .Attr("cost: {'normalised', 'unnormalised'} = 'normalised'")
    .Output("mean: float")
    .Output("act: float")
    .Output("saved_rr: float")
    .Output("stats: float")
    .SetShapeFn([](InferenceContext* c) {
      std::vector<float> lams;
      TF_RETURN_IF_ERROR(c->GetAttr("inverse_temperatures", &lams));
      const int64_t iterations = static_cast<int64_t>(lams.size());
      // src (M, I, O, 16) or (M, I, 16) with w (I, O, 16); O from beta_v (O,), which
      // is always known, so no dimension is read from a shape of unknown rank.
      auto src = c->input(0);
      auto m = c->UnknownDim(), i = c->UnknownDim();
      if (c->RankKnown(src) && c->Rank(src) >= 2) {
        m = c->Dim(src, 0);
        i = c->Dim(src, 1);
      }
      auto o = c->RankKnown(c->input(4)) && c->Rank(c->input(4)) == 1 ? c->Dim(c->input(4), 0)
                                                                        : c->UnknownDim();
      c->set_output(0, c->MakeShape({m, o, 16}));
      c->set_output(1, c->MakeShape({m, o}));
      c->set_output(2, c->MakeShape({iterations - 1, m, o, i}));
      c->set_output(3, c->MakeShape({iterations, m, o, capsem::kPaperStat}));
      return absl::OkStatus();
    });

REGISTER_OP("CapsemEmRoutingPaperGrad")
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
    .Input("inverse_temperature: float")
    .Attr("inverse_temperatures: list(float)")
    .Attr("variance_floor: float")
    .Attr("positions: int = 1")
    .Attr("child_index: list(int) = []")
    .Attr("num_sources: int = 0")
    .Attr("assignment_gradient: bool = true")
    .Attr("cost: {'normalised', 'unnormalised'} = 'normalised'")
    .Output("g_src: float")
    .Output("g_w: float")
    .Output("g_a: float")
    .Output("g_beta_v: float")
    .Output("g_beta_a: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, !c->RankKnown(c->input(0))  ? c->UnknownShape()
                       : c->Rank(c->input(0)) == 3 ? c->input(1)
                                                   : c->MakeShape({0}));
      c->set_output(2, c->input(3));
      auto o = c->NumElements(c->input(4));
      c->set_output(3, c->Vector(o));
      c->set_output(4, c->Vector(o));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("CapsemEmRoutingPaper").Device(tensorflow::DEVICE_CPU),
                        capsem::EmRoutingPaperOp);
REGISTER_KERNEL_BUILDER(Name("CapsemEmRoutingPaperGrad").Device(tensorflow::DEVICE_CPU),
                        capsem::EmRoutingPaperGradOp);
