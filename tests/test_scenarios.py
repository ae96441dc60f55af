"--scenario NAME: a protocol of the literature by name, its headline numbers under the papers' names in metrics.json."
import json, shutil
import numpy as np, pytest
from moleflow.cli import main
from moleflow.data import MPDD_CLASSES, SCENARIOS, get_scenario

TINY = ['--set', 'backbone=resnet18', '--set', 'backbone_weights=none', '--set', 'feature_dim=32', '--set', 'image_size=64',
        '--set', 'crop_size=64', '--set', 'num_coupling_layers=2', '--set', 'subnet_hidden=32', '--set', 'epochs=1']

@pytest.mark.parametrize('name,sizes', [('mvtec_15x1', [1] * 15), ('mvtec_14-1', [14, 1]), ('mvtec_10-5', [10, 5]),
                                        ('mvtec_3x5', [3] * 5), ('mvtec_10-1x5', [10] + [1] * 5), ('visa_12x1', [1] * 12),
                                        ('visa_11-1', [11, 1]), ('visa_8-4', [8, 4]), ('visa_8-1x4', [8] + [1] * 4),
                                        ('mpdd_6x1', [1] * 6)])
def test_scenario_shapes(name, sizes):
    s = get_scenario(name)
    assert [len(t) for t in s.tasks] == sizes and sum(s.tasks, []) == sorted(s.classes) and s.source

def test_every_scenario_is_tested():
    assert len(SCENARIOS) == 10

def test_scenario_run_reports_protocol_metrics(generated_root, cache_dir, tmp_path, capsys):
    "mpdd_6x1 on stand-in classes (generated images under MPDD's class names)."
    root = tmp_path/'mpdd'
    for c, src in zip(MPDD_CLASSES, ['fabric', 'wood', 'screw'] * 2): shutil.copytree(generated_root/src, root/c)
    main(['train', '--data-root', str(root), '--scenario', 'mpdd_6x1', '--out', str(tmp_path/'r'), *TINY,
          '--set', f'cache_dir={cache_dir}'])
    m = json.loads((tmp_path/'r'/'metrics.json').read_text())
    assert m['tasks'] == [[c] for c in MPDD_CLASSES]
    assert json.loads((tmp_path/'r'/'run.json').read_text())['dataset'] == 'mpdd'
    p = m['protocol']
    assert p['scenario'] == 'mpdd_6x1'
    for k in ('image_auroc', 'pixel_auroc'):
        assert p['FM'][k] == m['forgetting'][k] and p['BWT'][k] == m['bwt'][k]
        assert p['final_average'][k] == pytest.approx(np.mean(m['matrix'][k][-1])) == p['ACC'][k]
