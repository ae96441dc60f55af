"Integration checks of moleflow.losses: one per-patch scale, exact tail-aware gradients, clear errors."
import math
import pytest
import torch
from moleflow.losses import (patch_nll, bits_per_dim, mean_nll, tail_k, tail_aware_loss, focal_nll, center_loss,
                             logdet_reg)


def brute_tail(nll, w, r):
    "Tail-aware loss by explicit loops over images and sorted patch lists."
    B, H, W = nll.shape
    k = max(1, int(H * W * r + 1e-9))
    total, tails = 0.0, []
    for b in range(B):
        vals = [nll[b, i, j].item() for i in range(H) for j in range(W)]
        total += sum(vals)
        tails.append(sum(sorted(vals, reverse=True)[:k]) / k)
    return (1 - w) * total / (B * H * W) + w * sum(tails) / B


@pytest.mark.parametrize('shape', [(2, 8, 8), (3, 5, 7), (1, 14, 14), (4, 1, 1), (2, 28, 28)])
@pytest.mark.parametrize('ratio', [0.01, 0.02, 0.1, 0.33, 1.0])
def test_tail_aware_matches_brute_force(shape, ratio):
    g = torch.Generator().manual_seed(hash((shape, ratio)) % 2**31)
    nll = torch.randn(*shape, generator=g, dtype=torch.float64) * 5 + 100
    for w in (0.0, 0.5, 0.7, 1.0):
        assert tail_aware_loss(nll, w, ratio).item() == pytest.approx(brute_tail(nll, w, ratio), rel=1e-12, abs=1e-12)
    assert tail_aware_loss(nll, 0.0, ratio).item() == pytest.approx(mean_nll(nll).item(), rel=1e-14)


@pytest.mark.parametrize('w,ratio,shape', [(0.7, 0.02, (4, 14, 14)), (0.3, 0.25, (2, 4, 6)), (1.0, 0.1, (3, 10, 10))])
def test_tail_aware_gradient_is_exact(w, ratio, shape):
    g = torch.Generator().manual_seed(1)
    nll = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    tail_aware_loss(nll, w, ratio).backward()
    B, N = shape[0], nll.numel()
    k = tail_k(shape[1] * shape[2], ratio)
    top = nll.detach().flatten(1).topk(k, 1).indices
    in_tail = torch.zeros(B, shape[1] * shape[2], dtype=torch.bool).scatter_(1, top, True)
    grad = nll.grad.flatten(1)
    assert torch.allclose(grad[~in_tail], torch.tensor((1 - w) / N, dtype=torch.float64), rtol=1e-13, atol=0)
    assert torch.allclose(grad[in_tail], torch.tensor((1 - w) / N + w / (B * k), dtype=torch.float64), rtol=1e-13, atol=0)
    assert in_tail.sum(1).eq(k).all()


def test_patch_nll_is_per_patch_and_in_nats():
    g = torch.Generator().manual_seed(0)
    z, ld = torch.randn(3, 4, 5, 16, generator=g), torch.randn(3, 4, 5, generator=g)
    ref = -torch.distributions.Normal(0., 1.).log_prob(z).sum(-1) - ld
    assert torch.allclose(patch_nll(z, ld), ref, atol=1e-5)
    # the expected NLL of N(0, I) samples under N(0, I) is its entropy, D/2·(1 + log 2π)
    big = torch.randn(64, 16, 16, 16, generator=g)
    assert mean_nll(patch_nll(big, torch.zeros(64, 16, 16))).item() == pytest.approx(8 * (1 + math.log(2 * math.pi)), rel=1e-2)
    assert bits_per_dim(torch.tensor(16 * math.log(2)), 16).item() == pytest.approx(1.0)


