"""Shared machinery of the benchmarks: fresh-process measurements, interleaved repetitions, machine facts, random
Llama models and calibration data, and the JSON / Markdown output.

Every measurement that reports memory runs in a fresh Python process (`run_case`), so its peak resident set size
belongs to that case alone (by default a process forked from a clean fork server that has only imported the libraries,
which saves their ~5-10 s import per case; `--isolation subprocess` starts a new interpreter instead); repetitions of the cases of one part are interleaved (A B C, C B A, A B C,
...) so that slow drifts of the machine's load hit every case alike, and ratios are taken between cases measured in
the same run.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tlora.methods_table import METHOD_TABLE, method_entry

logger = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORKER = BENCH_DIR / "worker.py"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHILD_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
    "PYTHONUNBUFFERED": "1",
}


class CaseError(RuntimeError):
    """A benchmark case failed in its worker process."""


@dataclass
class Settings:
    """How a part runs: sizes, repetitions, device, isolation and where results go."""

    scale: str = "full"  # "full", "quick" (small sizes, by hand) or "tiny" (smallest, for the tests)
    repeats: int = 3
    device: str = "cpu"
    isolation: str = "forkserver"  # "forkserver", "subprocess" or "in-process"
    results_dir: Path = RESULTS_DIR
    command: str = ""
    timeout_s: float = 3600.0
    threads: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        """Reduced sizes: the numbers only show that the part runs."""
        return self.scale != "full"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["quick"] = self.quick
        data["results_dir"] = str(self.results_dir)
        return data


# ---------------------------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------------------------


def comma_selection(value: Optional[str], choices: Sequence[str], what: str,
                    default: Optional[Sequence[str]] = None) -> list[str]:
    """The names of a comma-separated option (`default`, else all `choices`, when empty); an unknown name ends the
    run with the choices."""
    if not value:
        return list(default if default is not None else choices)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {', '.join(choices)}")
    return names


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is returned as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_info(device: str) -> dict:
    """CPU model and cores, memory, load, library versions, torch threads and the accelerator, for the record."""
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_total_gib": round(_memory_total_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    try:
        import tlora

        info["tlora"] = tlora.__version__
    except ImportError:
        info["tlora"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["accelerator"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _memory_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def describe_machine(info: dict) -> str:
    """One line: CPU model, cores, threads, torch, accelerator."""
    text = (
        f"{info['cpu_model']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical CPUs, "
        f"{info['memory_total_gib']} GiB RAM, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}, peft {info['peft']}, device {info['device']}"
    )
    if info.get("accelerator"):
        text += f" ({info['accelerator']})"
    load = info.get("load_average_at_start")
    if load:
        text += f"; load average at start {load[0]:.2f}"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Measuring inside a case
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    """Wait for queued accelerator work so that wall times are honest."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@contextmanager
def stopwatch(device: str, record: dict, key: str) -> Iterator[None]:
    """Time the block (synchronising the accelerator at both ends) into record[key] in seconds."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        record[key] = time.perf_counter() - start


def _proc_status_mib(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (e.g. VmHWM, VmRSS) in MiB, or None where there is none (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """The peak resident set size of this process since it started or since the last `reset_peak_memory`, in MiB."""
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def current_rss_mib() -> float:
    """The resident set size of this process now, in MiB."""
    rss = _proc_status_mib("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss / 2**20


_PEAK_SCOPE = {"rss": "process"}


def reset_peak_memory(device: str) -> str:
    """Start a new peak-memory window for the RSS (Linux: clear_refs 5 resets VmHWM) and the accelerator; returns
    the scope the RSS peak will have ('phase', or 'process' where the reset is not available)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _PEAK_SCOPE["rss"] = "phase"
    except OSError:
        _PEAK_SCOPE["rss"] = "process"
    return _PEAK_SCOPE["rss"]


