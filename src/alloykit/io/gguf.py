"""GGUF checkpoints (llama.cpp's format) as merge inputs, dequantized tensor by tensor.

A ``.gguf`` file (or a folder holding exactly one, and no safetensors) is a model like
any other in a recipe. The file is memory-mapped by the ``gguf`` library's reader; the
index is built from its header alone (names, shapes, types); each tensor is dequantized
only when the merge reads it (``gguf.quants.dequantize``), into the Hugging Face name
and layout:

- names: llama.cpp's ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight``
  (:data:`HF_NAMES`); a file without ``output.weight`` has tied embeddings (no
  ``lm_head.weight``, ``tie_word_embeddings: true``), as a Hugging Face folder saves them;
- shapes: GGUF lists dimensions fastest-first (ne[0] is the row length); they are reversed;
- Llama's attention: llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k``
  within each head (it interleaves the two rotary halves, see :func:`permute_qk`); the
  reader undoes it, so the tensors equal transformers' own GGUF loading;
- dtypes: F32, F16, BF16 and F64 tensors keep their dtype (no rounding); quantized tensors
  (Q4_0, Q4_1, Q5_*, Q8_0, K-quants, ...) come out as float32.

``config()`` and ``tokenizer_folder()`` build config.json and the tokenizer files from
the file's metadata through transformers' GGUF conversion (nothing is downloaded), so
a merge whose base is a GGUF writes a complete Hugging Face folder. The conversion parses
every token of the file (seconds for a 49k vocabulary), so its result is kept under
``$ALLOYKIT_CACHE`` (default ``~/.cache/alloykit``) keyed by the file's path, size and
modification time; ``ALLOYKIT_CACHE=off`` converts every time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from alloykit.errors import AlloyError, CheckpointError
from alloykit.io.checkpoint import TensorIndex
from alloykit.io.safetensors_format import TensorInfo

log = logging.getLogger(__name__)

INSTALL = "pip install 'alloykit[gguf]'"

#: llama.cpp tensor name (without the ``blk.N.`` prefix) -> Hugging Face name (without
#: ``model.layers.N.``), for the architectures below; Qwen2 adds biases, Qwen3 q/k norms
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
#: tensors llama.cpp derives from the config (Llama 3's rope scaling); transformers skips them too
_DERIVED = ("rope_freqs.weight",)

#: GGUF architecture -> (Hugging Face class, whether attn_q/attn_k rows are permuted)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def require_gguf():
    """The ``gguf`` module, or one line saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise AlloyError(f"GGUF files need the 'gguf' library: {INSTALL}") from None
    return gguf


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if unknown)."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        part = _BLOCK_NAMES.get(m[2])
        return f"model.layers.{m[1]}.{part}.{m[3]}" if part else None
    stem, _, suffix = gguf_name.rpartition(".")
    part = _GLOBAL_NAMES.get(stem)
    return f"{part}.{suffix}" if part and suffix in ("weight", "bias") else None


def gguf_name(hf: str) -> str | None:
    """The inverse of :func:`hf_name`."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf)
    if m:
        inv = {v: k for k, v in _BLOCK_NAMES.items()}
        part = inv.get(m[2])
        return f"blk.{m[1]}.{part}.{m[3]}" if part else None
    stem, _, suffix = hf.rpartition(".")
    inv = {v: k for k, v in _GLOBAL_NAMES.items()}
    return f"{inv[stem]}.{suffix}" if stem in inv else None


def permute_qk(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's row permutation of a Llama q/k projection (``n_head`` = its heads; the
    key projection's kv heads). Each head's rows [r0..r(d/2-1) | r(d/2)..r(d-1)] (the two
    rotary halves, Hugging Face's layout) become interleaved pairs (GGUF's); ``inverse``
    undoes it. Works on weights [out, in] and biases [out]."""
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    if inverse:  # GGUF -> HF: rows (head, pair, 2) -> (head, 2, pair)
        return w.reshape(n_head, half, 2, *rest).transpose(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, half, *rest).transpose(1, 2).reshape(w.shape)


