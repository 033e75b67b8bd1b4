"""`make demo` / `python -m tlora.demo`: the whole TLoRA flow on a tiny local Llama in about two minutes on a CPU.

1. a small random Llama and a byte-level tokenizer are built (no download), and the model is given a little English
   by a few dozen steps of plain language-model training on the packaged commonsense and sentiment samples (not the
   arithmetic set it is adapted to later);
2. the training core calibrates TLoRA on the sample arithmetic set shipped with the package, derives the plan
   (table, JSON, heatmap), initialises A, and trains B for a few steps;
3. the saved adapter is reloaded with stock PEFT, its held-out loss is compared with the base model's, and a
   sample answer is generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger("tlora.demo")


def _split_sample_data(directory: Path, held_out: int) -> tuple[Path, Path, list[dict]]:
    """Write the packaged sample_math.jsonl as a training file and a held-out file; return the held-out rows."""
    text = _package_text("data/sample_math.jsonl")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    directory.mkdir(parents=True, exist_ok=True)
    train_path, held_out_path = directory / "train.jsonl", directory / "held_out.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-held_out]))
    held_out_path.write_text("".join(json.dumps(r) + "\n" for r in rows[-held_out:]))
    return train_path, held_out_path, rows[-held_out:]


def pretrain_base(model, tokenizer, steps: int, seed: int = 0) -> float:
    """A few full language-model steps on the packaged non-arithmetic samples; returns the last loss."""
    texts = [json.loads(line)["text"] for line in _package_text("data/sample_nlu.jsonl").splitlines() if line.strip()]
    texts += [" ".join(filter(None, (r["instruction"], r.get("input"), r["output"])))
              for r in json.loads(_package_text("data/sample_commonsense.json"))]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        chosen = torch.randint(0, len(texts), (8,), generator=generator).tolist()
        batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=128, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def _package_text(name: str) -> str:
    return resources.files("tlora").joinpath(name).read_text()


@torch.no_grad()
def held_out_loss(model, tokenizer, rows: list[dict], cutoff_len: int) -> float:
    """Mean response-token loss on `rows`, tokenized exactly as for training."""
    from tlora.prompts import format_prompt
    from tlora.training.data import PaddingCollator, tokenize_instructions

    examples = tokenize_instructions(
        tokenizer, [format_prompt(r["query"]) for r in rows], [r["response"] for r in rows], cutoff_len
    )
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    model.eval()
    return float(model(**batch).loss)


@torch.no_grad()
def generate(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question with the training prompt."""
    from tlora.prompts import format_prompt

    inputs = tokenizer(format_prompt(question), return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def run(output_dir: Path, steps: int, hidden_size: int, num_layers: int, pretrain_steps: int) -> dict:
    """Build, calibrate, train, save, reload and generate; returns a summary."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tlora import TLoRAPlan, format_plan_table
    from tlora.toy import byte_tokenizer, tiny_llama
    from tlora.training import TaskDefaults, main

    started = time.perf_counter()
    base_dir, run_dir = output_dir / "base_model", output_dir / "run"
    print(f"[0/3] Building a tiny Llama ({num_layers} layers, hidden {hidden_size}) and giving it some English "
          f"({pretrain_steps} steps on the packaged commonsense/sentiment samples)")
    base, tokenizer = tiny_llama(hidden_size=hidden_size, num_layers=num_layers, seed=0), byte_tokenizer()
    pretrain_loss = pretrain_base(base, tokenizer, pretrain_steps)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    train_path, held_out_path, held_out_rows = _split_sample_data(output_dir / "data", held_out=8)

    print(f"\n[1/3] Calibrating TLoRA on the arithmetic samples and training B for {steps} steps")
    cutoff_len = 384  # byte tokens: the longest sample (prompt + response + EOS) is 336
    record = main(
        TaskDefaults(name="demo", description=__doc__, defaults={}),
        [
            "--base_model", str(base_dir),
            "--data_path", str(train_path),
            "--dataset_field", "query", "response",
            "--method", "tlora",
            "--lora_r", "8", "--lora_alpha", "16",
            "--target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "--calibration_samples", "32", "--calibration_batch_size", "8",
            "--cutoff_len", str(cutoff_len),
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
            "--max_steps", str(steps), "--learning_rate", "5e-3", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.03", "--logging_steps", str(max(1, steps // 5)),
            "--save_strategy", "no", "--report_to", "none", "--seed", "0",
            "--output_dir", str(run_dir),
            "--disable_tqdm", "true",
        ],
    )

    plan = TLoRAPlan.load(run_dir / "tlora_plan.json")
    print("\n[2/3] The plan (layer x module: rank/scale)\n")
    print(format_plan_table(plan))

    print("\n[3/3] Reloading the adapter with stock PEFT and generating")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    loss_before = held_out_loss(base, tokenizer, held_out_rows, cutoff_len)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir)
    loss_after = held_out_loss(adapted, tokenizer, held_out_rows, cutoff_len)
    question = held_out_rows[0]["query"]
    answer = generate(adapted, tokenizer, question, max_new_tokens=64)
    summary = {
        "output_dir": str(output_dir.resolve()),
        "trainable_parameters": record["trainable_parameters"],
        "lora_trainable_parameters_same_r": plan.lora_trainable_parameters,
        "calibration_seconds": record.get("calibration_wall_time_s"),
        "training_seconds": record.get("training_wall_time_s"),
        "pretraining_loss": round(pretrain_loss, 4),
        "held_out_loss_base": round(loss_before, 4),
        "held_out_loss_tlora": round(loss_after, 4),
        "question": question,
        "generated": answer,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nHeld-out loss (8 rows the model never saw): base {loss_before:.3f} -> TLoRA {loss_after:.3f}")
    print(f"Question: {question}\nGenerated (a tiny model after {steps} steps of B; expect the answer format, not correct arithmetic):")
    print("  " + answer.replace("\n", "\n  "))
    print(f"\nFiles in {output_dir.resolve()}:")
    for name in ("base_model/", "run/adapter_model.safetensors", "run/adapter_config.json", "run/tlora_plan.json",
                 "run/tlora_plan.png", "run/tlora_init.safetensors", "run/run_record.json", "demo_summary.json"):
        print(f"  {name}")
    print(f"Done in {summary['total_seconds']:.0f} s.")
    return summary


def main(argv=None) -> dict:
    """Command line of the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="Where the demo writes everything.")
    parser.add_argument("--steps", type=int, default=60, help="Training steps of B.")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--pretrain_steps", type=int, default=80, help="Language-model steps that give the base some English.")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    return run(Path(options.output_dir), options.steps, options.hidden_size, options.num_layers, options.pretrain_steps)


if __name__ == "__main__":
    main()
