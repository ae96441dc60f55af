"""Build the documentation site into `_docs/` from the notebooks in `nbs/`, and check it.

Two engines, same sources (`nbs/_quarto.yml`, `nbs/nbdev.yml`, `nbs/sidebar.yml`, the notebooks), same site:
- `quarto` (when `quarto` is on PATH): `nbdev_docs`, the standard nbdev flow.
- `smalldocs` (everywhere else): the notebooks are processed exactly as `nbdev_proc_nbs` does (into `_proc/`, with the
  `show_doc` API entries rendered), then the processed project is rendered by `smalldocs`, which builds Quarto websites
  from `_quarto.yml` in pure Python. Pages go where Quarto puts them (nbdev's `output-file`, e.g. `lora.html`).

The sidebar and the navbar menus are written to `nbs/sidebar.yml` from the notebooks present: `nbs/tutorials/` is
Tutorials, numbered notebooks `0x_*` are the Library, `1x_*` and above (or `nbs/analysis/`) are Analysis.

    python tools/build_docs.py                    # build with the engine found; exit 1 on any problem
    python tools/build_docs.py --engine smalldocs # force the pure-Python engine
    python tools/build_docs.py --sidebar          # only rewrite nbs/sidebar.yml
    python tools/build_docs.py --check            # only check an existing _docs/: pages, internal links
"""
import argparse, hashlib, os, re, shutil, subprocess, sys, time, warnings
from concurrent.futures import ProcessPoolExecutor
from html.parser import HTMLParser
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, DOCS = ROOT/'nbs', ROOT/'_proc', ROOT/'_docs'
PAGE_SUFFIXES = ('.ipynb', '.qmd')
SECTION_ORDER = ('Tutorials', 'Library', 'Analysis')
FOLDER_SECTIONS = {'tutorials': 'Tutorials', 'analysis': 'Analysis'}
IMPORT_HINT = ("to document a notebook nbdev runs its exported cells, its show_doc cells and every cell that contains an "
               "import (even one inside a function), without the other cells; move that cell's imports to a cell of their "
               "own so that it is not run")

# ---------------------------------------------------------------- the pages and the sidebar

def doc_sources(nbs=NBS) -> list[PurePosixPath]:
    "Every page source under `nbs`, relative to it: notebooks and .qmd files outside `_*`/`.*` folders and files."
    out = []
    for p in sorted(Path(nbs).rglob('*')):
        rel = p.relative_to(nbs)
        if p.suffix in PAGE_SUFFIXES and p.is_file() and not any(s.startswith(('_', '.')) for s in rel.parts):
            out.append(PurePosixPath(rel.as_posix()))
    return out

def output_name(src: PurePosixPath) -> PurePosixPath:
    "Where a page lands in the site, as nbdev tells Quarto (`output-file`): `00_lora.ipynb` -> `lora.html`."
    if src.suffix != '.ipynb': return src.with_suffix('.html')
    return src.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', src.name.lower())).with_suffix('.html')

def section_of(src: PurePosixPath) -> str | None:
    "The sidebar section of a page: its folder's, or by its number band; None for top-level pages (home first)."
    if len(src.parts) > 1: return FOLDER_SECTIONS.get(src.parts[0], src.parts[0].replace('_', ' ').title())
    m = re.match(r'(\d)\d*[a-zA-Z0-9]*_', src.name)
    if m: return 'Library' if m.group(1) == '0' else 'Analysis'
    return None

def sidebar_spec(nbs=NBS) -> dict:
    "The `website.sidebar` contents and `website.navbar.left` menus for the pages present."
    srcs = doc_sources(nbs)
    top = sorted((s for s in srcs if section_of(s) is None), key=lambda s: (s.stem != 'index', str(s)))
    groups: dict[str, list[str]] = {}
    for s in srcs:
        if (sec := section_of(s)) is not None: groups.setdefault(sec, []).append(str(s))
    order = [s for s in SECTION_ORDER if s in groups] + sorted(s for s in groups if s not in SECTION_ORDER)
    contents = [str(s) for s in top] + [{'section': sec, 'contents': groups[sec]} for sec in order]
    return {'website': {'navbar': {'left': [{'text': sec, 'menu': groups[sec]} for sec in order]},
                        'sidebar': {'contents': contents}}}

