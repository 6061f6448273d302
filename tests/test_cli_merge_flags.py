"""mergekit-yaml's command-line flags on 'alloykit merge' (issue 12, item 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alloykit.cli.main import MERGEKIT_NO_OPS, build_parser, parse_count

CLI = [sys.executable, "-m", "alloykit.cli.main"]


def run(*args, env=None):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def recipe(family, tmp_path_factory):
    base, tunes = family
    path = tmp_path_factory.mktemp("flags") / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "bfloat16",
                                    "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tunes[:2]]}))
    return path


def shard_sizes(folder: Path) -> list[int]:
    return sorted(f.stat().st_size for f in folder.glob("*.safetensors"))


@pytest.mark.parametrize("text,value", [("5B", 5_000_000_000), ("20K", 20_000), ("1b", 1_000_000_000), ("300M", 300_000_000),
                                        ("123", 123)])
def test_parse_count_as_mergekit(text, value):
    from mergekit.common import parse_kmb

    assert parse_count(text) == parse_kmb(text) == value


def test_out_shard_size_caps_bytes_like_mergekit(recipe, tmp_path):
    """mergekit's help says parameters, its writer compares bytes: 20K gives shards of at most
    20,000 bytes there (a lone larger tensor excepted), and here."""
    mk = subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(recipe), str(tmp_path / "mk"),
                         "--out-shard-size", "20K", "--no-write-model-card", "--no-copy-tokenizer"],
                        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert mk.returncode == 0, mk.stderr[-2000:]
    r = run("merge", recipe, tmp_path / "ak", "--out-shard-size", "20K", "-q")
    assert r.returncode == 0, r.stderr
    biggest_tensor = 256 * 64 * 2  # the embedding, bf16
    for side in ("mk", "ak"):
        sizes = shard_sizes(tmp_path / side)
        assert len(sizes) > 10
        assert all(s <= 20_000 + 1000 or s <= biggest_tensor + 1000 for s in sizes)  # + header
    total = [sum(shard_sizes(tmp_path / s)) for s in ("mk", "ak")]
    assert abs(total[0] - total[1]) / total[0] < 0.05
    # and '1B' is a billion: one shard, not one per tensor
    r = run("merge", recipe, tmp_path / "one", "--out-shard-size", "1B", "-q")
    assert r.returncode == 0 and len(shard_sizes(tmp_path / "one")) == 1


def test_max_shard_size_stays_bytes_and_both_flags_conflict(recipe, tmp_path):
    r = run("merge", recipe, tmp_path / "o", "--max-shard-size", "20KB", "-q")
    assert r.returncode == 0 and len(shard_sizes(tmp_path / "o")) > 10
    r = run("merge", recipe, tmp_path / "o2", "--max-shard-size", "20KB", "--out-shard-size", "5B")
    assert r.returncode == 2 and "give one of --max-shard-size" in r.stderr
    r = run("merge", recipe, tmp_path / "o3", "--out-shard-size", "5GB")
    assert r.returncode == 2 and "with K, M or B" in r.stderr


def test_trust_remote_code_is_refused_in_one_line(recipe, tmp_path):
    r = run("merge", recipe, tmp_path / "o", "--trust-remote-code")
    assert r.returncode == 2 and "never runs code" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_no_op_flags_are_accepted_and_listed(recipe, tmp_path):
    flags = list(MERGEKIT_NO_OPS)
    assert {"--lazy-unpickle", "--allow-crimes", "--low-cpu-memory", "--copy-tokenizer", "--read-to-gpu",
            "--write-model-card"} <= set(flags)
    r = run("merge", recipe, tmp_path / "o", "-q", *flags)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "README.md").is_file()  # a card, as --write-model-card asks
    help_text = build_parser()._subparsers._group_actions[0].choices["merge"].format_help()
    for flag in flags:
        assert flag in help_text
    assert help_text.count("no effect") >= len(flags)


def test_verbose_logs_what_the_merge_decides(family, tmp_path):
    from alloykit.testing.vocab_models import ADDED, fast_tokenizer, train_bpe, write_vocab_model

    tok = train_bpe()
    a = write_vocab_model(tmp_path / "a", fast_tokenizer(tok))
    b = write_vocab_model(tmp_path / "b", fast_tokenizer(tok, ADDED), seed=1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "tokenizer_source": "union",
                                    "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in (a, b)]}))
    r = run("merge", path, tmp_path / "o", "-q", "-v")
    assert r.returncode == 0, r.stderr
    assert "output vocabulary (tokenizer source 'union'): 316 tokens, 316 rows" in r.stderr
    assert "lacks 16 of its tokens" in r.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 316
    quiet = run("merge", path, tmp_path / "o2", "-q")
    assert "output vocabulary" not in quiet.stderr
