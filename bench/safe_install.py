"""Install the `[bench]` extra (anomalib) into the project venv only if it leaves moleflow's runtime untouched.

Run from the repository root: `.venv/bin/python bench/safe_install.py [--dry-run]`. pip first resolves the install
with `--dry-run --report`; if any protected package (every package of settings.ini's `requirements`, the lite0 weights
package among them, and of its `dev_requirements`, read from the file) would change version, nothing is installed and
the script exits 1 naming them (add a pin to constraints.txt or to `bench_requirements` in settings.ini). Otherwise it installs `-e .[bench] -c constraints.txt`.
"""
import argparse, configparser, json, re, subprocess, sys, tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def _norm(n): return n.lower().replace('_', '-')

def protected(settings=ROOT / 'settings.ini') -> tuple[str, ...]:
    "The packages moleflow runs and is tested with: the names in settings.ini's `requirements` and `dev_requirements`."
    ini = configparser.ConfigParser(); ini.read(settings)
    specs = ' '.join(ini['DEFAULT'].get(k, '') for k in ('requirements', 'dev_requirements')).split()
    return tuple(dict.fromkeys(_norm(re.split(r'[\[<>=!~;]', s, maxsplit=1)[0]) for s in specs))

PROTECTED = protected()

def installed():
    return {_norm(d.metadata['Name']): d.version for d in metadata.distributions() if d.metadata['Name']}

def plan(spec='.[bench]'):
    "What pip would install for `-e spec`: {name: version}, from `pip install --dry-run --report`."
    with tempfile.TemporaryDirectory() as td:
        rep = Path(td) / 'report.json'
        cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--dry-run', '--report', str(rep), '-c', 'constraints.txt', '-e', spec]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode: sys.exit(f"pip dry run failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        items = json.loads(rep.read_text())['install']
    return {_norm(i['metadata']['name']): i['metadata']['version'] for i in items}

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--dry-run', action='store_true', help='only report what would change')
    a = ap.parse_args()
    have, want = installed(), plan()
    changed = {n: (have[n], v) for n, v in want.items() if n in have and have[n] != v and n != 'moleflow'}
    added = {n: v for n, v in want.items() if n not in have}
    bad = {n: c for n, c in changed.items() if n in PROTECTED}
    print(f"pip dry run: {len(added)} new packages, {len(changed)} version changes")
    for n, v in sorted(added.items()): print(f"  + {n}=={v}")
    for n, (o, v) in sorted(changed.items()): print(f"  ~ {n} {o} -> {v}{'   (PROTECTED)' if n in bad else ''}")
    if bad:
        sys.exit(f"refusing to install: it would change {', '.join(bad)}, which moleflow uses at runtime; "
                 f"pin them in constraints.txt or in bench_requirements (settings.ini)")
    if a.dry_run: return
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-c', 'constraints.txt', '-e', '.[bench]'], cwd=ROOT, check=True)
    v = installed()
    assert all(v.get(n) == have.get(n) for n in PROTECTED), "a protected package changed during the install"
    print(f"installed anomalib {v.get('anomalib')}; protected packages unchanged")

if __name__ == '__main__': main()
