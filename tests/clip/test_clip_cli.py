"""``prompts`` subcommands: wiring, fail-fast without weights, list, and an end-to-end learn run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest
from clip_testdata import ColourSquares

from wsss_domains.clip import artefacts
from wsss_domains.clip.cli import add_prompts_subcommand, run_learn, run_list
from wsss_domains.domains import registry
from wsss_domains.domains.contract import ClipPrompts, DatasetSpec, DomainPlugin, LabelSpace


def _parse(argv):
    parser = argparse.ArgumentParser(prog="wsss-domains")
    add_prompts_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_subcommands_are_wired():
    args = _parse(
        ["prompts", "learn", "--domain", "voc", "--clip-weights", "w.pt", "--lora", "--epochs", "3"]
    )
    assert args.func is run_learn and args.clip == "ViT-B-16" and args.lora and args.epochs == 3
    assert _parse(["prompts", "list"]).func is run_list
    with pytest.raises(SystemExit):
        _parse(["prompts", "learn"])  # --domain is required


def test_learn_without_weights_fails_fast_with_exit_code_2(tmp_path, monkeypatch, capsys, no_network):
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    # --data points nowhere: the weights are checked first, so their error is the one reported
    args = _parse(["prompts", "learn", "--domain", "voc", "--data", str(tmp_path / "absent")])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: no CLIP weights for 'ViT-B-16'")
    assert "--clip-weights PATH" in err


class _SquaresDomain(DomainPlugin):
    name = "clip-cli-test"

    def datasets(self):
        space = LabelSpace(classes=("red thing", "green thing", "blue thing"), palette=((255, 0, 0),) * 3)
        return {
            "squares": DatasetSpec(
                name="squares",
                label_space=space,
                build=lambda root, split, **_: ColourSquares(n=8),
                detect=lambda root: True,
                splits=("train",),
            )
        }

    def clip_prompts(self, label_space):
        return ClipPrompts(
            class_names={c: (c,) for c in label_space.foreground_names},
            templates=("a photo of {}.",),
            background=("ground", "sky"),
        )


@pytest.fixture
def squares_domain() -> Iterator[type[DomainPlugin]]:
    with registry.DOMAINS.registered(_SquaresDomain.name, _SquaresDomain):
        yield _SquaresDomain


def test_learn_end_to_end_then_list(
    tiny_checkpoint, squares_domain, tmp_path, monkeypatch, capsys, no_network
):
    name, path, _ = tiny_checkpoint
    monkeypatch.setattr(artefacts, "prompts_root", lambda: tmp_path / "package-prompts")
    monkeypatch.setenv("WSSS_DATA_HOME", str(tmp_path / "user"))
    argv = ["prompts", "learn", "--domain", _SquaresDomain.name, "--clip", name, "--clip-weights", str(path)]
    args = _parse([*argv, "--data", str(tmp_path), "--name", "ctx4", "--epochs", "2", "--device", "cpu"])
    assert args.func(args) == 0
    # Written to the user's data folder, never into the installed package.
    assert not (tmp_path / "package-prompts").exists()
    manifest = json.loads(
        (tmp_path / "user" / "prompts" / _SquaresDomain.name / "ctx4" / "manifest.json").read_text()
    )
    assert manifest["dataset"] == "squares" and manifest["clip_model"] == name
    assert len(manifest["training"]["epoch_losses"]) == 2 and manifest["training"]["images"] == 8
    args = _parse(["prompts", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "remote-sensing:" in out and "voc: voc (20 classes)" in out
    assert f"{_SquaresDomain.name}/ctx4: {name}, 3 classes, n_ctx 4" in out
