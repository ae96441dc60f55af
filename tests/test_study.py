"The tail-aware study: loss selections, statistics with known answers, run reuse rules, and no hand-typed result tables."
import json, math, re
from pathlib import Path
import numpy as np, pytest, torch
from moleflow.config import MoLEConfig
from moleflow.losses import tail_aware_loss, tail_indices, tail_k
from moleflow.inference import Hypothesis, hierarchical_bootstrap, decide_all, holm, implied_gain, implied_share
from moleflow.study import run_one, runnable_arms, selection_wired, ARMS, HYPOTHESES, effect_data

ROOT = Path(__file__).resolve().parents[1]
DECIMAL = re.compile(r'\d+\.\d+')

def typed_result_tables(markdown: str, min_numeric: int = 3) -> list[str]:
    "Markdown tables of `markdown` with at least `min_numeric` cells holding a decimal number (a typed result table)."
    found, rows = [], []
    for line in markdown.splitlines() + ['']:
        if line.strip().startswith('|'): rows.append(line); continue
        if rows:
            cells = [c for r in rows if not set(r.replace('|', '').strip()) <= set('-: ') for c in r.strip().strip('|').split('|')]
            if sum(bool(DECIMAL.search(c)) for c in cells) >= min_numeric: found.append(rows[0])
            rows = []
    return found

def analysis_pages():
    return sorted(ROOT.glob('nbs/1[0-7]_*.ipynb')) + sorted(ROOT.glob('nbs/tutorials/*.ipynb'))

def test_the_table_search_finds_a_typed_table():
    md = "text\n\n| ratio | pixel AP |\n|---|---|\n| 0.01 | 0.210 |\n| 0.02 | 0.217 |\n\nmore"
    assert typed_result_tables(md) == ['| ratio | pixel AP |']
    assert typed_result_tables("| flag | default |\n|---|---|\n| `--full` | off |") == []

def test_no_hand_typed_result_tables_in_analysis_notebooks_and_tutorials():
    pages = analysis_pages()
    assert len(pages) >= 14, pages
    bad = [(p.relative_to(ROOT).as_posix(), i, t) for p in pages
           for i, c in enumerate(json.loads(p.read_text())['cells']) if c['cell_type'] == 'markdown'
           for t in typed_result_tables(''.join(c['source']))]
    assert not bad, f"hand-typed result tables (compute them from results/study by code): {bad}"

def test_top_k_selection_is_the_original_loss():
    nll = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for w in (0.0, 0.3, 0.7, 1.0):
        assert torch.equal(tail_aware_loss(nll, w, 0.05, 'top_k'), tail_aware_loss(nll, w, 0.05))

def test_bottom_and_random_selections():
    flat = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    k = tail_k(50, 0.1)
    assert torch.equal(flat.gather(1, tail_indices(flat, k, 'bottom_k')).sort(1).values, flat.sort(1).values[:, :k])
    a = tail_indices(flat, k, 'random_k', torch.Generator().manual_seed(3))
    assert torch.equal(a, tail_indices(flat, k, 'random_k', torch.Generator().manual_seed(3)))
    assert all(len(set(r.tolist())) == k for r in a)
    with pytest.raises(ValueError, match='needs a seeded torch.Generator'): tail_indices(flat, k, 'random_k')
    with pytest.raises(ValueError, match="'tail_selection' must be one of"): MoLEConfig(tail_selection='hardest')

def test_holm_hand_worked():
    adj = holm(dict(a=0.01, b=0.04, c=0.03, d=0.005))
    assert [round(adj[k], 12) for k in 'abcd'] == [0.03, 0.06, 0.06, 0.02]

def test_equivalence_gives_not_supported_and_effects_supported():
    S, I = 5, 30
    seeds, units = np.repeat(np.arange(S), I), np.tile(np.arange(I), S)
    rng = np.random.default_rng(0)
    recs = {'zero': Hypothesis('zero', 's', 'e', 0.05), 'big': Hypothesis('big', 's', 'e', 0.05)}
    res = {'zero': hierarchical_bootstrap(rng.normal(0, 0.02, S * I), seeds, units, n_boot=500),
           'big': hierarchical_bootstrap(rng.normal(0.3, 0.05, S * I), seeds, units, n_boot=500)}
    v = decide_all(recs, res)
    assert (v['zero']['verdict'], v['big']['verdict']) == ('not_supported', 'supported')

