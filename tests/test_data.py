"Integration tests of moleflow.data: the real MVTec subset, the generated default set, bad input, task sequences, VisA and folders."
import json, time, warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moleflow.data import (DataError, FolderDataset, MissingDataError, MPDDDataset, MVTecDataset, Sample, TaskDataset,
                           VisADataset, denormalize, list_categories, make_task_sequence, parse_scenario, read_mask)
from moleflow.synthetic import DEFAULT_CLASSES, default_defects, generate_default_dataset, render_sample

# ---------------------------------------------------------------- the shared real data (README table)
REAL = {'hazelnut': (50, 2, {'crack': 2, 'cut': 2, 'hole': 2, 'print': 2}),
        'transistor': (50, 2, {'bent_lead': 2, 'cut_lead': 2, 'damaged_case': 2, 'misplaced': 2}),
        'leather': (4, 4, {'color': 1, 'cut': 2, 'fold': 2, 'glue': 3, 'poke': 3})}

def test_real_categories(mvtec_subset):
    assert list_categories(mvtec_subset) == sorted(REAL)

@pytest.mark.parametrize('cat', sorted(REAL))
def test_real_counts(mvtec_subset, cat):
    n_train, n_good, defects = REAL[cat]
    tr, te = MVTecDataset(mvtec_subset, cat), MVTecDataset(mvtec_subset, cat, 'test')
    assert len(tr) == n_train and tr.labels == [0] * n_train and not tr.skipped and not te.skipped
    counts = Counter(s.defect for s in te.samples)
    assert counts.pop('good') == n_good and dict(counts) == defects
    assert all((s.label == 1) == (s.defect != 'good') for s in te.samples)
    assert all((s.mask_path is None) == (s.label == 0) for s in te.samples)

@pytest.mark.parametrize('cat', sorted(REAL))
def test_real_items_binary_aligned(mvtec_subset, cat):
    te = MVTecDataset(mvtec_subset, cat, 'test')
    for i, s in enumerate(te.samples):
        it = te[i]
        assert it['image'].shape == (3, 224, 224) and it['image'].dtype == torch.float32
        assert it['mask'].shape == (1, 224, 224) and it['mask'].dtype == torch.float32
        assert set(it['mask'].unique().tolist()) <= {0.0, 1.0}
        assert it['label'] == s.label and it['category'] == cat and it['path'] == str(s.path)
        raw = np.asarray(Image.open(s.path).convert('RGB'), np.float32) / 255        # 256 px: resize is a no-op
        assert torch.allclose(denormalize(it['image']).permute(1, 2, 0), torch.from_numpy(raw[16:240, 16:240]), atol=1e-5)
        if s.label:
            m = read_mask(s.mask_path)
            assert m.shape == (256, 256) and m.any()
            assert torch.equal(it['mask'][0], torch.from_numpy(m[16:240, 16:240]).float())
        else: assert it['mask'].sum() == 0

def test_real_1bit_and_8bit_masks(mvtec_subset):
    modes = {}
    for cat in REAL:
        for s in MVTecDataset(mvtec_subset, cat, 'test').samples:
            if s.mask_path is None: continue
            im = Image.open(s.mask_path)
            modes.setdefault(im.mode, []).append(s.mask_path)
            raw = np.asarray(im)
            assert (read_mask(s.mask_path) == (raw > 0)).all() and read_mask(s.mask_path).dtype == bool
    assert {'1', 'L'} <= set(modes), f"expected both 1-bit and 8-bit masks in the shared data, got {set(modes)}"

