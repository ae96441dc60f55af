"Integration checks of moleflow.evaluation: metrics against exact references, bounded memory, continual summaries."
import json
import math
import tracemalloc
import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from moleflow.evaluation import (anomaly_maps, image_scores, image_auroc, image_ap, image_f1_max, pixel_metrics,
                                 pixel_auroc, pixel_ap, pixel_f1_max, aupro, evaluate_task, final_average, forgetting,
                                 bwt, plot_result_matrix, plot_anomaly_grid)


def synthetic_set(n, size, seed, strength=1.5):
    "Half the images carry 1-3 disc defects; maps are noise plus `strength` on the defects."
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), np.float32)
    for i in range(n // 2, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = *rng.integers(0, size, 2), rng.integers(2, max(3, size // 6))
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = (rng.normal(size=masks.shape) + strength * masks).astype(np.float32)
    return masks, maps


def aupro_brute(masks, maps, limit=0.3):
    "AUPRO thresholding at every distinct score: PRO = mean region overlap, FPR over normal pixels."
    regions = []
    for i, m in enumerate(masks):
        lab, k = ndimage.label(m > 0.5, structure=np.ones((3, 3)))
        regions += [(i, lab == j) for j in range(1, k + 1)]
    normal = masks <= 0.5
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        pts.append((pred[normal].mean(), np.mean([pred[i][reg].mean() for i, reg in regions])))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(pts[:-1], pts[1:]):
        if f0 >= limit: break
        if f1 > limit: p1, f1 = p0 + (limit - f0) / (f1 - f0) * (p1 - p0), limit
        area += (f1 - f0) * (p0 + p1) / 2
    return area / limit


@pytest.mark.parametrize('seed,strength', [(0, 1.5), (1, 0.5), (2, 3.0)])
def test_pixel_metrics_match_sklearn(seed, strength):
    masks, maps = synthetic_set(40, 64, seed, strength)
    pm = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert pm['pixel_auroc'] == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert pm['pixel_ap'] == pytest.approx(average_precision_score(y, s), abs=1e-3)
    p, r, _ = precision_recall_curve(y, s)
    assert pm['f1_max'] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-12)), abs=1e-3)
    assert pixel_auroc(masks, maps) == pm['pixel_auroc'] and pixel_ap(masks, maps) == pm['pixel_ap']
    assert pixel_f1_max(masks, maps) == pm['f1_max']


def test_pixel_metrics_with_outliers_still_match():
    "One extreme score stretches the bin range; the bulk must still be resolved to 1e-3."
    masks, maps = synthetic_set(30, 64, 3)
    maps[0, 0, 0] = 1e3
    pm = pixel_metrics(masks, maps)
    assert pm['pixel_auroc'] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-3)
    assert pm['pixel_ap'] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-3)


def test_aupro_matches_brute_force_on_hand_made_masks():
    masks = np.zeros((4, 12, 12), np.float32)
    masks[0, 1:3, 1:3] = 1                     # 2x2
    masks[0, 6:10, 5:11] = 1                   # 4x6
    masks[1, 3, 3:7] = 1; masks[1, 4, 7] = 1   # diagonal touch: one 8-connected region
    masks[2, 0:12, 11] = 1                     # a thin stripe along the border
    rng = np.random.default_rng(7)
    maps = (np.round(rng.uniform(0, 1, masks.shape), 2) + 0.35 * masks).astype(np.float32)
    for limit in (0.01, 0.1, 0.3, 0.6, 1.0):
        assert aupro(masks, maps, limit) == pytest.approx(aupro_brute(masks, maps, limit), abs=1e-3)


def test_aupro_matches_brute_force_on_random_blobs():
    masks, maps = synthetic_set(10, 32, 4, strength=1.0)
    maps = np.round(maps, 2)
    assert aupro(masks, maps) == pytest.approx(aupro_brute(masks, maps), abs=1e-3)


