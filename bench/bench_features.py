"""Feature extraction throughput and cached-epoch speed-up on the shared real MVTec subset.

Run from the repository root: `.venv/bin/python bench/bench_features.py [--backbone efficientnet_lite0] [--repeats 3]`.
Writes bench/results_features.json and prints a table. Target: reading a cached epoch >= 10x faster than extracting.
"""
import argparse, json, os, platform, statistics, sys, tempfile, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / 'shared' / 'data' / 'mvtec_subset'
sys.path.insert(0, str(ROOT))
from moleflow.data import IMAGENET_MEAN, IMAGENET_STD
from moleflow.features import FeatureCache, get_backbone
from moleflow.files import atomic_write_text

def datasets(root, classes):
    "One data set per (class, split); `moleflow.data.MVTecDataset` when exported, else a minimal stand-in."
    try:
        from moleflow.data import MVTecDataset
        return 'moleflow.data.MVTecDataset', [(c, s, MVTecDataset(root, c, split=s)) for c in classes for s in ('train', 'test')]
    except ImportError:
        return 'stand-in loader (moleflow.data not exported)', [(c, s, _StandIn(root / c / s)) for c in classes for s in ('train', 'test')]

class _StandIn(torch.utils.data.Dataset):
    "Resize 256, centre-crop 224, ImageNet normalisation; `.samples`/`.transform_spec` as in moleflow.data."
    def __init__(self, folder, resize=256, crop=224):
        from types import SimpleNamespace
        self.samples = [SimpleNamespace(path=str(p)) for p in sorted(folder.glob('*/*.png'))]
        self.resize, self.crop = resize, crop
        self.transform_spec = dict(resize=resize, crop=crop, normalize=dict(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)))
    def __len__(self): return len(self.samples)
    def __getitem__(self, i):
        import numpy as np
        from PIL import Image
        im = Image.open(self.samples[i].path).convert('RGB').resize((self.resize, self.resize), Image.BILINEAR)
        o = (self.resize - self.crop) // 2
        a = np.asarray(im, dtype=np.float32)[o:o + self.crop, o:o + self.crop] / 255
        x = torch.from_numpy(a).permute(2, 0, 1)
        return dict(image=(x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--backbone', default='efficientnet_lite0')
    ap.add_argument('--batch-size', type=int, default=16)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'results_features.json'))
    a = ap.parse_args()
    if not DATA.is_dir(): sys.exit(f"shared real data not found at {DATA}")
    classes = sorted(p.name for p in DATA.iterdir() if (p / 'train' / 'good').is_dir())
    loader, sets = datasets(DATA, classes)
    ext = get_backbone(a.backbone)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for c, s, ds in sets:
            extracts, reads = [], []
            for r in range(a.repeats):
                cache = FeatureCache(Path(td) / f'{c}-{s}-{r}')  # fresh folder: the first call must extract
                feats, info = cache.features_with_info(ext, ds, batch_size=a.batch_size, progress=False)
                assert not info['hit']
                extracts.append(info['seconds'])
                again = FeatureCache(Path(td) / f'{c}-{s}-{r}')  # a later epoch/run: new instance, same folder
                g, hit = again.features_with_info(ext, ds, batch_size=a.batch_size, progress=False)
                assert hit['hit'] and torch.equal(g, feats)
                reads.append(hit['seconds'])
            size = Path(info['path']).stat().st_size
            rows.append(dict(cls=c, split=s, n=len(ds), shape=list(feats.shape), extract_s=statistics.median(extracts),
                             cached_s=statistics.median(reads), entry_mb=size / 2**20))
    # pure backbone throughput on preloaded images (no decode, no cache), best of the repeats
    x = torch.stack([sets[0][2][i]['image'] for i in range(min(32, len(sets[0][2])))])
    fwd = []
    with torch.inference_mode():
        ext(x[:a.batch_size])
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            for i in range(0, len(x), a.batch_size): ext(x[i:i + a.batch_size])
            fwd.append(time.perf_counter() - t0)
    fwd = min(fwd)
    N = sum(r['n'] for r in rows)
    ext_s, read_s = sum(r['extract_s'] for r in rows), sum(r['cached_s'] for r in rows)
    total = dict(n=N, extract_s=ext_s, cached_s=read_s, extract_img_per_s=N / ext_s, cached_img_per_s=N / read_s,
                 ratio=ext_s / read_s, forward_only_img_per_s=len(x) / fwd, entry_mb=sum(r['entry_mb'] for r in rows))
    print(f"backbone {a.backbone} ({ext.spec['timm_name']}), features {rows[0]['shape'][1:]}, data via {loader}")
    print(f"{'class':<11}{'split':<6}{'n':>4}{'extract s':>11}{'cached s':>10}{'ratio':>8}{'MB':>7}")
    for r in rows:
        print(f"{r['cls']:<11}{r['split']:<6}{r['n']:>4}{r['extract_s']:>11.2f}{r['cached_s']:>10.3f}"
              f"{r['extract_s'] / r['cached_s']:>8.1f}{r['entry_mb']:>7.1f}")
    print(f"{'total':<17}{N:>4}{ext_s:>11.2f}{read_s:>10.3f}{total['ratio']:>8.1f}{total['entry_mb']:>7.1f}")
    print(f"extraction {total['extract_img_per_s']:.1f} img/s (decode + forward + hash + write); "
          f"backbone forward only {total['forward_only_img_per_s']:.1f} img/s; cached epoch {total['cached_img_per_s']:.0f} img/s; "
          f"ratio {total['ratio']:.1f}x (target >= 10x: {'met' if total['ratio'] >= 10 else 'NOT met'})")
    res = dict(backbone=ext.spec, data=str(DATA), loader=loader, batch_size=a.batch_size, repeats=a.repeats, rows=rows,
               total=total, loadavg_start=load0, loadavg_end=os.getloadavg(), torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
               machine=platform.platform(), date=time.strftime('%Y-%m-%dT%H:%M:%S'))
    atomic_write_text(a.out, json.dumps(res, indent=1))   # atomic: a reader never sees half a file
    print(f"load average at start/end: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          f"(medians of {a.repeats} runs; a busy machine slows extraction most)")
    print(f"wrote {a.out}")

if __name__ == '__main__': main()
