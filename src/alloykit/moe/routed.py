"""Routed models: experts kept apart inside a dense model and chosen per input; saved and rebuilt.

A routed merge (SMILE, WEMoE, ...) replaces some ``nn.Linear`` modules of a host model
(the base's architecture) with routed layers and merges every other tensor statically.
On disk it is a folder of

* ``model.safetensors``: the routed module's state dict (the routed layers' experts and
  routers under their module names, every other tensor as merged);
* ``routed.json``: the format version, the method and its settings, the host (a
  transformers class and its config, or "module": the caller brings the skeleton) and one
  entry per routed layer (its type and shapes);
* ``config.json`` and tokenizer files of a transformers host, and ``README.md``.

:func:`load_routed_model` rebuilds the module from those alone: no pickle, no code from
the folder (a transformers host is built from its class name in transformers, never with
``trust_remote_code``).

Layer types:

* :class:`SmileLinear` -- ``y = W0 x + b0 + sum_{k in top-K} p_k (U_k S_k V_k^T x + db_k)``,
  routed by the norms ``||V_k,g^T x||`` (SMILE, Tang et al. 2024);
* :class:`EnsembleLinear` -- ``y = (W0 + sum_k r_k(x) tau_k) x + (b0 + sum_k r_k(x) tau_k,b)``, its
  coefficients r from a small router MLP shared by the linears of one MLP block (WEMoE,
  Tang et al. 2024);
* :class:`TwinLinear` -- ``y = W_s x + b_s + sum_k w_k(x) (U_k S_k V_k^T x + db_k)``, one weighting
  ``w(x)`` per input from the model's :class:`TwinRouter` (``routed.json``'s ``router``), which
  reads the shared model's features of that input (Twin-Merging, Lu et al. 2024).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from alloykit import __version__
from alloykit.errors import AlloyError, CheckpointError
from alloykit.moe.publish import publish
from alloykit.vocab import TOKENIZER_FILES

FORMAT = "alloykit-routed"
VERSION = 1
CONFIG = "routed.json"


class SmileLinear(nn.Module):
    """A linear layer plus K low-rank experts, the top ones per token chosen by projection norm.

    SMILE (Tang et al., 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts
    Construction From Pre-Trained Foundation Models", arXiv:2408.10174). With the task
    update dW_k = W_k - W0 = U_k S_k V_k^T (SVD):

        expert_k(x) = U_k,r (S_k,r V_k,r^T x) + (b_k - b0)        (rank r)
        r_k(x)      = || V_k,g^T x ||_2                            (the first g right singular vectors)
        p           = softmax(r);  K = top_k(p), renormalised to sum 1
        y           = W0 x + b0 + sum_{k in K} p_k expert_k(x)

    The input's projection onto the directions task k changed most is large where task k's
    update matters, so no router is trained. With one expert its weight is 1; at full rank
    and top-1 routing to expert k, y = W_k x + b_k exactly.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, rank: int, gate_rank: int, top_k: int = 1,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_experts, self.rank, self.gate_rank, self.top_k = n_experts, rank, gate_rank, min(top_k, n_experts)
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.gate = nn.Parameter(torch.zeros(n_experts * gate_rank, in_features))
        self.u = nn.Parameter(torch.zeros(n_experts, out_features, rank))
        self.svh = nn.Parameter(torch.zeros(n_experts, rank, in_features))
        self.bias_delta = nn.Parameter(torch.zeros(n_experts, out_features)) if bias else None

    def spec(self) -> dict[str, Any]:
        return {"type": "smile", "in": self.in_features, "out": self.out_features, "experts": self.n_experts,
                "rank": self.rank, "gate_rank": self.gate_rank, "top_k": self.top_k, "bias": self.bias_delta is not None}

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K] routing weights of N input rows: softmax of the projection norms, top-k kept, renormalised."""
        if self.n_experts == 1:
            return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        norms = F.linear(x, self.gate).view(x.shape[0], self.n_experts, self.gate_rank).norm(p=2, dim=-1)
        p = torch.softmax(norms, dim=-1)
        top, idx = p.topk(self.top_k, dim=-1)
        return torch.zeros_like(p).scatter_(-1, idx, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat = x.reshape(-1, self.in_features)
        weights = self.routing(flat)
        out = torch.zeros(flat.shape[0], self.out_features, dtype=y.dtype, device=y.device)
        for k in range(self.n_experts):
            rows = torch.nonzero(weights[:, k], as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            h = F.linear(F.linear(flat[rows], self.svh[k]), self.u[k])
            if self.bias_delta is not None:
                h = h + self.bias_delta[k]
            out.index_add_(0, rows, h * weights[rows, k, None])
        return y + out.view(*x.shape[:-1], self.out_features)


class WEMoERouter(nn.Module):
    """The router of one MLP block: hidden -> [hidden -> ReLU ->]* K merging coefficients (no softmax).

    Initialised as in WEMoE: small weights (std 0.01), the last bias at ``init_lambda``, so
    the block starts as task arithmetic with that coefficient.
    """

    def __init__(self, hidden: int, n_experts: int, hidden_layers: int = 1, init_lambda: float = 0.3,
                 generator: torch.Generator | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, n_experts))
        self.net = nn.Sequential(*layers)
        self.hidden_layers, self.init_lambda = hidden_layers, init_lambda
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 0.01, generator=generator)
                    m.bias.zero_()
            self.net[-1].bias.fill_(init_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EnsembleLinear(nn.Module):
    """A linear layer whose weights are the base plus a per-token weighted sum of task vectors.

    WEMoE (Tang et al., ICML 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture
    of Experts", arXiv:2402.00433):

        W(x) = W0 + sum_k r_k(x) tau_k,   b(x) = b0 + sum_k r_k(x) tau_k,b
        y    = W0 x + b0 + sum_k r_k(x) (tau_k x + tau_k,b)       (the same, without forming W(x))

    The coefficients r(x) come from the block's router (:class:`WEMoERouter`) applied to
    the block's input, per token; the linear that reads the block input owns the router
    (``router``), the block's other linears (``follows``) reuse its coefficients for the
    same tokens. The paper averages r over an image's tokens; per token is the same model
    where inputs have no padding, and keeps padding out of the coefficients of text.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, bias: bool = True,
                 router: WEMoERouter | None = None):
        super().__init__()
        self.in_features, self.out_features, self.n_experts = in_features, out_features, n_experts
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.task_vectors = nn.Parameter(torch.zeros(n_experts, out_features, in_features), requires_grad=False)
        self.task_biases = nn.Parameter(torch.zeros(n_experts, out_features), requires_grad=False) if bias else None
        self.router = router
        self.last_coefficients: torch.Tensor | None = None

    @property
    def leader(self) -> "EnsembleLinear | None":
        """The block's router owner, for a follower."""
        return self.__dict__.get("_leader")

    def follow(self, owner: "EnsembleLinear") -> None:
        """Reuse ``owner``'s coefficients (kept as a plain reference: nn.Module would register a
        submodule, and its weights would be saved twice)."""
        self.__dict__["_leader"] = owner

    def spec(self) -> dict[str, Any]:
        d = {"type": "wemoe", "in": self.in_features, "out": self.out_features, "experts": self.n_experts,
             "bias": self.task_biases is not None}
        if self.router is not None:
            d.update(router_hidden_layers=self.router.hidden_layers, init_lambda=self.router.init_lambda)
        return d

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            self.last_coefficients = self.router(x)
            return self.last_coefficients
        leader = self.leader
        if leader is None or leader.last_coefficients is None:
            raise RuntimeError("a WEMoE follower ran before its block's router")
        return leader.last_coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.coefficients(x)  # [..., K]
        mixed = torch.einsum("...i,koi->...ko", x, self.task_vectors)
        if self.task_biases is not None:
            mixed = mixed + self.task_biases
        return self.base(x) + torch.einsum("...k,...ko->...o", r, mixed)


