"Checks shared by the flow tests (tests/test_coupling_flow.py, tests/test_flow_variants.py): invertibility, exact log-det, task isolation."
import torch


def with_tasks(flow, *tasks):
    for t in tasks: flow.add_task(t)
    return flow


def randomise(params, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params: p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def nll(z, ld): return (0.5 * z.square().sum(-1) - ld).mean()


def train(flow, task, params, x, steps=4):
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(); nll(*flow(x, task)).backward(); opt.step()


def check_reverse(f, tasks=(0, 1, 2), tol=1e-4):
    "`f.reverse` inverts `f.flow_forward` and `f.prepare` for every task, on (2,7,5,D) inputs."
    D = f.dim
    h = 2 * torch.randn(2, 7, 5, D)
    for t in tasks:
        z, ld = f.flow_forward(h, t)
        assert (f.reverse(z, t) - h).abs().max().item() < tol, t
        assert torch.isfinite(ld).all() and ld.shape == (2, 7, 5)
    x, t = torch.randn(2, 7, 5, D), tasks[-1]
    z, _ = f(x, t)
    assert (f.reverse(z, t) - f.prepare(x, t)).abs().max().item() < tol


def per_patch_logdets(fn, u, n):
    "Exact per-patch log-dets of a map `fn` on `n` patch rows `u (n,D)` that acts on each patch alone, and its Jacobian."
    D = u.shape[-1]
    J = torch.autograd.functional.jacobian(fn, u).reshape(n, D, n, D)
    return torch.stack([torch.linalg.slogdet(J[p, :, p, :]).logabsdet for p in range(n)]), J


def check_logdet(f, task=1):
    """The flow's log-det equals the brute-force Jacobian's on a 3x3 grid (float64); so does every coupling block's,
    per patch. Returns the whole flow's Jacobian (9,D,9,D) and the input, for checks of its spatial structure."""
    D = f.dim
    h = torch.randn(1, 3, 3, D, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: f.flow_forward(v, task)[0], h).reshape(9, D, 9, D)
    full = torch.linalg.slogdet(J.reshape(9 * D, 9 * D))
    assert full.sign != 0
    torch.testing.assert_close(full.logabsdet, f.flow_forward(h, task)[1].sum(), rtol=0, atol=1e-9)
    u = h.reshape(9, D)
    for blk in f.blocks:   # each block alone is block-triangular over (conditioning, transformed) halves: exact per patch
        per_patch, Jb = per_patch_logdets(lambda v: blk(v, task, (1, 3, 3))[0], u, 9)
        out, ldb = blk(u, task, (1, 3, 3))
        torch.testing.assert_close(per_patch, ldb, rtol=0, atol=1e-9)
        torch.testing.assert_close(torch.linalg.slogdet(Jb.reshape(9 * D, 9 * D)).logabsdet, ldb.sum(), rtol=0, atol=1e-9)
        u = out.detach()
    return J, h


def off_diagonal(J):
    "Largest |entry| of a (n,D,n,D) Jacobian between different patches (0 for a patch-wise map)."
    off = J.clone(); off[range(J.shape[0]), :, range(J.shape[0]), :] = 0
    return off.abs().max()


def check_task_isolation(f, task0_params, x=None, tasks=(1, 2, 3)):
    """Train task 0 on `task0_params`, freeze the shared weights, then train each later task on its own parameters:
    every earlier task's outputs (and inverse) stay bit-identical, and the task being trained does change."""
    x = torch.randn(2, 5, 4, f.dim) if x is None else x
    train(f, 0, task0_params, x)
    f.freeze_shared()
    assert all(not p.requires_grad for p in f.shared_parameters())
    seen = {}
    for t in tasks:
        seen[t - 1] = tuple(o.detach().clone() for o in f(x, t - 1))
        f.add_task(t)
        fresh = f(x, t)[0].detach().clone()
        train(f, t, f.task_parameters(t), x)
        for s, (z, ld) in seen.items():
            z2, ld2 = f(x, s)
            assert torch.equal(z2, z) and torch.equal(ld2, ld), (t, s)
            assert torch.equal(f.reverse(z, s), f.reverse(z2, s))
        assert not torch.equal(f(x, t)[0], fresh)
