"""Method chains: ``a+b`` applies a's CAMs and refinement, then b's refinement."""

from __future__ import annotations

import pytest
import torch

from wsss_domains.cam.extract import CamExtractor
from wsss_domains.domains.contract import DomainPlugin, LabelSpace
from wsss_domains.methods import create_method, method_class
from wsss_domains.methods.base import Method, RefineContext
from wsss_domains.methods.chain import ChainedMethod, TrainedChain
from wsss_domains.transfer_matrix.matrix import trains_own_model

TWO = LabelSpace(classes=("a", "b"), palette=((255, 0, 0), (0, 0, 255)))


class Plain(DomainPlugin):
    name = "plain"

    def datasets(self):  # pragma: no cover - not used
        return {}


class OwnCams(Method):
    name = "own-cams-test"

    def extractor(self, model, modules, **kwargs):
        class Other(CamExtractor):
            pass

        return Other(model, **kwargs)


class Shift(Method):
    name = "shift-test"

    def __init__(self, by: float = 1.0) -> None:
        super().__init__(by=by)
        self.by = by

    def refine(self, cams, context):
        return cams + self.by


class Double(Method):
    name = "double-test"

    def refine(self, cams, context):
        return cams * 2

    def refine_labels(self, labels, cams, context):
        return labels + 10


def test_refinements_apply_in_order_with_scoped_options():
    from wsss_domains.methods.chain import chain_class

    cams = torch.zeros(2, 3, 3)
    context = RefineContext.of(torch.zeros(3, 3, 3), torch.ones(2), Plain(), TWO)
    shift_then_double = chain_class("s+d", [Shift, Double])(**{"shift-test.by": 3.0})
    assert isinstance(shift_then_double, ChainedMethod) and not isinstance(shift_then_double, TrainedChain)
    assert torch.equal(shift_then_double.refine(cams, context), torch.full((2, 3, 3), 6.0))  # (0 + 3) * 2
    double_then_shift = chain_class("d+s", [Double, Shift])()
    assert torch.equal(double_then_shift.refine(cams, context), torch.full((2, 3, 3), 1.0))  # 0 * 2 + 1
    labels = torch.zeros(3, 3, dtype=torch.long)
    assert torch.equal(shift_then_double.refine_labels(labels, cams, context), labels + 10)
    # A registered chain is what create_method builds from the joined name.
    chain = create_method("par+random-walk", **{"par.num_iter": 3})
    assert [m.name for m in chain.methods] == ["par", "random-walk"]
    assert chain.methods[0].options == {"num_iter": 3} and chain.methods[1].options == {}


def test_unscoped_or_foreign_options_are_refused():
    with pytest.raises(ValueError, match="must name its part"):
        create_method("par+random-walk", num_iter=3)
    with pytest.raises(ValueError, match="must name its part"):
        create_method("par+random-walk", **{"crf.num_iter": 3})


def test_post_hoc_chains_reuse_the_plain_run_and_trained_first_parts_train():
    assert not trains_own_model("cam-proto+random-walk")
    assert trains_own_model("seam+par")
    chain = create_method("seam+par")
    assert isinstance(chain, TrainedChain)
    seam = method_class("seam")
    assert chain.classification_weight == seam.classification_weight
    with pytest.raises(ValueError, match="'seam' trains its own model"):
        method_class("par+seam")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        method_class("par+nope")


def test_later_parts_may_not_bring_their_own_cams():
    model = torch.nn.Module()
    from wsss_domains.methods.chain import chain_class

    chain = chain_class("cam+own", [method_class("cam"), OwnCams])()
    with pytest.raises(ValueError, match="computes CAMs of its own"):
        chain.extractor(model, torch.nn.ModuleDict())
    first = chain_class("own+par", [OwnCams, method_class("par")])()
    assert type(first.extractor(model, torch.nn.ModuleDict())).__name__ == "Other"
