"""What a WSSS method is to the engine: extra training losses, a CAM extractor, post-processing.

A method subclasses :class:`Method` and overrides only what it changes; plain CAM overrides
nothing. Methods are looked up by name in :mod:`wsss_domains.methods.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from wsss_domains.cam.extract import CamExtractor

if TYPE_CHECKING:
    from wsss_domains.domains.contract import DomainPlugin, LabelSpace


class Method:
    """Plain CAM: multi-label classification loss, multi-scale CAMs, no refinement."""

    name: ClassVar[str] = "cam"
    description: ClassVar[str] = "Class activation maps of a GAP multi-label classifier (Zhou et al., 2016)."

    def __init__(self, **options: Any) -> None:
        self.options = options

    def extra_modules(self, feature_dim: int, num_classes: int) -> nn.ModuleDict:
        """Trainable parts the method adds beside the classifier (projection heads, ...)."""
        return nn.ModuleDict()

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Losses added to the classification loss, by name (logged separately)."""
        return {}

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """The CAM extractor used at pseudo-label time."""
        return CamExtractor(model, **kwargs)

    def refine(
        self,
        image: Tensor,
        cams: Tensor,
        present: Tensor,
        domain: DomainPlugin,
        label_space: LabelSpace,
    ) -> Tensor:
        """Post-process normalised CAMs ``K x H x W`` (all foreground classes); default: unchanged."""
        return cams
