"""Class-activation maps (where the model looks) without touching its training state.

Example::

    result = class_activation_maps(model, probe, method="GradCAM", layer="conv2", targets=labels)
    result.pred, result.prob      # (N,) predicted class and its softmax probability
    result.pred_maps              # (N, H, W) in [0, 1], at the probe's H, W
    grid = cam_grid(probe, result, cmap="viridis", alpha=0.5)  # (H', W', 3) uint8
    save_png(grid, "cam/epoch=003.png")                        # fm_lightning.files
    print(cam_caption(result))    # "GradCAM on conv2; columns: ... 1: pred 7 (p=0.98), true 7; ..."

The maps are computed by torchcam (``torchcam.methods``); this module chooses the classes,
upsamples the maps and draws them. :func:`class_activation_maps` may be called in the middle of
training, e.g. from a Lightning callback during validation (``torch.no_grad()`` inside ``fit``,
``torch.inference_mode()`` in ``trainer.validate``): it runs with gradients on, on an ordinary
copy of the inputs, and leaves behind no hook and no change to parameters' ``.grad`` or
``requires_grad``, to any submodule's train/eval mode or to the CPU and CUDA random number
generators (see :func:`training_state_preserved`). It never sees an optimizer. Call it on the
unwrapped module (not a DDP wrapper), on one process.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchcam.methods
from torch import Tensor, nn
from torchcam.methods._utils import locate_candidate_layer

from fm_lightning.capture import eval_mode
from fm_lightning.layouts import first_tensor
from fm_lightning.rendering import check_tensor, colorize, normalize_maps, tile_grid, upscale

__all__ = [
    "CAM_METHODS",
    "CamResult",
    "cam_caption",
    "cam_grid",
    "check_cam_method",
    "class_activation_maps",
    "training_state_preserved",
]

#: torchcam methods that need nothing but the model and the layer, each tested in
#: tests/test_cam.py (localisation >= 99.7% there). The first five use gradients; ScoreCAM
#: forwards one masked copy of the input per channel of the layer. Left out: ``SSCAM`` and
#: ``ISCAM`` (tens of noisy copies per channel: 2 s per 32x32 image on a 3-layer net on a CPU,
#: and 90% and 77% in the localisation test), ``CAM`` (needs a single fully connected layer
#: after global pooling), and ``FinerCAM``, ``RefineCAM`` and ``LeGrad`` (other arguments:
#: reference classes, several layers, attention blocks).
CAM_METHODS = ("GradCAM", "GradCAMpp", "SmoothGradCAMpp", "XGradCAM", "LayerCAM", "ScoreCAM")
# Methods that compute gradients from the scores of our forward pass: a second map (the true
# class) needs that graph kept alive after the first. The others run their own forward passes.
_SCORE_GRADIENT_METHODS = ("GradCAM", "GradCAMpp", "XGradCAM", "LayerCAM")
# SmoothGradCAMpp adds noise: a fixed seed (inside a forked RNG, so training's
# random stream is untouched) makes a map change only when the model does.
_NOISE_SEED = 0
# Drawn in the true-class column when the prediction is right: nothing more to show.
_SAME_CLASS_GREY = 0.5
# Smallest side of a drawn tile: 28x28 MNIST tiles are enlarged x3 so the overlay is readable.
_MIN_TILE_PX = 64


def check_cam_method(name: object) -> str:
    """Returns ``name`` if it is one of :data:`CAM_METHODS`; else a ValueError naming them."""
    if name in CAM_METHODS:
        return name
    close = difflib.get_close_matches(str(name), CAM_METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"expected a CAM method, one of {', '.join(CAM_METHODS)}, got {name!r}{hint}")


@dataclass(frozen=True)
class CamResult:
    """What :func:`class_activation_maps` found for N images. Tensors are on the inputs' device.

    Attributes:
        pred: (N,) int64, the predicted class (argmax of the logits).
        prob: (N,) float32, its softmax probability.
        pred_maps: (N, H, W) float32 in [0, 1], the map for the predicted class, upsampled
            (bilinear) to the inputs' H, W; each map is scaled to its own maximum.
        true_maps: (N, H, W) like ``pred_maps``, the map for the true class; where the prediction
            is right (``pred == target``) it is the same map as ``pred_maps``. None without targets.
        target: (N,) int64 true classes, or None.
        layer: the module name the maps come from (torchcam's choice when none was given).
        method: the torchcam method, e.g. ``"GradCAM"``.
    """

    pred: Tensor
    prob: Tensor
    pred_maps: Tensor
    true_maps: Tensor | None
    target: Tensor | None
    layer: str
    method: str


@contextlib.contextmanager
def training_state_preserved(model: nn.Module) -> Iterator[None]:
    """Runs the body with gradients on and puts the model's training state back afterwards.

    Inside: ``torch.inference_mode(False)`` and ``torch.enable_grad()`` (so it works within
    Lightning's validation loops), the model in eval mode, and the CPU (and, if initialised, CUDA)
    random number generators forked. On exit, exception or not: every submodule's ``training``
    flag, every parameter's ``requires_grad`` and ``.grad`` object restored, the RNG states
    restored. A parameter's ``.grad`` changed in place (it cannot be undone without a copy of
    every gradient) raises RuntimeError on a normal exit; torchcam never does that, as it
    takes gradients with ``torch.autograd.grad``, which does not accumulate into ``.grad``.
    """
    params = [
        (name, p, p.requires_grad, p.grad, None if p.grad is None else p.grad._version)
        for name, p in model.named_parameters()
    ]
    # Querying CUDA's RNG would initialise CUDA, which a process that never used it (or a
    # forked DataLoader worker) must not do.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with (
        torch.random.fork_rng(devices=cuda_devices),
        torch.inference_mode(False),
        torch.enable_grad(),
        eval_mode(model),  # every submodule's own mode back afterwards
    ):
        try:
            yield
        finally:
            for _, p, requires_grad, grad, _ in params:
                p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad
    changed = [
        name
        for name, _, _, grad, version in params
        if grad is not None and grad._version != version
    ]
    if changed:
        raise RuntimeError(
            f"expected parameters' .grad untouched by the CAM pass, got {len(changed)} modified "
            f"in place by the model: {', '.join(changed[:5])}"
        )


def class_activation_maps(
    model: nn.Module,
    inputs: Tensor,
    method: str = "GradCAM",
    layer: str | None = None,
    targets: Tensor | None = None,
    reshape: Callable[[Tensor], Tensor] | None = None,
) -> CamResult:
    """Class-activation maps of ``inputs`` for the predicted and (given targets) true classes.

    One forward pass of ``inputs`` (a copy) in eval mode with gradients on, then torchcam's
    ``method`` on ``layer`` for the predicted class and, with ``targets``, for the true class
    (one more backward pass; for ScoreCAM more forward passes). The model's training
    state is untouched (:func:`training_state_preserved`); torchcam's hooks are removed on exit.

    Args:
        model: A classifier: ``model(inputs)`` returns (N, num_classes) logits. Unwrapped (not
            DDP); any dtype and device, ``inputs`` on the same.
        inputs: (N, C, H, W) images as the model takes them; may be an inference tensor.
        method: One of :data:`CAM_METHODS`.
        layer: A module name from ``model.named_modules()`` (dotted, e.g. ``"layer4.1.conv2"``)
            whose output is (N, C, h, w), or whose output ``reshape`` makes so. A module called
            several times in one forward (SimpleCNN's ``pool``) gives the map of its last call.
            None: torchcam's choice, the last module with a spatial output (found by one more
            forward pass of a float32 zero image; then ``reshape`` cannot be used).
        targets: (N,) integer true classes, or None.
        reshape: Maps the layer's output, and its gradient, to (N, C, h, w), e.g. for
            channels-last ``lambda t: t.permute(0, 3, 1, 2)`` or for ViT tokens with a class
            token ``lambda t: t[:, 1:].unflatten(1, (h, w)).permute(0, 3, 1, 2)``. torchcam
            applies it (its ``reshape_transform``). A ViT that classifies from its class token
            gives blank maps for its last block (its patch tokens get no gradient): use an
            earlier block.

    Returns:
        A :class:`CamResult`.

    Raises:
        ValueError: An unknown method or layer, inputs that are not (N, C, H, W), targets that
            are not (N,) integers within the classes, logits that are not (N, num_classes), or
            a layer whose output is not (N, C, h, w) (and no ``reshape`` makes it so).
    """
    check_cam_method(method)
    check_tensor(inputs, "inputs")
    if inputs.dim() != 4 or inputs.shape[0] == 0:
        raise ValueError(f"expected inputs of shape (N, C, H, W), got shape {tuple(inputs.shape)}")
    n = inputs.shape[0]
    if targets is not None:
        check_tensor(targets, "targets")
        if targets.shape != (n,) or targets.is_floating_point() or targets.is_complex():
            raise ValueError(
                f"expected targets of shape ({n},) with integer classes, one per input, "
                f"got shape {tuple(targets.shape)} and dtype {targets.dtype}"
            )
    if reshape is not None and not callable(reshape):
        raise TypeError(f"expected reshape to be callable, got {type(reshape).__name__}")
    if reshape is not None and layer is None:
        raise ValueError("expected a layer name with reshape (torchcam needs both), got layer=None")
    if layer is not None:
        _check_layer(model, layer)

    with training_state_preserved(model):
        if layer is None:
            layer = _default_layer(model, inputs)
        x = inputs.detach().clone()  # an ordinary tensor, even when inputs is an inference tensor
        # Gradients flow to the layer even when every parameter is frozen.
        x.requires_grad_(True)
        extractor_cls = getattr(torchcam.methods, method)
        extractor = extractor_cls(
            model, layer, input_shape=tuple(inputs.shape[1:]), reshape_transform=reshape
        )
        with extractor, _hooks_see_first_tensor(extractor, model):
            logits = model(x)
            _check_logits(logits, n)
            _check_activation(extractor.hook_a[0], layer)  # what torchcam hooked (and reshaped)
            pred = logits.detach().argmax(dim=1)  # (N,)
            prob = logits.detach().float().softmax(dim=1).gather(1, pred[:, None]).squeeze(1)
            if targets is not None:
                targets = targets.to(device=pred.device, dtype=torch.long)
                _check_classes(targets, logits.shape[1])
            torch.default_generator.manual_seed(_NOISE_SEED)
            second = targets is not None and bool((targets != pred).any())
            keep = {"retain_graph": True} if second and method in _SCORE_GRADIENT_METHODS else {}
            pred_maps = _upsampled(
                extractor(class_idx=pred.tolist(), scores=logits, **keep), inputs
            )
            true_maps = None
            if targets is not None:
                true_maps = pred_maps
                if second:
                    torch.default_generator.manual_seed(_NOISE_SEED)
                    maps = extractor(class_idx=targets.tolist(), scores=logits)
                    wrong = (targets != pred)[:, None, None]  # (N, 1, 1)
                    true_maps = torch.where(wrong, _upsampled(maps, inputs), pred_maps)
    return CamResult(
        pred=pred,
        prob=prob,
        pred_maps=pred_maps,
        true_maps=true_maps,
        target=targets,
        layer=layer,
        method=method,
    )


@torch.no_grad()
def cam_grid(
    images: Tensor, result: CamResult, cmap: str = "viridis", alpha: float = 0.5
) -> Tensor:
    """Draws the maps over their images: one row per image.

    Columns: the input; the predicted-class map over it; with targets, the true-class map over
    it, or a flat grey tile where the prediction is right. Tiles smaller than 64 px are enlarged
    by an integer factor (nearest neighbour).

    Args:
        images: (N, C, H, W) the inputs the maps were computed for, any range (each image is
            min-max scaled); C == 3 drawn as RGB, else the first channel as grey.
        result: From :func:`class_activation_maps` for these images.
        cmap: Matplotlib colormap for the maps.
        alpha: Weight of the map in the overlay, in [0, 1] (0: the image alone).

    Returns:
        (H', W', 3) uint8 on the CPU.
    """
    check_tensor(images, "images")
    if images.dim() != 4 or images.shape[0] != len(result.pred_maps):
        raise ValueError(
            f"expected images of shape ({len(result.pred_maps)}, C, H, W), one per map, "
            f"got shape {tuple(images.shape)}"
        )
    if images.shape[-2:] != result.pred_maps.shape[-2:]:
        raise ValueError(
            f"expected images of the maps' size {tuple(result.pred_maps.shape[-2:])}, "
            f"got {tuple(images.shape[-2:])}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha}")
    images = images.detach().cpu()
    if images.shape[1] != 3:
        images = images[:, :1]
    base = normalize_maps(images, "layer").expand(-1, 3, -1, -1)  # (N, 3, H, W)
    columns = [base, _overlay(base, result.pred_maps, cmap, alpha)]
    if result.true_maps is not None:
        true = _overlay(base, result.true_maps, cmap, alpha)
        right = (result.pred == result.target).cpu()[:, None, None, None]  # (N, 1, 1, 1)
        columns.append(torch.where(right, torch.full_like(true, _SAME_CLASS_GREY), true))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (N * columns, 3, H, W), image-major
    return tile_grid(upscale(tiles, _MIN_TILE_PX, _MIN_TILE_PX), nrow=len(columns), padding=2)


def cam_caption(result: CamResult) -> str:
    """One line describing a :func:`cam_grid` picture, rows numbered from 1.

    E.g. ``"GradCAM on conv2; columns: input, predicted, true (grey: right). 1: pred 7
    (p=0.98), true 7; 2: pred 3 (p=0.61), true 5 WRONG"``.
    """
    columns = "input, predicted" + (", true (grey: right)" if result.target is not None else "")
    rows = []
    pred, prob = result.pred.tolist(), result.prob.tolist()
    target = result.target.tolist() if result.target is not None else [None] * len(pred)
    for i, (p, q, t) in enumerate(zip(pred, prob, target, strict=True), start=1):
        row = f"{i}: pred {p} (p={q:.2f})"
        if t is not None:
            row += f", true {t}" + (" WRONG" if t != p else "")
        rows.append(row)
    return f"{result.method} on {result.layer}; columns: {columns}. " + "; ".join(rows)


def _overlay(base: Tensor, maps: Tensor, cmap: str, alpha: float) -> Tensor:
    """(N, 3, H, W) images in [0, 1] blended with (N, H, W) maps drawn through ``cmap``."""
    heat = colorize(maps.detach().cpu(), cmap)  # (N, 3, H, W)
    return base.lerp(heat, alpha)


@contextlib.contextmanager
def _hooks_see_first_tensor(extractor: object, model: nn.Module) -> Iterator[None]:
    """torchcam's forward hooks on the CAM layer get its output's first tensor, kept intact.

    torchcam keeps the tensor its hooks are handed and differentiates the scores with respect to
    it. Handed a tuple, dict or ``ModelOutput`` (attention blocks, HF layers) it fails ("target
    score is not connected"): its hooks get the first tensor, as the feature maps draw it. And the
    model goes on with a copy of that tensor, so an in-place op after the layer (``ReLU(inplace=
    True)``) changes the copy, not the activation torchcam keeps and differentiates.
    """
    (name,) = extractor.target_names
    layer = dict(model.named_modules())[name]
    hooks = [h for h in extractor.hook_handles if h.hooks_dict_ref() is layer._forward_hooks]
    torchcam_hooks = [h.hooks_dict_ref()[h.id] for h in hooks]
    for handle in hooks:
        handle.remove()

    def hook(module: nn.Module, args: object, output: object) -> object:
        act, _ = first_tensor(output)
        for fn in torchcam_hooks:
            fn(module, args, act)
        if output is act:  # the model goes on with a copy; torchcam keeps the original
            return act.clone()
        if type(output) in (tuple, list) and output and output[0] is act:
            return type(output)([act.clone(), *output[1:]])
        return None  # other containers are handed on as they are

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _check_layer(model: nn.Module, layer: object) -> None:
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(layer, str) and layer in names:
        return
    close = difflib.get_close_matches(str(layer), names, n=3) or names[-3:]
    raise ValueError(
        f"expected layer to be a module name of the model (see model.named_modules()), such as "
        f"{', '.join(repr(n) for n in close)}, got {layer!r}"
    )


def _default_layer(model: nn.Module, inputs: Tensor) -> str:
    # torchcam forwards a zero image of the default dtype (float32) on the parameters' device.
    dtype = next(model.parameters(), torch.empty(0)).dtype
    if dtype != torch.get_default_dtype():
        raise ValueError(
            f"expected a layer name for a model with {dtype} parameters (torchcam's automatic "
            f"choice runs a {torch.get_default_dtype()} image through it), got layer=None"
        )
    name = locate_candidate_layer(model, tuple(inputs.shape[1:]))
    if not name:
        raise ValueError(
            "expected a layer with a spatial (N, C, h, w) output for torchcam to choose, "
            "got none: pass layer= (and reshape= for tokens or channels-last outputs)"
        )
    return name


def _check_logits(logits: object, n: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != n:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"expected model(inputs) to return ({n}, num_classes) logits, got {shape}")


def _check_classes(targets: Tensor, num_classes: int) -> None:
    if bool(((targets < 0) | (targets >= num_classes)).any()):
        raise ValueError(
            f"expected targets in [0, {num_classes}) (the model's classes), "
            f"got values {targets.unique().tolist()}"
        )


def _check_activation(act: object, layer: str) -> None:
    if not isinstance(act, Tensor) or act.dim() != 4:
        shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
        raise ValueError(
            f"expected layer {layer!r} to output (N, C, h, w) feature maps (pass reshape= for "
            f"tokens or channels-last), got {shape}"
        )


def _upsampled(maps: list[Tensor], inputs: Tensor) -> Tensor:
    """torchcam's (N, h, w) map (a list, one per layer) -> (N, H, W) float32 at the inputs' size."""
    (cam,) = maps
    cam = cam.detach().float().nan_to_num(0.0)[:, None]  # (N, 1, h, w)
    size = inputs.shape[-2:]
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
