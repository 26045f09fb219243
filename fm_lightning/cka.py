"""Linear CKA between layer representations, and what a run keeps to compute it later.

    k = centered_gram(act_a)                    # (n, ...) -> (n, n) float32, K = H X X' H
    linear_cka(k, centered_gram(act_b))         # float in [0, 1], or None (a constant layer)
    values, defined = cka_matrix(grams, grams)  # (La, Lb) float32, (La, Lb) bool

    recorder = SimilarityRecorder(512, {"conv1": 9216, "conv2": 2048})   # {layer: features p}
    recorder.observe_inputs(indices, x)         # (B,) dataset indices, (B, ...) the batch's inputs
    recorder.observe("conv1", indices, act)     # (B, ...) the layer's output on that batch
    recorder.merge(pl_module.all_gather(recorder.state()))   # DDP: rows from every rank
    record = recorder.record()                  # SimilarityRecord(indices, inputs_sha256, grams)
    save_record(record, "feature_maps/similarity/epoch=003.pt")
    load_record("feature_maps/similarity/epoch=003.pt")   # checked; "expected X, got Y" errors

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", 2019):
for representations X (n x p) and Y (n x q) of the same n inputs, with centred Gram matrices
K = HXX'H and L = HYY'H (H = I - 11'/n), CKA = <K, L> / (||K|| ||L||) (Frobenius). It is 1 for
the same representation up to a rotation and a scale, and invariant to how the features of an
input are ordered, so an (N, C, H, W) map and the same values as (N, H*W, C) tokens give the same
Gram. A layer whose centred Gram is all zeros (dead, constant on the inputs) has no CKA: None,
never NaN; so has one whose Gram is not finite (the layer produced NaN or inf). Near 0 means
unrelated, but unrelated is near 0 only for narrow representations: independent white ones give
about sqrt(pq / ((n + p)(n + q))), 0.02 at p = q = 8 but 0.5 at p = q = n (tests/test_cka.py).

Wide layers. A layer with p features per input is kept as n x min(p, SKETCH_WIDTH) values while
its inputs are observed: wider ones go through a count sketch (:func:`count_sketch`: feature i is
added, with a sign s(i) = +-1, into bucket h(i) of SKETCH_WIDTH; E[<Sx, Sy>] = <x, y>, so the Gram
of the sketch is an unbiased estimate of the exact one). h and s are drawn by torch's CPU
generator seeded from p alone, so every batch, epoch, run and DDP rank uses the same sketch for
a layer of that width, and no p x 4096 matrix is ever made (h and s are two length-p vectors).
On real layers at n = 512 the CKA from sketched Grams is within 0.02 of the exact value: largest
deviation measured 0.0049 on SimpleCNN (conv1, relu1: 9,216 values), 0.0066 on a timm resnet18
(layer1, layer2: 16,384 and 8,192), mostly a little below the exact value (the sketch's noise adds
to the Grams' norms); tests/test_cka.py and benchmarks/similarity_cost.py measure it.

Memory: while observing, n x min(p, 4096) float32 per layer (8 MiB at n = 512); a
:class:`SimilarityRecord` is n x n float32 per layer (1 MiB at n = 512), whatever the width.

Zero variance. float32 activations cannot carry a variation below about 1e-7 of their magnitude,
and a constant computed in different orders (a GPU's reductions) differs by an ulp or so between
inputs. So a representation whose centred part has a norm below :data:`ZERO_VARIANCE_RTOL` times
its norm counts as constant: its Gram is exactly zero, and every CKA with it None.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fm_lightning.files import atomic_write
from fm_lightning.rendering import check_tensor

__all__ = [
    "SKETCH_WIDTH",
    "SimilarityRecord",
    "SimilarityRecorder",
    "centered_gram",
    "cka_matrix",
    "count_sketch",
    "linear_cka",
    "load_record",
    "save_record",
]

#: Most values per input kept for a layer while observing; wider layers are count-sketched.
SKETCH_WIDTH = 4096
#: A centred representation smaller than this fraction of its norm is a constant one.
ZERO_VARIANCE_RTOL = 1e-6
_SKETCH_SEED = 19  # with the layer's width: the sketch of a layer of p features
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = ("indices", "inputs_sha256", "grams")


# ----------------------------------------------------------------------------- the formula


@torch.no_grad()
def centered_gram(x: Tensor) -> Tensor:
    """The centred Gram matrix K = H X X' H of n representations, each a row of ``x`` flattened.

    Precision where it matters, float32 where it does not: the column means are taken in float64
    and subtracted in float32, whose rounding is then relative to the centred values (not to the
    raw ones, which may carry a large offset); the means' own rounding to float32 is a constant
    per column, which centring the (n, n) product again removes. Measured: on SimpleCNN's layers
    on 512 MNIST digits (also with 100 added to them) CKA within 1e-9 of an all-float64 Gram's,
    and a (512, 4096) input's Gram in 26 ms instead of 57 ms (2 CPU cores, best of 10).
    All zeros for a constant representation (see the module docstring).

    Args:
        x: (n, ...) one representation per input, any real dtype and device.

    Returns:
        (n, n) float32 on ``x``'s device.
    """
    _check_tensor(x, "x")
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"expected x of shape (n >= 2, ...), got {tuple(x.shape)}")
    n = x.shape[0]
    x = x.reshape(n, -1).float()  # (n, p); no copy for float32
    mean = x.mean(dim=0, dtype=torch.float64)  # (p,)
    centred = x - mean.float()  # H X, up to a constant per column
    gram = centred @ centred.T  # (n, n)
    # H gram H; the Gram is symmetric, so its row means are its column means.
    means = gram.mean(dim=1)  # (n,)
    gram = gram - means[:, None] - means[None, :] + means.mean()
    # ||HX||^2 = trace(K) and ||X||^2 = ||HX||^2 + n ||mean||^2: the zero-variance rule, cheaply
    variance, offset = gram.trace().double(), n * mean.square().sum()
    if variance <= ZERO_VARIANCE_RTOL**2 * (variance + offset):
        gram.zero_()  # a constant representation: only rounding noise is left
    return gram


@torch.no_grad()
def linear_cka(k: Tensor, l: Tensor) -> float | None:  # noqa: E741 (the paper's K and L)
    """<K, L> / (||K|| ||L||) of two centred Grams of the same inputs, in [0, 1].

    Returns:
        The CKA, or None when either Gram is all zeros (a constant or dead layer) or holds a
        non-finite value (a layer that produced NaN or inf): it has no CKA, and None is never
        mistaken for a number.
    """
    _check_tensor(k, "k")
    _check_tensor(l, "l")
    if k.dim() != 2 or k.shape[0] != k.shape[1] or l.shape != k.shape:
        raise ValueError(
            f"expected two (n, n) Grams of the same n, got {tuple(k.shape)} and {tuple(l.shape)}"
        )
    k, l = k.double(), l.double()  # noqa: E741
    norm_k, norm_l = k.norm(), l.norm()
    if not (norm_k.isfinite() and norm_l.isfinite()) or norm_k == 0 or norm_l == 0:
        return None
    return ((k * l).sum() / (norm_k * norm_l)).item()


@torch.no_grad()
def cka_matrix(
    grams_a: Mapping[str, Tensor], grams_b: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """CKA of every layer of ``grams_a`` (rows) with every layer of ``grams_b`` (columns).

    Args:
        grams_a, grams_b: ``{layer: (n, n) centred Gram}``, all of the same n inputs.

    Returns:
        ``(values, defined)``: (La, Lb) float32 CKA, and (La, Lb) bool, False where the CKA is
        None (:func:`linear_cka`). An undefined cell holds 0.0, never NaN: read ``defined``
        before the value (``similarity_picture`` writes such a cell as "n/a").
    """
    values = torch.zeros(len(grams_a), len(grams_b))
    defined = torch.zeros(len(grams_a), len(grams_b), dtype=torch.bool)
    for i, k in enumerate(grams_a.values()):
        for j, l in enumerate(grams_b.values()):  # noqa: E741
            cka = linear_cka(k, l)
            if cka is not None:
                values[i, j], defined[i, j] = cka, True
    return values, defined


# ----------------------------------------------------------------------------- wide layers


@torch.no_grad()
def count_sketch(x: Tensor, width: int = SKETCH_WIDTH) -> Tensor:
    """(B, ...) -> (B, min(p, width)): each row flattened (p features) and, if p > width,
    count-sketched (see the module docstring) with the fixed sketch of width-p layers.

    The sketch is linear, so sketching batch by batch equals sketching all n rows at once, and
    the centring can come after it. Computed in float32 on ``x``'s device.
    """
    _check_tensor(x, "x")
    flat = x.reshape(x.shape[0], -1).float()  # (B, p)
    p = flat.shape[1]
    if p <= width:
        return flat
    bucket, sign = _sketch(p, width, x.device)  # (p,) long, (p,) float32
    out = torch.zeros(flat.shape[0], width, device=x.device)
    return out.index_add_(1, bucket, flat * sign)  # (B, width)


@functools.lru_cache(maxsize=64)  # MAX_MATCHES layers of one pattern; 12 bytes per feature each
def _sketch(p: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Bucket (p,) long and sign (p,) float32 of the count sketch of p features into ``width``."""
    # Drawn on the CPU, then moved: the same on every device and rank.
    gen = torch.Generator().manual_seed(_SKETCH_SEED * 1_000_003 + p)
    bucket = torch.randint(width, (p,), generator=gen)
    sign = torch.randint(2, (p,), generator=gen).float().mul_(2).sub_(1)
    return bucket.to(device), sign.to(device)


