"""Every bad checkpoint and bad recipe through the CLI: exit 2, one line naming the file or
key (and the tensor, where there is one), no traceback, no output folder, no temp folder."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.testing.fixtures import LlamaShape, write_family, write_llama
from alloykit.testing.helpers import run_cli as cli


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base, tunes = write_family(root, 2, shard_bytes=60_000)
    return root, base, tunes


def refused(capsys, tmp_path, recipe, *needles, args=()):
    """Merge ``recipe`` into tmp_path/out through the CLI; assert the documented refusal."""
    code, _, err = cli(capsys, "merge", recipe, tmp_path / "out", *args)
    assert code == 2, err
    assert err.startswith("alloykit: error: ") and "\n" not in err and "Traceback" not in err, err
    assert len(err) < 600, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    return err


def linear_yaml(tmp_path, a, b, extra=""):
    y = tmp_path / "r.yaml"
    y.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n{extra}")
    return y


def broken_copy(src, dst, mutate):
    """Copy model ``src`` to ``dst`` and apply ``mutate`` to its first shard of several tensors."""
    shutil.copytree(src, dst)
    shard = next(f for f in sorted(dst.glob("*.safetensors")) if len(header_of(f.read_bytes())[1]) > 2)
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(mutate(data)))
    return dst, shard.name


def header_of(data):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def with_header(data, header, raw=None):
    n, _ = header_of(data)
    raw = raw if raw is not None else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def edit_first(fn):
    """A mutation that edits the first tensor's header entry (name, entry, header) in place."""

    def mutate(data):
        _, h = header_of(data)
        k = next(k for k in h if k != "__metadata__")
        fn(k, h[k], h)
        return with_header(data, h)

    return mutate


def _rename(new):
    return edit_first(lambda k, e, h: h.__setitem__(new, h.pop(k)))


def _overlap(k, e, h):
    other = [n for n in h if n not in ("__metadata__", k)][0]
    h[other]["data_offsets"] = list(e["data_offsets"])  # two tensors on the same bytes (same size needed)
    h[other]["shape"], h[other]["dtype"] = list(e["shape"]), e["dtype"]


CORRUPTIONS = {
    # name: (mutation of the first shard's bytes, words the message must hold)
    "truncated data": (lambda d: d[: len(d) // 2], "truncated"),
    "empty file": (lambda d: b"", "truncated safetensors file"),
    "header cut short": (lambda d: d[:100], "truncated safetensors file"),
    "garbage header": (lambda d: d[:8] + b"{not json" + d[17:], "corrupt safetensors header"),
    "header not an object": (lambda d: with_header(d, None, b"[1, 2, 3]"), "expected a JSON object"),
    "header not utf-8": (lambda d: with_header(d, None, b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    "duplicate key in header": (lambda d: with_header(d, None, json.dumps(header_of(d)[1])[:-1].encode() + f', {json.dumps(list(header_of(d)[1])[-1])}: {{}}}}'.encode()), "listed twice"),
    "oversized header": (lambda d: struct.pack("<Q", 2**40) + d[8:], "limit"),
    "offsets outside file": (edit_first(lambda k, e, h: e.__setitem__("data_offsets", [e["data_offsets"][0], e["data_offsets"][1] + 10**9])), "data_offsets"),
    "offsets past the end": (edit_first(lambda k, e, h: e.__setitem__("data_offsets", [10**9, 10**9 + e["data_offsets"][1] - e["data_offsets"][0]])), "truncated?"),
    "negative offset": (edit_first(lambda k, e, h: e.__setitem__("data_offsets", [-4, 4])), "invalid data_offsets"),
    "bytes disagree with shape": (edit_first(lambda k, e, h: e.__setitem__("shape", [e["shape"][0] + 1, *e["shape"][1:]])), "needs"),
    "overlapping tensors": (edit_first(_overlap), "overlap"),
    "unsupported dtype": (edit_first(lambda k, e, h: e.__setitem__("dtype", "Q4_K")), "unsupported dtype"),
    "dtype not a string": (edit_first(lambda k, e, h: e.__setitem__("dtype", ["F32"])), "unsupported dtype"),
    "shape not integers": (edit_first(lambda k, e, h: e.__setitem__("shape", [True, 2.5])), "invalid shape"),
    "empty tensor with huge dims": (edit_first(lambda k, e, h: e.update(shape=[0, 2**62, 2**62], data_offsets=[0, 0])), "invalid shape"),
    "too many dims": (edit_first(lambda k, e, h: e.update(shape=[1] * 40, data_offsets=[0, 4])), "invalid shape"),
    "entry not an object": (edit_first(lambda k, e, h: h.__setitem__(k, [1, 2])), "not an object"),
    "path trick name": (_rename("../../etc/passwd"), "not a valid tensor name"),
    "backslash name": (_rename("..\\..\\x"), "not a valid tensor name"),
    "control char name": (_rename("model.\x00norm"), "not a valid tensor name"),
    "empty name": (_rename(""), "not a valid tensor name"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_checkpoint(kind, fam, tmp_path, capsys):
    _, _, tunes = fam
    mutate, needle = CORRUPTIONS[kind]
    bad, shard = broken_copy(tunes[0], tmp_path / "bad", mutate)
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), needle, shard)


def test_corrupt_checkpoint_names_the_tensor(fam, tmp_path, capsys):
    _, _, tunes = fam
    mutate = edit_first(lambda k, e, h: e.__setitem__("dtype", "Q4_K"))
    bad, shard = broken_copy(tunes[0], tmp_path / "bad", mutate)
    first = next(k for k in header_of((tunes[0] / shard).read_bytes())[1] if k != "__metadata__")
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), shard, f"tensor '{first}'")


def test_duplicate_tensor_across_shards(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "dup"
    shutil.copytree(tunes[0], bad)
    shards = sorted(bad.glob("*.safetensors"))
    a, b = load_file(str(shards[0])), load_file(str(shards[1]))
    name = next(iter(a))
    b[name] = a[name]
    save_file(b, str(shards[1]))
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), "appears in both", name, shards[0].name, shards[1].name)


def test_index_points_at_missing_shard(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "missing"
    shutil.copytree(tunes[0], bad)
    victim = sorted(bad.glob("model-*.safetensors"))[-1]
    victim.unlink()
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), victim.name, "missing")


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/passwd", ".", 7])
def test_index_shard_path_trick(fam, tmp_path, capsys, target):
    _, _, tunes = fam
    bad = tmp_path / "trick"
    shutil.copytree(tunes[0], bad)
    idx = bad / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = target
    idx.write_text(json.dumps(data))
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), "not a file name in the model folder", first)


