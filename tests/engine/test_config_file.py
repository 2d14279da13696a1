"""``--config FILE.yaml``: options from a file, typed options winning, the effective config saved."""

from __future__ import annotations

from pathlib import Path

import fakes
import pytest
import yaml
from cli_helpers import assert_one_error, cli
from fakes import fake_domain  # noqa: F401  (the module's fixture)

# Imported here, not first inside a capsys test: Lightning's log handler keeps the stderr it sees first.
import wsss_domains.training.fit  # noqa: F401
from wsss_domains.cli import _parse, main

pytestmark = pytest.mark.usefixtures("fake_domain")


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def namespace(argv: list[str]) -> dict[str, object]:
    args, _ = _parse(argv)
    return {k: v for k, v in vars(args).items() if k not in ("func", "config")}


def test_a_config_file_parses_as_the_same_options_typed(tmp_path: Path):
    config = write_yaml(
        tmp_path / "run.yaml",
        {
            "domain": "histo",
            "data": "some/data",
            "train_split": "validation",  # underscores as well as dashes
            "test-split": "test",
            "budget-minutes": 12.5,
            "seed": 3,
            "no-progress": True,
            "labels-from-masks": False,
            "domain-option": {"stain": "macenko"},
            "method-option": ["bg_threshold=0.3"],
        },
    )
    typed = ["run", "--domain", "histo", "--data", "some/data", "--train-split", "validation"]
    typed += ["--test-split", "test", "--budget-minutes", "12.5", "--seed", "3", "--no-progress"]
    typed += ["--domain-option", "stain=macenko", "--method-option", "bg_threshold=0.3"]
    from_file = namespace(["run", "--config", str(config)])
    assert from_file == namespace(typed)
    assert from_file["budget_minutes"] == 12.5 and from_file["data"] == Path("some/data")
    assert from_file["labels_from_masks"] is False and from_file["no_progress"] is True


def test_typed_options_win_and_repeatable_options_collect_both(tmp_path: Path):
    config = write_yaml(
        tmp_path / "c.yaml", {"domain": "histo", "seed": 3, "domain-option": {"stain": "none"}}
    )
    args = namespace([f"--config={config}", "train", "--seed", "7", "--domain-option", "stain=macenko"])
    assert args["seed"] == 7 and args["domain"] == "histo"
    assert args["domain_option"] == ["stain=none", "stain=macenko"]  # the later (typed) one wins downstream


def test_a_required_option_can_come_from_the_file(tmp_path: Path):
    config = write_yaml(tmp_path / "c.yaml", {"domain": "histo", "data": "d", "pred": "preds"})
    args = namespace(["evaluate", "--config", str(config)])
    assert args["domain"] == "histo" and args["pred"] == Path("preds") and args["data"] == Path("d")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            {"domain": "histo", "max-minute": 3},
            ("'max-minute' is not an option of this command; did you mean 'max-minutes'?",),
        ),
        ({"no-progress": "yes"}, ("'no-progress' is a switch: true or false",)),
        ({"seed": [1, 2]}, ("'seed' takes one value",)),
        (["domain", "histo"], ("a config file is a mapping of option: value, got list",)),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file(capsys, tmp_path: Path, content, fragments):
    config = write_yaml(tmp_path / "bad.yaml", content)
    code, _, err = cli(capsys, "train", "--config", config)
    assert_one_error(code, err, str(config), *fragments)


def test_unreadable_and_invalid_files(capsys, tmp_path: Path):
    code, _, err = cli(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert_one_error(code, err, "missing.yaml", "cannot read the config file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("domain: [histo\n")
    code, _, err = cli(capsys, "train", "--config", broken)
    assert_one_error(code, err, "broken.yaml", "not valid YAML")
    code, _, err = cli(capsys, "train", "--config")
    assert_one_error(code, err, "--config needs a file")


def test_a_run_saves_its_effective_config_and_reruns_from_it(tmp_path: Path):
    data = fakes.write_shapes(tmp_path / "data", n_train=4, n_val=2, n_unlabelled=0)
    out = tmp_path / "run"
    fast = ["--backbone", fakes.FAST_BACKBONE, "--weights", "random", "--image-size", "32"]
    fast += ["--batch-size", "2", "--max-steps", "2", "--device", "cpu", "--no-progress", "--seed", "5"]
    assert main(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(data), "--out", str(out), *fast]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["domain"] == fakes.FAKE_DOMAIN and saved["data"] == str(data) and saved["out"] == str(out)
    assert saved["seed"] == 5 and saved["max-steps"] == 2 and saved["no-progress"] is True
    assert "config" not in saved and "func" not in saved
    typed = namespace(["train", "--domain", fakes.FAKE_DOMAIN, "--data", str(data), "--out", str(out), *fast])
    assert namespace(["train", "--config", str(out / "config.yaml")]) == typed


def test_help_of_every_command_offers_config(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--config FILE.yaml" in capsys.readouterr().out


def test_a_config_file_reaches_a_nested_command(tmp_path: Path):
    config = write_yaml(
        tmp_path / "p.yaml", {"domain": "histo", "epochs": 3, "domain-option": {"stain": "none"}}
    )
    args = namespace(["prompts", "learn", "--config", str(config), "--lr", "0.01"])
    assert args["epochs"] == 3 and args["lr"] == 0.01 and args["domain_option"] == ["stain=none"]
