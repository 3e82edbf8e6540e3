"""Category interrelations (IR) and the WKD-L transport cost built from them (WKD, Lv et al., NeurIPS 2024; offline).

IR(C_i, C_j) compares teacher features of class i and class j. Kernels (the WKD paper's ablation):
  "cka"      linear CKA between the class matrices X_i, X_j ∈ R^{b×d} (their b×b centered Grams)
  "poly"     the same with the kernel (x·y/d + 1)^degree
  "rbf"      the same with exp(-‖x - y‖² / (2σ²)), σ² = median nonzero squared distance within the class
  "centroid" cosine similarity of the class means
  "cosine"   cosine similarity of classifier weight rows (input (C, d), not features)
The CKA-type kernels pair sample k of class i with sample k of class j, as WKD's formula does, so
every class needs the same number b of samples.

``InterrelationBuilder`` streams (features, labels) batches and keeps at most b rows per class
(C·b·d memory); ``interrelation_from_loader`` drives it from a teacher and a data loader;
``save_interrelation`` / ``load_interrelation`` store the result next to the teacher.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ckakd import _checks
from ckakd._fileio import atomic_write
from ckakd.ops import _gram_primitives

__all__ = [
    "KERNELS",
    "interrelation",
    "cost_from_interrelation",
    "InterrelationBuilder",
    "interrelation_from_loader",
    "save_interrelation",
    "load_interrelation",
]

KERNELS = ("cka", "poly", "rbf", "centroid", "cosine")
_GRAM_KERNELS = ("cka", "poly", "rbf")
LAYOUTS = ("rows", "spatial")
FORMAT_TAG = "ckakd.interrelation"
FORMAT_VERSION = 1


def _check_kernel(kernel: str, allowed=KERNELS) -> None:
    if kernel not in allowed:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, allowed))}; got {kernel!r}")


def _rescaled(x: Tensor) -> Tensor:
    """x (m, ...) with every x[i] divided by a power of two 2^e_i, max|x[i]| in [1/2, 1) (exact): the
    similarities below are invariant to it, and it keeps squares and products of fp32 features from
    overflowing (|x| ≳ 1e19) or underflowing into denormals (|x| ≲ 1e-19)."""
    return _gram_primitives.mul_pow2(x, -_gram_primitives.pow2_exponent(x))


def _normalized_rows(x: Tensor) -> Tensor:
    """Rows (..., m, d) scaled to unit L2 norm at any magnitude; all-zero rows stay zero."""
    shape = x.shape
    x = _rescaled(x.reshape(-1, shape[-1])).reshape(shape)
    return F.normalize(x, dim=-1, eps=torch.finfo(x.dtype).tiny)


def _finish(ir: Tensor) -> Tensor:
    """Symmetric, clipped to [-1, 1], unit diagonal (self-similarity is 1 by definition)."""
    ir = ((ir + ir.T) / 2).clamp(-1.0, 1.0)
    return ir.fill_diagonal_(1.0)


def _center_gram(k: Tensor) -> Tensor:
    """H K H for a batch of Grams (C, b, b)."""
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _median_nonzero(values: Tensor) -> Tensor:
    """Per-row median (mean of the two middle values) of the nonzero entries of (C, m); 1 where none."""
    nonzero = values > 0
    k = nonzero.sum(-1, keepdim=True)
    ordered = torch.where(nonzero, values, torch.full_like(values, float("inf"))).sort(-1).values
    lo = ((k - 1) // 2).clamp_min(0)
    hi = (k // 2).clamp(max=values.shape[-1] - 1)
    med = (ordered.gather(-1, lo) + ordered.gather(-1, hi)) / 2
    return torch.where(k > 0, med, torch.ones_like(med)).squeeze(-1)


def _class_grams(x: Tensor, kernel: str, degree: int) -> Tensor:
    """Centered b×b Grams (C, b, b) of the class matrices x (C, b, d), each up to a positive factor
    (the interrelation is invariant to one per class): the linear and RBF kernels see every class
    rescaled by a power of two, the polynomial kernel's base is rescaled before the power."""
    if kernel == "cka":
        x = _rescaled(x)
        xc = x - x.mean(1, keepdim=True)  # center the features, not the Gram (fp32 cancellation)
        return xc @ xc.mT
    x = x.double()  # nonlinear kernels: the Gram must be formed before centering, so use float64
    if kernel == "poly":
        # (x·y/d + 1)^degree is not scale-invariant; dividing the base by a power of two per class first
        # keeps the power finite (it overflows float64 for large features or degrees)
        k = _rescaled(x @ x.mT / x.shape[-1] + 1.0).pow(degree)
    else:  # rbf; distances are offset-invariant, so compute them from centered features
        x = _rescaled(x)  # exp(-d²/2σ²) with σ² ∝ d² is scale-invariant
        xc = x - x.mean(1, keepdim=True)
        d2 = torch.cdist(xc, xc, compute_mode="donot_use_mm_for_euclid_dist").square()
        iu = torch.triu_indices(x.shape[1], x.shape[1], 1, device=x.device)
        sigma2 = _median_nonzero(d2[:, iu[0], iu[1]])
        k = torch.exp(-d2 / (2.0 * sigma2[:, None, None]))
    return _center_gram(k)


