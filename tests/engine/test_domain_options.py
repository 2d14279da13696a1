"""Domain options: the plugin constructor's typed keyword parameters, from ``--domain-option KEY=VALUE``
through ``run.json`` to every stage that reloads the run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fakes
import pytest
from cli_helpers import assert_one_error, cli
from torch import Tensor

import wsss_domains.training.fit  # noqa: F401  (Lightning's log handler must see stderr first)
from wsss_domains.domains import DOMAINS, check_domain_options, create_domain, domain_class, register_domain
from wsss_domains.errors import UserError
from wsss_domains.options import OptionError
from wsss_domains.segmentation.model import SegmenterConfig
from wsss_domains.training.run import RunConfig, run_label_space

FAST = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32", "--batch-size", "2"]
FAST += ["--max-steps", "2", "--device", "cpu", "--no-progress"]
SEG_FAST = ["--arch", "fpn", "--encoder-weights", "random", "--seg-batch-size", "2", "--max-steps", "2"]
SEG_FAST += ["--device", "cpu", "--no-progress"]
TINTED = "fake-tinted"


class TintedDomain(fakes.FakeDomain):
    """The fake domain with options; ``preprocess`` records the options of the instance that ran it."""

    name = TINTED
    seen: list[tuple[float, str]] = []

    def __init__(self, tint: float = 0.0, mode: Literal["add", "mul"] = "add") -> None:
        self.tint, self.mode = tint, mode

    def preprocess(self, image: Tensor) -> Tensor:
        TintedDomain.seen.append((self.tint, self.mode))
        return image


class Forwarding(TintedDomain):
    """A plugin forwarding ``**options`` to its base takes the base's options too."""

    name = "fake-forwarding"

    def __init__(self, strength: int = 1, **base: Any) -> None:
        super().__init__(**base)
        self.strength = strength


@pytest.fixture(scope="module", autouse=True)
def domains() -> Iterator[None]:
    fakes.register()
    register_domain(TintedDomain)
    register_domain(Forwarding)
    yield
    fakes.unregister()
    DOMAINS.unregister(TINTED)
    DOMAINS.unregister(Forwarding.name)


# -- the API ---------------------------------------------------------------------------------


def test_options_are_the_constructor_parameters_checked_and_converted():
    assert list(TintedDomain.option_specs()) == ["tint", "mode"]
    assert list(Forwarding.option_specs()) == ["strength", "tint", "mode"]
    assert fakes.FakeDomain.option_specs() == {}  # no constructor: no options
    plugin = create_domain(TINTED, tint=1, mode="mul")
    assert isinstance(plugin, TintedDomain) and plugin.mode == "mul"
    assert plugin.tint == 1.0 and isinstance(plugin.tint, float)  # JSON's 1 where a float is declared
    assert create_domain(Forwarding.name, strength=3, tint=0.5).tint == 0.5
    assert check_domain_options(TINTED, None) == {}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"tnit": 0.5},
            "domain 'fake-tinted' has no option 'tnit'; its options: tint (float, default 0.0); mode",
        ),
        ({"tint": "dark"}, "domain 'fake-tinted': option 'tint' expects float, got 'dark'"),
        ({"mode": "div"}, "domain 'fake-tinted': option 'mode' expects 'add' | 'mul', got 'div'"),
        ({"anything": 1}, "domain 'fake' has no option 'anything'; its options: none"),
    ],
)
def test_unknown_or_ill_typed_options_fail_naming_the_option(options: dict[str, object], message: str):
    name = TINTED if "anything" not in options else fakes.FAKE_DOMAIN
    with pytest.raises(OptionError) as caught:
        create_domain(name, **options)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, UserError)


def test_histo_declares_its_stain_option_without_importing_monai():
    specs = domain_class("histo").option_specs()
    assert list(specs) == ["stain"] and specs["stain"].default == "none"
    plugin = create_domain("histo", stain="macenko")
    assert plugin.stain == "macenko"  # type: ignore[attr-defined]
    assert create_domain("histo").stain == "none"  # type: ignore[attr-defined]


def test_a_run_and_a_segmenter_rebuild_the_domain_with_their_recorded_options(tmp_path: Path):
    config = RunConfig(
        domain="histo",
        dataset="wsss4luad",
        classes=["tumor", "stroma", "normal"],
        foreground=["tumor", "stroma", "normal"],
        domain_options={"stain": "macenko"},
    )
    config.save(tmp_path)
    domain, _ = run_label_space(RunConfig.load(tmp_path))
    assert domain.stain == "macenko"  # type: ignore[attr-defined]
    segmenter = SegmenterConfig("histo", "wsss4luad", ["tumor", "stroma", "normal"], {"stain": "macenko"})
    assert segmenter.label_space()[0].stain == "macenko"  # type: ignore[attr-defined]


