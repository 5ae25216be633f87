"""Every accelerate config in accelerate_configs/ loads with accelerate's own loader and is what its name says."""

from __future__ import annotations

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from .conftest import REPO

EXPECTED = {
    "single_gpu": ("NO", 1),
    "multi_gpu": ("MULTI_GPU", None),
    "multi_cpu": ("MULTI_GPU", 2),  # launched like DDP; use_cpu in the experiment makes it gloo (see the file)
    "deepspeed_zero2": ("DEEPSPEED", None),
    "deepspeed_zero3": ("DEEPSPEED", None),
    "fsdp": ("FSDP", None),
}


def test_the_set_is_complete():
    assert {p.stem for p in (REPO / "accelerate_configs").glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    kind, processes = EXPECTED[name]
    assert config.distributed_type.value == kind
    if processes is not None:
        assert config.num_processes == processes
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "deepspeed_zero3":
        # without gathering on save, a ZeRO-3 PEFT adapter can be saved empty (peft #453, #2892)
        assert config.deepspeed_config["zero3_save_16bit_model"] is True
    assert not config.use_cpu, "use_cpu in an accelerate config silently starts a single process"
