"""Shared fixtures: the tiny model and one set of stage inputs for it (CPU, float32)."""

import pytest
import torch

from e1.model.arch import load_arch
from e1.inputs.images import synthetic_image
from e1.inputs.prompts import make_prompt
from e1.model.stage_inputs import prepare
from e1.model.build import build_model


@pytest.fixture(scope="session")
def model():
    return build_model("molmoe-1b-tiny")


@pytest.fixture(scope="session")
def inp():
    arch = load_arch("molmoe-1b-tiny")
    text_ids = make_prompt(arch, "short", 16, None, None)["text_ids"]
    stage_inputs, _layout = prepare(arch, synthetic_image(336, 336), text_ids, torch.device("cpu"), torch.float32)
    return stage_inputs
