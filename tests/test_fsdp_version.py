"""``train.distributed = "fsdp"`` needs FSDP2's public ``fully_shard`` (torch ≥ 2.6): an older torch is one line
naming the installed version, before any process group forms, instead of an ImportError deep in the trainer."""

import pytest
import torch

from gpt2forge.config import load_config
from gpt2forge.errors import UserError
from gpt2forge.train import parallelize


@pytest.mark.parametrize("version", ["2.4.1", "2.5.1+cu121"])
def test_fsdp_on_an_old_torch_is_refused_naming_the_version(version, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: FSDP would be used
    config = load_config("quickstart", ["--train.distributed=fsdp"])
    with pytest.raises(UserError, match=rf"needs torch ≥ 2.6 .*this is torch {version.replace('+', '.')}.*ddp"):
        parallelize.start(config.train)


@pytest.mark.parametrize("version", ["2.6.0", "2.13.0", "2.7.0a0+git1234"])
def test_fsdp_on_torch_2_6_or_later_is_allowed(version):
    parallelize.refuse_fsdp_without_fully_shard(version)
