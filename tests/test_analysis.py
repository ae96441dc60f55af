"The analysis toolkit against the library: probes change nothing and measure what the loss implies, hooks add up, studies train through ContinualTrainer."
import json, math, sys, subprocess
from pathlib import Path
import numpy as np, pytest, torch
from moleflow.analysis import (GradientProbe, LayerLogdetRecorder, decide, edge_distance_test, make_study, train_model,
                               train_models, evaluate_model, class_nll, mean_ci, write_results, read_results, VERDICTS)
from moleflow.config import MoLEConfig
from moleflow.losses import patch_nll
from moleflow.trainer import ContinualTrainer
from moleflow.run import run_continual

def flow_cfg(**kw):
    base = dict(feature_dim=16, num_coupling_layers=3, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, epochs=2, batch_size=4)
    return MoLEConfig(**{**base, **kw})

def feats(n=8, seed=0, H=6, W=6, D=16):
    return torch.randn(n, H, W, D, generator=torch.Generator().manual_seed(seed))

def test_probe_leaves_training_bit_identical_over_tasks():
    plain, probed = ContinualTrainer(flow_cfg(), progress=False), ContinualTrainer(flow_cfg(), progress=False)
    for t in range(2): plain.train_task(feats(seed=t))
    with GradientProbe(probed.flow, 0.05) as probe:
        for t in range(2): probed.train_task(feats(seed=t))
    assert all(torch.equal(a, b) for a, b in zip(plain.flow.state_dict().values(), probed.flow.state_dict().values()))
    assert [s['task'] for s in probe.steps] == [0] * 4 + [1] * 4 and [s['step'] for s in probe.steps[4:]] == [0, 1, 2, 3]
    # task 1 trains only its expert: the probe still sees gradients in every block (the LoRA parameters live there)
    assert all(n > 0 for n in probe.steps[-1]['layer_norm'])

def test_probe_measures_the_gain_the_loss_implies():
    "At the first step both models are identical, so a tail patch's gradient is exactly N/k larger under top-k (w=1)."
    kw = dict(subnet_type='mlp', logdet_reg=0.0, grad_clip=0.0)   # no spatial context, no regulariser: patches are independent
    runs = {}
    for w in (0.0, 1.0):
        tr = ContinualTrainer(flow_cfg(tail_weight=w, tail_top_k_ratio=0.1, **kw), progress=False)
        with GradientProbe(tr.flow, 0.1, keep_patch_grads=True) as p: tr.train_task(feats())
        runs[w] = p.steps[0]
    N, k = runs[1.0]['n_patches'], runs[1.0]['k']
    assert (N, k) == (36, 3)
    assert np.array_equal(runs[0.0]['tail_mask'], runs[1.0]['tail_mask'])
    np.testing.assert_allclose(runs[1.0]['tail_grad'] / runs[0.0]['tail_grad'], N / k, rtol=1e-4)
    assert runs[1.0]['tail_share'] == pytest.approx(1.0) and runs[1.0]['rest_grad'] == 0
    assert runs[1.0]['gini'] > 0.9 > 0.5 > runs[0.0]['gini']

def test_layer_logdets_rebuild_the_nll():
    tr = ContinualTrainer(flow_cfg(), progress=False); tr.train_task(feats())
    x = feats(5, seed=9)
    with LayerLogdetRecorder(tr.flow) as rec: nll = tr.nll_maps(x, [0] * 5)
    with torch.no_grad(): z, _ = tr.flow(x, task=0)
    D = x.shape[-1]
    rebuilt = 0.5 * z.pow(2).sum(-1) + 0.5 * D * math.log(2 * math.pi) - rec.logdets().sum(0)
    torch.testing.assert_close(rebuilt, nll, rtol=1e-5, atol=1e-4)

def test_verdicts_on_simulated_effects():
    rng = np.random.default_rng(0)
    real = [decide(mean_ci(rng.normal(0.5, 1, 200), seed=i), seed_effects=[0.4, 0.6])['verdict'] for i in range(5)]
    assert real == ['supported'] * 5
    null = [decide(mean_ci(rng.normal(0, 1, 200), seed=i), margin=0.5)['verdict'] for i in range(20)]
    assert set(null) <= {'not_supported', 'inconclusive'} and null.count('not_supported') >= 15   # inside the +-0.5 band

