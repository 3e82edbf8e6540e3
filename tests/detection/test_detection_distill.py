"""Detection feature distillation on FPN-shaped maps: PCKA vs the reference module, the "w/ patch" losses vs
direct loops, projectors and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ckakd
from ckakd import reference as R
from ckakd.detection.distill import PatchMimic, at_patch_loss, dist_patch_loss, kd_patch_loss, patchify, pcka_loss


def fpn(seed: int, channels: int = 6, sizes=((16, 16), (8, 8), (4, 4)), batch: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def test_patchify_matches_a_loop():
    f = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    p = patchify(f, (4, 3))
    assert p.shape == (2, 3, 2 * 4, 12)
    for pi in range(2):
        for pj in range(4):
            window = f[:, :, pi * 4 : (pi + 1) * 4, pj * 3 : (pj + 1) * 3].reshape(2, 3, -1)
            torch.testing.assert_close(p[:, :, pi * 4 + pj], window)


@pytest.mark.parametrize("reduce", ["channel", "batch", "spatial", "mix"])
def test_pcka_matches_the_reference_module(reduce):
    fs, ft = fpn(0), fpn(1)
    got = pcka_loss(fs, ft, patch_size=(4, 4), reduce=reduce, gamma=10.0)
    # the 4x4 level holds one 4x4 patch: its patch is halved to 2x2; mix = batch, spatial, channel by level
    sizes, mix = [(4, 4), (4, 4), (2, 2)], ["batch", "spatial", "channel"]
    expected = 10.0 * sum(
        R.patch_cka_loss(s, t, patch_size=size, reduce=mix[i] if reduce == "mix" else reduce)
        for i, (s, t, size) in enumerate(zip(fs, ft, sizes, strict=True))
    )
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert float(pcka_loss(fs, fs, patch_size=(4, 4), reduce=reduce)) == pytest.approx(0.0, abs=1e-9)


def test_level_patch_size_keeps_two_patches():
    from ckakd.detection.distill import level_patch_size

    assert level_patch_size((16, 16), 4) == (4, 4)
    assert level_patch_size((4, 4), 4) == (2, 2)
    assert level_patch_size((2, 2), (4, 4)) == (1, 1)
    assert level_patch_size((1, 2), (4, 4)) == (1, 1)


def test_kd_patch_matches_a_loop_and_vanishes_on_identical_maps():
    fs, ft = fpn(2, sizes=((8, 8),)), fpn(3, sizes=((8, 8),))
    tau = 2.0
    got = kd_patch_loss(fs, ft, patch_size=(4, 4), temperature=tau)
    s, t = fs[0], ft[0]
    terms = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            for pi in range(2):
                for pj in range(2):
                    ws = s[b, c, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(-1) / tau
                    wt = t[b, c, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(-1) / tau
                    p_t = F.softmax(wt, 0)
                    terms.append((p_t * (F.log_softmax(wt, 0) - F.log_softmax(ws, 0))).sum())
    torch.testing.assert_close(got, torch.stack(terms).mean() * tau**2)
    assert float(kd_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-12)


def test_at_patch_matches_a_loop():
    fs, ft = fpn(4, sizes=((8, 8),)), fpn(5, sizes=((8, 8),))
    got = at_patch_loss(fs, ft, patch_size=(4, 4))
    a_s, a_t = fs[0].pow(2).mean(1), ft[0].pow(2).mean(1)  # (B, H, W)
    diffs = []
    for pi in range(2):
        for pj in range(2):
            ws = F.normalize(a_s[:, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(3, -1), dim=1)
            wt = F.normalize(a_t[:, pi * 4 : pi * 4 + 4, pj * 4 : pj * 4 + 4].reshape(3, -1), dim=1)
            diffs.append((ws - wt).pow(2))
    torch.testing.assert_close(got, torch.stack(diffs).mean())


def test_dist_patch_is_zero_on_identical_maps_and_positive_otherwise():
    fs, ft = fpn(6), fpn(7)
    assert float(dist_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-5)  # Pearson's eps
    assert float(dist_patch_loss(fs, ft, patch_size=(4, 4))) > 0.1


def test_gradients_reach_the_student_and_projector_only():
    fs = [f.float().requires_grad_() for f in fpn(8, channels=4)]
    ft = [f.float() for f in fpn(9, channels=6)]
    mimic = PatchMimic([4, 4, 4], [6, 6, 6])
    projected = mimic(fs)
    loss = pcka_loss(projected, ft, patch_size=(4, 4)) + mimic.mimic_loss(fs, ft)
    for fn in (kd_patch_loss, at_patch_loss, dist_patch_loss):
        loss = loss + fn(projected, ft, patch_size=(4, 4))
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert all(p.grad is not None for p in mimic.parameters())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="same non-zero number of FPN levels"):
        pcka_loss(fpn(0), fpn(1)[:2])
    with pytest.raises(ValueError, match="level 0: .* differ in batch or channels"):
        kd_patch_loss(fpn(0, channels=4), fpn(1, channels=6))
    with pytest.raises(ValueError, match="patch_size must be positive"):
        at_patch_loss(fpn(0), fpn(1), patch_size=(0, 2))


def test_mmd_patch_matches_mmd_loss_per_channel():
    from ckakd.detection.distill import mmd_patch_loss

    fs, ft = fpn(10, sizes=((8, 8),)), fpn(11, sizes=((8, 8),))
    got = mmd_patch_loss(fs, ft, patch_size=(4, 4))
    ps, pt = patchify(fs[0], (4, 4)), patchify(ft[0], (4, 4))  # (B, C, Np, P)
    per_channel = []
    for c in range(ps.shape[1]):
        rows_s = ps[:, c].permute(1, 0, 2).reshape(ps.shape[2], -1)  # (Np, B·P)
        rows_t = pt[:, c].permute(1, 0, 2).reshape(pt.shape[2], -1)
        per_channel.append(ckakd.mmd_loss(rows_s, rows_t))
    torch.testing.assert_close(got, torch.stack(per_channel).mean())
    assert float(mmd_patch_loss(fs, fs, patch_size=(4, 4))) == pytest.approx(0.0, abs=1e-12)


def test_wkd_feature_fpn_loss_sums_levels():
    from ckakd.detection.distill import wkd_feature_fpn_loss

    fs, ft = fpn(12), fpn(13)
    expected = sum(ckakd.wkd_feature_loss(s, t, grid=1, mean_weight=2.0) for s, t in zip(fs, ft, strict=True))
    torch.testing.assert_close(wkd_feature_fpn_loss(fs, ft), expected)
    assert float(wkd_feature_fpn_loss(fs, fs)) == pytest.approx(0.0, abs=1e-12)
    one = [torch.randn(2, 6, 1, 1, dtype=torch.float64)]  # a single position has no variance: skipped
    torch.testing.assert_close(wkd_feature_fpn_loss([*fs, *one], [*ft, *one]), expected)


# ---- WKD-L on the sigmoid classification branch ----------------------------------------------------------


def cls_levels(seed: int, batch: int = 2, sizes=(6, 3), k: int = 4, scale: float = 2.0, shift: float = -1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, n, k, generator=g, dtype=torch.float64) + shift for n in sizes]


def class_cost(k: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ckakd.cost_from_interrelation(ckakd.interrelation(torch.randn(k, 6, 8, generator=g, dtype=torch.float64)))


def wkd_l_reference(s_cls, t_cls, cost, *, temperature, weight, score_thresh, topk, background, weighting, eps, iters):
    """The dense WKD-L by hand: per image, rank locations by the teacher's top sigmoid, keep the top-k above
    the threshold, softmax([z, 0] / T) (or softmax(z / T)), confidence-weighted mean of the WD. Returns
    (with POT's Sinkhorn: same iterations from u = 1/n, v then u, but no 1e-8 guards; with the library's
    float64 reference ``ckakd.reference.sinkhorn_fixed``; the number of locations compared)."""
    ot = pytest.importorskip("ot")
    zs, zt = torch.cat(s_cls, 1).detach().numpy(), torch.cat(t_cls, 1).detach().numpy()
    k = zs.shape[-1]
    c = cost.numpy()
    if background:
        c = np.full((k + 1, k + 1), 1.0)
        c[:k, :k] = cost.numpy()
        c[k, k] = 0.0
    values, ref_values, weights = [], [], []
    for b in range(zs.shape[0]):
        conf = (1.0 / (1.0 + np.exp(-zt[b]))).max(-1)
        order = sorted(range(len(conf)), key=lambda i: -conf[i])[:topk]
        for i in order:
            if conf[i] < score_thresh:
                continue
            ls, lt = zs[b, i], zt[b, i]
            if background:
                ls, lt = np.append(ls, 0.0), np.append(lt, 0.0)
            p = np.exp(ls / temperature) / np.exp(ls / temperature).sum()
            q = np.exp(lt / temperature) / np.exp(lt / temperature).sum()
            values.append(float(ot.sinkhorn2(p, q, c, eps, numItermax=iters, stopThr=0.0, warn=False)))
            ph, qh, ch = (torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in (p[None], q[None], c))
            ref_values.append(float(R.sinkhorn_fixed(ph, qh, ch, eps=eps, iters=iters)[0]))
            weights.append(conf[i] if weighting else 1.0)
    weights = np.array(weights)
    pot = weight * (weights * np.array(values)).sum() / weights.sum()
    ref = weight * (weights * np.array(ref_values)).sum() / weights.sum()
    return pot, ref, len(values)


@pytest.mark.parametrize(
    "background, weighting, topk, temperature",
    [(True, True, 3, 2.0), (False, True, None, 1.0), (True, False, 100, 4.0)],
)
def test_wkd_logit_dense_matches_a_pot_reference(background, weighting, topk, temperature):
    from ckakd.detection.distill import wkd_logit_dense_loss

    s_cls, t_cls, cost = cls_levels(20), cls_levels(21), class_cost()
    kw = dict(temperature=temperature, weight=3.0, score_thresh=0.3, topk=topk, background=background)
    got = wkd_logit_dense_loss(s_cls, t_cls, cost, confidence_weighting=weighting, **kw)
    pot, ref, n = wkd_l_reference(s_cls, t_cls, cost, weighting=weighting, eps=0.05, iters=10, **kw)
    assert 2 <= n < 18  # the threshold (and top-k) leave out some locations, keep several
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(ref, rel=1e-10)
    # POT's updates lack WKD's 1e-8 guards, which move 10 unconverged iterations by ~1e-5 relative here
    assert float(got) == pytest.approx(pot, rel=1e-4)
    if background:  # a pre-built (K+1, K+1) cost is the same problem
        from ckakd.detection.distill import with_background_cost

        full = with_background_cost(cost, 1.0)
        again = wkd_logit_dense_loss(s_cls, t_cls, full, confidence_weighting=weighting, **kw)
        torch.testing.assert_close(again, got)


def test_wkd_logit_dense_identical_logits_reach_the_entropic_floor():
    """Entropic WD is not 0 at p = q: the loss of a perfect student is the teacher's entropic self-transport cost
    <P_eps(q, q), C> (here about 5e-3 per location at eps = 0.05), below any perturbed student, and it vanishes
    (down to the cost's 1e-8 diagonal) as eps -> 0 or with a cost far above eps."""
    from ckakd.detection.distill import wkd_logit_dense_loss

    t_cls, cost = cls_levels(22, k=5), class_cost(5)
    kw = dict(weight=1.0, score_thresh=0.3, topk=None, background=True)
    floor = wkd_logit_dense_loss(t_cls, t_cls, cost, **kw)
    pot, ref, _ = wkd_l_reference(t_cls, t_cls, cost, temperature=2.0, weighting=True, eps=0.05, iters=10, **kw)
    assert float(floor) == pytest.approx(ref, rel=1e-10) and float(floor) == pytest.approx(pot, rel=1e-4)
    assert 1e-4 < float(floor) < 0.05 * math.log(6)  # entropic bias: positive, below eps·log(K+1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        student = [z + 0.3 * torch.randn(z.shape, generator=g, dtype=z.dtype) for z in t_cls]
        assert float(wkd_logit_dense_loss(student, t_cls, cost, **kw)) > float(floor)
    assert float(wkd_logit_dense_loss(t_cls, t_cls, cost, eps=0.01, **kw)) < 1e-7
    flat = 1.0 - torch.eye(5, dtype=torch.float64)  # exp(-1/0.05) ~ 2e-9: the plan stays diagonal
    assert float(wkd_logit_dense_loss(t_cls, t_cls, flat, **kw)) < 1e-7


def test_wkd_logit_dense_gradient_reaches_selected_student_logits_only():
    from ckakd.detection.distill import select_confident_locations, wkd_logit_dense_loss

    s_cls = [z.clone().requires_grad_() for z in cls_levels(23)]
    t_cls = [z.clone().requires_grad_() for z in cls_levels(24)]
    loss = wkd_logit_dense_loss(s_cls, t_cls, class_cost(), score_thresh=0.3, topk=4)
    loss.backward()
    assert all(t.grad is None for t in t_cls)  # the teacher is a target
    grad = torch.cat([s.grad for s in s_cls], 1)  # (B, N, K)
    mask = select_confident_locations(torch.cat(t_cls, 1), score_thresh=0.3, topk=4)
    assert 0 < int(mask.sum()) <= 8
    assert bool((grad[mask].abs().sum(-1) > 0).all())
    assert float(grad[~mask].abs().sum()) == 0.0


def test_wkd_logit_dense_without_confident_locations_is_an_attached_zero():
    from ckakd.detection.distill import wkd_logit_dense_loss

    s_cls = [z.clone().requires_grad_() for z in cls_levels(25)]
    t_cls = cls_levels(26, scale=0.1, shift=-8.0)  # sigmoid ~3e-4 everywhere: below any useful threshold
    loss = wkd_logit_dense_loss(s_cls, t_cls, class_cost())
    assert float(loss.detach()) == 0.0 and loss.grad_fn is not None and torch.isfinite(loss)
    loss.backward()
    assert all(s.grad is not None and float(s.grad.abs().sum()) == 0.0 for s in s_cls)


def test_wkd_logit_dense_errors_name_the_shapes():
    from ckakd.detection.distill import wkd_logit_dense_loss

    cost = class_cost()
    with pytest.raises(ValueError, match=r"level 1: student cls logits \(2, 3, 4\) and teacher \(2, 5, 4\)"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1, sizes=(6, 5)), cost)
    with pytest.raises(ValueError, match="same non-zero number of levels, got 2 and 1"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1)[:1], cost)
    with pytest.raises(ValueError, match=r"s_cls\[0\] must be floating-point class logits \(B, N_l, K\)"):
        wkd_logit_dense_loss([torch.zeros(2, 6)], [torch.zeros(2, 6)], cost)
    with pytest.raises(ValueError, match=r"cost must be \(4, 4\) or \(5, 5\).*got \(3, 3\)"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1), class_cost(3))
    with pytest.raises(ValueError, match=r"cost must be \(4, 4\) for K=4 classes, got \(5, 5\)"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1), class_cost(5), background=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1), cost, temperature=0.0)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        wkd_logit_dense_loss(cls_levels(0), cls_levels(1), cost, topk=0)


