"""The domain-plugin contract: everything a domain adds to the engine goes through these types.

A domain plugin (histopathology, remote sensing, ...) is a subclass of :class:`DomainPlugin`
registered under the entry-point group ``wsss_domains.domains``. The engine never imports a plugin
by name; it asks the registry. Every hook has a default so a minimal plugin only declares its
datasets.

Conventions shared by every loader and the engine:

* A *sample* is a plain dict (see :class:`Sample`): ``image`` float32 ``3xHxW`` in ``[0, 1]``
  (not yet normalised), ``label`` float32 multi-hot over the *foreground* classes, optional
  ``mask`` int64 ``HxW`` with dataset class ids and ``ignore_index`` for unscored pixels, optional
  ``exclude`` bool ``HxW`` (True where the domain decides the pixel is background / not tissue /
  no-data), ``id`` a unique string, ``meta`` free-form.
* Class ids in masks and pseudo-labels are indices into :attr:`LabelSpace.classes`.
* The classifier predicts only the foreground classes (every class but the background class, if
  the label space has one). How background is decided is :attr:`LabelSpace.background_mode`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypedDict, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import Dataset

    from wsss_domains.options import OptionSpec

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Sample(TypedDict, total=False):
    """One item of any loader. Only ``image``, ``label`` and ``id`` are required."""

    image: Tensor
    label: Tensor
    mask: Tensor
    exclude: Tensor
    id: str
    meta: dict[str, Any]


@runtime_checkable
class ListsSampleIds(Protocol):
    """Optional for a loader's dataset: its samples' ids in index order, without decoding images.

    Slicing a split (``train[0:6]``, folds) and the prediction writers need every id; a dataset
    without this method is read sample by sample to get them.
    """

    def sample_ids(self) -> list[str]: ...


class BackgroundMode(str, enum.Enum):
    """How the pixels of no foreground class are decided."""

    NONE = "none"  # every pixel belongs to some class (driving, land cover)
    THRESHOLD = "threshold"  # a background class wins where all CAMs are below a threshold (VOC, GlaS)
    EXCLUDE = "exclude"  # background comes from an exclude mask (white glass in histology, no-data)


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one dataset, as stored in its masks and written in pseudo-labels."""

    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    background_mode: BackgroundMode = BackgroundMode.NONE
    background_index: int | None = None
    ignore_index: int = IGNORE_INDEX
    # Colour used for ignore / excluded pixels in palette PNGs.
    ignore_color: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if len(self.palette) != len(self.classes):
            raise ValueError(f"palette has {len(self.palette)} colours for {len(self.classes)} classes")
        if self.background_mode is BackgroundMode.THRESHOLD and self.background_index is None:
            raise ValueError("background_mode 'threshold' needs a background_index")
        if self.background_index is not None and not 0 <= self.background_index < len(self.classes):
            raise ValueError(f"background_index {self.background_index} out of range")
        if not len(self.classes) <= self.ignore_index <= 255:
            raise ValueError("ignore_index must lie above the class ids and fit in a byte")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def foreground(self) -> tuple[int, ...]:
        """Class ids the classifier predicts (all but the background class)."""
        return tuple(i for i in range(len(self.classes)) if i != self.background_index)

    @property
    def foreground_names(self) -> tuple[str, ...]:
        return tuple(self.classes[i] for i in self.foreground)

    def label_from_mask(self, mask: Tensor, min_pixels: int = 1) -> Tensor:
        """Multi-hot foreground label vector from the classes present in ``mask``."""
        import torch  # here, not at the top: `wsss-domains domains` reads this module without torch

        counts = torch.bincount(mask[mask != self.ignore_index].flatten().long(), minlength=self.num_classes)
        if counts.numel() > self.num_classes:
            bad = int(torch.nonzero(counts[self.num_classes :])[0]) + self.num_classes
            raise ValueError(f"mask holds class id {bad}, outside 0..{self.num_classes - 1}")
        return (counts[list(self.foreground)] >= min_pixels).float()

    def flat_palette(self) -> list[int]:
        """A 768-entry PIL palette: class colours, then the ignore colour at ``ignore_index``."""
        pal = [0] * 768
        for i, rgb in enumerate(self.palette):
            pal[3 * i : 3 * i + 3] = rgb
        pal[3 * self.ignore_index : 3 * self.ignore_index + 3] = self.ignore_color
        return pal


