"""Command-line options derived from the settings dataclasses: one declaration for Python and the CLI."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import pytest

from wsss_domains.cam.settings import CamSettings
from wsss_domains.cli.predict import INFERENCE_OPTIONS
from wsss_domains.cli.pseudo_labels import CAM_OPTIONS
from wsss_domains.cli.segment import SEGMENTER_NETWORK, SEGMENTER_TRAINING
from wsss_domains.cli.settings_arguments import SettingsArguments
from wsss_domains.cli.train import CLASSIFIER_OPTIONS
from wsss_domains.pipeline.classifier import ClassifierSettings
from wsss_domains.pipeline.segmenter import SegmenterSettings
from wsss_domains.segmentation.inference import InferenceOptions
from wsss_domains.settings import setting


@dataclass
class Example:
    size: int | None = setting(None, help="a size")
    rate: float = setting(0.5, help="a rate")
    mode: str = setting("a", help="a mode", choices=("a", "b"))
    folder: Path | None = setting(None, help="a folder", metavar="DIR")
    strict: bool = setting(False, help="be strict")
    colour: bool = setting(True, help="no colour")
    table: dict | None = None
    side: Literal["left", "right"] = setting("left", help="a side")
    sizes: tuple[float, ...] = setting((1.0, 0.5), help="sizes")


def parse(arguments: SettingsArguments, argv: list[str], **add: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    arguments.add(parser, **add)  # type: ignore[arg-type]
    return parser.parse_args(argv)


def test_types_defaults_choices_and_switches_come_from_the_fields():
    arguments = SettingsArguments(Example, ("size", "rate", "mode", "folder", "strict", "colour"))
    assert arguments.values(parse(arguments, [])) == {
        "size": None, "rate": 0.5, "mode": "a", "folder": None, "strict": False, "colour": True,
    }  # fmt: skip
    given = parse(
        arguments, ["--size", "3", "--rate", "2", "--mode", "b", "--folder", "x", "--strict", "--no-colour"]
    )
    assert arguments.values(given) == {
        "size": 3, "rate": 2.0, "mode": "b", "folder": Path("x"), "strict": True, "colour": False,
    }  # fmt: skip
    assert Example(**arguments.values(given)).folder == Path("x")
    with pytest.raises(SystemExit):
        parse(arguments, ["--mode", "c"])
    with pytest.raises(SystemExit):
        parse(arguments, ["--size", "big"])


def test_a_command_renames_a_flag_overrides_a_default_and_hides_an_option(capsys):
    arguments = SettingsArguments(Example, ("rate", "mode"), flags={"rate": "--example-rate"})
    args = parse(arguments, ["--example-rate", "0.1"], defaults={"mode": "b"})
    assert arguments.values(args) == {"rate": 0.1, "mode": "b"}
    parser = argparse.ArgumentParser()
    arguments.add(parser, helps={"rate": "the example's rate"}, hidden=("mode",))
    text = parser.format_help()
    assert "the example's rate" in text and "--mode" not in text and "a rate" not in text


def test_fields_a_flag_cannot_carry_and_unknown_names_are_refused():
    with pytest.raises(TypeError, match=r"Example.table: a command-line option needs"):
        parse(SettingsArguments(Example, ("table",)), [])
    with pytest.raises(KeyError, match="Example has no field 'nope'"):
        parse(SettingsArguments(Example, ("nope",)), [])


@pytest.mark.parametrize(
    ("arguments", "cls"),
    [
        (CLASSIFIER_OPTIONS, ClassifierSettings),
        (SEGMENTER_NETWORK, SegmenterSettings),
        (SEGMENTER_TRAINING, SegmenterSettings),
        (INFERENCE_OPTIONS, InferenceOptions),
        (CAM_OPTIONS, CamSettings),
    ],
)
def test_the_commands_defaults_are_the_api_defaults(arguments, cls):
    """No flag restates a default: parsing nothing gives the dataclass's own values."""
    defaults = {item.name: item.default for item in fields(cls) if item.name in arguments.names}
    assert arguments.values(parse(arguments, [])) == defaults


def test_a_literal_field_offers_its_values_as_choices():
    arguments = SettingsArguments(Example, ("side",))
    assert arguments.values(parse(arguments, ["--side", "right"])) == {"side": "right"}
    with pytest.raises(SystemExit):
        parse(arguments, ["--side", "up"])


def test_a_tuple_field_is_typed_comma_separated_and_shows_its_default(capsys):
    arguments = SettingsArguments(Example, ("sizes",))
    assert arguments.values(parse(arguments, [])) == {"sizes": (1.0, 0.5)}
    assert arguments.values(parse(arguments, ["--sizes", "2,0.25"])) == {"sizes": (2.0, 0.25)}
    with pytest.raises(SystemExit):
        parse(arguments, ["--sizes", "1,big"])
    assert "comma-separated float values, got '1,big'" in capsys.readouterr().err
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arguments.add(parser)
    assert "(default: 1,0.5)" in parser.format_help()


def test_cam_settings_refuse_scales_outside_the_range_and_unknown_normalisations():
    with pytest.raises(ValueError, match=r"scales must lie in \(0, 8\]"):
        CamSettings(scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="cam_norm must be one of max, sigmoid"):
        CamSettings(cam_norm="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^--scales must lie in \(0, 8\], got \(1.0, 9.0\)"):
        CAM_OPTIONS.build(parse(CAM_OPTIONS, ["--scales", "1,9"]))  # the command line names the flag


def test_options_absent_unless_given_leave_the_dataclass_defaults_and_say_which_were_typed():
    arguments = SettingsArguments(Example, ("rate", "strict", "colour"))
    untouched = parse(arguments, [], absent_unless_given=True)
    assert arguments.values(untouched) == {} and arguments.given(untouched) == []
    typed = parse(arguments, ["--no-colour", "--rate", "1"], absent_unless_given=True)
    assert arguments.values(typed) == {"rate": 1.0, "colour": False}
    assert arguments.given(typed) == ["--rate", "--no-colour"]


def test_raster_options_come_from_the_raster_settings():
    from wsss_domains.cli.pseudo_labels import RASTER_OPTIONS
    from wsss_domains.pseudo_labels.raster import RasterOptions

    assert (
        RasterOptions(**RASTER_OPTIONS.values(parse(RASTER_OPTIONS, [], absent_unless_given=True)))
        == RasterOptions()
    )
    typed = parse(RASTER_OPTIONS, ["--cam-max-over", "window", "--no-resume"], absent_unless_given=True)
    options = RasterOptions(**RASTER_OPTIONS.values(typed))
    assert options.max_over == "window" and options.resume is False
