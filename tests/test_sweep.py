"Batch runs end to end: the ratio notebook over a grid with papermill, resume after a kill, failures, the CLI, Dask."
import csv, importlib.util, json, os, signal, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
from moleflow.sweep import run_sweep, parse_grid

BIN = Path(sys.executable).parent
needs_dask = pytest.mark.skipif(importlib.util.find_spec('distributed') is None, reason="the [cluster] extra (Dask) is not installed")

@needs_dask
def test_ratio_sweep_end_to_end_and_resume(repo_root, generated_root, cache_dir, tmp_path):
    "Notebook 16 over 2 ratios x 2 seeds on generated data; a second call skips everything, a killed combination reruns alone."
    nb = repo_root/'nbs'/'16_topk_ratio_ablation.ipynb'
    grid = parse_grid(['ratios=0.02,0.2', 'seeds=0,1'])
    params = dict(data_root=str(generated_root), classes=['fabric'], backbone='resnet18', backbone_weights=None,
                  image_size=64, crop_size=64, epochs=1, cache_dir=cache_dir, n_boot=50,
                  overrides=dict(feature_dim=32, num_coupling_layers=2, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, batch_size=4))
    out = tmp_path/'sweep'
    r = run_sweep(nb, grid, out, params=params, scheduler='local:2', log=lambda *a: None)
    assert not r['failed'], r['failed']
    names = sorted(f"16_topk_ratio_ablation/ratios={a}__seeds={s}" for a in (0.02, 0.2) for s in (0, 1))
    assert sorted(r['ok']) == names
    for n in names:
        folder = out/n
        assert (folder/'executed.ipynb').is_file() and (folder/'ratio_ablation.png').is_file()
        res = json.loads((folder/'results.json').read_text())
        assert res['parameters']['out_dir'] == str(folder.resolve())
    rows = list(csv.DictReader(open(out/'results.csv')))
    ap = {(row['ratios'], row['seeds']): float(row['value']) for row in rows if row['metric'] == 'summary.pixel_ap'}
    assert sorted(ap) == [('0.02', '0'), ('0.02', '1'), ('0.2', '0'), ('0.2', '1')] and all(0 < v <= 1 for v in ap.values())
    verdicts = list(csv.DictReader(open(out/'verdicts.csv')))
    assert {v['hypothesis'] for v in verdicts} == {'H5'} and {v['verdict'] for v in verdicts} == {'inconclusive'}   # one ratio per run
    assert (out/'16_topk_ratio_ablation'/'summary.png').is_file()
    # resume: nothing to do ...
    t0 = time.time()
    r2 = run_sweep(nb, grid, out, params=params, log=lambda *a: None)
    assert sorted(r2['skipped']) == names and not r2['ok'] and time.time() - t0 < 30
    # ... and a combination killed mid-run (status 'running', no results) is the only one that runs again
    killed = out/names[0]
    (killed/'results.json').unlink()
    s = json.loads((killed/'status.json').read_text()); s['status'] = 'running'; (killed/'status.json').write_text(json.dumps(s))
    r3 = run_sweep(nb, grid, out, params=params, log=lambda *a: None)
    assert r3['ok'] == [names[0]] and len(r3['skipped']) == 3

def two_cell_notebook(path, parameters, body):
    "A notebook of a papermill `parameters` cell and one body cell, written to `path`."
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(parameters, metadata={'tags': ['parameters']}), nbformat.v4.new_code_cell(body)]
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    nbformat.write(nb, path)

def toy_notebook(path):
    two_cell_notebook(path, "x = 1\nnap = 0\nout_dir = None",
                      "import json, pathlib, time\ntime.sleep(nap)\n"
                      "if x < 0: raise ValueError(f'x must be >= 0, got {x}')\n"
                      "import os; pathlib.Path(out_dir, 'env.json').write_text(json.dumps(dict(os.environ)))\n"
                      "pathlib.Path(out_dir, 'results.json').write_text(json.dumps({'notebook': 'toy', 'parameters': {}, "
                      "'summary': {'y': x}, 'hypotheses': {}}))")
    return path

