"""Plain CAM followed by a post-hoc refiner from :mod:`wsss_domains.refine` (PAR, CRF, random walk)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from wsss_domains.cam.extract import normalize_per_class
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods.base import Method
from wsss_domains.methods.registry import register_method
from wsss_domains.refine import get_refiner, list_refiners


class RefinedCam(Method):
    """CAMs of the present classes refined by ``refiner``, then re-normalised per class.

    The refiner works on foreground channels only; background (threshold or exclude mask) is then
    decided exactly as for plain CAM, so the comparison with ``cam`` isolates the refinement.
    """

    refiner_name: ClassVar[str]

    def refine(
        self, image: Tensor, cams: Tensor, present: Tensor, domain: DomainPlugin, label_space: LabelSpace
    ) -> Tensor:
        keep = present.bool()
        if not keep.any():
            return cams
        refiner = get_refiner(self.refiner_name, **self.options)
        out = cams.clone()
        out[keep] = normalize_per_class(refiner(image, cams[keep]).clamp_min(0))
        return out


@register_method
class ParCam(RefinedCam):
    name = "par"
    description = (
        "CAM + pixel-adaptive refinement (ToCo's PAR: RGB affinity over dilations 1-24, 10 iterations)."
    )
    refiner_name = "par"


@register_method
class RandomWalkCam(RefinedCam):
    name = "random-walk"
    description = "CAM + colour-affinity random-walk propagation (AffinityNet-style transition matrix)."
    refiner_name = "random-walk"


if "crf" in list_refiners():

    @register_method
    class CrfCam(RefinedCam):
        name = "crf"
        description = "CAM + dense CRF (pydensecrf2; Gaussian + bilateral kernels, 10 iterations)."
        refiner_name = "crf"
