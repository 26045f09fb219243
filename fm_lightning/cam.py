"""Class-activation maps (where the model looks) without touching its training state.

Example::

    result = class_activation_maps(model, probe, method="GradCAM", layer="conv2", targets=labels)
    result.pred, result.prob      # (N,) predicted class and its softmax probability
    result.pred_maps              # (N, H, W) in [0, 1], at the probe's H, W
    grid = cam_grid(probe, result)  # fm_lightning.pictures.cam draws them

The maps are computed by torchcam (``torchcam.methods``); this module chooses the classes and
upsamples the maps. :func:`class_activation_maps` may be called in the middle of
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
from fm_lightning.rendering import (
    check_tensor,
)

__all__ = [
    "CAM_METHODS",
    "CamResult",
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


def check_cam_method(name: object) -> str:
    """The :data:`CAM_METHODS` entry ``name`` spells, whatever its case, with ``++`` for ``pp``
    (``"gradcam"``, ``"GradCAM++"`` -> ``"GradCAMpp"``); else a ValueError naming them."""
    key = _method_key(name) if isinstance(name, str) else None
    found = next((m for m in CAM_METHODS if _method_key(m) == key), None)
    if found is not None:
        return found
    keys = {_method_key(m): m for m in CAM_METHODS}
    close = difflib.get_close_matches(key or str(name), keys, n=1, cutoff=0.6)
    hint = f" (did you mean {keys[close[0]]!r}?)" if close else ""
    raise ValueError(f"expected a CAM method, one of {', '.join(CAM_METHODS)}, got {name!r}{hint}")


def _method_key(name: str) -> str:
    """How a method name is compared: lower case, ``++`` as ``pp``, no ``-``, ``_`` or spaces."""
    return "".join(name.lower().replace("++", "pp").replace("-", " ").replace("_", " ").split())


@dataclass(frozen=True)
class CamResult:
    """What :func:`class_activation_maps` found for N images. Tensors are on the inputs' device.

    Attributes:
        pred: (N,) int64, the predicted class (argmax of the logits).
        prob: (N,) float32, its softmax probability.
        pred_maps: (N, H, W) float32 in [0, 1], the map for the predicted class, upsampled
            (bilinear) to the inputs' H, W; each map is scaled to its own maximum.
        true_maps: (N, H, W) like ``pred_maps``, the map for the true class; where the prediction
            is right (``pred == target``), or the label is not a class, it is the same map as
            ``pred_maps``. None without targets.
        target: (N,) int64 true classes (labels as given, ``-100`` say), or None.
        layer: the module name the maps come from (torchcam's choice when none was given).
        method: the torchcam method, e.g. ``"GradCAM"``.
        second: (N,) int64, the class of the second map: the true class where the prediction
            is wrong, else the runner-up (the second-highest logit). None for a one-class model.
        second_prob: (N,) float32, its softmax probability, or None.
        second_maps: (N, H, W) like ``pred_maps``, the map for ``second``, or None.
    """

    pred: Tensor
    prob: Tensor
    pred_maps: Tensor
    true_maps: Tensor | None
    target: Tensor | None
    layer: str
    method: str
    second: Tensor | None = None
    second_prob: Tensor | None = None
    second_maps: Tensor | None = None
    #: (N,) bool: the label is one of the model's classes (``0 <= target < num_classes``); rows
    #: where it is not (an ignore_index such as -100) have no true-class map. None without targets.
    target_is_class: Tensor | None = None


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
    """Class-activation maps of ``inputs`` for the predicted class and a second one.

    One forward pass of ``inputs`` (a copy) in eval mode with gradients on, then torchcam's
    ``method`` on ``layer`` for the predicted class and for a second class: the true class where
    ``targets`` say the prediction is wrong, else the runner-up (one more backward pass; for
    ScoreCAM more forward passes). The model's training
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
        targets: (N,) integer true classes, or None. A label that is not a class (an
            ``ignore_index`` such as -100, or one past the logits) gets no true-class map:
            ``CamResult.target_is_class`` is False there.
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
            are not (N,) integers, logits that are not (N, num_classes), or
            a layer whose output is not (N, C, h, w) (and no ``reshape`` makes it so).
    """
    method = check_cam_method(method)
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
        # Gradients flow to the layer even when every parameter is frozen: from the input, or,
        # for integer inputs (uint8 images normalised inside the model), which cannot carry
        # them, from the layer's own output (a hook that runs before torchcam's).
        if x.is_floating_point():
            x.requires_grad_(True)
        module = dict(model.named_modules())[layer]
        hook = module.register_forward_hook(_output_requires_grad, prepend=True)
        extractor_cls = getattr(torchcam.methods, method)
        extractor = extractor_cls(
            model, layer, input_shape=tuple(inputs.shape[1:]), reshape_transform=reshape
        )
        with (
            extractor,
            contextlib.closing(_Remover(hook)),
            _hooks_see_first_tensor(extractor, model),
        ):
            logits = model(x)
            _check_logits(logits, n)
            _check_activation(extractor.hook_a[0], layer)  # what torchcam hooked (and reshaped)
            pred = logits.detach().argmax(dim=1)  # (N,)
            probs = logits.detach().float().softmax(dim=1)  # (N, num_classes)
            prob = probs.gather(1, pred[:, None]).squeeze(1)
            is_class = None
            # (N,) rows whose true class has a map of its own
            wrong = torch.zeros_like(pred, dtype=torch.bool)
            if targets is not None:
                targets = targets.to(device=pred.device, dtype=torch.long)
                is_class = (targets >= 0) & (targets < logits.shape[1])  # (N,)
                wrong = is_class & (targets != pred)
            # The second map: the true class where the prediction is wrong, else the runner-up
            # (a right prediction's true-class map would repeat the predicted-class map; a label
            # that is not a class has none).
            second = None
            if logits.shape[1] > 1:
                runner_up = probs.scatter(1, pred[:, None], -1.0).argmax(dim=1)  # (N,)
                second = torch.where(wrong, targets if targets is not None else pred, runner_up)
            torch.default_generator.manual_seed(_NOISE_SEED)
            keep = {}
            if second is not None and method in _SCORE_GRADIENT_METHODS:
                keep = {"retain_graph": True}
            pred_maps = _upsampled(
                extractor(class_idx=pred.tolist(), scores=logits, **keep), inputs
            )
            second_maps = None
            if second is not None:
                torch.default_generator.manual_seed(_NOISE_SEED)
                second_maps = _upsampled(
                    extractor(class_idx=second.tolist(), scores=logits), inputs
                )
            true_maps = None
            if targets is not None:
                true_maps = pred_maps
                if second_maps is not None:
                    true_maps = torch.where(wrong[:, None, None], second_maps, pred_maps)
    return CamResult(
        pred=pred,
        prob=prob,
        pred_maps=pred_maps,
        true_maps=true_maps,
        target=targets,
        layer=layer,
        method=method,
        second=second,
        second_prob=None if second is None else probs.gather(1, second[:, None]).squeeze(1),
        second_maps=second_maps,
        target_is_class=is_class,
    )


class _Remover:
    """``contextlib.closing`` for a hook handle: removed when the block ends."""

    def __init__(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.close = handle.remove


def _output_requires_grad(module: nn.Module, args: object, output: object) -> object:
    """A forward hook: a floating output that carries no gradient is made a leaf that does, so
    the CAM gets its gradients at the layer (integer inputs, every parameter frozen)."""
    if isinstance(output, Tensor) and output.is_floating_point() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


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
