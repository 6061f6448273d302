import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A tiny Llama-shaped base plus three fine-tunes, sharded, fp32."""
    from alloykit.testing.fixtures import write_family

    root = tmp_path_factory.mktemp("family")
    base, tunes = write_family(root, 3, shard_bytes=60_000)
    return base, tunes
