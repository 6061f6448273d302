"""Streamed merges write their output in place, through a map of the output file.

A streamed job's output used to be a tensor held whole in memory until the writer copied
it to its file (a 3B model's embedding: 0.79 GB of bf16, which put a 3B TIES merge at
1.11 GB of anonymous memory). ``ShardedWriter.buffer`` now maps each tensor's bytes in its
shard, the fast path fills them block by block, and ``write`` of that buffer writes
nothing more. Checked here: the bytes of a merge are those of the path that copies; the
streamed tensors went through the map and not through ``pwrite``; a tensor that is not the
buffer (a fast path that declined, the whole-tensor path) is still written; the region is
reserved before it is mapped, so a full disk is one clear line, not SIGBUS; a file that
cannot be reserved or mapped falls back to memory.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alloykit.errors import OutputError
from alloykit.io import writer as writer_mod
from alloykit.io.writer import ShardedWriter, plan_shards
from alloykit.ops import jit
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import run_cli


def test_buffer_is_the_files_bytes_and_write_of_it_writes_nothing_more(tmp_path, monkeypatch):
    entries = [("a", torch.float16, (3,)), ("b", torch.bfloat16, (70, 300)), ("c", torch.float32, (5, 2))]
    shards = plan_shards(entries, 10**9)
    w = ShardedWriter(tmp_path, shards, {n: d for n, d, _ in entries}, {n: s for n, _, s in entries})
    pwritten = []
    original = writer_mod._pwrite_all
    monkeypatch.setattr(writer_mod, "_pwrite_all", lambda fd, data, off, path: (pwritten.append(off), original(fd, data, off, path)))
    w.open()
    b = w.buffer("b")
    assert b.dtype == torch.bfloat16 and tuple(b.shape) == (70, 300)
    want_b = torch.randn(70, 300).to(torch.bfloat16)
    b.copy_(want_b)
    w.write("b", b)
    # a tensor other than its buffer (a method that declined to fill it) is written as usual
    c_buffer = w.buffer("c")
    want_c = torch.arange(10, dtype=torch.float32).view(5, 2)
    w.write("c", want_c.clone())
    w.write("a", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16))
    w.close()
    del b, c_buffer
    assert shards[0].offsets["b"] not in pwritten and shards[0].offsets["c"] in pwritten
    got = load_file(tmp_path / "model.safetensors")
    assert torch.equal(got["b"], want_b) and torch.equal(got["c"], want_c)
    assert got["a"].tolist() == [1.0, 2.0, 3.0]


def test_full_disk_is_a_clear_error_at_the_reservation_not_a_crash_in_the_map(tmp_path, monkeypatch):
    # a store into a mapped hole of a full disk is SIGBUS: the region is reserved before it is mapped
    entries = [("w", torch.bfloat16, (64, 64))]
    w = ShardedWriter(tmp_path, plan_shards(entries, 10**9), {"w": torch.bfloat16}, {"w": (64, 64)})
    w.open()
    reserved = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (reserved.append((off, n)), real(fd, off, n)))
    assert w.buffer("w") is not None and reserved == [(w.shards[0].offsets["w"], 64 * 64 * 2)]

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="No space left on device.*free disk space"):
        w.buffer("w")
    w.close()


@pytest.mark.parametrize("why", ["no posix_fallocate", "unsupported", "no shared maps"])
def test_unmappable_file_falls_back_to_memory(tmp_path, monkeypatch, why):
    entries = [("w", torch.bfloat16, (4, 4))]
    w = ShardedWriter(tmp_path, plan_shards(entries, 10**9), {"w": torch.bfloat16}, {"w": (4, 4)})
    w.open()

    def refuse(*a, **k):
        raise OSError(errno.EOPNOTSUPP, "not here")

    if why == "no posix_fallocate":
        monkeypatch.delattr(os, "posix_fallocate")
    elif why == "unsupported":
        monkeypatch.setattr(os, "posix_fallocate", refuse)
    else:
        monkeypatch.setattr(mmap, "mmap", refuse)
    assert w.buffer("w") is None
    w.write("w", torch.ones(4, 4, dtype=torch.bfloat16))
    w.close()
    assert torch.equal(load_file(tmp_path / "model.safetensors")["w"], torch.ones(4, 4, dtype=torch.bfloat16))


@pytest.mark.skipif(not jit.available(), reason="the fast paths need numba (pip install numba)")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "model_stock"])
def test_streamed_merge_writes_through_the_map_to_the_copying_paths_bytes(tmp_path, capsys, monkeypatch, method):
    shape = LlamaShape(vocab=2048, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2)
    base, tunes = write_family(tmp_path / "in", 3, shape, dtype=torch.bfloat16)
    recipe = tmp_path / "r.yaml"
    per_model = {} if method == "model_stock" else {"parameters": {"weight": 0.5, "density": 0.5}}
    recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                                      "models": [{"model": str(t), **per_model} for t in tunes]}))
    mapped, original = [], ShardedWriter.buffer

    def recording(self, name):
        t = original(self, name)
        if t is not None:
            mapped.append(name)
        return t

    with monkeypatch.context() as mp:
        mp.setattr(ShardedWriter, "buffer", recording)
        assert run_cli(capsys, "merge", recipe, tmp_path / "mapped", "-q", "--seed", "3").code == 0
    with monkeypatch.context() as mp:
        mp.setattr(ShardedWriter, "buffer", lambda self, name: None)
        assert run_cli(capsys, "merge", recipe, tmp_path / "copied", "-q", "--seed", "3").code == 0
    assert "model.embed_tokens.weight" in mapped and "lm_head.weight" in mapped
    files = sorted(p.name for p in (tmp_path / "mapped").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "copied").glob("*.safetensors")) and files
    for f in files:
        assert (tmp_path / "mapped" / f).read_bytes() == (tmp_path / "copied" / f).read_bytes(), f