def accelerator_peak_mib(device: str) -> Optional[float]:
    """Peak accelerator memory allocated by torch since the last reset, in MiB (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def memory_record(device: str, rss_at_start: float) -> dict:
    """Peak RSS since the last reset, RSS when the measured phase began, and the accelerator peak of that phase."""
    peak = peak_rss_mib()
    record = {"peak_rss_mib": peak, "rss_at_start_mib": rss_at_start, "peak_above_start_mib": peak - rss_at_start,
              "peak_rss_scope": _PEAK_SCOPE["rss"]}
    accelerator = accelerator_peak_mib(device)
    if accelerator is not None:
        record["peak_accelerator_mib"] = accelerator
    return record


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LlamaSize:
    """Shape of a randomly initialised Llama."""

    hidden_size: int = 512
    num_layers: int = 8
    intermediate_size: int = 1376
    num_heads: int = 8
    vocab_size: int = 32000

    @property
    def num_targets(self) -> int:
        return 7 * self.num_layers


def random_llama(size: LlamaSize | dict, device: str = "cpu", seed: int = 0, dtype: str = "float32"):
    """A `LlamaForCausalLM` with random weights (fixed seed) of the given size, in eval mode, use_cache off."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    size = LlamaSize(**size) if isinstance(size, dict) else size
    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=4096,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype=getattr(torch, dtype))
    model.config.use_cache = False
    model.eval()
    return model.to(device)


def random_examples(num_samples: int, seq_len: int, vocab_size: int, seed: int = 1) -> list[dict]:
    """`num_samples` sequences of `seq_len` random tokens, labels equal to the inputs (a causal LM loss)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab_size, (num_samples, seq_len), generator=generator)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in tokens]


def calibration_set(examples: list[dict], seed: int = 1):
    """The examples as the training core's `CalibrationSet` (all of them, in order) with its padding collator."""
    from tlora.training.data import CalibrationSet, ExampleDataset, PaddingCollator

    dataset = ExampleDataset(examples, list(range(len(examples))))
    return CalibrationSet(dataset, list(range(len(examples))), seed, PaddingCollator(pad_token_id=0))


def batches_on(loader, device: str) -> list[dict]:
    """Materialise a loader's batches on `device` (outside any timed region)."""
    return [{k: v.to(device) for k, v in batch.items()} for batch in loader]


