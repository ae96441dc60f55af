"Integration tests for moleflow.lora: base identity, task isolation, gradient routing, argument checks."
import re
import pytest, torch
from moleflow.lora import LoRALinear


def _fit(lin, task, params, x, y, steps=25):
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(steps):
        opt.zero_grad(); (lin(x, task) - y).square().mean().backward(); opt.step()


def test_fresh_expert_is_base():
    torch.manual_seed(0)
    lin = LoRALinear(12, 7, rank=3)
    x = torch.randn(5, 4, 12)
    base = lin(x)
    for t in (0, 1, 5): lin.add_task(t)
    assert lin.tasks == [0, 1, 5]
    for t in (None, 0, 1, 5, 9): assert torch.equal(lin(x, t), base)


@pytest.mark.parametrize('rule,scale', [('alpha/rank', 10.0 / 4), ('alpha/(2*rank)', 10.0 / 8)])
def test_forward_is_w_x_plus_b_plus_scaled_expert_plus_task_bias(rule, scale):
    "alpha != rank and non-zero B and task bias: a dropped, squared or wrong scale, or a missing bias, fails."
    torch.manual_seed(0)
    lin = LoRALinear(12, 7, rank=4, alpha=10.0, scaling=rule)
    lin.add_task(0); lin.add_task(1)
    with torch.no_grad():
        for t in ('0', '1'): lin.lora_B[t].normal_(); lin.bias[t].normal_()
    x = torch.randn(3, 5, 12)
    for t in (0, 1):
        k = str(t)
        ref = x @ lin.base.weight.T + lin.base.bias + scale * (x @ lin.lora_A[k].T @ lin.lora_B[k].T) + lin.bias[k]
        assert lin.scaling == scale
        torch.testing.assert_close(lin(x, t), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lin(x, 0), lin(x, 1))


@pytest.mark.parametrize('scaling', ['alpha/rank', 'alpha/(2*rank)'])
@pytest.mark.parametrize('task_bias', [True, False])
def test_training_task_t_leaves_earlier_tasks_bit_identical(scaling, task_bias):
    torch.manual_seed(1)
    lin = LoRALinear(10, 6, rank=4, alpha=8.0, scaling=scaling, task_bias=task_bias)
    x, y = torch.randn(64, 10), torch.randn(64, 6)
    lin.add_task(0); _fit(lin, 0, list(lin.parameters()), x, y)
    lin.freeze_base()
    outs = {}
    for t in (1, 2, 3):
        outs[t - 1] = lin(x, t - 1).detach().clone()
        lin.add_task(t)
        fresh = lin(x, t).detach().clone()
        _fit(lin, t, lin.task_parameters(t), x, y)
        for s, o in outs.items(): assert torch.equal(lin(x, s), o), (t, s)
        assert not torch.equal(lin(x, t), fresh)  # the trained expert did move
    assert lin.scaling == (8.0 / 4 if scaling == 'alpha/rank' else 8.0 / 8)


def test_gradients_reach_only_the_active_expert():
    torch.manual_seed(2)
    lin = LoRALinear(8, 8, rank=2)
    for t in range(3): lin.add_task(t)
    lin.freeze_base()
    with torch.no_grad():
        for t in range(3): lin.lora_B[str(t)].normal_()
    lin(torch.randn(16, 8), 1).pow(2).sum().backward()
    for t in (0, 2): assert all(p.grad is None for p in lin.task_parameters(t))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lin.task_parameters(1))
    assert lin.base.weight.grad is None and lin.base.bias.grad is None
    assert not lin.base.weight.requires_grad


def test_parameter_listing_and_counts():
    lin = LoRALinear(20, 30, rank=5)
    lin.add_task(0)
    assert [tuple(p.shape) for p in lin.task_parameters(0)] == [(5, 20), (30, 5), (30,)]
    assert lin.num_task_params(0) == 5 * 50 + 30
    nb = LoRALinear(20, 30, rank=5, task_bias=False); nb.add_task(0)
    assert nb.num_task_params(0) == 250


def test_seeded_expert_and_dtype():
    a, b = LoRALinear(6, 4).double(), LoRALinear(6, 4).double()
    a.add_task(0, generator=torch.Generator().manual_seed(7)); b.add_task(0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.lora_A['0'], b.lora_A['0']) and a.lora_A['0'].dtype == torch.float64
    assert a(torch.randn(3, 6, dtype=torch.float64), 0).dtype == torch.float64


@pytest.mark.parametrize('kw, msg', [
    (dict(rank=0), 'rank must be a positive int, got 0'),
    (dict(rank=-3), 'rank must be a positive int'),
    (dict(rank=True), 'rank must be a positive int'),
    (dict(alpha=0.0), 'alpha must be a positive finite number'),
    (dict(alpha=float('nan')), 'alpha must be a positive finite number'),
    (dict(scaling='alpha'), "scaling must be one of ('alpha/rank', 'alpha/(2*rank)')"),
    (dict(in_features=0), 'in_features must be a positive int'),
])
def test_bad_arguments(kw, msg):
    args = dict(in_features=4, out_features=4) | kw
    with pytest.raises(ValueError, match=re.escape(msg)):
        LoRALinear(**args)


def test_bad_task_ids():
    lin = LoRALinear(4, 4); lin.add_task(0)
    with pytest.raises(ValueError, match='task must be a non-negative int'): lin.add_task(-1)
    with pytest.raises(ValueError, match='task must be a non-negative int'): lin.add_task(1.0)
    with pytest.raises(ValueError, match='already has an expert'): lin.add_task(0)
    with pytest.raises(ValueError, match=r'task must be one of the added tasks \[0\], got 4'): lin.task_parameters(4)
