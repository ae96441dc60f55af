"Shared pytest fixtures: offline hub, the shared real data, a small generated data set."
import os
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data' / 'mvtec_subset'

@pytest.fixture(scope='session')
def repo_root(): return ROOT

@pytest.fixture(scope='session')
def mvtec_subset():
    "The shared real MVTec subset; tests using it skip when it is absent."
    if not SHARED_DATA.is_dir(): pytest.skip(f"shared real data not found at {SHARED_DATA}")
    return SHARED_DATA
