"`make lab`'s server: JupyterLab starts headless, its API answers, and the project's kernel imports moleflow."
import json, os, secrets, socket, subprocess, sys, time, uuid
from pathlib import Path
import pytest, requests

BIN = Path(sys.executable).parent

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.fixture
def lab_server(repo_root, tmp_path):
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'), 'JUPYTER_CONFIG_DIR': str(tmp_path/'config')}
    cmd = [str(BIN/'jupyter'), 'lab', '--no-browser', '--allow-root', '--ip=127.0.0.1', f'--port={port}',
           f'--IdentityProvider.token={token}', f'--notebook-dir={repo_root/"nbs"}']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path/'lab.log', 'w'))
    base = f'http://127.0.0.1:{port}'
    try:
        for _ in range(120):
            try:
                if requests.get(f'{base}/api/status', params={'token': token}, timeout=2).ok: break
            except requests.ConnectionError: pass
            if proc.poll() is not None: break
            time.sleep(0.5)
        else: pytest.fail(f"JupyterLab did not answer; log:\n{(tmp_path/'lab.log').read_text()[-3000:]}")
        if proc.poll() is not None: pytest.fail(f"JupyterLab exited; log:\n{(tmp_path/'lab.log').read_text()[-3000:]}")
        yield base, token
    finally:
        proc.terminate()
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill()

def _execute(base, token, kernel_id, code, timeout=60):
    "Run `code` in a kernel through the server's websocket; return (status, stdout text)."
    from tornado.ioloop import IOLoop
    from tornado.websocket import websocket_connect
    async def go():
        url = base.replace('http', 'ws') + f'/api/kernels/{kernel_id}/channels?token={token}'
        ws = await websocket_connect(url)
        msg_id = uuid.uuid4().hex
        await ws.write_message(json.dumps({
            'header': {'msg_id': msg_id, 'username': 'test', 'session': uuid.uuid4().hex, 'msg_type': 'execute_request',
                       'version': '5.3', 'date': ''},
            'parent_header': {}, 'metadata': {}, 'channel': 'shell',
            'content': {'code': code, 'silent': False, 'store_history': False, 'user_expressions': {},
                        'allow_stdin': False, 'stop_on_error': True}}))
        out, status, idle, t0 = [], None, False, time.time()
        while not (status and idle) and time.time() - t0 < timeout:
            raw = await ws.read_message()
            if raw is None: break
            m = json.loads(raw)
            if m.get('parent_header', {}).get('msg_id') != msg_id: continue
            if m['msg_type'] == 'stream': out.append(m['content']['text'])
            if m['msg_type'] == 'error': out.append('\n'.join(m['content']['traceback']))
            if m['msg_type'] == 'execute_reply': status = m['content']['status']
            if m['msg_type'] == 'status' and m['content']['execution_state'] == 'idle': idle = True
        ws.close()
        return status, ''.join(out)
    return IOLoop.current().run_sync(go, timeout=timeout + 10)

def test_lab_serves_and_project_kernel_imports_moleflow(lab_server):
    base, token = lab_server
    auth = {'Authorization': f'token {token}'}
    specs = requests.get(f'{base}/api/kernelspecs', headers=auth, timeout=10).json()['kernelspecs']
    assert 'moleflow' in specs, f"project kernel not installed; have {list(specs)}"
    assert requests.get(f'{base}/lab', headers=auth, timeout=10).ok
    kernel = requests.post(f'{base}/api/kernels', headers=auth, json={'name': 'moleflow'}, timeout=30).json()
    try:
        status, out = _execute(base, token, kernel['id'], "import moleflow, sys; print(moleflow.__file__); print(sys.prefix)")
        assert status == 'ok', out
        assert 'moleflow' in out and '.venv' in out
    finally:
        requests.delete(f'{base}/api/kernels/{kernel["id"]}', headers=auth, timeout=10)
