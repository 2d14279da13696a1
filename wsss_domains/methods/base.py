"""What a WSSS method is to the engine: extra training losses, a CAM extractor, post-processing.

A method subclasses :class:`Method` and overrides only what it changes; plain CAM overrides
nothing. Methods are looked up by name in :mod:`wsss_domains.methods.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.options import OptionSpec, check_options, constructor_options

if TYPE_CHECKING:
    from wsss_domains.domains.contract import DomainPlugin, LabelSpace
    from wsss_domains.methods.fitting import FitContext


@dataclass(frozen=True)
class RefineContext:
    """The image being pseudo-labelled and what the engine already decided or computed for it.

    Handed to :meth:`Method.refine` and :meth:`Method.refine_labels` so that a refinement uses the
    run's effective background rule and exclude mask (``--bg-threshold``, a loader's or a raster's
    no-data mask) and the classifier's own input, instead of re-deriving them from the domain.
    """

    image: Tensor  # ``3 x H x W`` in [0, 1], un-normalised, on the maps' device
    present: Tensor  # multi-hot image-level labels over the foreground classes
    domain: DomainPlugin
    label_space: LabelSpace
    # The background threshold the engine applies (``--bg-threshold`` or the domain's); None: the
    # label space decides background by exclusion, not by threshold.
    bg_threshold: float | None
    # ``H x W`` pixels never scored (the loader's mask, raster no-data, or the domain's rule); None: none.
    exclude: Tensor | None
    # The image after the domain's preprocessing (stain normalisation), ``3 x H x W`` in [0, 1].
    prepared: Tensor | None = None
    # ``prepared`` normalised with the classifier's mean and std: the CAM extractor's input.
    normalized: Tensor | None = None

    @classmethod
    def of(
        cls, image: Tensor, present: Tensor, domain: DomainPlugin, label_space: LabelSpace, **given: Any
    ) -> RefineContext:
        """A context with the domain's own threshold and exclude rule unless ``given`` (tests, notebooks)."""
        from wsss_domains.domains.contract import BackgroundMode

        if "bg_threshold" not in given:
            threshold = label_space.background_mode is BackgroundMode.THRESHOLD
            given["bg_threshold"] = float(domain.background_threshold(label_space)) if threshold else None
        if "exclude" not in given:
            given["exclude"] = domain.exclude_mask(image, label_space)
        return cls(image, present, domain, label_space, **given)


