"""Gradient accumulation: state a method updates once per optimiser step stays once per step."""

from __future__ import annotations

import torch
from method_training import train_steps

from wsss_domains.methods import create_method
from wsss_domains.methods.base import Method
from wsss_domains.models.vit import VitCamClassifier


def test_first_pass_of_step_is_true_once_per_step_and_update():
    method = Method()
    at = [{"step": torch.tensor(s)} for s in (3, 3, 4, 4)]
    assert [method.first_pass_of_step("teacher", b) for b in at] == [True, False, True, False]
    assert method.first_pass_of_step("recluster", at[3])  # each update keeps its own count
    assert method.first_pass_of_step("teacher", {}) and method.first_pass_of_step("teacher", {})


def test_toco_moves_its_teacher_once_per_optimiser_step(monkeypatch):
    import wsss_domains.methods.toco as toco

    calls = []
    update = toco.momentum_update
    monkeypatch.setattr(toco, "momentum_update", lambda *a: (calls.append(1), update(*a)))
    method = create_method("toco", warmup=0.0, ctc_dims=[32, 16, 64], seg_channels=16, num_local_crops=2)
    model = VitCamClassifier(num_classes=2, backbone="vit_tiny_patch16_224", weights="random")
    train_steps(method, steps=2, model=model, accumulate=2)
    assert len(calls) == 2  # four forward passes, two optimiser steps


def test_rca_reclusters_once_per_optimiser_step(monkeypatch):
    from wsss_domains.methods.rca import RegionMemory

    calls = []
    recluster = RegionMemory.recluster
    monkeypatch.setattr(RegionMemory, "recluster", lambda self, g: (calls.append(1), recluster(self, g)))
    method = create_method("rca", warm_up=0.0, cluster_every=1, queue_length=4, clusters=2)
    train_steps(method, steps=3, accumulate=2)
    assert len(calls) == 2  # steps 1 and 2 (never before step 0's forward), once each
