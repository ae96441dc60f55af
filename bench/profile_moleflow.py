"""Profile moleflow's training step and inference path once (torch.profiler); print the top operators and step times.

Run from the repository root: `OMP_NUM_THREADS=1 .venv/bin/python bench/profile_moleflow.py [--out bench/profile.json]`.
Uses the default config on real hazelnut images from the shared MVTec subset (random features if it is absent).
"""
import argparse, json, statistics, sys, time
from pathlib import Path
import torch
from torch.profiler import profile, ProfilerActivity, record_function

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / 'shared' / 'data' / 'mvtec_subset'
sys.path.insert(0, str(ROOT))
from moleflow.config import make_config
from moleflow.files import atomic_write_text
from moleflow.features import get_backbone
from moleflow.trainer import ContinualTrainer, flow_loss
from moleflow.evaluation import anomaly_maps, image_scores

def _lora_forward_before(self, x, task=None):
    "LoRALinear.forward before the profiling fix (kept to measure before/after on the same machine state)."
    y = self.base(x)
    k = None if task is None else str(task)
    if k is None or k not in self.lora_A: return y
    y = y + self.scaling * ((x @ self.lora_A[k].t()) @ self.lora_B[k].t())
    if k in self.bias: y = y + self.bias[k]
    return y

def images(n, split):
    from moleflow.data import MVTecDataset
    ds = MVTecDataset(DATA, 'hazelnut', split=split)
    return torch.stack([ds[i]['image'] for i in range(min(n, len(ds)))])

def training_setup(cfg, real:bool):
    "The backbone, test images (real hazelnut ones if `real`, else random) and a trainer with task 0 trained briefly; returns `(ext, test_x, trainer, step)`: `step(i)` is one task-1 training step (forward, loss, backward, clip, AdamW)."
    torch.manual_seed(0)
    ext = get_backbone(cfg.backbone, feature_dim=cfg.feature_dim)
    with torch.inference_mode():
        feats = ext(images(16, 'train')) if real else torch.randn(16, 28, 28, cfg.feature_dim)
        test_x = images(8, 'test') if real else torch.randn(8, 3, 224, 224)
    feats = feats.clone()
    tr = ContinualTrainer(cfg, progress=False)
    tr.train_task(feats[:8], task_name='warm')            # task 0 (trains 25 epochs of one batch); profile task 1's steps
    tr.flow.add_task(1, feats[8:]); tr.num_tasks += 1; tr.flow.freeze_shared()
    params = tr._train_params(1)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tr.router.add_task(1, feats[8:])
    tr.flow.train()
    def step(i):
        x = feats[(torch.arange(cfg.batch_size) + i) % len(feats)]
        with record_function('flow_forward'): z, logdet = tr.flow(x, task=1)
        with record_function('loss'): loss, _ = flow_loss(z, logdet, cfg)
        opt.zero_grad(set_to_none=True)
        with record_function('backward'): loss.backward()
        with record_function('clip+step'):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip); opt.step()
    return ext, test_x, tr, step

def step_times(step, n:int, warmup:int=3) -> list[float]:
    "Seconds of `n` calls `step(i)` after `warmup` untimed ones."
    for i in range(warmup): step(i)
    times = []
    for i in range(n):
        t0 = time.perf_counter(); step(i); times.append(time.perf_counter() - t0)
    return times

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--out', default=None)
    ap.add_argument('--rows', type=int, default=12)
    ap.add_argument('--before', action='store_true', help="use LoRALinear's forward from before the fix")
    a = ap.parse_args()
    if a.before:
        from moleflow.lora import LoRALinear
        LoRALinear.forward = _lora_forward_before
    cfg = make_config('main', {})
    real = DATA.is_dir()
    ext, test_x, tr, step = training_setup(cfg, real)
    times = step_times(step, a.steps)
    with profile(activities=[ProfilerActivity.CPU]) as p_train:
        for i in range(5): step(i)
    tr.flow.eval()
    def infer(x):
        with record_function('backbone'): f = ext(x)
        with record_function('route'): t = tr.route(f)
        with record_function('nll_maps'): nll = tr.nll_maps(f, t)
        with record_function('anomaly_maps'): m = anomaly_maps(nll, cfg.crop_size, sigma=cfg.blur_sigma)
        with record_function('image_scores'): s = image_scores(m, cfg.score_aggregation, cfg.score_param)
        return m, s
    with torch.inference_mode():
        infer(test_x)
        itimes = []
        for _ in range(3):
            t0 = time.perf_counter(); infer(test_x); itimes.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as p_inf: infer(test_x)
    res = dict(train_step_ms=1000 * statistics.median(times), batch=cfg.batch_size,
               infer_ms_per_image=1000 * statistics.median(itimes) / len(test_x), infer_batch=len(test_x),
               threads=torch.get_num_threads(), real_features=real, lora_forward='before' if a.before else 'after')
    for name, prof in (('training step (5 steps)', p_train), ('inference path (8 images)', p_inf)):
        print(f"\n== {name}: top operators by self CPU time")
        print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=a.rows))
        res[name] = [dict(op=e.key, self_ms=e.self_cpu_time_total / 1000, total_ms=e.cpu_time_total / 1000, calls=e.count)
                     for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:a.rows]]
        res[name + ' regions'] = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages()
                                  if e.key in ('flow_forward', 'loss', 'backward', 'clip+step', 'backbone', 'route', 'nll_maps',
                                               'anomaly_maps', 'image_scores')}
        print('regions (total ms):', {k: round(v, 1) for k, v in res[name + ' regions'].items()})
    print(f"\ntraining step {res['train_step_ms']:.1f} ms (batch {cfg.batch_size}); inference {res['infer_ms_per_image']:.1f} ms/image "
          f"(batch {len(test_x)}); {torch.get_num_threads()} thread(s)")
    if a.out: atomic_write_text(a.out, json.dumps(res, indent=1))

if __name__ == '__main__': main()