class TwinLinear(nn.Module):
    """A linear layer of shared weights plus K low-rank exclusive parts, weighted per input.

    Twin-Merging (Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular
    Expertise in Model Merging", arXiv:2406.15479). With the shared weights W_s (a static
    merge of the fine-tunes) and task k's exclusive part W_k - W_s ~= U_k S_k V_k^T (its
    top-``rank`` singular triplets):

        y = W_s x + b_s + sum_k w_k (U_k (S_k V_k^T x) + (b_k - b_s))

    ``w`` [batch, K] is one weighting per input (every token of a sample gets its sample's),
    set before each forward by the model's :class:`TwinRouter` (``mix_weights``); None (no
    router ran) is the shared model. This is the model theta_s + sum_k w_k(x) SVD_r(theta_k -
    theta_s) of the paper for each sample, computed without forming per-sample weights.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.n_experts, self.rank = in_features, out_features, n_experts, rank
        self.base = nn.Linear(in_features, out_features, bias=bias)
        self.u = nn.Parameter(torch.zeros(n_experts, out_features, rank), requires_grad=False)
        self.svh = nn.Parameter(torch.zeros(n_experts, rank, in_features), requires_grad=False)
        self.bias_delta = nn.Parameter(torch.zeros(n_experts, out_features), requires_grad=False) if bias else None
        self.mix_weights: torch.Tensor | None = None  # [batch, K], set by the router (a plain attribute, not saved)

    def spec(self) -> dict[str, Any]:
        return {"type": "twin", "in": self.in_features, "out": self.out_features, "experts": self.n_experts,
                "rank": self.rank, "bias": self.bias_delta is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self.mix_weights
        if w is None:
            return y
        if w.shape[0] != x.shape[0]:
            raise RuntimeError(f"Twin-Merging layer: routing weights for {w.shape[0]} inputs, input batch {x.shape[0]} "
                               "(the routed linears must see the batch as their first dimension)")
        per_token = (w.shape[0],) + (1,) * (x.dim() - 2)
        h = torch.einsum("b...i,kri->b...kr", x, self.svh) * w.to(x.dtype).view(*per_token, self.n_experts, 1)
        out = torch.einsum("b...kr,kor->b...o", h, self.u)
        if self.bias_delta is not None:
            out = out + (w.to(x.dtype) @ self.bias_delta).view(*per_token, self.out_features)
        return y + out


class TwinRouter(nn.Module):
    """Twin-Merging's router: w(x) = softmax(R(Emb(x))), Emb(x) the output of ``feature_module``
    (``""``: the model's own output) under the shared model, mean-pooled over tokens (over the
    unmasked ones where the call passes an ``attention_mask``); R a small MLP (``hidden`` 0: one
    linear layer) on the standardised features. Attached to a model by :func:`attach_twin_router`."""

    def __init__(self, features: int, n_experts: int, hidden: int = 0, feature_module: str = ""):
        super().__init__()
        self.features, self.n_experts, self.hidden, self.feature_module = features, n_experts, hidden, feature_module
        layers: list[nn.Module] = [nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, n_experts)] if hidden else \
            [nn.Linear(features, n_experts)]
        self.net = nn.Sequential(*layers)
        # the features are standardised before R (the statistics of the router's training inputs)
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.busy = False  # True during the shared pass that computes the features

    def spec(self) -> dict[str, Any]:
        return {"features": self.features, "n_experts": self.n_experts, "hidden": self.hidden,
                "feature_module": self.feature_module}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.shift) / self.scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Routing weights [batch, K] (rows sum to 1) of pooled features [batch, features]."""
        return torch.softmax(self.logits(features), dim=-1)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = out["last_hidden_state"] if "last_hidden_state" in out else list(out.values())
    for item in out if isinstance(out, (tuple, list)) else [out]:
        if isinstance(item, torch.Tensor):
            return item
    raise AlloyError(f"Twin-Merging router: the feature module's output ({type(out).__name__}) holds no tensor: "
                     "pick another feature_module")


