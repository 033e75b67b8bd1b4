"""Step 2 of TLoRA: ranks and scales of all target modules under a fixed budget (pure functions on numbers).

Ranks are proportional to sensitivity, `rho_l = R * S_l / sum_k S_k`, bounded by `min_rank <= r_l <= min(m_l, n_l)`
and by an optional `max_rank` (e.g. vLLM's `max_lora_rank`; a capped module's excess goes to the others in
proportion to S), and made integral by the largest-remainder
method so that `sum_l r_l = R` exactly. Scales are `alpha_l = max(alpha, round(alpha * L * S_l / sum_k S_k))`, and a
module's effective scaling is `alpha_l / r` with the nominal `r` (PEFT needs `alpha_pattern[l] = alpha_l * r_l / r`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

PLAN_FORMAT_VERSION = 1
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class BudgetError(ValueError):
    """The requested budget cannot be met by any allocation."""


@dataclass
class ModulePlan:
    """The allocation of one target module."""

    name: str
    out_features: int
    in_features: int
    sensitivity: float
    rank: int
    alpha: float
    scaling: float
    lora_alpha: float
    budget_share: float
    trainable_parameters: int
    layer: Optional[int] = None
    module_type: str = ""


@dataclass
class TLoRAPlan:
    """Per-module ranks and scales for all target modules, plus the settings that produced them."""

    r: int
    lora_alpha: float
    budget_type: str
    budget: int
    budget_spent: int
    min_rank: int
    allocate_scales: bool
    use_rslora: bool
    freeze_lora_A: bool
    modules: list[ModulePlan]
    sensitivity_mode: str = "per_sample"
    num_samples: int = 0
    max_rank: Optional[int] = None
    format_version: int = PLAN_FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    # ----- views used by PEFT -----
    def target_modules(self) -> list[str]:
        """Names of the modules that receive an adapter (rank > 0)."""
        return [module.name for module in self.modules if module.rank > 0]

    def rank_pattern(self) -> dict[str, int]:
        """PEFT `rank_pattern`: module name -> r_l for every adapted module."""
        return {module.name: module.rank for module in self.modules if module.rank > 0}

    def alpha_pattern(self) -> dict[str, float]:
        """PEFT `alpha_pattern`: module name -> the lora_alpha that makes PEFT's scaling equal alpha_l / r."""
        return {module.name: module.lora_alpha for module in self.modules if module.rank > 0}

    def module(self, name: str) -> ModulePlan:
        """The plan entry of one module."""
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    # ----- totals -----
    @property
    def total_rank(self) -> int:
        return sum(module.rank for module in self.modules)

    @property
    def trainable_parameters(self) -> int:
        """Adapter parameters that train under this plan (B only when A is frozen)."""
        return sum(module.trainable_parameters for module in self.modules)

    @property
    def lora_trainable_parameters(self) -> int:
        """Trainable parameters of plain LoRA (A and B) at the nominal r on the same target modules."""
        return sum(self.r * (module.out_features + module.in_features) for module in self.modules)

    @property
    def dropped_modules(self) -> list[str]:
        """Target modules that received rank 0 and therefore no adapter."""
        return [module.name for module in self.modules if module.rank == 0]

    # ----- serialisation -----
    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_rank"] = self.total_rank
        data["trainable_parameters"] = self.trainable_parameters
        data["lora_trainable_parameters"] = self.lora_trainable_parameters
        data["dropped_modules"] = self.dropped_modules
        return data

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "TLoRAPlan":
        data = dict(data)
        for derived in ("total_rank", "trainable_parameters", "lora_trainable_parameters", "dropped_modules"):
            data.pop(derived, None)
        version = data.get("format_version", PLAN_FORMAT_VERSION)
        if version > PLAN_FORMAT_VERSION:
            raise ValueError(f"plan format version {version} is newer than this tlora ({PLAN_FORMAT_VERSION})")
        data["modules"] = [ModulePlan(**module) for module in data["modules"]]
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON (the file name should contain 'plan', e.g. tlora_plan.json)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # then os.replace: never a half-written plan
        temporary.write_text(self.to_json() + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TLoRAPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def layer_and_type(name: str) -> tuple[Optional[int], str]:
    """Split a module name into its layer index and module type ('model.layers.3.mlp.up_proj' -> 3, 'mlp.up_proj')."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end() :]


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def proportional_shares(
    weights: Sequence[float],
    total: float,
    lower: Sequence[float],
    upper: Sequence[float],
    costs: Optional[Sequence[float]] = None,
) -> list[float]:
    """Real shares rho_l = clip(lam * w_l, lower_l, upper_l) with sum_l cost_l * rho_l = total (lam solved exactly).

    The function `lam -> sum cost * clip(lam * w, lower, upper)` is piecewise linear and non-decreasing; its
    breakpoints are lower_l / w_l and upper_l / w_l, so the solution is found exactly on one linear piece.
    """
    count = len(weights)
    costs = [1.0] * count if costs is None else [float(c) for c in costs]
    weights = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise ValueError("sensitivities must be finite and non-negative")
    # Only ratios matter: scale to a maximum of 1 and treat what underflows relative to it as zero.
    largest = max(weights, default=0.0)
    if largest > 0:
        weights = [w / largest if w / largest > 1e-200 else 0.0 for w in weights]
    _check_shares_feasible(weights, total, lower, upper, costs)
    lam = _solve_scale(weights, total, lower, upper, costs)
    return [min(max(lam * w, lo), hi) for w, lo, hi in zip(weights, lower, upper)]


def _check_shares_feasible(
    weights: list[float], total: float, lower: Sequence[float], upper: Sequence[float], costs: list[float]
) -> None:
    """Raise `BudgetError` unless some shares within [lower, upper], zero-weight ones at lower, cost `total`."""
    low_total = sum(c * lo for c, lo in zip(costs, lower))
    high_total = sum(c * hi for c, hi in zip(costs, upper))
    if total < low_total - 1e-9:
        raise BudgetError(f"budget {total:g} is below the {low_total:g} that the minimum ranks need")
    if total > high_total + 1e-9:
        raise BudgetError(f"budget {total:g} exceeds the {high_total:g} that the capacities min(m, n) allow")
    if sum(w for w in weights) == 0:
        raise BudgetError("all sensitivities are zero: the calibration loss had no gradient on any target module")
    reachable = sum(c * (hi if w > 0 else lo) for c, w, lo, hi in zip(costs, weights, lower, upper))
    if total > reachable + 1e-9:
        zero = sum(1 for w in weights if w == 0)
        raise BudgetError(
            f"budget {total:g} exceeds the {reachable:g} that fits into the modules with non-zero sensitivity "
            f"({zero} modules have zero sensitivity and stay at their minimum rank); lower the budget"
        )


def _solve_scale(
    weights: list[float], total: float, lower: Sequence[float], upper: Sequence[float], costs: list[float]
) -> float:
    """The lam with sum_l cost_l * clip(lam * w_l, lower_l, upper_l) = total, solved on its linear piece."""

    def filled(lam: float) -> float:
        return sum(c * min(max(lam * w, lo), hi) for c, w, lo, hi in zip(costs, weights, lower, upper))

    breakpoints = sorted(
        {b / w for w, lo, hi in zip(weights, lower, upper) if w > 0 for b in (lo, hi)} | {0.0}
    )
    # Find the linear piece [a, b] with filled(a) <= total <= filled(b).
    low_lam, high_lam = 0.0, breakpoints[-1]
    for point in breakpoints:
        if filled(point) >= total:
            high_lam = point
            break
        low_lam = point
    # On (low_lam, high_lam) the active set (lower < lam * w < upper) is fixed: solve the linear equation.
    middle = 0.5 * (low_lam + high_lam)
    fixed = 0.0
    slope = 0.0
    for c, w, lo, hi in zip(costs, weights, lower, upper):
        value = middle * w
        if w > 0 and lo < value < hi:
            slope += c * w
        else:
            fixed += c * min(max(value, lo), hi)
    return high_lam if slope == 0 else (total - fixed) / slope


def allocate_ranks(
    sensitivities: Sequence[float],
    capacities: Sequence[int],
    budget: int,
    min_rank: int = 0,
    costs: Optional[Sequence[int]] = None,
) -> list[int]:
    """Integer ranks proportional to sensitivity, within [min_rank, capacity], by the largest-remainder method.

    With `costs=None` the budget is a total rank and is spent exactly. With per-rank `costs` (parameters per unit
    of rank) the budget is a parameter count: it is never exceeded and is spent as fully as integer ranks allow.
    """
    count = len(sensitivities)
    if len(capacities) != count:
        raise ValueError("sensitivities and capacities differ in length")
    if count == 0:
        raise BudgetError("there are no target modules to allocate a budget to")
    if budget <= 0:
        raise BudgetError(f"budget must be positive, got {budget}")
    lower = [min(min_rank, cap) for cap in capacities]
    shares = proportional_shares(sensitivities, budget, lower, capacities, costs)
    ranks = [max(lo, min(cap, math.floor(share + 1e-9))) for share, lo, cap in zip(shares, lower, capacities)]
    remainders = [share - rank for share, rank in zip(shares, ranks)]
    # Largest remainder first; ties go to the more sensitive module, then to the earlier one.
    order = sorted(range(count), key=lambda i: (-remainders[i], -sensitivities[i], i))
    if costs is None:
        missing = budget - sum(ranks)
        # sum(shares) == budget, so `missing` equals the sum of the remainders (< number of modules); modules
        # with a zero remainder come last in `order` and only absorb floating-point slack.
        for index in order:
            if missing == 0:
                break
            if ranks[index] < capacities[index]:
                ranks[index] += 1
                missing -= 1
        if missing != 0:
            raise BudgetError(f"could not spend the rank budget exactly ({missing} left)")
        return ranks
    # Parameter budget: round up the modules with the largest remainders while the budget allows; every module
    # ends at floor or ceil of its share and what is left is smaller than the cost of any module still below it.
    remaining = budget - sum(c * r for c, r in zip(costs, ranks))
    for index in order:
        if remainders[index] > 1e-9 and ranks[index] < capacities[index] and costs[index] <= remaining:
            ranks[index] += 1
            remaining -= costs[index]
    return ranks


def allocate_scales(sensitivities: Sequence[float], lora_alpha: float) -> list[float]:
    """alpha_l = max(alpha, round(alpha * L * S_l / sum_k S_k)), rounding halves up."""
    total = sum(sensitivities)
    count = len(sensitivities)
    if total <= 0:
        raise BudgetError("all sensitivities are zero: scales cannot be allocated")
    return [max(lora_alpha, _round_half_up(lora_alpha * count * s / total)) for s in sensitivities]


def check_max_rank(max_rank: Optional[int], min_rank: int = 0) -> None:
    """Refuse a `max_rank` that is not a positive integer or lies below `min_rank`."""
    if max_rank is None:
        return
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ValueError(f"max_rank must be a positive integer (or None for no cap), got {max_rank!r}")
    if max_rank < min_rank:
        raise ValueError(f"max_rank={max_rank} is below min_rank={min_rank}; no rank can satisfy both")


def check_parameter_budget(
    parameter_budget: Optional[int], shapes: Sequence[tuple[str, int, int]], freeze_lora_A: bool = True
) -> None:
    """Raise `BudgetError` unless `parameter_budget` pays for at least one rank-1 adapter on one of the modules
    `shapes` (name, out_features, in_features); nothing to check without a parameter budget."""
    costs = [(out + (0 if freeze_lora_A else n_in), name) for name, out, n_in in shapes if min(out, n_in) > 0]
    if parameter_budget is None or not costs:
        return
    cheapest, name = min(costs)
    if parameter_budget < cheapest:
        per_rank = "out_features" if freeze_lora_A else "out_features + in_features"
        raise BudgetError(
            f"parameter budget {parameter_budget} is too small for even one rank-1 adapter: the cheapest, on {name}, "
            f"costs {cheapest} parameters ({per_rank}); give parameter_budget >= {cheapest}"
        )


@dataclass
class ModuleInfo:
    """What allocation needs to know of one target module."""

    name: str
    out_features: int
    in_features: int
    sensitivity: float


def derive_plan(
    modules: Iterable[ModuleInfo],
    r: int,
    lora_alpha: float,
    *,
    rank_budget: Optional[int] = None,
    parameter_budget: Optional[int] = None,
    min_rank: int = 0,
    allocate_scales_: bool = True,
    use_rslora: bool = False,
    freeze_lora_A: bool = True,
    sensitivity_mode: str = "per_sample",
    num_samples: int = 0,
    max_rank: Optional[int] = None,
) -> TLoRAPlan:
    """Allocate ranks and scales to `modules` (in a fixed order) and return the plan."""
    modules = list(modules)
    sensitivities = _checked_sensitivities(modules, rank_budget, parameter_budget, min_rank, max_rank)
    capacities = [min(m.out_features, m.in_features, max_rank or m.out_features) for m in modules]
    per_rank_cost = [m.out_features + (0 if freeze_lora_A else m.in_features) for m in modules]
    if parameter_budget is not None:
        shapes = [(m.name, m.out_features, m.in_features) for m in modules]
        check_parameter_budget(parameter_budget, shapes, freeze_lora_A)
        budget_type, budget = "parameters", int(parameter_budget)
        ranks = _ranks_under_parameter_budget(sensitivities, capacities, per_rank_cost, budget, min_rank, max_rank)
    else:
        budget_type = "rank"
        budget = int(rank_budget) if rank_budget is not None else r * len(modules)
        ranks = _ranks_under_rank_budget(modules, sensitivities, capacities, budget, min_rank, max_rank)

    if sum(ranks) == 0:
        raise BudgetError(
            f"the {budget_type} budget {budget} gives every target module rank 0 (the modules it could pay for have "
            "zero sensitivity); raise the budget"
        )
    alphas = allocate_scales(sensitivities, lora_alpha) if allocate_scales_ else [lora_alpha] * len(modules)
    entries = _module_plans(modules, ranks, alphas, per_rank_cost, r, use_rslora)
    spent = sum(ranks) if budget_type == "rank" else sum(e.trainable_parameters for e in entries)
    return TLoRAPlan(
        r=r,
        lora_alpha=lora_alpha,
        budget_type=budget_type,
        budget=budget,
        budget_spent=spent,
        min_rank=min_rank,
        allocate_scales=allocate_scales_,
        use_rslora=use_rslora,
        freeze_lora_A=freeze_lora_A,
        modules=entries,
        sensitivity_mode=sensitivity_mode,
        num_samples=num_samples,
        max_rank=max_rank,
    )


def _checked_sensitivities(
    modules: list[ModuleInfo], rank_budget: Optional[int], parameter_budget: Optional[int], min_rank: int,
    max_rank: Optional[int],
) -> list[float]:
    """The modules' sensitivities as floats, after checking that there are modules, one budget and valid bounds."""
    if not modules:
        raise BudgetError("there are no target modules to allocate a budget to")
    if rank_budget is not None and parameter_budget is not None:
        raise ValueError("give either rank_budget or parameter_budget, not both")
    check_max_rank(max_rank, min_rank)
    sensitivities = [float(m.sensitivity) for m in modules]
    for module, value in zip(modules, sensitivities):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"sensitivity of {module.name} is {value}; it must be finite and >= 0")
    return sensitivities


