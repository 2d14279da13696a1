"""segment_anything's SamPredictor with cached image embeddings and ``3xHxW`` [0, 1] tensor input.

Subclassing (rather than re-implementing) keeps SAM's prompt transforms, mask decoding and
post-processing exactly as upstream, and lets SamAutomaticMaskGenerator use the cache too: it
only ever calls ``set_image`` -> ``set_torch_image``, which is the one method overridden here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from wsss_domains.sam.cache import EmbeddingCache
from wsss_domains.sam.registry import LoadedSam


def minmax_255(image: Tensor) -> Tensor:
    """Stretch an image to span [0, 255] over all its channels (LiteMedSAM's normalisation)."""
    low, high = image.amin(dim=(-3, -2, -1), keepdim=True), image.amax(dim=(-3, -2, -1), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-8) * 255.0


class CachedSamPredictor(SamPredictor):
    """A SamPredictor for a :class:`LoadedSam` whose image embeddings go through an optional cache."""

    def __init__(self, sam: LoadedSam, cache: EmbeddingCache | None = None) -> None:
        super().__init__(sam.model)
        self.sam = sam
        self.cache = cache

    def model_input(self, transformed_image: Tensor) -> Tensor:
        """The padded, normalised encoder input for a resized ``1x3xhxw`` image in [0, 255]."""
        if self.sam.minmax_normalise:
            transformed_image = minmax_255(transformed_image.float())
        return self.model.preprocess(transformed_image.float())

    @torch.no_grad()
    def set_torch_image(self, transformed_image: Tensor, original_image_size: tuple[int, ...]) -> None:
        """As upstream, but the embedding is read from / written to the cache when one is set."""
        size = self.model.image_encoder.img_size
        if transformed_image.ndim != 4 or transformed_image.shape[1] != 3:
            raise ValueError(f"expected a 1x3xHxW image, got {tuple(transformed_image.shape)}")
        if max(transformed_image.shape[2:]) != size:
            raise ValueError(f"image long side must be {size}, got {tuple(transformed_image.shape[2:])}")
        self.reset_image()
        self.original_size = tuple(original_image_size)
        self.input_size = tuple(transformed_image.shape[-2:])
        model_input = self.model_input(transformed_image.to(self.device))
        if self.cache is None:
            self.features = self.model.image_encoder(model_input)
        else:
            self.features = self.cache.get_or_compute(
                self.sam.name, self.sam.checkpoint_id, model_input, self.model.image_encoder
            )
        self.is_image_set = True

    def set_image_tensor(self, image: Tensor) -> Tensor:
        """Embed a ``3xHxW`` float image in [0, 1]; return the ``1xCxhxw`` embedding.

        The long side is resized to the model's input size (bilinear, antialiased), as
        ResizeLongestSide does for uint8 images; padding and normalisation are the model's own.
        """
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a 3xHxW image, got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, self.model.image_encoder.img_size)
        x = image[None].to(self.device, torch.float32).clamp(0.0, 1.0)
        if (new_h, new_w) != (h, w):
            x = F.interpolate(x, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        self.set_torch_image(x * 255.0, (h, w))
        return self.features