def pool(hidden: torch.Tensor, mask: Any = None) -> torch.Tensor:
    """[batch, features] from a module's output: as is, or the mean over tokens ([batch, tokens, features]),
    over the tokens ``mask`` keeps where it is given."""
    if hidden.dim() == 2:
        return hidden
    hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    if isinstance(mask, torch.Tensor) and mask.shape == hidden.shape[:2]:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return hidden.mean(1)


def twin_layers(model: nn.Module) -> list[TwinLinear]:
    return [m for m in model.modules() if isinstance(m, TwinLinear)]


@torch.no_grad()
def shared_features(model: nn.Module, run: Callable[[], Any], feature_module: str = "") -> torch.Tensor:
    """Pooled features of one call of ``model`` (``run()`` makes it) under the shared model (every
    :class:`TwinLinear` unweighted): the output of ``feature_module`` (``""``: the model's), mean
    over tokens, over the ``attention_mask`` the call passed, if any. What the router reads."""
    router, seen = getattr(model, "twin_router", None), {}

    def mask_of(_m: nn.Module, _args: tuple, kwargs: dict) -> None:
        seen.setdefault("mask", kwargs.get("attention_mask"))

    def output_of(_m: nn.Module, _args: tuple, out: Any) -> None:
        seen["out"] = _first_tensor(out)

    hooks = [model.register_forward_pre_hook(mask_of, with_kwargs=True, prepend=True),
             get_module(model, feature_module).register_forward_hook(output_of)]
    if router is not None:
        router.busy = True
    try:
        for m in twin_layers(model):
            m.mix_weights = None
        run()
    finally:
        if router is not None:
            router.busy = False
        for h in hooks:
            h.remove()
    if "out" not in seen:
        raise AlloyError(f"Twin-Merging router: the feature module '{feature_module}' did not run in the model's forward")
    return pool(seen["out"], seen.get("mask"))


