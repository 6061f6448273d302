"""Writing a model as one GGUF file (llama.cpp's format), tensor by tensor.

Types written (``WRITE_TYPES``): ``f32``, ``f16``, ``bf16`` and the block quantizations the
``gguf`` library can compute: ``q8_0``, ``q5_1``, ``q5_0``, ``q4_1``, ``q4_0`` (the K-quants
and i-quants need llama.cpp's ``llama-quantize``: write f16 or q8_0 and requantize with it).
As llama.cpp's converter does, 1-D tensors (norms, biases) stay F32, and a 2-D tensor whose
rows are not a multiple of the block size (32) is written F16 instead of a quantized type.

The source is a Hugging Face folder (safetensors + config.json + tokenizer files) or a GGUF
checkpoint. Names and layout are the reverse of :mod:`alloykit.io.gguf`'s: HF names to
llama.cpp's, Llama's q/k rows permuted the way llama.cpp's converter permutes them, tied
embeddings written once (``token_embd``; no ``output.weight``). The metadata comes from
config.json (:data:`CONFIG_KEYS`); the tokenizer's from a GGUF tokenizer source (copied
field by field) or from a byte-level BPE ``tokenizer.json`` (tokens, types, merges, special
ids, chat template). Tensors are written one at a time after the header (memory: one
tensor), into a temporary file renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from alloykit.errors import CheckpointError, OutputError
from alloykit.io.checkpoint import Checkpoint
from alloykit.io.gguf import ARCHITECTURES, GGUFCheckpoint, find_gguf, gguf_name, permute_qk, require_gguf

log = logging.getLogger(__name__)

WRITE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
#: Hugging Face model_type -> GGUF architecture (llama.cpp writes Mistral as llama)
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
#: GGUF key (after '<arch>.') -> config.json key
CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


def _file_type(gguf, qtype: str) -> int:
    ft = gguf.LlamaFileType
    return {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
            "q5_1": ft.MOSTLY_Q5_1, "q5_0": ft.MOSTLY_Q5_0, "q4_1": ft.MOSTLY_Q4_1, "q4_0": ft.MOSTLY_Q4_0}[qtype]


def check_type(qtype: str) -> str:
    if qtype.lower() not in WRITE_TYPES:
        raise OutputError(f"GGUF type '{qtype}' cannot be written; choose one of {', '.join(WRITE_TYPES)}")
    return qtype.lower()


def folder_to_gguf(folder: Path, qtype: str, *, tokenizer_from=None) -> Path:
    """Replace a model folder's safetensors weights by one GGUF file ``model.TYPE.gguf`` (the
    config and tokenizer files stay). ``tokenizer_from``: the merge's tokenizer source; its
    fields are copied when it is a GGUF file."""
    out = folder / f"model.{qtype.upper()}.gguf"
    write_gguf(folder, out, qtype, tokenizer_from=tokenizer_from if isinstance(tokenizer_from, GGUFCheckpoint) else None)
    for f in list(folder.glob("model*.safetensors")) + [folder / "model.safetensors.index.json"]:
        if f.exists():
            f.unlink()
    return out


def open_source(path: Path):
    """A GGUF file or a Hugging Face folder, opened for reading."""
    f = find_gguf(path)
    return GGUFCheckpoint(f) if f is not None else Checkpoint(path)


def write_gguf(source: str | Path, out_file: str | Path, qtype: str = "f16", *, tokenizer_from=None,
               name: str | None = None) -> Path:
    """Write ``source`` (a model folder or .gguf) as the GGUF file ``out_file`` with tensors of
    ``qtype``. ``tokenizer_from``: a GGUFCheckpoint whose tokenizer fields are copied (default:
    the source's own, if it is a GGUF; else its tokenizer.json)."""
    gguf = require_gguf()
    qtype = check_type(qtype)
    ck = open_source(Path(source))
    try:
        cfg = ck.config()
        if not cfg:
            raise CheckpointError(f"model '{source}': no config.json; GGUF metadata is built from it")
        arch = MODEL_TYPES.get(cfg.get("model_type", ""))
        if arch is None:
            raise CheckpointError(f"model '{source}': model_type '{cfg.get('model_type')}' cannot be written as GGUF by "
                                  f"alloykit (supported: {', '.join(MODEL_TYPES)})")
        _check_rope(cfg, source)
        tensors = _tensor_plan(ck, cfg, arch, qtype, gguf, source)
        out = Path(out_file).absolute()
        tmp = out.parent / f".{out.name}.alloykit-tmp"
        try:
            w = gguf.GGUFWriter(str(tmp), arch)
            _config_fields(w, cfg, arch, qtype, gguf, name or out.stem)
            tok_src = tokenizer_from if tokenizer_from is not None else (ck if isinstance(ck, GGUFCheckpoint) else None)
            if tok_src is not None:
                _copy_tokenizer(w, tok_src)
            else:
                _bpe_tokenizer(w, Path(source), cfg, gguf)
            for hf, gname, ggml_type, shape, nbytes in tensors:
                w.add_tensor_info(gname, shape, np.dtype(np.uint8), nbytes, raw_dtype=ggml_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for hf, gname, ggml_type, shape, nbytes in tensors:
                data = _encode(ck.read(hf), hf, ggml_type, cfg, arch, gguf)
                if data.nbytes != nbytes:
                    raise AssertionError(f"{hf}: planned {nbytes} bytes, encoded {data.nbytes}")
                w.write_tensor_data(data)
            w.flush()
            for fh in w.fout or []:
                os.fsync(fh.fileno())
            w.close()
            os.replace(tmp, out)
        except OSError as err:
            raise OutputError(f"cannot write '{out}': {err.strerror or err}") from None
        finally:
            if tmp.exists():
                tmp.unlink()
    finally:
        ck.close()
    return out


def _check_rope(cfg: dict, source) -> None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"model '{source}': rope scaling '{kind}' is not written to GGUF by alloykit; "
                              "convert this model with llama.cpp's convert_hf_to_gguf.py")


def _tensor_plan(ck, cfg: dict, arch: str, qtype: str, gguf, source) -> list[tuple]:
    """(HF name, GGUF name, GGML type, numpy byte shape, bytes) per tensor, in file order."""
    q = gguf.GGMLQuantizationType
    want = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q5_1": q.Q5_1, "q5_0": q.Q5_0,
            "q4_1": q.Q4_1, "q4_0": q.Q4_0}[qtype]
    tied = bool(cfg.get("tie_word_embeddings", arch == "llama" and "lm_head.weight" not in ck.tensors))
    if not tied and "lm_head.weight" not in ck.tensors:
        raise CheckpointError(f"model '{source}': no lm_head.weight and tie_word_embeddings is false")
    plan = []
    for hf, info in ck.tensors.items():
        if hf == "lm_head.weight" and tied:
            continue  # llama.cpp reads tied embeddings from token_embd
        gname = gguf_name(hf)
        if gname is None:
            raise CheckpointError(f"model '{source}': tensor '{hf}' has no GGUF name known to alloykit (architecture {arch})")
        if not info.is_float:
            raise CheckpointError(f"model '{source}': tensor '{hf}' is {info.dtype}; GGUF output takes float tensors")
        shape = tuple(info.shape)
        t = want
        if len(shape) < 2:
            t = q.F32
        elif t not in (q.F32, q.F16, q.BF16) and shape[-1] % gguf.GGML_QUANT_SIZES[t][0] != 0:
            log.info("%s: rows of %d are not a multiple of %s's block; written F16", hf, shape[-1], t.name)
            t = q.F16
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, t)
        plan.append((hf, gname, t, byte_shape, int(np.prod(byte_shape))))
    return plan


