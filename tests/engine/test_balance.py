"""Class-balanced sampling: LVIS repeat factors, the classes each kind of dataset lists, training with it."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import fakes
import numpy as np
import pytest
import torch
from fakes import fake_domain  # noqa: F401  (the module's fixture)
from torch.utils.data import WeightedRandomSampler

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.cli import main
from wsss_domains.data.balance import balanced_sampler, repeat_factors, sample_class_sets
from wsss_domains.data.io import save_palette_png
from wsss_domains.data.patches import PatchDataset, RandomPatchDataset
from wsss_domains.errors import UserError
from wsss_domains.evaluation.evaluate import pred_filename
from wsss_domains.segmentation.data import PseudoLabelledDataset
from wsss_domains.training.fit import TrainOptions, training_loader

pytestmark = pytest.mark.usefixtures("fake_domain")

FAST = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
FAST += ["--max-steps", "2", "--device", "cpu", "--no-progress"]


def test_repeat_factors_follow_lvis_formula_worked_by_hand():
    # Four images: class 0 in three (f = 3/4), class 1 in one (f = 1/4), the last image in none.
    sets = [{0}, {0, 1}, {0}, set()]
    # t = 1: r_0 = sqrt(1 / 0.75), r_1 = sqrt(1 / 0.25) = 2; an image takes its largest, none -> 1.
    r0 = math.sqrt(4 / 3)
    assert repeat_factors(sets, 1.0) == pytest.approx([r0, 2.0, r0, 1.0])
    # t = 0.5: class 0 (f = 0.75 >= t) is not repeated, class 1 by sqrt(0.5 / 0.25) = sqrt(2).
    assert repeat_factors(sets, 0.5) == pytest.approx([1.0, math.sqrt(2), 1.0, 1.0])
    # A class in every image is never repeated whatever t <= 1.
    assert repeat_factors([{3}, {3}], 1.0) == [1.0, 1.0]
    with pytest.raises(ValueError, match="positive"):
        repeat_factors(sets, 0.0)


def test_the_sampler_draws_in_proportion_to_the_factors_for_an_epoch_of_their_sum():
    torch.manual_seed(0)
    sampler = balanced_sampler([1.0, 3.0])
    assert len(sampler) == 4
    draws = Counter(i for _ in range(2000) for i in sampler)
    share = draws[1] / sum(draws.values())
    assert 0.72 < share < 0.78  # 3 / (1 + 3); 8000 draws: standard error 0.005


def test_training_loader_draws_by_the_factors_and_refuses_a_mismatch():
    view = [{"x": torch.tensor(i)} for i in range(4)]
    options = TrainOptions(batch_size=2)
    loader = training_loader(view, options, [1.0, 1.0, 1.0, 5.0])
    assert isinstance(loader.sampler, WeightedRandomSampler) and len(loader.sampler) == 8
    torch.manual_seed(0)
    drawn = Counter(int(i) for _ in range(200) for batch in loader for i in batch["x"])
    assert drawn[3] > 2 * max(drawn[0], drawn[1], drawn[2])  # expected 5:1
    assert training_loader(view, options).sampler.__class__.__name__ == "RandomSampler"
    with pytest.raises(ValueError, match="3 repeat factors for 4 samples"):
        training_loader(view, options, [1.0, 1.0, 1.0])


def _mask_dataset() -> list[dict]:
    """Two 4x4 'images': one red and blue (blue a single pixel), one all background."""
    first = torch.zeros(4, 4, dtype=torch.long)
    first[:2] = 1
    first[3, 3] = 2
    second = torch.zeros(4, 4, dtype=torch.long)
    return [{"image": torch.rand(3, 4, 4), "mask": m, "id": f"im{i}"} for i, m in enumerate((first, second))]


def test_each_kind_of_dataset_lists_its_samples_classes():
    space = fakes.LABEL_SPACE  # foreground: red (index 0), blue (index 1)
    samples = _mask_dataset()
    # Patches of 2x2: their own labels (blue's single pixel counts in its patch).
    patches = PatchDataset(samples, space, 2)
    assert sample_class_sets(patches) == [
        {int(c) for c in label.nonzero().flatten()} for *_, label in patches.index
    ]
    assert sample_class_sets(patches)[:4] == [{0}, {0}, set(), {1}]
    # Random windows: their image's classes above 1 % (blue: 1 of 16 pixels, 6 %).
    windows = RandomPatchDataset(samples, space, 2, per_image=3)
    assert sample_class_sets(windows) == [{0, 1}] * 3 + [set()] * 3
    # Anything else: sample by sample, the image-level label first, else the mask (needs a space).
    labelled = [{"image": s["image"], "label": torch.tensor([0.0, 1.0]), "id": s["id"]} for s in samples]
    assert sample_class_sets(labelled) == [{1}, {1}]
    assert sample_class_sets(samples, space) == [{0, 1}, set()]
    with pytest.raises(ValueError, match="no image-level label"):
        sample_class_sets(samples)


def test_pseudo_labels_list_their_classes_from_the_pngs(tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "data", n_train=2, n_val=0, n_unlabelled=0)
    base = fakes.build(root, "train")
    folder = tmp_path / "pl"
    expected = []
    for i in range(len(base)):
        shape = base[i]["mask"].shape
        label = np.zeros(shape, dtype=np.uint8)
        if i == 0:
            label[: shape[0] // 2] = 2  # blue over half the image
            label[-1, -1] = 1  # and one red pixel: below 1 %, not counted
        expected.append({1} if i == 0 else set())
        save_palette_png(folder / pred_filename(base[i]["id"]), label, fakes.LABEL_SPACE.flat_palette())
    dataset = PseudoLabelledDataset(base, folder, fakes.LABEL_SPACE)
    assert sample_class_sets(dataset, fakes.LABEL_SPACE) == expected


def test_both_stages_train_balanced_and_record_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    drawn_by: list[list[float]] = []

    def recording(factors):
        drawn_by.append(list(factors))
        return balanced_sampler(factors)

    monkeypatch.setattr(wsss_domains.training.fit, "balanced_sampler", recording)
    root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=1, n_unlabelled=0)
    run, pl, seg = tmp_path / "run", tmp_path / "pl", tmp_path / "seg"
    common = ["--data", str(root), "--balance-classes", "1"]
    assert main(["train", "--domain", fakes.FAKE_DOMAIN, "--out", str(run), *common, *FAST]) == 0
    assert json.loads((run / "run.json").read_text())["balance_classes"] == 1.0
    args = ["pseudo-labels", "--run", run, "--data", root, "--split", "train", "--out", pl, "--no-progress"]
    assert main([str(a) for a in args]) == 0
    args = ["segment", "--run", run, "--pseudo-labels", pl, "--split", "train", "--out", seg, *common]
    args += ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "2"]
    assert main([str(a) for a in [*args, "--device", "cpu", "--no-progress"]]) == 0
    assert json.loads((seg / "segmenter.json").read_text())["balance_classes"] == 1.0
    # Both stages drew their four training images by repeat factors (each at least 1).
    assert len(drawn_by) == 2 and all(len(f) == 4 and min(f) >= 1.0 for f in drawn_by)


def test_a_negative_threshold_is_refused_and_zero_means_uniform():
    with pytest.raises(UserError, match=r"--balance-classes must be positive \(or 0: off\), got -1"):
        TrainOptions(balance_classes=-1.0).check()
    TrainOptions(balance_classes=0.0).check()


def test_zero_trains_on_uniformly_drawn_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """0 is how `run` turns off a recipe's balancing: no repeat factors, no weighted sampler."""
    drawn_by: list[list[float]] = []
    monkeypatch.setattr(wsss_domains.training.fit, "balanced_sampler", lambda f: drawn_by.append(f))
    root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=1, n_unlabelled=0)
    run = tmp_path / "run"
    args = ["train", "--domain", fakes.FAKE_DOMAIN, "--out", str(run), "--data", str(root)]
    assert main([*args, "--balance-classes", "0", *FAST]) == 0
    assert drawn_by == [] and json.loads((run / "run.json").read_text())["balance_classes"] == 0.0


