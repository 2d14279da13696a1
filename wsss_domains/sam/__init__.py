"""The SAM path: loading SAMs, caching their embeddings, prompting them from CAMs, SEPL, prototypes.

Building blocks the method registry composes (SEPL, S2C, SAM-derived prototypes):

* :func:`create_sam` / :func:`list_sam_models` -- SAMs by name from local checkpoints;
* :class:`EmbeddingCache` -- image embeddings on disk, keyed by input content and weights;
* :class:`SamSegmenter` -- image + CAMs + :class:`~wsss_domains.domains.contract.SamStrategy`
  -> :class:`SamMasks`;
* :func:`sepl_refine` -- label SAM masks from a CAM pseudo-label;
* :func:`class_prototypes`, :func:`prototype_cams`, :func:`fuse_cams` -- SAM-derived prototypes.
"""

from wsss_domains.sam.cache import EmbeddingCache, embedding_key
from wsss_domains.sam.predictor import CachedSamPredictor
from wsss_domains.sam.prompts import cam_boxes, cam_peaks, connected_components, everything_masks
from wsss_domains.sam.prototypes import (
    class_prototypes,
    fuse_cams,
    prototype_cams,
    segment_prototypes,
)
from wsss_domains.sam.registry import CHECKPOINT_FLAG, LoadedSam, create_sam, list_sam_models
from wsss_domains.sam.segmenter import SamMasks, SamSegmenter
from wsss_domains.sam.sepl_merge import sepl_assign, sepl_refine

__all__ = [
    "CHECKPOINT_FLAG",
    "CachedSamPredictor",
    "EmbeddingCache",
    "LoadedSam",
    "SamMasks",
    "SamSegmenter",
    "cam_boxes",
    "cam_peaks",
    "class_prototypes",
    "connected_components",
    "create_sam",
    "embedding_key",
    "everything_masks",
    "fuse_cams",
    "list_sam_models",
    "prototype_cams",
    "segment_prototypes",
    "sepl_assign",
    "sepl_refine",
]
