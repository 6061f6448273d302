"""Tokenizer transplant: give a model a donor's tokenizer, rebuilding the rows of new tokens.

``alloykit tokensurgeon MODEL --donor DONOR OUT`` writes MODEL with DONOR's tokenizer: its
embedding (and output head) get one row per donor token, in the donor's order:

* a token the model has (same text; word-start markers ``Ġ``/``▁`` compared as one; a
  special token matched by its role: bos, eos, unk, pad): the model's row;
* a new token, by ``method``:
  - ``pieces`` (default): the token's text is split by the model's own tokenizer and the
    row is the mean of the pieces' rows (needs only the donor's tokenizer);
  - ``omp``: orthogonal matching pursuit (mergekit-tokensurgeon's default, k=64): the
    donor's row of the token is written as a sparse combination of the donor's rows of
    ``k`` tokens both models share, and the same combination of the model's rows of those
    tokens is the new row (needs the donor's weights);
  - ``mean``: the mean of all the model's rows.

Every other tensor is the model's, unchanged. The output goes through the merge's output
path (atomic folder, recipe, manifest, card). docs/tokenizers.md measures the methods
against each other and against mergekit-tokensurgeon.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import RecipeError
from alloykit.vocab.build import VocabPlan, load_tokenizer, model_folder, model_vocab_size
from alloykit.vocab.files import has_tokenizer
from alloykit.vocab.tensors import is_input_embedding, vocab_tensors

LOG = logging.getLogger(__name__)
METHODS = ("pieces", "omp", "mean")
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _word_start(vocab: dict[str, int]) -> str:
    """The tokenizer's word-start marker: SentencePiece's '▁' or byte-level BPE's 'Ġ'."""
    spm = sum(1 for t in vocab if t.startswith("▁"))
    bpe = sum(1 for t in vocab if t.startswith("Ġ"))
    return "▁" if spm > bpe else "Ġ"


def normalized_vocab(tok) -> dict[Any, int]:
    """token -> id with word-start markers unified (key ('^', rest)) and role tokens keyed by role."""
    vocab = tok.get_vocab()
    mark = _word_start(vocab)
    roles = {getattr(tok, r, None): r for r in _ROLES if getattr(tok, r, None)}
    out: dict[Any, int] = {}
    for text, i in vocab.items():
        if text in roles:
            key: Any = ("role", roles[text])
        elif text.startswith(mark) and len(text) > 1:
            key = ("^", text[len(mark):])
        else:
            key = text
        out.setdefault(key, i)
    return out


def token_text(tok, token: str) -> str:
    """The text a token stands for (a word-start marker becomes a space)."""
    text = tok.convert_tokens_to_string([token])
    if token.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


@dataclass
class Surgery:
    """Which donor ids keep a model row, and which are new (with their pieces)."""

    size: int  # rows of the output matrices
    keep: torch.Tensor  # LongTensor[size]: the model's row for each donor id, -1 for new tokens
    new_ids: list[int]
    pieces: list[list[int]]  # per new token: the model's token ids of its text
    shared_model: torch.Tensor  # model rows of tokens both have (omp atoms)
    shared_donor: torch.Tensor  # donor rows of the same tokens
    method: str
    k: int


def plan_surgery(model_tok, donor_tok, model_rows: int, donor_rows: int, method: str, k: int) -> Surgery:
    if method not in METHODS:
        raise RecipeError(f"tokensurgeon --method '{method}': use one of {', '.join(METHODS)}")
    mv, dv = normalized_vocab(model_tok), normalized_vocab(donor_tok)
    donor_vocab = donor_tok.get_vocab()
    size = max(len(donor_vocab), max(donor_vocab.values()) + 1)
    keep = torch.full((size,), -1, dtype=torch.long)
    new_ids, pieces = [], []
    by_id = {i: t for t, i in donor_vocab.items()}
    key_of = {i: key for key, i in dv.items()}
    for i in range(size):
        key = key_of.get(i)
        if key is not None and key in mv and mv[key] < model_rows:
            keep[i] = mv[key]
        elif i in by_id:
            new_ids.append(i)
            ids = model_tok(token_text(donor_tok, by_id[i]), add_special_tokens=False)["input_ids"]
            pieces.append([j for j in ids if j < model_rows])
    shared = sorted((dv[key], mv[key]) for key in dv.keys() & mv.keys() if mv[key] < model_rows and dv[key] < donor_rows)
    if method == "omp" and len(shared) < k:
        raise RecipeError(f"tokensurgeon --method omp -k {k}: the tokenizers share only {len(shared)} tokens; lower -k")
    return Surgery(size, keep, new_ids, pieces, torch.tensor([m for _, m in shared], dtype=torch.long),
                   torch.tensor([d for d, _ in shared], dtype=torch.long), method, k)