@dataclass(frozen=True)
class DatasetSpec:
    """A named on-disk dataset format a domain can read.

    ``build(root, split, **options)`` returns a map-style dataset of :class:`Sample` dicts.
    ``options`` understood by every loader: ``labels_from_masks`` (bool), ``patch_size`` (int).
    ``detect(root)`` says whether a folder looks like this dataset, so ``--dataset`` may be omitted.
    Formats whose classes are declared inside the data folder (the generic folder format) set
    ``label_space_from``; callers ask :meth:`label_space_for` rather than read ``label_space``.
    """

    name: str
    label_space: LabelSpace
    build: Callable[..., Dataset]
    detect: Callable[[Path], bool]
    splits: tuple[str, ...]
    description: str = ""
    default_split: str | None = None
    # Default patch size when cutting fully annotated images for ``--labels-from-masks``;
    # a (height, width) pair for rectangular crops (wide street scenes).
    patch_size: int | tuple[int, int] = 224
    # The loader understands ``split[start:stop]`` itself (e.g. windowed tiling after slicing);
    # otherwise the engine slices the split's whole images and cuts patches itself.
    native_slices: bool = False
    # Reads the label space of the dataset at ``root``; ``label_space`` is then a placeholder.
    label_space_from: Callable[[Path], LabelSpace] | None = None

    def label_space_for(self, root: Path) -> LabelSpace:
        """The label space of the dataset stored at ``root``."""
        if self.label_space_from is None:
            return self.label_space
        return self.label_space_from(Path(root))


@dataclass(frozen=True)
class DemoData:
    """A generated demo set: which loader reads it, where, and which splits to train and score."""

    dataset: str
    root: Path
    train_split: str
    eval_split: str
    labels_from_masks: bool = False
    # Training input size suited to the demo images (small synthetic patches need no upscaling).
    image_size: int | None = None


@dataclass(frozen=True)
class Recipe:
    """What a domain recommends for the whole job (``wsss-domains run``), so users need not know it.

    ``method`` is a method or chain of the registry (refinement included) used to pseudo-label;
    the segmenter fields choose the stage-2 network. ``why`` says where the choice was measured.
    """

    method: str = "cam"
    method_options: Mapping[str, object] = field(default_factory=dict)
    cam_norm: str = "max"
    segmenter_arch: str = "deeplabv3plus"
    # Training crop side of the segmenter; None: the classifier's patch size, else 320.
    segmenter_crop: int | None = None
    why: str = "the engine's default: plain CAM"
    # CAM scales (image size factors) for pseudo-labelling; None: the engine's default.
    cam_scales: tuple[float, ...] | None = None
    # Class-balanced sampling of the classifier's training images (repeat-factor threshold T of
    # ``wsss_domains.data.balance``) where the user chooses none; None: uniform sampling.
    classifier_balance: float | None = None


class PromptKind(str, enum.Enum):
    BOXES = "boxes"
    POINTS = "points"
    EVERYTHING = "everything"


@dataclass(frozen=True)
class SamStrategy:
    """How the SAM path prompts SAM from CAMs and builds prototypes in this domain."""

    prompt: PromptKind = PromptKind.BOXES
    # Fraction of a CAM's maximum above which a region becomes a prompt.
    cam_threshold: float = 0.5
    # Local maxima above this fraction of the global maximum become point prompts (S2C).
    peak_threshold: float = 0.7
    max_prompts_per_class: int = 4
    # Pool backbone features over SAM segments into prototypes (SAM-derived prototypes hook).
    use_prototypes: bool = True
    # Preferred SAM registry name for this domain (e.g. "lite_medsam" for histology).
    model: str = "vit_b"


@dataclass(frozen=True)
class ClipPrompts:
    """Class names, synonyms, templates and background vocabulary for CLIP-based methods."""

    class_names: Mapping[str, Sequence[str]]  # class -> [name, synonym, ...]
    templates: Sequence[str] = ("a photo of {}.",)
    background: Sequence[str] = ()
    learned: str | None = None  # name of a learned prompt artefact under prompts/<domain>/


@dataclass
class MetricResult:
    """A named scalar and optional per-class values produced by a domain metric."""

    name: str
    value: float
    per_class: dict[str, float] = field(default_factory=dict)


