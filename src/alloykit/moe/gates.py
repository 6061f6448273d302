"""Router weights of ``alloykit moe``, one row per expert and layer, from the gate mode.

Each layer's router scores a token's hidden state x against one row per expert
(``logits = W_gate x``); the experts with the top ``experts_per_token`` scores run.

* ``hidden`` (= ``hidden_last``): the row of expert e in layer l is the hidden state
  entering layer l at the last token of each positive prompt, averaged over the prompts,
  minus the same for the negative prompts, scaled to unit length. One forward pass of the
  base per expert's prompts, with the base loaded once (float32; mergekit-moe runs it in
  bfloat16). ``hidden_avg`` averages over each prompt's tokens instead of taking the last.
* ``cheap_embed``: the token embeddings of the prompts instead of hidden states, summed
  over the tokens and prompts and scaled to unit length (positive minus negative, scaled
  again): the same row in every layer, no forward pass. Deterministic and computed with
  the same operations as mergekit-moe, so the bytes are equal.
* ``random``: standard normal rows; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) as
  ``torch.nn.Linear`` initialises them. One generator per router tensor, seeded from
  (seed, tensor name); mergekit-moe draws from torch's global generator, so the values
  differ from its (and from run to run there).

Prompts are tokenized as mergekit-moe does: the tokenizer's BOS token prepended as text,
no other special tokens, left padding with the BOS (else EOS) token as padding.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from alloykit.errors import AlloyError
from alloykit.plan.planner import tensor_seed
from alloykit.progress import Progress

_log = logging.getLogger(__name__)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (rows of zeros stay zero)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_rows(mode: str, rows: int, hidden: int, seed: int, name: str) -> torch.Tensor:
    """[rows, hidden] router weights of a random gate mode, drawn from the generator of ``name``."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    if mode == "random":
        return torch.randn(rows, hidden, generator=gen)
    bound = math.sqrt(1.0 / hidden)
    return torch.rand(rows, hidden, generator=gen) * 2 * bound - bound


def load_tokenizer(base: Path):
    """The base's tokenizer, set up as mergekit-moe sets it: left padding, BOS (else EOS) as padding."""
    from alloykit.eval.loading import quiet_transformers, transformers_module

    tf = transformers_module()
    try:
        with quiet_transformers():
            tok = tf.AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as err:
        raise AlloyError(f"base_model '{base}': no tokenizer to read the prompts with ({str(err).splitlines()[0][:160]}); "
                         "put the tokenizer files in the base's folder, or use gate_mode: random") from None
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False))


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[H]: the prompts' token embeddings summed over real tokens and prompts, unit length."""
    h = embed.float()[batch["input_ids"]]  # the rows a one-hot product would pick, exactly
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return unit_rows(summed)[0]


class HiddenStates:
    """The base model (float32), loaded once; the hidden state entering each decoder layer."""

    def __init__(self, base: Path, device: str = "cpu", last_token: bool = True):
        from alloykit.eval.loading import quiet_transformers, transformers_module

        tf = transformers_module()
        with quiet_transformers():
            try:
                self.model = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, use_safetensors=True)
            except (OSError, ValueError, KeyError) as err:
                raise AlloyError(f"base_model '{base}' does not load in transformers for gate_mode hidden "
                                 f"({str(err).splitlines()[0][:160]})") from None
        self.model.to(device).eval()
        self.device, self.last_token = device, last_token
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            raise AlloyError(f"base_model '{base}': no decoder layers at model.layers to read hidden states from")
        self.layers = list(layers)

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, H]: per layer, the input hidden state at each prompt's last token (or its tokens' mean),
        averaged over the prompts."""
        captured: list[torch.Tensor] = []

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).float())

        hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers]
        try:
            self.model(**{k: v.to(self.device) for k, v in batch.items()})
        finally:
            for h in hooks:
                h.remove()
        states = torch.stack(captured).cpu()  # [L, B, T, H]
        if self.last_token:  # left padding: the last position is every prompt's last token
            per_prompt = states[:, :, -1, :]
        else:
            mask = batch["attention_mask"].to(states.dtype)[None, :, :, None]
            per_prompt = (states * mask).sum(2) / mask.sum(2)
        return per_prompt.mean(dim=1)

    def close(self) -> None:
        del self.model


def prompt_gates(mode: str, base: Path, embed: torch.Tensor | None, experts: Sequence, n_layers: int,
                 device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """[L, E, H] float32 router rows from each expert's prompts (modes hidden*, cheap_embed)."""
    tokenizer = load_tokenizer(base)
    if mode == "cheap_embed":
        def embed_prompts(batch):
            return cheap_embedding(embed, batch).expand(n_layers, -1)
        runner = None
    else:
        runner = HiddenStates(base, device, last_token=mode != "hidden_avg")
        embed_prompts = runner
    rows = []
    prog = Progress("router prompts", len(experts), unit="experts", enabled=progress)
    try:
        for e in experts:
            v = embed_prompts(tokenize(tokenizer, e.positive_prompts))
            if e.negative_prompts:
                v = v - embed_prompts(tokenize(tokenizer, e.negative_prompts))
            rows.append(unit_rows(v))
            prog.update(1)
    finally:
        prog.close()
        if runner is not None:
            runner.close()
    gates = torch.stack(rows, dim=1)  # [L, E, H]
    _warn_degenerate(gates)
    return gates


def _warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> None:
    """Layers whose expert rows are nearly dependent route poorly: say which (as mergekit-moe does)."""
    if gates.shape[1] < 2:
        return
    bad = [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].double())) > threshold]
    if bad:
        which = "every layer" if len(bad) == gates.shape[0] else "layers " + ", ".join(map(str, bad))
        _log.warning(f"the routers of {which} are nearly degenerate (condition number > {threshold}): the experts' "
                     "prompts are too similar, so some experts will rarely be chosen")
