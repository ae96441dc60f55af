"""Roofline of moleflow's training step and scoring pass: their FLOPs counted from the model's shapes, against the matmul
throughput this machine reaches in the same run (bench/roofline.{json,md}; issue 16).

Run from the repository root: `OMP_NUM_THREADS=1 .venv/bin/python bench/roofline.py` (`make bench` runs it). Uses the
default config on real hazelnut images of the shared MVTec subset (random features if it is absent), like
bench/profile_moleflow.py, whose training step it measures.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one step / one pass (matmuls and convolutions, forward and
  backward); every matmul's shape is recorded as well.
- Ceilings, measured here: a large square GEMM (the machine's matmul peak at this thread count), and the same step's
  matmul shapes timed alone (the best those shapes can do: small inner dimensions run far below the peak).
- Ratios: achieved GFLOP/s of the step over each ceiling, and the share of the step's time its matmuls would take at
  their measured speed (the rest is elementwise and memory-bound work: what blocks the remainder).
"""
import argparse, json, os, platform, statistics, sys, time
from collections import Counter
from pathlib import Path
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
from profile_moleflow import training_setup, step_times, DATA
from moleflow.config import make_config
from moleflow.diagnosis import code_version
from moleflow.files import atomic_write_text

aten = torch.ops.aten
_MM = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default, aten.baddbmm.default,
       aten.linear.default, aten.matmul.default}   # linear and matmul reach the mode whole under inference_mode

def _bmkn(func, args) -> tuple[int, int, int, int]:
    "`(batch, m, k, n)` of a matmul call; leading dimensions of a linear or matmul input fold into m."
    if func is aten.linear.default:
        x, w = args[0], args[1]
        return 1, x.numel() // x.shape[-1], x.shape[-1], w.shape[0]
    a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.addmm_.default, aten.baddbmm.default) else (args[0], args[1])
    if b.dim() == 2: return 1, a.numel() // a.shape[-1], a.shape[-1], b.shape[-1]
    return b.numel() // (b.shape[-2] * b.shape[-1]), a.shape[-2], a.shape[-1], b.shape[-1]

class MatmulShapes(TorchDispatchMode):
    "Records `(batch, m, k, n)` of every matmul run under it, with counts."
    def __init__(self): super().__init__(); self.shapes = Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MM: self.shapes[_bmkn(func, args)] += 1
        return func(*args, **(kwargs or {}))

def counted(fn):
    "`(flops, matmul shapes)` of one call of `fn`: every matmul from its shape, convolutions by FlopCounterMode (which skips in-place addmm_)."
    shapes = MatmulShapes()
    with shapes, FlopCounterMode(display=False) as fc: fn()      # this order: the counter's module hooks need the recorder outside
    other = sum(v for op, v in fc.get_flop_counts()['Global'].items() if op.__name__.split('.')[0] not in ('mm', 'addmm', 'bmm', 'baddbmm'))
    return other + sum(mm_flops(s) * c for s, c in shapes.shapes.items()), shapes.shapes

def best_seconds(fn, repeat:int=5, min_s:float=0.05) -> float:
    "The best time of one call of `fn` over `repeat` rounds of enough calls to last `min_s`."
    fn(); n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < min_s: fn(); n += 1
    best = float('inf')
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best

def gemm_seconds(shape) -> float:
    "The best time of one matmul of `(batch, m, k, n)` on float32."
    b, m, k, n = shape
    x, y = (torch.randn(m, k), torch.randn(k, n)) if b == 1 else (torch.randn(b, m, k), torch.randn(b, k, n))
    return best_seconds(lambda: torch.mm(x, y) if b == 1 else torch.bmm(x, y))

def mm_flops(shape) -> int: b, m, k, n = shape; return 2 * b * m * k * n

def roofline(name:str, fn, seconds:float, peak:float) -> dict:
    "The roofline record of `fn`, which takes `seconds` per call: FLOPs, achieved GFLOP/s and the two ceilings."
    flops, shapes = counted(fn)
    mm_total = sum(mm_flops(s) * c for s, c in shapes.items())
    mm_time = sum(gemm_seconds(s) * c for s, c in shapes.items())
    top = sorted(shapes.items(), key=lambda sc: -mm_flops(sc[0]) * sc[1])[:8]
    return {'name': name, 'gflop': flops / 1e9, 'matmul_gflop': mm_total / 1e9, 'seconds': seconds,
            'achieved_gflops': flops / seconds / 1e9, 'peak_gflops': peak,
            'shape_ceiling_gflops': mm_total / mm_time / 1e9 if mm_time else None, 'matmul_seconds_at_measured_speed': mm_time,
            'of_peak': flops / seconds / 1e9 / peak, 'of_shape_ceiling': (flops / seconds) / (mm_total / mm_time) if mm_time else None,
            'matmul_share_of_time': mm_time / seconds,
            'top_matmuls': [{'shape_bmkn': list(s), 'calls': c, 'gflop': mm_flops(s) * c / 1e9} for s, c in top]}

