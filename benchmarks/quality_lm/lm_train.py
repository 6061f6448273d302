"""Fine-tuning a causal LM on prompt -> target rows: full (embeddings frozen) or LoRA.

The loss covers the target's tokens only (the prompt is context), split the way
lm-evaluation-harness splits a request: the prompt's tokens, then the rest of the
tokens of prompt + target. Forward and backward run under bfloat16 autocast (fp32
master weights): on this machine's CPU (avx512_bf16) it is about twice as fast as fp32.
Saved folders are written whole or not at all (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tok, prompt: str, target: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + target (truncated to ``max_len``) and where the target starts."""
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
    ids = tok(prompt + target, add_special_tokens=False)["input_ids"][:max_len]
    return ids, min(n_prompt, len(ids))


def batch_tensors(encoded: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 on the prompt and padding)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (row, start) in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, max(start, 1):len(row)] = torch.tensor(row[max(start, 1):])  # the first token has no context
    return ids, mask, labels


def finetune(base: Path, tasks: dict[str, list[dict]], out: Path, *, steps: int, batch_size: int, max_len: int, lr: float,
             seed: int = 0, lora_rank: int | None = None, log=print) -> dict:
    """Fine-tune ``base`` on the rows of one or more tasks (each batch mixes the tasks evenly);
    writes a model folder, or with ``lora_rank`` a PEFT adapter folder. Returns the training record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with lm_head: both stay the base's
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    names = sorted(tasks)
    encoded = {t: [encode(tok, r["prompt"], r["target"], max_len) for r in rows] for t, rows in tasks.items()}
    losses, t0, cpu0 = [], time.monotonic(), time.process_time()
    for step in range(steps):
        picks = [encoded[names[(step * batch_size + i) % len(names)]] for i in range(batch_size)]
        ids, mask, labels = batch_tensors([rng.choice(p) for p in picks], pad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0 or step + 1 == steps:
            el = time.monotonic() - t0
            log(f"  step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                f"({el / (step + 1):.1f}s/step, ~{el / (step + 1) * (steps - step - 1) / 60:.0f} min left)")
    record = {"steps": steps, "batch_size": batch_size, "max_len": max_len, "lr": lr, "seed": seed, "lora_rank": lora_rank,
              "tasks": names, "first_loss": sum(losses[:10]) / min(10, len(losses)), "last_loss": sum(losses[-10:]) / min(10, len(losses)),
              "wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
              "trainable_params": sum(p.numel() for p in params)}
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"fine-tune of {names} diverged (non-finite loss)")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if not lora_rank:
        tok.save_pretrained(str(tmp))
    (tmp / "finetune.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record
