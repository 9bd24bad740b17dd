"""A float64 numpy re-implementation of the article's functions, written from the
conventions in tests/data/golden/README.md, for checking shapes the golden files
do not cover (other kernels, strides, grids, capsule counts, iterations)."""

import numpy as np

EPS = 1e-9


def kernel_tile(x, k, s):
    n, h, w = x.shape[:3]
    x = x.reshape(n, h, w, -1)
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    out = np.zeros((n, oh, ow, k * k, x.shape[-1]), x.dtype)
    for i in range(k):
        for j in range(k):
            for y in range(oh):
                for z in range(ow):
                    out[:, y, z, k * i + j] = x[:, s * y + i, s * z + j]
    return out


def mat_transform(poses, w):
    m, i = poses.shape[:2]
    p = poses.reshape(m, i, 1, 4, 4)
    return np.matmul(p, w[0][None]).reshape(m, i, w.shape[2], 16)


def coord_addition(votes, h, w):
    votes = votes.copy()
    for y in range(h):
        for x in range(w):
            votes[:, y, x, ..., 0] += (y + 0.5) / h
            votes[:, y, x, ..., 1] += (x + 0.5) / w
    return votes


def em_routing(votes, acts, beta_v, beta_a, iterations):
    votes = votes.astype(np.float64)
    num_o = votes.shape[-2]
    rr = np.full(votes.shape[-3:-1] + (1,), 1.0 / num_o)
    a_in = acts.astype(np.float64)[..., None, None]
    bv = np.reshape(beta_v, (num_o, 1)).astype(np.float64)
    ba = np.reshape(beta_a, (num_o, 1)).astype(np.float64)
    it_max = min(iterations, 3.0)
    for t in range(iterations):
        lam = 1.0 + (it_max - 1.0) * t / max(1.0, iterations - 1.0)
        rp = rr * a_in
        rs = rp.sum(-3, keepdims=True)
        mean = (rp * votes).sum(-3, keepdims=True) / rs
        stdv = np.sqrt((rp * (votes - mean) ** 2).sum(-3, keepdims=True) / rs)
        cost = ((bv + np.log(stdv + EPS)) * rs).sum(-1, keepdims=True)
        cmean = cost.mean(-2, keepdims=True)
        cstd = np.sqrt(((cost - cmean) ** 2).mean(-2, keepdims=True))
        a = 1.0 / (1.0 + np.exp(-lam * (ba + (cmean - cost) / (cstd + EPS))))
        if t < iterations - 1:
            logp = (-((votes - mean) ** 2 / (2 * stdv ** 2)).sum(-1, keepdims=True)
                    - np.log(stdv + EPS).sum(-1, keepdims=True))
            zz = np.log(a + EPS) + logp
            zz = zz - zz.max(-2, keepdims=True)
            rr = np.exp(zz) / np.exp(zz).sum(-2, keepdims=True)
    return mean[..., 0, :, :], a[..., 0, :, 0]


def conv_caps(poses, acts, w, beta_v, beta_a, k, s, iterations):
    n, h, wd, i = acts.shape
    tp = kernel_tile(poses, k, s)
    ta = kernel_tile(acts, k, s)
    oh, ow = tp.shape[1:3]
    votes = mat_transform(tp.reshape(-1, k * k * i, 16), w).reshape(n, oh, ow, k * k * i, -1, 16)
    p, a = em_routing(votes, ta.reshape(n, oh, ow, k * k * i), beta_v, beta_a, iterations)
    return p.reshape(n, oh, ow, -1, 4, 4), a


def class_caps(poses, acts, w, beta_v, beta_a, iterations):
    n, h, wd, i = acts.shape
    votes = mat_transform(poses.reshape(-1, i, 16), w).reshape(n, h, wd, i, -1, 16)
    votes = coord_addition(votes, h, wd).reshape(n, h * wd * i, -1, 16)
    p, a = em_routing(votes, acts.reshape(n, h * wd * i), beta_v, beta_a, iterations)
    return p.reshape(n, -1, 4, 4), a


# ---------------------------------------------------------------------------
# The paper's EM routing (capsem.paper_routing), written per child and per
# parent with explicit loops: every child (n, h, w, c) of a conv layer lists
# the (output position, output type) pairs that receive it, and its E-step
# normalises over all of them.
# ---------------------------------------------------------------------------

PAPER_VARIANCE_FLOOR = 1e-4


def paper_lambdas(iterations, final_lambda):
    return [final_lambda * (1.0 - 0.95 ** (t + 1)) for t in range(iterations)]