# ----------------------------------------------------------------------------- observing


def _inputs_sha256(row_digests: Tensor) -> str:
    """The sha256 of n inputs from their rows' sha256 digests, (n, 32) uint8 in row order."""
    return hashlib.sha256(row_digests.cpu().numpy().tobytes()).hexdigest()


def _row_digests(x: Tensor) -> Tensor:
    """(B, ...) inputs -> (B, 32) uint8: each row's sha256, over its shape, dtype and bytes."""
    rows = x.detach().cpu().contiguous()
    head = hashlib.sha256(f"{tuple(rows.shape[1:])} {rows.dtype}".encode())
    digests = bytearray()
    for row in rows.reshape(rows.shape[0], -1).view(torch.uint8).numpy():  # (B, bytes per row)
        digest = head.copy()
        digest.update(row)  # the buffer as it is, no copy
        digests += digest.digest()
    return torch.frombuffer(digests, dtype=torch.uint8).reshape(-1, 32)


class SimilarityRecorder:
    """Collects n inputs' representations per layer, sketched, and turns them into Grams.

    Rows are the inputs' dataset indices 0..n-1; indices >= n are ignored, so whole validation
    batches can be passed. A row observed twice keeps the last value (it is the same input).

    Args:
        n: Number of inputs compared (their dataset indices are 0..n-1).
        features: ``{layer: p}``, the number of values each input has at that layer (the
            product of its output shape after the batch dimension). Known up front so that every
            rank's :meth:`state` has the same shapes, even a rank that saw none of the n.
        device: Where the rows are kept (the activations' device, for a DDP all_gather).
    """

    def __init__(
        self, n: int, features: Mapping[str, int], device: torch.device | str = "cpu"
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 2:
            raise ValueError(f"expected n to be an int >= 2, got {n!r}")
        for layer, p in features.items():
            if not isinstance(p, int) or isinstance(p, bool) or p < 1:
                raise ValueError(f"expected features[{layer!r}] to be an int >= 1, got {p!r}")
        self.n = n
        self.features = dict(features)
        self.device = torch.device(device)
        self._rows = {  # {layer: (n, min(p, SKETCH_WIDTH))}
            layer: torch.zeros(n, min(p, SKETCH_WIDTH), device=self.device)
            for layer, p in self.features.items()
        }
        self._seen = {
            layer: torch.zeros(n, dtype=torch.uint8, device=self.device) for layer in features
        }
        self._digests = torch.zeros(n, 32, dtype=torch.uint8, device=self.device)  # (n, sha256)
        self._digested = torch.zeros(n, dtype=torch.uint8, device=self.device)

    @torch.no_grad()
    def observe_inputs(self, indices: Tensor, inputs: Tensor) -> None:
        """Hash the batch's inputs (B, ...) among the n, for the record's ``inputs_sha256``."""
        keep = self._keep(indices, inputs, "inputs")
        if keep.numel():
            rows = indices.to(keep.device)[keep]
            self._digests[rows.to(self.device)] = _row_digests(inputs[keep]).to(self.device)
            self._digested[rows.to(self.device)] = 1

    @torch.no_grad()
    def observe(self, layer: str, indices: Tensor, act: Tensor) -> None:
        """Keep the rows of a batch's output (B, ...) at ``layer`` whose indices are among the n."""
        if layer not in self._rows:
            raise KeyError(f"expected one of the layers {list(self._rows)}, got {layer!r}")
        keep = self._keep(indices, act, "act")
        if not keep.numel():
            return
        p = act[0].numel()
        if p != self.features[layer]:
            raise ValueError(
                f"expected {layer!r} to output {self.features[layer]} values per input, got {p} "
                f"(shape {tuple(act.shape)})"
            )
        rows = indices.to(keep.device)[keep].to(self.device)
        self._rows[layer][rows] = count_sketch(act[keep]).to(self.device)
        self._seen[layer][rows] = 1

    def _keep(self, indices: Tensor, batch: Tensor, name: str) -> Tensor:
        """Positions in the batch of the inputs among the n: (k,) long on ``batch``'s device."""
        if indices.dim() != 1 or indices.dtype != torch.long or len(indices) != len(batch):
            raise ValueError(
                f"expected indices as a LongTensor (B,) with B = {len(batch)} as in {name}, got "
                f"{indices.dtype} of shape {tuple(indices.shape)}"
            )
        if (indices < 0).any():
            raise ValueError(f"expected dataset indices >= 0, got {indices.min().item()}")
        return torch.nonzero(indices.to(batch.device) < self.n).flatten()

    @property
    def seen(self) -> dict[str, int]:
        """``{layer: how many of the n inputs it has seen}``, and ``"inputs"`` hashed."""
        counts = {layer: int(s.sum()) for layer, s in self._seen.items()}
        return {**counts, "inputs": int(self._digested.sum())}

    def state(self) -> dict[str, dict[str, Tensor] | Tensor]:
        """Everything observed, as tensors of fixed shapes, for ``LightningModule.all_gather``."""
        return {
            "rows": dict(self._rows),  # {layer: (n, d)} float32
            "seen": dict(self._seen),  # {layer: (n,)} uint8, 1 = observed
            "digests": self._digests,  # (n, 32) uint8
            "digested": self._digested,  # (n,) uint8
        }

    @torch.no_grad()
    def merge(self, states: Mapping) -> None:
        """Take in every rank's :meth:`state`, as ``all_gather`` stacks them (a leading world
        dimension; a single process's state, without one, is taken as it is).

        A row is taken from the first rank that observed it: a DistributedSampler pads its last
        batches with inputs another rank also has, and those rows are equal.
        """
        for layer, rows in states["rows"].items():
            self._rows[layer], self._seen[layer] = _first_seen(rows, states["seen"][layer])
        self._digests, self._digested = _first_seen(states["digests"], states["digested"])

    def record(self) -> SimilarityRecord:
        """The centred Grams of all n inputs per layer, with their indices and inputs' hash.

        Raises:
            ValueError: If a layer, or the inputs, were not observed on all n inputs (a
                validation set of fewer than n inputs, or ``limit_val_batches`` cutting them
                short): a Gram of fewer rows would not compare with other epochs' or runs'.
        """
        for what, count in self.seen.items():
            if count != self.n:
                missing = self._digested if what == "inputs" else self._seen[what]
                first = int(torch.nonzero(missing == 0).flatten()[0])
                raise ValueError(
                    f"expected all {self.n} inputs (dataset indices 0..{self.n - 1}) observed for "
                    f"{what!r}, got {count} (first missing: index {first}); the validation set "
                    f"must hold at least n = {self.n} inputs, all of them validated (and under "
                    "DDP, merge() the all_gather of every rank's state() first)"
                )
        return SimilarityRecord(
            indices=torch.arange(self.n),
            inputs_sha256=_inputs_sha256(self._digests),
            grams={layer: centered_gram(rows).cpu() for layer, rows in self._rows.items()},
        )


def _first_seen(values: Tensor, seen: Tensor) -> tuple[Tensor, Tensor]:
    """(W, n, ...) values and (W, n) seen flags -> per row, the first rank's value that saw it."""
    if seen.dim() == 1:  # one process: nothing was stacked
        return values, seen
    first = (seen != 0).int().argmax(dim=0)  # (n,) the first rank with the row (0 if none)
    rows = torch.arange(values.shape[1], device=values.device)
    return values[first, rows], seen.amax(dim=0)


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SimilarityRecord:
    """What a run keeps of one captured epoch to compare it later: ``similarity/epoch=NNN.pt``."""

    indices: Tensor  # (n,) long: the inputs' dataset indices, in row order
    inputs_sha256: str  # of the n inputs (see SimilarityRecorder.observe_inputs)
    grams: dict[str, Tensor]  # {layer: (n, n) float32 centred Gram}

    def to_dict(self) -> dict:
        return {
            "indices": self.indices,
            "inputs_sha256": self.inputs_sha256,
            "grams": dict(self.grams),
        }


def save_record(record: SimilarityRecord, path: str | os.PathLike) -> Path:
    """Write ``record`` to ``path`` (e.g. ``.../similarity/epoch=003.pt``) atomically; parent
    directories are created. Checked as :func:`load_record` checks, before anything is written."""
    path = Path(path)
    data = record.to_dict()
    _check_record(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(data, f)
    return path


def load_record(path: str | os.PathLike) -> SimilarityRecord:
    """Read a file :func:`save_record` wrote, with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: It is not one :func:`save_record` wrote, or it is damaged; the message names
            the file and what was expected.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle, zip and unpickler errors alike: the file is damaged
        raise ValueError(
            f"cannot read {path}: not a file torch.save wrote, or damaged ({err})"
        ) from None
    _check_record(data, path)
    return SimilarityRecord(data["indices"], data["inputs_sha256"], dict(data["grams"]))


def _check_record(data: object, path: Path) -> None:
    """Raise ValueError "expected X, got Y" unless ``data`` is a record's dict."""
    if not isinstance(data, dict) or sorted(data) != sorted(_RECORD_KEYS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"expected {path} to hold a dict with keys {list(_RECORD_KEYS)}, got {got}"
        )
    indices, sha, grams = (data[key] for key in _RECORD_KEYS)
    if not (isinstance(indices, Tensor) and indices.dtype == torch.long and indices.dim() == 1):
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, Tensor) else indices
        raise ValueError(f"expected {path}'s indices as a LongTensor (n,), got {got!r:.80}")
    n = len(indices)
    if not (isinstance(sha, str) and _SHA256_HEX.fullmatch(sha)):
        raise ValueError(f"expected {path}'s inputs_sha256 as 64 hex digits, got {sha!r:.80}")
    if not isinstance(grams, dict) or not grams:
        raise ValueError(
            f"expected {path}'s grams as a non-empty {{layer: (n, n)}}, got {grams!r:.80}"
        )
    for layer, gram in grams.items():
        if not (
            isinstance(layer, str)
            and isinstance(gram, Tensor)
            and gram.dtype == torch.float32
            and tuple(gram.shape) == (n, n)
        ):
            got = f"{gram.dtype} {tuple(gram.shape)}" if isinstance(gram, Tensor) else gram
            raise ValueError(
                f"expected {path}'s grams[{layer!r}] as float32 ({n}, {n}), got {got!r:.80}"
            )


def _check_tensor(x: object, name: str) -> None:
    check_tensor(x, name)
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"expected {name} to be a real tensor, got dtype {x.dtype}")
