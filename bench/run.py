#!/usr/bin/env python
"""Run TLoRA's benchmarks, print their tables and write bench/results/<part>.json and bench/results/SUMMARY.md.

    python bench/run.py                      # parts 1-3: init_cost, memory, train_step (36 min on 2 CPU cores)
    python bench/run.py --quality            # part 4 as well (quality on all-MiniLM-L6-v2; longer)
    python bench/run.py --parts quality      # part 4 only
    python bench/run.py --quick              # small sizes: a smoke run of every selected part in a few minutes
    python bench/run.py --parts real         # SmolLM2-135M-Instruct trained by the task scripts (~85 min on 2 quiet cores)
    python bench/run.py --parts real_perf    # calibration, decomposition and generation cost on SmolLM2 (~3 min)

Timings are only comparable within one run: every part measures its baselines in the same run, interleaves the
repetitions and reports ratios. Each measurement runs in a fresh process (unless --in-process) so that its peak
memory is its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import ISOLATIONS, RESULTS_DIR, Settings, describe_machine, prepare_isolation, resolve_device  # noqa: E402,E501

PARTS = ("init_cost", "memory", "train_step", "quality", "real", "real_perf", "tuned")
DEFAULT_PARTS = ("init_cost", "memory", "train_step")
PART_NUMBERS = {"1": "init_cost", "2": "memory", "3": "train_step", "4": "quality"}
SUMMARY_FILE = "SUMMARY.md"


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=None,
                        help=f"Comma-separated parts (names, or numbers 1-4 for the first four) from {', '.join(PARTS)}. "
                             f"Default: {', '.join(DEFAULT_PARTS)} (plus quality with --quality).")
    parser.add_argument("--quality", action="store_true", help="Also run part 4 (quality on all-MiniLM-L6-v2).")
    parser.add_argument("--quick", action="store_true", help="Small sizes, for smoke tests; numbers are not meaningful.")
    parser.add_argument("--tiny", action="store_true", help="The smallest sizes (the test suite's smoke test).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Interleaved repetitions of every timed case (default 3; 1 with --quick).")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available).")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="forkserver",
                        help="How each case gets a fresh process: forked from a server that imported the libraries "
                             "once (default), a new interpreter (subprocess), or none (in-process: faster, but memory "
                             "figures then include what earlier cases left behind).")
    parser.add_argument("--in-process", action="store_true", help="Same as --isolation in-process (for tests).")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR, help="Where the JSON files and SUMMARY.md go.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Quality, real, tuned: training seeds per method (default 3 / 2 / 2).")
    parser.add_argument("--epochs", type=int, default=None, help="Quality: training epochs (default 1).")
    parser.add_argument("--sweep-task", default=None,
                        help="Quality: the task whose validation split chooses each method's learning rate "
                             "(default math_type).")
    parser.add_argument("--methods", default=None,
                        help="Quality, real and tuned: comma-separated subset of lora,lora_half,pissa,dora,corda,eva,loraga,tlora.")
    parser.add_argument("--real-tasks", default=None,
                        help="Real and tuned: comma-separated subset of commonsense,math (default both).")
    parser.add_argument("--real-sizes", default=None,
                        help="Real and tuned: KEY=VALUE overrides of the sizes, e.g. max_steps=40,batch_size=8,cutoff_len=256 "
                             "(see sizes() in bench/real.py and bench/tuned.py).")
    parser.add_argument("--tasks", default=None,
                        help="Quality: comma-separated tasks (default math_type,social_i_qa): math_type or any "
                             "multiple-choice set of ../shared/data/commonsense (piqa, social_i_qa, ARC-Easy, ...).")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="Quality: the shared data folder (default ../shared/data beside the repository).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every case (OMP_NUM_THREADS). Default: torch's own choice (all cores).")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds one case may run before it is killed.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    arguments = parser.parse_args(argv)
    if arguments.repeats is not None and arguments.repeats < 1:
        parser.error("--repeats must be >= 1")
    return arguments


def selected_parts(arguments: argparse.Namespace) -> list[str]:
    """The parts to run, in canonical order."""
    if arguments.parts:
        names = [PART_NUMBERS.get(p.strip(), p.strip()) for p in arguments.parts.split(",") if p.strip()]
        unknown = [n for n in names if n not in PARTS]
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)} or 1-4")
    else:
        names = list(DEFAULT_PARTS) + (["quality"] if arguments.quality else [])
    if arguments.quality and "quality" not in names:
        names.append("quality")
    return [p for p in PARTS if p in names]


def command_line(argv) -> str:
    """The command that produced the results, as a user would type it."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "bench/run.py"] + [shlex.quote(a) for a in arguments])