def write_sidebar(nbs=NBS) -> bool:
    "Write `nbs/sidebar.yml` from the pages present; True when it changed."
    class NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data): return True
    text = ("# Written by tools/build_docs.py (make docs) from the notebooks in nbs/: do not edit.\n"
            + yaml.dump(sidebar_spec(nbs), Dumper=NoAliases, sort_keys=False, width=120))
    f = Path(nbs)/'sidebar.yml'
    if f.exists() and f.read_text() == text: return False
    f.write_text(text)
    return True

def nb_title(path) -> str:
    "A notebook's title: the first `# ` heading of a markdown cell."
    import json
    for c in json.loads(Path(path).read_text())['cells']:
        if c['cell_type'] != 'markdown': continue
        m = re.search(r'^# (.+)$', ''.join(c['source']), re.M)
        if m: return m.group(1).strip()
    return Path(path).stem

# ---------------------------------------------------------------- processing the notebooks (nbdev_proc_nbs)

def _proc_one(job):
    "Process one notebook with nbdev's docs processors (`FilterDefaults`) in a worker; returns (src, error, warnings)."
    src, dst = job
    os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import nbdev.serve_drv
    from nbdev.processors import FilterDefaults
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        try:
            with open(os.devnull, 'w') as null, _redirect(null):
                nbdev.serve_drv.main((Path(src), Path(dst), FilterDefaults))
            err = None
        except BaseException as e:
            cause, lines = e.__cause__, str(e).splitlines()
            if cause is not None and len(lines) > 1:   # nbdev: "Error in notebook: <title> in cell N :" then the cell
                err = f"the cell starting {lines[1].strip()[:70]!r} failed: {type(cause).__name__}: {cause}"
            else: err = f"{type(e).__name__}: {e}"
            if Path(dst).exists(): Path(dst).unlink()
    notes = sorted({str(w.message).split('\n---\n')[1].splitlines()[0] for w in caught
                    if 'containing imports and other code' in str(w.message) and '\n---\n' in str(w.message)})
    return str(src), err, notes

class _redirect:
    "Send stdout to a file while the notebook's cells run (their prints are not wanted in the build log)."
    def __init__(self, f): self.f = f
    def __enter__(self): self.old, sys.stdout = sys.stdout, self.f
    def __exit__(self, *a): sys.stdout = self.old

def _cache_key() -> str:
    "What the processed notebooks depend on besides themselves: settings, the symbol index, nbdev, this script."
    import nbdev
    h = hashlib.sha256(nbdev.__version__.encode())
    for f in (ROOT/'settings.ini', ROOT/'moleflow'/'_modidx.py', Path(__file__)):
        if f.exists(): h.update(f.read_bytes())
    return h.hexdigest()