def to_markdown(res:dict) -> str:
    lines = [f"# Roofline (issue 16)\n", f"{res['date']}, {res['machine']}; {res['threads']} thread(s); torch {res['torch']}; code {(res['code']['commit'] or 'unknown')[:7]}"
             f"{' (dirty)' if res['code']['dirty'] else ''}; "
             f"load average {res.get('load_average_1min', float('nan')):.1f} at the start (other processes slow it); "
             f"default config (D={res['feature_dim']}, {res['blocks']} blocks, batch {res['batch']}); real features: {res['real_features']}.\n",
             f"Matmul peak measured in this run ({res['peak_shape']} float32 GEMM): **{res['peak_gflops']:.1f} GFLOP/s**.\n",
             '| pass | GFLOP | of it in matmuls | time (ms) | achieved GFLOP/s | of peak | ceiling of its matmul shapes (GFLOP/s) | of that ceiling | its matmuls at measured speed, share of time |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in res['passes']:
        ceiling = ('– (no matmuls: convolutions)', '–') if r['shape_ceiling_gflops'] is None else \
                  (f"{r['shape_ceiling_gflops']:.1f}", f"{r['of_shape_ceiling']:.0%}")
        lines.append(f"| {r['name']} | {r['gflop']:.2f} | {r['matmul_gflop'] / r['gflop']:.0%} | {1000 * r['seconds']:.1f} | "
                     f"{r['achieved_gflops']:.1f} | {r['of_peak']:.0%} | {ceiling[0]} | {ceiling[1]} | "
                     f"{r['matmul_share_of_time']:.0%} |")
    lines += ['', "'of that ceiling' is the achieved rate over what the pass's own matmul shapes reach when timed alone; the last",
              "column is the time those matmuls would take at that speed over the pass's measured time: the rest of the time is",
              "elementwise, memory-bound and framework work, what keeps the pass from its matmul ceiling.", '']
    for r in res['passes']:
        if not r['top_matmuls']: continue
        lines.append(f"**{r['name']}**, largest matmuls (batch, m, k, n) x calls: " +
                     '; '.join(f"{tuple(t['shape_bmkn'])} x{t['calls']} ({t['gflop']:.2f} GFLOP)" for t in r['top_matmuls']))
        lines.append('')
    if res.get('presets'):
        first = res['presets'][0]['preset']
        lines += [f"Training step (task 1, its own config) of the design versions, measured one after another in this run, against `{first}`:", '',
                  f'| preset | step (ms) | x {first} |', '|---|---|---|']
        lines += [f"| {r['preset']} | {r['step_ms']:.0f} | {r['times_first']:.2f} |" for r in res['presets']]
        lines.append('')
    return '\n'.join(lines)

def preset_steps(presets, steps:int, real:bool) -> list[dict]:
    "Median task-1 training-step time of each preset on the same data, and its ratio to the first preset's (measured in this run)."
    out = []
    for name in presets:
        _, _, _, step = training_setup(make_config(name, {}), real)
        out.append({'preset': name, 'step_ms': 1000 * statistics.median(step_times(step, steps))})
    for r in out: r['times_first'] = r['step_ms'] / out[0]['step_ms']
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--steps', type=int, default=10, help='timed training steps (the median is kept)')
    ap.add_argument('--peak-size', type=int, default=2048, help='side of the square GEMM that measures the peak')
    ap.add_argument('--presets', default='main,v4,v4.1,v5,v6,v7', help="presets whose training step is timed against the first ('' for none)")
    ap.add_argument('--preset-steps', type=int, default=5, help='timed steps per preset (the median is kept)')
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'roofline'), help='output stem: writes STEM.json and STEM.md')
    a = ap.parse_args()
    cfg = make_config('main', {})
    real, load = DATA.is_dir(), os.getloadavg()[0]   # other work on the machine moves every number here
    ext, test_x, tr, step = training_setup(cfg, real)
    times = step_times(step, a.steps)
    step_s = statistics.median(times)
    peak_shape = (1, a.peak_size, a.peak_size, a.peak_size)
    peak = mm_flops(peak_shape) / gemm_seconds(peak_shape) / 1e9
    passes = [roofline(f'training step (task 1, batch {cfg.batch_size})', lambda: step(0), step_s, peak)]
    tr.flow.eval()
    with torch.inference_mode():
        feats = ext(test_x)
        tasks = tr.route(feats)
        passes.append(roofline(f'backbone ({len(test_x)} images)', lambda: ext(test_x), best_seconds(lambda: ext(test_x), 3), peak))
        passes.append(roofline(f'flow scoring ({len(test_x)} images)', lambda: tr.nll_maps(feats, tasks),
                               best_seconds(lambda: tr.nll_maps(feats, tasks), 3), peak))
    res = dict(machine=f'{platform.machine()} {platform.processor() or ""}'.strip(), threads=torch.get_num_threads(),
               torch=torch.__version__, code=code_version(), load_average_1min=load, date=time.strftime('%Y-%m-%dT%H:%M:%S'), feature_dim=cfg.feature_dim, blocks=cfg.num_coupling_layers,
               batch=cfg.batch_size, real_features=real, peak_shape='x'.join(map(str, peak_shape[1:])), peak_gflops=peak,
               step_times_ms=[1000 * t for t in times], passes=passes,
               presets=preset_steps([p for p in a.presets.split(',') if p], a.preset_steps, real))
    atomic_write_text(a.out + '.json', json.dumps(res, indent=1))
    atomic_write_text(a.out + '.md', to_markdown(res))
    print(to_markdown(res))

if __name__ == '__main__': main()
