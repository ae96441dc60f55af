"Every preset trains on the generated data; version presets, ablation switches and the per-epoch context log."
import json
import pytest, torch
from moleflow.config import PRESETS, VERSIONS, ABLATIONS, MoLEConfig, make_config, parse_overrides, load_config, save_config
from moleflow.trainer import build_flow, ContinualTrainer
from moleflow.run import run_continual
from moleflow.flow_variants import VariantFlow

TASKS = [['fabric'], ['screw']]

def tiny(cache_dir, **kw):
    "Sizes small enough for a test, on top of whatever a preset sets."
    return dict(backbone='resnet18', backbone_weights=None, feature_dim=32, image_size=64, crop_size=64,
                num_coupling_layers=2, subnet_hidden=32, attention_hidden=16, dia_hidden=16, epochs=1, batch_size=4,
                cache_dir=cache_dir) | kw

@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_every_preset_trains_one_epoch(preset, generated_root, cache_dir, tmp_path):
    cfg = make_config(preset, tiny(cache_dir, lora_rank=4, lora_alpha=4.0))
    m = run_continual(cfg, generated_root, TASKS, tmp_path/preset, progress=False, figures=False)
    assert sorted(m['final']) == ['fabric', 'screw']
    for c in m['final']:
        assert all(0 <= m['final'][c][k] <= 1 for k in ('image_auroc', 'pixel_auroc', 'pixel_ap', 'aupro', 'routing_acc'))
    assert all(len(h) == 1 and h[0]['nonfinite_batches'] == 0 for h in m['history'])   # one epoch per task, all finite
    if all(r == 1.0 for row in m['matrix']['routing_acc'] for r in row if r is not None):
        assert m['forgetting']['pixel_auroc'] == 0.0 and m['forgetting']['aupro'] == 0.0
    saved = load_config(tmp_path/preset/'config.json')
    assert saved == cfg


def test_version_presets_differ_as_documented():
    cfgs = {p: make_config(p) for p in VERSIONS}
    assert cfgs['main'] == MoLEConfig() and PRESETS['main'] == {}
    assert (cfgs['v1'].task0_expert, cfgs['v1'].lora_scaling, cfgs['v1'].adapter) == (False, 'alpha/(2*rank)', 'instance_norm')
    assert (cfgs['v2'].task0_expert, cfgs['v2'].lora_scaling) == (True, 'alpha/rank')
    assert cfgs['v3'].adapter == 'film'
    assert (cfgs['v4'].subnet_type, cfgs['v4'].cross_patch_context, cfgs['v4'].lora_grid, cfgs['v4'].lora_rank) == ('cross_patch', 'learned', 4, 32)
    assert (cfgs['v4.1'].cross_patch_context, cfgs['v4.1'].cross_patch_gate) == ('fixed', 0.3)
    assert cfgs['v5'].center_loss_weight == 0.05 and cfgs['v6'].patch_attention and cfgs['v7'].focal_gamma == 2.0
    assert (cfgs['baseline_1.5'].context_mode, cfgs['baseline_1.5'].context_init_scale, cfgs['baseline_1.5'].context_max_alpha) == ('alpha', 0.1, 0.2)
    assert cfgs['baseline_2.0'].context_mode == 'gate' and cfgs['baseline_2.0'].subnet_type == 'context'
    # what one more task costs at full size: SC-LoRA's grid of experts dominates
    def per_task(p):
        f = build_flow(cfgs[p]); f.add_task(0); f.add_task(1)
        return f.param_counts()['per_task'][1]
    assert per_task('v4') > 10 * per_task('v3') and isinstance(build_flow(cfgs['v4']), VariantFlow)


def test_gate_statistics_and_alpha_logged_every_epoch():
    feats = torch.randn(8, 5, 5, 16)
    small = dict(feature_dim=16, num_coupling_layers=2, subnet_hidden=16, lora_rank=2, lora_alpha=2.0, epochs=3, batch_size=4)
    tr = ContinualTrainer(make_config('baseline_2.0', small), progress=False)
    tr.train_task(feats); tr.train_task(feats + 1)
    for recs in tr.history:
        assert len(recs) == 3
        for r in recs:
            assert {'gate_mean', 'gate_std', 'gate_min', 'gate_max'} <= set(r)
            assert 0 <= r['gate_min'] <= r['gate_mean'] <= r['gate_max'] <= 1 and r['gate_std'] >= 0
    assert tr.history[0][-1]['gate_std'] > 0                    # the gates moved off their 0.5 start
    tr = ContinualTrainer(make_config('baseline_1.5', small), progress=False)
    tr.train_task(feats)
    for r in tr.history[0]:
        assert {'alpha', 'alpha_min', 'alpha_max'} <= set(r) and 0 < r['alpha_min'] <= r['alpha'] <= r['alpha_max'] < 0.2
    tr = ContinualTrainer(make_config('v1', small), progress=False)
    tr.train_task(feats)
    assert not any(k.startswith(('gate_', 'alpha')) for k in tr.history[0][0])


