"""Each model's token-indexed rows, remapped to the output vocabulary before merging.

For one tensor (an embedding or an output head) and the models that merge it, row ``t``
of the output vocabulary is, for each model, as mergekit 0.1.5 decides it:

* the model has the token: its own row (unless the token is configured with ``force``);
* otherwise a *default row*, the same for every model that lacks it:
  - a token configured under ``tokenizer: tokens:`` with a ``source``: that source's row
    (a model's row of the token, a model's row of another token, or zeros);
  - else, present in exactly one of the merged models: that model's row;
  - else, present in none: zeros (with a warning);
  - else, the base model is among the merged models and has it: the base's row;
  - else: the mean of the rows of the models that have it;
* ``force: true``: every model takes the default row, also those that have the token;
* rows past the vocabulary (``pad_to_multiple_of``): the mean of the model's own
  remapped vocabulary rows.

The merge method then sees one ``[rows, ...]`` tensor per model, as for any other tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from alloykit.errors import PlanError
from alloykit.vocab.build import VocabPlan

LOG = logging.getLogger(__name__)


@dataclass
class RowRemap:
    """The remap of one job: its models (sources then base, as the job lists them)."""

    vocab: VocabPlan
    models: list[int]
    labels: list[str]
    axis: int = 0
    base: int | None = None  # the base model of this tensor's merge (its row is the default)

    def gather(self, tensor_name: str, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's tensor (in ``models`` order) -> its float32 remapped tensor."""
        views = [r.to(torch.float32).movedim(self.axis, 0) for r in raws]
        rest = views[0].shape[1:]
        for v, m in zip(views, self.models):
            if v.shape[1:] != rest:
                raise PlanError(f"tensor '{tensor_name}': model '{self.labels[m]}' has rows of shape {list(v.shape[1:])}, "
                                f"others {list(rest)}; the models must share an architecture")
        vp = self.vocab
        n, k = vp.n_tokens, len(views)
        perms = [vp.perms[m] for m in self.models]
        present = torch.stack([p >= 0 for p in perms])  # (k, n)
        count = present.sum(0)
        out = [torch.zeros((vp.size, *rest), dtype=torch.float32) for _ in views]
        own = []
        for j, (v, p) in enumerate(zip(views, perms)):
            rows = v[p.clamp(min=0)]  # the model's row of each output token (garbage where missing)
            rows[~present[j]] = 0.0
            own.append(rows)
            out[j][:n] = rows
        # default rows where some model lacks the token: base's row, else the mean of those that
        # have it (the single one's row when only one has it; zeros when none does)
        need = count < k
        default = torch.zeros((n, *rest), dtype=torch.float32)
        if bool(need.any()):
            for rows in own:  # summed in model order, then divided, as mergekit does
                default += rows
            default /= count.clamp(min=1).to(torch.float32).view(-1, *([1] * len(rest)))
            if self.base is not None and self.base in self.models:
                b = self.models.index(self.base)
                use_base = need & present[b] & (count > 1)
                default[use_base] = own[b][use_base]
            nowhere = int((count == 0).sum())
            if nowhere:
                LOG.warning("tensor '%s': %d token(s) are in none of the merged models; their rows are zero", tensor_name, nowhere)
        forced = torch.zeros(n, dtype=torch.bool)
        for t, rule in vp.rules.items():
            if rule.source is None or not (rule.force or bool(need[t])):
                continue  # no source (the automatic rule), or every model has it and nothing is forced
            default[t] = self._source_row(tensor_name, t, rule.source, views)
            forced[t] = rule.force
        for j in range(k):
            take = (~present[j] & need) | forced
            out[j][:n][take] = default[take]
            if vp.size > n:
                out[j][n:] = out[j][:n].mean(dim=0)
        return [o.movedim(0, self.axis) for o in out]

    def _source_row(self, tensor_name: str, token_id: int, src, views: list[torch.Tensor]) -> torch.Tensor:
        if src.model is None:
            return torch.zeros(views[0].shape[1:], dtype=torch.float32)
        if src.model not in self.models:
            raise PlanError(f"tensor '{tensor_name}': a token's source model '{self.labels[src.model]}' is not merged in "
                            "this tensor (a slice without it); name a model every slice merges")
        v = views[self.models.index(src.model)]
        row = src.row if src.row is not None else int(self.vocab.perms[src.model][token_id])
        if not 0 <= row < v.shape[0]:
            raise PlanError(f"tensor '{tensor_name}': row {row} is outside model '{self.labels[src.model]}''s {v.shape[0]} rows")
        return v[row]
