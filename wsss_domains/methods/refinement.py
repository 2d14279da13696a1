"""Plain CAM followed by a post-hoc refiner from :mod:`wsss_domains.refine` (PAR, CRF, random walk).

Each refiner is run as its reference runs it, and what it returns is turned back into foreground
maps that the engine's background rule (a constant threshold channel, then arg-max) reads the
same way the reference reads its own output:

* ``par``: refined foreground only, re-normalised per class (unchanged from before);
* ``random-walk``: IRN's normalisation by the maximum over all classes and pixels; the engine's
  threshold channel then plays the part of IRN's ``sem_seg_bg_thres`` padding;
* ``crf``: AffinityNet's CRF with its background score, whose marginals are mapped onto the
  threshold so that the engine keeps the CRF's background pixels (see :func:`threshold_scores`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from wsss_domains.cam.extract import normalize_per_class
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.registry import register_method
from wsss_domains.options import OptionSpec, constructor_options
from wsss_domains.refine import create_refiner, list_refiners, refiner_class
from wsss_domains.refine.base import Refiner


def threshold_scores(marginals: Tensor, threshold: float, eps: float = 1e-12) -> Tensor:
    """``KxHxW`` foreground scores from ``(K+1)xHxW`` marginals (background first) for the threshold rule.

    ``s_k = t q_k / (t q_k + (1 - t) q_0)`` lies in [0, 1], rises with ``q_k`` and equals ``t`` exactly
    where ``q_k == q_0``: the engine's arg-max over ``[t, s_1..s_K]`` then picks background where the
    CRF does and, elsewhere, the CRF's class. Passing the marginals themselves would compare a
    probability with ``t`` (a class at 0.4 beside background at 0.6 would win at ``t = 0.3``).
    """
    background, foreground = marginals[:1], marginals[1:]
    weighted = threshold * foreground
    return weighted / (weighted + (1.0 - threshold) * background).clamp_min(eps)


class RefinedCam(Method):
    """CAMs of the present classes refined by ``refiner``; subclasses say how its output is read."""

    refiner_name: ClassVar[str]

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """The refiner's constructor parameters, which are this method's options."""
        return constructor_options(refiner_class(cls.refiner_name), stop=object)

    def foreground(self, refiner: Refiner, image: Tensor, cams: Tensor, bg_threshold: float | None) -> Tensor:
        """Refined ``KxHxW`` maps of the present classes; default: foreground only, per-class maximum 1."""
        return normalize_per_class(refiner(image, cams).clamp_min(0))

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        keep = context.present.bool()
        if not keep.any():
            return cams
        refiner = create_refiner(self.refiner_name, **self.options)
        out = cams.clone()
        out[keep] = self.foreground(refiner, context.image, cams[keep], context.bg_threshold).to(out.dtype)
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
    description = (
        "CAM + random walk on a colour affinity (not learned: not AffinityNet/IRN); walk as AffinityNet"
        " (radius 5, beta 8, 256 steps), IRN's global-maximum normalisation, background by threshold."
    )
    refiner_name = "random-walk"
    deviations = (
        "the affinity is colour-based, not AffinityNet's/IRN's learned one; neighbourhoods stop at the"
        " border; no 1 - edge damping"
    )

    def foreground(self, refiner: Refiner, image: Tensor, cams: Tensor, bg_threshold: float | None) -> Tensor:
        """The walk divided by its maximum over all classes (IRN), so weak classes stay weak."""
        return refiner(image, cams)


if "crf" in list_refiners():

    @register_method
    class CrfCam(RefinedCam):
        name = "crf"
        description = (
            "CAM + dense CRF as AffinityNet's crf_inference (raw CAMs, bg (1-max)^alpha, pairwise 3/3 and"
            " 80/13/10, 10 iter.); deviation: alpha = ln t/ln(1-t) from the bg threshold t (alpha=4: psa's)."
        )
        refiner_name = "crf"
        deviations = (
            "the background exponent alpha comes from the background threshold t (ln t / ln(1 - t)) instead"
            " of psa's fixed 4 / 32; option alpha=4 restores psa's"
        )

        def foreground(
            self, refiner: Refiner, image: Tensor, cams: Tensor, bg_threshold: float | None
        ) -> Tensor:
            """CRF marginals; with a background threshold, mapped so the engine keeps CRF background."""
            marginals = refiner(image, cams, bg_threshold=bg_threshold)
            if bg_threshold is None:
                return marginals  # sum to 1 per pixel: the engine's arg-max is the CRF's
            return threshold_scores(marginals, bg_threshold)
