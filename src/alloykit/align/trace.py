"""Permutation specs of plain torch modules (MLPs, CNNs), derived by tracing them with torch.fx.

Every value in the traced graph carries a feature space: the channels of a Linear or a
convolution's output are a new space; elementwise activations, dropout, per-channel
pooling, BatchNorm and LayerNorm keep it; flattening a [N, C, H, W] map keeps it with
each channel spanning H*W consecutive features; adding or multiplying two values joins
their spaces (a residual connection forces one permutation on both sides). A value fed to
anything else (an unknown module or function, the model's output, a reshape that mixes
channels) pins its space: those units stay in place, which is always correct. Each space
left free becomes a :class:`~alloykit.align.spec.Group`, with every parameter axis that
reads or writes it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from alloykit.align.spec import Group, Probe, Spec, Use
from alloykit.errors import AlloyError

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity,
)
_CHANNEL_MODULES = (  # act on each channel of [N, C, ...] separately
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.leaky_relu, F.softplus, F.mish, F.hardswish,
    F.hardtanh, torch.tanh, torch.sigmoid, F.dropout, torch.nn.functional.dropout2d,
}
_CHANNEL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "detach"}
_BINARY = {operator.add, operator.sub, operator.mul, operator.iadd, operator.isub, operator.imul,
           torch.add, torch.sub, torch.mul, "add", "sub", "mul", "add_", "mul_"}
_FLATTEN = {torch.flatten, "flatten", "view", "reshape"}
_METADATA_METHODS = {"size", "dim"}


@dataclass(frozen=True)
class _Feat:
    space: int
    cdim: int  # the channel axis of the value
    inner: int  # consecutive features per channel on that axis


class _Spaces:
    """Union-find over feature spaces, with a 'pinned' flag that survives unions."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pinned: list[bool] = []
        self.size: list[int] = []
        self.origin: list[str] = []

    def new(self, size: int, origin: str) -> int:
        self.parent.append(len(self.parent))
        self.pinned.append(False)
        self.size.append(size)
        self.origin.append(origin)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:  # cannot be one permutation: keep both in place
            self.pinned[ra] = self.pinned[rb] = True
            return
        lo, hi = sorted((ra, rb))
        self.parent[hi] = lo
        self.pinned[lo] = self.pinned[lo] or self.pinned[hi]

    def pin(self, i: int) -> None:
        self.pinned[self.find(i)] = True


def module_spec(module: nn.Module, example_input: Any) -> Spec:
    """The permutation groups of ``module``, traced on ``example_input`` (a tensor or a tuple of them)."""
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as err:  # fx raises many kinds for untraceable control flow
        raise AlloyError(f"cannot trace {type(module).__name__} with torch.fx ({str(err).splitlines()[0]}); "
                         "alignment of torch modules needs a traceable forward (no data-dependent control flow)") from None
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    return _Tracer(gm).spec()