def process_notebooks(nbs=NBS, proc=PROC, workers=2, log=print) -> list[str]:
    "Mirror `nbs` into `proc` as `nbdev_proc_nbs` does (notebooks processed, other files copied); returns the errors."
    from nbdev.doclinks import nbglob
    from nbdev.serve import _proc_file
    nbs, proc = Path(nbs), Path(proc)
    stamp = proc/'.moleflow_docs_key'
    if stamp.exists() and stamp.read_text() != _cache_key(): shutil.rmtree(proc)
    proc.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in nbglob(nbs, func=Path, file_glob='', file_re='')]
    files += [nbs/n for n in ('_quarto.yml', '_brand.yml') if (nbs/n).exists()]
    wanted = {proc/f.relative_to(nbs) for f in files}
    for f in list(proc.rglob('*')):   # sources deleted since the last build leave no page behind
        rel = f.relative_to(proc)
        if f.is_file() and not rel.parts[0].startswith(('_docs', '_site', '.')) and f not in wanted and f != stamp: f.unlink()
    jobs = [(str(s), str(d)) for s, d, _ in filter(None, (_proc_file(f, proc, nbs) for f in files))]
    errors = []
    if jobs:
        t0 = time.time()
        sys.path.insert(0, str(Path(__file__).parent))
        from build_docs import _proc_one as worker   # by module name, so that spawned workers can import it
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context('spawn')) as ex:
            for src, err, notes in ex.map(worker, jobs):
                name = Path(src).relative_to(ROOT)
                for n in notes: log(f"note: {name}: a cell mixes imports and other code, so nbdev runs it for the docs: {n!r}")
                if err: errors.append(f"{name}: {err}\n  ({IMPORT_HINT})")
        log(f"processed {len(jobs)} notebook(s) with nbdev in {time.time() - t0:.1f}s")
    stamp.write_text(_cache_key())
    return errors

# ---------------------------------------------------------------- rendering with smalldocs

def render_smalldocs(proc=PROC, out=DOCS) -> list[str]:
    "Render the processed project with smalldocs into `out`, honouring nbdev's `output-file`; returns the problems."
    from smalldocs.config import load
    from smalldocs.site import Site

    class NbdevSite(Site):
        "A smalldocs site that puts each page where nbdev tells Quarto to (`output-file`), as Quarto does."
        def read(self, src):
            page = super().read(src)
            of = page.front.get('output-file')
            if of: page.out = src.parent/str(of)
            return page

    site = NbdevSite(load(proc), quiet=True)
    if Path(out).exists(): shutil.rmtree(out)
    site.out = Path(out).resolve()
    n = site.build()
    print(f"smalldocs wrote {n} page(s) to {Path(out).relative_to(ROOT) if Path(out).is_relative_to(ROOT) else out}")
    # nbdev writes `output-file` into every page's front matter; NbdevSite honours it, so that warning does not apply
    # broken links are reported by broken_links() on the written site, once each
    return [w for w in site.warnings if not w.endswith('output-file is not read by smalldocs') and ': broken link ' not in w]

def build_quarto() -> list[str]:
    "The standard nbdev flow: `nbdev_docs` (processes into `_proc/`, renders with Quarto, moves the site to `_docs/`)."
    from nbdev.config import get_config
    if not get_config().custom_sidebar:
        return ["settings.ini has custom_sidebar = False: nbdev_docs would replace nbs/sidebar.yml with its own; set it to True"]
    readme = ROOT/'README.md'
    kept = readme.read_bytes() if readme.exists() else None
    try: r = subprocess.run([str(Path(sys.executable).parent/'nbdev_docs')], cwd=ROOT)
    finally:   # nbdev_docs also renders README.md with Quarto; the README is tools/make_readme.py's (make readme)
        if kept is not None and (not readme.exists() or readme.read_bytes() != kept): readme.write_bytes(kept)
    return [] if r.returncode == 0 else [f"nbdev_docs failed with exit status {r.returncode}"]

# ---------------------------------------------------------------- checking a built site

class _Links(HTMLParser):
    "The ids of a page and the links (href/src) it holds."
    ATTRS = {'a': 'href', 'link': 'href', 'img': 'src', 'script': 'src', 'source': 'src', 'iframe': 'src'}
    def __init__(self):
        super().__init__(); self.ids, self.links = set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag in self.ATTRS and a.get(self.ATTRS[tag]): self.links.append(a[self.ATTRS[tag]])

def _parse(path) -> _Links:
    p = _Links(); p.feed(Path(path).read_text(encoding='utf-8', errors='replace')); return p

