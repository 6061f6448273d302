"""Permutation specs: which axes of which tensors each hidden-unit permutation moves.

A network's hidden units can be reordered without changing its function, provided every
tensor that reads or writes those units is reordered the same way. A :class:`Group` is one
such set of units (an MLP's hidden layer, a convolution's channels, one layer's attention
heads, the residual stream) with every tensor axis it moves (:class:`Use`). A spec is the
list of groups of one architecture; applying one permutation per group to a checkpoint
gives a functionally identical checkpoint.

Conventions: a permutation is a gather index. ``perm[i] = j`` means unit ``i`` of the
permuted model is unit ``j`` of the original (in alignment: the reference's unit ``i`` is
matched with the model's unit ``j``), so an axis is permuted by ``t.index_select(dim, perm)``.

Attention heads (:class:`Heads`) have more structure than a flat group:

* whole heads move together: a query head's rows of q_proj, and the columns of o_proj its
  output feeds; with grouped-query attention a key/value head moves with all the query
  heads that read it, and those query heads may be reordered among themselves;
* within a head, the value dimensions may be permuted (v_proj rows and the o_proj
  columns they feed: the softmax weights do not depend on them); with grouped-query
  attention every query head of the group shares its key/value head's permutation;
* the query/key dimensions may be permuted jointly (q . k is a sum over dimensions), but
  only without rotary embeddings: RoPE rotates the pairs (i, i + d/2) by angles m * theta_i
  with distinct theta_i, and a joint permutation keeps q . k only if it commutes with every
  rotation; the only permutation of a plane commuting with a rotation by theta (not 0 or pi)
  is the identity (the swap turns R(theta) into R(-theta)), so under RoPE (Llama, Mistral,
  Qwen2) the query/key dimensions stay in place, and in BERT (absolute positions) they move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch


@dataclass(frozen=True)
class Use:
    """One tensor axis moved by a group."""

    tensor: str
    dim: int
    #: each unit spans ``inner`` consecutive entries of the axis (a convolution's channels flattened)
    inner: int = 1
    #: heads groups only: which index space the axis is ("q", "k", "v" rows, or "o" columns)
    role: str = ""


@dataclass(frozen=True)
class Probe:
    """Where a group's units can be observed: a module's input or output (a node's output, for traced modules)."""

    target: str
    where: str = "out"  # "in", "out" (a module), "node" (a traced graph's value)
    role: str = ""  # heads groups: "q", "k", "v", "o"
    cdim: int = -1  # the observed tensor's unit axis


@dataclass(frozen=True)
class Heads:
    """Attention layout: query heads, key/value heads, head width, and which within-head moves are valid."""

    n_heads: int
    n_kv: int
    head_dim: int
    qk_dims: bool  # query/key dimensions may be permuted jointly (no rotary embedding)
    v_dims: bool = True

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv


@dataclass
class HeadPerm:
    """A permutation of one attention layer, indexed by the reference's positions.

    ``kv[a]``: the model's key/value head at slot a; ``q[h]``: the model's query head at
    slot h (one of kv[h // rep]'s query heads); ``qk[a]``/``v[a]``: the model's dimension at
    each dimension slot of key/value slot a (shared by its query heads).
    """

    kv: torch.Tensor
    q: torch.Tensor
    qk: torch.Tensor  # [n_kv, head_dim]
    v: torch.Tensor  # [n_kv, head_dim]

    @classmethod
    def identity(cls, h: Heads) -> "HeadPerm":
        dims = torch.arange(h.head_dim).repeat(h.n_kv, 1)
        return cls(torch.arange(h.n_kv), torch.arange(h.n_heads), dims, dims.clone())

    def index(self, role: str, h: Heads) -> torch.Tensor:
        hd = h.head_dim
        if role in ("q", "o"):
            within = (self.qk if role == "q" else self.v)[torch.arange(h.n_heads) // h.rep]
            return (self.q[:, None] * hd + within).reshape(-1)
        within = self.qk if role == "k" else self.v
        return (self.kv[:, None] * hd + within).reshape(-1)

    def is_identity(self) -> bool:
        return all(bool((t == t.new_tensor(range(t.shape[-1]))).all()) for t in (self.kv, self.q, self.qk, self.v))

    def moved_fraction(self) -> float:
        """Share of query heads not at their own slot."""
        return float((self.q != torch.arange(len(self.q))).float().mean())

    def to_json(self) -> dict:
        return {"kv_heads": self.kv.tolist(), "q_heads": self.q.tolist(), "qk_dims": self.qk.tolist(), "v_dims": self.v.tolist()}


Perm = Union[torch.Tensor, HeadPerm]


@dataclass
class Group:
    """One set of interchangeable units and every tensor axis that must follow them."""

    name: str
    size: int  # units (query heads for attention)
    uses: list[Use]
    heads: Heads | None = None
    probes: list[Probe] = field(default_factory=list)
    #: modules whose outputs are these units through a per-unit affine map (weight rows + bias,
    #: or a norm's scale + shift): where REPAIR corrects the units' statistics
    producers: list[str] = field(default_factory=list)

    def identity(self) -> Perm:
        return HeadPerm.identity(self.heads) if self.heads is not None else torch.arange(self.size)

    def index(self, perm: Perm, use: Use) -> torch.Tensor:
        """The gather index of one axis."""
        if self.heads is not None:
            return perm.index(use.role, self.heads)
        if use.inner == 1:
            return perm
        return (perm[:, None] * use.inner + torch.arange(use.inner)).reshape(-1)

    def random(self, gen: torch.Generator) -> Perm:
        if self.heads is None:
            return torch.randperm(self.size, generator=gen)
        h = self.heads
        kv = torch.randperm(h.n_kv, generator=gen)
        q = torch.cat([kv[a] * h.rep + torch.randperm(h.rep, generator=gen) for a in range(h.n_kv)])
        def dims(free: bool) -> torch.Tensor:
            if not free:
                return torch.arange(h.head_dim).repeat(h.n_kv, 1)
            return torch.stack([torch.randperm(h.head_dim, generator=gen) for _ in range(h.n_kv)])
        return HeadPerm(kv, q, dims(h.qk_dims), dims(h.v_dims))


@dataclass
class Spec:
    """The permutation groups of one architecture (derived from a config or a traced module)."""

    family: str
    groups: list[Group]
    #: what stays in place and why (e.g. a bare encoder's output features)
    notes: list[str] = field(default_factory=list)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def by_tensor(self) -> dict[str, list[tuple[Group, Use]]]:
        out: dict[str, list[tuple[Group, Use]]] = {}
        for g in self.groups:
            for u in g.uses:
                out.setdefault(u.tensor, []).append((g, u))
        return out

    def identity(self) -> dict[str, Perm]:
        return {g.name: g.identity() for g in self.groups}

    def random(self, seed: int = 0) -> dict[str, Perm]:
        """One random permutation per group (tests: a model permuted at random is the same function)."""
        gen = torch.Generator().manual_seed(seed)
        return {g.name: g.random(gen) for g in self.groups}


def permute_tensor(name: str, t: torch.Tensor, uses: list[tuple[Group, Use]], perms: dict[str, Perm],
                   skip: Use | None = None) -> torch.Tensor:
    """``t`` with every axis the groups move gathered by their permutations (except ``skip``)."""
    for g, u in uses:
        if u is skip:
            continue
        t = t.index_select(u.dim, g.index(perms[g.name], u))
    return t


def apply_permutations(state_dict: dict[str, torch.Tensor], spec: Spec, perms: dict[str, Perm]) -> dict[str, torch.Tensor]:
    """A new state dict: every tensor the spec names permuted, the others shared unchanged."""
    by = spec.by_tensor()
    missing = sorted(set(by) - set(state_dict))
    if missing:
        raise KeyError(f"the spec names tensor '{missing[0]}', which the state dict lacks")
    return {k: permute_tensor(k, v, by[k], perms) if k in by else v for k, v in state_dict.items()}


def check_spec(spec: Spec, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every use must fit its tensor's shape (a wrong spec would silently scramble a model)."""
    for g in spec.groups:
        for u in g.uses:
            shape = shapes.get(u.tensor)
            if shape is None:
                raise ValueError(f"group {g.name}: tensor '{u.tensor}' is not in the model")
            want = g.heads.head_dim * (g.heads.n_heads if u.role in ("q", "o") else g.heads.n_kv) if g.heads else g.size * u.inner
            if u.dim >= len(shape) or shape[u.dim] != want:
                raise ValueError(f"group {g.name}: tensor '{u.tensor}' axis {u.dim} has shape {list(shape)}, expected length {want}")
