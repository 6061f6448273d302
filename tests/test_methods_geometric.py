"""Basic and geometric methods: golden values by hand, and mergekit 0.1.5 as the oracle.

Methods: linear, passthrough, nearswap (basic.py); slerp, nuslerp, multislerp, karcher,
model_stock (geometric.py). The differential tests call mergekit's own
``merge_tensors`` in-process on the same float32 tensors.
"""

import math

import pytest
import torch
from pydantic import ValidationError

from alloykit.errors import PlanError
from alloykit.methods.registry import MergeInput, get_method

mk_api = pytest.importorskip("mergekit.merge_methods.api")

SHAPES = [(11,), (6, 5), (3, 4, 5)]
# differential tolerance: float32 rounding (we measure bit-identical results on CPU)
TOL = {"rtol": 2e-6, "atol": 2e-6}


def run(name, tensors, base=None, params=None, model_params=None, *, tensor_name="w", owned=False):
    spec = get_method(name)
    k = len(tensors)
    mp = [spec.model_params.model_validate(m) for m in (model_params or [{}] * k)]
    x = MergeInput(tensor_name, torch.stack(tensors), base, spec.params.model_validate(params or {}), mp, owned=owned)
    return spec.fn(x)


def mk(tensors, method, base=None, *, name=None, **params):
    """mergekit's result; the base (if any) goes first and is marked as the base."""
    inputs = ([base] if base is not None else []) + list(tensors)
    return mk_api.merge_tensors(inputs, method, parameters=params, base_index=0 if base is not None else None, name=name)


def case(shape, seed, k=2, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g)
    return b, [b + scale * torch.randn(shape, generator=g) for _ in range(k)]


def weights(*w):
    return [{"weight": v} for v in w]


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **(tol or {"rtol": 1e-6, "atol": 1e-6}))


S2 = math.sqrt(2)
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

# ---- declarations ---------------------------------------------------------------------------

POLICIES = {  # name: (base policy, min models, max models) -- models besides the base, as in mergekit
    "linear": ("ignored", 1, None),
    "passthrough": ("ignored", 1, 1),
    "nearswap": ("required", 1, 1),
    "slerp": ("required", 1, 1),
    "nuslerp": ("optional", 2, 2),
    "multislerp": ("optional", 1, None),
    "karcher": ("ignored", 1, None),
    "model_stock": ("required", 2, None),
}