def test_index_not_json(fam, tmp_path, capsys):
    _, _, tunes = fam
    bad = tmp_path / "idx"
    shutil.copytree(tunes[0], bad)
    (bad / "model.safetensors.index.json").write_text("{weight_map: ")
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), "model.safetensors.index.json", "weight_map")


def test_vocabulary_mismatch(fam, tmp_path, capsys):
    _, _, tunes = fam
    other = write_llama(tmp_path / "vocab", LlamaShape(vocab=300))
    refused(capsys, tmp_path, linear_yaml(tmp_path, tunes[0], other), "model.embed_tokens.weight", "[300, 64]", "vocabulary", str(other))


def test_shape_mismatch(fam, tmp_path, capsys):
    _, _, tunes = fam
    other = write_llama(tmp_path / "wide", LlamaShape(intermediate=96))
    refused(capsys, tmp_path, linear_yaml(tmp_path, tunes[0], other), "mlp", "[96, 64]", "share an architecture")


def test_missing_model_folder(fam, tmp_path, capsys):
    _, _, tunes = fam
    refused(capsys, tmp_path, linear_yaml(tmp_path, tunes[0], tmp_path / "nope"), "no file or folder", "nope")


def test_nonfinite_inputs_warn_or_fail_through_the_cli(fam, tmp_path, capsys):
    _, base, tunes = fam
    bad = tmp_path / "nan"
    shutil.copytree(tunes[0], bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    sd = load_file(str(shard))
    name = sorted(sd)[0]
    sd[name].view(-1)[3] = float("inf")
    save_file(sd, str(shard), metadata={"format": "pt"})
    y = linear_yaml(tmp_path, bad, tunes[1])
    code, _, err = cli(capsys, "merge", y, tmp_path / "warned", "-q")
    assert code == 0 and f"alloykit: warning: tensor '{name}': an input holds NaN or Inf (model '{bad}')" in err, err
    refused(capsys, tmp_path, y, f"tensor '{name}'", f"model '{bad}'", "--fail-on-nonfinite", args=["--fail-on-nonfinite"])


RECIPES = {
    # name: (YAML text, words the message must hold); A = base, B = a fine-tune
    "malformed yaml": ("merge_method: [linear\n", "invalid YAML at line"),
    "tab indentation": ("merge_method: linear\nmodels:\n\t- model: B\n", "invalid YAML"),
    "python object tag": ("merge_method: !!python/object/apply:os.system ['touch pwned']\nmodels: []\n", "invalid YAML"),
    "python name tag": ("merge_method: linear\nmodels: !!python/name:os.system\n", "invalid YAML"),
    "custom tag": ("merge_method: !alloy linear\nmodels: []\n", "invalid YAML"),
    "duplicate key": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nmodels:\n  - model: B\n", "'models' appears twice"),
    "alias bomb": (
        "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
        "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
        "merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: *h}\n",
        "aliases",
    ),
    "recursive alias": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: &w [1, *w]}\n", "aliases"),
    "not a mapping": ("- merge_method: linear\n", "expected a mapping"),
    "empty file": ("", "expected a mapping"),
    "unknown key": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nparamters: {}\n", "unknown key 'paramters' (did you mean 'parameters'?)"),
    "unknown model key": ("merge_method: linear\nmodels:\n  - modle: A\n", "did you mean 'model'"),
    "wrong type": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: heavy}\n", "weight"),
    "models not a list": ("merge_method: linear\nmodels:\n  model: A\n", "models"),
    "bad dtype": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\ndtype: float128\n", "did you mean 'float32'"),
    "bad seed": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\nseed: abc\n", "seed"),
    "nan weight": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: .nan}\n  - model: B\n    parameters: {weight: 1}\n", "finite"),
    "density above 1": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 1, density: 1.5}\n", "density"),
    "negative density": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 1, density: -0.5}\n", "greater than or equal to 0"),
    "t above 1": ("merge_method: slerp\nbase_model: A\nmodels:\n  - model: B\nparameters: {t: 1.5}\n", "'t' = 1.5"),
    "zero total weight": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n  - model: B\n    parameters: {weight: -1}\n", "sum to 0"),
    "zero total weight ties": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 0, density: 0.5}\n", "nonzero weight"),
    "layer range outside": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: A\n        layer_range: [0, 9]\n", "outside its 4 layers"),
    "layer range reversed": ("merge_method: passthrough\nslices:\n  - sources:\n      - model: A\n        layer_range: [3, 1]\n", "0 <= start < end"),
    "listed twice": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n  - model: A\n    parameters: {weight: 1}\n", "listed twice"),
    "listed twice, spelled differently": ("merge_method: linear\nmodels:\n  - model: A\n    parameters: {weight: 1}\n  - model: A/\n    parameters: {weight: 1}\n", "same files"),
    "base spelled differently": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: A/.\n  - model: B\n    parameters: {weight: 1, density: 0.5}\n", "same files"),
    "unknown method": ("merge_method: tiez\nmodels:\n  - model: A\n", "did you mean 'ties'"),
    "typo parameter": ("merge_method: ties\nbase_model: A\nmodels:\n  - model: B\n    parameters: {weight: 1, desnity: 0.5}\n", "did you mean 'density'"),
    "missing base": ("merge_method: ties\nmodels:\n  - model: B\n    parameters: {weight: 1}\n", "needs a 'base_model'"),
    "missing weight": ("merge_method: linear\nmodels:\n  - model: A\n  - model: B\n    parameters: {weight: 1}\n", "needs parameter 'weight'"),
}


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_bad_recipe(kind, fam, tmp_path, capsys, monkeypatch):
    _, base, tunes = fam
    monkeypatch.chdir(tmp_path)  # a 'touch pwned' that ran would land here
    text, needle = RECIPES[kind]
    y = tmp_path / "r.yaml"
    y.write_text(text.replace("model: A", f"model: {base}").replace("model: B", f"model: {tunes[0]}"))
    refused(capsys, tmp_path, y, needle)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["no such file", "a folder", "not utf-8"])
def test_unreadable_recipe_file(kind, tmp_path, capsys):
    y = tmp_path / "r.yaml"
    if kind == "a folder":
        y.mkdir()
    elif kind == "not utf-8":
        y.write_bytes(b"merge_method: \xff\xfe\n")
    refused(capsys, tmp_path, y, "recipe file", "r.yaml")


def test_tensor_dtype_mismatch(fam, tmp_path, capsys):
    """An input that stores an integer tensor where the others store floats."""
    _, _, tunes = fam
    bad = tmp_path / "int"
    shutil.copytree(tunes[0], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    sd = load_file(str(shard))
    name = sorted(sd)[0]
    sd[name] = sd[name].to(torch.int32)
    save_file(sd, str(shard))
    refused(capsys, tmp_path, linear_yaml(tmp_path, bad, tunes[1]), name, "torch.int32", str(bad))
