"Integration checks of moleflow.router: perfect routing of separated tasks, Ledoit–Wolf conditioning, state round trip."
import io
import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf
from moleflow.router import PrototypeRouter, ledoit_wolf, image_features

def routing_accuracy(pred, true): return (pred == true).double().mean().item()


def tasks_of(means, n, g, scale=1.0, H=3, W=3):
    "Patch features (n,H,W,D) per task around each image-level mean."
    out = []
    for m in means:
        img = m + scale * torch.randn(n, len(m), generator=g)
        out.append(img[:, None, None] + 0.2 * torch.randn(n, H, W, len(m), generator=g))
    return out


@pytest.mark.parametrize('metric', ['mahalanobis', 'euclidean'])
def test_separated_tasks_route_perfectly(metric):
    g = torch.Generator().manual_seed(0)
    D = 64
    means = [torch.randn(D, generator=g) * 2 for _ in range(5)]
    train, test = tasks_of(means, 50, g), tasks_of(means, 40, g)   # N < D per task for Mahalanobis
    r = PrototypeRouter(metric)
    for t, f in enumerate(train): r.add_task(t, f)
    pred = r.route(torch.cat(test))
    assert pred.dtype == torch.long
    assert routing_accuracy(pred, torch.arange(5).repeat_interleave(40)) == 1.0
    assert r.tasks == list(range(5))


def test_mahalanobis_beats_euclidean_on_anisotropic_tasks():
    g = torch.Generator().manual_seed(3)
    D = 8
    sd = torch.tensor([6.0, 6.0, 6.0] + [0.3] * (D - 3))        # noisy first axes, informative quiet ones
    mu1 = torch.zeros(D); mu1[:3] = 8.0; mu1[3:] = 1.0
    mus = [torch.zeros(D), mu1]
    train = [m + sd * torch.randn(300, D, generator=g) for m in mus]
    test = torch.cat([m + sd * torch.randn(400, D, generator=g) for m in mus])
    true = torch.arange(2).repeat_interleave(400)
    acc = {}
    for metric in ('mahalanobis', 'euclidean'):
        r = PrototypeRouter(metric)
        for t, f in enumerate(train): r.add_task(t, f)
        acc[metric] = routing_accuracy(r.route(test), true)
    assert acc['mahalanobis'] > 0.99, acc
    assert acc['euclidean'] < acc['mahalanobis'] - 0.1, acc


@pytest.mark.parametrize('n,d', [(5, 32), (20, 128), (64, 256)])
def test_ledoit_wolf_is_well_conditioned_when_n_below_d(n, d):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d)
    cov, s = ledoit_wolf(torch.from_numpy(x))
    lw = LedoitWolf().fit(x)
    assert np.allclose(cov.numpy(), lw.covariance_, rtol=1e-8, atol=1e-10)
    assert s == pytest.approx(lw.shrinkage_, rel=1e-8)
    ev = torch.linalg.eigvalsh(cov)
    assert ev.min() > 0 and (ev.max() / ev.min()).item() < 50
    assert torch.isfinite(torch.linalg.inv(cov)).all()
    emp_ev = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    assert emp_ev.min() < 1e-8 * emp_ev.max()                  # the sample covariance is singular


def test_state_dict_round_trip_gives_identical_routes(tmp_path):
    g = torch.Generator().manual_seed(5)
    means = [torch.randn(16, generator=g) * 3 for _ in range(3)]
    train, test = tasks_of(means, 30, g), torch.cat(tasks_of(means, 10, g))
    r = PrototypeRouter()
    r.add_task(0, torch.cat([train[0], train[1]]), classes=['a'] * 30 + ['b'] * 30)
    r.add_task(1, train[2])
    torch.save(r.state_dict(), tmp_path / 'router.pt')
    r2 = PrototypeRouter().load_state_dict(torch.load(tmp_path / 'router.pt', weights_only=True))
    assert torch.equal(r2.route(test), r.route(test))
    assert torch.equal(r2.distances(test), r.distances(test))
    assert [p['name'] for p in r2.prototypes] == ['a', 'b', None]
    # the saved state is independent of the live router
    sd = r.state_dict(); sd['prototypes'][0]['mean'].add_(100.)
    assert torch.equal(r.distances(test), r2.distances(test))


def test_image_level_features_are_spatial_means():
    f = torch.randn(4, 5, 6, 7)
    r1 = PrototypeRouter().add_task(0, f).add_task(1, f + 3)
    r2 = PrototypeRouter().add_task(0, f.mean((1, 2))).add_task(1, (f + 3).mean((1, 2)))
    assert torch.allclose(r1.distances(f), r2.distances(f.mean((1, 2))))
    assert image_features(f).shape == (4, 7)


@pytest.mark.parametrize('call,msg', [
    (lambda r, f: PrototypeRouter('cosine'), 'metric must be one of'),
    (lambda r, f: r.add_task(1, f[0]), 'features must be a non-empty tensor of shape (N,H,W,D) or (N,D)'),
    (lambda r, f: r.add_task(1, f[..., :4]), 'features must have D=8 channels'),
    (lambda r, f: r.route(f[..., :4]), 'features must have D=8 channels'),
    (lambda r, f: r.add_task(0, f), 'task 0 already has prototypes'),
    (lambda r, f: r.add_task('1', f), 'task must be a non-negative int'),
    (lambda r, f: r.add_task(1, f, classes=['a', 'b']), 'classes must name one class per sample'),
    (lambda r, f: r.add_task(1, f[:1]), 'at least 2 samples'),
    (lambda r, f: r.add_task(1, torch.ones(5, 8)), 'zero variance'),
    (lambda r, f: PrototypeRouter().route(f), 'router has no prototypes'),
    (lambda r, f: r.load_state_dict({'metric': 'mahalanobis'}), "keys 'metric' and 'prototypes'"),
])
def test_bad_input(call, msg):
    f = torch.randn(10, 2, 2, 8)
    r = PrototypeRouter().add_task(0, f)
    with pytest.raises(ValueError) as e: call(r, f)
    assert msg in str(e.value)