@_checks.without_autocast  # Grams in fp32 (fp64) under autocast too
def interrelation(class_features: Tensor, *, kernel: str = "cka", degree: int = 2) -> Tensor:
    """Category interrelation matrix IR (C, C): symmetric, unit diagonal.

    class_features: (C, b, d), b samples of class i in class_features[i] (equal counts), for kernels
    "cka", "poly", "rbf", "centroid"; (C, d) classifier weights (rows = classes) for "cosine".
    cka/poly/rbf: IR_ij = ⟨K̃_i, K̃_j⟩ / (‖K̃_i‖‖K̃_j‖) with K̃ the centered b×b Gram of class i
    (linear, (x·y/d + 1)^degree, or RBF with the class's median bandwidth); all C² pairs at once as
    G Gᵀ of the flattened normalized Grams (memory C·b²). A class with constant features has zero
    similarity to the others. Returns fp32 (fp64 for fp64 input) on the input's device. Every class (and
    every weight row) is rescaled by a power of two first, so fp32 features at any scale the dtype holds
    (~1e-30 ... 1e30 and beyond) give the IR of the unscaled features; poly is not scale-invariant and
    gives that of the scaled ones, its base rescaled before the power so that it does not overflow.
    """
    _check_kernel(kernel)
    _checks.check_float_tensor("class_features", class_features)
    acc = _checks.accumulation_dtype(class_features)
    if kernel == "cosine":
        _checks.check_rank(
            "class_features", class_features, (2,), "(C, d) (classifier weights)", "kernel='cosine' takes weights"
        )
        w = _normalized_rows(class_features.to(acc))
        return _finish(w @ w.T)
    _checks.check_rank("class_features", class_features, (3,), "(C, b, d) (b samples per class)")
    c, b, d = class_features.shape
    if c < 1 or d < 1:
        raise ValueError(f"class_features needs C >= 1 classes and d >= 1 features, got {tuple(class_features.shape)}")
    x = class_features.to(acc)
    if kernel == "centroid":
        if b < 1:
            raise ValueError(f"kernel='centroid' needs at least 1 sample per class, got {tuple(x.shape)}")
        m = _normalized_rows(x.double().mean(1))
        return _finish((m @ m.T).to(acc))
    if b < 2:
        raise ValueError(
            f"kernel={kernel!r} needs at least 2 samples per class (centered Grams), "
            f"class_features has shape {tuple(x.shape)}"
        )
    if kernel == "poly" and (not isinstance(degree, int) or isinstance(degree, bool) or degree < 1):
        raise ValueError(f"degree must be a positive int, got {degree!r}")
    grams = _class_grams(x, kernel, degree).reshape(c, b * b)
    g = _normalized_rows(grams)
    return _finish((g @ g.T).to(acc))


def cost_from_interrelation(ir: Tensor, *, sharpen: float = 1.0) -> Tensor:
    """WKD-L ground cost (C, C) from an interrelation matrix.

    D = 1 - IR with a zero diagonal; D <- 1 - exp(-sharpen·D); cost = relu(D) + 1e-8 (public WKD code;
    sharpen κ = 1, 2 for ResNet50 -> MobileNetV1). Larger sharpen makes every off-diagonal cost larger.
    """
    _checks.check_float_tensor("ir", ir)
    if ir.dim() != 2 or ir.shape[0] != ir.shape[1]:
        raise ValueError(f"ir must be a square (C, C) matrix, got {tuple(ir.shape)}")
    if not sharpen > 0:
        raise ValueError(f"sharpen must be > 0, got {sharpen}")
    d = 1.0 - ir
    d = d - torch.diag_embed(d.diagonal())
    d = 1.0 - torch.exp(-sharpen * d)
    return torch.relu(d) + 1e-8


# --------------------------------------------------------------------------------------------- streaming


def _class_list(classes: Tensor, limit: int = 20) -> str:
    ids = classes.tolist()
    shown = ", ".join(map(str, ids[:limit]))
    return shown + (f", ... ({len(ids)} classes)" if len(ids) > limit else "")