def test_aupro_is_per_region_not_per_pixel():
    "A large region found and a small region missed give PRO 1/2, not the pixel-weighted fraction."
    masks = np.zeros((1, 20, 20), np.float32)
    masks[0, :10, :10] = 1          # 100 pixels, scored high
    masks[0, 15:17, 15:17] = 1      # 4 pixels, scored like the background
    maps = np.zeros_like(masks); maps[0, :10, :10] = 1.0
    # curve (FPR, PRO): (0, 0) -> (0, 0.5) at threshold 1 -> (1, 1) at threshold 0; at FPR 0.3 the PRO is 0.65
    assert aupro(masks, maps) == pytest.approx((0.5 + 0.65) / 2, abs=1e-9)
    assert aupro(masks, maps) == pytest.approx(aupro_brute(masks, maps), abs=1e-9)


def test_chunked_and_blocked_inputs_agree():
    masks, maps = synthetic_set(16, 48, 5)
    ref = pixel_metrics(masks, maps)
    assert pixel_metrics(masks, maps, chunk_pixels=3000) == ref
    assert pixel_metrics([masks[:5, None], masks[5:, None]], [torch.from_numpy(maps[:5]), torch.from_numpy(maps[5:])]) == ref
    assert pixel_metrics(torch.from_numpy(masks).to(torch.uint8), torch.from_numpy(maps)) == ref