def test_losses_share_one_scale():
    "Doubling the batch with copies of itself changes no loss: all are per-patch means."
    g = torch.Generator().manual_seed(2)
    z, ld = torch.randn(2, 6, 6, 8, generator=g), torch.randn(2, 6, 6, generator=g)
    z2, ld2 = torch.cat([z, z]), torch.cat([ld, ld])
    nll, nll2 = patch_nll(z, ld), patch_nll(z2, ld2)
    for f in (mean_nll, tail_aware_loss, focal_nll):
        assert f(nll).item() == pytest.approx(f(nll2).item(), rel=1e-6)
    assert center_loss(z).item() == pytest.approx(center_loss(z2).item(), rel=1e-6)
    assert logdet_reg(ld, 0.5).item() == pytest.approx(logdet_reg(ld2, 0.5).item(), rel=1e-6)


def test_focal_weight_is_detached_and_bounded():
    nll = torch.tensor([[[-2.0, 0.5], [3.0, 40.0]]], dtype=torch.float64, requires_grad=True)
    focal_nll(nll, gamma=1.5).backward()
    w = (1 - torch.exp(-nll.detach().clamp(0, 20))) ** 1.5
    assert torch.allclose(nll.grad, w / 4, rtol=1e-14)
    assert torch.isfinite(nll.grad).all() and nll.grad[0, 0, 0] == 0



def test_focal_weight_uses_per_dimension_likelihood():
    "At D=128 the per-patch p = exp(-NLL) underflows (focal = mean); the per-dimension p re-weights patches."
    from moleflow.config import MoLEConfig
    from moleflow.trainer import flow_loss
    g = torch.Generator().manual_seed(1)
    D = 128
    z = torch.randn(2, 6, 6, D, generator=g, dtype=torch.float64)
    z[0, 0, 0] *= 3                                                     # one far outlier
    ld = torch.zeros(2, 6, 6, dtype=torch.float64)
    nll = patch_nll(z, ld)
    assert focal_nll(nll).item() == pytest.approx(mean_nll(nll).item(), rel=1e-7)   # p clamps at e^-20
    p = torch.exp(-(nll / D).clamp(0, 20))
    w = (1 - p) ** 2
    assert focal_nll(nll, dim=D).item() == pytest.approx((w * nll).mean().item(), rel=1e-12)
    assert w[0, 0, 0] > 0.95 and w.flatten()[1:].max() < 0.75          # the outlier keeps its weight, the rest fade
    loss, parts = flow_loss(z, ld, MoLEConfig(focal_gamma=2.0, logdet_reg=0.0, center_loss_weight=0.0))
    assert loss.item() == pytest.approx(focal_nll(nll, dim=D).item(), rel=1e-12)   # the trainer passes D
    assert loss.item() < 0.7 * parts['nll'].item()

@pytest.mark.parametrize('call,msg', [
    (lambda t: tail_aware_loss(t, 0.7, 0.0), 'top_k_ratio must be in (0, 1]'),
    (lambda t: tail_aware_loss(t, 0.7, 1.01), 'top_k_ratio must be in (0, 1]'),
    (lambda t: tail_aware_loss(t, -0.2), 'tail_weight must be a number in [0, 1]'),
    (lambda t: tail_aware_loss(t, 1.2), 'tail_weight must be a number in [0, 1]'),
    (lambda t: tail_aware_loss(t[0]), 'nll must be a non-empty tensor of shape (B,H,W)'),
    (lambda t: focal_nll(t, gamma=-1.0), 'gamma must be a number in [0, inf]'),
    (lambda t: focal_nll(t, dim=0), 'dim must be a positive int (the feature dimension D)'),
    (lambda t: logdet_reg(t, -1e-4), 'weight must be a number in [0, inf]'),
    (lambda t: logdet_reg(t[0], 1.0), 'logdet must be a non-empty tensor of shape (B,H,W)'),
    (lambda t: center_loss(t), 'z must be a non-empty tensor of shape (B,H,W,D)'),
    (lambda t: patch_nll(t[..., None], t[0]), 'logdet must have shape (B,H,W)'),
    (lambda t: mean_nll(torch.empty(0, 2, 2)), 'nll must be a non-empty tensor'),
])
def test_bad_input_names_argument(call, msg):
    with pytest.raises(ValueError) as e: call(torch.ones(2, 3, 3))
    assert msg in str(e.value)