class InterrelationBuilder:
    """Streamed interrelation: feed (features, labels) batches, then ``compute()`` the IR (C, C).

    Keeps the first ``samples_per_class`` rows seen of every class (memory C·b·d on the features'
    device, never the dataset); kernel "centroid" keeps running float64 sums instead (no cap).
    feature_layout "rows": features (N, d), one row per sample. "spatial": features (N, C', H, W), every
    spatial position becomes a row of dim C' with the sample's label (the public CIFAR code's choice).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        kernel: str = "cka",
        samples_per_class: int = 256,
        feature_layout: str = "rows",
        degree: int = 2,
    ) -> None:
        _check_kernel(kernel, ("cka", "poly", "rbf", "centroid"))
        if feature_layout not in LAYOUTS:
            raise ValueError(f"feature_layout must be one of {', '.join(map(repr, LAYOUTS))}; got {feature_layout!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if kernel in _GRAM_KERNELS and (not isinstance(samples_per_class, int) or samples_per_class < 2):
            raise ValueError(f"samples_per_class must be an int >= 2 for kernel={kernel!r}, got {samples_per_class!r}")
        self.num_classes = num_classes
        self.kernel = kernel
        self.samples_per_class = samples_per_class
        self.feature_layout = feature_layout
        self.degree = degree
        self.counts = torch.zeros(num_classes, dtype=torch.long)  # rows kept (capped) or seen (centroid)
        self._store: Tensor | None = None  # (C, b, d) rows, or (C, d) float64 sums for "centroid"
        self._out_dtype = torch.float32

    @property
    def capped(self) -> bool:
        """Whether the builder keeps a fixed number of rows per class (every kernel but "centroid")."""
        return self.kernel != "centroid"

    @property
    def is_full(self) -> bool:
        """True once every class holds ``samples_per_class`` rows (never for "centroid")."""
        return self.capped and bool((self.counts >= self.samples_per_class).all())

    def _rows(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        _checks.check_float_tensor("features", features)
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dim() != 1:
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels must be a 1-D integer tensor, got {got}")
        if self.feature_layout == "rows":
            hint = "use feature_layout='spatial' for (N, C, H, W) maps"
            _checks.check_rank("features", features, (2,), "(N, d)", hint)
        else:
            _checks.check_rank("features", features, (4,), "(N, C, H, W)", "feature_layout='spatial'")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"features and labels must have the same batch size N, got {tuple(features.shape)} and "
                f"{tuple(labels.shape)}"
            )
        labels = labels.to(features.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {_class_list(bad)}")
        if self.feature_layout == "spatial":
            n, c, h, w = features.shape
            features = features.permute(0, 2, 3, 1).reshape(n * h * w, c)
            labels = labels.repeat_interleave(h * w)
        return features.detach(), labels

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: features (N, d) ("rows") or (N, C', H, W) ("spatial"), integer labels (N,)."""
        rows, labels = self._rows(features, labels)
        d = rows.shape[1]
        if self._store is None:
            self._out_dtype = _checks.accumulation_dtype(rows)
            if self.capped:
                shape = (self.num_classes, self.samples_per_class, d)
                self._store = torch.zeros(shape, dtype=rows.dtype, device=rows.device)
            else:
                self._store = torch.zeros(self.num_classes, d, dtype=torch.float64, device=rows.device)
        elif self._store.shape[-1] != d:
            raise ValueError(f"features have dimension {d}, but earlier batches had {self._store.shape[-1]}")
        rows, labels = rows.to(self._store.device), labels.to(self._store.device)
        counts = self.counts.to(self._store.device)
        if not self.capped:
            self._store.index_add_(0, labels, rows.double())
            self.counts = (counts + torch.bincount(labels, minlength=self.num_classes)).cpu()
            return
        # Slot of each row = rows of its class kept so far + its rank among this batch's rows of that class.
        order = torch.sort(labels, stable=True).indices
        sorted_labels = labels[order]
        first = torch.searchsorted(sorted_labels, sorted_labels)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device) - first
        slot = counts[labels] + rank
        keep = slot < self.samples_per_class
        self._store[labels[keep], slot[keep]] = rows[keep].to(self._store.dtype)
        added = torch.bincount(labels, minlength=self.num_classes)
        self.counts = (counts + added).clamp(max=self.samples_per_class).cpu()

    def compute(self) -> Tensor:
        """The IR (C, C); raises ValueError naming the classes that lack rows."""
        need = self.samples_per_class if self.capped else 1
        short = torch.nonzero(self.counts < need).flatten()
        if self._store is None or short.numel():
            missing = short if short.numel() else torch.arange(self.num_classes)
            raise ValueError(
                f"kernel={self.kernel!r} needs {need} rows per class, but these classes have fewer: "
                f"{_class_list(missing)} (counts {self.counts[missing][:20].tolist()}); feed more data "
                "or lower samples_per_class"
            )
        if self.capped:
            return interrelation(self._store, kernel=self.kernel, degree=self.degree)
        means = self._store / self.counts.to(self._store.device, torch.float64).unsqueeze(1)
        return interrelation(means.unsqueeze(1), kernel="centroid").to(self._out_dtype)

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "kernel": self.kernel,
            "samples_per_class": self.samples_per_class,
            "feature_layout": self.feature_layout,
            "degree": self.degree,
            "counts": self.counts.clone(),
            "out_dtype": self._out_dtype,
            "store": None if self._store is None else self._store.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_classes", "kernel", "samples_per_class", "feature_layout", "degree"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"state has {key}={state.get(key)!r}, this builder has {getattr(self, key)!r}")
        self.counts = state["counts"].clone().cpu()
        self._out_dtype = state.get("out_dtype", torch.float32)
        self._store = None if state["store"] is None else state["store"].clone()


