"""Checkpoints written before the library split (configurator.py, evaluation.py, diffsiam.py)
still load: every variant builds the same state-dict names and shapes as then.
tests/fixtures/state_dict_keys.json was written by the code of that time, for each variant."""
import json
import os

import pytest
import torch

import common
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = json.load(open(os.path.join(ROOT, "tests", "fixtures", "state_dict_keys.json")))


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_state_dict_names_and_shapes_are_unchanged(name, tmp_path):
    cfg = dict(train.DEFAULTS, **BEFORE[name]["config"])
    with torch.device("meta"):
        net = common.build_model(common.model_args(cfg))
    now = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert sorted(now) == sorted(BEFORE[name]["state_dict"])  # load_state_dict(strict=True) takes the old files


def test_an_old_checkpoint_dict_loads_into_the_new_model():
    """The same tensors, saved under the old names, load strictly (the DiffSiam + PDAE variant: the
    one whose classes moved)."""
    cfg = dict(train.DEFAULTS, **BEFORE["pdae"]["config"])
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg))
    old = {k: torch.full(shape, 0.5) for k, shape in BEFORE["pdae"]["state_dict"]}
    net.load_state_dict(old)  # strict: every name and shape must match
    assert torch.equal(net.state_dict()["frozen.out.2.weight"], old["frozen.out.2.weight"])