def em_routing_paper_edges(votes, a_in, children, num_children, beta_v, beta_a, iterations,
                           final_lambda, inverse_temperature=None, cost="normalised",
                           floor=None):
    """Paper EM routing on an explicit graph, for one example.

    votes: (P, I, O, 16); a_in: (P, I); children: (P, I) int, the child that
    the vote slot (p, i) comes from, in [0, num_children).
    inverse_temperature: None (the schedule of final_lambda) or the value of
    every iteration. cost: "normalised" or "unnormalised" (YuxianMeng's: rr0 =
    1 / (O P), cost (beta_v + log var) sum_i r, variance max(var, floor)).
    Returns mean (P, O, 16), activations (P, O), rr (P, I, O) of the last M-step.
    """
    floor = PAPER_VARIANCE_FLOOR if floor is None else floor
    votes = votes.astype(np.float64)
    num_p, num_i, num_o = votes.shape[:3]
    parents_of = [0] * num_children  # number of (position, type) parents of each child
    for p in range(num_p):
        for i in range(num_i):
            parents_of[children[p, i]] += num_o
    rr = np.zeros((num_p, num_i, num_o))
    for p in range(num_p):
        for i in range(num_i):
            rr[p, i, :] = 1.0 / parents_of[children[p, i]]
    if cost == "unnormalised":
        rr[:] = 1.0 / (num_o * num_p)
    scale = num_o / num_i
    bv = np.asarray(beta_v, np.float64).reshape(num_o)
    ba = np.asarray(beta_a, np.float64).reshape(num_o)
    lambdas = paper_lambdas(iterations, final_lambda)
    if inverse_temperature is not None:
        lambdas = [inverse_temperature] * iterations
    for t, lam in enumerate(lambdas):
        mean = np.zeros((num_p, num_o, 16))
        var = np.zeros((num_p, num_o, 16))
        act = np.zeros((num_p, num_o))
        for p in range(num_p):
            for o in range(num_o):
                r = rr[p, :, o] * a_in[p]  # (I,)
                rs = r.sum()
                mu = (r[:, None] * votes[p, :, o]).sum(0) / (rs + EPS)
                v = (r[:, None] * (votes[p, :, o] - mu) ** 2).sum(0) / (rs + EPS)
                if cost == "unnormalised":
                    v = np.maximum(v, floor)
                    total_cost = ((bv[o] + np.log(v)) * rs).sum()
                else:
                    v = v + floor
                    total_cost = ((bv[o] + 0.5 * np.log(v)) * rs * scale).sum()
                mean[p, o], var[p, o] = mu, v
                act[p, o] = 1.0 / (1.0 + np.exp(-lam * (ba[o] - total_cost)))
        if t == iterations - 1:
            break
        # E-step: a_j p_j(V_ij), normalised over every parent of each child.
        num = np.zeros((num_p, num_i, num_o))
        for p in range(num_p):
            for o in range(num_o):
                d = votes[p, :, o] - mean[p, o]  # (I, 16)
                log_p = (-(d ** 2 / (2 * var[p, o])).sum(-1)
                         - 0.5 * np.log(var[p, o]).sum())  # (I,) without -8 log(2 pi)
                num[p, :, o] = np.log(act[p, o] + EPS) + log_p
        top = np.full(num_children, -np.inf)
        for p in range(num_p):
            for i in range(num_i):
                top[children[p, i]] = max(top[children[p, i]], num[p, i].max())
        e = np.exp(num - top[children][..., None])
        total = np.zeros(num_children)
        for p in range(num_p):
            for i in range(num_i):
                total[children[p, i]] += e[p, i].sum()
        rr = e / total[children][..., None]
    return mean, act, rr


def conv_caps_paper(poses, acts, w, beta_v, beta_a, k, s, iterations, final_lambda, **options):
    """A ConvCaps layer with routing='paper'; returns poses (N, OH, OW, O, 4, 4), acts."""
    n, h, wd, c = acts.shape
    tp = kernel_tile(poses, k, s)
    ta = kernel_tile(acts, k, s)
    oh, ow = tp.shape[1:3]
    num_i = k * k * c
    votes = mat_transform(tp.reshape(-1, num_i, 16), w).reshape(n, oh * ow, num_i, -1, 16)
    children = np.zeros((oh * ow, num_i), np.int64)
    for y in range(oh):
        for x in range(ow):
            for i in range(k):
                for j in range(k):
                    for cap in range(c):
                        children[y * ow + x, (k * i + j) * c + cap] = (
                            ((s * y + i) * wd + (s * x + j)) * c + cap)
    out_p, out_a = [], []
    for b in range(n):
        mean, act, _ = em_routing_paper_edges(
            votes[b], ta[b].reshape(oh * ow, num_i), children, h * wd * c, beta_v, beta_a,
            iterations, final_lambda, **options)
        out_p.append(mean.reshape(oh, ow, -1, 4, 4))
        out_a.append(act.reshape(oh, ow, -1))
    return np.stack(out_p), np.stack(out_a)


def class_caps_paper(poses, acts, w, beta_v, beta_a, iterations, final_lambda, **options):
    """A ClassCaps layer (coordinate addition) with routing='paper'."""
    n, h, wd, c = acts.shape
    votes = mat_transform(poses.reshape(-1, c, 16), w).reshape(n, h, wd, c, -1, 16)
    votes = coord_addition(votes, h, wd).reshape(n, 1, h * wd * c, -1, 16)
    children = np.arange(h * wd * c).reshape(1, -1)
    out_p, out_a = [], []
    for b in range(n):
        mean, act, _ = em_routing_paper_edges(
            votes[b], acts[b].reshape(1, -1), children, h * wd * c, beta_v, beta_a,
            iterations, final_lambda, **options)
        out_p.append(mean.reshape(-1, 4, 4))
        out_a.append(act.reshape(-1))
    return np.stack(out_p), np.stack(out_a)