def test_real_full_geometry_and_loader(mvtec_subset):
    ds = MVTecDataset(mvtec_subset, 'hazelnut', 'test', resize=None, crop=None, normalize=False)
    it = ds[0]
    assert it['image'].shape == (3, 256, 256) and 0 <= it['image'].min() and it['image'].max() <= 1
    assert torch.equal(it['mask'][0], torch.from_numpy(read_mask(ds.samples[0].mask_path)).float())
    assert ds.transform_spec['normalize'] is False and ds.transform_spec['mean'] is None
    b = next(iter(torch.utils.data.DataLoader(MVTecDataset(mvtec_subset, 'leather', 'test'), batch_size=5)))
    assert b['image'].shape == (5, 3, 224, 224) and b['mask'].shape == (5, 1, 224, 224) and len(b['path']) == 5

# ---------------------------------------------------------------- the generated default data set
SMALL = dict(n_train=6, n_test_good=2, n_test_defect=8)

@pytest.fixture(scope='module')
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp('gen') / 'default'
    t0 = time.perf_counter()
    generate_default_dataset(out, seed=0, **SMALL)
    print(f"generated {len(DEFAULT_CLASSES) * 16} images in {time.perf_counter() - t0:.1f} s")
    return out

def test_generated_classes_kinds():
    from moleflow.synthetic import _SPECS
    kinds = Counter(s.kind for s in _SPECS)
    assert kinds['texture'] >= 3 and kinds['object'] >= 2 and len(DEFAULT_CLASSES) == len(set(DEFAULT_CLASSES))
    assert all(len(default_defects(c)) >= 3 for c in DEFAULT_CLASSES)

def test_generated_layout_readable(generated):
    assert list_categories(generated) == sorted(DEFAULT_CLASSES)
    for c in DEFAULT_CLASSES:
        tr, te = MVTecDataset(generated, c), MVTecDataset(generated, c, 'test')
        assert len(tr) == 6 and len(te) == 10 and sum(te.labels) == 8
        assert {s.defect for s in te.samples} == set(default_defects(c)) | {'good'}
        it = te[[i for i, s in enumerate(te.samples) if s.label][0]]
        assert it['mask'].sum() > 0 and it['image'].shape == (3, 224, 224)

def test_generated_masks_exact(generated):
    "Every defect image differs from its clean re-render only inside its mask, and almost everywhere inside it."
    man = json.loads((generated / 'manifest.json').read_text())
    defects = [f for f in man['files'] if f['group'] == 'defect']
    assert len(defects) == 8 * len(DEFAULT_CLASSES)
    for f in defects:
        img = np.asarray(Image.open(generated / f['path']))
        mraw = np.asarray(Image.open(generated / f['mask']))
        assert Image.open(generated / f['mask']).mode == 'L' and set(np.unique(mraw)) == {0, 255}
        mask = mraw > 0
        clean, _ = render_sample(f['category'], f['index'], seed=0, group='defect')
        changed = (img != clean).any(-1)
        assert not (changed & ~mask).any(), f['path']
        assert changed[mask].mean() > 0.9, f['path']
        assert 0.005 < mask.mean() < 0.1, (f['path'], mask.mean())
        ys, xs = np.nonzero(mask)                                   # inside the 224 centre crop of 256
        assert min(ys.min(), xs.min()) >= 16 and max(ys.max(), xs.max()) < 240, f['path']

def test_generated_normal_images_match_render(generated):
    man = json.loads((generated / 'manifest.json').read_text())
    for f in [f for f in man['files'] if f['group'] != 'defect'][::7]:
        img, mask = render_sample(f['category'], f['index'], seed=0, group=f['group'])
        assert np.array_equal(np.asarray(Image.open(generated / f['path'])), img) and not mask.any()

def test_generated_normal_images_vary(generated):
    for c in DEFAULT_CLASSES:
        a, b = (np.asarray(Image.open(generated / c / f'train/good/00{i}.png'), np.float32) for i in (0, 1))
        assert np.abs(a - b).mean() > 3, c

