"""``weclip``: WeCLIP (Zhang et al., CVPR 2024), a frozen CLIP whose CLIP-ES labels train a light
decoder, and whose decoder's affinity then refines those labels. Checked against zbf1991/WeCLIP.

Why: CLIP-ES refines its GradCAM maps with CLIP's own attention, which was never trained to
follow object extents in the user's imagery; WeCLIP learns an affinity from the labels
themselves. As in the official ``WeCLIP_model/model_attn_aff_voc.py`` and
``scripts/dist_clip_voc.py``:

- the image goes once through the frozen CLIP image tower; the outputs of every block but the
  last (11 for ViT-B/16) are kept, with each block's head-averaged attention;
- **decoder**: per block, an MLP (linear, ReLU, linear to 256 channels) of its patch tokens; the
  maps concatenated, fused by a 1x1 convolution, 2-D dropout 0.1 (the official ``SegFormerHead``);
  then a 3-layer, 8-head transformer (pre-norm blocks, QuickGELU MLP) and a 1x1 convolution to the
  classes. Its **affinity** is ``sigmoid(F^T F)`` of the fused map ``F`` (before the transformer);
- **labels**: CLIP-ES GradCAM of each present class at the last block (the project's
  :mod:`~wsss_domains.clip.clip_es`), propagated through a Sinkhorn-normalised affinity inside the
  CAM's boxes (threshold 0.4), min-max scaled and resized; background ``(1 - max)`` where the
  label space thresholds background; PAR (20 iterations, dilations 1-24) on the image; arg-max.
  During the first half of training the affinity is the mean attention of the last 8 blocks (CLIP-ES);
  afterwards, and whenever pseudo-labels are written, it is the official "refinement with the
  decoder": of the last 6 blocks, those whose attention sums to at least the mean of
  ``sum(A_dec - A_k)`` are averaged (the blocks with ``sum(A_dec - A_k) <= mean``), times ``A_dec``;
- **losses**: cross-entropy of the decoder's (upsampled) logits, background and foreground pixels
  averaged separately then halved, plus 0.1 x the affinity loss: ``A_dec`` pushed to 1 between
  patches of one label and to 0 between patches of different labels, within a radius of 8 patches,
  each half averaged over its pairs;
- AdamW (lr 2e-4 x 10 for the decoder, weight decay 0.01), 50 warm-up steps from 1e-6 of it, then
  polynomial decay (power 1) to the last step; batches of 4 crops of 320 pixels, flipped at random.

It is fitted once on the run's training split (:meth:`fit`: ``steps`` decoder updates), then
:meth:`refine` writes the refined CAMs of each image's present classes (the decoder's own
segmentation with ``output=decoder``). Deviations: the official run is 30,000 steps on a GPU
(the default here too; pass ``steps`` for a CPU); crops are taken from the image as it is
(random crop, or padding with ignored pixels where the image is smaller), without the official random
rescaling; in label spaces without a thresholded background (histology tissue, land cover) no
background channel is added, and excluded pixels (white glass, no-data) carry no loss; prompts are the
domain's (the official templates are ``a clean origami {}.``); only the decoder is trained, as in the
official optimiser (its last-block parameters are marked trainable but never handed to it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss_domains.domains.contract import BackgroundMode, LabelSpace
from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.clip_methods import DEFAULT_CLIP_MODEL, ClipEs
from wsss_domains.methods.fitting import FitContext
from wsss_domains.methods.registry import register_method

log = logging.getLogger(__name__)

EMBED_DIM = 256
DECODER_LAYERS = 3
DECODER_HEADS = 8
AFFINITY_WEIGHT = 0.1
RADIUS = 8
CROP = 320
BATCH = 4
STEPS = 30000
SWITCH = 0.5  # the official 15,000 of 30,000 steps
LEARNING_RATE = 2e-4 * 10  # the decoder's group: 10 x the base rate
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 50
WARMUP_RATIO = 1e-6
EARLY_ATTN_LAYERS = 8
LATE_ATTN_LAYERS = 6
BOX_THRESHOLD = 0.4
PAR_ITERATIONS = 20
PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
IGNORE = 255


class LayerMlp(nn.Module):
    """Linear, ReLU, linear: one block's tokens to the decoder's width (the official ``MLP``)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.proj_2 = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj_2(F.relu(self.proj(tokens)))


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class DecoderBlock(nn.Module):
    """Pre-norm transformer block of CLIP's layout (the official decoder's ``ResidualAttentionBlock``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), QuickGELU(), nn.Linear(dim * 4, dim))
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        a = self.ln_1(x)
        x = x + self.attn(a, a, a, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class WeClipDecoder(nn.Module):
    """Fusion of the frozen blocks' tokens, a small transformer and a 1x1 classifier; and the affinity."""

    def __init__(
        self,
        in_dim: int,
        blocks: int,
        outputs: int,
        dim: int = EMBED_DIM,
        layers: int = DECODER_LAYERS,
        heads: int = DECODER_HEADS,
    ) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(LayerMlp(in_dim, dim) for _ in range(blocks))
        self.fuse = nn.Conv2d(dim * blocks, dim, kernel_size=1)
        self.dropout = nn.Dropout2d(0.1)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(layers))
        self.classifier = nn.Conv2d(dim, outputs, kernel_size=1)

    def forward(self, patch_tokens: Sequence[Tensor], grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``B x N x D`` patch tokens per frozen block -> logits ``B x K x h x w`` and affinity ``B x N x N``."""
        if len(patch_tokens) != len(self.mlps):
            raise ValueError(f"the decoder fuses {len(self.mlps)} blocks, got {len(patch_tokens)}")
        b = patch_tokens[0].shape[0]
        maps = [
            mlp(t.float()).transpose(1, 2).reshape(b, -1, *grid)
            for mlp, t in zip(self.mlps, patch_tokens, strict=True)
        ]
        fused = self.dropout(self.fuse(torch.cat(maps, dim=1)))
        flat = fused.flatten(2)  # B x C x N
        affinity = torch.sigmoid(flat.transpose(1, 2) @ flat)
        x = flat.transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        logits = self.classifier(x.transpose(1, 2).reshape(b, -1, *grid))
        return logits, affinity


@dataclass
class FrozenPass:
    """The frozen image tower's blocks but the last: their outputs and attentions (with the class token)."""

    outputs: list[Tensor]  # per block, B x (1+N) x D
    attentions: list[Tensor]  # per block, B x (1+N) x (1+N), heads averaged
    grid: tuple[int, int]

    def patch_tokens(self) -> list[Tensor]:
        return [o[:, 1:] for o in self.outputs]


@torch.no_grad()
def frozen_pass(visual: nn.Module, pixels: Tensor) -> FrozenPass:
    """Every block but the last, without gradients (the official modified ``Transformer.forward``)."""
    from wsss_domains.clip.vit import block_forward, embed

    x, grid = embed(visual, pixels)
    outputs, attentions = [], []
    for block in visual.transformer.resblocks[:-1]:
        x, weights = block_forward(block, x, need_weights=True)
        outputs.append(x)
        attentions.append(weights.float())
    return FrozenPass(outputs, attentions, grid)


def decoder_attention(attentions: Tensor, seg_affinity: Tensor, layers: int = LATE_ATTN_LAYERS) -> Tensor:
    """The official refinement affinity of one image before Sinkhorn: ``N x N``.

    ``attentions`` are the blocks' patch-to-patch attentions ``L x N x N`` (the last block's included),
    ``seg_affinity`` the decoder's ``N x N``. Of the last ``layers`` blocks, those whose
    ``sum(A_dec - A_k)`` is at most the mean over them are averaged and multiplied by ``A_dec``.
    """
    attn = attentions[-layers:]
    diff = (seg_affinity[None] - attn).flatten(1).sum(1)
    keep = (diff <= diff.mean()).to(attn.dtype)[:, None, None]
    mean = (keep * attn).sum(0) / (keep.sum(0) + 1e-5)
    return mean * seg_affinity


def weclip_maps(
    visual: nn.Module,
    tokens: Tensor,
    attentions: Sequence[Tensor],
    grid: tuple[int, int],
    text: Tensor,
    logit_scale: Tensor,
    num_targets: int,
    seg_affinity: Tensor | None,
) -> Tensor:
    """Refined CLIP-ES maps ``K x h x w`` of one image (min-max scaled, on the patch grid).

    ``tokens``: the last block's input ``1 x (1+N) x D``; ``attentions``: the earlier blocks'
    ``(1+N) x (1+N)``; ``seg_affinity``: the decoder's ``N x N``, or None for CLIP-ES's own.
    """
    from wsss_domains.clip.caa import caa_refine, sinkhorn_affinity
    from wsss_domains.clip.clip_es import _minmax, gradcam_maps
    from wsss_domains.clip.vit import PrefixPass

    prefix = PrefixPass(tokens=tokens, attn_sum=None, attn_count=0, grid=grid)
    cams, attn_last = gradcam_maps(visual, prefix, text, logit_scale, num_targets)
    stack = torch.stack([*attentions, attn_last])[:, 1:, 1:].float()
    if seg_affinity is None:
        attn = stack[-EARLY_ATTN_LAYERS:].mean(0)
    else:
        attn = decoder_attention(stack, seg_affinity.float())
    refined = caa_refine(cams, sinkhorn_affinity(attn), BOX_THRESHOLD)
    return _minmax(refined)


def hard_labels(
    maps: Tensor, present: Tensor, image: Tensor, label_space: LabelSpace, exclude: Tensor | None
) -> Tensor:
    """The decoder's targets ``H x W`` from refined maps ``K x h x w`` of the present classes.

    Output ids are the decoder's channels: background 0 and the foreground classes from 1 where the
    label space thresholds background, else the foreground classes from 0. Excluded pixels: ignored.
    """
    from wsss_domains.refine.par import PixelAdaptiveRefiner

    height, width = image.shape[-2:]
    scores = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    ids = torch.nonzero(present.bool()).flatten().to(scores.device)
    offset = 1 if label_space.background_mode is BackgroundMode.THRESHOLD else 0
    if offset:
        background = 1 - (scores.amax(0, keepdim=True) if len(scores) else scores.new_zeros(1, height, width))
        scores = torch.cat([background, scores])
        ids = torch.cat([ids.new_zeros(1), ids + 1])
    if len(scores) == 0:
        return torch.full((height, width), IGNORE, dtype=torch.long)
    par = PixelAdaptiveRefiner(dilations=PAR_DILATIONS, num_iter=PAR_ITERATIONS)
    refined = par(image.to(scores.device).float(), scores)
    labels = ids[refined.argmax(0)]
    if exclude is not None:
        labels[exclude.to(labels.device).bool()] = IGNORE
    return labels.cpu()


def balanced_seg_loss(logits: Tensor, labels: Tensor, background: bool) -> Tensor:
    """The official ``get_seg_loss``: cross-entropy over background pixels and over foreground
    pixels, each averaged on its own, then halved; plain cross-entropy without a background channel."""
    if not background:
        return F.cross_entropy(logits, labels, ignore_index=IGNORE)
    bg = labels.masked_fill(labels != 0, IGNORE)
    fg = labels.masked_fill(labels == 0, IGNORE)
    parts = [F.cross_entropy(logits, t, ignore_index=IGNORE) for t in (bg, fg) if (t != IGNORE).any()]
    # The official code takes a mean of an empty set (NaN) where a crop lacks one side; skip it instead.
    return torch.stack(parts).sum() * 0.5 if parts else logits.sum() * 0.0


def radius_mask(h: int, w: int, radius: int = RADIUS) -> Tensor:
    """``hw x hw``: 1 where two patches lie within ``radius`` of each other in both rows and columns."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


def affinity_targets(labels: Tensor, grid: tuple[int, int], radius: int = RADIUS) -> Tensor:
    """``B x N x N`` affinity labels (1 same label, 0 different, 255 ignored) from ``B x H x W`` labels
    sampled at the patch grid (nearest), as the official ``cams_to_affinity_label``."""
    small = F.interpolate(labels[:, None].float(), size=grid, mode="nearest")[:, 0].flatten(1).long()
    same = (small[:, :, None] == small[:, None, :]).long()
    same[:, ~radius_mask(*grid, radius).to(same.device)] = IGNORE
    ignored = small == IGNORE
    same = same.masked_fill(ignored[:, :, None] | ignored[:, None, :], IGNORE)
    return same


def affinity_loss(affinity: Tensor, targets: Tensor) -> Tensor:
    """The official ``get_aff_loss``: ``0.5 * mean_pos(1 - A) + 0.5 * mean_neg(A)`` (counts + 1)."""
    pos = (targets == 1).to(affinity.dtype)
    neg = (targets == 0).to(affinity.dtype)
    return 0.5 * (pos * (1 - affinity)).sum() / (pos.sum() + 1) + 0.5 * (neg * affinity).sum() / (
        neg.sum() + 1
    )


def poly_warmup_factor(
    step: int, total: int, warmup: int = WARMUP_STEPS, ratio: float = WARMUP_RATIO
) -> float:
    """The official ``PolyWarmupAdamW`` learning-rate factor at ``step`` (power 1)."""
    if step < warmup:
        return 1 - (1 - step / warmup) * (1 - ratio)
    return max(0.0, 1 - step / total)


def random_crop(
    image: Tensor, labels: Tensor, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A ``size`` crop of ``3 x H x W`` and ``H x W`` (padded with zeros and ignored labels where smaller),
    flipped left-right with probability one half."""
    _, h, w = image.shape
    ph, pw = max(size, h), max(size, w)
    if (ph, pw) != (h, w):
        image = F.pad(image, (0, pw - w, 0, ph - h))
        labels = F.pad(labels, (0, pw - w, 0, ph - h), value=IGNORE)
    y = int(torch.randint(0, ph - size + 1, (1,), generator=generator))
    x = int(torch.randint(0, pw - size + 1, (1,), generator=generator))
    image, labels = image[:, y : y + size, x : x + size], labels[y : y + size, x : x + size]
    if torch.rand(1, generator=generator) < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    return image, labels


@register_method
class WeClip(ClipEs):
    name = "weclip"
    fits_training_split = True
    description = (
        "WeCLIP: a decoder on a frozen CLIP's block features, trained on CLIP-ES labels (seg + affinity "
        "losses) on the run's training split; its affinity refines the CLIP-ES CAMs (post hoc; needs "
        "--clip-model and --clip-weights; options steps, batch_size, crop_size, output=cam|decoder)."
    )

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_weights: str | None = None,
        steps: int = STEPS,
        batch_size: int = BATCH,
        crop_size: int = CROP,
        switch: float = SWITCH,
        radius: int = RADIUS,
        output: Literal["cam", "decoder"] = "cam",
        seed: int = 0,
    ) -> None:
        super().__init__(
            clip_model=clip_model, clip_weights=clip_weights, steps=steps, batch_size=batch_size,
            crop_size=crop_size, switch=switch, radius=radius, output=output, seed=seed,
        )  # fmt: skip
        if min(steps, batch_size, radius) < 1 or crop_size < 16:
            raise ValueError("weclip: steps, batch_size and radius must be at least 1, crop_size at least 16")
        if not 0.0 <= switch <= 1.0:
            raise ValueError(f"weclip: switch must lie in [0, 1], got {switch}")
        if output not in ("cam", "decoder"):
            raise ValueError(f"weclip: output must be 'cam' or 'decoder', got {output!r}")
        self.steps, self.batch_size, self.crop_size = int(steps), int(batch_size), int(crop_size)
        self.switch, self.radius, self.output, self.seed = float(switch), int(radius), output, int(seed)
        self.decoder: WeClipDecoder | None = None
        self.losses: list[float] = []  # per step, for the log and tests

    # -- pieces shared by fitting and pseudo-labelling -------------------------------------------
    def _new_decoder(self, visual: nn.Module, label_space: LabelSpace) -> WeClipDecoder:
        outputs = len(label_space.foreground) + (label_space.background_mode is BackgroundMode.THRESHOLD)
        blocks = len(visual.transformer.resblocks) - 1
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            return WeClipDecoder(int(visual.transformer.width), blocks, outputs)
        finally:
            torch.random.set_rng_state(generator_state)

    def _image_labels(
        self, visual: nn.Module, frozen: FrozenPass, index: int, text: Tensor, logit_scale: Tensor,
        count: int, seg_affinity: Tensor | None,
    ) -> Tensor:  # fmt: skip
        return weclip_maps(
            visual, frozen.outputs[-1][index : index + 1], [a[index] for a in frozen.attentions],
            frozen.grid, text, logit_scale, count, seg_affinity,
        )  # fmt: skip

    # -- fitting ---------------------------------------------------------------------------------
    def fit_key(self) -> dict[str, Any]:
        return {k: self.options[k] for k in ("clip_model", "clip_weights", "steps", "batch_size",
                                              "crop_size", "switch", "radius", "seed")}  # fmt: skip

    def fit(self, context: FitContext) -> None:
        from wsss_domains.clip.vit import prepare_pixels, vision_transformer

        device = next(context.extractor.model.parameters()).device
        loaded = self._clip(device)
        visual = vision_transformer(loaded.model)
        decoder = self._new_decoder(visual, context.label_space).to(device)
        path = context.cache_path(self.name, self.fit_key())
        if path is not None and path.is_file():
            decoder.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            self.decoder = decoder.eval()
            log.info("weclip: fitted decoder loaded from %s", path)
            return
        self.decoder = self._train(context, loaded, visual, decoder, device, prepare_pixels)
        if path is not None:
            from wsss_domains.data.io import atomic_write

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(self.decoder.state_dict(), tmp))

    def _training_items(self, context: FitContext, generator: torch.Generator) -> Any:
        """Endless (image in [0, 1], present labels, exclude) of the training split in random order."""
        from wsss_domains.pseudo_labels.writer import image_labels

        dataset = context.dataset
        usable = 0
        while True:
            for index in torch.randperm(len(dataset), generator=generator).tolist():  # type: ignore[arg-type]
                sample = dataset[index]
                present = image_labels(sample, context.label_space, "auto")
                if present is None or not present.any():
                    continue
                usable += 1
                raw = sample["image"]
                exclude = sample.get("exclude")
                if exclude is None:
                    exclude = context.domain.exclude_mask(raw, context.label_space)
                yield context.domain.preprocess(raw).float(), present, exclude
            if usable == 0:
                raise ValueError("weclip: the training split has no image with a present class to learn from")

    def _train(
        self, context: FitContext, loaded: Any, visual: nn.Module, decoder: WeClipDecoder,
        device: torch.device, prepare_pixels: Any,
    ) -> WeClipDecoder:  # fmt: skip
        from wsss_domains.progress import progress_bar

        label_space = context.label_space
        background = label_space.background_mode is BackgroundMode.THRESHOLD
        generator = torch.Generator().manual_seed(self.seed)
        items = self._training_items(context, generator)
        optimiser = torch.optim.AdamW(
            decoder.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8
        )
        logit_scale = loaded.model.logit_scale.exp().float().detach()
        size = max(16, self.crop_size)
        switch_step = int(round(self.switch * self.steps))
        decoder.train()
        self.losses = []
        for step in progress_bar(range(self.steps), desc="weclip decoder", unit="step"):
            for group in optimiser.param_groups:
                group["lr"] = LEARNING_RATE * poly_warmup_factor(step, self.steps)
            crops, presents, excludes = [], [], []
            for _ in range(self.batch_size):
                image, present, exclude = next(items)
                ignore = torch.zeros(image.shape[-2:], dtype=torch.long)
                if exclude is not None:
                    ignore[exclude.bool().cpu()] = 1
                crop, crop_ignore = random_crop(image.cpu(), ignore, size, generator)
                crops.append(crop)
                presents.append(present)
                excludes.append(crop_ignore != 0)  # padding and excluded pixels
            images = torch.stack(crops)
            pixels = torch.cat([prepare_pixels(loaded.model, im, tuple(im.shape[-2:])) for im in images])
            frozen = frozen_pass(visual, pixels)
            logits, affinity = decoder(frozen.patch_tokens(), frozen.grid)
            labels = []
            for i, present in enumerate(presents):
                names = [label_space.foreground_names[k] for k in torch.nonzero(present).flatten().tolist()]
                text = self.text_rows(loaded, context.domain, label_space, names)
                seg = affinity[i].detach() if step >= switch_step else None
                maps = self._image_labels(visual, frozen, i, text, logit_scale, len(names), seg)
                labels.append(hard_labels(maps, present, images[i], label_space, excludes[i]))
            target = torch.stack(labels).to(device)
            up = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            seg_loss = balanced_seg_loss(up, target, background)
            aff_loss = affinity_loss(affinity, affinity_targets(target, frozen.grid, self.radius))
            loss = seg_loss + AFFINITY_WEIGHT * aff_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            self.losses.append(float(loss.detach()))
        return decoder.eval()

    # -- pseudo-labelling ------------------------------------------------------------------------
    @torch.no_grad()
    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        from wsss_domains.clip.vit import patch_size, prepare_pixels, vision_transformer

        if self.decoder is None:
            raise RuntimeError("weclip: fit() must run before refine (the engine calls it)")
        keep = context.present.bool()
        if not keep.any():
            return cams
        label_space = context.label_space
        loaded = self._clip(cams.device)
        visual = vision_transformer(loaded.model)
        image = context.prepared if context.prepared is not None else context.domain.preprocess(context.image)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        ph, pw = patch_size(visual)
        size = (math.ceil(height / ph) * ph, math.ceil(width / pw) * pw)
        device = next(self.decoder.parameters()).device
        frozen = frozen_pass(visual, prepare_pixels(loaded.model, image, size).to(device))
        logits, affinity = self.decoder(frozen.patch_tokens(), frozen.grid)
        ids = torch.nonzero(keep).flatten().tolist()
        if self.output == "decoder":
            offset = 1 if label_space.background_mode is BackgroundMode.THRESHOLD else 0
            allowed = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            allowed[[i + offset for i in ids]] = True
            if offset:
                allowed[0] = True
            probs = logits[0].masked_fill(~allowed[:, None, None], float("-inf")).softmax(0)
            maps = probs[[i + offset for i in ids]]
        else:
            names = [label_space.foreground_names[i] for i in ids]
            text = self.text_rows(loaded, context.domain, label_space, names)
            scale = loaded.model.logit_scale.exp().float()
            maps = self._image_labels(visual, frozen, 0, text, scale, len(names), affinity[0])
        maps = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[
            0
        ]
        out = cams.clone()
        out[keep] = maps.clamp(0, 1).to(out.dtype).to(out.device)
        return out
