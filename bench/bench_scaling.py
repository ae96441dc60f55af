"""Scoring time per image against the size of the training set: moleflow's flow, whose cost does not depend on it,
against nearest-neighbour scoring over PatchCore's memory bank (full, and coresets of 10 % and 1 %), on the same
feature shapes, up to the largest class available (bench/results_scaling.{json,md,png}; issue 16).

Run from the repository root: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_scaling.py` (`make bench` runs it).

- moleflow: the default config's router and flow scoring of a batch of test images through task 1's expert
  (`ContinualTrainer.route` + `nll_maps`, as `bench/roofline.py` sets it up); the backbone's time is measured apart.
- PatchCore: each test patch's distance to its nearest bank patch (`moleflow.diagnosis.nn_distance_maps`, the
  brute-force search anomalib's PatchCore also runs), with a bank of N images x H x W patches times the coreset ratio.
  A coreset's scoring cost is that of a bank of its size, so the banks are random features of that size: the time of
  either method depends on the shapes only, not on the values. The greedy coreset selection itself (training time,
  ~6 h at 10 % for the 568-image ball screw class on this CPU) is not part of scoring and is not timed here.
- Crossover: the training-set size above which a PatchCore variant scores slower than moleflow (flow + router),
  interpolated between the measured sizes on a log scale; none when it stays faster up to the largest size.
"""
import argparse, json, math, os, platform, sys, time
from pathlib import Path
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / 'bench'))
from moleflow.config import make_config
from moleflow.diagnosis import code_version, nn_distance_maps
from moleflow.files import atomic_write_text
from roofline import best_seconds

RATIOS = {'patchcore (full bank)': 1.0, 'patchcore-0.1': 0.1, 'patchcore (coreset 0.01)': 0.01}
LARGEST_CLASS = 568   # training images of bsdata's ball_screw, the largest class in ../shared/data

def nn_seconds_per_image(n_images:int, ratio:float, grid:int, dim:int, queries:torch.Tensor, repeat:int, chunk:int) -> float:
    "Seconds per test image of nearest-neighbour scoring against a bank of `ratio` of `n_images` x grid x grid patches."
    n_bank = max(1, round(n_images * grid * grid * ratio))
    bank = torch.randn(n_bank, 1, 1, dim, generator=torch.Generator().manual_seed(n_bank))
    return best_seconds(lambda: nn_distance_maps(bank, queries, chunk=chunk), repeat) / len(queries)

def crossover(sizes, slower, faster) -> float|None:
    "The size where `slower(size)` first exceeds `faster(size)`, log-interpolated between measured sizes; None if it never does."
    d = [math.log(s) - math.log(f) for s, f in zip(slower, faster)]
    if d[0] > 0: return float(sizes[0])
    for i in range(1, len(sizes)):
        if d[i] > 0:
            a, b = math.log(sizes[i - 1]), math.log(sizes[i])
            return float(math.exp(a + (b - a) * (-d[i - 1]) / (d[i] - d[i - 1])))
    return None

def measure(sizes, grid:int, dim:int, moleflow_s:float, backbone_s:float, n_test:int, repeat:int, chunk:int) -> dict:
    "Per-image scoring seconds of every PatchCore bank at each size, with moleflow's (constant) and the crossovers."
    queries = torch.randn(n_test, grid, grid, dim, generator=torch.Generator().manual_seed(0))
    pc = {name: [nn_seconds_per_image(n, r, grid, dim, queries, repeat, chunk) for n in sizes] for name, r in RATIOS.items()}
    cross = {name: crossover(sizes, t, [moleflow_s] * len(sizes)) for name, t in pc.items()}
    full = pc['patchcore (full bank)'][-1]
    return dict(sizes=list(sizes), moleflow_scoring_s=moleflow_s, backbone_s=backbone_s, patchcore_s=pc, crossover_images=cross,
                full_bank_over_moleflow_total_at_largest=(backbone_s + full) / (backbone_s + moleflow_s))

