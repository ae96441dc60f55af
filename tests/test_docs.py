"""The documentation site: it builds from the notebooks (`make docs`), every notebook has a page, every internal link
resolves, and a real headless Chromium loading it from a local server shows the title, the sidebar and the API
reference. Screenshots go to `_docs/_screenshots/`."""
import json, os, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

import numpy as np
import pytest
from bs4 import BeautifulSoup
from PIL import Image, ImageStat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import build_docs as bd  # noqa: E402

DOCS, SHOTS = bd.DOCS, bd.DOCS/'_screenshots'
CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
                  '--no-first-run', '--disable-component-update', '--disable-sync', '--hide-scrollbars']

@pytest.fixture(scope='module')
def build():
    "Build the site once, as `make docs` does; the tests read what it wrote."
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py')], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    r.seconds = time.time() - t0
    return r

def test_site_builds(build):
    assert build.returncode == 0, f"tools/build_docs.py failed:\n{build.stdout[-3000:]}\n{build.stderr[-6000:]}"
    assert (DOCS/'index.html').is_file() and (DOCS/'search.json').is_file()
    assert build.seconds < 240, f"the docs took {build.seconds:.0f}s to build; keep them fast, they run in make test"

def test_every_notebook_has_a_page(build):
    assert bd.missing_pages() == [], build.stderr[-4000:]
    srcs = bd.doc_sources()
    names = {s.name for s in srcs}
    assert {'index.ipynb', '00_lora.ipynb'} <= names and any(s.parts[0] == 'tutorials' for s in srcs)

def test_sidebar_lists_every_page(build):
    "nbs/sidebar.yml is the one the notebooks give, and it lists each page once, in its section."
    import yaml
    assert yaml.safe_load((bd.NBS/'sidebar.yml').read_text()) == bd.sidebar_spec()
    contents = bd.sidebar_spec()['website']['sidebar']['contents']
    listed = [c for c in contents if isinstance(c, str)] + [p for c in contents if isinstance(c, dict) for p in c['contents']]
    assert sorted(listed) == sorted(str(s) for s in bd.doc_sources())
    sections = [c['section'] for c in contents if isinstance(c, dict)]
    assert sections[:2] == ['Tutorials', 'Library'], sections
    has_analysis = any(bd.section_of(s) == 'Analysis' for s in bd.doc_sources())
    assert ('Analysis' in sections) == has_analysis
    assert contents[0] == 'index.ipynb'

def test_sidebar_rules(tmp_path):
    "Sections come from the notebooks present: tutorials/ folder, 0x_ band Library, 1x_ and up Analysis, none if empty."
    for f in ['index.ipynb', '00_a.ipynb', '01b_b.ipynb', 'tutorials/01_start.ipynb', '_private.ipynb',
              '.ipynb_checkpoints/00_a-checkpoint.ipynb']:
        (tmp_path/f).parent.mkdir(parents=True, exist_ok=True); (tmp_path/f).write_text('{}')
    spec = bd.sidebar_spec(tmp_path)['website']
    assert spec['sidebar']['contents'] == ['index.ipynb', {'section': 'Tutorials', 'contents': ['tutorials/01_start.ipynb']},
                                           {'section': 'Library', 'contents': ['00_a.ipynb', '01b_b.ipynb']}]
    assert [m['text'] for m in spec['navbar']['left']] == ['Tutorials', 'Library']
    (tmp_path/'10_study.ipynb').write_text('{}'); (tmp_path/'20_b.ipynb').write_text('{}')
    assert bd.sidebar_spec(tmp_path)['website']['navbar']['left'][-1] == {'text': 'Analysis', 'menu': ['10_study.ipynb', '20_b.ipynb']}
    assert str(bd.output_name(bd.PurePosixPath('01b_b.ipynb'))) == 'b.html'
    (tmp_path/'30_b.ipynb').write_text('{}')   # 20_b and 30_b would both be b.html
    assert any('all become b.html' in p for p in bd.missing_pages(tmp_path, tmp_path/'_site'))

def test_quarto_flow_keeps_the_sidebar():
    "Where Quarto is installed (the deploy workflow), nbdev_docs must keep nbs/sidebar.yml: custom_sidebar = True."
    from configparser import ConfigParser
    cfg = ConfigParser(); cfg.read(ROOT/'settings.ini')
    assert cfg.getboolean('DEFAULT', 'custom_sidebar'), "settings.ini: set custom_sidebar = True (see tools/build_docs.py)"

def test_internal_links_resolve(build):
    assert bd.broken_links() == []

