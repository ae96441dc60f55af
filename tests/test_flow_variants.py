"Integration tests for moleflow.flow_variants: invertibility, exact log-det, task isolation, SC-LoRA, attention, DIA."
import re
import numpy as np, pytest, torch
from moleflow.lora import LoRALinear
from moleflow.coupling_flow import MoLEFlow
from moleflow.flow_variants import (VariantFlow, SpatialLoRALinear, CrossPatchSubnet, NeighbourContext, PatchAttention,
                                    DIAFlow, grid_weights, bilinear_weights)
from moleflow.testing import with_tasks, randomise, nll, check_reverse, check_logdet, per_patch_logdets, off_diagonal, check_task_isolation

COMBOS = {
    'cpcf-learned': dict(subnet='cross_patch'),
    'cpcf-fixed': dict(subnet='cross_patch', cross_patch_context='fixed'),
    'v4': dict(subnet='cross_patch', lora_grid=4),
    'v4-expert-rank': dict(subnet='cross_patch', lora_grid=2, expert_rank=3),
    'v4.1-dia': dict(subnet='cross_patch', cross_patch_context='fixed', lora_grid=2, dia_blocks=2, dia_hidden=8),
    'sclora-only': dict(subnet='cross_patch', cross_patch_context='none', lora_grid=3),
    'v6': dict(subnet='cross_patch', cross_patch_context='fixed', lora_grid=2, patch_attention=True, attention_hidden=8),
    'context-dia-attn': dict(subnet='context', patch_attention=True, attention_hidden=8, dia_blocks=1, dia_hidden=8),
    'mlp-dia': dict(subnet='mlp', dia_blocks=3, dia_hidden=8),
}


def tiny(**kw): return VariantFlow(8, **(dict(n_blocks=4, hidden=16, rank=2) | kw))


@pytest.mark.parametrize('kw', COMBOS.values(), ids=COMBOS.keys())
def test_reverse_recovers_input(kw):
    torch.manual_seed(0)
    f = with_tasks(tiny(n_blocks=6, adapter='film', **kw), 0, 1, 2)
    randomise(f.task_parameters(1) + f.task_parameters(2))
    randomise(f.shared_parameters(), std=0.05, seed=1)
    check_reverse(f)


@pytest.mark.parametrize('kw', COMBOS.values(), ids=COMBOS.keys())
def test_logdet_matches_bruteforce_jacobian(kw):
    torch.manual_seed(0)
    f = with_tasks(tiny(**kw), 0, 1).double()
    randomise(f.task_parameters(1)); randomise(f.shared_parameters(), std=0.1, seed=1)
    J, h = check_logdet(f)
    if '1' in f.dia:  # the DIA flow acts on each patch alone: its per-patch log-dets are exact
        u = h.reshape(9, 8)
        for blk in f.blocks: u = blk(u, 1, (1, 3, 3))[0].detach()
        per_patch, _ = per_patch_logdets(lambda v: f.dia['1'](v)[0], u, 9)
        torch.testing.assert_close(per_patch, f.dia['1'](u)[1], rtol=0, atol=1e-9)
    spatial = kw['subnet'] == 'context' or (kw['subnet'] == 'cross_patch' and kw.get('cross_patch_context', 'learned') != 'none')
    assert (off_diagonal(J) > 0) == spatial


@pytest.mark.parametrize('kw', [COMBOS[k] for k in ('v4', 'v4.1-dia', 'v6', 'context-dia-attn')],
                         ids=['v4', 'v4.1-dia', 'v6', 'context-dia-attn'])
def test_training_task_t_leaves_earlier_tasks_bit_identical(kw):
    torch.manual_seed(0)
    f = with_tasks(tiny(**kw), 0)
    check_task_isolation(f, [p for p in f.parameters() if p.requires_grad])
    if f.attention is not None:   # trained with task 0, then frozen
        assert f.attention.gate.item() != 0 and all(not p.requires_grad for p in f.attention.parameters())


def test_gradients_reach_only_the_active_task():
    torch.manual_seed(0)
    f = with_tasks(tiny(**COMBOS['v6'], dia_blocks=1, dia_hidden=8), 0, 1, 2)
    f.freeze_shared(); f.zero_grad()
    nll(*f(torch.randn(2, 4, 4, 8), 2)).backward()
    assert all(p.grad is None for p in f.shared_parameters() + f.task_parameters(0) + f.task_parameters(1))
    assert all(p.grad is not None for p in f.task_parameters(2))