def find_gguf(path: Path, label: str | None = None) -> Path | None:
    """The GGUF file a model reference names: the file itself, or the only ``*.gguf`` of a
    folder without safetensors weights; None when it is not a GGUF model."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:4])
        raise CheckpointError(f"model '{label or path}': the folder holds {len(files)} GGUF files ({names}); name one file")
    return files[0] if files else None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:  # a malformed field reads as missing
        return default


def dequantizable(qtype) -> bool:
    """Whether the installed gguf library can dequantize this tensor type (tried on one block)."""
    gguf = require_gguf()
    if qtype.name in _FLOAT_TYPES:
        return True
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


class GGUFCheckpoint(TensorIndex):
    """A GGUF file presented with Hugging Face tensor names; tensors dequantized on read."""

    def __init__(self, path: str | Path, label: str | None = None):
        gguf = require_gguf()
        self.path = Path(path)
        self.label = label or str(path)
        self.allow_pickle = False
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError, KeyError) as err:
            raise CheckpointError(f"model '{self.label}': '{self.path.name}' is not a readable GGUF file ({err})") from None
        r = self._reader
        self.architecture = str(_field(r, "general.architecture", ""))
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"model '{self.label}': GGUF architecture '{self.architecture}' is not supported (alloykit reads "
                f"{', '.join(ARCHITECTURES)}); convert it with transformers' GGUF loader and save_pretrained"
            )
        if int(_field(r, "split.count", 1) or 1) > 1:
            raise CheckpointError(
                f"model '{self.label}': '{self.path.name}' is one part of a split GGUF; join the parts with "
                "llama.cpp's 'llama-gguf-split --merge' first"
            )
        self.n_head = int(_field(r, f"{self.architecture}.attention.head_count", 0))
        self.n_head_kv = int(_field(r, f"{self.architecture}.attention.head_count_kv", self.n_head))
        self.tensors: dict[str, TensorInfo] = {}
        self._raw = {}
        self._checked_types: dict = {}
        for t in r.tensors:
            if t.name in _DERIVED:
                continue
            name = hf_name(t.name)
            if name is None:
                raise CheckpointError(
                    f"model '{self.label}': GGUF tensor '{t.name}' has no Hugging Face name known to alloykit "
                    f"(architecture {self.architecture})"
                )
            self._check_type(t)
            dtype = _FLOAT_TYPES.get(t.tensor_type.name, torch.float32)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size() if shape else 0
            self.tensors[name] = TensorInfo(name, str(self.path), dtype, shape, int(t.data_offset), nbytes)
            self._raw[name] = t
        if not self.tensors:
            raise CheckpointError(f"model '{self.label}': '{self.path.name}' holds no tensors")
        self._lock = threading.Lock()
        self._config: dict | None = None
        self._tok_dir: Path | None = None
        self._tok_is_temp = False

    def _check_type(self, t) -> None:
        qtype = t.tensor_type
        if qtype not in self._checked_types:
            self._checked_types[qtype] = dequantizable(qtype)
        if not self._checked_types[qtype]:
            raise CheckpointError(
                f"model '{self.label}': tensor '{t.name}' is stored as {qtype.name}, which the installed gguf library "
                f"cannot dequantize; requantize the file to Q8_0 or F16 with llama.cpp's llama-quantize"
            )

    # -- reading ----------------------------------------------------------------
    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.info(name)
        t = self._raw[name]
        kind = t.tensor_type.name
        try:
            if kind in ("F32", "F16", "F64"):
                tensor = torch.from_numpy(np.array(t.data, copy=True))
            elif kind == "BF16":  # stored as raw bytes: reinterpret, no rounding
                raw = np.array(t.data, copy=True).view(np.int16)
                tensor = torch.from_numpy(raw).view(torch.bfloat16)
            else:
                tensor = torch.from_numpy(require_gguf().quants.dequantize(t.data, t.tensor_type))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"model '{self.label}': tensor '{t.name}' cannot be read: {err}") from None
        tensor = tensor.reshape(info.shape)
        if ARCHITECTURES[self.architecture][1]:
            if ".self_attn.q_proj." in name:
                tensor = permute_qk(tensor, self.n_head, inverse=True)
            elif ".self_attn.k_proj." in name:
                tensor = permute_qk(tensor, self.n_head_kv, inverse=True)
        if out is not None:
            return out.copy_(tensor)
        return tensor.contiguous()

    def close(self) -> None:
        with self._lock:
            if self._tok_dir is not None and self._tok_is_temp:
                shutil.rmtree(self._tok_dir, ignore_errors=True)
            self._tok_dir = None

    # -- metadata ---------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def files(self) -> list[str]:
        return [str(self.path)]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def stored_types(self) -> dict[str, int]:
        """How many tensors the file stores in each GGML type (e.g. {'Q4_1': 210, 'F32': 61})."""
        counts: dict[str, int] = {}
        for t in self._raw.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def metadata(self) -> dict:
        """Every key/value field of the file (tokenizer arrays included), as Python values."""
        return {k: _field(self._reader, k) for k in self._reader.fields}

    def raw_fields(self) -> dict:
        """The gguf library's fields (value and value types), for copying them to another file."""
        return dict(self._reader.fields)

    def config(self) -> dict:
        """The Hugging Face config.json of this model, from the GGUF metadata (transformers' conversion)."""
        with self._lock:
            if self._config is None:
                cached = _cache_dir(self.path)
                if cached is not None and (cached / "config.json").is_file():
                    self._config = json.loads((cached / "config.json").read_text(encoding="utf-8"))
                else:
                    self._config = self._build_config()
                    if cached is not None:
                        _publish(cached, "config.json", lambda tmp: (tmp / "config.json").write_text(json.dumps(self._config)))
            return dict(self._config)

    def _build_config(self) -> dict:
        transformers = _transformers(self.label)
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(self.folder), gguf_file=self.path.name, local_files_only=True)
        except (ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"model '{self.label}': transformers cannot build a config from '{self.path.name}': {err}") from None
        data = cfg.to_diff_dict()  # what save_pretrained writes: the values that differ from the defaults
        data.pop("_model_name_or_path", None)
        data.pop("_name_or_path", None)
        data["architectures"] = [ARCHITECTURES[self.architecture][0]]
        # the file has no output.weight when the embeddings are tied; the config says so
        data["tie_word_embeddings"] = "lm_head.weight" not in self.tensors
        dtypes = {i.dtype for i in self.tensors.values()}
        data["dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtypes.pop(), "float32") if len(dtypes) == 1 else "float32"
        data.pop("torch_dtype", None)
        return data

    def tokenizer_folder(self) -> Path:
        """A folder with the tokenizer files built from the GGUF metadata (cached; else temporary,
        removed by close())."""
        with self._lock:
            if self._tok_dir is None:
                cached = _cache_dir(self.path)
                if cached is not None and (cached / "tokenizer").is_dir():
                    self._tok_dir = cached / "tokenizer"
                    return self._tok_dir
                tmp = Path(tempfile.mkdtemp(prefix="alloykit-gguf-tok-"))
                try:
                    self._save_tokenizer(tmp)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                if cached is not None and _publish(cached, "tokenizer", lambda t: shutil.copytree(tmp, t / "tokenizer")):
                    shutil.rmtree(tmp, ignore_errors=True)
                    self._tok_dir = cached / "tokenizer"
                else:
                    self._tok_dir, self._tok_is_temp = tmp, True
            return self._tok_dir

    def _save_tokenizer(self, folder: Path) -> None:
        transformers = _transformers(self.label)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(self.folder), gguf_file=self.path.name, local_files_only=True)
            tok.save_pretrained(str(folder))
        except (ValueError, KeyError, OSError) as err:
            raise CheckpointError(f"model '{self.label}': transformers cannot build a tokenizer from '{self.path.name}': {err}") from None


