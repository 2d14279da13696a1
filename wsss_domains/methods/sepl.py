"""``sepl``: CAM pseudo-labels whose regions are redrawn with SAM masks (Chen et al., NeurIPS 2023).

Pseudo-label time only; training is plain CAM. SAM segments the image without classes
(everything mode; boxes from the CAMs for a box-only SAM such as LiteMedSAM) and each mask takes the
class the CAM pseudo-label gives most of it, or the class whose region it covers
(:func:`~wsss_domains.sam.sepl.sepl_refine`); pixels no labelled mask covers keep their CAM label.
"""

from __future__ import annotations

from torch import Tensor

from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.registry import register_method
from wsss_domains.methods.sam_base import SamMethod


class SeplRefinement(SamMethod):
    """Label-level SEPL on top of whatever CAMs the method produces (shared by ``sepl`` and ``s2c``)."""

    def refine_labels(
        self,
        image: Tensor,
        labels: Tensor,
        cams: Tensor,
        present: Tensor,
        domain: DomainPlugin,
        label_space: LabelSpace,
    ) -> Tensor:
        from wsss_domains.sam.sepl import sepl_refine

        masks = self.segments(image, cams, present, domain)
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
        "CAM + SEPL: SAM masks labelled by the CAM pseudo-label (majority > 50% or coverage >= 85%);"
        " everything mode, or CAM boxes for box-only SAMs (LiteMedSAM). Needs a SAM checkpoint."
    )