def test_generated_deterministic(tmp_path, generated):
    a = generate_default_dataset(tmp_path / 'a', seed=0, classes=['screw', 'fabric'], **SMALL)
    b = generate_default_dataset(tmp_path / 'b', seed=1, classes=['screw'], **SMALL)
    files = sorted((a / 'screw').rglob('*.png')) + sorted((a / 'fabric').rglob('*.png'))
    assert len(files) == 2 * (16 + 8)
    for p in files: assert p.read_bytes() == (generated / p.relative_to(a)).read_bytes(), p
    assert (a / 'screw/train/good/000.png').read_bytes() != (b / 'screw/train/good/000.png').read_bytes()

def test_generated_default_sizes_and_reuse(tmp_path):
    t0 = time.perf_counter()
    out = generate_default_dataset(tmp_path / 'd', classes=['pill'])
    first = time.perf_counter() - t0
    assert (len(MVTecDataset(out, 'pill')), len(MVTecDataset(out, 'pill', 'test'))) == (40, 16)
    t0 = time.perf_counter(); generate_default_dataset(tmp_path / 'd', classes=['pill'])
    assert time.perf_counter() - t0 < first / 5                    # same settings: reused, not redrawn
    with pytest.raises(FileExistsError, match='overwrite=True'): generate_default_dataset(out, seed=3, classes=['pill'])
    generate_default_dataset(out, seed=3, classes=['pill'], n_train=2, overwrite=True)
    assert len(MVTecDataset(out, 'pill')) == 2

def test_generator_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='category must be one of'): generate_default_dataset(tmp_path, classes=['zebra'])
    with pytest.raises(ValueError, match='n_test_good must be an int >= 0'): generate_default_dataset(tmp_path, n_test_good=-1)
    with pytest.raises(ValueError, match='defect must be one of'): render_sample('wood', 0, defect='dent')
    with pytest.raises(ValueError, match='group must be one of'): render_sample('wood', 0, group='val')
    with pytest.raises(ValueError, match='image_size must be an int >= 64'): render_sample('wood', 0, image_size=32)

def test_generated_other_size():
    img, mask = render_sample('screw', 0, group='defect', defect='missing_tip', image_size=128)
    clean, _ = render_sample('screw', 0, group='defect', image_size=128)
    assert img.shape == (128, 128, 3) and mask.any() and not ((img != clean).any(-1) & ~mask).any()

# ---------------------------------------------------------------- bad input
def _png(path, arr):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path

