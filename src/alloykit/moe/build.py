"""``alloykit moe``: dense fine-tunes in, a Mixtral-style mixture of experts out.

The base model gives everything but the MLPs (embeddings, attention, norms, head); every
expert model gives its MLP, one expert per layer; the routers come from the gate mode
(``alloykit.moe.gates``). The output is a plan of one job per output tensor, run by the
executor like a merge: expert tensors are read one at a time from their checkpoints
(``noise_scale`` and ``residual_scale`` applied on the way, in float32, rounded once to
the output dtype), written into the pre-laid-out shards of a temporary folder, renamed
into place when whole. Only ``gate_mode: hidden`` loads a model: the base, once.

Everything that can be wrong (a missing expert, prompts missing, a model the output kind
cannot hold, experts of another shape) is found from the config and the headers before
a tensor is read.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alloykit import __version__
from alloykit.config import DTYPES
from alloykit.errors import CheckpointError, OutputError, PlanError
from alloykit.io.checkpoint import Checkpoint, StateDictCheckpoint
from alloykit.io.writer import ShardedWriter, plan_shards
from alloykit.methods.registry import MergeInput, MethodSpec, NoParams
from alloykit.moe import gates as gate_rows
from alloykit.moe.config import PROMPT_MODES, Expert, MoEConfig, check, load_moe_config, parse_moe_config
from alloykit.moe.kinds import PROJECTIONS, QWEN2_MOE, OutputKind, output_config, select_kind
from alloykit.moe.publish import publish
from alloykit.output.model import DEFAULT_SHARD_SIZE, default_threads
from alloykit.plan.executor import run_jobs
from alloykit.plan.planner import TORCH_DTYPES, Plan, Source, TensorJob
from alloykit.roles import Kind, role_of
from alloykit.vocab import TOKENIZER_FILES

_log = logging.getLogger(__name__)

_PROJECTION_OF = {Kind.MLP_GATE: "gate", Kind.MLP_UP: "up", Kind.MLP_DOWN: "down"}
COMPUTED = "(computed)"  # the label of the in-memory checkpoint holding routers and zero biases


@dataclass(frozen=True)
class Perturb:
    """An expert tensor's changes: theta + noise_scale * N(0, 1), then times ``scale`` (residual_scale)."""

    noise_scale: float = 0.0
    scale: float = 1.0


def _perturb(x: MergeInput) -> torch.Tensor:
    """An expert tensor with Gaussian noise added and the residual scale applied (mergekit-moe's order)."""
    t, p = x.tensors[0], x.params
    if p.noise_scale:
        t = t + p.noise_scale * torch.randn(t.shape, generator=x.generator, device=t.device, dtype=t.dtype)
    return t * p.scale if p.scale != 1.0 else t


#: the executor's method for expert tensors that change on the way (the others are plain copies)
EXPERT_METHOD = MethodSpec("moe_expert", _perturb, NoParams, NoParams, "ignored", randomized=True, fixed_point=False)