def test_edge_test_is_calibrated_under_uniform_positions():
    rng = np.random.default_rng(1)
    ps = [edge_distance_test(rng.random((20, 10, 10)) < 0.03, n_mc=300, seed=i)['p_value'] for i in range(40)]
    assert np.mean(np.array(ps) < 0.05) <= 0.15

def test_results_are_strict_json(tmp_path):
    h = decide(dict(estimate=float('nan'), ci_low=-1.0, ci_high=1.0))
    p = write_results(tmp_path, 'x', {'a': float('inf')}, {'v': np.float64(1.5)}, {'H': h})
    json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f'non-strict JSON constant {c}'))
    assert read_results(p)['hypotheses']['H']['verdict'] in VERDICTS
    (tmp_path/'bad.json').write_text('{"summary": {}}')
    with pytest.raises(ValueError, match='missing'): read_results(tmp_path/'bad.json')

def tiny_study(root, cache_dir, out, **kw):
    return make_study('test', data_root=root, classes=['fabric', 'screw'], backbone='resnet18', backbone_weights=None,
                      image_size=64, crop_size=64, epochs=1, seeds=[0, 1], out_dir=out, cache_dir=cache_dir,
                      overrides=dict(feature_dim=32, num_coupling_layers=2, subnet_hidden=32, lora_rank=4, lora_alpha=4.0,
                                     batch_size=4), **kw)

def test_study_trains_through_the_library(generated_root, cache_dir, tmp_path):
    "A study's model is the model `run_continual` trains with the same config: same metrics to the last bit."
    st = tiny_study(generated_root, cache_dir, tmp_path/'out', reuse_models=True)
    models = train_models(st)
    assert {v: sorted(m) for v, m in models.items()} == {'mean_only': [0, 1], 'tail_aware': [0, 1]}
    m = models['tail_aware'][1]
    run = run_continual(m.trainer.cfg, generated_root, [['fabric'], ['screw']], tmp_path/'run', progress=False)
    assert evaluate_model(m, st) == run['final']
    again = train_model(st, 'tail_aware', 1)
    assert again.cached and torch.equal(class_nll(again, st, 'screw'), class_nll(m, st, 'screw'))
    assert not train_model(st, 'tail_aware', 1, use_cache=False).cached

def test_study_rejects_bad_parameters(generated_root, cache_dir, tmp_path):
    with pytest.raises(ValueError, match=r"classes \['carpet'\] not found"):
        make_study('t', data_root=generated_root, classes=['carpet'], out_dir=tmp_path)
    with pytest.raises(ValueError, match='seeds must be distinct'):
        make_study('t', data_root=generated_root, classes=['fabric'], seeds=[1, 1], out_dir=tmp_path)
    with pytest.raises(ValueError, match='tail_top_k_ratio'):
        tiny_study(generated_root, cache_dir, tmp_path, tail_top_k_ratio=0.0)

def test_score_separation_notebook_on_real_data(mvtec_subset, cache_dir, tmp_path, repo_root):
    "Notebook 14 on the shared MVTec subset (leather: 4 training images) at a tiny size, executed by papermill."
    out = tmp_path/'out'
    cmd = [sys.executable, '-m', 'papermill', str(repo_root/'nbs'/'14_score_separation.ipynb'), str(tmp_path/'run.ipynb'),
           '-p', 'data_root', str(mvtec_subset), '-y', "classes: [leather]", '-p', 'epochs', '2', '-p', 'cache_dir', cache_dir,
           '-p', 'n_boot', '100', '-p', 'out_dir', str(out), '--no-progress-bar']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(out/'results.json')
    assert {'H0', 'H4'} <= set(res['hypotheses']) and all(h['verdict'] in VERDICTS for h in res['hypotheses'].values())
    assert 0 < res['summary']['pixel_ap_tail_aware'] <= 1 and (out/'score_histograms.png').is_file()
