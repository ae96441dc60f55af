"Integration tests for moleflow.coupling_flow: invertibility, exact log-det, task isolation, seeds, bad input."
import re
import numpy as np, pytest, torch
from moleflow.trainer import context_record
from moleflow.coupling_flow import (MoLEFlow, MoLEContextSubnet, FiLMAdapter, WhiteningAdapter, InstanceNormAdapter,
                                    SpatialContextMixer, sinusoidal_pos_embed_2d)
from moleflow.testing import (with_tasks, randomise, nll, train, check_reverse, check_logdet, per_patch_logdets, off_diagonal,
                              check_task_isolation)

SUBNETS = [dict(subnet='mlp'), dict(subnet='context', context_mode='gate'), dict(subnet='context', context_mode='alpha')]
IDS = ['mlp', 'context-gate', 'context-alpha']


def tiny(**kw): return MoLEFlow(8, **(dict(n_blocks=4, hidden=16, rank=2) | kw))


@pytest.mark.parametrize('kw', SUBNETS, ids=IDS)
@pytest.mark.parametrize('adapter', ['whitening', 'film', 'instance_norm', 'none'])
def test_reverse_recovers_input(kw, adapter):
    torch.manual_seed(0)
    f = with_tasks(tiny(n_blocks=8, adapter=adapter, spatial_mixer=True, **kw), 0, 1, 2)
    randomise(f.task_parameters(1) + f.task_parameters(2))
    randomise(f.shared_parameters(), std=0.05, seed=1)
    check_reverse(f)


@pytest.mark.parametrize('kw', SUBNETS, ids=IDS)
def test_logdet_matches_bruteforce_jacobian(kw):
    torch.manual_seed(0)
    f = with_tasks(tiny(**kw), 0, 1).double()
    randomise(f.task_parameters(1)); randomise(f.shared_parameters(), std=0.1, seed=1)
    J, h = check_logdet(f)
    if kw['subnet'] == 'mlp':  # block-diagonal: the whole flow's per-patch values are exact too
        assert off_diagonal(J) == 0
        per_patch, _ = per_patch_logdets(lambda v: f.flow_forward(v.view(1, 3, 3, 8), 1)[0].view(9, 8), h.view(9, 8), 9)
        torch.testing.assert_close(per_patch, f.flow_forward(h, 1)[1].flatten(), rtol=0, atol=1e-9)
    else:
        assert off_diagonal(J) > 0


@pytest.mark.parametrize('cfg', [dict(subnet='context', adapter='whitening'),
                                 dict(subnet='context', context_mode='alpha', adapter='film', spatial_mixer=True),
                                 dict(subnet='mlp', adapter='instance_norm', task0_expert=False, lora_scaling='alpha/(2*rank)'),
                                 dict(subnet='context', adapter='film', expert_adapter_norm='mix', expert_rank=6)],
                         ids=['v3-gate', 'alpha-film-mixer', 'v1', 'mix-expert-rank'])
def test_training_task_t_leaves_earlier_tasks_bit_identical(cfg):
    torch.manual_seed(0)
    f = with_tasks(tiny(**cfg), 0)
    check_task_isolation(f, f.shared_parameters() + f.task_parameters(0))


def test_task0_trains_global_affine_and_gradients_stay_in_task():
    torch.manual_seed(0)
    f = with_tasks(tiny(), 0)
    assert all(b.global_scale.requires_grad and b.global_offset.requires_grad for b in f.blocks)
    shared_ids = {id(p) for p in f.shared_parameters()}
    assert all(id(b.global_scale) in shared_ids for b in f.blocks)
    init = [b.global_scale.detach().clone() for b in f.blocks]
    train(f, 0, f.shared_parameters() + f.task_parameters(0), torch.randn(2, 4, 4, 8))
    assert all(not torch.equal(b.global_scale, g) for b, g in zip(f.blocks, init))
    f.freeze_shared(); f.zero_grad(); f.add_task(1); f.add_task(2)
    nll(*f(torch.randn(2, 4, 4, 8), 2)).backward()
    assert all(p.grad is None for p in f.shared_parameters() + f.task_parameters(0) + f.task_parameters(1))
    assert all(p.grad is not None for p in f.task_parameters(2))


def test_same_seed_same_model_other_seed_differs():
    def sd(seed): return with_tasks(tiny(seed=seed, spatial_mixer=True, adapter='film'), 0, 1).state_dict()
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    a, b, c = sd(11), sd(11), sd(12)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_init = [k for k in a if a[k].unique().numel() > 2]  # everything not initialised to constants or 0/1
    assert len(random_init) > 20 and all(not torch.equal(a[k], c[k]) for k in random_init)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith('w_perm'))
    assert torch.equal(torch.random.get_rng_state(), torch_state) and (np.random.get_state()[1] == np_state).all()