def _cache_dir(path: Path) -> Path | None:
    """Where this file's converted config and tokenizer are kept (None: caching is off)."""
    root = os.environ.get("ALLOYKIT_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alloykit")
    if root == "off":
        return None
    st = path.stat()
    try:
        version = importlib.metadata.version("transformers")  # the conversion's author; no import needed
    except importlib.metadata.PackageNotFoundError:
        version = ""
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{version}".encode()).hexdigest()[:24]
    return Path(root) / "gguf-metadata" / key


def _publish(folder: Path, name: str, write) -> bool:
    """Write ``name`` into the cache folder through a temporary sibling and a rename (two processes
    converting the same file at once both succeed; one rename wins). False if the cache is not writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder))
        write(tmp)
        os.replace(tmp / name, folder / name)
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    except OSError:
        log.debug("GGUF metadata cache %s is not writable", folder)
        return (folder / name).exists()


def _transformers(label: str):
    if importlib.util.find_spec("transformers") is None:
        raise AlloyError(f"model '{label}': building config.json and the tokenizer from a GGUF file needs transformers: {INSTALL}")
    import transformers

    return transformers


def open_gguf(path: Path, label: str) -> GGUFCheckpoint | None:
    """The planner's hook: a GGUFCheckpoint when ``path`` names a GGUF model, else None."""
    f = find_gguf(path, label)
    return GGUFCheckpoint(f, label) if f is not None else None
