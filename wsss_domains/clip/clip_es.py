"""CLIP-ES class activation maps (Lin et al., CVPR 2023), following the official code.

Per image, as in ``generate_cams_voc12.py`` of linyq2117/CLIP-ES:

1. the image is resized to a multiple of the patch size near its own size (positional embeddings
   interpolated) and every block but the last runs once without gradients;
2. the last block runs with gradients; the image embedding is the mean of its patch tokens after
   ``ln_post`` and the projection (the official ``forward_last_layer``, not the class token);
3. the score of class k is its softmax probability over the image's *present* classes plus the
   background vocabulary, logits being ``logit_scale.exp()`` x cosine similarity;
4. GradCAM at the last block's ``ln_1`` output (its attention input): channel weights are the
   patch-averaged gradients, the map the ReLU of the weighted channel sum, min-max normalised;
5. CAA refinement (:mod:`wsss_domains.clip.caa`) with the mean attention of the last 8 blocks;
6. min-max normalisation, bilinear resize to the image size.

All present classes share one backward pass: the last block is run on a batch holding one copy of
its input per class, and the sum of each copy's own class score is differentiated once. Copies do
not interact, so each copy's gradient is exactly that class's gradient (``batched=False`` runs the
per-class loop of the official code instead, for checking and timing).
:func:`gradcam_maps_independent` is the slowest, fully explicit reference: per class, the whole
encoder forward from the pixels and its own backward, with no shared computation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_domains.clip.caa import caa_refine, sinkhorn_affinity
from wsss_domains.clip.text import SynonymMode, TextFeatureSource, ZeroShotText
from wsss_domains.clip.vit import (
    PrefixPass,
    block_forward,
    image_embedding,
    patch_size,
    pool_patch_mean,
    prepare_pixels,
    run_prefix,
    vision_transformer,
)
from wsss_domains.domains.contract import ClipPrompts


def _upcast(t: Tensor) -> Tensor:
    """Half-precision towers (CLIP checkpoints are often fp16) computed on in float32; wider kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _minmax(cam: Tensor) -> Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` (per map), which the official code applies."""
    flat = cam.flatten(1)
    flat = flat - flat.min(dim=1, keepdim=True).values
    flat = flat / (1e-7 + flat.max(dim=1, keepdim=True).values)
    return flat.view_as(cam)


def _last_block_scores(
    visual: nn.Module, x: Tensor, ln1: Tensor, text: Tensor, logit_scale: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Softmax probability of ``targets[b]`` for each batch row, and the block's attention."""
    y, attn = block_forward(visual.transformer.resblocks[-1], x, ln1=ln1, need_weights=True)
    image = F.normalize(_upcast(pool_patch_mean(visual, y)), dim=-1)
    probs = (logit_scale * image @ text.T).softmax(dim=-1)
    return probs[torch.arange(len(targets), device=probs.device), targets], attn


def gradcam_maps(
    visual: nn.Module,
    prefix: PrefixPass,
    text: Tensor,
    logit_scale: Tensor,
    num_targets: int,
    batched: bool = True,
) -> tuple[Tensor, Tensor]:
    """GradCAM of text rows ``0..num_targets-1`` at the last block: ``K x h x w`` in [0, 1].

    Also returns the last block's head-averaged attention (``(1+N) x (1+N)``).
    """
    block = visual.transformer.resblocks[-1]
    x = prefix.tokens[:1].detach()
    with torch.enable_grad():
        act = block.ln_1(x).detach()
        if batched:
            ln1 = act.expand(num_targets, -1, -1).clone().requires_grad_(True)
            targets = torch.arange(num_targets, device=x.device)
            scores, attn = _last_block_scores(
                visual, x.expand(num_targets, -1, -1), ln1, text, logit_scale, targets
            )
            (grads,) = torch.autograd.grad(scores.sum(), ln1)
        else:
            rows = []
            for k in range(num_targets):
                ln1 = act.clone().requires_grad_(True)
                target = torch.tensor([k], device=x.device)
                score, attn = _last_block_scores(visual, x, ln1, text, logit_scale, target)
                rows.append(torch.autograd.grad(score.sum(), ln1)[0])
            grads = torch.cat(rows)
    return _gradcam(act, grads, prefix.grid), attn[0].detach().float()


def _gradcam(act: Tensor, grads: Tensor, grid: tuple[int, int]) -> Tensor:
    """GradCAM maps ``K x h x w`` from one image's ``ln_1`` output ``act`` (``1 x (1+N) x D``) and
    the gradients of the K class scores with respect to it (``K x (1+N) x D``)."""
    patches, grad_patches = _upcast(act[:, 1:]), _upcast(grads[:, 1:])
    weights = grad_patches.mean(dim=1)  # K x D, the patch-averaged gradient per channel
    cams = torch.relu(torch.einsum("nd,kd->kn", patches[0], weights))
    cams = cams.view(len(weights), *grid)
    # The official CAM is normalised once per layer and once after layer aggregation.
    return _minmax(torch.relu(_minmax(cams)))


@contextmanager
def _captured_outputs(module: nn.Module) -> Iterator[list[Tensor]]:
    """The outputs of ``module``'s forward calls while the context is open (a forward hook)."""
    outputs: list[Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


def gradcam_maps_independent(
    visual: nn.Module, pixels: Tensor, text: Tensor, logit_scale: Tensor, num_targets: int
) -> Tensor:
    """The maps of :func:`gradcam_maps` computed class by class with nothing shared: ``K x h x w``.

    For each class, the whole image tower runs forward from ``pixels`` (``1x3xhxw``, as from
    :func:`~wsss_domains.clip.vit.prepare_pixels`) with autograd recording every block (the pixels
    require gradients, as a trainable model's parameters would), the last block's ``ln_1`` output is
    captured with a forward hook, and ``torch.autograd.grad`` differentiates that class's softmax
    probability over the ``text`` rows with respect to it. A reference for checking and timing the
    batched path; far slower.
    """
    ph, pw = patch_size(visual)
    grid = (int(pixels.shape[-2]) // ph, int(pixels.shape[-1]) // pw)
    ln_1 = visual.transformer.resblocks[-1].ln_1
    maps = []
    for k in range(num_targets):
        with torch.enable_grad(), _captured_outputs(ln_1) as outputs:
            image = image_embedding(visual, pixels.detach().requires_grad_(True))
            probs = (logit_scale * F.normalize(_upcast(image), dim=-1) @ text.T).softmax(dim=-1)
            if len(outputs) != 1:
                raise RuntimeError(f"the last block's ln_1 ran {len(outputs)} times in one forward")
            (act,) = outputs
            (grad,) = torch.autograd.grad(probs[0, k], act)
        maps.append(_gradcam(act.detach(), grad, grid))
    return torch.cat(maps)


def clip_es_cams(
    model: nn.Module,
    tokenizer: Callable[..., Tensor],
    image: Tensor,
    present_class_names: Sequence[str],
    prompts: ClipPrompts,
    *,
    text: TextFeatureSource | None = None,
    refine: bool = True,
    batched: bool = True,
    scale: float = 1.0,
    attn_layers: int = 8,
    box_threshold: float = 0.4,
    synonyms: SynonymMode = "join",
) -> Tensor:
    """CLIP-ES CAMs of the present classes of one image: ``K x H x W`` in [0, 1], in the given order.

    ``image`` is ``3xHxW`` in [0, 1] (a :class:`~wsss_domains.domains.contract.Sample` image).
    ``text`` supplies the text embeddings: pass a :class:`~wsss_domains.clip.text.ZeroShotText`
    kept across images to embed each class once, or a learned-prompt module
    (:class:`~wsss_domains.clip.learned_prompts.PromptLearner`); by default the zero-shot
    embeddings of ``prompts`` (templates x class synonyms, background vocabulary) are computed.
    ``scale`` resizes the image before the patch grid is taken (1.0 = official single scale).
    """
    visual = vision_transformer(model)
    names = list(present_class_names)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if not names:
        return torch.zeros(0, height, width)
    if text is None:
        text = ZeroShotText(model, tokenizer, prompts, synonyms=synonyms)
    if attn_layers < 1:
        raise ValueError("attn_layers must be at least 1")
    with torch.no_grad():  # learned prompts are parameters; CAMs need no graph through them
        features = text.foreground(names).float()
        background = text.background()
        if background.numel():
            features = torch.cat([features, background.float()])
    if features.shape[0] == 1:
        raise ValueError("CLIP-ES with one present class needs a background vocabulary to compete with")

    ph, pw = patch_size(visual)
    size = (math.ceil(scale * height / ph) * ph, math.ceil(scale * width / pw) * pw)
    pixels = prepare_pixels(model, image, size)
    prefix = run_prefix(visual, pixels, attn_layers)
    logit_scale = model.logit_scale.exp().float().detach()
    cams, attn_last = gradcam_maps(visual, prefix, features, logit_scale, len(names), batched=batched)
    if refine:
        attn = attn_last if prefix.attn_sum is None else prefix.attn_sum[0] + attn_last
        attn = attn / (prefix.attn_count + 1)
        cams = _minmax(caa_refine(cams, sinkhorn_affinity(attn[1:, 1:]), box_threshold))
    cams = F.interpolate(cams[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return cams.clamp(0, 1).cpu()