def test_state_dict_roundtrip_reproduces_outputs():
    torch.manual_seed(0)
    f = with_tasks(tiny(seed=1), 0, 1); randomise(f.parameters())
    g = with_tasks(tiny(seed=2), 0, 1); g.load_state_dict(f.state_dict())
    x = torch.randn(1, 3, 4, 8)
    for t in (0, 1): assert all(torch.equal(a, b) for a, b in zip(f(x, t), g(x, t)))


def test_parameter_ownership():
    f = with_tasks(tiny(adapter='film'), 0, 1)
    counts = f.param_counts()
    assert counts['shared'] + sum(counts['per_task'].values()) == sum(p.numel() for p in f.parameters())
    ids = [{id(p) for p in f.task_parameters(t)} for t in (0, 1)]
    assert not ids[0] & ids[1] and not ids[0] & {id(p) for p in f.shared_parameters()}
    v1 = with_tasks(tiny(task0_expert=False, adapter='none'), 0, 1)
    assert v1.task_parameters(0) == [] and v1.param_counts()['per_task'][1] > 0


def test_typical_size_shapes_and_invertibility():
    torch.manual_seed(0)
    f = with_tasks(MoLEFlow(128, n_blocks=8, hidden=256), 0)
    x = torch.randn(2, 28, 28, 128)
    with torch.no_grad():
        z, ld = f(x, 0)
        assert z.shape == x.shape and ld.shape == (2, 28, 28)
        assert (f.reverse(z, 0) - f.prepare(x, 0)).abs().max().item() < 1e-4
    stats = context_record(f)
    assert set(stats) == {'gate_mean', 'gate_std', 'gate_min', 'gate_max'} and abs(stats['gate_mean'] - 0.5) < 1e-6


def test_building_blocks_initial_state():
    x = torch.randn(2, 4, 6, 32)
    torch.testing.assert_close(WhiteningAdapter(32)(x), torch.nn.functional.layer_norm(x, (32,)))
    torch.testing.assert_close(FiLMAdapter(32)(x), torch.nn.functional.layer_norm(x, (32,)))
    assert torch.equal(SpatialContextMixer(32)(x), x)
    y = InstanceNormAdapter(32)(x)
    torch.testing.assert_close(y.mean((1, 2)), torch.zeros(2, 32), atol=1e-5, rtol=0)
    pe = sinusoidal_pos_embed_2d(28, 28, 128)
    assert pe.shape == (28, 28, 128) and len(torch.unique(pe.view(-1, 128), dim=0)) == 28 * 28
    a = MoLEContextSubnet(4, 8, mode='alpha'); a(torch.randn(6, 4), 0, (1, 2, 3))
    assert abs(a._last_weight.item() - 0.1) < 1e-6


@pytest.mark.parametrize('kw, msg', [
    (dict(clamp=0), 'clamp must be a positive finite number, got 0'),
    (dict(clamp=-1.0), 'clamp must be a positive finite number'),
    (dict(clamp=float('nan')), 'clamp must be a positive finite number'),
    (dict(rank=0), 'rank must be a positive int, got 0'),
    (dict(alpha=-2.0), 'alpha must be a positive finite number'),
    (dict(lora_scaling='rank'), 'lora_scaling must be one of'),
    (dict(subnet='conv'), "subnet must be one of ('context', 'mlp')"),
    (dict(context_mode='hard'), "context_mode must be one of ('gate', 'alpha')"),
    (dict(context_kernel=2), 'context_kernel must be a positive odd int'),
    (dict(context_init_scale=0.5), 'context_init_scale must be in (0, context_max_alpha=0.2)'),
    (dict(adapter='bn'), 'adapter must be one of'),
    (dict(n_blocks=0), 'n_blocks must be a positive int'),
    (dict(seed=-1), 'seed must be a non-negative int'),
])
def test_bad_construction(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)): tiny(**kw)


def test_bad_input_and_task():
    f = with_tasks(tiny(), 0)
    for bad in (torch.randn(2, 9, 8), torch.randn(2, 3, 3, 7), torch.randn(1, 2, 3, 3, 8)):
        with pytest.raises(ValueError, match=re.escape('x must be a (B, H, W, 8) feature tensor, got')): f(bad, 0)
    with pytest.raises(ValueError, match=re.escape('h must be a (B, H, W, 8)')): f.flow_forward(torch.randn(9, 8), 0)
    with pytest.raises(ValueError, match=re.escape('z must be a (B, H, W, 8)')): f.reverse(torch.randn(3, 3, 4), 0)
    with pytest.raises(ValueError, match=re.escape('task must be one of the added tasks [0], got 1')): f(torch.randn(1, 2, 2, 8), 1)
    with pytest.raises(ValueError, match='task must be a non-negative int'): f.task_parameters(-2)
    with pytest.raises(ValueError, match='task 0 was already added'): f.add_task(0)
