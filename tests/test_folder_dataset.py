"--dataset folder: your own images in anomalib's Folder layout give the same run as the MVTec layout of the same images."
import json, shutil
from pathlib import Path
import pytest
from moleflow.cli import main

TINY = ['--set', 'backbone=resnet18', '--set', 'backbone_weights=none', '--set', 'feature_dim=32', '--set', 'image_size=64',
        '--set', 'crop_size=64', '--set', 'num_coupling_layers=2', '--set', 'subnet_hidden=32', '--set', 'epochs=2']

def _anomalib_layout(mvtec_root, out, classes):
    "The same images in anomalib's Folder layout: <class>/normal, <class>/normal_test, <class>/<defect>, <class>/masks/<defect>."
    for c in classes:
        src, dst = mvtec_root/c, out/c
        shutil.copytree(src/'train'/'good', dst/'normal')
        shutil.copytree(src/'test'/'good', dst/'normal_test')
        for d in sorted(p for p in (src/'test').iterdir() if p.name != 'good'):
            shutil.copytree(d, dst/d.name)
            shutil.copytree(src/'ground_truth'/d.name, dst/'masks'/d.name)
    return out

def test_folder_layout_gives_the_mvtec_metrics(generated_root, cache_dir, tmp_path, capsys):
    classes = ['fabric', 'screw']
    folder = _anomalib_layout(generated_root, tmp_path/'mine', classes)
    common = ['--tasks', *classes, *TINY, '--set', f'cache_dir={cache_dir}']
    main(['train', '--data-root', str(generated_root), '--out', str(tmp_path/'mvtec'), *common])
    main(['train', '--data-root', str(folder), '--dataset', 'folder', '--normal-dir', 'normal', '--normal-test-dir', 'normal_test',
          '--mask-dir', 'masks', '--out', str(tmp_path/'folder'), *common])
    a, b = (json.loads((tmp_path/r/'metrics.json').read_text()) for r in ('mvtec', 'folder'))
    assert b['final'] == a['final'] and b['matrix'] == a['matrix']
    assert json.loads((tmp_path/'folder'/'run.json').read_text())['dataset_kwargs'] == \
        {'normal_dir': 'normal', 'mask_dir': 'masks', 'normal_test_dir': 'normal_test'}
    main(['eval', '--run', str(tmp_path/'folder')])                        # eval reads the layout back from run.json
    ev = json.loads((tmp_path/'folder'/'eval_metrics.json').read_text())
    for c in classes: assert ev['final'][c] == pytest.approx(a['final'][c], abs=1e-6)

def test_folder_layout_defaults_and_split(generated_root, cache_dir, tmp_path, capsys):
    "anomalib's toy layout (good/, <defect>/, mask/<defect>/) with the defaults: 20% of good/ become normal test images."
    root = tmp_path/'mine'
    src = generated_root/'wood'
    shutil.copytree(src/'train'/'good', root/'wood'/'good')
    for d in sorted(p for p in (src/'test').iterdir() if p.name != 'good'):
        shutil.copytree(d, root/'wood'/d.name); shutil.copytree(src/'ground_truth'/d.name, root/'wood'/'mask'/d.name)
    main(['train', '--data-root', str(root), '--dataset', 'folder', '--tasks', 'wood', '--out', str(tmp_path/'r'), *TINY,
          '--set', f'cache_dir={cache_dir}'])
    m = json.loads((tmp_path/'r'/'metrics.json').read_text())
    n_good = len(list((root/'wood'/'good').iterdir()))
    assert m['thresholds'][0]['n_images'] == n_good - round(0.2 * n_good)   # the rest trained the task
    with pytest.raises(SystemExit):
        main(['train', '--data-root', str(root), '--dataset', 'folder', '--tasks', 'wood', '--abnormal-dir', 'dent',
              '--out', str(tmp_path/'r2'), *TINY])
    assert 'dent: folder not found' in capsys.readouterr().err
    assert not (tmp_path/'r2').exists()