def test_patch_attention_trains_on_task_0_then_frozen():
    feats = torch.randn(8, 4, 4, 16)
    cfg = make_config('v6', dict(feature_dim=16, num_coupling_layers=2, subnet_hidden=16, lora_rank=2, lora_alpha=2.0,
                                 attention_hidden=8, dia_blocks=1, dia_hidden=8, epochs=2, batch_size=4, lr=1e-2))
    tr = ContinualTrainer(cfg, progress=False)
    init = {k: v.clone() for k, v in tr.flow.attention.state_dict().items()}
    tr.train_task(feats)
    after0 = {k: v.clone() for k, v in tr.flow.attention.state_dict().items()}
    assert after0['gate'].item() != 0 and not torch.equal(after0['q.weight'], init['q.weight'])
    dia0 = {k: v.clone() for k, v in tr.flow.dia['0'].state_dict().items()}
    tr.train_task(feats * 2)
    assert all(torch.equal(v, after0[k]) for k, v in tr.flow.attention.state_dict().items())
    assert all(torch.equal(v, dia0[k]) for k, v in tr.flow.dia['0'].state_dict().items())
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in tr.flow.dia['1'].parameters())


def test_ablation_switches_compose_with_any_preset():
    assert set(ABLATIONS) == {'no_lora', 'no_router', 'no_adapter', 'no_pos_embed', 'no_spatial_context',
                              'no_scale_context', 'no_tail_loss', 'no_logdet_reg'}
    on = parse_overrides([f'{k}=true' for k in ABLATIONS] + ['dia_blocks=1'])
    cfg = make_config('main', on)
    e = cfg.effective                                               # what runs; the config keeps what it was given
    assert (e.router, e.adapter, e.pos_embed, e.subnet_type, e.tail_weight, e.logdet_reg, e.spatial_mixer) == \
           ('oracle', 'none', False, 'mlp', 0.0, 0.0, False)
    assert (cfg.router, cfg.adapter, cfg.tail_weight) == ('mahalanobis', 'film', 0.7)
    f = build_flow(cfg); f.add_task(0); f.add_task(1)
    assert all(m.tasks == [] for m in f.lora_layers()) and f.param_counts()['per_task'][1] > 0
    v4 = make_config('v4', {'no_spatial_context': True, 'no_router': True})
    assert (v4.effective.cross_patch_context, v4.lora_grid, v4.effective.router) == ('none', 4, 'oracle')
    for p in VERSIONS:                                              # every switch is valid on every version
        for k in ABLATIONS:
            make_config(p, {k: True, 'dia_blocks': 1} if k in ('no_lora', 'no_adapter') else {k: True})
    with pytest.raises(ValueError, match='nothing to train'): make_config('v3', {'no_lora': True, 'no_adapter': True})


def test_all_switches_on_trains(generated_root, cache_dir, tmp_path):
    on = {k: True for k in ABLATIONS} | {'dia_blocks': 1}
    m = run_continual(make_config('main', tiny(cache_dir, lora_rank=4, lora_alpha=4.0, **on)), generated_root, TASKS,
                      tmp_path/'ablated', progress=False, figures=False)
    assert m['mean']['routing_acc'] == 1.0 and m['forgetting']['pixel_auroc'] == 0.0    # oracle routing, no forgetting
    assert int(m['params']['per_task']['1']) > 0


def test_config_files_with_new_fields_round_trip(tmp_path):
    cfg = make_config('v6', {'no_router': True, 'dia_blocks': 2})
    save_config(cfg, tmp_path/'c.json'); save_config(cfg, tmp_path/'c.yaml')
    assert load_config(tmp_path/'c.json') == cfg == load_config(tmp_path/'c.yaml')
    old = {k: v for k, v in json.loads((tmp_path/'c.json').read_text()).items() if k in ('epochs', 'lr')}   # written before the new fields
    (tmp_path/'old.json').write_text(json.dumps(old))
    assert load_config(tmp_path/'old.json').lora_grid == 0
    (tmp_path/'bad.json').write_text(json.dumps({'lora_grid': 4}))
    with pytest.raises(ValueError, match="needs subnet_type='cross_patch'"): load_config(tmp_path/'bad.json')

def test_paper_preset_offline_without_weights_stops_before_training(tmp_path, generated_root):
    "No WideResNet-50 checkpoint and no hub: one clear error with the ways to supply the weights, and nothing written."
    import subprocess, sys, os
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path/'empty_hf_home')}
    out = tmp_path/'run'
    from pathlib import Path
    r = subprocess.run([str(Path(sys.executable).parent/'moleflow'), 'train', '--data-root', str(generated_root), '--tasks', 'fabric',
                        '--out', str(out), '--preset', 'paper'], capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'wide_resnet50_2' in r.stderr and 'Supply them' in r.stderr and '--set backbone_weights=' in r.stderr
    assert 'Traceback' not in r.stderr
    assert not out.exists()