PARAMS = {  # name: {recipe key: (scope, default or "required")}
    "linear": {"normalize": ("shared", True), "weight": ("per-model", "required")},
    "passthrough": {"scale": ("per-model", None)},
    "nearswap": {"t": ("shared", "required")},
    "slerp": {"t": ("shared", "required")},
    "nuslerp": {"nuslerp_flatten": ("shared", True), "nuslerp_row_wise": ("shared", False), "weight": ("per-model", "required")},
    "multislerp": {"normalize_weights": ("shared", True), "eps": ("shared", 1e-8), "weight": ("per-model", "required")},
    "karcher": {"max_iter": ("shared", 10), "tol": ("shared", 1e-5)},
    "model_stock": {"filter_wise": ("shared", False)},
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_declaration_matches_mergekit(name):
    spec = get_method(name)
    assert (spec.base, spec.min_models, spec.max_models) == POLICIES[name]
    got = {
        key: (scope, "required" if info.is_required() else info.default)
        for key, (scope, info) in spec.param_fields().items()
    }
    assert got == PARAMS[name]
    assert spec.reproduces.startswith(f"mergekit {name}")
    assert spec.paper and spec.summary and not spec.randomized
    assert all(info.description for _, info in spec.param_fields().values())


@pytest.mark.parametrize(
    "name, params, model_params",
    [
        ("slerp", {"t": 1.5}, None),
        ("slerp", {"t": -0.1}, None),
        ("slerp", {"t": float("nan")}, None),
        ("nearswap", {"t": -0.01}, None),
        ("karcher", {"max_iter": -1}, None),
        ("karcher", {"tol": -1e-3}, None),
        ("multislerp", {"eps": 0.0}, None),
        ("linear", None, {"weight": float("inf")}),
        ("slerp", {"t": 0.5, "tt": 1}, None),
    ],
)
def test_out_of_range_parameters_refused(name, params, model_params):
    spec = get_method(name)
    with pytest.raises(ValidationError):
        if params is not None:
            spec.params.model_validate(params)
        else:
            spec.model_params.model_validate(model_params)


def _check(name, params, w):
    spec = get_method(name)
    return spec.check(spec.params.model_validate(params), [spec.model_params.model_validate({"weight": v}) for v in w])


def test_plan_time_checks():
    msg = _check("linear", {}, [1.0, -1.0])
    assert msg and "sum to 0" in msg and "normalize: false" in msg
    assert _check("linear", {"normalize": False}, [1.0, -1.0]) is None
    assert _check("linear", {}, [1.0, -0.5]) is None
    msg = _check("multislerp", {}, [0.5, -0.25, -0.25])
    assert msg and "sum to 0" in msg and "normalize_weights: false" in msg
    assert _check("multislerp", {"normalize_weights": False}, [0.5, -0.5]) is None
    assert _check("multislerp", {}, [0.2, 0.3]) is None
    # nuslerp does not divide by a zero sum: like mergekit it takes t = 0.5 there
    assert get_method("nuslerp").check is None


# ---- golden values by hand ------------------------------------------------------------------

def test_linear_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    close(run("linear", [a, b], model_params=weights(1, 3)), torch.tensor([2.5, 5.0]))
    close(run("linear", [a, b], params={"normalize": False}, model_params=weights(1, 3)), torch.tensor([10.0, 20.0]))
    close(run("linear", [a, b], model_params=weights(2, -1)), torch.tensor([-1.0, -2.0]))


def test_passthrough_by_hand():
    a = torch.tensor([1.0, -2.0])
    out = run("passthrough", [a])
    close(out, a)
    out[0] = 5.0  # a copy, not the input itself
    assert a[0] == 1.0
    close(run("passthrough", [a], model_params=[{"scale": 0.5}]), a * 0.5)
    close(run("passthrough", [a], model_params=[{"scale": 0.0}]), torch.zeros(2))


def test_nearswap_by_hand():
    base, other = torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.tensor([0.05, 0.2, -1.0, 1.0])
    # w = clamp(0.1 / max(|diff|, 1e-6), 0, 1) = [1, 0.5, 0.1, 1]: near entries swap, far ones move by t
    close(run("nearswap", [other], base=base, params={"t": 0.1}), torch.tensor([0.05, 0.1, -0.1, 1.0]))
    close(run("nearswap", [other], base=base, params={"t": 0.0}), base)
    # small differences and thresholds: only |diff| below 1e-6 is floored
    base, other = torch.zeros(3), torch.tensor([5e-4, 1e-7, -2e-5])
    # w = [0.2, 1, 1]
    close(run("nearswap", [other], base=base, params={"t": 1e-4}), torch.tensor([1e-4, 1e-7, -2e-5]), rtol=1e-6, atol=1e-12)


def test_slerp_by_hand():
    close(run("slerp", [E2], base=E1, params={"t": 0.5}), (E1 + E2) / S2)
    close(run("slerp", [E2], base=E1, params={"t": 1 / 3}), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    close(run("slerp", [E2], base=E1, params={"t": 0.0}), E1)
    close(run("slerp", [E2], base=E1, params={"t": 1.0}), E2)
    # norms are kept in the coefficients: sin(pi/4)/sin(pi/2) * a + sin(pi/4)/sin(pi/2) * b
    close(run("slerp", [E2], base=2 * E1, params={"t": 0.5}), torch.tensor([S2, S2 / 2]))
    # the whole tensor is one vector: a [2, 2] tensor of orthogonal halves
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    close(run("slerp", [b], base=a, params={"t": 0.5}), (a + b) / S2)
    # colinear (cos > 0.9995) and antipodal: plain lerp
    close(run("slerp", [2 * E1], base=E1, params={"t": 0.25}), 1.25 * E1)
    close(run("slerp", [-E1], base=E1, params={"t": 0.25}), 0.5 * E1)
    # the lerp fallback only above |cos| = 0.9995: at cos = 0.999 (theta = 0.0447) slerp keeps
    # unit norm, lerp would shrink it by cos(theta/2) = 0.99975
    th = math.acos(0.999)
    out = run("slerp", [torch.tensor([math.cos(th), math.sin(th)])], base=E1, params={"t": 0.5})
    close(out, torch.tensor([math.cos(th / 2), math.sin(th / 2)]))
    th = math.acos(0.9999)
    out = run("slerp", [torch.tensor([math.cos(th), math.sin(th)])], base=E1, params={"t": 0.5})
    close(out, (E1 + torch.tensor([math.cos(th), math.sin(th)])) / 2)
    # a zero tensor has norm 1 by convention, so it is orthogonal to everything
    close(run("slerp", [E2], base=torch.zeros(2), params={"t": 0.5}), E2 * math.sin(math.pi / 4))


def test_nuslerp_by_hand():
    t = 0.75  # weights 1 and 3
    st = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # per row: row 0 orthogonal unit vectors, row 1 colinear (lerp)
    out = run("nuslerp", [a, b], params={"nuslerp_flatten": False}, model_params=weights(1, 3))
    close(out, torch.stack([st, torch.tensor([1.75, 0.0])]))
    # per column (row_wise): column 0 = (1,1) vs (0,2): 45 degrees; column 1 = (0,0) vs (1,0)
    out = run("nuslerp", [a, b], params={"nuslerp_flatten": False, "nuslerp_row_wise": True}, model_params=weights(1, 3))
    th = math.pi / 4
    col0 = (math.sin(0.25 * th) * torch.tensor([1.0, 1.0]) + math.sin(0.75 * th) * torch.tensor([0.0, 2.0])) / math.sin(th)
    col1 = math.sin(0.75 * math.pi / 2) * torch.tensor([1.0, 0.0])  # a zero vector counts as orthogonal
    close(out, torch.stack([col0, col1], dim=1))
    # flattened: one angle for the whole tensor, cos = <(1,0,1,0),(0,1,2,0)> / (sqrt2 sqrt5)
    th = math.acos(2 / math.sqrt(10))
    expected = (math.sin(0.25 * th) * a + math.sin(0.75 * th) * b) / math.sin(th)
    close(run("nuslerp", [a, b], model_params=weights(1, 3)), expected)
    # with a base: base + slerp of the task vectors
    base = torch.full((2, 2), 5.0)
    close(run("nuslerp", [a + base, b + base], base=base, params={"nuslerp_flatten": False}, model_params=weights(1, 3)),
          torch.stack([st, torch.tensor([1.75, 0.0])]) + base)
    # nuslerp's lerp fallback is for exactly colinear vectors only (1 - cos^2 <= 1e-16): at an
    # angle of 0.02 the result stays on the unit circle
    near = torch.tensor([math.cos(0.02), math.sin(0.02)])
    close(run("nuslerp", [E1, near], model_params=weights(1, 1)), torch.tensor([math.cos(0.01), math.sin(0.01)]))
    # weights that sum to 0: t = 0.5
    close(run("nuslerp", [E1, E2], model_params=weights(1, -1)), (E1 + E2) / S2)


def test_multislerp_by_hand():
    # two orthogonal unit vectors, equal weights: the normalized bisector (as slerp at t = 0.5)
    close(run("multislerp", [E1, E2], model_params=weights(1, 1)), (E1 + E2) / S2)
    # the tangent sum at the normalized weighted mean m vanishes, so the result is
    # m * sum w_i |v_i| (w normalized): here w = (0.25, 0.75), |v| = (2, 1)
    a, b = 2 * E1, E2
    m = torch.tensor([0.25, 0.75]) / math.hypot(0.25, 0.75)
    close(run("multislerp", [a, b], model_params=weights(1, 3)), m * (0.25 * 2 + 0.75 * 1))
    # with a base, on task vectors; unnormalized weights scale the norm
    base = torch.tensor([1.0, 1.0])
    out = run("multislerp", [base + a, base + b], base=base, params={"normalize_weights": False}, model_params=weights(1, 3))
    close(out, base + m * (1 * 2 + 3 * 1))
    # one model: returned as is (even with a base)
    close(run("multislerp", [a], base=base, model_params=weights(0.3)), a)
    # two opposite inputs cancel: mergekit's fallback, the weighted sum
    close(run("multislerp", [E1, -E1], model_params=weights(1, 1)), torch.zeros(2))


def test_multislerp_zero_task_vectors_return_base_where_mergekit_raises():
    base = torch.tensor([1.0, -2.0, 3.0])
    with pytest.raises(ValueError, match="weighted sum"):
        mk([base, base, base], "multislerp", base=base, weight=[1, 1, 1])
    assert torch.equal(run("multislerp", [base] * 3, base=base, model_params=weights(1, 1, 1)), base)
    # nonzero inputs that cancel are still an error
    with pytest.raises(PlanError, match="cancel out"):
        run("multislerp", [E1, -E1, torch.zeros(2)], model_params=weights(1, 1, 1))
    with pytest.raises(ValueError):
        mk([E1, -E1, torch.zeros(2)], "multislerp", weight=[1, 1, 1])


def test_karcher_by_hand():
    # two orthogonal directions: the geodesic midpoint, times the mean norm (3 + 1) / 2
    close(run("karcher", [3 * E1, E2]), torch.tensor([S2, S2]), rtol=1e-5, atol=1e-5)
    # on a circle the Karcher mean direction is the mean angle: (0 + 60 + 90) / 3 = 50 degrees
    vs = [torch.tensor([math.cos(math.radians(d)), math.sin(math.radians(d))]) * n for d, n in ((0, 1), (60, 2), (90, 3))]
    out = run("karcher", vs, params={"max_iter": 20})
    close(out, 2.0 * torch.tensor([math.cos(math.radians(50)), math.sin(math.radians(50))]), rtol=1e-5, atol=1e-5)
    # no iterations: the Euclidean mean direction (not 50 degrees)
    units = torch.stack([v / v.norm() for v in vs]).mean(0)
    close(run("karcher", vs, params={"max_iter": 0}), 2.0 * units / units.norm())
    # a zero input has no direction but still counts in the mean norm: (2 + 0) / 2
    close(run("karcher", [2 * E1, torch.zeros(2)]), E1)
    close(run("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))
    close(run("karcher", [E1 * 4]), E1 * 4)


def test_model_stock_by_hand():
    # two task vectors at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3 (Jang et al. 2024)
    base = torch.tensor([1.0, -1.0])
    w1, w2 = base + E1, base + torch.tensor([0.5, math.sqrt(3) / 2])
    close(run("model_stock", [w1, w2], base=base), base + (2 / 3) * ((w1 + w2) / 2 - base))
    # three with pairwise cos 0.5 (unit vectors at 60 degrees in 3-D): t = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    z = torch.zeros(3)
    d = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0]),
         torch.tensor([0.5, 0.5 / math.sqrt(3), math.sqrt(2 / 3)])]
    close(run("model_stock", d, base=z), 0.75 * sum(d) / 3)
    # orthogonal task vectors: cos = 0, t = 0, the base
    close(run("model_stock", [base + E1, base + E2], base=base), base)
    # opposite task vectors (1 + cos = 0): no finite ratio, the base is kept
    close(run("model_stock", [base + E1, base - E1], base=base), base)
    # filter_wise: one ratio per row; row 0 at 60 degrees (t = 2/3), row 1 identical (t = 1)
    b2 = torch.zeros(2, 2)
    m1 = torch.stack([E1, torch.tensor([3.0, 4.0])])
    m2 = torch.stack([torch.tensor([0.5, math.sqrt(3) / 2]), torch.tensor([3.0, 4.0])])
    out = run("model_stock", [m1, m2], base=b2, params={"filter_wise": True})
    close(out, torch.stack([(2 / 3) * (m1[0] + m2[0]) / 2, torch.tensor([3.0, 4.0])]))


# ---- mergekit as the oracle -----------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_mergekit(shape, t):
    b, (m,) = case(shape, 1, k=1)
    close(run("slerp", [m], base=b, params={"t": t}), mk([m], "slerp", base=b, t=t), **TOL)


def test_slerp_matches_mergekit_on_a_tensor_of_several_chunks():
    # mergekit reduces 2**20 entries at a time; so do we, with the same summation order
    b, (m,) = case((2_200_001,), 11, k=1, scale=1.0)
    close(run("slerp", [m], base=b, params={"t": 0.37}), mk([m], "slerp", base=b, t=0.37), **TOL)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_degenerate_cases_match_mergekit(t):
    v = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    z = torch.zeros(6, 5)
    for base, other in ((v, 2 * v), (v, -v), (z, v), (v, z), (v, v), (torch.tensor(1.0), torch.tensor(2.0))):
        close(run("slerp", [other], base=base, params={"t": t}), mk([other], "slerp", base=base, t=t), **TOL)
    # 1-D tensors (norms, biases) are treated like any other: one vector, no name-based rule
    b, (m,) = case((16,), 4, k=1)
    name = "model.layers.0.input_layernorm.weight"
    close(run("slerp", [m], base=b, params={"t": t}, tensor_name=name), mk([m], "slerp", base=b, name=name, t=t), **TOL)


NUSLERP_OPTS = [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", NUSLERP_OPTS)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("w", [(0.3, 0.9), (1.0, 0.0), (2.0, -0.5)])
def test_nuslerp_matches_mergekit(shape, opts, with_base, w):
    b, ms = case(shape, 2)
    base = b if with_base else None
    ours = run("nuslerp", ms, base=base, params=opts, model_params=weights(*w))
    close(ours, mk(ms, "nuslerp", base=base, weight=list(w), **opts), **TOL)


@pytest.mark.parametrize("opts", NUSLERP_OPTS)
def test_nuslerp_degenerate_cases_match_mergekit(opts):
    g = torch.Generator().manual_seed(5)
    v, u = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    u[2] = 0  # a zero row
    u[:, 1] = 0  # and a zero column
    for w in ([1, 1], [1, -1], [0.0, 0.0], [0.3, 0.0]):
        for base in (None, v):
            for pair in ([2 * v, 3 * v], [v, v], [v, u], [u, -u]):
                ours = run("nuslerp", pair, base=base, params=opts, model_params=weights(*w))
                close(ours, mk(pair, "nuslerp", base=base, weight=w, **opts), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("params", [{}, {"normalize_weights": False}, {"eps": 1e-3}])
def test_multislerp_matches_mergekit(shape, k, with_base, params):
    b, ms = case(shape, 3, k=k)
    w = [0.2, 0.5, 1.1][:k]
    base = b if with_base else None
    ours = run("multislerp", ms, base=base, params=params, model_params=weights(*w))
    close(ours, mk(ms, "multislerp", base=base, weight=w, **params), **TOL)


def test_multislerp_degenerate_cases_match_mergekit():
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    for tensors, base, w in (
        ([v, -v], None, [1, 1]),  # antipodal pair: the weighted-sum fallback
        ([v, v], v, [1, 2]),  # zero task vectors, two models
        ([v, v, v], None, [1, 2, 3]),  # identical inputs
        ([v], torch.zeros_like(v), [0.4]),  # one model
        ([v, 2 * v, 3 * v], None, [1, 1, 1]),  # colinear
    ):
        close(run("multislerp", tensors, base=base, model_params=weights(*w)), mk(tensors, "multislerp", base=base, weight=w), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("params", [{}, {"max_iter": 3, "tol": 1e-3}, {"max_iter": 50, "tol": 1e-7}, {"max_iter": 0}])
def test_karcher_matches_mergekit(shape, k, with_base, params):
    b, ms = case(shape, 4, k=k, scale=1.0)
    ours = run("karcher", ([b] if with_base else []) + ms, params=params)  # a base is one more input, as in mergekit
    close(ours, mk(ms, "karcher", base=b if with_base else None, **params), **TOL)


def test_karcher_degenerate_cases_match_mergekit():
    g = torch.Generator().manual_seed(8)
    v, u = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    z = torch.zeros(5, 4)
    w = torch.randn(5, 4, generator=g)
    for inputs in ([v, z], [v, z, u], [v, v, v], [v, -v], [z, z], [v, 2 * v, 3 * v], [v, -v, u], [v, 1e-7 * u], [v, z, u, w]):
        for params in ({}, {"max_iter": 1}):
            close(run("karcher", inputs, params=params), mk(inputs, "karcher", **params), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(shape, k, filter_wise):
    b, ms = case(shape, 5, k=k)
    ours = run("model_stock", ms, base=b, params={"filter_wise": filter_wise})
    close(ours, mk(ms, "model_stock", base=b, filter_wise=filter_wise), **TOL)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_degenerate_cases_match_mergekit(filter_wise):
    g = torch.Generator().manual_seed(9)
    v, u, w = (torch.randn(6, 5, generator=g) for _ in range(3))
    for base, tensors in (
        (v, [v, v, v]),  # zero task vectors
        (v, [u, u]),  # identical fine-tunes: t = 1
        (v, [v + u, v - u]),  # opposite task vectors: singular, the base
        (v, [v + 1e-2 * u, v + 1e-2 * w, v - 1e-2 * u]),  # small task vectors (norm product below 1e-3)
        (torch.tensor(1.0), [torch.tensor(2.0), torch.tensor(3.0)]),  # a 0-d tensor
    ):
        ours = run("model_stock", tensors, base=base, params={"filter_wise": filter_wise})
        close(ours, mk(tensors, "model_stock", base=base, filter_wise=filter_wise), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 1e-4, 0.05, 0.2, 10.0])
@pytest.mark.parametrize("scale", [0.3, 1e-3])
def test_nearswap_matches_mergekit(shape, t, scale):
    b, (m,) = case(shape, 6, k=1, scale=scale)
    close(run("nearswap", [m], base=b, params={"t": t}), mk([m], "nearswap", base=b, t=t), **TOL)
    close(run("nearswap", [b], base=b, params={"t": t}), mk([b], "nearswap", base=b, t=t), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w", [(0.2, 0.5, 1.3), (2.0, -0.7, 0.1), (0.1, 0.7, 1 / 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(shape, w, normalize):
    _, ms = case(shape, 7, k=3)
    ours = run("linear", ms, params={"normalize": normalize}, model_params=weights(*w))
    close(ours, mk(ms, "linear", weight=list(w), normalize=normalize), **TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 1.5, 0.0])
def test_passthrough_matches_mergekit(shape, scale):
    _, (m,) = case(shape, 8, k=1)
    close(run("passthrough", [m], model_params=[{"scale": scale}]), mk([m], "passthrough", scale=scale), **TOL)


# ---- the executor's in-place task vectors ---------------------------------------------------

@pytest.mark.parametrize("name, params, w", [
    ("nuslerp", {"nuslerp_flatten": False}, (0.3, 0.9)),
    ("multislerp", {}, (0.2, 0.5, 1.1)),
])
def test_owned_stack_gives_the_same_result(name, params, w):
    b, ms = case((6, 5), 10, k=len(w))
    expected = run(name, ms, base=b, params=params, model_params=weights(*w))
    assert torch.equal(run(name, ms, base=b, params=params, model_params=weights(*w), owned=True), expected)
