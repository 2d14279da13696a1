"""Intermediate stage outputs of a timm backbone, captured during its ordinary forward pass.

SEAM's pixel correlation module and SIPE's hierarchical features read the backbone's lower stages.
Forward hooks on the modules timm lists in ``feature_info`` collect them while the classifier runs
its usual ``forward_features``, so the stages come for free (no second pass) and the classifier
itself stays unchanged for every other method.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn


def stage_info(backbone: nn.Module) -> list[dict]:
    """timm's description of the backbone's stages: ``module`` name, ``num_chs``, ``reduction``."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ValueError(f"{type(backbone).__name__} lists no feature_info stages; use a timm CNN backbone")
    return [dict(entry) for entry in info]


def stage_channels(backbone: nn.Module, indices: Sequence[int]) -> list[int]:
    """Channel counts of the stages at ``indices`` (negative indices count from the last stage)."""
    info = stage_info(backbone)
    return [int(info[i]["num_chs"]) for i in indices]


def stage_at_stride(backbone: nn.Module, stride: int) -> int:
    """Index of the first stage whose output stride (timm's ``reduction``) is ``stride``."""
    info = stage_info(backbone)
    for index, entry in enumerate(info):
        if int(entry["reduction"]) == stride:
            return index
    strides = ", ".join(str(entry["reduction"]) for entry in info)
    raise ValueError(f"{type(backbone).__name__} has no stage of stride {stride} (strides: {strides})")


@contextmanager
def capture_stages(backbone: nn.Module, indices: Sequence[int]) -> Iterator[list[Tensor]]:
    """Within the block, forward passes of ``backbone`` append the chosen stages' outputs to the list.

    The list holds the stages in ``indices`` order once one forward pass has run; the hooks are
    removed on exit even if the pass fails.
    """
    info = stage_info(backbone)
    names = [info[i]["module"] for i in indices]
    slots: dict[str, Tensor] = {}
    captured: list[Tensor] = []
    handles = []
    for name in dict.fromkeys(names):

        def hook(_module: nn.Module, _inputs: object, output: Tensor, name: str = name) -> None:
            slots[name] = output
            if len(slots) == len(set(names)):
                captured.extend(slots[n] for n in names)
                slots.clear()

        handles.append(backbone.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_with_stages(model: nn.Module, image: Tensor, indices: Sequence[int]) -> dict[str, Tensor]:
    """The classifier's outputs (logits, cams, features) plus the chosen stages as ``stage0``, ``stage1``..."""
    with capture_stages(model.backbone, indices) as stages:
        outputs = model(image)
    return {**outputs, **{f"stage{i}": stage for i, stage in enumerate(stages)}}