class _Tracer:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.spaces = _Spaces()
        self.feat: dict[str, _Feat | None] = {}
        self.claims: dict[tuple[str, int], tuple[int, int]] = {}  # (param, dim) -> (space, inner)
        self.producers: dict[int, list[str]] = {}
        self.probe_nodes: dict[int, list[tuple[str, int]]] = {}

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = getattr(node, "meta", {}).get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def of(self, arg: Any) -> _Feat | None:
        return self.feat.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def pin_args(self, args: Any) -> None:
        for a in _nodes(args):
            f = self.feat.get(a.name)
            if f is not None:
                self.spaces.pin(f.space)

    def claim(self, param: str, dim: int, space: int, inner: int = 1) -> None:
        key = (param, dim)
        if key in self.claims:  # a shared parameter: both uses must move together
            other, other_inner = self.claims[key]
            if other_inner != inner:
                self.spaces.pin(other)
                self.spaces.pin(space)
            else:
                self.spaces.union(other, space)
            return
        self.claims[key] = (space, inner)

    def output(self, node: torch.fx.Node, f: _Feat | None) -> None:
        self.feat[node.name] = f
        if f is not None and f.inner == 1 and self.shape(node) is not None:
            self.probe_nodes.setdefault(f.space, []).append((node.name, f.cdim))

    # -- the walk -------------------------------------------------------------------------------------
    def spec(self) -> Spec:
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)
            elif node.op == "output":
                self.pin_args(node.args)
            else:  # placeholder, get_attr: inputs and raw parameters stay in place
                self.feat[node.name] = None
        return self.groups()

    def call_module(self, node: torch.fx.Node) -> None:
        mod, name = self.modules[node.target], node.target
        x = self.of(node.args[0]) if node.args else None
        in_shape = self.shape(node.args[0]) if node.args else None
        if isinstance(mod, nn.Linear):
            if x is not None and in_shape is not None and x.cdim != len(in_shape) - 1:
                self.spaces.pin(x.space)
                x = None
            out = self.spaces.new(mod.out_features, name)
            self.claim(f"{name}.weight", 0, out)
            if mod.bias is not None:
                self.claim(f"{name}.bias", 0, out)
            if x is not None:
                self.claim(f"{name}.weight", 1, x.space, x.inner)
            self.producers.setdefault(out, []).append(name)
            self.output(node, _Feat(out, len(self.shape(node)) - 1, 1))
        elif isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd):
            if x is not None and (x.cdim != 1 or x.inner != 1):
                self.spaces.pin(x.space)
                x = None
            if mod.groups == 1:
                out = self.spaces.new(mod.out_channels, name)
                if x is not None:
                    self.claim(f"{name}.weight", 1, x.space)
            elif mod.groups == mod.in_channels == mod.out_channels and x is not None:  # depthwise: per channel
                out = x.space
            else:
                self.pin_args(node.args)
                self.output(node, None)
                return
            self.claim(f"{name}.weight", 0, out)
            if mod.bias is not None:
                self.claim(f"{name}.bias", 0, out)
            self.producers.setdefault(out, []).append(name)
            self.output(node, _Feat(out, 1, 1))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if x is None or x.cdim != 1:
                self.pin_args(node.args)
                self.output(node, None)
                return
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(mod, p, None) is not None:
                    self.claim(f"{name}.{p}", 0, x.space, x.inner)
            if mod.affine:
                self.producers.setdefault(x.space, []).append(name)
            self.output(node, x)
        elif isinstance(mod, nn.LayerNorm):
            if x is None or len(mod.normalized_shape) != 1 or x.cdim != len(in_shape) - 1:
                self.pin_args(node.args)
                self.output(node, None)
                return
            if mod.elementwise_affine:
                self.claim(f"{name}.weight", 0, x.space, x.inner)
                if mod.bias is not None:
                    self.claim(f"{name}.bias", 0, x.space, x.inner)
                    self.producers.setdefault(x.space, []).append(name)
            self.output(node, x)
        elif isinstance(mod, _ELEMENTWISE_MODULES):
            self.output(node, x)
        elif isinstance(mod, _CHANNEL_MODULES):
            self.channelwise(node, x)
        elif isinstance(mod, nn.Flatten):
            self.flatten(node, x)
        else:
            self.pin_args((node.args, node.kwargs))
            self.output(node, None)

    def call_function(self, node: torch.fx.Node) -> None:
        t = node.target
        x = self.of(node.args[0]) if node.args else None
        if t in _METADATA_METHODS or t is getattr:
            self.feat[node.name] = None  # shapes, not features
        elif t in _ELEMENTWISE_FUNCTIONS or t in _ELEMENTWISE_METHODS:
            self.pin_args((node.args[1:], node.kwargs))
            self.output(node, x)
        elif t in _CHANNEL_FUNCTIONS:
            self.channelwise(node, x)
        elif t in _BINARY and len(node.args) == 2:
            self.binary(node)
        elif t in _FLATTEN:
            self.flatten(node, x)
        elif t in ("mean", "sum", torch.mean, torch.sum):
            self.reduce(node, x)
        else:
            self.pin_args((node.args, node.kwargs))
            self.output(node, None)

    def channelwise(self, node: torch.fx.Node, x: _Feat | None) -> None:
        if x is not None and x.cdim == 1 and x.inner == 1:
            self.output(node, x)
        else:
            self.pin_args(node.args)
            self.output(node, None)

    def binary(self, node: torch.fx.Node) -> None:
        a, b = node.args
        fa, fb = self.of(a), self.of(b)
        a_node, b_node = isinstance(a, torch.fx.Node), isinstance(b, torch.fx.Node)
        if a_node and b_node:
            same = (fa is not None and fb is not None and fa.cdim == fb.cdim and fa.inner == fb.inner
                    and self.shape(a) == self.shape(b) == self.shape(node))
            if same:
                self.spaces.union(fa.space, fb.space)
                self.output(node, fa)
            else:
                self.pin_args(node.args)
                self.output(node, None)
        elif a_node or b_node:  # a tensor and a number
            self.output(node, fa if a_node else fb)
        else:
            self.output(node, None)

    def flatten(self, node: torch.fx.Node, x: _Feat | None) -> None:
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if x is None or in_shape is None or out_shape is None:
            self.pin_args(node.args)
            self.output(node, None)
        elif out_shape == in_shape:
            self.output(node, x)
        elif x.cdim == 1 and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            spatial = out_shape[1] // in_shape[1]
            self.output(node, _Feat(x.space, 1, x.inner * spatial))
        else:
            self.pin_args(node.args)
            self.output(node, None)

    def reduce(self, node: torch.fx.Node, x: _Feat | None) -> None:
        """x.mean((2, 3)): global pooling over the axes after the channel axis keeps the channels."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else dims
        in_shape = self.shape(node.args[0])
        if x is None or dims is None or in_shape is None or node.kwargs.get("keepdim") or x.inner != 1:
            self.pin_args(node.args)
            self.output(node, None)
            return
        dims = {d % len(in_shape) for d in dims}
        if all(d > x.cdim for d in dims):
            self.output(node, x)
        else:
            self.pin_args(node.args)
            self.output(node, None)

    # -- the result -----------------------------------------------------------------------------------
    def groups(self) -> Spec:
        sp = self.spaces
        roots: dict[int, Group] = {}
        for (param, dim), (space, inner) in self.claims.items():
            r = sp.find(space)
            if sp.pinned[r]:
                continue
            g = roots.setdefault(r, Group(sp.origin[r], sp.size[r], []))
            g.uses.append(Use(param, dim, inner))
        for space, names in self.producers.items():
            r = sp.find(space)
            if r in roots:
                roots[r].producers += names
        for space, nodes in self.probe_nodes.items():
            r = sp.find(space)
            if r in roots:
                roots[r].probes += [Probe(n, "node", cdim=cdim) for n, cdim in nodes]
        groups = [roots[r] for r in sorted(roots)]
        return Spec("torch.fx", groups, [f"{len(groups)} free feature spaces found by tracing"])


def _nodes(args: Any):
    if isinstance(args, torch.fx.Node):
        yield args
    elif isinstance(args, (list, tuple)):
        for a in args:
            yield from _nodes(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _nodes(a)
