"""Fuzzing: thousands of generated bad headers and recipes; each ends in an AlloyError
(the documented one-line error) or a valid result, never another exception or a hang."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alloykit.errors import AlloyError, CheckpointError
from alloykit.io.safetensors_format import read_header
from alloykit.merge import plan_recipe

SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=12))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
dtype = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q4", "", "f32"])
entry = st.one_of(
    st.fixed_dictionaries({"dtype": dtype, "shape": st.lists(st.integers(-2, 6), max_size=3),
                           "data_offsets": st.lists(st.integers(-5, 300), min_size=0, max_size=3)}),
    json_value,
)
header = st.dictionaries(st.text(min_size=0, max_size=10), entry, max_size=5)


def write(tmp_path, blob: bytes):
    p = tmp_path / "f.safetensors"
    p.write_bytes(blob)
    return str(p)


@SETTINGS
@given(h=header, data_len=st.integers(0, 300), lie=st.integers(-16, 16))
def test_fuzz_safetensors_headers(tmp_path_factory, h, data_len, lie):
    raw = json.dumps(h).encode()
    blob = struct.pack("<Q", max(0, len(raw) + lie)) + raw + b"\0" * data_len
    path = write(tmp_path_factory.mktemp("h"), blob)
    try:
        tensors, _ = read_header(path)
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    for t in tensors.values():  # whatever was accepted is consistent with the file
        assert t.offset >= 8 and t.offset + t.nbytes <= len(blob)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=64))
def test_fuzz_random_bytes(tmp_path_factory, blob):
    path = write(tmp_path_factory.mktemp("b"), blob)
    try:
        read_header(path)
    except CheckpointError:
        pass


param_value = st.one_of(st.floats(allow_nan=True), st.integers(-3, 3), st.booleans(), st.text(max_size=6),
                        st.lists(st.floats(-2, 2), max_size=4),
                        st.lists(st.fixed_dictionaries({"filter": st.text(max_size=5), "value": st.floats(-2, 2)}), max_size=3))
param_names = st.sampled_from(["weight", "density", "gamma", "epsilon", "lambda", "normalize", "t", "desnity", "rescale", "select_topk", "filter_wise"])
params = st.dictionaries(param_names, param_value, max_size=4)
method = st.sampled_from(["linear", "ties", "dare_ties", "task_arithmetic", "slerp", "model_stock", "della", "breadcrumbs", "nuslerp", "passthrough", "karcher", "sce", "tiez"])


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from alloykit.testing.fixtures import write_family

    base, tunes = write_family(tmp_path_factory.mktemp("fz"), 2)
    return str(base), [str(t) for t in tunes]


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_recipes_against_real_models(fam, data):
    base, tunes = fam
    names = st.sampled_from([base, *tunes, "/nonexistent/model"])
    recipe = data.draw(st.fixed_dictionaries(
        {"merge_method": method, "models": st.lists(st.fixed_dictionaries({"model": names}, optional={"parameters": params}), min_size=0, max_size=3)},
        optional={"base_model": names, "parameters": params, "dtype": st.sampled_from(["float32", "bf16", "int8", 3]),
                  "slices": st.just([{"sources": [{"model": tunes[0], "layer_range": [0, 9]}]}]), "extra_key": st.integers()},
    ))
    try:
        plan = plan_recipe(recipe)
    except AlloyError as err:
        assert "\n" not in str(err), str(err)
        return
    plan.close()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=st.text(max_size=80))
def test_fuzz_yaml_text(tmp_path_factory, doc):
    from alloykit.config import load_recipe

    p = tmp_path_factory.mktemp("y") / "r.yaml"
    p.write_text(doc)
    try:
        load_recipe(p)
    except AlloyError:
        pass

