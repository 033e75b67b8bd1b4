"""Per-module ranks and alphas reach exactly their module, also when one module's name ends with another's."""

import pytest
import torch
from peft import PeftModel
from torch import nn

from tlora import TLoRAConfig
from tlora.allocation import ModuleInfo, derive_plan
from tlora.pipeline import apply_plan


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])


class Nested(nn.Module):
    """Names `layers.1.q` and `enc.layers.1.q`: the first is a dotted suffix of the second."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = Stack().layers
        self.enc = Stack()

    def forward(self, x):
        return self.layers[1].q(x) + self.enc.layers[1].q(x)


def _plan(config, ranks, alphas):
    """A plan for the two nested modules (short name first, so a suffix match would capture the long one)."""
    names = ["layers.1.q", "enc.layers.1.q"]
    plan = derive_plan([ModuleInfo(n, 8, 8, 1.0) for n in names], r=config.r, lora_alpha=config.lora_alpha)
    for module, rank, alpha in zip(plan.modules, ranks, alphas):
        module.rank, module.lora_alpha = rank, alpha
    return plan


def _lora_A(plan):
    generator = torch.Generator().manual_seed(0)
    return {m.name: torch.linalg.qr(torch.randn(8, 8, generator=generator))[0][: m.rank] for m in plan.modules if m.rank}


def _layers(peft_model):
    return {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules() if hasattr(module, "scaling")}


@pytest.mark.parametrize("ranks,alphas", [((4, 4), (4.0, 16.0)), ((2, 6), (8.0, 3.0))])
def test_rank_and_alpha_patterns_reach_exactly_their_module(ranks, alphas, tmp_path):
    config = TLoRAConfig(r=4, lora_alpha=4, target_modules=["q"])
    plan = _plan(config, ranks, alphas)
    model = apply_plan(Nested(), plan, _lora_A(plan), config)
    layers = _layers(model)
    expected = {"layers.1.q": (ranks[0], alphas[0] / ranks[0]), "enc.layers.1.q": (ranks[1], alphas[1] / ranks[1])}
    assert {n: (layers[n].r["default"], layers[n].scaling["default"]) for n in expected} == expected

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(Nested(), str(tmp_path))
    again = _layers(reloaded)
    assert {n: (again[n].r["default"], again[n].scaling["default"]) for n in expected} == expected


def test_a_dropped_module_whose_name_ends_with_an_adapted_one_gets_no_adapter(tmp_path):
    config = TLoRAConfig(r=4, lora_alpha=4, target_modules=["q"])
    plan = _plan(config, (4, 0), (4.0, 0.0))
    model = apply_plan(Nested(), plan, _lora_A(plan), config)
    assert sorted(_layers(model)) == ["layers.1.q"]
    model.save_pretrained(tmp_path)
    assert sorted(_layers(PeftModel.from_pretrained(Nested(), str(tmp_path)))) == ["layers.1.q"]