def interrelation_from_loader(
    feature_fn: Callable[[Any], Tensor],
    loader: Iterable,
    num_classes: int,
    *,
    kernel: str = "cka",
    samples_per_class: int = 256,
    feature_layout: str = "rows",
    degree: int = 2,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """IR (C, C) from teacher features: feature_fn(x) for every (x, y) batch of ``loader``, under no_grad.

    feature_fn: e.g. the teacher's penultimate features or logits (put a module in eval mode first;
    this function does not change its mode). x is moved to ``device`` when given. Stops as soon as
    every class holds ``samples_per_class`` rows (all kernels but "centroid", which reads the whole
    loader). A tqdm bar is shown when tqdm is installed and progress=True.
    """
    builder = InterrelationBuilder(
        num_classes, kernel=kernel, samples_per_class=samples_per_class, feature_layout=feature_layout, degree=degree
    )
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(total=total, desc=f"interrelation ({kernel})", disable=not progress) if tqdm is not None else None
    batches = 0
    try:
        with torch.no_grad():
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError(f"loader must yield (x, y) batches, got {type(batch).__name__}")
                x, y = batch[0], batch[1]
                if device is not None and isinstance(x, Tensor):
                    x = x.to(device)
                builder.update(feature_fn(x), torch.as_tensor(y))
                batches += 1
                if bar is not None:
                    bar.update(1)
                    if builder.capped:
                        bar.set_postfix(full=f"{int((builder.counts >= samples_per_class).sum())}/{num_classes}")
                if builder.is_full:
                    break
    finally:
        if bar is not None:
            bar.close()
    if batches == 0:
        raise ValueError("loader yielded no batches")
    return builder.compute()


# --------------------------------------------------------------------------------------------- storage

_META_TYPES = (type(None), bool, int, float, str, Tensor)


def _check_meta(key: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_meta(key, v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_meta(f"{key}.{k}", v)
    elif not isinstance(value, _META_TYPES):
        raise TypeError(
            f"meta value {key!r} has type {type(value).__name__}; use None, bool, int, float, str, tensors "
            "or lists/dicts of them"
        )


def save_interrelation(path: str | os.PathLike, ir: Tensor, *, kernel: str | None = None, **meta: Any) -> None:
    """Save an IR (C, C) with its kernel and any metadata (e.g. teacher="resnet32x4", samples_per_class=256).

    Written atomically (a temporary file then a rename) as a torch.save'd dict with a format tag.
    """
    _checks.check_float_tensor("ir", ir)
    if ir.dim() != 2 or ir.shape[0] != ir.shape[1]:
        raise ValueError(f"ir must be a square (C, C) matrix, got {tuple(ir.shape)}")
    meta = {"kernel": kernel, **meta}
    for key, value in meta.items():
        _check_meta(key, value)
    payload = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "num_classes": ir.shape[0],
        "ir": ir.detach().cpu().clone(),
        "meta": meta,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def load_interrelation(path: str | os.PathLike, *, map_location: Any = "cpu") -> tuple[Tensor, dict[str, Any]]:
    """Load (ir, meta) written by ``save_interrelation``; meta holds "kernel" and the saved metadata."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no interrelation file at {path!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path!r} is not a ckakd interrelation file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise ValueError(f"{path!r} is not a ckakd interrelation file (missing format tag {FORMAT_TAG!r})")
    version = payload.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path!r} has interrelation format version {version!r}; this ckakd reads <= {FORMAT_VERSION}")
    ir = payload.get("ir")
    c = payload.get("num_classes")
    if not isinstance(ir, Tensor) or ir.dim() != 2 or ir.shape[0] != ir.shape[1] or ir.shape[0] != c:
        shape = tuple(ir.shape) if isinstance(ir, Tensor) else type(ir).__name__
        raise ValueError(f"{path!r} is corrupt: expected a ({c}, {c}) interrelation matrix, found {shape}")
    return ir, dict(payload.get("meta") or {})