def _route(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the shared pass, the router, then every TwinLinear weighted for this batch."""
    router: TwinRouter = model.twin_router
    if router.busy:
        return None
    weights = router(shared_features(model, lambda: model(*args, **kwargs), router.feature_module))
    for m in twin_layers(model):
        m.mix_weights = weights
    model.twin_last_weights = weights.detach()
    return None


def _unroute(model: nn.Module, _args: tuple, _out: Any) -> None:
    if not model.twin_router.busy:
        for m in twin_layers(model):
            m.mix_weights = None


def attach_twin_router(model: nn.Module, router: TwinRouter) -> nn.Module:
    """Put ``router`` in ``model`` (as ``model.twin_router``, saved with it) and route every call:
    each forward first runs the shared model to compute the routing weights, then the weighted one
    (two passes per call: what Twin-Merging's dynamic merging costs). The last call's weights are
    kept as ``model.twin_last_weights``."""
    if not twin_layers(model):
        raise AlloyError("attach_twin_router: the model holds no TwinLinear layer (build it with twin_merging())")
    if router.n_experts != twin_layers(model)[0].n_experts:
        raise AlloyError(f"attach_twin_router: the router has {router.n_experts} outputs, the layers "
                         f"{twin_layers(model)[0].n_experts} experts")
    model.twin_router = router
    if _route not in model._forward_pre_hooks.values():  # once, also on a copy of a routed model
        model.register_forward_pre_hook(_route, with_kwargs=True)
        model.register_forward_hook(_unroute)
    return model


# -- building, saving and loading ------------------------------------------------------------------
def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (SmileLinear, EnsembleLinear, TwinLinear))}


def _empty_layer(spec: dict[str, Any]) -> nn.Module:
    if spec["type"] == "smile":
        return SmileLinear(spec["in"], spec["out"], spec["experts"], spec["rank"], spec["gate_rank"], spec["top_k"],
                           spec["bias"])
    if spec["type"] == "wemoe":
        router = (WEMoERouter(spec["in"], spec["experts"], spec["router_hidden_layers"], spec["init_lambda"])
                  if "router_hidden_layers" in spec else None)
        return EnsembleLinear(spec["in"], spec["out"], spec["experts"], spec["bias"], router)
    if spec["type"] == "twin":
        return TwinLinear(spec["in"], spec["out"], spec["experts"], spec["rank"], spec["bias"])
    raise CheckpointError(f"routed layer type '{spec['type']}' is not one alloykit knows (smile, wemoe, twin)")


def link_followers(model: nn.Module, leaders: dict[str, str]) -> None:
    """Point each WEMoE follower at the layer that owns its block's router."""
    for follower, leader in leaders.items():
        get_module(model, follower).follow(get_module(model, leader))


def save_routed(model: nn.Module, folder: str | os.PathLike, *, host_config: Any = None,
                tokenizer: str | os.PathLike | None = None, overwrite: bool = False, description: str = "",
                method: str | None = None, settings: dict[str, Any] | None = None, experts: list[str] | None = None) -> Path:
    """Write a routed model folder (atomically). ``host_config``: the transformers config of the
    host (its class is ``type(model).__name__``); None: the caller rebuilds the skeleton.
    ``method``, ``settings``, ``experts``: what made it (default: what ``smile``/``wemoe`` recorded)."""
    layers = {name: m.spec() for name, m in routed_layers(model).items()}
    if not layers:
        raise AlloyError("save_routed: the model holds no routed layer (SmileLinear, EnsembleLinear, TwinLinear)")
    made = getattr(model, "alloykit_routing", None) or {}
    method = method or made.get("method") or "custom"
    settings = settings if settings is not None else made.get("settings", {})
    experts = experts if experts is not None else made.get("experts", [])
    leaders = {n: _module_name(model, m.leader) for n, m in routed_layers(model).items()
               if isinstance(m, EnsembleLinear) and m.leader is not None}
    host: dict[str, Any] = {"kind": "module", "class": type(model).__name__}
    if host_config is not None:
        host = {"kind": "transformers", "class": type(model).__name__, "model_type": host_config.model_type}
    record = {"format": FORMAT, "version": VERSION, "method": method, "alloykit_version": __version__,
              "torch_version": torch.__version__, "experts": experts or [], "settings": settings or {}, "host": host,
              "layers": layers, "followers": leaders, "parameters": parameter_count(model),
              **({"router": model.twin_router.spec()} if isinstance(getattr(model, "twin_router", None), TwinRouter) else {}),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "alloykit": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if host_config is not None:
            host_config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    (tmp / name).write_bytes((Path(tokenizer) / name).read_bytes())
        (tmp / "README.md").write_text(_card(record, description), encoding="utf-8")

    return publish(folder, write, overwrite=overwrite, what="routed model")


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for n, m in root.named_modules():
        if m is module:
            return n
    raise AlloyError("save_routed: a WEMoE follower's router owner is not part of the model")


def read_record(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"'{folder}' is no routed model folder (no {CONFIG}); routed models are written by "
                              "alloykit.moe's smile()/wemoe() and save_routed") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"'{path}' cannot be read as JSON: {err}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an alloykit routed-model record (format {record.get('format')!r})")
    if int(record.get("version", 0)) > VERSION:
        raise CheckpointError(f"'{path}' has format version {record['version']}; this alloykit reads up to {VERSION}: upgrade alloykit")
    return record


def load_routed_model(folder: str | os.PathLike, module: nn.Module | None = None) -> nn.Module:
    """Rebuild a routed model from its folder, routing in place (eval mode).

    ``module``: the host skeleton (any module of the base's architecture; its weights are
    replaced); needed when the host is not a transformers model. A transformers host is built
    from ``config.json`` and its class name in transformers (no code from the folder runs).
    """
    folder = Path(folder)
    record = read_record(folder)
    host = record["host"]
    if module is None:
        if host.get("kind") != "transformers":
            raise AlloyError(f"routed model '{folder}' was built on a {host.get('class')} module, not a transformers model: "
                             "pass its skeleton, load_routed_model(folder, module=...)")
        module = _transformers_host(folder, host)
    for name, spec in record["layers"].items():
        try:
            get_module(module, name)
        except AttributeError:
            raise CheckpointError(f"routed model '{folder}': the host has no module '{name}' (another architecture?)") from None
        set_module(module, name, _empty_layer(spec))
    link_followers(module, record.get("followers", {}))
    if "router" in record:  # Twin-Merging: one router for the whole model, run before each forward
        try:
            router = TwinRouter(**record["router"])
        except TypeError:
            raise CheckpointError(f"routed model '{folder}': its router entry {record['router']!r} is not a Twin-Merging "
                                  "router's (features, n_experts, hidden, feature_module)") from None
        attach_twin_router(module, router)
    missing, unexpected = load_model(module, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"routed model '{folder}': the weights do not fit the rebuilt model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    # what made it, as smile() / wemoe() record it: a reloaded model saves again with the same record
    module.alloykit_routing = {"method": record["method"], "experts": record.get("experts", []),
                               "settings": record.get("settings", {})}
    return module.eval()


def _transformers_host(folder: Path, host: dict[str, Any]) -> nn.Module:
    from alloykit.eval.loading import quiet_transformers, transformers_module

    tf = transformers_module()
    cls = getattr(tf, str(host.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        raise CheckpointError(f"routed model '{folder}': host class '{host.get('class')}' is not a transformers model class")
    with quiet_transformers():
        config = tf.AutoConfig.from_pretrained(str(folder))
        return cls._from_config(config, dtype=torch.float32)


# -- cost ----------------------------------------------------------------------------------------
def parameter_count(model: nn.Module) -> int:
    """Stored parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def overhead(routed: nn.Module, dense: nn.Module, run: Callable[[nn.Module], Any], repeats: int = 3) -> dict[str, float]:
    """Cost of a routed model against one dense model: parameter ratio, and the ratio of CPU time
    (user + sys of this process, best of ``repeats``) of ``run(model)`` on each, measured in turn."""

    def best(m: nn.Module) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            with torch.no_grad():
                run(m)
            times.append(time.process_time() - t0)
        return min(times)

    dense_s, routed_s = best(dense), best(routed)
    return {"parameters": parameter_count(routed) / parameter_count(dense), "dense_cpu_s": dense_s, "routed_cpu_s": routed_s,
            "latency": routed_s / dense_s if dense_s > 0 else math.nan}


def _card(record: dict[str, Any], description: str) -> str:
    lines = ["---", "tags: [merge, routing, alloykit]", "---", f"# Routed model ({record['method']})", "",
             description or f"Built with alloykit {__version__}.", "",
             "Load it with `alloykit.load_routed_model(folder)` (a transformers host) or "
             "`alloykit.load_routed_model(folder, module=skeleton)`.", "",
             f"Experts: {', '.join(record['experts']) or next(iter(record['layers'].values()))['experts']}; "
             f"routed layers: {len(record['layers'])}; parameters: {record['parameters']:,}.", "",
             "Settings: `" + json.dumps(record["settings"]) + "`", ""]
    return "\n".join(lines)
