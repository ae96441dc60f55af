"RUN/report.html: written by train (and eval_report.html by eval), self-contained, and it renders in headless Chromium."
import json, os, re, shutil, subprocess, tempfile
from pathlib import Path
import numpy as np, pytest
from PIL import Image, ImageStat
from moleflow.cli import main

TINY = ['--set', 'backbone=resnet18', '--set', 'backbone_weights=none', '--set', 'feature_dim=32', '--set', 'image_size=64',
        '--set', 'crop_size=64', '--set', 'num_coupling_layers=2', '--set', 'subnet_hidden=32', '--set', 'epochs=1']

@pytest.fixture(scope='module')
def run(generated_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp('report')/'run'
    main(['train', '--data-root', str(generated_root), '--tasks', 'fabric', 'wood+screw', '--out', str(out), *TINY,
          '--set', f'cache_dir={cache_dir}'])
    return out

def _external_refs(page): return re.findall(r'(?:src|href)="(?!data:)[^"]*"', page)

def test_train_and_eval_write_self_contained_reports(run, capsys):
    page = (run/'report.html').read_text()
    m = json.loads((run/'metrics.json').read_text())
    for c in m['final']: assert f'<td>{c}</td>' in page
    assert '<td>wood+screw</td>' in page and 'R matrix: pixel_auroc' in page and 'task 1: wood+screw' in page
    assert page.count('<img src="data:image/jpeg;base64,') == len(list((run/'figures').glob('*.png')))
    assert _external_refs(page) == [] and '<script' not in page
    main(['eval', '--run', str(run)])
    ev = (run/'eval_report.html').read_text()
    assert all(f'<td>{c}</td>' in ev for c in m['final']) and _external_refs(ev) == []

def _chromium():
    for c in (os.environ.get('CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome'):
        if c and shutil.which(c): return shutil.which(c)
    pytest.skip("no Chromium (make docs-browser installs it)")

def test_report_renders_in_chromium(run, tmp_path):
    "The page as a browser draws it: the tables and the embedded (coloured) anomaly maps are on screen."
    shot, profile = tmp_path/'report.png', tempfile.mkdtemp(prefix='moleflow-chromium-')
    try:
        r = subprocess.run([_chromium(), '--headless', '--no-sandbox', '--disable-gpu', f'--user-data-dir={profile}',
                            '--hide-scrollbars', f'--screenshot={shot}', '--window-size=1100,5000', (run/'report.html').as_uri()],
                           capture_output=True, text=True, timeout=120)
    finally: shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    im = Image.open(shot).convert('RGB')
    assert max(hi - lo for lo, hi in ImageStat.Stat(im).extrema) > 100, "blank page"
    h, s, v = (np.asarray(c, dtype=np.float32) for c in im.convert('HSV').split())
    assert ((s > 180) & (v > 120)).mean() > 0.005, "no coloured figures (heat maps) on the rendered page"