def test_cli_reports_failures_and_keeps_going(tmp_path):
    nb = toy_notebook(tmp_path/'toy.ipynb')
    r = subprocess.run([str(BIN/'moleflow'), 'sweep', str(nb), '--grid', 'x=-1,2,3', '--out', str(tmp_path/'s')],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert 'toy/x=-1' in r.stderr and 'ValueError: x must be >= 0, got -1' in r.stderr
    ys = sorted(float(row['value']) for row in csv.DictReader(open(tmp_path/'s'/'results.csv')))
    assert ys == [2.0, 3.0]
    for args, msg in ((['--grid', 'z=1'], "'z' is not a parameter"), (['--workers', '0'], '--workers must be at least 1, got 0'),
                      (['--scheduler', 'local:0'], 'local:N needs a positive whole number')):
        bad = subprocess.run([str(BIN/'moleflow'), 'sweep', str(nb), *args, '--out', str(tmp_path/'t')], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and msg in bad.stderr and not (tmp_path/'t').exists(), bad.stderr

def test_timeout_stops_the_combination(tmp_path):
    nb = toy_notebook(tmp_path/'toy.ipynb')
    r = run_sweep(nb, {'nap': [120]}, tmp_path/'s', timeout=15, log=lambda *a: None)
    assert r['failed'] and r['failed'][0]['error'] == 'timed out after 15 s'
    status = json.loads((tmp_path/'s'/'toy'/'nap=120'/'status.json').read_text())
    assert status['status'] == 'failed'

def test_interrupting_the_sweep_stops_its_notebooks(tmp_path):
    "Ctrl-C on `moleflow sweep` stops the running papermill process and its kernel; the combination reruns next time."
    import os, signal
    nb = toy_notebook(tmp_path/'toy.ipynb')
    # a shell's background job inherits SIGINT ignored (and Python then keeps ignoring it): restore the default
    proc = subprocess.Popen([str(BIN/'moleflow'), 'sweep', str(nb), '--grid', 'nap=300', '--out', str(tmp_path/'s')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    status = tmp_path/'s'/'toy'/'nap=300'/'status.json'
    for _ in range(120):
        if status.exists() and 'pid' in json.loads(status.read_text()): break
        time.sleep(0.5)
    pid = json.loads(status.read_text())['pid']
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    with pytest.raises(ProcessLookupError): os.kill(pid, 0)
    assert json.loads(status.read_text())['status'] == 'failed'

def test_changed_notebook_is_not_reused(tmp_path):
    "A finished combination records the hashes of its notebook and of moleflow; after an edit of the notebook it is refused."
    nb = toy_notebook(tmp_path/'toy.ipynb')
    r = run_sweep(nb, {'x': [1]}, tmp_path/'s', log=lambda *a: None)
    assert r['ok'] == ['toy/x=1']
    status = json.loads((tmp_path/'s'/'toy'/'x=1'/'status.json').read_text())
    assert set(status['code']) == {'notebook', 'moleflow'}
    book = nbformat.read(nb, as_version=4); book.cells[1].source += "\n# edited"; nbformat.write(book, nb)
    with pytest.raises(ValueError, match=r"1 finished combination\(s\) .* ran with another version .*toy/x=1"):
        run_sweep(nb, {'x': [1]}, tmp_path/'s', log=lambda *a: None)
    assert (tmp_path/'s'/'toy'/'x=1'/'results.json').is_file()   # nothing finished is lost

@needs_dask
def test_dask_sweep_matches_the_serial_sweep(tmp_path):
    "A 2 x 2 sweep on two Dask worker processes (local:2, and a LocalCluster joined by address) gives the serial sweep's CSV."
    from distributed import LocalCluster
    nb = toy_notebook(tmp_path/'toy.ipynb')
    grid = {'x': [1, 2], 'nap': [0, 1]}
    serial = run_sweep(nb, grid, tmp_path/'serial', log=lambda *a: None)
    local2 = run_sweep(nb, grid, tmp_path/'local2', scheduler='local:2', log=lambda *a: None)
    assert len(serial['ok']) == len(local2['ok']) == 4 and not local2['failed']
    assert (tmp_path/'local2'/'results.csv').read_text() == (tmp_path/'serial'/'results.csv').read_text()
    env = json.loads((tmp_path/'local2'/'toy'/'x=1__nap=0'/'env.json').read_text())
    assert env['OMP_NUM_THREADS'] == os.environ.get('OMP_NUM_THREADS', str(max(1, os.cpu_count() // 2)))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        grid3 = {'x': [1, 2, -1], 'nap': [0, 1]}
        joined = run_sweep(nb, grid3, tmp_path/'serial', scheduler=cluster.scheduler_address, log=lambda *a: None)
        assert sorted(joined['skipped']) == sorted(serial['ok'])                     # resumed: only the new combinations ran
        assert joined['ok'] == []
        assert sorted(f['combination'] for f in joined['failed']) == ['toy/x=-1__nap=0', 'toy/x=-1__nap=1']
        assert all('ValueError: x must be >= 0, got -1' in f['error'] for f in joined['failed'])
        assert cluster.scheduler_info['workers'], "a joined cluster is left running"

@needs_dask
def test_bad_schedulers_are_clear_errors(tmp_path):
    nb = toy_notebook(tmp_path/'toy.ipynb')
    run_sweep(nb, {'x': [1]}, tmp_path/'s', log=lambda *a: None)
    before = (tmp_path/'s'/'toy'/'x=1'/'results.json').read_text()
    with pytest.raises(ValueError, match="'tcp://127.0.0.1:9': no Dask scheduler answered"):
        run_sweep(nb, {'x': [1, 2]}, tmp_path/'s', scheduler='tcp://127.0.0.1:9', log=lambda *a: None)
    assert (tmp_path/'s'/'toy'/'x=1'/'results.json').read_text() == before and not (tmp_path/'s'/'toy'/'x=2').exists()
    cfg = tmp_path/'slurm.yaml'; cfg.write_text('partition: cpu\ncores: 4\nmemory: 8GB\nwalltime: "01:00:00"\nnodes: 2\n')
    with pytest.raises(ValueError, match=r"SLURM config .*slurm.yaml: unknown key 'nodes'"):
        run_sweep(nb, {'x': [2]}, tmp_path/'t', scheduler=f'slurm:{cfg}', log=lambda *a: None)
    assert not (tmp_path/'t').exists()

@needs_dask
def test_interrupting_a_dask_sweep_stops_its_notebooks(tmp_path):
    "Ctrl-C on a sweep over two Dask workers stops both papermill processes in the workers; both combinations are marked failed."
    nb = toy_notebook(tmp_path/'toy.ipynb')
    proc = subprocess.Popen([str(BIN/'moleflow'), 'sweep', str(nb), '--grid', 'nap=300,301', '--out', str(tmp_path/'s'), '--workers', '2'],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    statuses = [tmp_path/'s'/'toy'/f'nap={n}'/'status.json' for n in (300, 301)]
    for _ in range(240):
        if all(p.exists() and 'pid' in json.loads(p.read_text()) for p in statuses): break
        time.sleep(0.5)
    pids = [json.loads(p.read_text())['pid'] for p in statuses]
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and 'interrupted' in err, err
    for pid in pids:
        with pytest.raises(ProcessLookupError): os.kill(pid, 0)
    for p in statuses:
        s = json.loads(p.read_text())
        assert s['status'] == 'failed' and s['error'] == 'stopped: the sweep was interrupted', s

@needs_dask
def test_a_worker_without_moleflow_is_named(tmp_path):
    "A real Dask worker whose moleflow cannot be imported: the sweep names it before sending any job, and writes nothing."
    from distributed import Client, LocalCluster
    broken = tmp_path/'broken'/'moleflow'; broken.mkdir(parents=True)
    (broken/'__init__.py').write_text("raise ImportError('this moleflow is broken on purpose')")
    nb = toy_notebook(tmp_path/'toy.ipynb')
    with LocalCluster(n_workers=0, dashboard_address=None) as cluster:
        code = f"import sys; sys.path.insert(0, {str(broken.parent)!r}); from distributed.cli.dask_worker import main; main()"
        worker = subprocess.Popen([sys.executable, '-c', code, cluster.scheduler_address, '--nthreads', '1', '--no-nanny'],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(cluster) as c: c.wait_for_workers(1, timeout=120)
            with pytest.raises(ValueError, match=r"cannot import moleflow \(ImportError: this moleflow is broken on purpose\)"):
                run_sweep(nb, {'x': [1]}, tmp_path/'s', scheduler=cluster.scheduler_address, log=lambda *a: None)
        finally:
            worker.terminate(); worker.wait(30)
    assert not (tmp_path/'s'/'toy').exists()

@needs_dask
def test_a_dying_worker_is_reported_by_name(tmp_path):
    "The notebook of x=-2 kills the Dask worker running it: that combination is reported (KilledWorker), the other finishes."
    import dask
    two_cell_notebook(tmp_path/'die.ipynb', "x = 1\nout_dir = None",
                      "import json, os, pathlib, signal\n"
                      "if x == -2:   # kernel -> papermill -> the Dask worker process\n"
                      "    worker = int(open(f'/proc/{os.getppid()}/stat').read().split(')')[1].split()[1])   # papermill's parent\n"
                      "    os.kill(worker, signal.SIGKILL); os._exit(1)\n"
                      "pathlib.Path(out_dir, 'results.json').write_text(json.dumps({'summary': {'y': x}}))")
    with dask.config.set({'distributed.scheduler.allowed-failures': 0}):   # give up at the first death
        r = run_sweep(tmp_path/'die.ipynb', {'x': [-2, 3]}, tmp_path/'s', scheduler='local:2', log=lambda *a: None)
    assert r['ok'] == ['die/x=3']
    assert [f['combination'] for f in r['failed']] == ['die/x=-2'] and 'KilledWorker' in r['failed'][0]['error'], r['failed']
