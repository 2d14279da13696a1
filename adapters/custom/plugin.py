"""The ``custom`` domain: any dataset laid out in the generic folder format."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from wsss_adapters.custom import folder
from wsss_adapters.custom.demo import write_demo

from wsss_domains.domains.contract import DatasetSpec, DemoData, DomainPlugin


class CustomDomain(DomainPlugin):
    """A domain declared by its data folder (classes.json, images/, masks/ or labels.csv).

    The label space is read from the folder, so callers use
    ``spec.label_space_for(root)``; every other hook keeps the contract's defaults.
    """

    name = "custom"
    description = "Your own data in the generic folder format (docs/folder-format.md)"

    def datasets(self) -> Mapping[str, DatasetSpec]:
        return {folder.NAME: folder.SPEC}

    def demo(self, root: Path) -> DemoData:
        return DemoData(
            folder.NAME,
            write_demo(Path(root) / "custom-demo"),
            train_split="train",
            eval_split="val",
            image_size=64,
        )