# ---------------------------------------------------------------------------------------------------------------
# Running cases: fresh processes, interleaved repetitions
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One measurement: `module.function(**kwargs)` run in a worker process, returning a dict of numbers."""

    name: str
    module: str
    function: str
    kwargs: dict = field(default_factory=dict)


ISOLATIONS = ("forkserver", "subprocess", "in-process")
PRELOAD_MODULES = ["common", "torch", "transformers", "peft", "tlora", "tlora.training.registry"]


def run_case(case: Case, settings: Settings) -> dict:
    """Run one case, in a fresh process unless `settings.isolation` is 'in-process' (memory figures then belong to
    this case alone)."""
    start = time.perf_counter()
    if settings.isolation == "in-process":
        result = _run_in_process(case)
    elif settings.isolation == "forkserver":
        result = _run_forked(case, settings.timeout_s)
    elif settings.isolation == "subprocess":
        result = _run_in_subprocess(case, settings.timeout_s)
    else:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {settings.isolation!r}")
    result["isolation"] = settings.isolation
    result["case_wall_s"] = time.perf_counter() - start
    return result


def prepare_isolation(settings: Settings) -> None:
    """Set the environment every case process inherits (offline hubs, threads) before any is started."""
    os.environ.update(CHILD_ENVIRONMENT)
    if settings.threads:
        os.environ.update(OMP_NUM_THREADS=str(settings.threads), MKL_NUM_THREADS=str(settings.threads))
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))


def _call(case: Case) -> dict:
    import importlib

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    module = importlib.import_module(case.module)
    result = getattr(module, case.function)(**case.kwargs)
    result.setdefault("peak_rss_mib", peak_rss_mib())
    if "torch" in sys.modules:
        result.setdefault("torch_threads", sys.modules["torch"].get_num_threads())
    return result


def _run_in_process(case: Case) -> dict:
    return _call(case)


_FORKSERVER: dict[str, Any] = {}


def _forkserver_context():
    """A multiprocessing context whose fork server has imported torch, transformers, peft and tlora (once)."""
    if "context" not in _FORKSERVER:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD_MODULES)
        _FORKSERVER["context"] = context
    return _FORKSERVER["context"]


_PROGRESS = {"fd": None}


def case_progress(message: str) -> None:
    """A progress line from inside a case, shown on the terminal of bench/run.py (the case's own output goes to
    its log)."""
    line = f"    {message}\n"
    if _PROGRESS["fd"] is not None:
        os.write(_PROGRESS["fd"], line.encode())
    else:
        sys.stdout.write(line)
        sys.stdout.flush()


def _forked_main(case: Case, result_path: str, log_path: str) -> None:
    """Body of a forked case process: output to a log file (progress lines to the terminal), result to JSON."""
    _PROGRESS["fd"] = os.dup(1)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    logging.basicConfig(level=logging.WARNING)
    Path(result_path).write_text(json.dumps(_call(case)))


def _run_forked(case: Case, timeout_s: float) -> dict:
    context = _forkserver_context()
    with tempfile.TemporaryDirectory(prefix="tlora-bench-") as directory:
        result_path, log_path = Path(directory) / "result.json", Path(directory) / "case.log"
        process = context.Process(target=_forked_main, args=(case, str(result_path), str(log_path)))
        process.start()
        try:
            process.join(timeout_s)
            if process.is_alive():
                raise CaseError(f"case {case.name} ran longer than {timeout_s:.0f} s and was stopped")
        finally:
            if process.is_alive():  # timed out, or bench/run.py was interrupted
                process.terminate()
                process.join()
        if process.exitcode != 0 or not result_path.is_file():
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.is_file() else ""
            raise CaseError(f"case {case.name} ({case.module}.{case.function}) failed with exit code "
                            f"{process.exitcode}:\n{tail}")
        return json.loads(result_path.read_text())


def _run_in_subprocess(case: Case, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="tlora-bench-") as directory:
        spec_path = Path(directory) / "spec.json"
        result_path = Path(directory) / "result.json"
        spec_path.write_text(json.dumps({"module": case.module, "function": case.function, "kwargs": case.kwargs}))
        environment = dict(os.environ, **CHILD_ENVIRONMENT)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), environment.get("PYTHONPATH")]))
        process = subprocess.run(
            [sys.executable, str(WORKER), str(spec_path), str(result_path)],
            cwd=str(REPO_ROOT),
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if process.returncode != 0 or not result_path.is_file():
            tail = (process.stdout + process.stderr)[-4000:]
            raise CaseError(f"case {case.name} ({case.module}.{case.function}) failed with exit code "
                            f"{process.returncode}:\n{tail}")
        return json.loads(result_path.read_text())


def interleaved_order(names: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, case) pairs in alternating order: A B C, C B A, A B C, ..."""
    order = []
    for repeat in range(repeats):
        sequence = list(names) if repeat % 2 == 0 else list(reversed(names))
        order.extend((repeat, name) for name in sequence)
    return order


def run_interleaved(
    cases: Sequence[Case], settings: Settings, progress: Optional[Callable[[str], None]] = None
) -> dict[str, list[dict]]:
    """Run every case `settings.repeats` times in interleaved order; returns name -> list of results by repeat."""
    by_name = {case.name: case for case in cases}
    results: dict[str, list[dict]] = {case.name: [] for case in cases}
    order = interleaved_order(list(by_name), settings.repeats)
    for index, (repeat, name) in enumerate(order, 1):
        result = run_case(by_name[name], settings)
        result["repeat"] = repeat
        results[name].append(result)
        if progress is not None:
            progress(f"[{index}/{len(order)}] {name} (repeat {repeat + 1}): {short_result(result)}")
    return results


def short_result(result: dict) -> str:
    """A one-line digest of a case result for progress logs."""
    keys = [k for k in result if k.endswith("_s") and isinstance(result[k], (int, float))][:4]
    parts = [f"{k}={result[k]:.2f}" for k in keys]
    if "peak_rss_mib" in result:
        parts.append(f"peak_rss={result['peak_rss_mib']:.0f}MiB")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Statistics of repetitions
