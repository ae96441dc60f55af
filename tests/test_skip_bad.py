"--skip-bad: without it a bad file stops train/eval and the message names the flag; with it the run goes on and lists what it skipped."
import json, shutil
from pathlib import Path
import pytest
from moleflow.cli import main

TINY = ['--set', 'backbone=resnet18', '--set', 'backbone_weights=none', '--set', 'feature_dim=32', '--set', 'image_size=64',
        '--set', 'crop_size=64', '--set', 'num_coupling_layers=2', '--set', 'subnet_hidden=32', '--set', 'epochs=1']

def _run(capsys, *args):
    "Exit status, stdout and stderr of `moleflow ARGS` run in this process."
    try: main(list(map(str, args))); code = 0
    except SystemExit as e: code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

@pytest.fixture
def bad_root(generated_root, tmp_path):
    "Two generated classes with one corrupt training image and one corrupt test image."
    root = tmp_path/'data'
    for c in ('fabric', 'screw'): shutil.copytree(generated_root/c, root/c)
    (root/'fabric'/'train'/'good'/'zz_corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    (root/'screw'/'test'/'good'/'zz_corrupt.png').write_bytes(b'')
    return root

def test_train_and_eval_skip_bad(bad_root, cache_dir, tmp_path, capsys):
    args = ['--data-root', bad_root, '--tasks', 'fabric', 'screw', *TINY, '--set', f'cache_dir={cache_dir}']
    code, _, err = _run(capsys, 'train', *args, '--out', tmp_path/'r')
    assert code == 2 and '--skip-bad' in err and 'zz_corrupt.png' in err, err
    assert not (tmp_path/'r').exists()                      # a bad file stops the run before anything is written
    code, out, err = _run(capsys, 'train', *args, '--out', tmp_path/'r', '--skip-bad')
    assert code == 0, err
    assert 'skipped 2 bad file(s)' in out
    lines = (tmp_path/'r'/'skipped.txt').read_text().splitlines()
    assert sorted(Path(l.split('\t')[0]).relative_to(bad_root).as_posix() for l in lines) == \
        ['fabric/train/good/zz_corrupt.png', 'screw/test/good/zz_corrupt.png']
    m = json.loads((tmp_path/'r'/'metrics.json').read_text())
    assert m['skipped'] == 2
    code, _, err = _run(capsys, 'eval', '--run', tmp_path/'r')
    assert code == 2 and '--skip-bad' in err, err
    code, out, err = _run(capsys, 'eval', '--run', tmp_path/'r', '--skip-bad')
    assert code == 0, err
    ev = json.loads((tmp_path/'r'/'eval_metrics.json').read_text())
    assert ev['skipped'] == 1 and 'zz_corrupt.png' in (tmp_path/'r'/'eval_skipped.txt').read_text()   # eval reads the test split only
    for c in m['final']: assert ev['final'][c] == pytest.approx(m['final'][c], abs=1e-6), c
