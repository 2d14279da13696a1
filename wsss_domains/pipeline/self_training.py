"""Self-training: a segmenter's predictions of its own training images become the next round's labels.

A segmenter trained on noisy pseudo-labels already smooths part of their noise away; predicting its
training images and training again on those predictions is the WSSS literature's usual second
round. The training images' image-level labels are known, so a prediction keeps only the classes
its image is labelled with (and the background class, where the label space has one), and the
pixels the first pseudo-labels left unassigned (glass, no-data, padding) stay unassigned.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wsss_domains.data.io import read_index_mask, save_palette_png
from wsss_domains.domains.contract import LabelSpace
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.pipeline.data import open_dataset
from wsss_domains.progress import progress_bar
from wsss_domains.segmentation.inference import InferenceOptions

DONE_FILE = "labels-complete.txt"  # written last: a folder without it is (re)written


def allowed_classes(label: Tensor, label_space: LabelSpace) -> Tensor:
    """``K`` booleans: the classes an image whose foreground multi-hot label is ``label`` may hold.

    Its labelled foreground classes and the background class; an image labelled with nothing in a
    label space without background restricts nothing.
    """
    allowed = torch.zeros(label_space.num_classes, dtype=torch.bool)
    foreground = torch.tensor(label_space.foreground, dtype=torch.long)
    allowed[foreground[label.cpu().bool()]] = True
    if label_space.background_index is not None:
        allowed[label_space.background_index] = True
    if not allowed.any():
        allowed[:] = True
    return allowed


def restricted_labels(probs: Tensor, label: Tensor, label_space: LabelSpace, previous: Tensor) -> Tensor:
    """``H x W`` class ids: the most probable of the image's allowed classes (``probs``: ``K x H x W``),
    the ignore index where the ``previous`` labels were unassigned."""
    allowed = allowed_classes(label, label_space).to(probs.device)
    ids = probs.masked_fill(~allowed[:, None, None], float("-inf")).argmax(0).cpu()
    return ids.masked_fill(previous == label_space.ignore_index, label_space.ignore_index)


def relabel_training_split(
    model: Path,
    previous: Path,
    data: Path,
    out: Path,
    *,
    split: str | None,
    dataset: str | None = None,
    dataset_options: Mapping[str, object] | None = None,
    device: str = "cpu",
    save_scores: bool = False,
) -> int:
    """Write the segmenter ``model``'s labels of every training sample of ``split`` into ``out``.

    Samples as the previous round saw them (``dataset_options``: the same patches, the same ids), each
    restricted to its image-level label and to the ``previous`` labels' assigned pixels.
    ``save_scores``: also the class probabilities as ``cams/<id>.npz`` (what BECO's confidence reads).
    Returns the number of samples; a finished folder is kept as it is.
    """
    from wsss_domains.pipeline.predict import load_predictor

    out = Path(out)
    done = out / DONE_FILE
    if done.is_file():
        return int(done.read_text().split()[0])
    loaded = load_predictor(Path(model), InferenceOptions(device=device))
    config = loaded.config
    opened = open_dataset(config.domain, dataset or config.dataset, data, split,
                          domain_options=config.domain_options, **dict(dataset_options or {}))  # fmt: skip
    space = loaded.label_space
    palette = space.flat_palette()
    out.mkdir(parents=True, exist_ok=True)
    for index in progress_bar(range(len(opened.dataset)), desc="relabelling", unit="img"):
        sample = opened.dataset[index]
        name = pred_filename(sample["id"])
        probs = loaded.predictor.probabilities(loaded.predictor.prepare(sample["image"], loaded.domain))
        ids = restricted_labels(probs, sample["label"], space, read_index_mask(Path(previous) / name))
        save_palette_png(out / name, ids.numpy(), palette)
        if save_scores:
            (out / "cams").mkdir(exist_ok=True)
            np.savez_compressed(out / "cams" / (name[: -len(".png")] + ".npz"),
                                cams=probs.cpu().numpy().astype(np.float16))  # fmt: skip
    done.write_text(f"{len(opened.dataset)} samples\n")
    return len(opened.dataset)
