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
