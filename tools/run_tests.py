"""Run every notebook with nbdev_test and the pytest suite; print one closing `N passed, N failed` line.

Notebooks run two at a time (this machine has 2 cores), each in its own `nbdev_test --path` process so a
failure names its notebook. Extra arguments are passed to pytest.
"""
import os, subprocess, sys, time, xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def notebooks():
    "Notebooks nbdev_test would run: nbs/**/*.ipynb except private (_*) and checkpoint files."
    return sorted(p for p in (ROOT/'nbs').rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(ROOT/'nbs').parts))

def run_notebook(nb):
    t0 = time.time()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}   # two notebooks share the two cores
    r = subprocess.run([str(BIN/'nbdev_test'), '--path', str(nb)], cwd=ROOT, capture_output=True, text=True, env=env)
    return nb, r.returncode == 0, time.time() - t0, (r.stdout + r.stderr)

def main(pytest_args):
    env_note = os.environ.get('HF_HUB_OFFLINE')
    nbs = notebooks()
    print(f"== notebooks: {len(nbs)} (HF_HUB_OFFLINE={env_note})", flush=True)
    nb_pass = nb_fail = 0
    with ThreadPoolExecutor(max_workers=2) as ex:
        for nb, ok, secs, out in ex.map(run_notebook, nbs):
            print(f"{'PASS' if ok else 'FAIL'} {nb.relative_to(ROOT)} ({secs:.1f}s)", flush=True)
            if ok: nb_pass += 1
            else:
                nb_fail += 1
                print(out[-6000:], flush=True)
    print("== pytest", flush=True)
    junit = ROOT/'.pytest_cache'/'junit.xml'
    junit.parent.mkdir(exist_ok=True)
    rc = subprocess.run([str(BIN/'python'), '-m', 'pytest', 'tests', '-q', '-rs', '--durations=15', f'--junitxml={junit}', *pytest_args],
                        cwd=ROOT).returncode
    py_pass = py_fail = py_skip = 0
    if junit.exists():
        for suite in ET.parse(junit).getroot().iter('testsuite'):
            tests, fails = int(suite.get('tests', 0)), int(suite.get('failures', 0)) + int(suite.get('errors', 0))
            skips = int(suite.get('skipped', 0))
            py_pass += tests - fails - skips; py_fail += fails; py_skip += skips
    if rc not in (0, 5) and py_fail == 0: py_fail = 1   # pytest broke before reporting (collection or usage error)
    if rc == 5: print("pytest collected no tests")
    passed, failed = nb_pass + py_pass, nb_fail + py_fail
    print(f"notebooks: {nb_pass} passed, {nb_fail} failed; pytest: {py_pass} passed, {py_fail} failed, {py_skip} skipped")
    print(f"total: {passed} passed, {failed} failed, {py_skip} skipped")
    sys.exit(1 if failed else 0)

if __name__ == '__main__': main(sys.argv[1:])
