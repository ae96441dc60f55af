"Experts in parallel on a real Dask LocalCluster: bit-identical to the serial run, resumable, clear errors."
import importlib.util, json, subprocess, sys, time
from pathlib import Path
import pytest, torch
from moleflow.config import make_config
from moleflow.run import run_continual, RunError
from moleflow.parallel import run_parallel

pytestmark = pytest.mark.skipif(importlib.util.find_spec('distributed') is None, reason="the [cluster] extra (Dask) is not installed")
TASKS = [['fabric'], ['wood'], ['screw']]

def fast_cfg(cache_dir, **kw):
    "The `fast` preset on random-weight ResNet-18 features of 64-pixel images."
    return make_config('fast', dict(backbone='resnet18', backbone_weights=None, image_size=64, crop_size=64, cache_dir=cache_dir, **kw))

def _untimed(m):
    "metrics.json without its timings (the epoch records keep everything but their seconds)."
    out = {k: v for k, v in m.items() if k not in ('timing', 'history')}
    out['history'] = [[{k: v for k, v in r.items() if k != 'seconds'} for r in h] for h in m['history']]
    return out

def _ckpt(run, t): return torch.load(Path(run)/'checkpoints'/f'task_{t:02d}.pt', weights_only=False)

def assert_same_run(a, b, tasks=3):
    "Same metrics (but timings) and, after every task, the same flow weights, router, optimizer state and result rows."
    assert _untimed(json.loads((Path(a)/'metrics.json').read_text())) == _untimed(json.loads((Path(b)/'metrics.json').read_text()))
    for t in range(tasks):
        ca, cb = _ckpt(a, t), _ckpt(b, t)
        fa, fb = ca['trainer']['flow'], cb['trainer']['flow']
        assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fa), t
        ra, rb = ca['trainer']['router']['prototypes'], cb['trainer']['router']['prototypes']
        assert len(ra) == len(rb) and all(torch.equal(p[k], q[k]) if torch.is_tensor(p[k]) else p[k] == q[k]
                                          for p, q in zip(ra, rb) for k in p), t
        sa, sb = ca['optimizer']['state'], cb['optimizer']['state']
        assert set(sa) == set(sb) and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), t
        assert ca['rows'] == cb['rows'], t

def test_parallel_training_is_bit_identical_to_serial(generated_root, cache_dir, tmp_path):
    "Tasks 1 and 2 on two Dask worker processes (one thread each, as the serial run here), with a quarter of each class held out for its threshold: every number and weight equal."
    cfg = fast_cfg(cache_dir, threshold_holdout=0.25)
    run_continual(cfg, generated_root, TASKS, tmp_path/'serial', progress=False, figures=False)
    m = run_parallel(cfg, generated_root, TASKS, tmp_path/'parallel', scheduler='local:2', progress=False)
    assert_same_run(tmp_path/'serial', tmp_path/'parallel')
    assert {'R_pixel_auroc.png', 'loss_curves.png', 'anomaly_maps_task2.png'} <= {p.name for p in (tmp_path/'parallel'/'figures').iterdir()}
    assert len(m['timing']['train_s_per_task']) == 3 and all(s > 0 for s in m['timing']['train_s_per_task'])
    assert 'expert trained on a worker' in (tmp_path/'parallel'/'train.log').read_text()

def test_resume_keeps_the_finished_experts(generated_root, cache_dir, tmp_path):
    "Killed after task 1 with task 2's expert already trained: --resume installs that expert as it is and ends like the serial run."
    cfg = fast_cfg(cache_dir)
    run = tmp_path/'run'
    expert2 = run/'experts'/'task_02.pt'
    def kill_after_task_1(t):
        if t != 1: return
        for _ in range(600):
            if expert2.exists(): break
            time.sleep(0.1)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_parallel(cfg, generated_root, TASKS, run, scheduler='local:2', progress=False, figures=False, on_task_end=kill_after_task_1)
    assert not (run/'metrics.json').exists() and expert2.is_file()
    before = (expert2.stat().st_mtime_ns, expert2.read_bytes())
    run_parallel(None, None, None, run, scheduler='local:2', resume=True, progress=False, figures=False)
    assert (expert2.stat().st_mtime_ns, expert2.read_bytes()) == before      # kept, not trained again
    run_continual(cfg, generated_root, TASKS, tmp_path/'serial', progress=False, figures=False)
    assert_same_run(tmp_path/'serial', run)

def test_bad_requests_are_clear_and_write_nothing(generated_root, cache_dir, tmp_path):
    with pytest.raises(RunError, match='train this config serially'):
        run_parallel(fast_cfg(cache_dir, slow_stage_fraction=0.5), generated_root, TASKS, tmp_path/'slow', progress=False)
    with pytest.raises(ValueError, match='local:N needs a positive whole number'):
        run_parallel(fast_cfg(cache_dir), generated_root, TASKS, tmp_path/'zero', scheduler='local:0', progress=False)
    r = subprocess.run([str(Path(sys.executable).parent/'moleflow'), 'train', '--data-root', str(generated_root), '--tasks', 'fabric',
                        'wood', '--out', str(tmp_path/'cli'), '--workers', '0'], capture_output=True, text=True)
    assert r.returncode == 2 and '--workers must be at least 1, got 0' in r.stderr, r.stderr
    if not torch.cuda.is_available():   # CI has no GPU: asking for one is a clear error before anything is written
        r = subprocess.run([str(Path(sys.executable).parent/'moleflow'), 'train', '--data-root', str(generated_root), '--tasks',
                            'fabric', 'wood', '--out', str(tmp_path/'cli'), '--workers', '2', '--device', 'cuda'], capture_output=True, text=True)
        assert r.returncode == 2 and 'torch sees no CUDA GPU' in r.stderr, r.stderr
    assert not any((tmp_path/n).exists() for n in ('slow', 'zero', 'cli'))