def _encode(t: torch.Tensor, hf: str, ggml_type, cfg: dict, arch: str, gguf) -> np.ndarray:
    if ARCHITECTURES[arch][1]:
        heads = cfg["num_attention_heads"]
        if ".self_attn.q_proj." in hf:
            t = permute_qk(t, heads)
        elif ".self_attn.k_proj." in hf:
            t = permute_qk(t, cfg.get("num_key_value_heads") or heads)
    arr = t.detach().to(torch.float32).contiguous().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return arr.view(np.uint8)
    return np.ascontiguousarray(gguf.quants.quantize(arr, ggml_type)).view(np.uint8)


def _config_fields(w, cfg: dict, arch: str, qtype: str, gguf, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(_file_type(gguf, qtype)))
    if qtype not in ("f32", "f16", "bf16"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vt = gguf.GGUFValueType
    for key, cfg_key in CONFIG_KEYS.items():
        value = cfg.get(cfg_key)
        if cfg_key == "num_key_value_heads" and value is None:
            value = cfg.get("num_attention_heads")
        if value is None:
            continue
        kind = vt.FLOAT32 if isinstance(value, float) else vt.UINT32
        w.add_key_value(f"{arch}.{key}", value, kind)
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        w.add_key_value(f"{arch}.rope.freq_base", float(theta), vt.FLOAT32)
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    if head_dim:
        w.add_key_value(f"{arch}.rope.dimension_count", int(head_dim), vt.UINT32)
        if heads and head_dim * heads != cfg.get("hidden_size"):
            w.add_key_value(f"{arch}.attention.key_length", int(head_dim), vt.UINT32)
            w.add_key_value(f"{arch}.attention.value_length", int(head_dim), vt.UINT32)


def _copy_tokenizer(w, src: GGUFCheckpoint) -> None:
    vt = require_gguf().GGUFValueType
    for key, field in src.raw_fields().items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[-1] if main == vt.ARRAY else None
            w.add_key_value(key, field.contents(), main, sub_type=sub)


def _bpe_tokenizer(w, folder: Path, cfg: dict, gguf) -> None:
    """tokenizer.ggml.* from a byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen, SmolLM style)."""
    folder = folder if folder.is_dir() else folder.parent
    path = folder / "tokenizer.json"
    if not path.is_file():
        log.warning("%s has no tokenizer.json: the GGUF file is written without a tokenizer", folder)
        return
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(f"model '{folder}': tokenizer.json is not valid JSON") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("pre_tokenizer") or tj.get("decoder")):
        raise CheckpointError(
            f"model '{folder}': its tokenizer ({model.get('type')}) is not byte-level BPE, which is what alloykit writes to "
            "GGUF; merge with a GGUF file as tokenizer source, or convert with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tj.get("added_tokens") or []}
    for a in added.values():
        vocab[a["content"]] = a["id"]
    size = max(int(cfg.get("vocab_size") or 0), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        a = added.get(tok)
        types[i] = gguf.TokenType.NORMAL if a is None else (gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")  # llama.cpp's named pre-tokenizers are chosen by its converter's hash table
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    if merges:
        w.add_token_merges(merges)
    tcfg = {}
    if (folder / "tokenizer_config.json").is_file():
        tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    setters = {"bos_token": w.add_bos_token_id, "eos_token": w.add_eos_token_id, "unk_token": w.add_unk_token_id,
               "pad_token": w.add_pad_token_id}
    for key, setter in setters.items():
        tok = tcfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if tok in vocab:
            setter(vocab[tok])
    for key, setter in (("add_bos_token", w.add_add_bos_token), ("add_eos_token", w.add_add_eos_token)):
        if isinstance(tcfg.get(key), bool):
            setter(tcfg[key])
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        w.add_chat_template(template)