def test_mechanical_nulls():
    assert implied_gain(0.0, 196, 3) == 1.0 and math.isclose(implied_gain(1.0, 196, 4), 49.0)
    assert math.isclose(implied_share(0.0, 100, 2), 0.02) and implied_share(1.0, 100, 2) == 1.0

def test_every_hypothesis_has_an_effect_and_missing_runs_are_inconclusive():
    d = effect_data([])
    assert set(d) == set(HYPOTHESES) and all(len(v[0]) == 0 for v in d.values())

def test_unwired_selection_arms_are_refused_not_run_as_top_k():
    ok, skipped = runnable_arms(ARMS)
    if selection_wired(): assert not skipped
    else: assert set(skipped) == {'random_k', 'bottom_k'} and 'tail_w0.7' in ok

class _Stub:
    "The part of a Study that run_one reads before it trains."
    def config(self, overrides, seed): return MoLEConfig(**{**overrides, 'seed': seed})

def test_finished_run_made_by_other_code_is_refused(tmp_path):
    cfg = {k: v for k, v in MoLEConfig(tail_weight=0.0, seed=0).__dict__.items() if k != 'cache_dir'}
    (tmp_path / 'status.json').write_text(json.dumps({'state': 'done', 'code': 'not-this-code', 'config': cfg}))
    (tmp_path / 'results.json').write_text('{}')
    with pytest.raises(ValueError, match='made by other code'):
        run_one(tmp_path, _Stub(), 'mean_only', {'tail_weight': 0.0}, 0, 0.02, tail_stats=False)

def test_finished_run_by_this_code_is_reused(tmp_path):
    from moleflow.cluster import package_hash
    cfg = {k: v for k, v in MoLEConfig(tail_weight=0.0, seed=0).__dict__.items() if k != 'cache_dir'}
    (tmp_path / 'status.json').write_text(json.dumps({'state': 'done', 'code': package_hash(), 'config': cfg}))
    (tmp_path / 'results.json').write_text('{"arm": "mean_only", "reused": true}')
    assert run_one(tmp_path, _Stub(), 'mean_only', {'tail_weight': 0.0}, 0, 0.02, tail_stats=False)['reused'] is True

def _run(arm, seed, aps, fisher):
    "A minimal finished-run record: one class, per-image pixel AP and one mediator."
    med = dict(grad_gini=None, grad_tail_share=None, grad_tail_mean=None, grad_rest_mean=None, tail_calibration=None,
               fisher_ratio=fisher, logdet_spread=None)
    c = dict(metrics={'pixel_ap': float(np.mean([a for a in aps if a is not None]))}, per_image={'pixel_ap': aps},
             image_auroc_by_aggregation={'mean': 0.5, 'max': 0.5, 'top_k': 0.5}, mediators=med, patches=64, k=1)
    return dict(dataset='d', arm=arm, seed=seed, config={'tail_weight': 0.7}, classes={'c': c})

def test_effects_pair_runs_on_seed_class_and_image():
    runs = [_run('mean_only', 0, [0.1, None, 0.3], 1.0), _run('tail_w0.7', 0, [0.2, None, 0.6], 1.5),
            _run('mean_only', 1, [0.1, None, 0.2], 2.0), _run('tail_w0.7', 1, [0.1, None, 0.5], 2.0),
            _run('tail_w0.7', 2, [0.9, None, 0.9], 9.0)]                      # seed 2 has no mean-only run: left out
    d = effect_data(runs)
    vals, seeds, units = d['H0']
    assert sorted(zip(seeds, units, np.round(vals, 9))) == [(0, 'd/c/0', 0.1), (0, 'd/c/2', 0.3), (1, 'd/c/0', 0.0), (1, 'd/c/2', 0.3)]
    assert sorted(zip(d['H4'][1], d['H4'][0])) == [(0, 0.5), (1, 0.0)]
    assert d['H_random'] == ([], [], [])
