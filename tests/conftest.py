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

@pytest.fixture(scope='session')
def generated_root(tmp_path_factory):
    "A small generated MVTec-layout data set (two textures, one object), shared by the session's tests."
    from moleflow.synthetic import generate_default_dataset
    return generate_default_dataset(tmp_path_factory.mktemp('gen')/'data', seed=0, n_train=8, n_test_good=2,
                                    n_test_defect=3, classes=['fabric', 'wood', 'screw'])

@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
    "One feature cache for the session, away from the user's ~/.cache."
    return str(tmp_path_factory.mktemp('feature_cache'))
