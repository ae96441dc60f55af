"""Wall time of parallel work against serial, each pair measured in this one run (a ratio, not a timed test).

Run from the repository root: `.venv/bin/python bench/bench_parallel.py [--smoke] [--out bench/results_parallel]`.
1. `moleflow train` of the 4 generated demo tasks (fabric, screw, wood, pill) with `--workers 2` against the serial run
   (task 0 trains alone in both; tasks 1-3 share the two workers, so the ceiling is (1 + 3) / (1 + 2) = 1.33x of the
   training time on two workers, more where evaluation overlaps);
2. `moleflow sweep` of notebook 16 over 2 ratios x 2 seeds with `--scheduler local:2` against `local:1`.
Serial runs get every core (`OMP_NUM_THREADS = cores`), N workers `cores // N` each. The feature cache is filled first,
so neither side pays for extraction. Writes OUT.json and OUT.md; `--smoke` runs tiny settings into a temporary folder.
"""
import argparse, csv, json, os, platform, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TASKS = ['fabric', 'screw', 'wood', 'pill']

def _env(threads):
    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')}
    return {**env, 'HF_HUB_OFFLINE': '1', **({'OMP_NUM_THREADS': str(threads), 'MKL_NUM_THREADS': str(threads)} if threads else {})}

def _timed(cmd, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode: sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0

def bench_train(work: Path, data: Path, sets: list, workers: int) -> dict:
    cores = os.cpu_count() or 1
    base = [str(BIN/'moleflow'), 'train', '--data-root', str(data), '--tasks', *TASKS, *sets]
    # fill the feature cache with a one-epoch run, so the timed runs only read features
    _timed(base + ['--out', str(work/'warm'), '--set', 'epochs=1'], _env(cores))
    serial = _timed(base + ['--out', str(work/'serial')], _env(cores))
    parallel = _timed(base + ['--out', str(work/'parallel'), '--workers', str(workers)], _env(max(1, cores // workers)))
    ser, par = (json.loads((work/f/'metrics.json').read_text())['matrix'] for f in ('serial', 'parallel'))
    diffs = [abs(a - b) for k in ser for ra, rb in zip(ser[k], par[k]) for a, b in zip(ra, rb) if a is not None and b is not None]
    return dict(serial_s=round(serial, 1), parallel_s=round(parallel, 1), speedup=round(serial / parallel, 2), workers=workers,
                same_r_matrices=ser == par,   # the serial run uses every core's threads, each worker fewer: the last digits may differ
                r_max_abs_diff=max(diffs, default=0.0))

def bench_sweep(work: Path, data: Path, params: list, workers: int) -> dict:
    base = [str(BIN/'moleflow'), 'sweep', str(ROOT/'nbs'/'16_topk_ratio_ablation.ipynb'), '--grid', 'ratios=0.02,0.2',
            '--grid', 'seeds=0,1', '--param', f'data_root={data}', *params]
    warm = [x.replace('ratios=0.02,0.2', 'ratios=0.02').replace('seeds=0,1', 'seeds=0') for x in base]
    _timed(warm + ['--out', str(work/'sweep0')], _env(None))   # fills the feature cache
    serial = _timed(base + ['--out', str(work/'sweep1'), '--scheduler', 'local:1'], _env(None))
    parallel = _timed(base + ['--out', str(work/'sweep2'), '--scheduler', f'local:{workers}'], _env(None))
    rows = [{(r['combination'], r['metric']): float(r['value']) for r in csv.DictReader(open(work/f/'results.csv'))}
            for f in ('sweep1', 'sweep2')]
    return dict(serial_s=round(serial, 1), parallel_s=round(parallel, 1), speedup=round(serial / parallel, 2), workers=workers,
                same_rows=set(rows[0]) == set(rows[1]),   # the values differ in the last digits: other thread counts
                max_abs_diff=max((abs(rows[0][k] - rows[1][k]) for k in rows[0] if k in rows[1] and 'second' not in k[1]), default=0.0))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--smoke', action='store_true', help='tiny settings into a temporary folder: checks that the script runs')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--epochs', type=int, default=8, help='epochs per task of the training benchmark (fast preset)')
    ap.add_argument('--out', default=str(ROOT/'bench'/'results_parallel'), help='OUT.json and OUT.md are written')
    a = ap.parse_args()
    from moleflow.synthetic import generate_default_dataset
    with tempfile.TemporaryDirectory(prefix='moleflow-bench-parallel-') as td:
        work = Path(td)
        cache = ['--set', f'cache_dir={work/"cache"}']
        if a.smoke:
            data = generate_default_dataset(work/'data', n_train=8, n_test_good=2, n_test_defect=3, classes=TASKS)
            tiny = ['backbone=resnet18', 'backbone_weights=none', 'image_size=64', 'crop_size=64', 'feature_dim=32',
                    'num_coupling_layers=2', 'subnet_hidden=32', 'epochs=1']
            sets = cache + [x for s in tiny for x in ('--set', s)]
            params = ['--param', 'classes=[fabric]', '--param', 'backbone=resnet18', '--param', 'backbone_weights=null',
                      '--param', 'image_size=64', '--param', 'crop_size=64', '--param', 'epochs=1', '--param', 'n_boot=20',
                      '--param', f'cache_dir={work/"cache"}', '--param',
                      'overrides={feature_dim: 32, num_coupling_layers: 2, subnet_hidden: 32, lora_rank: 4, lora_alpha: 4.0, batch_size: 4}']
        else:
            data = generate_default_dataset(work/'data', classes=TASKS)
            sets = cache + ['--preset', 'fast', '--set', f'epochs={a.epochs}']
            params = ['--param', 'classes=[fabric]', '--param', 'image_size=128', '--param', 'crop_size=128', '--param', 'epochs=4',
                      '--param', f'cache_dir={work/"cache"}', '--param',
                      'overrides={feature_dim: 64, num_coupling_layers: 4, subnet_hidden: 64, lora_rank: 4, lora_alpha: 4.0}']
        res = dict(machine=dict(cores=os.cpu_count(), platform=platform.platform()), smoke=a.smoke,
                   train=bench_train(work, data, sets, a.workers), sweep=bench_sweep(work, data, params, a.workers))
    out = Path(tempfile.mkdtemp(prefix='moleflow-bench-smoke-'))/'results_parallel' if a.smoke else Path(a.out)
    from moleflow.files import atomic_write_text
    atomic_write_text(out.with_suffix('.json'), json.dumps(res, indent=1) + '\n')
    t, s = res['train'], res['sweep']
    md = ("| what | serial (s) | parallel (s) | speed-up | same result |\n|---|---|---|---|---|\n"
          f"| train, 4 tasks, --workers {t['workers']} | {t['serial_s']} | {t['parallel_s']} | {t['speedup']}x | "
          f"R matrices {'equal' if t['same_r_matrices'] else 'differ'}, max difference {t['r_max_abs_diff']:.2g} |\n"
          f"| sweep, 4 combinations, local:{s['workers']} vs local:1 | {s['serial_s']} | {s['parallel_s']} | {s['speedup']}x | "
          f"{'same rows' if s['same_rows'] else 'other rows'}, max difference {s['max_abs_diff']:.2g} |\n")
    atomic_write_text(out.with_suffix('.md'), f"Parallel vs serial on {os.cpu_count()} cores (bench/bench_parallel.py{' --smoke' if a.smoke else ''}).\n\n" + md)
    print(md); print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.md')}")

if __name__ == '__main__': main()