def _resolve(ref: str, config_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.exists() and config_dir is not None and not p.is_absolute() and (config_dir / p).exists():
        return config_dir / p
    return p


class _Inputs:
    """Each model folder opened once (headers only), whatever how many experts name it."""

    def __init__(self, config_dir: Path | None):
        self.config_dir = config_dir
        self.checkpoints: list[Checkpoint] = []
        self.labels: list[str] = []
        self._index: dict[str, int] = {}

    def open(self, ref: str, where: str) -> int:
        path = _resolve(ref, self.config_dir)
        key = os.path.realpath(path)
        if key not in self._index:
            try:
                ck = Checkpoint(path, label=ref)
            except CheckpointError as err:
                raise CheckpointError(f"moe config: {where}: {err}") from None
            if ck.config() is None:
                raise CheckpointError(f"moe config: {where}: model '{ref}' has no config.json (a Hugging Face model folder is needed)")
            self.checkpoints.append(ck)
            self.labels.append(ref)
            self._index[key] = len(self.checkpoints) - 1
        return self._index[key]

    def close(self) -> None:
        for ck in self.checkpoints:
            ck.close()


def _mlp_names(ck: Checkpoint, config: dict) -> dict[tuple[int, str], str]:
    """(layer, projection) -> tensor name of a dense model's MLP weights."""
    out = {}
    for name in ck.tensors:
        role = role_of(name, config)
        if role.is_mlp:
            if role.param != "weight":
                raise PlanError(f"model '{ck.label}': its MLP has a bias ('{name}'); the experts of a mixture hold none")
            proj = _PROJECTION_OF.get(role.kind)
            if proj is None or role.layer is None:
                raise PlanError(f"model '{ck.label}': '{name}' is an MLP tensor of no gate/up/down projection; "
                                "alloykit moe takes Llama-style MLPs (gate_proj, up_proj, down_proj)")
            out[role.layer, proj] = name
    return out


def _out_dtype(config: MoEConfig, base_config: dict, base: Checkpoint) -> torch.dtype:
    """The config's dtype, else the base's config.json dtype, else the base's embedding dtype."""
    name = config.dtype or base_config.get("torch_dtype") or base_config.get("dtype")
    if name in DTYPES:
        return TORCH_DTYPES[name]
    floats = [t.dtype for t in base.tensors.values() if t.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


@dataclass
class MoEPlan:
    """Everything ``build_moe`` decided before reading a tensor."""

    config: MoEConfig
    kind: OutputKind
    plan: Plan
    base: Checkpoint
    base_config: dict
    out_dtype: torch.dtype
    n_layers: int
    hidden: int
    experts: list[int]  # checkpoint index of each routed expert
    shared: int | None

    def close(self) -> None:
        self.plan.close()


def plan_moe(config: MoEConfig | dict | str | os.PathLike, *, config_dir: str | os.PathLike | None = None,
             seed: int | None = None, allow_all_same: bool = False, device: str = "cpu",
             progress: bool = True) -> MoEPlan:
    """Validate a mergekit-moe config against the models' headers and lay out every output tensor
    (routers computed here: the only step that reads more than headers)."""
    if isinstance(config, (str, os.PathLike)):
        config_dir = Path(config).parent
        config = load_moe_config(config)
    else:
        config = parse_moe_config(config)
    check(config, allow_all_same=allow_all_same)
    seed = seed if seed is not None else (config.seed if config.seed is not None else 0)
    inputs = _Inputs(Path(config_dir) if config_dir is not None else None)
    try:
        return _plan(config, inputs, seed, device, progress)
    except BaseException:
        inputs.close()
        raise


def _plan(config: MoEConfig, inputs: _Inputs, seed: int, device: str, progress: bool) -> MoEPlan:
    b = inputs.open(config.base_model, "base_model")
    experts = [inputs.open(e.source_model, f"experts[{i}].source_model") for i, e in enumerate(config.experts)]
    shared_cfg = (config.shared_experts or [None])[0]
    shared = inputs.open(shared_cfg.source_model, "shared_experts[0].source_model") if shared_cfg else None
    cks = inputs.checkpoints
    configs = [ck.config() for ck in cks]
    base, base_config = cks[b], configs[b]
    kind = select_kind(config.architecture, {str(c.get("model_type")) for c in configs}, len(config.shared_experts or []),
                       bool(shared_cfg and shared_cfg.positive_prompts), config.gate_mode not in PROMPT_MODES)
    _check_attention(kind, base_config, base.label)
    base_mlp = _mlp_names(base, base_config)
    n_layers = 1 + max((layer for layer, _ in base_mlp), default=-1)
    if not n_layers or len(base_mlp) != 3 * n_layers:
        raise PlanError(f"base_model '{base.label}': found {len(base_mlp)} MLP projections for {n_layers} layers; "
                        "alloykit moe takes Llama-style MLPs (gate_proj, up_proj, down_proj in every layer)")
    expert_mlp = {i: _mlp_names(cks[i], configs[i]) for i in {*experts, *([shared] if shared is not None else [])}}
    for where, idx in [*((f"experts[{n}]", i) for n, i in enumerate(experts)), *((("shared_experts[0]", shared),) if shared is not None else ())]:
        for key, name in base_mlp.items():
            got = expert_mlp[idx].get(key)
            if got is None:
                raise PlanError(f"moe config: {where} ('{cks[idx].label}') has no {key[1]} projection in layer {key[0]} "
                                f"(the base has '{name}'); the experts must have the base's layers")
            if cks[idx].info(got).shape != base.info(name).shape:
                raise PlanError(f"moe config: {where} ('{cks[idx].label}'): '{got}' is {list(cks[idx].info(got).shape)}, "
                                f"the base's '{name}' is {list(base.info(name).shape)}; experts must have the base's shapes")
    hidden = base.info(base_mlp[0, "down"]).shape[0]
    out_dtype = _out_dtype(config, base_config, base)

    computed = _routers(config, kind, base, base_config, n_layers, hidden, seed, device, progress)
    if kind.attention_biases:  # Qwen MoE's attention always has q/k/v biases: zeros where the base has none
        for layer in range(n_layers):
            for proj in kind.attention_biases:
                name = f"model.layers.{layer}.self_attn.{proj}.bias"
                if name not in base.tensors:
                    rows = base.info(f"model.layers.{layer}.self_attn.{proj}.weight").shape[0]
                    computed[name] = torch.zeros(rows)
    c = len(cks)
    all_cks = [*cks, StateDictCheckpoint(computed, COMPUTED)]
    labels = [*inputs.labels, COMPUTED]

    def dtype_of(info_dtype: torch.dtype) -> torch.dtype:
        return out_dtype if info_dtype.is_floating_point else info_dtype

    jobs: list[TensorJob] = []

    def add(name: str, model: int, tensor: str, change: Perturb | None = None) -> None:
        info = all_cks[model].info(tensor)
        copy = change is None or (change.noise_scale == 0 and change.scale == 1.0)
        jobs.append(TensorJob(name, tuple(info.shape), dtype_of(info.dtype), [Source(model, tensor)], None,
                              params=None if copy else change, copy=copy, role=role_of(name)))

    def changes(e: Expert, proj: str) -> Perturb | None:
        scale = e.residual_scale if proj == "down" and e.residual_scale is not None else 1.0
        return Perturb(float(e.noise_scale or 0.0), float(scale))

    def mixture(layer: int) -> None:
        add(kind.router_name(layer), c, kind.router_name(layer))
        if shared is not None and kind.shared_gate_name is not None:
            add(kind.shared_gate_name(layer), c, kind.shared_gate_name(layer))
        for e, idx in enumerate(experts):
            for proj in PROJECTIONS:
                add(kind.expert_name(layer, e, proj), idx, expert_mlp[idx][layer, proj], changes(config.experts[e], proj))
        if shared is not None:
            for proj in PROJECTIONS:
                add(kind.shared_name(layer, proj), shared, expert_mlp[shared][layer, proj], changes(shared_cfg, proj))
        for bias in [n for n in computed if n.startswith(f"model.layers.{layer}.self_attn.")]:
            add(bias, c, bias)

    # the base's tensors in order (embeddings, each layer, then the head), each layer's mixture after its own
    mlp_names = set(base_mlp.values())
    rest = sorted((n for n in base.tensors if n not in mlp_names), key=lambda n: _order(n, base_config))
    layer_of = {n: role_of(n, base_config).layer for n in rest}
    for name in [n for n in rest if layer_of[n] is None and role_of(n, base_config).section == "pre"]:
        add(name, b, name)
    for layer in range(n_layers):
        for name in [n for n in rest if layer_of[n] == layer]:
            add(name, b, name)
        mixture(layer)
    for name in [n for n in rest if (layer_of[n] is None and role_of(n, base_config).section != "pre")
                 or (layer_of[n] is not None and layer_of[n] >= n_layers)]:
        add(name, b, name)
    plan = Plan(recipe=config, method=EXPERT_METHOD, checkpoints=all_cks, labels=labels, jobs=jobs, seed=seed,
                config_source=b, tokenizer_source=b)
    return MoEPlan(config, kind, plan, base, base_config, out_dtype, n_layers, hidden, experts, shared)


def _order(name: str, config: dict) -> tuple:
    role = role_of(name, config)
    section = {"pre": 0, "layer": 1, "unknown": 1, "post": 2}[role.section]
    return section, role.layer if role.layer is not None else -1, name


def _check_attention(kind: OutputKind, base_config: dict, label: str) -> None:
    if base_config.get("mlp_bias"):
        raise PlanError(f"base_model '{label}': its MLPs have biases (mlp_bias), which {kind.name} experts cannot hold")
    if kind.name == "Mixtral" and base_config.get("attention_bias"):
        raise PlanError(f"base_model '{label}': its attention has biases (attention_bias), which Mixtral cannot hold; "
                        "use architecture: qwen")
    if kind is QWEN2_MOE and base_config.get("attention_bias"):
        raise PlanError(f"base_model '{label}': its attention output has a bias (attention_bias), which Qwen MoE cannot hold")


def _routers(config: MoEConfig, kind: OutputKind, base: Checkpoint, base_config: dict, n_layers: int, hidden: int,
             seed: int, device: str, progress: bool) -> dict[str, torch.Tensor]:
    """Router tensor name -> float32 rows ([E, H]; Qwen MoE's shared-expert gate [1, H])."""
    shared = (config.shared_experts or [None])[0]
    out: dict[str, torch.Tensor] = {}
    n = len(config.experts)
    if config.gate_mode in PROMPT_MODES:
        need = list(config.experts) + ([shared] if shared is not None and shared.positive_prompts else [])
        embed = None
        if config.gate_mode == "cheap_embed":
            name = next((t for t in base.tensors if role_of(t, base_config).kind is Kind.EMBEDDING), None)
            if name is None:
                raise PlanError(f"base_model '{base.label}': no token embedding found for gate_mode cheap_embed")
            embed = base.read(name)
        rows = gate_rows.prompt_gates(config.gate_mode, base.folder, embed, need, n_layers, device, progress)
        for layer in range(n_layers):
            out[kind.router_name(layer)] = rows[layer, :n].contiguous()
            if kind.shared_gate_name is not None and shared is not None:
                out[kind.shared_gate_name(layer)] = rows[layer, n:].contiguous()
        return out
    for layer in range(n_layers):
        name = kind.router_name(layer)
        out[name] = gate_rows.random_rows(config.gate_mode, n, hidden, seed, name)
        if kind.shared_gate_name is not None and shared is not None:
            name = kind.shared_gate_name(layer)
            out[name] = gate_rows.random_rows(config.gate_mode, 1, hidden, seed, name)
    return out


def build_moe(config: MoEConfig | dict | str | os.PathLike, out_dir: str | os.PathLike, *,
              config_dir: str | os.PathLike | None = None, seed: int | None = None, device: str = "cpu",
              threads: int | None = None, max_shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
              copy_tokenizer: bool = True, allow_all_same: bool = False, progress: bool = True) -> Path:
    """Build the mixture of experts a mergekit-moe config describes into ``out_dir`` (a model folder
    that ``transformers.AutoModelForCausalLM`` loads). ``out_dir`` is either absent or whole."""
    source_text = Path(config).read_text(encoding="utf-8") if isinstance(config, (str, os.PathLike)) else None
    if max_shard_size <= 0:
        raise OutputError(f"--max-shard-size {max_shard_size}: must be a positive number of bytes")
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError(f"output folder '{out}' exists and is not empty; choose another folder or pass --overwrite")
    t0 = time.monotonic()
    mp = plan_moe(config, config_dir=config_dir, seed=seed, allow_all_same=allow_all_same, device=device, progress=progress)
    try:
        plan = mp.plan
        shards = plan_shards([(j.name, j.out_dtype, j.shape) for j in plan.jobs], max_shard_size)

        def write(folder: Path) -> None:
            writer = ShardedWriter(folder, shards, {j.name: j.out_dtype for j in plan.jobs},
                                   {j.name: j.shape for j in plan.jobs})
            writer.open()
            try:
                run_jobs(plan, writer.write, device=device, threads=threads or default_threads(), progress=progress)
            finally:
                writer.close()
            writer.write_index()
            _write_metadata(mp, folder, copy_tokenizer, source_text, time.monotonic() - t0)

        return publish(out, write, overwrite=overwrite, space=plan.out_bytes)
    finally:
        mp.close()


def _write_metadata(mp: MoEPlan, folder: Path, copy_tokenizer: bool, source_text: str | None, seconds: float) -> None:
    from alloykit.eval.loading import quiet_transformers, transformers_module

    tf = transformers_module()
    cfg_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(mp.out_dtype, "float32")
    with quiet_transformers():
        base_cfg = tf.AutoConfig.from_pretrained(str(mp.base.folder))
        cfg = output_config(mp.kind, base_cfg, len(mp.config.experts), mp.config.experts_per_token, cfg_name)
        cfg.save_pretrained(str(folder))
    src = mp.base.folder
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", folder / "generation_config.json")
    if copy_tokenizer:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
    config = mp.config.model_copy(update={"seed": mp.plan.seed})
    (folder / "alloykit_recipe.yaml").write_text(config.to_yaml(), encoding="utf-8")
    # mergekit-moe keeps the config as given under this name: a folder either tool made says how
    (folder / "mergekit_moe_config.yml").write_text(source_text if source_text is not None else config.to_yaml(), encoding="utf-8")
    plan = mp.plan
    manifest: dict[str, Any] = {
        "alloykit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": "moe",
        "output_kind": mp.kind.name,
        "architecture": cfg.architectures[0],
        "gate_mode": mp.config.gate_mode,
        "seed": plan.seed,
        "experts": len(mp.config.experts),
        "shared_experts": len(mp.config.shared_experts or []),
        "inputs": [{"ref": label, "path": str(ck.path), "tensors": len(ck.tensors), "bytes": ck.total_bytes}
                   for label, ck in zip(plan.labels, plan.checkpoints) if label != COMPUTED],
        "output": {"tensors": len(plan.jobs), "bytes": plan.out_bytes, "dtype": cfg_name,
                   "layout": "one tensor per expert (the layout transformers' save_pretrained writes)"},
        "seconds": round(seconds, 2),
    }
    (folder / "alloykit_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(_card(mp, config.to_yaml(), cfg.architectures[0]), encoding="utf-8")


def _card(mp: MoEPlan, config_yaml: str, architecture: str) -> str:
    c = mp.config
    lines = ["---", "library_name: transformers", "tags: [moe, merge, alloykit]", "---",
             f"# {len(c.experts)}-expert mixture ({mp.kind.name})", "",
             f"Built with [alloykit](https://pypi.org/project/alloykit/) {__version__} (`alloykit moe`, mergekit-moe's "
             f"configuration): attention, embeddings and norms from the base model, each layer's MLP replaced by "
             f"{len(c.experts)} experts ({c.experts_per_token} per token) routed by `gate_mode: {c.gate_mode}`. "
             f"Load it with `transformers.AutoModelForCausalLM` ({architecture}).", "",
             f"Base: `{c.base_model}`", "", "## Experts", ""]
    lines += [f"- `{e.source_model}`" + (f": {len(e.positive_prompts)} positive prompt(s)" if e.positive_prompts else "")
              for e in c.experts]
    if c.shared_experts:
        lines += ["", f"Shared expert (every token): `{c.shared_experts[0].source_model}`"]
    lines += ["", f"Seed: {mp.plan.seed}. Torch {torch.__version__}.", "", "## Configuration", "", "```yaml",
              config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)