def test_run_balances_the_classifier_as_the_recipe_says_unless_the_user_chooses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from dataclasses import replace

    from wsss_domains.domains import create_domain
    from wsss_domains.pipeline import run as run_module
    from wsss_domains.pipeline.classifier import ClassifierSettings
    from wsss_domains.pipeline.run import RunSettings, run_pipeline

    class Trained(Exception):
        pass

    given: list[float | None] = []

    def train_classifier(*args, settings, **kwargs):
        given.append(settings.balance_classes)
        raise Trained  # the later stages are not this test's

    plugin = type(create_domain(fakes.FAKE_DOMAIN))
    recipe = plugin.recipe
    monkeypatch.setattr(
        plugin, "recipe", lambda self, dataset: replace(recipe(self, dataset), classifier_balance=2.0)
    )
    monkeypatch.setattr(run_module, "train_classifier", train_classifier)
    root = fakes.write_shapes(tmp_path / "data", n_train=2, n_val=1, n_unlabelled=0)
    for chosen in (None, 0.0, 0.5):
        settings = RunSettings(classifier=ClassifierSettings(balance_classes=chosen, device="cpu"))
        with pytest.raises(Trained):
            run_pipeline(fakes.FAKE_DOMAIN, root, tmp_path / "job", train_split="train", test_split="val",
                         settings=settings, log=lambda *a: None)  # fmt: skip
    assert given == [2.0, 0.0, 0.5]