def _mini(root, cat='toy', size=48, seed=0):
    rng = np.random.default_rng(seed)
    c = Path(root) / cat
    for i in range(3): _png(c / f'train/good/{i:03d}.png', rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    _png(c / 'test/good/000.png', rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    for i in range(2):
        _png(c / f'test/crack/{i:03d}.png', rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        m = np.zeros((size, size), np.uint8); m[5:20, 5:20] = 255
        _png(c / f'ground_truth/crack/{i:03d}_mask.png', m)
    return c

def test_good_mini(tmp_path):
    _mini(tmp_path)
    te = MVTecDataset(tmp_path, 'toy', 'test', resize=48, crop=32)
    assert te.labels == [1, 1, 0] and te[0]['mask'].shape == (1, 32, 32) and not te.skipped

def test_missing_train_good(tmp_path):
    (tmp_path / 'toy' / 'test' / 'good').mkdir(parents=True)
    with pytest.raises(MissingDataError, match=r'toy/train/good: folder not found'): MVTecDataset(tmp_path, 'toy')
    with pytest.raises(FileNotFoundError): MVTecDataset(tmp_path, 'toy')

def test_missing_test_dir(tmp_path):
    _mini(tmp_path); import shutil; shutil.rmtree(tmp_path / 'toy' / 'test')
    with pytest.raises(MissingDataError, match=r'toy/test: folder not found'): MVTecDataset(tmp_path, 'toy', 'test')

def test_empty_class(tmp_path):
    (tmp_path / 'toy' / 'train' / 'good').mkdir(parents=True)
    with pytest.raises(DataError, match='empty; expected the normal training images'): MVTecDataset(tmp_path, 'toy')
    (tmp_path / 'bare').mkdir()
    with pytest.raises(MissingDataError, match='bare/train/good'): MVTecDataset(tmp_path, 'bare')

def test_defect_without_mask(tmp_path):
    c = _mini(tmp_path); (c / 'ground_truth/crack/001_mask.png').unlink()
    with pytest.raises(DataError, match=r'001.png: no mask; expected .*ground_truth/crack/001_mask.png'):
        MVTecDataset(tmp_path, 'toy', 'test')
    import shutil; shutil.rmtree(c / 'ground_truth')
    with pytest.raises(DataError, match='2 bad sample'): MVTecDataset(tmp_path, 'toy', 'test')

def test_mask_size_mismatch(tmp_path):
    c = _mini(tmp_path); _png(c / 'ground_truth/crack/000_mask.png', np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match=r'000.png: mask .*000_mask.png is 30x20, expected 48x48'):
        MVTecDataset(tmp_path, 'toy', 'test')

@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty'])
def test_unreadable_image(tmp_path, damage):
    c = _mini(tmp_path); p = c / 'train/good/001.png'
    data = p.read_bytes()
    p.write_bytes({'truncate': data[:len(data) // 2], 'garbage': b'\x89PNG nonsense', 'empty': b''}[damage])
    with pytest.raises(DataError, match=r'train/good/001.png: cannot read'): MVTecDataset(tmp_path, 'toy')

def test_unreadable_mask(tmp_path):
    c = _mini(tmp_path); (c / 'ground_truth/crack/000_mask.png').write_bytes(b'junk')
    with pytest.raises(DataError, match=r'000_mask.png: cannot read .*expected a readable mask image'):
        MVTecDataset(tmp_path, 'toy', 'test')

def test_stray_file_reported(tmp_path):
    c = _mini(tmp_path); (c / 'train/good/notes.txt').write_text('hi')
    with pytest.raises(DataError, match=r'notes.txt: not an image file'): MVTecDataset(tmp_path, 'toy')
    (c / 'train/good/.DS_Store').write_text('hidden files are ignored')
    with pytest.warns(UserWarning, match='notes.txt: not an image file'):
        assert len(MVTecDataset(tmp_path, 'toy', skip_bad=True)) == 3

def test_unknown_category_and_empty_root(tmp_path):
    _mini(tmp_path, 'bottle'); _mini(tmp_path, 'cable')
    with pytest.raises(MissingDataError, match="unknown category 'zebra' .*available: bottle, cable"): MVTecDataset(tmp_path, 'zebra')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(MissingDataError, match='no categories found'): MVTecDataset(tmp_path / 'empty', 'bottle')
    with pytest.raises(MissingDataError, match='data root not found'): list_categories(tmp_path / 'nowhere')

def test_skip_bad_reports(tmp_path):
    c = _mini(tmp_path)
    (c / 'ground_truth/crack/001_mask.png').unlink()
    p = c / 'test/good/000.png'; p.write_bytes(p.read_bytes()[:100])
    with pytest.warns(UserWarning, match='skipped 2 bad sample'):
        ds = MVTecDataset(tmp_path, 'toy', 'test', skip_bad=True)
    assert len(ds) == 1 and ds.samples[0].path.name == '000.png' and ds.samples[0].defect == 'crack'
    reasons = dict((p.relative_to(c).as_posix(), r) for p, r in ds.skipped)
    assert set(reasons) == {'test/crack/001.png', 'test/good/000.png'}
    assert 'no mask' in reasons['test/crack/001.png'] and 'cannot read' in reasons['test/good/000.png']

def test_skip_bad_nothing_left(tmp_path):
    c = _mini(tmp_path)
    for p in (c / 'train/good').iterdir(): p.write_bytes(b'x')
    with pytest.warns(UserWarning), pytest.raises(DataError, match='no usable images'): MVTecDataset(tmp_path, 'toy', skip_bad=True)

def test_bad_arguments(tmp_path):
    _mini(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"): MVTecDataset(tmp_path, 'toy', 'val')
    with pytest.raises(ValueError, match='crop must be <= resize'): MVTecDataset(tmp_path, 'toy', resize=64, crop=100)
    with pytest.raises(ValueError, match='resize must be a positive int'): MVTecDataset(tmp_path, 'toy', resize=0)
    with pytest.raises(ValueError, match='normalize must be True or False'): MVTecDataset(tmp_path, 'toy', normalize='yes')

def test_mpdd_same_layout(tmp_path):
    _mini(tmp_path, 'bracket_black')
    assert len(MPDDDataset(tmp_path, 'bracket_black', 'test')) == 3

# ---------------------------------------------------------------- task sequences
MVTEC = ['bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill', 'screw', 'tile',
         'toothbrush', 'transistor', 'wood', 'zipper']

@pytest.mark.parametrize('scenario,sizes', [(None, [1] * 15), ('1-1', [1] * 15), ('14-1', [14, 1]), ('10-5', [10, 5]),
                                            ('3-3', [3] * 5), ('5-5', [5] * 3), ('10-1', [10] + [1] * 5), ((15, 1), [15])])
def test_task_sequences(scenario, sizes):
    tasks = make_task_sequence(MVTEC, scenario)
    assert [len(t) for t in tasks] == sizes and sum(tasks, []) == MVTEC

@pytest.mark.parametrize('scenario,match', [('10-4', 'not a multiple of 4'), ('16-1', 'only 15 classes'), ('0-1', 'B-I'),
                                            ('1-0', 'B-I'), ('abc', 'B-I'), ('1-1-1', 'B-I'), (7, 'B-I')])
def test_task_sequence_errors(scenario, match):
    with pytest.raises(ValueError, match=match): make_task_sequence(MVTEC, scenario)

def test_task_sequence_class_errors():
    with pytest.raises(ValueError, match='distinct'): make_task_sequence(['a', 'b', 'a'])
    with pytest.raises(ValueError, match='non-empty list'): make_task_sequence([])
    assert parse_scenario('3-3') == (3, 3) and parse_scenario(None) == (1, 1)

def test_task_datasets(generated):
    tasks = make_task_sequence(list(DEFAULT_CLASSES), '4-2')
    assert tasks == [list(DEFAULT_CLASSES[:4]), list(DEFAULT_CLASSES[4:])]
    tds = TaskDataset(MVTecDataset(generated, c) for c in tasks[1])
    assert isinstance(tds, TaskDataset) and len(tds) == 12 and tds.categories == tasks[1] and tds.labels == [0] * 12
    assert tds.transform_spec == MVTecDataset(generated, 'pill').transform_spec
    for i in (0, 5, 6, 11):
        assert tds[i]['path'] == str(tds.samples[i].path) and tds[i]['category'] == tds.samples[i].category
    with pytest.raises(ValueError, match='share one transform_spec'):
        TaskDataset([MVTecDataset(generated, 'pill'), MVTecDataset(generated, 'screw', crop=200)])

# ---------------------------------------------------------------- VisA and plain folders
@pytest.fixture
def visa(tmp_path):
    rng = np.random.default_rng(0)
    rows = ['object,split,label,image,mask']
    for obj in ('candle', 'pcb1'):
        for i in range(4):
            rel = f'{obj}/Data/Images/Normal/{i:04d}.JPG'
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(_mk(tmp_path / rel), format='JPEG')
            rows.append(f'{obj},{"train" if i < 3 else "test"},normal,{rel},')
        for i in range(2):
            rel, mrel = f'{obj}/Data/Images/Anomaly/{i:03d}.JPG', f'{obj}/Data/Masks/Anomaly/{i:03d}.png'
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(_mk(tmp_path / rel), format='JPEG')
            m = np.zeros((30, 40), np.uint8); m[3:9, 4:12] = i + 1                    # label values, not 255
            _png(tmp_path / mrel, m)
            rows.append(f'{obj},test,anomaly,{rel},{mrel}')
    _mk(tmp_path / 'split_csv/1cls.csv').write_text('\n'.join(rows) + '\n')
    return tmp_path

def _mk(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    return p

def test_visa(visa):
    assert list_categories(visa) == ['candle', 'pcb1']
    tr, te = VisADataset(visa, 'pcb1'), VisADataset(visa, 'pcb1', 'test', resize=None, crop=None)
    assert len(tr) == 3 and te.labels == [0, 1, 1] and [s.defect for s in te.samples] == ['good', 'anomaly', 'anomaly']
    assert te[2]['mask'].shape == (1, 30, 40) and te[2]['mask'].sum() == 48 and te[2]['image'].shape == (3, 30, 40)
    assert tr[0]['image'].shape == (3, 224, 224)
    assert len(TaskDataset(VisADataset(visa, c) for c in ['candle', 'pcb1'])) == 6

def test_visa_bad(visa):
    with pytest.raises(MissingDataError, match='available: candle, pcb1'): VisADataset(visa, 'fryum')
    csv = visa / 'split_csv/1cls.csv'
    text = csv.read_text()
    csv.write_text(text.replace('pcb1,test,anomaly,pcb1/Data/Images/Anomaly/001.JPG,pcb1/Data/Masks/Anomaly/001.png',
                                'pcb1,test,anomaly,pcb1/Data/Images/Anomaly/001.JPG,'))
    with pytest.raises(DataError, match=r'001.JPG: anomalous image without a mask on line \d+'): VisADataset(visa, 'pcb1', 'test')
    csv.write_text(text.replace('pcb1,train,normal', 'pcb1,train,norml'))
    with pytest.raises(DataError, match="label 'norml'"): VisADataset(visa, 'pcb1')
    csv.write_text(text); (visa / 'pcb1/Data/Images/Normal/0000.JPG').unlink()
    with pytest.raises(DataError, match='0000.JPG: file not found'): VisADataset(visa, 'pcb1')
    csv.unlink()
    with pytest.raises(MissingDataError, match='split_csv/1cls.csv: split file not found'): VisADataset(visa, 'pcb1')

def test_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3): _png(tmp_path / f'train/{i}.png', rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for i in range(2): _png(tmp_path / f'test_ok/{i}.png', rng.integers(0, 255, (40, 40), dtype=np.uint8))
    for n in ('x', 'y'): _png(tmp_path / f'test_bad/{n}.png', rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    m = np.zeros((40, 40), np.uint8); m[:10] = 255
    _png(tmp_path / 'masks/x_mask.png', m); _png(tmp_path / 'masks/y.png', m)
    tr = FolderDataset(tmp_path / 'train', category='widget')
    te = FolderDataset(tmp_path / 'test_ok', tmp_path / 'test_bad', tmp_path / 'masks', split='test', category='widget',
                       resize=40, crop=None)
    assert len(tr) == 3 and tr[0]['category'] == 'widget' and te.labels == [0, 0, 1, 1]
    assert te[2]['mask'][0, :10].all() and not te[2]['mask'][0, 10:].any() and te[0]['image'].shape == (3, 40, 40)
    assert te.samples[3].mask_path.name == 'y.png'
    (tmp_path / 'masks/y.png').unlink()
    with pytest.raises(DataError, match=r'y.png: no mask; expected .*y_mask.png'):
        FolderDataset(None, tmp_path / 'test_bad', tmp_path / 'masks', split='test')
    with pytest.raises(ValueError, match='mask_dir is required'): FolderDataset(None, tmp_path / 'test_bad', split='test')
    with pytest.raises(ValueError, match="abnormal_dir must be None with split='train'"): FolderDataset(tmp_path / 'train', tmp_path / 'test_bad')
    with pytest.raises(MissingDataError, match='nope: folder not found'): FolderDataset(tmp_path / 'nope')
