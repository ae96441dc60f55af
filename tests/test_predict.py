"moleflow predict on a trained run: it reproduces evaluation exactly, reports bad files and refuses bad requests."
import csv, json, os, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from moleflow.config import make_config, MoLEConfig
from moleflow.evaluation import image_auroc
from moleflow.run import run_continual, load_run, open_classes, score_features

TASKS = [['fabric'], ['screw']]

ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Extraction, training, eval and the predict subprocess at one thread: 'exactly equal' holds at matched thread counts (BLAS kernels differ with threads)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _cli(*args):
    return subprocess.run([str(Path(sys.executable).parent/'moleflow'), *map(str, args)], capture_output=True, text=True, env=ONE_THREAD)

def _fails(capsys, *args):
    "stderr of `moleflow ARGS` run in this process, which must exit with status 2."
    from moleflow.cli import main
    with pytest.raises(SystemExit) as e: main(list(map(str, args)))
    assert e.value.code == 2
    return capsys.readouterr().err

@pytest.fixture(scope='module')
def fast_run(generated_root, tmp_path_factory):
    "The `fast` preset trained on two generated classes (its own feature cache: every feature extracted at one thread)."
    run, cache_dir = tmp_path_factory.mktemp('predict')/'run', str(tmp_path_factory.mktemp('predict_cache'))
    m = run_continual(make_config('fast', {'cache_dir': cache_dir}), generated_root, TASKS, run, progress=False, figures=False)
    return run, m

def _eval_scores(run, root):
    "Per-class image scores exactly as evaluation computes them (cached test features, routed, `score_features`)."
    cfg, _, trainer = load_run(run, progress=False)
    out = {}
    for c, d in open_classes(cfg, root, ['fabric', 'screw'], train=False).items():
        _, scores = score_features(trainer, d.test_features, trainer.route(d.test_features), cfg)
        out[c] = dict(zip([str(s.path) for s in d.test_ds.samples], scores.tolist()))
    return out

def test_predict_reproduces_eval_and_reports_bad_files(fast_run, generated_root, tmp_path):
    run, m = fast_run
    extra = tmp_path/'extra'; extra.mkdir()
    (extra/'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    images = [generated_root/'fabric'/'test', generated_root/'screw'/'test', extra/'corrupt.png']
    out = tmp_path/'pred'
    r = _cli('predict', '--run', run, '--images', *images, '--out', out)
    assert r.returncode == 1, r.stderr                              # the batch finished, but a file was bad ...
    assert 'corrupt.png' in r.stderr and '--skip-bad' in r.stderr    # ... and the message names the file and the flag
    assert 'corrupt.png' in (out/'skipped.txt').read_text()
    rows = list(csv.DictReader(open(out/'predictions.csv')))
    expected = _eval_scores(run, generated_root)
    assert len(rows) == sum(len(v) for v in expected.values()) == 10   # one row per readable image
    for c in ('fabric', 'screw'):
        mine = [x for x in rows if f'/{c}/test/' in x['path']]
        assert {x['path']: float(x['score']) for x in mine} == expected[c]   # exactly the evaluation's scores
        labels = [0 if Path(x['path']).parent.name == 'good' else 1 for x in mine]
        assert image_auroc(labels, [float(x['score']) for x in mine]) == m['final'][c]['image_auroc']
        assert all(x['class'] == c for x in mine)                   # routed right on this easy pair
    for x in rows:
        for k in ('map', 'overlay'):
            assert Image.open(out/x[k]).size == (128, 128)          # the `fast` preset's crop
        thr = m['thresholds'][int(x['task'])]['threshold']
        assert float(x['threshold']) == thr and x['decision'] == ('anomalous' if float(x['score']) > thr else 'normal')
    r = _cli('predict', '--run', run, '--images', *images, '--out', out, '--skip-bad')
    assert r.returncode == 2 and '--overwrite' in r.stderr, r.stderr  # earlier results are never overwritten silently
    r = _cli('predict', '--run', run, '--images', *images, '--out', out, '--skip-bad', '--overwrite', '--threshold=-1e9', '--save-npy')
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out/'predictions.csv')))
    assert {x['decision'] for x in rows} == {'anomalous'} and all((out/x['npy']).is_file() for x in rows)
    assert 'predicted 10 image(s): 10 anomalous' in r.stdout

def test_predict_converts_grey_and_rgba_and_says_so(fast_run, generated_root, tmp_path):
    run, _ = fast_run
    src = sorted((generated_root/'screw'/'test'/'good').glob('*.png'))[0]
    Image.open(src).convert('L').save(tmp_path/'grey.png')
    Image.open(src).convert('RGBA').save(tmp_path/'rgba.png')
    r = _cli('predict', '--run', run, '--images', tmp_path/'grey.png', tmp_path/'rgba.png', '--out', tmp_path/'pred')
    assert r.returncode == 0, r.stderr
    assert '2 image(s) were not RGB' in r.stdout
    notes = {Path(x['path']).name: x['note'] for x in csv.DictReader(open(tmp_path/'pred'/'predictions.csv'))}
    assert notes == {'grey.png': 'converted L to RGB', 'rgba.png': 'converted RGBA to RGB'}

def test_predict_refuses_bad_requests(fast_run, tmp_path, capsys):
    run, _ = fast_run
    assert 'no checkpoint in' in _fails(capsys, 'predict', '--run', tmp_path, '--images', tmp_path, '--out', tmp_path/'p')
    for bad in ('high', 'nan'):
        err = _fails(capsys, 'predict', '--run', run, '--images', tmp_path, '--out', tmp_path/'p', '--threshold', bad)
        assert f"--threshold must be a finite number (an image score), got '{bad}'" in err, err
    assert 'missing: not found' in _fails(capsys, 'predict', '--run', run, '--images', tmp_path/'missing', '--out', tmp_path/'p')
    assert not (tmp_path/'p').exists()

def test_held_out_thresholds(generated_root, cache_dir, tmp_path):
    "threshold_holdout > 0 trains on the rest and calibrates on the held-out normal images."
    cfg = MoLEConfig(backbone='resnet18', backbone_weights=None, feature_dim=32, image_size=64, crop_size=64, num_coupling_layers=2,
                     subnet_hidden=32, lora_rank=4, lora_alpha=4.0, epochs=1, batch_size=4, cache_dir=cache_dir, threshold_holdout=0.25)
    m = run_continual(cfg, generated_root, TASKS, tmp_path/'run', progress=False, figures=False)
    assert [(t['source'], t['n_images']) for t in m['thresholds']] == [('held_out', 2), ('held_out', 2)]
    _, _, trainer = load_run(tmp_path/'run', progress=False)
    assert [p['n'] for p in trainer.router.prototypes] == [6, 6]   # the router never saw the held-out images either
    assert trainer.thresholds == m['thresholds']
