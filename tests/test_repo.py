"Repository mechanics: nbdev_clean keeps the papermill tag, notebooks are clean, README is generated."
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat

BIN = Path(sys.executable).parent

def _nb_with_parameters_cell():
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("epochs = 1\nseed = 0", metadata={'tags': ['parameters'], 'scrolled': True,
                                                                          'execution': {'iopub.status.busy': 'x'}})
    params.execution_count = 7
    nb.cells = [nbformat.v4.new_code_cell("#| default_exp tmp"), params]
    nb.metadata = {'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
                   'widgets': {'state': {}}}
    return nb

def test_nbdev_clean_keeps_parameters_tag(repo_root, tmp_path):
    "The papermill `parameters` tag survives nbdev_clean; other cell metadata and execution counts are removed."
    proj = tmp_path/'proj'; (proj/'nbs').mkdir(parents=True)
    shutil.copy(repo_root/'settings.ini', proj/'settings.ini')
    nb_path = proj/'nbs'/'x.ipynb'
    nbformat.write(_nb_with_parameters_cell(), nb_path)
    subprocess.run([str(BIN/'nbdev_clean'), '--fname', str(nb_path)], cwd=proj, check=True)
    cell = json.loads(nb_path.read_text())['cells'][1]
    assert cell['metadata'] == {'tags': ['parameters']}
    assert cell['execution_count'] is None

def test_committed_notebooks_are_clean(repo_root, tmp_path):
    "Every notebook in nbs/ is already in nbdev_clean form (so diffs stay readable)."
    dirty = []
    for nb in sorted((repo_root/'nbs').glob('*.ipynb')):
        copy = tmp_path/nb.name
        shutil.copy(nb, copy)
        subprocess.run([str(BIN/'nbdev_clean'), '--fname', str(copy)], cwd=repo_root, check=True)
        if copy.read_text() != nb.read_text(): dirty.append(nb.name)
    assert not dirty, f"run nbdev_clean on: {dirty}"

def test_readme_is_generated_from_index(repo_root):
    "README.md is exactly what tools/make_readme.py renders from nbs/index.ipynb."
    r = subprocess.run([sys.executable, 'tools/make_readme.py', 'nbs/index.ipynb', 'README.md', '--check'],
                       cwd=repo_root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (repo_root/'README.md').read_text()
    assert 'make demo' in text and 'make test' in text

def test_imports_sit_in_cells_of_their_own(repo_root):
    "nbdev's docs build runs every cell holding an import on its own: such cells must not also use earlier names."
    import re
    imp = re.compile(r'^\s*(import |from \S+ import )')
    mixed = []
    for nb_path in sorted((repo_root/'nbs').rglob('*.ipynb')):
        for i, cell in enumerate(nbformat.read(nb_path, as_version=4).cells):
            if cell.cell_type != 'code' or re.search(r'^#\|\s*export', cell.source, re.M): continue
            code = [l for l in cell.source.splitlines() if l.strip() and not l.startswith('#')]
            imports = [l for l in code if imp.match(l)]
            if imports and len(imports) < len(code): mixed.append(f"{nb_path.relative_to(repo_root)} cell {i}")
    assert not mixed, "move the imports of these cells into a cell of their own: " + ', '.join(mixed)

def test_index_tables_come_from_the_study(repo_root, monkeypatch):
    "The result tables of index.ipynb (and so of the README) are its `#| echo: false` cells' outputs, and re-running them on the committed study gives exactly the committed outputs."
    from execnb.shell import CaptureShell
    nb = nbformat.read(repo_root/'nbs'/'index.ipynb', as_version=4)
    tables = [c for c in nb.cells if c.cell_type == 'code' and '#| echo: false' in c.source]
    assert len(tables) >= 2, 'index.ipynb shows its result tables through `#| echo: false` cells'
    committed = [''.join(c.outputs[0]['data']['text/markdown']) for c in tables]
    assert all('| **mean** |' in t for t in committed)
    monkeypatch.chdir(repo_root/'nbs')   # the notebook reads the study relative to nbs/, as nbdev_test runs it
    shell = CaptureShell()
    for c in nb.cells:
        if c.cell_type == 'code' and 'echo: false' not in c.source: shell.run(c.source)
    text = lambda md: md if isinstance(md, str) else ''.join(md)   # execnb keeps lines, nbformat joins them
    fresh = [text(shell.run(c.source)[0]['data']['text/markdown']) for c in tables]
    assert fresh == committed, 'index.ipynb shows stale tables: re-run it (nbdev_test keeps no outputs) and `make readme`'

def test_results_are_not_ignored(repo_root):
    "Nothing under results/ (the committed study data the pages read) is matched by an ignore rule."
    files = [str(p.relative_to(repo_root)) for p in (repo_root/'results').rglob('*') if p.is_file()]
    assert files, 'results/ holds the committed study data'
    r = subprocess.run(['git', 'check-ignore', '--no-index', '--stdin'], cwd=repo_root, input='\n'.join(files),
                       capture_output=True, text=True)
    assert r.stdout.split() == [], f'ignored result files: {r.stdout.split()[:5]}'
