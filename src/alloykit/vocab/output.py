"""The output folder's tokenizer: the merged vocabulary (or the source's files), its
chat template, and ``vocab_size`` in config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alloykit.vocab.files import tokenizer_files


def update_config(config: dict, vocab) -> None:
    """``vocab_size`` of a config (and of its ``text_config``, where the model nests one) set
    to the output's rows, and the vocabulary's other updates (a transplant's token ids)."""
    size = vocab.size
    if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = size
    if "vocab_size" in config or "text_config" not in config:
        config["vocab_size"] = size
    config.update({k: v for k, v in vocab.config_updates.items() if k != "vocab_size"})


def write_tokenizer(out: Path, *, vocab=None, source_folder: Path | None = None, copy: bool = True,
                    chat_template: str | None = None) -> None:
    """Write the output's tokenizer files into ``out``.

    ``vocab`` (a VocabPlan): the merged vocabulary, saved by transformers (or its source
    folder's files copied, when it is that tokenizer unchanged). Otherwise, with ``copy``,
    ``source_folder``'s tokenizer files are copied. ``chat_template``: Jinja text set on
    whatever tokenizer was written.
    """
    if vocab is not None and vocab.copy_from is None:
        vocab.tokenizer.save_pretrained(str(out))
    else:
        folder = vocab.copy_from if vocab is not None else (source_folder if copy else None)
        if folder is not None:
            for f in tokenizer_files(folder):
                shutil.copyfile(f, out / f.name)
    if chat_template is not None:
        set_chat_template(out, chat_template)
    gen = out / "generation_config.json"
    if vocab is not None and vocab.config_updates and gen.is_file():  # the new tokenizer's special ids
        data = json.loads(gen.read_text(encoding="utf-8"))
        data.update({k: v for k, v in vocab.config_updates.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        gen.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def set_chat_template(out: Path, template: str) -> None:
    """Store ``template`` where every transformers version reads it: ``chat_template.jinja``
    (read first by recent versions) and ``tokenizer_config.json``'s ``chat_template``."""
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    stale = out / "chat_template.json"
    if stale.is_file():
        stale.unlink()
    cfg = out / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        data["chat_template"] = template
        cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