def _ranks_under_parameter_budget(
    sensitivities: list[float], capacities: list[int], per_rank_cost: list[int], budget: int, min_rank: int,
    max_rank: Optional[int],
) -> list[int]:
    """Ranks that spend at most `budget` trainable parameters, after checking that min_rank and max_rank allow it."""
    needed = sum(min(min_rank, cap) * cost for cap, cost in zip(capacities, per_rank_cost))
    if budget < needed:
        raise BudgetError(
            f"parameter budget {budget} is smaller than the {needed} parameters that min_rank={min_rank} needs "
            f"on {len(sensitivities)} target modules"
        )
    most = sum(cap * cost for cap, cost in zip(capacities, per_rank_cost))
    if max_rank is not None and budget > most:
        raise BudgetError(
            f"parameter budget {budget} exceeds the {most} parameters that ranks capped at max_rank={max_rank} "
            f"hold on {len(sensitivities)} target modules; lower the budget or raise max_rank"
        )
    return allocate_ranks(sensitivities, capacities, budget, min_rank, costs=per_rank_cost)


def _ranks_under_rank_budget(
    modules: list[ModuleInfo], sensitivities: list[float], capacities: list[int], budget: int, min_rank: int,
    max_rank: Optional[int],
) -> list[int]:
    """Ranks that sum to `budget` exactly, after checking that min_rank, max_rank and the capacities allow it."""
    if budget < min_rank * len(modules):
        raise BudgetError(
            f"rank budget {budget} is smaller than min_rank={min_rank} x {len(modules)} target modules "
            f"= {min_rank * len(modules)}; lower min_rank or raise the budget"
        )
    if max_rank is not None and budget > max_rank * len(modules):
        raise BudgetError(
            f"rank budget {budget} exceeds max_rank={max_rank} x {len(modules)} target modules = "
            f"{max_rank * len(modules)}; lower r or rank_budget, or raise max_rank"
        )
    if budget > sum(capacities):
        raise BudgetError(
            f"rank budget {budget} exceeds the total capacity {sum(capacities)} (sum of min(out, in"
            f"{', max_rank' if max_rank else ''}) over the "
            f"{len(modules)} target modules); lower r or pass rank_budget"
        )
    return allocate_ranks(sensitivities, capacities, budget, min_rank)


def _module_plans(
    modules: list[ModuleInfo], ranks: list[int], alphas: list[float], per_rank_cost: list[int], r: int,
    use_rslora: bool,
) -> list[ModulePlan]:
    """The plan entry of every module: its rank, scale alpha_l / r (/ sqrt(r) with rsLoRA) and PEFT's lora_alpha."""
    norm = math.sqrt if use_rslora else float
    total_rank = sum(ranks)
    entries = []
    for module, rank, alpha, cost in zip(modules, ranks, alphas, per_rank_cost):
        scaling = alpha / norm(r)
        layer, module_type = layer_and_type(module.name)
        entries.append(
            ModulePlan(
                name=module.name,
                out_features=module.out_features,
                in_features=module.in_features,
                sensitivity=module.sensitivity,
                rank=rank,
                alpha=alpha,
                scaling=scaling,
                lora_alpha=scaling * norm(rank) if rank > 0 else 0.0,
                budget_share=rank / total_rank if total_rank else 0.0,
                trainable_parameters=rank * cost,
                layer=layer,
                module_type=module_type,
            )
        )
    return entries
