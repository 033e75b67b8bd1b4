"""Allocation of ranks and scales: exact budget, caps, minimums, proportionality, determinism."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_reference import reference_ranks
from tlora import BudgetError, allocate_ranks, allocate_scales, derive_plan
from tlora.allocation import ModuleInfo, TLoRAPlan, proportional_shares

sensitivity_lists = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e3)), min_size=1, max_size=40
)


@st.composite
def problems(draw):
    values = draw(sensitivity_lists)
    if sum(values) == 0:
        values[0] = 1.0
    capacities = [draw(st.integers(min_value=1, max_value=64)) for _ in values]
    min_rank = draw(st.integers(min_value=0, max_value=4))
    low = sum(min(min_rank, c) for c in capacities)
    reachable = sum(c if v > 0 else min(min_rank, c) for v, c in zip(values, capacities))
    budget = draw(st.integers(min_value=max(1, low), max_value=max(1, low, reachable)))
    return values, capacities, budget, min_rank


@settings(max_examples=300, deadline=None)
@given(problems())
def test_rank_budget_is_spent_exactly_within_caps_and_minimums(problem):
    values, capacities, budget, min_rank = problem
    ranks = allocate_ranks(values, capacities, budget, min_rank)
    assert sum(ranks) == budget
    for rank, cap in zip(ranks, capacities):
        assert min(min_rank, cap) <= rank <= cap


@settings(max_examples=300, deadline=None)
@given(problems())
def test_ranks_are_within_one_of_the_bounded_proportional_share(problem):
    values, capacities, budget, min_rank = problem
    lower = [min(min_rank, c) for c in capacities]
    shares = proportional_shares(values, budget, lower, capacities)
    assert sum(shares) == pytest.approx(budget, rel=1e-9, abs=1e-6)
    ranks = allocate_ranks(values, capacities, budget, min_rank)
    for rank, share in zip(ranks, shares):
        assert math.floor(share + 1e-9) <= rank <= math.ceil(share - 1e-9)


@settings(max_examples=200, deadline=None)
@given(problems())
def test_more_sensitive_modules_never_get_fewer_ranks_at_equal_capacity(problem):
    values, capacities, budget, min_rank = problem
    ranks = allocate_ranks(values, capacities, budget, min_rank)
    for i in range(len(values)):
        for j in range(len(values)):
            if capacities[i] == capacities[j] and values[i] > values[j]:
                assert ranks[i] >= ranks[j]


@settings(max_examples=200, deadline=None)
@given(problems())
def test_allocation_agrees_with_the_bisection_reference(problem):
    values, capacities, budget, min_rank = problem
    if len(set(values)) < len(values):
        return  # exact ties may be ordered differently by floating-point noise
    assert allocate_ranks(values, capacities, budget, min_rank) == reference_ranks(values, capacities, budget, min_rank)


def test_allocation_is_deterministic_and_breaks_ties_by_order():
    values = [1.0, 1.0, 1.0]
    assert allocate_ranks(values, [8, 8, 8], 4) == [2, 1, 1]
    assert all(allocate_ranks(values, [8, 8, 8], 4) == [2, 1, 1] for _ in range(5))


def test_capped_module_excess_goes_to_the_others_in_proportion():
    ranks = allocate_ranks([10.0, 1.0, 3.0], [2, 100, 100], 42)
    assert ranks[0] == 2
    assert ranks[1] + ranks[2] == 40 and ranks[2] == 30 and ranks[1] == 10


def test_min_rank_is_honoured_and_zero_sensitivity_gets_min_rank():
    assert allocate_ranks([5.0, 0.0, 1.0], [16, 16, 16], 12, min_rank=2) == [8, 2, 2]
    assert allocate_ranks([5.0, 0.0, 1.0], [16, 16, 16], 12)[1] == 0


def test_parameter_budget_is_never_exceeded_and_nearly_spent():
    values, capacities, costs = [3.0, 1.0, 2.0], [64, 64, 64], [100, 300, 50]
    ranks = allocate_ranks(values, capacities, 5000, costs=costs)
    spent = sum(r * c for r, c in zip(ranks, costs))
    assert spent <= 5000 and 5000 - spent < max(costs)


@pytest.mark.parametrize(
    "values, capacities, budget, min_rank, message",
    [
        ([1.0, 1.0], [4, 4], 9, 0, "exceeds"),
        ([1.0, 1.0], [4, 4], 3, 2, "minimum ranks"),
        ([0.0, 0.0], [4, 4], 4, 0, "all sensitivities are zero"),
        ([0.0, 1.0], [2, 1], 3, 0, "non-zero sensitivity"),
    ],
)
def test_impossible_budgets_raise_clear_errors(values, capacities, budget, min_rank, message):
    with pytest.raises(BudgetError, match=message):
        allocate_ranks(values, capacities, budget, min_rank)


def test_scales_follow_the_method():
    # alpha_l = max(alpha, round(alpha * L * S_l / sum S)), halves rounded up
    assert allocate_scales([1.0, 1.0, 2.0], 16) == [16, 16, 24]
    assert allocate_scales([0.5, 0.25, 0.25], 2) == [3, 2, 2]  # 2*3*0.5 = 3.0; 2*3*0.25 = 1.5 -> 2 = alpha


def _modules():
    return [
        ModuleInfo("model.layers.0.self_attn.q_proj", 64, 64, 4.0),
        ModuleInfo("model.layers.0.mlp.down_proj", 64, 172, 1.0),
        ModuleInfo("model.layers.1.self_attn.q_proj", 64, 64, 0.0),
    ]


def test_plan_realises_effective_scaling_through_alpha_pattern():
    plan = derive_plan(_modules(), r=8, lora_alpha=16)
    assert plan.total_rank == 24 and plan.budget_spent == 24
    assert plan.dropped_modules == ["model.layers.1.self_attn.q_proj"]
    for entry in plan.modules:
        if entry.rank:
            assert entry.lora_alpha / entry.rank == pytest.approx(entry.alpha / 8)
            assert plan.alpha_pattern()[entry.name] == entry.lora_alpha
            assert plan.rank_pattern()[entry.name] == entry.rank
    assert plan.module("model.layers.0.self_attn.q_proj").layer == 0
    assert plan.module("model.layers.0.mlp.down_proj").module_type == "mlp.down_proj"
    assert plan.trainable_parameters == sum(e.rank * e.out_features for e in plan.modules)
    assert plan.lora_trainable_parameters == 8 * (128 + 236 + 128)


def test_rslora_plan_divides_by_sqrt_of_the_rank():
    plan = derive_plan(_modules(), r=16, lora_alpha=16, use_rslora=True, allocate_scales_=False)
    for entry in plan.modules:
        if entry.rank:
            assert entry.lora_alpha / math.sqrt(entry.rank) == pytest.approx(16 / math.sqrt(16))


def test_plan_json_round_trip(tmp_path):
    plan = derive_plan(_modules(), r=8, lora_alpha=16, parameter_budget=2000)
    assert plan.budget_type == "parameters" and plan.budget_spent <= 2000
    path = plan.save(tmp_path / "tlora_plan.json")
    assert TLoRAPlan.load(path) == plan


def test_derive_plan_rejects_budget_below_min_rank():
    with pytest.raises(BudgetError, match="min_rank=4"):
        derive_plan(_modules(), r=8, lora_alpha=8, rank_budget=10, min_rank=4)


def _four_modules():
    return [ModuleInfo(f"model.layers.{i}.self_attn.q_proj", 64, 64, s) for i, s in enumerate([10.0, 1.0, 3.0, 2.0])]


def test_max_rank_caps_ranks_and_the_excess_goes_to_the_others_in_proportion():
    plan = derive_plan(_four_modules(), r=10, lora_alpha=10, max_rank=12)
    # Shares 10 : 1 : 3 : 2 of 40; the first two are capped at 12, the rest 16 split 1 : 2 = 5.33 : 10.67.
    assert [entry.rank for entry in plan.modules] == [12, 5, 12, 11]
    assert plan.budget_spent == plan.total_rank == 40 and plan.max_rank == 12
    assert TLoRAPlan.from_dict(json.loads(plan.to_json())) == plan
    uncapped = derive_plan(_four_modules(), r=10, lora_alpha=10)
    assert max(entry.rank for entry in uncapped.modules) == 25 and uncapped.max_rank is None


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(min_value=1, max_value=64))
def test_max_rank_is_respected_and_the_budget_spent_exactly(problem, max_rank):
    values, capacities, _, _ = problem
    modules = [ModuleInfo(f"m{i}", cap, 2 * cap, value) for i, (cap, value) in enumerate(zip(capacities, values))]
    reachable = sum(min(cap, max_rank) for cap, value in zip(capacities, values) if value > 0)
    budget = max(1, reachable // 2)
    plan = derive_plan(modules, r=1, lora_alpha=1, rank_budget=budget, max_rank=max_rank)
    assert plan.total_rank == budget
    assert all(entry.rank <= min(max_rank, entry.out_features) for entry in plan.modules)
    # The cap is the capacity min(m, n, max_rank) of the existing allocation rule.
    capped = [min(cap, max_rank) for cap in capacities]
    assert [entry.rank for entry in plan.modules] == allocate_ranks(values, capped, budget)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"max_rank": 0}, ValueError, "max_rank must be a positive integer"),
        ({"max_rank": 2.5}, ValueError, "max_rank must be a positive integer"),
        ({"max_rank": True}, ValueError, "max_rank must be a positive integer"),
        ({"max_rank": 2, "min_rank": 3}, ValueError, "max_rank=2 is below min_rank=3"),
        ({"max_rank": 9}, BudgetError, r"rank budget 40 exceeds max_rank=9 x 4 target modules = 36"),
        ({"max_rank": 4, "parameter_budget": 64 * 17}, BudgetError, "ranks capped at max_rank=4"),
    ],
)
def test_max_rank_is_validated_and_must_hold_the_budget(options, error, message):
    with pytest.raises(error, match=message):
        derive_plan(_four_modules(), r=10, lora_alpha=10, **options)


def test_tlora_config_checks_max_rank_against_r():
    from tlora import TLoRAConfig

    assert TLoRAConfig(r=8, max_rank=8).max_rank == 8
    assert TLoRAConfig(r=16, max_rank=8, rank_budget=32).max_rank == 8  # an explicit budget is checked at allocation
    with pytest.raises(BudgetError, match="r=16; lower r to at most 8"):
        TLoRAConfig(r=16, max_rank=8)
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        TLoRAConfig(r=8, max_rank=-1)
