"Batch runs end to end: the ratio notebook over a grid with papermill, resume after a kill, failures, the CLI."
import csv, json, subprocess, sys, time
from pathlib import Path
import nbformat, pytest
from moleflow.sweep import run_sweep, parse_grid

BIN = Path(sys.executable).parent

def test_ratio_sweep_end_to_end_and_resume(repo_root, generated_root, cache_dir, tmp_path):
    "Notebook 16 over 2 ratios x 2 seeds on generated data; a second call skips everything, a killed combination reruns alone."
    nb = repo_root/'nbs'/'16_topk_ratio_ablation.ipynb'
    grid = parse_grid(['ratios=0.02,0.2', 'seeds=0,1'])
    params = dict(data_root=str(generated_root), classes=['fabric'], backbone='resnet18', backbone_weights=None,
                  image_size=64, crop_size=64, epochs=1, cache_dir=cache_dir, n_boot=50,
                  overrides=dict(feature_dim=32, num_coupling_layers=2, subnet_hidden=32, lora_rank=4, lora_alpha=4.0, batch_size=4))
    out = tmp_path/'sweep'
    r = run_sweep(nb, grid, out, params=params, workers=2, log=lambda *a: None)
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

def toy_notebook(path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1\nnap = 0\nout_dir = None", metadata={'tags': ['parameters']}),
                nbformat.v4.new_code_cell(
                    "import json, pathlib, time\ntime.sleep(nap)\n"
                    "if x < 0: raise ValueError(f'x must be >= 0, got {x}')\n"
                    "pathlib.Path(out_dir, 'results.json').write_text(json.dumps({'notebook': 'toy', 'parameters': {}, "
                    "'summary': {'y': x}, 'hypotheses': {}}))")]
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'python3', 'language': 'python'}}
    nbformat.write(nb, path)
    return path

def test_cli_reports_failures_and_keeps_going(tmp_path):
    nb = toy_notebook(tmp_path/'toy.ipynb')
    r = subprocess.run([str(BIN/'moleflow'), 'sweep', str(nb), '--grid', 'x=-1,2,3', '--out', str(tmp_path/'s'), '--workers', '2'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert 'toy/x=-1' in r.stderr and 'ValueError: x must be >= 0, got -1' in r.stderr
    ys = sorted(float(row['value']) for row in csv.DictReader(open(tmp_path/'s'/'results.csv')))
    assert ys == [2.0, 3.0]
    bad = subprocess.run([str(BIN/'moleflow'), 'sweep', str(nb), '--grid', 'z=1', '--out', str(tmp_path/'t')],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'z' is not a parameter" in bad.stderr and not (tmp_path/'t').exists()

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
