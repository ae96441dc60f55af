"One config truth: a switch never rewrites another field, so a saved config with any `--set` gives the run asked for."
import json
import pytest
from moleflow.cli import main
from moleflow.config import MoLEConfig, make_config, save_config, load_config, parse_overrides, CHOICES, ABLATIONS
from moleflow.coupling_flow import MoLEFlow
from moleflow.trainer import ContinualTrainer

TINY = ['--preset', 'fast', '--set', 'backbone=resnet18', '--set', 'backbone_weights=none', '--set', 'feature_dim=32',
        '--set', 'image_size=64', '--set', 'crop_size=64', '--set', 'num_coupling_layers=2', '--set', 'subnet_hidden=32',
        '--set', 'epochs=1']

def test_saved_switch_can_be_switched_off_again(tmp_path):
    for name, field, off in (('no_router', 'router', 'mahalanobis'), ('no_adapter', 'adapter', 'film'),
                             ('no_tail_loss', 'tail_weight', 0.7), ('no_pos_embed', 'pos_embed', True)):
        save_config(make_config('main', {name: True}), tmp_path/'c.json')
        saved = json.loads((tmp_path/'c.json').read_text())
        assert saved[name] is True and saved[field] == off                 # the file records the switch, not its effect
        back = MoLEConfig(**{**load_config(tmp_path/'c.json').__dict__, **parse_overrides([f'{name}=false'])})
        assert getattr(back.effective, field) == off and getattr(load_config(tmp_path/'c.json').effective, field) != off

def test_every_ablation_resolved_in_the_view_only():
    on = make_config('v4', {k: True for k in ABLATIONS} | {'dia_blocks': 1})
    assert on.router == 'mahalanobis' and on.cross_patch_context == 'learned' and on.adapter == 'film'
    e = on.effective
    assert (e.router, e.cross_patch_context, e.adapter, e.pos_embed, e.tail_weight, e.logdet_reg) == \
           ('oracle', 'none', 'none', False, 0.0, 0.0)
    with pytest.raises(AttributeError, match='read-only'): e.adapter = 'film'
    f = MoLEFlow.from_config(on); f.add_task(0); f.add_task(1)
    assert f.adapter_kind == 'none' and all(m.tasks == [] for m in f.lora_layers())

def test_choices_come_from_the_modules():
    from moleflow.coupling_flow import _ADAPTERS
    from moleflow.evaluation import AGGREGATIONS
    from moleflow.router import PrototypeRouter
    assert CHOICES['adapter'] is _ADAPTERS and CHOICES['score_aggregation'] is AGGREGATIONS
    assert CHOICES['router'][:-1] == PrototypeRouter.metrics

def test_cli_config_with_set_no_router_false_routes(generated_root, cache_dir, tmp_path, monkeypatch):
    "`moleflow train --config R/config.json --set no_router=false` on a run saved with no_router=true uses the router."
    calls = []
    route = ContinualTrainer.route
    monkeypatch.setattr(ContinualTrainer, 'route', lambda self, feats: calls.append(len(feats)) or route(self, feats))
    common = ['--data-root', str(generated_root), '--tasks', 'fabric', 'screw', '--set', f'cache_dir={cache_dir}']
    main(['train', *common, *TINY, '--set', 'no_router=true', '--out', str(tmp_path/'oracle')])
    assert calls == []                                                      # the oracle never asks the router
    saved = json.loads((tmp_path/'oracle'/'config.json').read_text())
    assert saved['no_router'] is True and saved['router'] == 'mahalanobis'
    main(['train', *common, '--config', str(tmp_path/'oracle'/'config.json'), '--set', 'no_router=false',
          '--out', str(tmp_path/'routed')])
    assert calls, 'the router was not used'
    again = json.loads((tmp_path/'routed'/'config.json').read_text())
    assert again['no_router'] is False and again['router'] == 'mahalanobis'

def test_run_saved_before_a_default_changed_loads_as_trained(generated_root, cache_dir, tmp_path):
    "A run folder whose config.json predates fields whose default changed since loads at their earlier values and re-evaluates the same."
    from moleflow.config import PRE_FIELD_VALUES
    from moleflow.run import evaluate_run, load_run
    common = ['--data-root', str(generated_root), '--tasks', 'fabric', 'screw', '--set', f'cache_dir={cache_dir}']
    sets = [x for k, v in PRE_FIELD_VALUES.items() for x in ('--set', f'{k}={v}')]
    main(['train', *common, *TINY, *sets, '--out', str(tmp_path/'old')])
    path = tmp_path/'old'/'config.json'
    before = evaluate_run(tmp_path/'old', progress=False)
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in PRE_FIELD_VALUES}))
    assert load_config(path).expert_rank != PRE_FIELD_VALUES['expert_rank']      # today's default would not fit the checkpoint
    cfg, _, _ = load_run(tmp_path/'old', progress=False)
    assert {k: getattr(cfg, k) for k in PRE_FIELD_VALUES} == PRE_FIELD_VALUES
    assert evaluate_run(tmp_path/'old', progress=False)['final'] == before['final']