# ---------------------------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> Optional[float]:
    """Median of the non-missing values (None when there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise_runs(runs: Sequence[dict]) -> dict:
    """For every numeric field of the runs: median, min, max and the values in repeat order."""
    keys = []
    for run in runs:
        for key, value in run.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in keys and key != "repeat":
                keys.append(key)
    summary = {}
    for key in keys:
        values = [run.get(key) for run in runs]
        present = [v for v in values if v is not None]
        summary[key] = {
            "median": median(present),
            "min": min(present) if present else None,
            "max": max(present) if present else None,
            "values": values,
        }
    return summary


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def paired_ratio(first: Sequence[dict], second: Sequence[dict], key_first: str, key_second: str) -> dict:
    """Median and range of the per-repeat ratios first[key] / second[key] (runs paired by repeat index)."""
    by_repeat = {run.get("repeat"): run for run in second}
    ratios = []
    for run in first:
        other = by_repeat.get(run.get("repeat"))
        if other is not None:
            value = ratio(run.get(key_first), other.get(key_second))
            if value is not None:
                ratios.append(value)
    return {
        "median": median(ratios),
        "min": min(ratios) if ratios else None,
        "max": max(ratios) if ratios else None,
        "values": ratios,
    }


def target_check(name: str, value: Optional[float], bound: float, comparison: str = "<=") -> dict:
    """A target of the issue: the measured value, the bound and whether it is met."""
    if value is None:
        met = None
    elif comparison == "<=":
        met = value <= bound
    elif comparison == "<":
        met = value < bound
    elif comparison == ">=":
        met = value >= bound
    else:
        raise ValueError(comparison)
    return {"target": name, "value": value, "bound": f"{comparison} {bound:g}", "met": met}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def part_header(part: str, settings: Settings, machine: dict, started: float) -> dict:
    """The common fields of every part's JSON."""
    return {
        "part": part,
        "command": settings.command,
        "settings": settings.to_dict(),
        "machine": machine,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }


def write_json(settings: Settings, part: str, data: dict) -> Path:
    """Write bench/results/<part>.json (or into settings.results_dir)."""
    settings.results_dir.mkdir(parents=True, exist_ok=True)
    path = settings.results_dir / f"{part}.json"
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a Markdown table ('—' when missing)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell if isinstance(cell, str) else fmt(cell) for cell in row) + " |")
    return "\n".join(lines)


def med(summary: dict, key: str) -> Optional[float]:
    """The median of `key` in a `summarise_runs` result (None when absent)."""
    entry = summary.get(key)
    return entry["median"] if entry else None


# ---------------------------------------------------------------------------------------------------------------
# What several parts share: the compared methods, the shared data, small statistics
# ---------------------------------------------------------------------------------------------------------------

# bench name -> (training-core method, rank factor): the registry's benchmarked methods at full rank (in the
# registry's order), each followed by its bench-only variants.
BENCH_VARIANTS = {"lora_half": ("lora", 0.5)}
METHODS = {
    name: spec
    for entry in METHOD_TABLE
    if entry.benchmarked
    for name, spec in [(entry.name, (entry.name, 1.0))] + [v for v in BENCH_VARIANTS.items() if v[1][0] == entry.name]
}
# Options of a method measured beside its default, run only when --methods names them (the fine-tuning parts):
# bench name -> (training-core method, rank factor, extra options of the task scripts). Never a peer in a target.
PROPOSED = {
    # TLoRA with every module at the nominal scale alpha / r instead of the sensitivity-allocated alpha_l >= alpha.
    "tlora_uniform_scale": ("tlora", 1.0, ("--allocate_scales", "False")),
    # TLoRA with a rank budget 43/32 of LoRA's (alpha / r kept): about 0.59x LoRA's trainable parameters, the most
    # the target (<= 0.6x) allows, where the default budget gives 0.44x.
    "tlora_wide": ("tlora", 43 / 32, ()),
}
ALL_METHODS = {**METHODS, **{name: (core, factor) for name, (core, factor, _) in PROPOSED.items()}}
METHOD_OPTIONS = {name: list(options) for name, (_, _, options) in PROPOSED.items()}
# The registry's labels, but where the benchmark needs the rank or the mode in the label.
BENCH_LABELS = {"lora": "LoRA r", "lora_half": "LoRA r/2", "corda": "CorDA (IPM)",
                "tlora_uniform_scale": "TLoRA, uniform scales (proposed option)",
                "tlora_wide": "TLoRA, rank budget x1.34 (proposed option)"}
