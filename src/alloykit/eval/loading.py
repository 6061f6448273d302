"""Model folders as the data commands read them: which family, loaded how, tokenized how.

Three families, told apart by ``config.json``'s ``architectures`` (``--model-class``
overrides it):

* ``causal-lm`` (``*ForCausalLM``): scored on the next tokens of a text;
* ``sequence-classification`` (``*ForSequenceClassification``): its own head (or another
  folder's, see :mod:`alloykit.eval.heads`) gives class logits;
* ``encoder`` (anything else: ``BertModel``, a sentence-transformers folder, the quality
  benchmark's fine-tune folders holding ``encoder/`` and ``heads.safetensors``): pooled
  hidden states (mean or CLS) go into a linear head given separately.

Models load offline with transformers, in float32, from safetensors only, never with
remote code. Statistics and searched recipes are keyed by the *checkpoint's* tensor
names (what ``alloykit merge`` reads), which may differ from the module's parameter
names by the backbone prefix (a ``BertForMaskedLM`` folder loaded as an encoder has
``bert.encoder...`` tensors and ``encoder...`` parameters): :attr:`LoadedModel.names`
maps one to the other.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alloykit.errors import AlloyError, CheckpointError, did_you_mean
from alloykit.eval.model import base_model_path
from alloykit.io.checkpoint import Checkpoint
from alloykit.vocab.files import has_tokenizer

FAMILIES = ("encoder", "sequence-classification", "causal-lm")
POOLINGS = ("mean", "cls")


class ModelFolderError(AlloyError):
    """A model folder is missing, or is not what the command needs."""


@dataclass
class ModelFolder:
    """A model as given on the command line, resolved to the folder its weights are in."""

    given: str  # as the user wrote it
    path: Path  # config.json + safetensors (a benchmark fine-tune's encoder/)
    family: str
    config: dict = field(repr=False)
    heads_file: Path | None = None  # heads.safetensors in or beside the folder (the benchmark's layout)

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    def sentence_pooling(self) -> str | None:
        """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``), if any."""
        for folder in (self.path, Path(self.given)):
            cfg = folder / "1_Pooling" / "config.json"
            if cfg.is_file():
                try:
                    modes = json.loads(cfg.read_text())
                except (OSError, ValueError):
                    return None
                return "cls" if modes.get("pooling_mode_cls_token") else "mean" if modes.get("pooling_mode_mean_tokens") else None
        return None


def infer_family(config: dict) -> str | None:
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "encoder" if archs else None


def model_folder(path: str | os.PathLike, family: str | None = None, *, what: str = "model") -> ModelFolder:
    """Resolve ``path`` (a model folder, or a benchmark fine-tune folder holding ``encoder/``) and its family."""
    p = Path(path)
    if not p.exists():
        raise ModelFolderError(f"{what} '{path}': no such file or folder; give a local model folder (alloykit reads no Hub names here)")
    if not p.is_dir():
        raise ModelFolderError(f"{what} '{path}' is a file, not a folder; give the model's folder (config.json and safetensors)")
    weights = p / "encoder" if (p / "encoder" / "config.json").is_file() else p
    try:
        config = json.loads((weights / "config.json").read_text())
    except FileNotFoundError:
        raise ModelFolderError(f"{what} '{path}' has no config.json; give a Hugging Face model folder "
                               "(as written by save_pretrained)") from None
    except (OSError, ValueError) as err:
        raise ModelFolderError(f"{what} '{path}': config.json cannot be read ({err})") from None
    if family is not None and family not in FAMILIES:
        raise ModelFolderError(f"--model-class {family}: choose one of {', '.join(FAMILIES)}{did_you_mean(family, FAMILIES)}")
    found = family or infer_family(config)
    if found is None:
        raise ModelFolderError(f"{what} '{path}': config.json names no architecture; pass --model-class "
                               f"{'|'.join(FAMILIES)}")
    heads = next((h for h in (p / "heads.safetensors", weights / "heads.safetensors", p.parent / "heads.safetensors")
                  if h.is_file()), None)
    return ModelFolder(str(path), weights, found, config, heads)


def transformers_module():
    """transformers, an optional dependency (the ``hf`` extra): imported on first use, offline, so that
    the core imports without it and a missing install is one line naming the command."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise AlloyError("reading models needs transformers: pip install 'alloykit[hf]'") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers():
    """No loading bars or load reports from transformers between alloykit's own lines."""
    logging = transformers_module().utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _auto_class(family: str):
    transformers = transformers_module()
    return {"encoder": transformers.AutoModel, "sequence-classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM}[family]


def checkpoint_names(module: torch.nn.Module, tensors, prefix: str) -> dict[str, str]:
    """Module parameter/buffer name -> the checkpoint's name for it (same, or differing by ``prefix.``)."""
    out = {}
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        for cand in (name, f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if cand in tensors:
                out[name] = cand
                break
    return out


@dataclass
class LoadedModel:
    folder: ModelFolder
    module: torch.nn.Module  # float32, eval mode
    names: dict[str, str]  # module name -> checkpoint tensor name
    missing: list[str] = field(default_factory=list)  # module tensors the checkpoint lacks (an encoder's pooler)

    @property
    def family(self) -> str:
        return self.folder.family

    @property
    def prefix(self) -> str:
        return getattr(self.module, "base_model_prefix", "") or ""


def load_model(folder: ModelFolder) -> LoadedModel:
    """The folder's model in float32 (eval mode), checked against its checkpoint's tensors."""
    cls = _auto_class(folder.family)
    try:
        ck = Checkpoint(folder.path, label=folder.given)
        tensors = set(ck.tensors)
        ck.close()
    except CheckpointError as err:
        raise ModelFolderError(f"model '{folder.given}': no safetensors weights ({err}); alloykit reads .safetensors") from None
    with quiet_transformers():
        try:
            module, info = cls.from_pretrained(str(folder.path), dtype=torch.float32, use_safetensors=True,
                                               output_loading_info=True)
        except (OSError, ValueError, KeyError) as err:
            raise ModelFolderError(f"model '{folder.given}' does not load as {folder.family} "
                                   f"({str(err).splitlines()[0][:200]}); pass --model-class {'|'.join(FAMILIES)}") from None
    module.eval()
    missing = sorted(info.get("missing_keys") or [])
    unused = folder.family == "encoder" and all(".pooler." in f".{k}" for k in missing)  # pooling reads no pooler
    if missing and not unused:
        what = ("has no classification head" if folder.family == "sequence-classification" and folder.architecture
                and not folder.architecture.endswith("ForSequenceClassification") else "lacks tensors")
        raise ModelFolderError(
            f"model '{folder.given}' ({folder.architecture}) {what} for {type(module).__name__}: '{missing[0]}' is not in "
            f"its checkpoint; pass --model-class encoder with a head (--head, or 'head:' in the task file), "
            "or give the fine-tuned sequence-classification folder")
    names = checkpoint_names(module, tensors, getattr(module, "base_model_prefix", ""))
    return LoadedModel(folder, module, names, missing)


# -- tokenizers ---------------------------------------------------------------------------
@dataclass
class TextTokenizer:
    """Texts -> token id lists: a Hugging Face tokenizer, or UTF-8 bytes (mod the vocabulary) for
    folders without one (alloykit's Llama-shaped test fixtures)."""

    tokenizer: object | None
    vocab: int
    describe: str
    pad_id: int = 0

    def encode(self, text: str, max_len: int) -> list[int]:
        if self.tokenizer is None:
            return [b % self.vocab for b in text.encode("utf-8")][:max_len]
        return self.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]


def load_tokenizer(model: LoadedModel, *also: Path) -> TextTokenizer:
    """The tokenizer in the model's folder (or in ``also``, e.g. a head's folder); without one, the
    quality benchmark's MiniLM tokenizer for a BERT of its vocabulary (the benchmark's fine-tune
    folders hold none), else UTF-8 bytes (mod the vocabulary: alloykit's Llama-shaped test fixtures)."""
    cfg = model.module.config
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    pad = getattr(cfg, "pad_token_id", None)
    auto = transformers_module().AutoTokenizer
    for folder in (model.folder.path, Path(model.folder.given), *also):
        if has_tokenizer(folder):
            with quiet_transformers():
                tok = auto.from_pretrained(str(folder))
            pad = pad if pad is not None else tok.pad_token_id
            return TextTokenizer(tok, vocab, f"tokenizer of {folder}", int(pad or 0))
    if getattr(cfg, "model_type", None) == "bert":
        try:
            with quiet_transformers():
                tok = auto.from_pretrained(str(base_model_path()))
        except (AlloyError, OSError):
            tok = None
        if tok is not None and len(tok) == vocab:
            return TextTokenizer(tok, vocab, "the quality benchmark's MiniLM tokenizer: none in the folder", int(pad or 0))
    return TextTokenizer(None, vocab, f"UTF-8 bytes mod {vocab}: no tokenizer in the folder", int(pad or 0))