def test_sclora_grid_nodes_zero_init_and_single_node():
    torch.manual_seed(0)
    sl = SpatialLoRALinear(5, 6, rank=3, grid=4)
    sl.add_task(0, generator=torch.Generator().manual_seed(0)); sl.add_task(1)
    x, sp = torch.randn(3 * 7 * 10, 5), (3, 7, 10)
    assert torch.equal(sl(x, 0, sp), sl.base(x)) and torch.equal(sl(x, 1, sp), sl.base(x))   # zero B: nothing changes
    with torch.no_grad(): sl.lora_B['0'].normal_(); sl.bias['0'].normal_()
    assert torch.equal(sl(x, 1, sp), sl.base(x))                                          # one grid per task
    wts = bilinear_weights(7, 10, 4)                                                       # the expert at every patch
    A = torch.einsum('pk,kri->pri', wts, sl.lora_A['0']).view(7, 10, 3, 5)                 # rows 0,2,4,6; cols 0,3,6,9
    B = torch.einsum('pk,kor->por', wts, sl.lora_B['0']).view(7, 10, 6, 3)
    for i in range(4):
        for j in range(4):
            assert torch.equal(A[2 * i, 3 * j], sl.lora_A['0'][4 * i + j])
            assert torch.equal(B[2 * i, 3 * j], sl.lora_B['0'][4 * i + j])
    mid = 0.5 * (sl.lora_A['0'][0] + sl.lora_A['0'][4])                                    # between two row nodes
    torch.testing.assert_close(A[1, 0], mid, rtol=0, atol=1e-6)
    explicit = (sl.base(x).view(3, 7, 10, 6) + sl.bias['0']
                + sl.scaling * torch.einsum('hwor,hwri,bhwi->bhwo', B, A, x.view(3, 7, 10, 5)))
    torch.testing.assert_close(sl(x, 0, sp).view(3, 7, 10, 6), explicit, rtol=1e-5, atol=1e-5)
    one, plain = SpatialLoRALinear(5, 6, rank=3, alpha=3.0, grid=1), LoRALinear(5, 6, rank=3, alpha=3.0)
    one.add_task(0); plain.add_task(0)
    with torch.no_grad(): one.lora_B['0'].normal_()
    plain.load_state_dict({k: v.reshape(plain.state_dict()[k].shape) for k, v in one.state_dict().items()})
    torch.testing.assert_close(one(x, 0, sp), plain(x, 0), rtol=0, atol=1e-6)   # a 1x1 grid is a plain expert


def test_grid_weights():
    assert torch.equal(grid_weights(7, 4)[::2], torch.eye(4))
    for n, G in [(1, 1), (1, 4), (5, 3), (28, 4), (3, 8)]:
        w = grid_weights(n, G)
        torch.testing.assert_close(w.sum(1), torch.ones(n))
        assert (w >= 0).all() and ((w > 0).sum(1) <= 2).all()
        pos = (w * torch.arange(G)).sum(1)               # the interpolated node coordinate grows linearly
        if n > 1: torch.testing.assert_close(pos, torch.linspace(0, G - 1, n), rtol=0, atol=1e-6)
    assert bilinear_weights(28, 28, 4).shape == (784, 16)


def test_patch_attention_gate_zero_is_identity():
    torch.manual_seed(0)
    at = PatchAttention(16, hidden=8)
    x = 3 * torch.randn(2, 5, 6, 16)
    assert torch.equal(at(x), x)
    with torch.no_grad(): at.gate.fill_(0.3)
    assert not torch.equal(at(x), x)
    f = with_tasks(tiny(patch_attention=True, attention_hidden=8), 0)
    x = torch.randn(2, 4, 4, 8)
    assert torch.equal(f.prepare(x, 0), MoLEFlow.prepare(f, x, 0))   # a new flow's attention changes nothing
    assert all(any(p is q for q in f.shared_parameters()) for p in f.attention.parameters())


def test_dia_starts_as_identity_and_belongs_to_its_task():
    torch.manual_seed(0)
    d = DIAFlow(9, n_blocks=3, hidden=8)
    u = torch.randn(20, 9)
    out, ld = d(u)
    assert torch.equal(out, u) and torch.equal(ld, torch.zeros(20))
    f = with_tasks(tiny(dia_blocks=2, dia_hidden=8), 0, 1)
    g = with_tasks(MoLEFlow(8, n_blocks=4, hidden=16, rank=2), 0, 1)
    x = torch.randn(2, 3, 3, 8)
    assert all(torch.equal(a, b) for a, b in zip(f(x, 1), g(x, 1)))   # same seed, fresh DIA: the MoLEFlow's output
    owned = {id(p) for p in f.task_parameters(1)}
    assert all(id(p) in owned for p in f.dia['1'].parameters())
    counts = f.param_counts()
    assert counts['shared'] + sum(counts['per_task'].values()) == sum(p.numel() for p in f.parameters())


