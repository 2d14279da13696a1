"""``sepl``: CAM pseudo-labels whose regions are redrawn with SAM masks (Chen et al., NeurIPS 2023).

Pseudo-label time only; training is plain CAM. SAM segments the image without classes
(everything mode; boxes from the CAMs for a box-only SAM such as LiteMedSAM) and the masks are merged
with the CAM pseudo-label by the official SEPL rule (SAM_WSSS ``merge/max_iou_imp2.py``, see
:func:`~wsss_domains.sam.sepl_merge.sepl_refine`): a mask goes to the first foreground class that holds
more than half of it or whose region it covers for 85 %; the output starts as background, each class
paints its masks and its CAM pixels no unclaimed mask covers, later classes over earlier ones.
Excluded (ignore) pixels stay ignored.
"""

from __future__ import annotations

from torch import Tensor

from wsss_domains.methods.base import RefineContext
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import SamMethod


class SeplRefinement(SamMethod):
    """Label-level SEPL on top of whatever CAMs the method produces (shared by ``sepl`` and ``s2c``).

    S2C's README sends its CAMs to SAM_WSSS for refinement, whose default merge this is.
    """

    def refine_labels(self, labels: Tensor, cams: Tensor, context: RefineContext) -> Tensor:
        from wsss_domains.sam.sepl_merge import sepl_refine

        label_space = context.label_space
        masks = self.segments(context.image, cams, context.present, context.domain)
        if masks.shape[0] == 0:
            return labels
        return sepl_refine(
            labels,
            masks.to(labels.device),
            label_space.num_classes,
            ignore_index=label_space.ignore_index,
            background_index=label_space.background_index,
            keep_ignore=True,
        ).to(labels.dtype)


@register_method
class Sepl(SeplRefinement):
    name = "sepl"
    description = (
        "CAM + SEPL (SAM_WSSS max_iou_imp2 merge): SAM masks claimed by the first class holding > 50% of"
        " them or covered >= 85% by them, unclaimed masks to background; everything mode, or CAM boxes"
        " for box-only SAMs (LiteMedSAM). Needs a SAM checkpoint."
    )
    deviations = (
        "excluded pixels stay ignored (keep_ignore=False paints them as the official code would); with no"
        " background class, pixels no class paints are left unassigned"
    )