LABELS = {name: BENCH_LABELS.get(name, method_entry(core).label) for name, (core, _) in ALL_METHODS.items()}


def calibrated(method: str) -> bool:
    """Whether a bench method's training-core method calibrates on data (its results depend on calibration sizes)."""
    return method_entry(ALL_METHODS[method][0]).calibrated


class DataMissingError(FileNotFoundError):
    """The shared data or the packaged model is not where the benchmark looks for it."""


def shared_data_dir(given: Optional[str] = None) -> Path:
    """The shared data folder: --data-dir, else $TLORA_SHARED_DATA, else ../shared/data beside the repository."""
    path = Path(given or os.environ.get("TLORA_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not (path / "commonsense").is_dir():
        raise DataMissingError(
            f"the quality benchmark reads the commonsense test sets from {path}/commonsense/<task>/test.json, which "
            "does not exist; pass --data-dir (or set TLORA_SHARED_DATA) to the folder holding commonsense/"
        )
    return path



def mean(values: Sequence[float]) -> float:
    """The mean, NaN for no values."""
    return statistics.mean(values) if values else float("nan")


def std(values: Sequence[float]) -> float:
    """The sample standard deviation, 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_context(llama, method: str, r: int, batch_size: int, calibration, output_dir: str, device: str,
                   eva_max_passes: int = 10, task_type: str = "CAUSAL_LM", target_modules=None,
                   lora_alpha: Optional[float] = None, num_samples: int = 64, is_main_process: bool = False):
    """A training-core `MethodContext` for `method` (so every method is built exactly as the training core does)."""
    from peft import TaskType
    from transformers import TrainingArguments

    from tlora.training.arguments import MethodArguments
    from tlora.training.methods import MethodContext

    arguments = MethodArguments(
        method=method,
        lora_r=r,
        lora_alpha=r if lora_alpha is None else lora_alpha,
        target_modules=list(target_modules or LLAMA_TARGETS),
        calibration_samples=num_samples,
        calibration_batch_size=batch_size,
        eva_max_passes=eva_max_passes,
    )
    training_args = TrainingArguments(
        output_dir=output_dir, report_to="none", use_cpu=not device.startswith("cuda"), disable_tqdm=True
    )
    return MethodContext(llama, arguments, training_args, TaskType[task_type], calibration, Path(output_dir), 1,
                         is_main_process=is_main_process)


def targets_markdown(checks: list[dict]) -> list[str]:
    """The target checks as a Markdown table."""
    rows = [[c["target"], fmt(c["value"], 3), c["bound"], {True: "met", False: "**missed**", None: "—"}[c["met"]]]
            for c in checks]
    return ["Targets:", "", markdown_table(["target", "measured", "bound", ""], rows), ""]


def parse_overrides(text: Optional[str], config: dict) -> dict:
    """`max_steps=40,batch_size=8` as {"max_steps": 40, "batch_size": 8} (values take the type of the default)."""
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, _, value = item.partition("=")
        if key not in config or not value:
            raise SystemExit(f"--real-sizes: {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(config))}")
        overrides[key] = type(config[key])(value)
    return overrides


def finetune_settings(settings: Settings, config: dict,
                      tasks: Sequence[str]) -> tuple[dict, list[str], list[str], Path, dict]:
    """What a fine-tuning part ("real", "tuned") reads from its settings: its sizes with --seeds and --real-sizes
    applied, the methods and tasks chosen, the shared data folder and the machine."""
    config = dict(config)
    if settings.extra.get("seeds"):
        config["seeds"] = int(settings.extra["seeds"])
    config.update(parse_overrides(settings.extra.get("real_sizes"), config))
    methods = comma_selection(settings.extra.get("methods"), list(ALL_METHODS), "methods", default=list(METHODS))
    chosen_tasks = comma_selection(settings.extra.get("real_tasks"), tasks, "tasks")
    return config, methods, chosen_tasks, shared_data_dir(settings.extra.get("data_dir")), machine_info(settings.device)