def test_neighbour_context_fixed_and_learned():
    g = torch.randn(2, 5, 6, 3)
    rows, sp = g.reshape(-1, 3), (2, 5, 6)
    ctx = NeighbourContext(3, kernel=5)(rows, sp).view(2, 5, 6, 3)
    for b, i, j in [(0, 2, 2), (1, 0, 0), (1, 4, 5), (0, 1, 3)]:
        nb = [g[b, a, c] for a in range(i - 2, i + 3) for c in range(j - 2, j + 3)
              if 0 <= a < 5 and 0 <= c < 6 and (a, c) != (i, j)]
        torch.testing.assert_close(ctx[b, i, j], torch.stack(nb).mean(0), rtol=0, atol=1e-6)
    learned = NeighbourContext(3, kernel=5, learnable=True)
    torch.testing.assert_close(learned(rows, sp).view(2, 5, 6, 3), ctx, rtol=0, atol=1e-6)
    with torch.no_grad(): learned.weight.fill_(1.0)
    x2 = rows.clone(); x2[7] += 1.0                       # the centre tap stays masked: a patch never sees itself
    assert torch.equal(learned(x2, sp)[7], learned(rows, sp)[7])


def test_options_off_equal_moleflow_and_seeds_reproduce():
    torch_state = torch.random.get_rng_state()
    a = with_tasks(tiny(seed=5), 0, 1).state_dict()
    b = with_tasks(MoLEFlow(8, n_blocks=4, hidden=16, rank=2, seed=5), 0, 1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def sd(seed): return with_tasks(tiny(seed=seed, **COMBOS['v6'], dia_blocks=1, dia_hidden=8), 0, 1).state_dict()
    c, d, e = sd(7), sd(7), sd(8)
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert any(not torch.equal(c[k], e[k]) for k in c if 'attention' in k)
    assert any(not torch.equal(c[k], e[k]) for k in c if k.startswith('dia.'))
    assert torch.equal(torch.random.get_rng_state(), torch_state)


def test_state_dict_roundtrip_reproduces_outputs():
    torch.manual_seed(0)
    kw = dict(COMBOS['v6'], dia_blocks=1, dia_hidden=8)
    f = with_tasks(tiny(seed=1, **kw), 0, 1); randomise(f.parameters())
    g = with_tasks(tiny(seed=2, **kw), 0, 1); g.load_state_dict(f.state_dict())
    x = torch.randn(1, 3, 4, 8)
    for t in (0, 1): assert all(torch.equal(a, b) for a, b in zip(f(x, t), g(x, t)))


def test_no_lora_flow_has_no_experts():
    f = with_tasks(tiny(lora=False, dia_blocks=1, dia_hidden=8), 0, 1)
    assert all(m.tasks == [] for m in f.lora_layers())
    assert f.param_counts()['per_task'][1] == (sum(p.numel() for p in f.adapters['1'].parameters())
                                               + sum(p.numel() for p in f.dia['1'].parameters()))


@pytest.mark.parametrize('kw, msg', [
    (dict(lora_grid=4), "lora_grid > 0 needs subnet='cross_patch'"),
    (dict(subnet='cross_patch', lora_grid=-1), 'lora_grid must be a non-negative int'),
    (dict(subnet='cross_patch', cross_patch_context='conv'), "cross_patch_context must be one of ('learned', 'fixed', 'none')"),
    (dict(subnet='cross_patch', cross_patch_gate=1.0), 'cross_patch_gate must be in (0, 1)'),
    (dict(subnet='cross_patch', context_kernel=1), 'context_kernel must be an odd int >= 3'),
    (dict(dia_blocks=-2), 'dia_blocks must be a non-negative int'),
    (dict(dia_blocks=1, dia_hidden=0), 'dia_hidden must be a positive int'),
    (dict(patch_attention=True, attention_hidden=0), 'attention_hidden must be a positive int'),
    (dict(subnet='conv'), "subnet must be one of ('context', 'mlp', 'cross_patch')"),
])
def test_bad_construction(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)): tiny(**kw)


def test_bad_input():
    f = with_tasks(tiny(**COMBOS['v6'], dia_blocks=1, dia_hidden=8), 0)
    with pytest.raises(ValueError, match=re.escape('x must be a (B, H, W, 8) feature tensor')): f(torch.randn(2, 3, 3, 7), 0)
    with pytest.raises(ValueError, match=re.escape('z must be a (B, H, W, 8)')): f.reverse(torch.randn(3, 3, 8), 0)
    with pytest.raises(ValueError, match=re.escape('task must be one of the added tasks [0], got 1')): f.reverse(torch.randn(1, 2, 2, 8), 1)
    sl = SpatialLoRALinear(4, 4, rank=2, grid=2); sl.add_task(0)
    with pytest.raises(ValueError, match=re.escape('spatial must be (B, H, W) with B*H*W = 6 rows')): sl(torch.randn(6, 4), 0, (1, 2, 2))
    with pytest.raises(ValueError, match='task 0 already has an expert'): sl.add_task(0)
