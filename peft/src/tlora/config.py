"""`TLoRAConfig`: a `peft.LoraConfig` plus the settings of TLoRA's calibration, allocation and initialisation."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from peft import LoraConfig

from .allocation import BudgetError, check_max_rank

# The sensitivity modes (their formulas: tlora.calibration.sensitivity): "per_sample" is the method's definition
# at any batch size, "batch" the cheaper approximation |W * grad| of each micro-batch.
SensitivityMode = Literal["per_sample", "batch"]
SENSITIVITY_MODES: tuple[str, ...] = get_args(SensitivityMode)
PER_SAMPLE, BATCH = SENSITIVITY_MODES
SVD_METHODS = ("gram", "exact", "randomized")
STATISTICS_DTYPES = ("float32", "float64")


def exact_pattern_key(module_name: str) -> str:
    """A PEFT `rank_pattern` / `alpha_pattern` key that matches the module `module_name` and no other.

    PEFT 0.21 (`peft.utils.other.get_pattern_key`) tries `re.match(rf"(.*\\.)?({key})$", name)` for each key in
    turn, so a bare name `layers.1.q` would also capture `enc.layers.1.q`, and its dots match any character. The
    escaped, `^`-anchored name only matches when the optional prefix is empty, i.e. the full name exactly.
    """
    return f"^{re.escape(module_name)}$"


def exact_pattern_keys(pattern: Mapping[str, float]) -> dict[str, float]:
    """`pattern` (module name -> value) with every key turned into an `exact_pattern_key`."""
    return {exact_pattern_key(name): value for name, value in pattern.items()}


def exact_target_modules(names: list[str], module_names: Optional[Iterable[str]] = None) -> list[str] | str:
    """PEFT `target_modules` that select exactly `names`: the plain list when no other module's name ends with
    `.<name>` (PEFT matches list entries as name suffixes), else one regular expression PEFT matches in full."""
    others = set(module_names or ()) - set(names)
    if module_names is not None and not any(other.endswith("." + name) for other in others for name in names):
        return list(names)
    return "(?:" + "|".join(re.escape(name) for name in names) + ")"


@dataclass
class TLoRAConfig(LoraConfig):
    """LoRA configuration whose ranks, scales and `A` are fitted to the task by TLoRA.

    Every `LoraConfig` field keeps its PEFT meaning; `r` and `lora_alpha` are the *nominal* rank and alpha. The
    adapter that TLoRA builds is an ordinary LoRA adapter (`peft_type` LORA): per-module ranks and alphas are
    written into `rank_pattern` and `alpha_pattern` of a plain `LoraConfig` (see `to_lora_config`).
    """

    rank_budget: Optional[int] = field(
        default=None,
        metadata={"help": "Total rank R spread over all target modules. Default: r x number of target modules."},
    )
    parameter_budget: Optional[int] = field(
        default=None,
        metadata={
            "help": "Trainable-parameter budget instead of a rank budget (sum of r_l * out_features, plus "
            "r_l * in_features when A is not frozen). Mutually exclusive with rank_budget."
        },
    )
    min_rank: int = field(default=0, metadata={"help": "Smallest rank a target module may receive (0: may be dropped)."})
    max_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "Largest rank a target module may receive (the excess goes to the others in proportion to their "
            "sensitivity), e.g. vLLM's max_lora_rank to serve the adapter unmerged. Default: min(out, in) only."
        },
    )
    allocate_scales: bool = field(
        default=True,
        metadata={
            "help": "Allocate per-module scales alpha_l = max(alpha, round(alpha * L * S_l / sum S)). When False every "
            "module keeps the nominal scaling alpha / r."
        },
    )
    # "cli": False keeps a field off the training scripts' command line (every other TLoRA field becomes an option
    # there, see tlora.training.arguments): the training core always keeps A frozen and checks that it stays so.
    freeze_lora_A: bool = field(
        default=True, metadata={"help": "Keep A frozen at its SVD initialisation (train B only).", "cli": False}
    )
    sensitivity: SensitivityMode = field(
        default=PER_SAMPLE,
        metadata={
            "help": "'per_sample': mean|W * dl_s/dW| per sample, averaged (the method's definition, at any batch "
            "size). 'batch': |W * grad| of each micro-batch's loss, an approximation that is cheaper at large batches."
        },
    )
    svd_method: Literal[SVD_METHODS] = field(
        default="gram",
        metadata={
            "help": "How the top right singular vectors of W C are found: 'gram' (eigh of the smaller Gram matrix, "
            "float64), 'exact' (full SVD, float64) or 'randomized' (subspace iteration with oversampling)."
        },
    )
    svd_oversampling: int = field(default=16, metadata={"help": "Extra columns for svd_method='randomized'."})
    svd_niter: int = field(default=8, metadata={"help": "Power iterations for svd_method='randomized'."})
    statistics_dtype: Literal[STATISTICS_DTYPES] = field(
        default="float32", metadata={"help": "Accumulation dtype of the calibration statistics."}
    )
    statistics_device: Optional[str] = field(
        default=None,
        metadata={"help": "Device that holds the statistics (e.g. 'cpu' to offload). Default: each module's device."},
    )
    statistics_passes: int = field(
        default=1,
        metadata={
            "help": "Collect the statistics in this many passes over the calibration data, each holding only its "
            "share of the layers' statistics, decomposed and freed before the next (exact: the same A and plan as "
            "one pass). 2 halves the statistics memory (Llama-2-7B: 12.2 GB -> 6.4 GB) for more "
            "calibration time (the later passes are forward-only and stop at their last layer; see docs/scale.md)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.rank_budget is not None and self.parameter_budget is not None:
            raise ValueError("Give either rank_budget or parameter_budget, not both.")
        if isinstance(self.statistics_passes, bool) or not isinstance(self.statistics_passes, int) or (
            self.statistics_passes < 1
        ):
            raise ValueError(f"statistics_passes must be a positive integer, got {self.statistics_passes!r}.")
        if self.rank_budget is not None and self.rank_budget <= 0:
            raise ValueError(f"rank_budget must be positive, got {self.rank_budget}.")
        if self.parameter_budget is not None and self.parameter_budget <= 0:
            raise ValueError(f"parameter_budget must be positive, got {self.parameter_budget}.")
        if self.min_rank < 0:
            raise ValueError(f"min_rank must be >= 0, got {self.min_rank}.")
        check_max_rank(self.max_rank, self.min_rank)
        if self.max_rank is not None and self.rank_budget is None and self.parameter_budget is None:
            if self.r > self.max_rank:
                raise BudgetError(
                    f"the default rank budget r x modules cannot fit under max_rank={self.max_rank} x modules with "
                    f"r={self.r}; lower r to at most {self.max_rank}, pass a rank_budget or raise max_rank."
                )
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}.")
        if not self.lora_alpha > 0:
            raise ValueError(
                f"lora_alpha must be positive, got {self.lora_alpha}: an adapter's scaling is lora_alpha / r "
                "(/ sqrt(r) with use_rslora), so 0 switches the adapters off and a negative value flips their sign; "
                "use e.g. lora_alpha = r or 2 r."
            )
        if self.sensitivity not in SENSITIVITY_MODES:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_MODES}, got {self.sensitivity!r}.")
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {self.svd_method!r}.")
        if self.statistics_dtype not in STATISTICS_DTYPES:
            raise ValueError(f"statistics_dtype must be one of {STATISTICS_DTYPES}, got {self.statistics_dtype!r}.")
        if self.svd_oversampling < 0 or self.svd_niter < 0:
            raise ValueError("svd_oversampling and svd_niter must be >= 0.")
        if self.init_lora_weights is not True:
            raise ValueError(
                "TLoRA initialises A itself (top right singular vectors of W C) and B = 0; leave init_lora_weights "
                f"at its default True (got {self.init_lora_weights!r})."
            )
        if self.use_dora:
            raise ValueError("TLoRA builds plain LoRA adapters; use_dora=True is not supported.")
        if self.target_parameters:
            raise ValueError("TLoRA adapts nn.Linear / Conv1D modules; target_parameters is not supported.")

    def lora_config_kwargs(self) -> dict:
        """The values of the plain `LoraConfig` fields of this configuration."""
        names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return {name: getattr(self, name) for name in names}

    def to_lora_config(self, plan, module_names: Optional[Iterable[str]] = None) -> LoraConfig:
        """A standard `LoraConfig` that realises `plan`: its modules, `rank_pattern` and `alpha_pattern` (pattern keys
        that each match exactly one module; `module_names`, all names in the model, lets the module list stay a
        plain list when no adapted name is a suffix of another module's name)."""
        kwargs = self.lora_config_kwargs()
        kwargs.update(
            target_modules=exact_target_modules(plan.target_modules(), module_names),
            rank_pattern=exact_pattern_keys(plan.rank_pattern()),
            alpha_pattern=exact_pattern_keys(plan.alpha_pattern()),
            init_lora_weights=True,
        )
        # These were resolved into the explicit list of module names above.
        kwargs.pop("exclude_modules", None)
        kwargs["layers_to_transform"] = None
        kwargs["layers_pattern"] = None
        return LoraConfig(**kwargs)