class Method:
    """Plain CAM: multi-label classification loss, multi-scale CAMs, no refinement."""

    name: ClassVar[str] = "cam"
    description: ClassVar[str] = "Class activation maps of a GAP multi-label classifier (Zhou et al., 2016)."
    # Where the method knowingly differs from its paper's official code (``methods --details``).
    deviations: ClassVar[str] = ""
    # Weight of the engine's classification loss on the forward pass's logits (SEAM averages it with
    # the classification loss of its rescaled view, so it uses 0.5).
    classification_weight: ClassVar[float] = 1.0
    # Extra modules (keys of ``build_modules``) trained at the backbone's learning rate rather than the
    # head's: a second pretrained backbone must not get the 10x rate of freshly initialised heads.
    backbone_modules: ClassVar[tuple[str, ...]] = ()
    # Whether the engine calls :meth:`fit` with the run's training split before pseudo-labelling.
    fits_training_split: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        # Subclasses take their options as keyword parameters and pass them up here, so that
        # ``self.options`` holds every option (fitted-state caches are keyed by it).
        self.options = options
        # Set by :meth:`setup`; None until the engine has called it.
        self.domain: DomainPlugin | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """The options this method takes: its constructor's keyword parameters (see options.py)."""
        return constructor_options(cls, stop=Method)

    @classmethod
    def checked_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` converted to their declared types; an unknown name is a MethodOptionError."""
        return check_options(cls.name, cls.option_specs(), options)

    def setup(self, domain: DomainPlugin, mean: Sequence[float], std: Sequence[float]) -> None:
        """Told by the engine, before training and before pseudo-labelling, the run's domain and input
        normalisation: a method feeding another model (SAM) needs the un-normalised image of a batch and
        the domain's strategy for it. Overrides may also fail fast here (a missing checkpoint)."""
        self.domain = domain
        self.mean, self.std = tuple(mean), tuple(std)

    def prepare_training(
        self, dataset: Dataset, device: torch.device | None = None, class_names: Sequence[str] | None = None
    ) -> None:
        """Learn what the model's modules are built from, before they are built (PBIP's prototypes).

        Called once per training run, after :meth:`setup` and before :meth:`build_modules`, with the
        training split as the classifier sees it without augmentation (``image`` normalised and
        resized, ``label`` multi-hot), the device the run trains on (this process's GPU under DDP;
        ``None``: the CPU) and the names of the classifier's outputs in order (``None`` where unknown).
        State learnt here that the trained model needs must live in the modules :meth:`build_modules`
        returns, so that a finished run loads without it.
        """

    def extra_modules(self, feature_dim: int, num_classes: int) -> nn.ModuleDict:
        """Trainable parts the method adds beside the classifier (projection heads, ...)."""
        return nn.ModuleDict()

    def learning_rate_scales(self) -> Mapping[str, float]:
        """Extra modules (keys of ``build_modules``) trained at their own multiple of the head's learning
        rate, each in its own optimiser group: learned prompt vectors need a rate far above a head's."""
        return {}

    def build_modules(self, model: nn.Module) -> nn.ModuleDict:
        """The extra modules for ``model``; override when they depend on it (stage widths, a backbone copy)."""
        return self.extra_modules(model.backbone.num_features, model.num_classes)

    def forward(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The training forward pass; the classification loss and ``training_losses`` see its outputs.

        Overridden by methods that need more of the pass than logits, CAMs and features (e.g. the
        backbone's intermediate stages) without running the backbone twice.
        """
        return model(batch["image"])

    def training_losses(
        self, model: nn.Module, modules: nn.ModuleDict, batch: dict[str, Tensor], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Losses added to the classification loss, by name (logged separately).

        ``batch`` holds ``image`` (normalised ``B x 3 x H x W``), ``label`` (``B x K`` multi-hot),
        ``step`` (the optimiser step) and ``progress`` (share of the training budget spent, in [0, 1]),
        the last two as 0-dim tensors, for methods whose losses change over training.
        """
        return {}

    def first_pass_of_step(self, what: str, batch: Mapping[str, Tensor]) -> bool:
        """Whether this training pass is the first of its optimiser step for the update ``what``.

        With ``--accumulate-batches N`` one optimiser step spans N passes that share ``batch["step"]``;
        state the official code updates once per step (a momentum teacher, a re-clustering) is updated
        on the first of them only, so accumulation changes memory, not the method. Always True
        without ``step``.
        """
        if "step" not in batch:
            return True
        step = int(batch["step"])
        seen: dict[str, int] = self.__dict__.setdefault("_steps_seen", {})
        if seen.get(what) == step:
            return False
        seen[what] = step
        return True

    def extractor(self, model: nn.Module, modules: nn.ModuleDict, **kwargs: Any) -> CamExtractor:
        """The CAM extractor used at pseudo-label time."""
        return CamExtractor(model, **kwargs)

    def fit(self, context: FitContext) -> None:
        """Learn from the run's training split, after training and before pseudo-labelling.

        Called once per pseudo-labelling job, only for methods with ``fits_training_split``; the
        default has nothing to learn. ``context`` holds the split as training saw it (patches with
        their image-level labels), the CAM extractor and a cache folder inside the run.
        """

    def refine(self, cams: Tensor, context: RefineContext) -> Tensor:
        """Post-process normalised CAMs ``K x H x W`` (all foreground classes); default: unchanged.

        ``context`` holds the image, its labels, the domain and the engine's background threshold,
        exclude mask and classifier input (:meth:`RefineContext.of` builds one outside the engine).
        """
        return cams

    def refine_labels(self, labels: Tensor, cams: Tensor, context: RefineContext) -> Tensor:
        """Post-process the assembled pseudo-label ``H x W`` (class ids, ``ignore_index``); default: unchanged.

        Called right after the CAMs became labels, for methods that work on labels rather than maps
        (SEPL relabels whole SAM masks).
        """
        return labels


# Hooks and settings of Method that act during training: a method overriding one trains a model of
# its own; the others (extractor, refine, ...) act only at pseudo-label time.
TRAINING_HOOKS = (
    "training_losses",
    "extra_modules",
    "build_modules",
    "learning_rate_scales",
    "forward",
    "prepare_training",
)
TRAINING_SETTINGS = ("classification_weight", "backbone_modules")


def trains(cls: type[Method]) -> bool:
    """Whether ``cls`` changes training (overrides a training hook or setting of :class:`Method`)."""
    return any(getattr(cls, n) is not getattr(Method, n) for n in (*TRAINING_HOOKS, *TRAINING_SETTINGS))
