"""Every accelerate config in accelerate_configs/ loads with accelerate's own loader and is what its name says."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

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
    "multi_node": ("MULTI_GPU", 16),
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


def _launch_args(config: Path):
    """accelerate's own reading of a config, as `accelerate launch --config_file CONFIG` does it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "querytune.train", "x.yaml"])
    return _validate_launch_command(args)


def deepspeed_config(config: Path, batch_size: int = 32) -> dict:
    """The DeepSpeed config a launch of `config` gives the Trainer: accelerate's launcher environment, its
    DeepSpeedPlugin with the mixed precision applied, and transformers' filling of every "auto" from
    TrainingArguments."""
    from accelerate.utils import DeepSpeedPlugin, prepare_deepspeed_cmd_env
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args, defaults, mp_from_config = _launch_args(config)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(args.mixed_precision)
    training = TrainingArguments(output_dir="unused", per_device_train_batch_size=batch_size, use_cpu=True,
                                 bf16=args.mixed_precision == "bf16", report_to="none")  # fmt: skip
    hf = HfTrainerDeepSpeedConfig(plugin.deepspeed_config)
    hf.trainer_config_process(training)
    return hf.config


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_config_is_valid_for_deepspeed(name):
    """DeepSpeed's own config class accepts what a launch of the file produces, with the stage and precision the file
    names. (Launched on CPU, accelerate does not enable DeepSpeed: the job itself needs a GPU, benchmarks/device_check.sh.)"""
    pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = deepspeed_config(REPO / "accelerate_configs" / f"{name}.yaml")
    checked = DeepSpeedConfig(resolved)
    assert checked.zero_optimization_stage == int(name[-1])
    assert checked.bfloat16_config.enabled and not checked.float16_config.enabled
    assert checked.train_micro_batch_size_per_gpu == 32 and checked.gradient_clipping == 1.0


def test_a_broken_deepspeed_config_is_refused(tmp_path):
    """The check above can fail: a ZeRO stage DeepSpeed does not have is refused by DeepSpeed's config class."""
    pytest.importorskip("deepspeed", reason="DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    broken = tmp_path / "zero5.yaml"
    broken.write_text((REPO / "accelerate_configs" / "deepspeed_zero2.yaml").read_text().replace("zero_stage: 2",
                                                                                                "zero_stage: 5"))  # fmt: skip
    with pytest.raises(Exception, match="5"):
        DeepSpeedConfig(deepspeed_config(broken))


def test_fsdp_config_builds_accelerates_fsdp_plugin():
    """accelerate's FSDP plugin, built from the environment a launch of the file sets: FSDP2, transformer-block
    wrapping, one gathered state dict on save. (accelerate enables FSDP only on accelerators: on CPU it runs the
    job as plain DDP, so FSDP itself runs in benchmarks/device_check.sh on a GPU.)"""
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    args, _, _ = _launch_args(REPO / "accelerate_configs" / "fsdp.yaml")
    assert args.use_fsdp
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.cpu_ram_efficient_loading is True


def test_a_broken_fsdp_config_is_refused(tmp_path):
    """The check above can fail: a state-dict type FSDP does not have is refused by accelerate's plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin, prepare_multi_gpu_env

    broken = tmp_path / "fsdp.yaml"
    text = (REPO / "accelerate_configs" / "fsdp.yaml").read_text()
    broken.write_text(text.replace("fsdp_state_dict_type: FULL_STATE_DICT", "fsdp_state_dict_type: WHOLE_STATE_DICT"))
    args, _, _ = _launch_args(broken)
    with (
        mock.patch.dict(os.environ, prepare_multi_gpu_env(args)),
        pytest.raises((KeyError, ValueError), match="WHOLE"),
    ):
        FullyShardedDataParallelPlugin()
