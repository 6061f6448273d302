"""Every bad checkpoint and bad recipe: one line naming the file/tensor/key, exit 2, no output."""

import json
import shutil
import struct

import pytest

from alloykit.cli.main import main
from alloykit.testing.fixtures import LlamaShape, write_family, write_llama


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base, tunes = write_family(root, 2, shard_bytes=60_000)
    return root, base, tunes


def cli(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def linear_yaml(tmp_path, a, b, extra=""):
    y = tmp_path / "r.yaml"
    y.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n{extra}")
    return y


def broken_copy(src, dst, mutate):
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(mutate(data, shard)))
    return dst, shard.name


def header_of(data):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def with_header(data, header):
    n, _ = header_of(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _offsets_out(data, shard):
    n, h = header_of(data)
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"] = [h[k]["data_offsets"][0], h[k]["data_offsets"][1] + 10**9]
    return with_header(data, h)


def _path_name(data, shard):
    n, h = header_of(data)
    k = next(k for k in h if k != "__metadata__")
    h["../../etc/passwd"] = h.pop(k)
    return with_header(data, h)


CORRUPTIONS = {
    "truncated": (lambda d, s: d[: len(d) // 2], "truncated"),
    "empty": (lambda d, s: b"", "truncated safetensors file"),
    "garbage header": (lambda d, s: d[:8] + b"{not json" + d[17:], "corrupt safetensors header"),
    "oversized header": (lambda d, s: struct.pack("<Q", 2**40) + d[8:], "corrupt"),
    "offsets outside file": (_offsets_out, "data_offsets"),
    "path trick name": (_path_name, "not a valid tensor name"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_checkpoint(kind, fam, tmp_path, capsys):
    _, _, tunes = fam
    mutate, needle = CORRUPTIONS[kind]
    bad, shard = broken_copy(tunes[0], tmp_path / "bad", mutate)
    code, err = cli(capsys, "merge", linear_yaml(tmp_path, bad, tunes[1]), tmp_path / "out")
    assert code == 2, err
    assert needle in err and shard in err, err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_duplicate_tensor_across_shards(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "dup"
    shutil.copytree(tunes[0], bad)
    shards = sorted(bad.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    a, b = load_file(str(shards[0])), load_file(str(shards[1]))
    b[next(iter(a))] = next(iter(a.values()))
    save_file(b, str(shards[1]))
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    code, err = cli(capsys, "validate", linear_yaml(tmp_path, bad, tunes[1]))
    assert code == 2 and "appears in both" in err, err
    del index


def test_index_points_at_missing_shard(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "missing"
    shutil.copytree(tunes[0], bad)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    victim.unlink()
    code, err = cli(capsys, "validate", linear_yaml(tmp_path, bad, tunes[1]))
    assert code == 2 and victim.name in err and "missing" in err, err


def test_index_shard_path_trick(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "trick"
    shutil.copytree(tunes[0], bad)
    idx = bad / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "../../../etc/passwd"
    idx.write_text(json.dumps(data))
    code, err = cli(capsys, "validate", linear_yaml(tmp_path, bad, tunes[1]))
    assert code == 2 and "not a file name in the model folder" in err, err


def test_shape_and_vocab_mismatch(fam, tmp_path, capsys):
    _, _, tunes = fam
    other = write_llama(tmp_path / "vocab", LlamaShape(vocab=300))
    code, err = cli(capsys, "merge", linear_yaml(tmp_path, tunes[0], other), tmp_path / "out")
    assert code == 2 and "model.embed_tokens.weight" in err and "[300, 64]" in err and "vocabulary" in err


def test_missing_model_folder(fam, tmp_path, capsys):
    _, _, tunes = fam
    code, err = cli(capsys, "merge", linear_yaml(tmp_path, tunes[0], tmp_path / "nope"), tmp_path / "out")
    assert code == 2 and "no file or folder" in err


RECIPES = {
    "malformed yaml": ("merge_method: [linear\n", "invalid YAML"),
    "python tag": ("merge_method: !!python/object/apply:os.system ['true']\nmodels: []\n", "invalid YAML"),
    "unknown key": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nparamters: {}\n", "unknown key 'paramters' (did you mean 'parameters'?)"),
    "wrong type": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: heavy}\n", "weight"),
    "out of range": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 1, density: 1.5}\n", "density"),
    "zero total weight": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n  - model: B\n    parameters: {weight: -1}\n", "sum to 0"),
    "layer range": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: A\n        layer_range: [0, 9]\n", "outside its 4 layers"),
    "listed twice": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n  - model: A\n    parameters: {weight: 1}\n", "listed twice"),
    "unknown method": ("merge_method: tiez\nmodels:\n  - model: A\n", "did you mean 'ties'"),
    "typo parameter": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 1, desnity: 0.5}\n", "did you mean 'density'"),
    "missing base": ("merge_method: ties\nmodels:\n  - model: B\n    parameters: {weight: 1}\n", "needs a 'base_model'"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_bad_recipe(kind, fam, tmp_path, capsys):
    _, base, tunes = fam
    text, needle = RECIPES[kind]
    y = tmp_path / "r.yaml"
    y.write_text(text.replace("model: A", f"model: {base}").replace("model: B", f"model: {tunes[0]}").replace("base_model: A", f"base_model: {base}"))
    code, err = cli(capsys, "merge", y, tmp_path / "out")
    assert code == 2, err
    assert needle in err, err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