def to_markdown(res:dict) -> str:
    s, ms = res['sizes'], lambda v: f'{1000 * v:.2f}'
    L = ['# Scoring time vs training-set size (issue 16)\n',
         f"{res['date']}, {res['machine']}; {res['threads']} thread(s); torch {res['torch']}; code {(res['code']['commit'] or 'unknown')[:7]}"
         f"{' (dirty)' if res['code']['dirty'] else ''}; load average {res['load_average_1min']:.1f} at the start. "
         f"Default config (D={res['dim']}, {res['grid']}x{res['grid']} patches per image), batches of {res['n_test']} test images, best of {res['repeat']} rounds.\n",
         "Milliseconds per test image. moleflow's scoring (router + flow through task 1's expert) does not depend on the "
         "training set's size; PatchCore's nearest-neighbour search grows with its memory bank (N images x patches x coreset ratio). "
         "The backbone, the same for both, is measured apart.\n",
         '| training images N | ' + ' | '.join(RATIOS) + ' | moleflow (flow + router) | backbone |', '|---|' + '---|' * (len(RATIOS) + 2)]
    for i, n in enumerate(s):
        L.append(f'| {n} | ' + ' | '.join(ms(res['patchcore_s'][k][i]) for k in RATIOS) + f" | {ms(res['moleflow_scoring_s'])} | {ms(res['backbone_s'])} |")
    L += ['', '**Crossover** (N above which the PatchCore variant scores slower than moleflow): ' +
          '; '.join(f"{k}: {'N ≈ %.0f' % v if v is not None else f'none up to N = {s[-1]}'}" for k, v in res['crossover_images'].items()) + '.', '',
          f"At the largest class (N = {s[-1]}), total inference per image (backbone + scoring): full-bank PatchCore takes "
          f"**{res['full_bank_over_moleflow_total_at_largest']:.1f}x** moleflow's (issue 16's target: ≥ 10x).", '',
          '![scaling](results_scaling.png)', '']
    return '\n'.join(L)

def write_figure(res:dict, path:Path):
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    s = res['sizes']
    for k, v in res['patchcore_s'].items(): ax.plot(s, [1000 * x for x in v], 'o-', label=k)
    ax.plot(s, [1000 * res['moleflow_scoring_s']] * len(s), 'k-', lw=2, label='moleflow (flow + router)')
    ax.plot(s, [1000 * res['backbone_s']] * len(s), 'k:', label='backbone (both)')
    for k, v in res['crossover_images'].items():
        if v is not None: ax.axvline(v, color='grey', lw=0.6, ls='--')
    ax.set(xscale='log', yscale='log', xlabel='training images N', ylabel='scoring ms per test image',
           title='Scoring time vs training-set size')
    ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)

def moleflow_seconds(n_test:int, repeat:int) -> tuple[float, float, bool]:
    "Per-image seconds of moleflow's router + flow scoring and of the backbone, default config, and whether real images were used."
    from profile_moleflow import training_setup, DATA
    real = DATA.is_dir()
    ext, test_x, tr, _ = training_setup(make_config('main', {}), real)
    tr.flow.eval()
    with torch.inference_mode():
        x = test_x[:n_test]
        feats = ext(x)
        score = lambda: tr.nll_maps(feats, tr.route(feats))
        return best_seconds(score, repeat) / len(x), best_seconds(lambda: ext(x), repeat) / len(x), real

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', type=int, nargs='+', default=[10, 25, 50, 100, 200, 400, LARGEST_CLASS], help='training-set sizes N (images)')
    ap.add_argument('--n-test', type=int, default=8, help='test images per timed batch')
    ap.add_argument('--repeat', type=int, default=3, help='timed repeats (the best is kept)')
    ap.add_argument('--chunk', type=int, default=256, help='test patches per distance block (memory: chunk x bank floats)')
    ap.add_argument('--out', default=str(ROOT / 'bench' / 'results_scaling'), help='output stem: STEM.json, STEM.md, STEM.png')
    a = ap.parse_args(argv)
    if sorted(a.sizes) != a.sizes or a.sizes[0] < 1: ap.error(f'--sizes must be increasing positive image counts, got {a.sizes}')
    cfg = make_config('main', {})
    load = os.getloadavg()[0]
    mole_s, backbone_s, real = moleflow_seconds(a.n_test, a.repeat)
    grid = cfg.crop_size // 8
    res = measure(a.sizes, grid, cfg.feature_dim, mole_s, backbone_s, a.n_test, a.repeat, a.chunk)
    res.update(date=time.strftime('%Y-%m-%dT%H:%M:%S'), machine=f'{platform.machine()} {platform.processor() or ""}'.strip(),
               threads=torch.get_num_threads(), torch=torch.__version__, code=code_version(), load_average_1min=load,
               dim=cfg.feature_dim, grid=grid, n_test=a.n_test, repeat=a.repeat, real_images_for_moleflow=real)
    out = Path(a.out)
    write_figure(res, out.with_suffix('.png'))
    atomic_write_text(out.with_suffix('.json'), json.dumps(res, indent=1))
    atomic_write_text(out.with_suffix('.md'), to_markdown(res))
    print(to_markdown(res))

if __name__ == '__main__': main()