def omp(targets: torch.Tensor, atoms: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit: for each target row, ``k`` atoms (rows of ``atoms``) and
    coefficients that least-squares fit it. Each step picks the atom most correlated with the
    residual, then refits the target on every atom picked so far (an orthonormal basis of
    them is kept, so a refit costs one projection). Returns (indices [B, k], coeffs [B, k])."""
    t = targets.to(torch.float64)
    a = atoms.to(torch.float64)
    a32 = atoms.to(torch.float32)  # the correlations (the costly product) in float32, the fit in float64
    b = t.shape[0]
    picked = torch.zeros((b, k), dtype=torch.long)
    basis = torch.zeros((b, t.shape[1], k), dtype=torch.float64)
    residual = t.clone()
    taken = torch.zeros((b, a.shape[0]), dtype=torch.bool)
    rows = torch.arange(b)
    for step in range(k):
        score = (residual.to(torch.float32) @ a32.T).abs().masked_fill_(taken, -1.0)
        idx = score.argmax(dim=1)
        picked[:, step] = idx
        taken[rows, idx] = True
        v = a[idx]
        for _ in range(2):  # Gram-Schmidt twice: keeps the basis orthonormal in float64
            v = v - torch.einsum("bdk,bk->bd", basis[:, :, :step], torch.einsum("bdk,bd->bk", basis[:, :, :step], v))
        basis[:, :, step] = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        q = basis[:, :, : step + 1]
        residual = t - torch.einsum("bdk,bk->bd", q, torch.einsum("bdk,bd->bk", q, t))
    chosen = a[picked]  # (b, k, d)
    coeffs = torch.linalg.lstsq(chosen.transpose(1, 2), t.unsqueeze(-1)).solution.squeeze(-1)
    return picked, coeffs


@dataclass
class SurgeonRemap:
    """A job's row builder (the executor's ``vocab`` hook): the model's tensor -> donor rows."""

    surgery: Surgery
    donor: Any  # the donor's checkpoint (omp reads its rows of this tensor)
    donor_tensor: str | None
    axis: int = 0
    batch: int = 256

    def gather(self, tensor_name: str, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        s = self.surgery
        model = raws[0].to(torch.float32).movedim(self.axis, 0)
        out = torch.zeros((s.size, *model.shape[1:]), dtype=torch.float32)
        kept = s.keep >= 0
        out[kept] = model[s.keep[kept]]
        if s.new_ids:
            out[torch.tensor(s.new_ids)] = self._new_rows(tensor_name, model)
        return [out.movedim(0, self.axis)]

    def _new_rows(self, tensor_name: str, model: torch.Tensor) -> torch.Tensor:
        s = self.surgery
        if s.method == "mean":
            return model.mean(dim=0).expand(len(s.new_ids), -1)
        if s.method == "pieces":
            rows = torch.stack([model[p].mean(dim=0) if p else model.mean(dim=0) for p in s.pieces])
            return rows
        if self.donor_tensor is None:
            raise RecipeError(f"tokensurgeon --method omp: the donor has no tensor for '{tensor_name}'; use --method pieces")
        donor = self.donor.read(self.donor_tensor).to(torch.float32).movedim(self.axis, 0)
        atoms_d, atoms_m = donor[s.shared_donor], model[s.shared_model]
        targets = donor[torch.tensor(s.new_ids)]
        rows = []
        for i in range(0, len(s.new_ids), self.batch):
            idx, coeffs = omp(targets[i : i + self.batch], atoms_d, s.k)
            rows.append(torch.einsum("bk,bkd->bd", coeffs.to(torch.float32), atoms_m[idx]))
        return torch.cat(rows)


def attach_surgery(plan, donor_ck, donor_label: str, method: str = "pieces", k: int = 64) -> Surgery:
    """Turn a one-model passthrough plan into a tokenizer transplant: its embedding/head
    jobs build donor-vocabulary rows; ``plan.vocab`` writes the donor's tokenizer and config ids."""
    model_ck = plan.checkpoints[0]
    mfolder, dfolder = model_folder(model_ck), model_folder(donor_ck)
    for label, folder in (("model", mfolder), ("donor", dfolder)):
        if folder is None or not has_tokenizer(folder):
            raise RecipeError(f"tokensurgeon: the {label} folder has no tokenizer files")
    model_tok, donor_tok = load_tokenizer(mfolder, plan.labels[0]), load_tokenizer(dfolder, donor_label)
    infos = {n: i.shape for n, i in model_ck.tensors.items()}
    targets = vocab_tensors(list(model_ck.tensors), infos, model_vocab_size(model_ck))
    if not targets:
        raise RecipeError("tokensurgeon: no token embedding found in the model (by name and config vocab_size)")
    dinfos = {n: i.shape for n, i in donor_ck.tensors.items()}
    donor_targets = vocab_tensors(list(donor_ck.tensors), dinfos, model_vocab_size(donor_ck))
    model_rows = next(iter(infos[n][a] for n, a in targets.items()))
    donor_rows = next(iter(dinfos[n][a] for n, a in donor_targets.items()), len(donor_tok))
    surgery = plan_surgery(model_tok, donor_tok, model_rows, donor_rows, method, k)
    LOG.info("tokensurgeon: %d donor tokens, %d kept from the model, %d rebuilt (%s)", surgery.size,
             int((surgery.keep >= 0).sum()), len(surgery.new_ids), method)
    embed_names = [n for n in donor_targets if is_input_embedding(n)]
    for job in plan.jobs:
        if job.name not in targets:
            continue
        # the donor's tensor of the same role (a tied donor: its embedding stands for its head)
        donor_name = job.name if job.name in donor_targets else (embed_names[0] if embed_names else None)
        job.vocab = SurgeonRemap(surgery, donor_ck, donor_name, axis=targets[job.name])
        shape = list(job.shape)
        shape[targets[job.name]] = surgery.size
        job.shape = tuple(shape)
    updates = {"vocab_size": surgery.size}
    dcfg = donor_ck.config() or {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if key in dcfg:
            updates[key] = dcfg[key]
    plan.vocab = VocabPlan(donor_tok, donor_tok.get_vocab(), surgery.size, {}, None, copy_from=Path(dfolder),
                           config_updates=updates)
    return surgery