def test_roi_features_sample_bin_centers_and_box_levels():
    from ckakd.detection.distill import box_levels, roi_features

    h, w, stride = 6, 8, 4
    cols = torch.arange(w, dtype=torch.float64).expand(h, w)
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    feature = torch.stack([cols, rows])  # channel 0: the cell's column, channel 1: its row
    boxes = torch.tensor([[4.0, 6.0, 20.0, 18.0], [2.0, 2.0, 30.0, 22.0]], dtype=torch.float64)
    out = roi_features(feature, boxes, stride, output_size=3)
    assert out.shape == (2, 2, 3, 3)
    for n, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        for i in range(3):
            for j in range(3):
                cx, cy = x0 + (j + 0.5) * (x1 - x0) / 3, y0 + (i + 0.5) * (y1 - y0) / 3
                # bilinear on a linear ramp: exact, cell c centered at (c + 1/2)·stride
                assert float(out[n, 0, i, j]) == pytest.approx(cx / stride - 0.5)
                assert float(out[n, 1, i, j]) == pytest.approx(cy / stride - 0.5)
    sides = torch.tensor([[0, 0, 32, 32], [0, 0, 64, 64], [0, 0, 8, 8], [0, 0, 4000, 4000]], dtype=torch.float32)
    assert box_levels(sides, [8, 16, 32, 64, 128]).tolist() == [0, 1, 0, 4]  # 4 strides wide, clamped


