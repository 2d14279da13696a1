"""Scaffolding a plugin package: generated files, CLI, and a real editable install into this venv."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import uuid
from importlib.metadata import entry_points

import pytest
import torch

from wsss_domains.domains import registry
from wsss_domains.domains.registry import ENTRY_POINT_GROUP, create_domain
from wsss_domains.scaffold import plugin_names, scaffold_domain
from wsss_domains.scaffold.cli import add_new_domain_subcommand


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}x"


@pytest.fixture
def forget_modules():
    """Drop scaffolded packages imported by a test from sys.modules afterwards."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("wsss_domain_"):
            del sys.modules[name]


def test_names_derived_from_the_domain_name():
    names = plugin_names("street-lidar")
    assert (names.package, names.dist, names.class_name) == (
        "wsss_domain_street_lidar",
        "wsss-domain-street-lidar",
        "StreetLidarDomain",
    )
    for bad in ("Street", "2d", "a--b", "a b", "", "x-"):
        with pytest.raises(ValueError, match="domain name"):
            plugin_names(bad)


def test_writes_an_installable_package(tmp_path):
    project = scaffold_domain("street-lidar", tmp_path)
    assert project == tmp_path / "wsss-domain-street-lidar"
    files = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    package = "wsss_domain_street_lidar"
    assert files == {
        "pyproject.toml",
        "README.md",
        "tests/test_wsss_domain_street_lidar.py",
        *(
            f"{package}/{f}"
            for f in ("__init__.py", "plugin.py", "loader.py", "metrics.py", "demo.py", "prompts.json")
        ),
    }
    pyproject = (project / "pyproject.toml").read_text()
    assert '[project.entry-points."wsss_domains.domains"]' in pyproject
    assert '"street-lidar" = "wsss_domain_street_lidar:StreetLidarDomain"' in pyproject
    for path in project.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    assert "$" not in "".join(p.read_text() for p in project.rglob("*") if p.is_file())


def test_refuses_existing_folder_and_installed_names(tmp_path):
    scaffold_domain("dup", tmp_path)
    with pytest.raises(FileExistsError):
        scaffold_domain("dup", tmp_path)
    with pytest.raises(ValueError, match="already installed"):
        scaffold_domain("driving", tmp_path)


def test_generated_plugin_works_from_source(tmp_path, monkeypatch, forget_modules):
    name = _unique("probe")
    names = plugin_names(name)
    project = scaffold_domain(name, tmp_path)
    monkeypatch.syspath_prepend(str(project))
    module = importlib.import_module(names.package)
    domain = getattr(module, names.class_name)()
    assert domain.name == name
    demo = domain.demo(tmp_path / "data")
    dataset_name, root = demo.dataset, demo.root
    spec = domain.detect_dataset(root)
    assert spec.name == dataset_name
    sample = spec.build(root, "train")[0]
    assert sample["image"].shape == (3, 64, 64)
    assert torch.equal(sample["label"], spec.label_space.label_from_mask(sample["mask"]))
    (metric,) = domain.metrics(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]), spec.label_space)
    assert metric.per_class == {"background": 0.75, "square": 1.0}
    assert set(domain.clip_prompts(spec.label_space).class_names) == {"square", "disk"}


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="wsss-domains")
    add_new_domain_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["new-domain", "field-crops", "--dest", str(tmp_path)])
    assert args.func(args) == 0
    assert (tmp_path / "wsss-domain-field-crops" / "pyproject.toml").is_file()
    assert "pip install -e" in capsys.readouterr().out
    args = parser.parse_args(["new-domain", "Bad Name", "--dest", str(tmp_path)])
    assert args.func(args) == 2
    assert "domain name" in capsys.readouterr().err


@pytest.mark.slow
def test_editable_install_registers_the_entry_point(tmp_path, monkeypatch, forget_modules):
    name = _unique("scaffold-probe")
    names = plugin_names(name)
    project = scaffold_domain(name, tmp_path)
    pip = [sys.executable, "-m", "pip"]
    install = [*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(project)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    try:
        importlib.invalidate_caches()
        registry.DOMAINS.refresh()
        found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
        assert found[name] == f"{names.package}:{names.class_name}"
        # .pth files of the new install only take effect in new interpreters: import from source here
        monkeypatch.syspath_prepend(str(project))
        domain = create_domain(name)
        assert type(domain).__name__ == names.class_name
        demo = domain.demo(tmp_path / "data")
        dataset_name, root = demo.dataset, demo.root
        loader = domain.dataset(dataset_name).build(root, "val")
        assert len(loader) == 4 and loader[0]["label"].sum() >= 1
        # a fresh interpreter finds and loads it purely through the installation
        probe = (
            "from wsss_domains.domains import create_domain, list_domains; import sys;"
            f"d = create_domain({name!r}); m = d.demo(__import__('pathlib').Path(sys.argv[1]));"
            "ds = d.dataset(m.dataset).build(m.root, 'train'); print(len(ds), sorted(ds[0]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(tmp_path / "fresh")], check=True, capture_output=True, text=True
        )
        assert out.stdout.split()[0] == "8"
        # the command line sees it and trains, pseudo-labels and evaluates with it (its demo set)
        cli = [sys.executable, "-m", "wsss_domains.cli"]
        listed = subprocess.run([*cli, "domains"], check=True, capture_output=True, text=True)
        assert name in listed.stdout
        run = tmp_path / "run"
        fast = [
            "--backbone",
            "test_efficientnet",
            "--weights",
            "random",
            "--image-size",
            "32",
            "--max-steps",
            "2",
        ]
        trained = subprocess.run(
            [*cli, "train", "--domain", name, "--out", str(run), *fast, "--no-progress"],
            capture_output=True,
            text=True,
        )
        assert trained.returncode == 0, trained.stderr[-2000:]
        # without --data, `train` runs the whole job on the demo set: classifier, segmenter, report
        assert (run / "classifier" / "model.pt").is_file() and (run / "segmenter" / "model.pt").is_file()
        assert (run / "report.json").is_file()
        # and the package's own tests pass
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
            cwd=project,
            capture_output=True,
            text=True,
        )
        assert tests.returncode == 0, tests.stdout + tests.stderr
    finally:
        subprocess.run([*pip, "uninstall", "-y", "-q", names.dist], check=False, capture_output=True)
        registry.DOMAINS.refresh()
        importlib.invalidate_caches()
    assert name not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