def broken_links(out=DOCS) -> list[str]:
    "Every internal link of the site that does not resolve (a missing file or `#anchor`), once, with the pages holding it."
    out = Path(out).resolve()
    pages = {p: _parse(p) for p in sorted(out.rglob('*.html')) if 'site_libs' not in p.relative_to(out).parts}
    bad: dict[str, list[str]] = {}
    for page, parsed in pages.items():
        for link in parsed.links:
            u = urlsplit(link)
            if u.scheme or link.startswith('//'): continue   # external: http(s), mailto, data, javascript
            target = page if not u.path else (page.parent/unquote(u.path)).resolve()
            if u.path.endswith('/'): target = target/'index.html'
            why = None
            if target != out and out not in target.parents: why = 'outside the site'
            elif not target.is_file(): why = 'no such file'
            elif u.fragment and target.suffix == '.html':
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(u.fragment) not in ids: why = f"no id {u.fragment!r} on that page"
            if why:
                key = f"{(page.parent/u.path).resolve().relative_to(out) if why != 'outside the site' else link}" \
                      + (f"#{u.fragment}" if u.fragment else '') + f" ({why})"
                if str(page.relative_to(out)) not in bad.setdefault(key, []): bad[key].append(str(page.relative_to(out)))
    return [f"broken link {k}, on {len(v)} page(s): {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}" for k, v in bad.items()]

def missing_pages(nbs=NBS, out=DOCS) -> list[str]:
    "The page sources with no page of their own in the site (none, or one that another source also lands on)."
    srcs, seen = doc_sources(nbs), {}
    for s in srcs: seen.setdefault(output_name(s), []).append(s)
    clash = [f"nbs/{' and nbs/'.join(map(str, v))} all become {k}: rename one" for k, v in seen.items() if len(v) > 1]
    return clash + [f"nbs/{s}: no page {output_name(s)} in {Path(out).name}/" for s in srcs if not (Path(out)/output_name(s)).is_file()]

def check_site(nbs=NBS, out=DOCS) -> list[str]:
    "All problems of a built site: pages missing, internal links broken, no search index."
    problems = missing_pages(nbs, out) + broken_links(out)
    if not (Path(out)/'search.json').is_file(): problems.append(f"{Path(out).name}/search.json is missing: the site has no search index")
    return problems

# ---------------------------------------------------------------- the command

def build(engine='auto', workers=2) -> list[str]:
    "Write the sidebar, refresh nbdev.yml, build the site with the engine; returns every problem found."
    from nbdev.quarto import refresh_quarto_yml
    t0 = time.time()
    os.chdir(ROOT)
    if engine == 'auto': engine = 'quarto' if shutil.which('quarto') else 'smalldocs'
    if write_sidebar(): print("wrote nbs/sidebar.yml (the pages changed)")
    refresh_quarto_yml()   # nbs/nbdev.yml from settings.ini, as nbdev_docs does
    print(f"building the docs with {engine}")
    if engine == 'quarto': problems = build_quarto()
    else:
        problems = process_notebooks(workers=workers)
        problems += render_smalldocs()
    problems += check_site()
    print(f"docs built in {time.time() - t0:.0f}s: {DOCS.relative_to(ROOT)}/index.html"
          + (f"; {len(problems)} problem(s)" if problems else ""))
    return problems

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--engine', choices=['auto', 'quarto', 'smalldocs'], default='auto')
    ap.add_argument('--workers', type=int, default=2, help='notebooks processed at once')
    ap.add_argument('--sidebar', action='store_true', help='only rewrite nbs/sidebar.yml')
    ap.add_argument('--check', action='store_true', help='only check the site already in _docs/')
    a = ap.parse_args(argv)
    if a.sidebar:
        print('wrote nbs/sidebar.yml' if write_sidebar() else 'nbs/sidebar.yml is up to date'); return 0
    problems = check_site() if a.check else build(a.engine, a.workers)
    for p in problems: print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0

if __name__ == '__main__': sys.exit(main())