@pytest.fixture
def one_thread():
    """Tiny convs gain nothing from intra-op threads, and oversubscribed cores make them crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_detector(kind: str, seed: int = 0, out_channels: int = 16):
    from ckakd.detection.models import FCOS, RetinaNet

    torch.manual_seed(seed)
    cls = RetinaNet if kind == "retinanet" else FCOS
    return cls(10, depth=18, width=8, out_channels=out_channels, num_convs=1)


def tiny_digits(n: int = 24):
    pytest.importorskip("sklearn")  # the digits' source
    from ckakd.detection.data import SyntheticDigitsDetection

    return SyntheticDigitsDetection(n, image_size=64, max_objects=3, scales=(16, 32), seed=2)  # >= 3 boxes per class


def centroid_by_hand(teacher, dataset) -> torch.Tensor:
    """Class means of the RoI-aligned cls-tower features, one image at a time; cosine of the means."""
    from ckakd.detection.distill import box_levels, roi_features

    teacher.eval()
    sums, counts = {}, {}
    with torch.no_grad():
        for idx in range(len(dataset)):
            image, target = dataset[idx]
            maps = [teacher.head.cls_tower(f) for f in teacher.features(image[None])]
            levels = box_levels(target["boxes"], teacher.strides)
            for box, label, lv in zip(target["boxes"], target["labels"].tolist(), levels.tolist(), strict=True):
                row = roi_features(maps[lv][0], box[None], teacher.strides[lv], 7).flatten().double()
                sums[label] = sums.get(label, 0) + row
                counts[label] = counts.get(label, 0) + 1
    means = torch.stack([sums[c] / counts[c] for c in range(10)])
    return F.normalize(means, dim=1) @ F.normalize(means, dim=1).T


def test_detection_class_interrelation_on_synthetic_digits(one_thread):
    from ckakd.detection.distill import detection_class_interrelation

    teacher = tiny_detector("retinanet")
    teacher.train()
    data = tiny_digits()
    ir = detection_class_interrelation(teacher, data, kernel="cka", samples_per_class=2)
    assert teacher.training  # its mode is restored
    assert ir.shape == (10, 10) and ir.dtype == torch.float32 and torch.isfinite(ir).all()
    torch.testing.assert_close(ir, ir.T)
    torch.testing.assert_close(ir.diagonal(), torch.ones(10))
    assert float(ir.abs().max()) <= 1.0 and float((ir - torch.eye(10)).abs().max()) > 0.01
    cost = ckakd.cost_from_interrelation(ir)
    assert cost.shape == (10, 10) and float(cost.min()) >= 0

    centroid = detection_class_interrelation(teacher, data, kernel="centroid", batch_size=5)
    expected = centroid_by_hand(teacher, data).float()
    torch.testing.assert_close(centroid, expected.fill_diagonal_(1.0), atol=1e-5, rtol=1e-5)

    fcos = tiny_detector("fcos")
    weights = F.normalize(fcos.head.cls_logits.weight.detach().flatten(1), dim=1)  # (K, C·3·3), one anchor
    cosine = detection_class_interrelation(fcos, kernel="cosine")
    torch.testing.assert_close(cosine, (weights @ weights.T).fill_diagonal_(1.0), atol=1e-6, rtol=1e-6)

    with pytest.raises(ValueError, match=r"needs 50 rows per class, but these classes have fewer"):
        detection_class_interrelation(teacher, data, samples_per_class=50)
    with pytest.raises(ValueError, match="source must be one of"):
        detection_class_interrelation(teacher, data, source="logits")
    with pytest.raises(ValueError, match="needs a dataset"):
        detection_class_interrelation(teacher)


def test_detection_class_interrelation_reads_coco(tmp_path, one_thread):
    pytest.importorskip("PIL")
    import json

    from PIL import Image

    from ckakd.detection.data import CocoDetection
    from ckakd.detection.distill import detection_class_interrelation

    data = tiny_digits()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(len(data)):
        arr = (data[i][0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(arr).save(images / data.file_name(i))
    (tmp_path / "instances.json").write_text(json.dumps(data.to_coco()))
    coco = CocoDetection(images, tmp_path / "instances.json")
    teacher = tiny_detector("fcos")
    got = detection_class_interrelation(teacher, coco, kernel="centroid", source="fpn")
    expected = detection_class_interrelation(teacher, data, kernel="centroid", source="fpn")
    assert got.shape == (10, 10)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # 8-bit PNG rounding of the images


@pytest.mark.parametrize("kind", ["retinanet", "fcos"])
@pytest.mark.parametrize("method", ["wkd_l", "wkd_lf"])
def test_distiller_wkd_l_step(kind, method, one_thread):
    from ckakd.detection.data import make_detection_loader
    from ckakd.detection.distill import detection_class_interrelation, wkd_logit_dense_loss
    from ckakd.detection.trainer import DetectionDistiller

    teacher, student = tiny_detector(kind, seed=1, out_channels=24), tiny_detector(kind, seed=2)
    with torch.no_grad():
        teacher.head.cls_logits.bias.zero_()  # a "confident" teacher: sigmoid ~0.5, every location a candidate
    cost = ckakd.cost_from_interrelation(detection_class_interrelation(teacher, kernel="cosine"))
    d = DetectionDistiller(student, teacher, method=method, cost=cost, topk=50)
    assert d.weight == 30.0 and d.temperature == 2.0 and d.cost.shape == (11, 11)
    assert (d.extra is None) == (method == "wkd_l")  # FPN channels differ: WKD-F needs a projector, WKD-L not
    d.train()
    images, targets, sizes = next(iter(make_detection_loader(tiny_digits(2), 2, False, 0)))
    losses = d.forward_train(images, targets, sizes)
    assert {"cls", "box", "distill"} <= set(losses) and ("distill_feat" in losses) == (method == "wkd_lf")
    assert all(torch.isfinite(v) for v in losses.values()) and float(losses["distill"].detach()) > 0
    with torch.no_grad():  # the term is the dense WKD-L of the two heads' logits
        s_out = student.head_outputs(student.features(images))["cls_logits"]
        t_out = teacher.head_outputs(teacher.features(images))["cls_logits"]
    expected = wkd_logit_dense_loss(s_out, t_out, cost, temperature=2.0, weight=30.0, topk=50)
    torch.testing.assert_close(losses["distill"].detach(), expected)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert float(student.head.cls_logits.weight.grad.abs().sum()) > 0
    if d.extra is not None:
        assert float(d.extra.proj[0].weight.grad.abs().sum()) > 0

    quiet = tiny_detector(kind, seed=1)  # prior 0.01 < score_thresh 0.05: nothing selected, an attached 0
    d0 = DetectionDistiller(tiny_detector(kind, seed=2), quiet, method="wkd_l", cost=cost)
    zero = d0.forward_train(images, targets, sizes)["distill"]
    assert float(zero.detach()) == 0.0 and zero.grad_fn is not None


def test_distiller_wkd_l_needs_a_cost():
    from ckakd.detection.trainer import DetectionDistiller

    teacher, student = tiny_detector("fcos", seed=1), tiny_detector("fcos", seed=2)
    with pytest.raises(ValueError, match=r"method='wkd_l' needs cost=, a \(10, 10\) class cost"):
        DetectionDistiller(student, teacher, method="wkd_l")
    with pytest.raises(ValueError, match=r"cost must be \(10, 10\) or \(11, 11\).*got \(4, 4\)"):
        DetectionDistiller(student, teacher, method="wkd_lf", cost=class_cost(4))
    d = DetectionDistiller(student, teacher, method="wkd_l", cost=with_bg(class_cost(10)))
    assert d.cost.shape == (11, 11)


def with_bg(cost: torch.Tensor) -> torch.Tensor:
    from ckakd.detection.distill import with_background_cost

    return with_background_cost(cost.float(), 1.0)