def test_link_checker_finds_broken_links(tmp_path):
    "The checker itself: a missing file, a missing anchor and a link out of the site are reported; good links are not."
    (tmp_path/'a.html').write_text('<h2 id="x">x</h2><a href="b.html#x">ok</a><a href="a.html#x">ok</a>'
                                   '<a href="https://example.org/nowhere">external</a><img src="data:image/png;base64,AA==">'
                                   '<a href="missing.html">1</a><a href="b.html#nope">2</a><a href="../up.html">3</a>')
    (tmp_path/'b.html').write_text('<p id="x">b</p>')
    bad = bd.broken_links(tmp_path)
    assert len(bad) == 3, bad
    assert any('missing.html (no such file)' in b for b in bad) and any("no id 'nope'" in b for b in bad)
    assert any('outside the site' in b for b in bad)

def test_search_index(build):
    entries = json.loads((DOCS/'search.json').read_text())
    hits = [e for e in entries if 'LoRALinear' in e.get('text', '') + e.get('title', '') + e.get('section', '')]
    assert any(e['href'].startswith('lora.html') for e in hits), "search.json has no entry for LoRALinear on lora.html"

# ---------------------------------------------------------------- in a real browser

def chromium_path() -> str:
    "The Chromium to drive: $CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."
    for c in (os.environ.get('CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome'):
        if c and shutil.which(c): return shutil.which(c)
    pytest.fail("no Chromium found for the docs tests: run `make docs-browser` (apt-get install chromium) "
                "or set CHROMIUM=/path/to/chrome")

def run_chromium(url, *args, timeout=120) -> str:
    "Load `url` in a fresh headless Chromium profile with `args` (--dump-dom, --screenshot=...); return stdout."
    profile = tempfile.mkdtemp(prefix='moleflow-chromium-')
    try:
        r = subprocess.run([chromium_path(), *CHROMIUM_FLAGS, f'--user-data-dir={profile}', '--virtual-time-budget=5000',
                            *args, url], capture_output=True, text=True, timeout=timeout)
    finally: shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0, f"chromium failed on {url}: {r.stderr[-2000:]}"
    return r.stdout

@pytest.fixture(scope='module')
def server(build):
    "A local http server on 127.0.0.1 (a free port) serving _docs/."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(DOCS)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}/'
    for _ in range(100):
        try: urllib.request.urlopen(url, timeout=1); break
        except OSError: time.sleep(0.1)
    yield url
    p.terminate(); p.wait(10)

def dom(url) -> BeautifulSoup: return BeautifulSoup(run_chromium(url, '--dump-dom'), 'html.parser')

def screenshot(url, name, height=900) -> Image.Image:
    "Save a 1280 x `height` screenshot of `url` to _docs/_screenshots/<name>.png; check it is the page, with its theme."
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS/f'{name}.png'
    if path.exists(): path.unlink()
    run_chromium(url, f'--screenshot={path}', f'--window-size=1280,{height}')
    im = Image.open(path).convert('RGB')
    assert im.size == (1280, height)
    assert max(hi - lo for lo, hi in ImageStat.Stat(im).extrema) > 100, f"{path} is blank"
    r, g, b = ImageStat.Stat(im.crop((0, 0, 1280, 40))).median   # the navbar: cosmo's primary blue, so the CSS loaded
    assert b > 180 and b > r + 80, f"{path}: no themed navbar at the top (median colour {r, g, b})"
    return im

def sidebar_texts(page: BeautifulSoup) -> list[str]:
    bar = page.find(id='quarto-sidebar')
    assert bar is not None, "the page has no sidebar (#quarto-sidebar)"
    return [' '.join(a.get_text(' ', strip=True).split()) for a in bar.find_all('a')]

def test_home_page_in_chromium(server):
    page = dom(server + 'index.html')
    assert 'moleflow' in page.title.get_text()
    texts = sidebar_texts(page)
    for src in bd.doc_sources():   # every page is in the sidebar, by its title
        title = bd.nb_title(bd.NBS/src).replace('`', '')
        assert title in texts, f"sidebar has no entry {title!r} for nbs/{src}: {texts}"
    nav = page.find('nav', class_='navbar').get_text(' ', strip=True)
    assert 'Tutorials' in nav and 'Library' in nav
    assert page.find('input', attrs={'type': 'search'}) is not None or page.find(id='quarto-search') is not None
    figures = [i for i in page.find('main').find_all('img') if not i.get('src', '').startswith('data:image/svg')]
    assert figures, "the home page shows no figure: put the demo's anomaly maps in nbs/images/ and show them in nbs/index.ipynb"
    screenshot(server + 'index.html', 'home')