class DomainPlugin(ABC):
    """Base class of every domain plugin. Subclass, declare datasets, override hooks as needed.

    Options (``--domain-option KEY=VALUE``, ``create_domain(name, **options)``) are the constructor's
    typed keyword parameters with defaults, as for methods; a plugin without ``__init__`` takes none.
    Runs record them, so every later stage rebuilds the plugin with the same options.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    # -- options -----------------------------------------------------------------------------
    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """The options this plugin takes: its constructor's keyword parameters (see wsss_domains/options.py)."""
        from wsss_domains.options import constructor_options

        return constructor_options(cls, stop=DomainPlugin)

    @classmethod
    def checked_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` converted to their declared types; an unknown name or a bad value is an OptionError."""
        from wsss_domains.options import check_options

        return check_options(cls.name, cls.option_specs(), options, what="domain")

    # -- datasets ----------------------------------------------------------------------------
    @abstractmethod
    def datasets(self) -> Mapping[str, DatasetSpec]:
        """Dataset formats this domain reads, by loader name."""

    def demo(self, root: Path) -> DemoData | None:
        """Write a small synthetic demo set under ``root`` (deterministic; skip if already there)."""
        return None

    # -- image handling ----------------------------------------------------------------------
    def input_statistics(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Mean and std applied after loading; ImageNet statistics suit ImageNet backbones."""
        return IMAGENET_MEAN, IMAGENET_STD

    def preprocess(self, image: Tensor) -> Tensor:
        """Domain-specific colour handling before normalisation (e.g. stain normalisation)."""
        return image

    def train_augment(self, sample: Sample) -> Sample:
        """Label-preserving augmentation for training. Default: horizontal flip.

        Spatial changes apply to ``mask`` and ``exclude`` too when the sample has them: the
        segmenter trains on samples whose ``mask`` is a pseudo-label.
        """
        import torch

        if torch.rand(()) < 0.5:
            sample = dict(sample)  # type: ignore[assignment]
            for key in ("image", "mask", "exclude"):
                if key in sample:
                    sample[key] = sample[key].flip(-1)  # type: ignore[literal-required]
        return sample

    # -- the whole job -----------------------------------------------------------------------
    def recipe(self, dataset: str) -> Recipe:
        """The method chain and segmenter settings that suit this domain's ``dataset`` (default: CAM)."""
        return Recipe()

    # -- background --------------------------------------------------------------------------
    def exclude_mask(self, image: Tensor, label_space: LabelSpace) -> Tensor | None:
        """Pixels this domain excludes when a sample carries no ``exclude`` mask (None: none)."""
        return None

    def background_threshold(self, label_space: LabelSpace) -> float:
        """CAM score below which a pixel is background, for ``BackgroundMode.THRESHOLD``."""
        return 0.3

    # -- evaluation --------------------------------------------------------------------------
    def metrics(self, confusion: Tensor, label_space: LabelSpace) -> list[MetricResult]:
        """Domain metrics computed from the accumulated confusion matrix (rows gt, cols pred).

        The engine always reports mIoU, per-class IoU, FwIoU, pixel accuracy and Dice; return
        extra ones here (e.g. Cohen's kappa for remote sensing).
        """
        return []

    def scored_classes(self, label_space: LabelSpace) -> tuple[int, ...]:
        """Class ids averaged into mIoU. Default: every class of the label space."""
        return tuple(range(label_space.num_classes))

    # -- CLIP and SAM hooks ------------------------------------------------------------------
    def clip_prompts(self, label_space: LabelSpace) -> ClipPrompts:
        """Prompts for CLIP-based CAMs. Default: class names in a generic template."""
        return ClipPrompts(class_names={c: (c,) for c in label_space.foreground_names})

    def sam_strategy(self) -> SamStrategy:
        """How to prompt SAM from CAMs and whether to build SAM-derived prototypes."""
        return SamStrategy()

    # -- helpers -----------------------------------------------------------------------------
    def dataset(self, name: str) -> DatasetSpec:
        specs = self.datasets()
        if name not in specs:
            raise KeyError(f"domain '{self.name}' has no dataset '{name}'; known: {', '.join(specs)}")
        return specs[name]

    def detect_dataset(self, root: Path) -> DatasetSpec:
        """The one dataset whose layout matches ``root``; a clear error if none or several do."""
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"data folder {root} does not exist")
        hits = [spec for spec in self.datasets().values() if spec.detect(root)]
        if not hits:
            raise ValueError(
                f"{root}: no '{self.name}' dataset layout recognised (known: {', '.join(self.datasets())});"
                " pass --dataset NAME"
            )
        if len(hits) > 1:
            raise ValueError(
                f"{root}: layout is ambiguous between {', '.join(s.name for s in hits)}; pass --dataset NAME"
            )
        return hits[0]