def test_a_run_json_written_before_domain_options_still_loads(tmp_path: Path):
    config = RunConfig(domain="histo", dataset="wsss4luad", classes=["a"], foreground=["a"])
    config.save(tmp_path)
    data = json.loads((tmp_path / "run.json").read_text())
    del data["domain_options"]
    (tmp_path / "run.json").write_text(json.dumps(data))
    loaded = RunConfig.load(tmp_path)
    assert loaded.domain_options == {}


# -- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize(
    ("option", "fragments"),
    [
        (
            "stian=macenko",
            ("domain 'histo' has no option 'stian'", "stain ('none' | 'macenko', default 'none')"),
        ),
        ("stain=reinhard", ("domain 'histo': option 'stain' expects 'none' | 'macenko', got 'reinhard'",)),
        ("stain", ("--domain-option expects KEY=VALUE, got 'stain'",)),
    ],
)
def test_bad_domain_options_end_in_one_line_before_anything_is_written(
    capsys, tmp_path: Path, command: str, option: str, fragments: tuple[str, ...]
):
    data = fakes.write_shapes(tmp_path / "data", n_train=2, n_val=1)  # not histology: never read
    out = tmp_path / "out"
    args = ["--domain", "histo", "--domain-option", option, "--data", data, "--out", out]
    if command == "run":
        args += ["--train-split", "train", "--test-split", "val"]
    code, _, err = cli(capsys, command, *args, *FAST)
    assert_one_error(code, err, *fragments)
    assert not out.exists()


def test_the_demo_checks_domain_options_before_writing_its_data(capsys, tmp_path: Path):
    out = tmp_path / "demo"
    code, _, err = cli(capsys, "run", "--domain", "histo", "--domain-option", "stain=1", "--out", out)
    assert_one_error(code, err, "option 'stain' expects 'none' | 'macenko', got 1")
    assert not out.exists()


def test_domains_lists_each_domains_options(capsys):
    code, out, _ = cli(capsys, "domains")
    assert code == 0
    histo = out[out.index("histo  (") :].split("\n\n")[0]
    assert "--domain-option stain ('none' | 'macenko', default 'none')" in histo
    tinted = out[out.index(f"{TINTED}  (") :]
    assert "--domain-option tint (float, default 0.0)" in tinted


def test_train_records_the_options_and_every_later_stage_reuses_them(capsys, tmp_path: Path):
    root = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=2)
    run, pl, seg, pred = (tmp_path / name for name in ("run", "pl", "seg", "pred"))
    TintedDomain.seen.clear()
    code, out, err = cli(
        capsys,
        "train",
        "--domain",
        TINTED,
        "--dataset",
        fakes.DATASET,
        "--domain-option",
        "tint=0.25",
        "--domain-option",
        "mode=mul",
        "--data",
        root,
        "--out",
        run,
        *FAST,
    )
    assert code == 0, err
    assert "domain options: tint=0.25, mode=mul" in out
    assert json.loads((run / "run.json").read_text())["domain_options"] == {"tint": 0.25, "mode": "mul"}
    stages = {"train": list(TintedDomain.seen)}

    def stage(name: str, *args: str | Path) -> None:
        TintedDomain.seen.clear()
        code, _, err = cli(capsys, *args)
        assert code == 0, err
        stages[name] = list(TintedDomain.seen)

    stage("pseudo-labels", "pseudo-labels", "--run", run, "--data", root, "--split", "train", "--out", pl)
    stage(
        "segment",
        *("segment", "--run", run, "--pseudo-labels", pl, "--data", root, "--split", "train", "--out", seg),
        *SEG_FAST,
    )
    assert json.loads((seg / "segmenter.json").read_text())["domain_options"] == {"tint": 0.25, "mode": "mul"}
    stage(
        "predict",
        *("predict", "--model", seg, "--data", root, "--split", "val", "--out", pred),
        *("--device", "cpu", "--no-progress", "--runtime", "torch"),
    )
    for name, seen in stages.items():
        assert seen and set(seen) == {(0.25, "mul")}, (name, seen)

    # A run.json from before domain options: the plugin's defaults.
    config = json.loads((run / "run.json").read_text())
    del config["domain_options"]
    (run / "run.json").write_text(json.dumps(config))
    stage(
        "old run", "pseudo-labels", "--run", run, "--data", root, "--split", "val", "--out", tmp_path / "pl2"
    )
    assert set(stages["old run"]) == {(0.0, "add")}