def part_module(part: str):
    """The module implementing a part."""
    import importlib

    return importlib.import_module(part)


def write_summary(results_dir: Path) -> Path:
    """SUMMARY.md from every part's JSON present in `results_dir` (each with its command and machine)."""
    sections = ["# TLoRA benchmarks", "",
                "Generated by `bench/run.py` from the JSON files beside this one. Timings compare methods measured in "
                "the same run on the same machine; absolute numbers depend on the machine and its load.", ""]
    for part in PARTS:
        path = results_dir / f"{part}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        try:
            section = part_module(part).markdown(data)
        except (KeyError, TypeError, ValueError) as error:
            section = f"## {part}\n\n{path.name} could not be rendered ({type(error).__name__}: {error}); rerun the part."
        sections += [section, "",
                     f"*Command:* `{data['command']}` — *machine:* {describe_machine(data['machine'])} — "
                     f"*started* {data['started_at']}, took {data.get('duration_s', 0) / 60:.1f} min"
                     f"{' — ' + data['settings'].get('scale', 'quick').upper() + ' SIZES, numbers not meaningful' if data['settings'].get('quick') else ''}.", ""]
    path = results_dir / SUMMARY_FILE
    path.write_text("\n".join(sections) + "\n")
    return path


def _stop(signum, frame) -> None:
    """SIGTERM ends the run like Ctrl-C, so that the running case process is stopped too."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    """Run the selected parts, print their tables and write the results."""
    arguments = parse_arguments(argv)
    signal.signal(signal.SIGTERM, _stop)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parts = selected_parts(arguments)
    settings = Settings(
        scale="tiny" if arguments.tiny else "quick" if arguments.quick else "full",
        repeats=arguments.repeats or (1 if arguments.quick or arguments.tiny else 3),
        device=resolve_device(arguments.device),
        isolation="in-process" if arguments.in_process else arguments.isolation,
        results_dir=arguments.output_dir,
        command=command_line(argv),
        timeout_s=arguments.timeout,
        threads=arguments.threads,
        extra={"seeds": arguments.seeds, "epochs": arguments.epochs, "sweep_task": arguments.sweep_task,
               "tasks": arguments.tasks, "methods": arguments.methods, "real_tasks": arguments.real_tasks,
               "real_sizes": arguments.real_sizes,
               "data_dir": str(arguments.data_dir) if arguments.data_dir else None},
    )
    prepare_isolation(settings)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    started = time.time()
    print(f"bench: parts {', '.join(parts)} on {settings.device}, {settings.repeats} repeats"
          f"{', ' + settings.scale + ' sizes' if settings.quick else ''}{', isolation ' + settings.isolation}", flush=True)
    for part in parts:
        module = part_module(part)
        part_started = time.time()
        data = module.run(settings, log=lambda message: print(f"  {message}", flush=True))
        print("\n" + module.markdown(data) + "\n", flush=True)
        print(f"{part}: {time.time() - part_started:.0f} s -> {settings.results_dir / (part + '.json')}", flush=True)
    summary = write_summary(settings.results_dir)
    print(f"bench: done in {(time.time() - started) / 60:.1f} min; summary in {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