def test_pixel_metrics_memory_is_bounded():
    "4M pixels: the metrics must not need even a float64 copy of all scores (32 MB)."
    n, size = 256, 128
    masks = np.zeros((n, size, size), np.uint8); masks[n // 2:, 40:70, 30:90] = 1
    maps = torch.randn(n, size, size, generator=torch.Generator().manual_seed(0)) + torch.from_numpy(masks).float()
    full_f64 = maps.numel() * 8
    tracemalloc.start()
    try:
        pm = pixel_metrics(masks, maps, bins=2**16, chunk_pixels=2**17)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_f64 / 4, (peak, full_f64)
    sub = slice(n // 2 - 8, n // 2 + 8)      # sanity: the values are the metric of these maps
    assert 0.5 < pm['pixel_auroc'] < 1 and 0 < pm['aupro'] < 1
    assert pixel_metrics(masks[sub], maps[sub])['pixel_auroc'] == pytest.approx(
        roc_auc_score(masks[sub].ravel(), maps[sub].numpy().ravel()), abs=1e-3)


def test_image_metrics_and_degenerate_labels():
    y, s = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    assert image_auroc(y, s) == pytest.approx(8 / 9)
    assert image_ap(y, s) == pytest.approx((1 + 1 + 0.75) / 3)
    assert image_f1_max(y, s) == pytest.approx(6 / 7)
    for f in (image_auroc, image_ap, image_f1_max):
        assert math.isnan(f([1, 1, 1], [0.1, 0.5, 0.2])) and math.isnan(f(np.zeros(4), np.arange(4.)))
    masks = np.zeros((3, 8, 8)); maps = np.random.default_rng(0).random((3, 8, 8))
    assert all(math.isnan(v) for v in pixel_metrics(masks, maps).values())
    assert all(math.isnan(v) for v in pixel_metrics(np.ones((2, 4, 4)), maps[:2, :4, :4]).values())


def test_evaluate_task_from_patch_nll():
    masks, maps = synthetic_set(20, 64, 6, strength=2.0)
    nll = torch.from_numpy(maps).view(20, 16, 4, 16, 4).mean((2, 4))
    labels = torch.tensor([0] * 10 + [1] * 10)
    res = evaluate_task(nll, torch.from_numpy(masks)[:, None], labels)
    assert set(res) == {'image_auroc', 'image_ap', 'image_f1_max', 'pixel_auroc', 'pixel_ap', 'aupro', 'f1_max'}
    full = anomaly_maps(nll, 64, sigma=4.0)
    assert res['pixel_auroc'] == pytest.approx(roc_auc_score(masks.ravel(), full.numpy().ravel()), abs=1e-3)
    assert res['image_auroc'] == pytest.approx(roc_auc_score(labels, nll.flatten(1).amax(1)))
    res2 = evaluate_task(full, masks, labels, scores=image_scores(full, 'top_k_percent', 0.05))
    assert res2['pixel_auroc'] == res['pixel_auroc']
    assert res2['image_auroc'] == pytest.approx(roc_auc_score(labels, full.flatten(1).topk(204, 1).values.mean(1)))
    assert res['pixel_auroc'] > 0.9 and res['aupro'] > 0.5


def test_anomaly_maps_blur_matches_scipy():
    nll = torch.rand(2, 14, 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    up = torch.nn.functional.interpolate(nll[:, None], size=(224, 224), mode='bilinear', align_corners=False)[:, 0]
    ref = ndimage.gaussian_filter(up.numpy(), sigma=(0, 4, 4), mode='mirror', truncate=4.0)
    assert np.allclose(anomaly_maps(nll, 224).numpy(), ref, atol=1e-5)
    up32 = torch.nn.functional.interpolate(nll[:, None].float(), size=(224, 224), mode='bilinear', align_corners=False)[:, 0]
    assert torch.equal(anomaly_maps(nll, 224, sigma=0), up32)


def test_continual_metrics_hand_computed():
    nan = float('nan')
    R = [[0.80, nan, nan, nan],
         [0.85, 0.90, nan, nan],
         [0.70, 0.95, 0.60, nan],
         [0.75, 0.80, 0.65, 0.99]]
    assert final_average(R) == pytest.approx((0.75 + 0.80 + 0.65 + 0.99) / 4)
    # FM: task 0 best 0.85 -> 0.75; task 1 best 0.95 -> 0.80; task 2 best 0.60 -> 0.65 (improved)
    assert forgetting(R) == pytest.approx(((0.85 - 0.75) + (0.95 - 0.80) + (0.60 - 0.65)) / 3)
    assert bwt(R) == pytest.approx(((0.75 - 0.80) + (0.80 - 0.90) + (0.65 - 0.60)) / 3)


def test_plots_write_png(tmp_path):
    nan = float('nan')
    p = plot_result_matrix([[0.9, nan], [0.8, 0.95]], ['leather', 'bottle'], 'pixel_auroc', tmp_path / 'f' / 'R.png')
    assert p.read_bytes()[:4] == b'\x89PNG'
    masks, maps = synthetic_set(4, 32, 8)
    p = plot_anomaly_grid(torch.randn(4, 3, 32, 32), torch.from_numpy(masks)[:, None], maps, tmp_path / 'grid.png',
                          scores=[0.1, 0.2, 0.3, 0.4], title='task 0', max_images=3)
    assert p.stat().st_size > 1000


@pytest.mark.parametrize('call,msg', [
    (lambda m, s: image_scores(s, 'median'), 'aggregation must be one of'),
    (lambda m, s: image_scores(s, 'percentile', 101), "param (q) for 'percentile' must be a number in [0, 100]"),
    (lambda m, s: image_scores(s, 'top_k', 0), "param (k) for 'top_k' must be an int in [1, 64]"),
    (lambda m, s: image_scores(s, 'top_k_percent', 1.5), "param (fraction) for 'top_k_percent' must be in (0, 1]"),
    (lambda m, s: anomaly_maps(torch.from_numpy(s), 16, sigma=-1.0), 'sigma must be a number >= 0'),
    (lambda m, s: pixel_metrics(m, s, fpr_limit=1.5), 'fpr_limit must be in (0, 1]'),
    (lambda m, s: pixel_metrics(m, s, bins=1), 'bins must be an int >= 2'),
    (lambda m, s: pixel_metrics(m[:1], s), 'masks and maps must have the same shapes'),
    (lambda m, s: evaluate_task(s, m, [0, 1]), 'labels must hold one label per image (4)'),
    (lambda m, s: image_auroc([0, 1, 2], [1, 2, 3]), 'labels must be a non-empty array of 0 (good) / 1 (anomalous)'),
    (lambda m, s: forgetting(np.zeros((2, 3))), 'R must be a non-empty square matrix'),
])
def test_bad_input(call, msg):
    masks, maps = synthetic_set(4, 8, 9)
    with pytest.raises(ValueError) as e: call(masks, maps)
    assert msg in str(e.value)