def test_api_page_in_chromium(server):
    page = dom(server + 'lora.html')
    assert 'LoRA' in page.title.get_text()
    main = page.find('main') or page
    heads = [h.get_text(' ', strip=True) for h in main.find_all(['h2', 'h3', 'h4'])]
    assert any(h.startswith('LoRALinear') for h in heads), heads
    # the signature block nbdev writes for the class: `def LoRALinear(in_features:int, out_features:int, rank:int=16, ...`
    sigs = [''.join(pre.get_text().split()) for pre in main.find_all('pre')]
    assert any(s.startswith('defLoRALinear(in_features:int,out_features:int,rank:int=16') for s in sigs), \
        f"no signature of LoRALinear on its API page: {[s[:60] for s in sigs[:5]]}"
    assert 'Shared' in main.get_text() and 'low-rank expert' in main.get_text()   # its docstring
    assert 'Library' in sidebar_texts(page)
    screenshot(server + 'lora.html', 'api_lora')

class DevTools:
    "A headless Chromium on one page, driven over the DevTools protocol: type, run JavaScript, take screenshots."
    def __init__(self, url, width=1280, height=900):
        import websocket   # websocket-client, which jupyter_server installs
        self.profile = tempfile.mkdtemp(prefix='moleflow-chromium-')
        self.proc = subprocess.Popen([chromium_path(), *CHROMIUM_FLAGS, f'--user-data-dir={self.profile}',
                                      '--remote-debugging-port=0', f'--window-size={width},{height}', url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile)/'DevToolsActivePort'
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip(): break
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json')) if t['type'] == 'page']
        self.ws = websocket.create_connection(pages[0]['webSocketDebuggerUrl'], timeout=60, suppress_origin=True)
        self.n = 0
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def send(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({'id': self.n, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('id') == self.n:
                assert 'error' not in msg, msg['error']
                return msg['result']

    def js(self, expr):
        r = self.send('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True)
        assert 'exceptionDetails' not in r, r['exceptionDetails']
        return r['result'].get('value')

    def wait_for(self, expr, seconds=15):
        for _ in range(int(seconds * 10)):
            if v := self.js(expr): return v
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expr}")

    def screenshot(self, path):
        import base64
        Path(path).write_bytes(base64.b64decode(self.send('Page.captureScreenshot', format='png')['data']))

    def close(self):
        self.ws.close(); self.proc.terminate(); self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)

def test_search_in_chromium(server):
    "Typing a name in the search box lists the page that documents it."
    if 'smalldocs' not in (DOCS/'index.html').read_text()[:2000]:
        pytest.skip("the search box is driven here for sites built by smalldocs (Quarto's has its own widget)")
    b = DevTools(server + 'index.html')
    try:
        b.js("document.querySelector('.smalldocs-search input').focus()")
        b.send('Input.insertText', text='LoRALinear')
        hits = b.wait_for("[...document.querySelectorAll('.search-result')].map(a => a.getAttribute('href'))")
        SHOTS.mkdir(parents=True, exist_ok=True)
        b.screenshot(SHOTS/'search.png')
    finally: b.close()
    assert any(h.split('#')[0].endswith('lora.html') for h in hits), hits

def test_tutorial_figures_in_chromium(server):
    "The getting-started tutorial shows its saved figures: the data, and the anomaly maps (in colour) of every task."
    src = next(s for s in bd.doc_sources() if s.parts[0] == 'tutorials' and 'getting_started' in s.name)
    url = server + str(bd.output_name(src))
    main = dom(url).find('main')
    assert len(main.find_all('img')) >= 4, "the getting-started page shows fewer than four figures"
    im = screenshot(url, 'getting_started', height=6000)   # the whole page, down to the anomaly maps
    body = im.crop((0, 100, im.width, im.height))   # below the navbar, which is a vivid blue itself
    h, s_, v = (np.asarray(c, dtype=np.float32) for c in body.convert('HSV').split())
    vivid = (s_ > 180) & (v > 120)   # the maps' colour scale; the rest of the page is grey, white and pale blue
    warm = vivid & ((h < 45) | (h > 235))   # its reds and yellows
    assert vivid.mean() > 0.008 and warm.mean() > 0.001, \
        f"the screenshot shows no anomaly maps ({vivid.mean():.2%} vivid, {warm.mean():.2%} warm pixels)"
