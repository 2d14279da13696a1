"""Methods joined with ``+``: ``cam-proto+random-walk`` runs both refinements, in that order.

Why: post-hoc refinements address different faults (prototypes fix which class a region gets,
colour affinity fixes where its boundary lies), so users want to stack them without a new class
per combination. The first part may be any method, training-time ones included (its training,
CAMs and modules are the chain's); every later part must be post-hoc (it adds no training hook)
and may not compute CAMs of its own: it only refines what the parts before it produced.

Options are scoped by part, ``PART.KEY`` (``--method-option cam-proto.fuse_weight=0.7``): an
unscoped option would be ambiguous, so it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin
from wsss_domains.methods.base import Method, RefineContext, trains
from wsss_domains.methods.fitting import FitContext
from wsss_domains.options import OptionSpec

SEPARATOR = "+"


class ChainedMethod(Method):
    """The parts of a ``+``-joined name, applied in order (see the module docstring)."""

    parts: ClassVar[tuple[type[Method], ...]] = ()

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        names = [part.name for part in self.parts]
        scoped: dict[str, dict[str, Any]] = {name: {} for name in names}
        for key, value in options.items():
            part, dot, option = key.partition(".")
            if not dot or part not in scoped:
                raise ValueError(
                    f"method '{self.name}': option '{key}' must name its part, e.g. "
                    f"'{names[-1]}.{key.partition('.')[2] or key}' (parts: {', '.join(names)})"
                )
            scoped[part][option] = value
        self.methods = [part(**part.checked_options(scoped[part.name])) for part in self.parts]

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """Every part's options, scoped ``PART.KEY``."""
        return {
            f"{part.name}.{key}": replace(spec, name=f"{part.name}.{key}")
            for part in cls.parts
            for key, spec in part.option_specs().items()
        }

    @classmethod
    def checked_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Scoping and each part's own check happen in the constructor, with the messages above."""
        return dict(options)

    @property
    def first(self) -> Method:
        return self.methods[0]

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        super().setup(domain, mean, std)
        for method in self.methods:
            method.setup(domain, mean, std)

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """The first part's extractor; later parts are told too (some keep it to read the model)."""
        chosen = self.first.extractor(model, modules, **kwargs)
        for method in self.methods[1:]:
            own = method.extractor(model, modules, **kwargs)
            if type(own) is not CamExtractor:
                raise ValueError(
                    f"method '{self.name}': '{method.name}' computes CAMs of its own, so it can only "
                    "come first in a chain"
                )
        return chosen

    def fit(self, context: FitContext) -> None:
        """Each part that learns from the training split fits on it (on the extractor's CAMs)."""
        for method in self.methods:
            if method.fits_training_split:
                method.fit(context)

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        for method in self.methods:
            cams = method.refine(cams, context)
        return cams

    def refine_labels(self, labels: Tensor, cams: Tensor, context: RefineContext) -> Tensor:
        for method in self.methods:
            labels = method.refine_labels(labels, cams, context)
        return labels


class TrainedChain(ChainedMethod):
    """A chain whose first part trains: training goes through that part unchanged."""

    def prepare_training(
        self, dataset: Dataset, device: torch.device | None = None, class_names: Sequence[str] | None = None
    ) -> None:
        self.first.prepare_training(dataset, device, class_names)

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        return self.first.build_modules(model)

    def learning_rate_scales(self) -> Mapping[str, float]:
        return self.first.learning_rate_scales()

    def extra_modules(self, feature_dim: int, num_classes: int) -> nn.ModuleDict:
        return self.first.extra_modules(feature_dim, num_classes)

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return self.first.forward(model, modules, batch)

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        return self.first.training_losses(model, modules, batch, outputs)


def chain_class(name: str, parts: Sequence[type[Method]]) -> type[ChainedMethod]:
    """The class of the chain ``name`` over ``parts``; ValueError when a later part trains."""
    if len(parts) < 2:
        raise ValueError(f"a chain joins at least two methods with '{SEPARATOR}', got '{name}'")
    for part in parts[1:]:
        if trains(part):
            raise ValueError(
                f"method '{name}': '{part.name}' trains its own model, so it can only come first in a chain"
            )
    if any(issubclass(part, ChainedMethod) for part in parts):
        raise ValueError(f"method '{name}': chains do not nest")
    first = parts[0]
    base = TrainedChain if trains(first) else ChainedMethod
    attrs: dict[str, Any] = {
        "name": name,
        "description": " then ".join(f"[{part.description}]" for part in parts),
        "parts": tuple(parts),
        "fits_training_split": any(part.fits_training_split for part in parts),
        "classification_weight": first.classification_weight,
        "backbone_modules": first.backbone_modules,
    }
    if base is ChainedMethod:  # keep Method's own settings so the chain counts as post-hoc
        del attrs["classification_weight"], attrs["backbone_modules"]
    return type(f"Chain[{name}]", (base,), attrs)
