"""PyTorch stand-ins for Megatron-Core's three expert classes, for testing dump_experts.py
without Megatron or TransformerEngine.

Each stand-in has the real class's state-dict names, call contract
``forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs) -> (out, None)``
and eager math with Megatron's rounding points (spec §4.4-§4.8):

* ``SequentialMLP``: per expert ``fc1 = x·W1ᵀ`` (one GEMM rounding), ``+ b1`` as a separate
  op, ``z = act(gate)·(lin + offset)`` with the optional clamp, ``u = (z·p).to(dtype)``,
  ``y = u·W2ᵀ``, then ``y += b2·p`` (fp32 product and sum, stored in the dtype).
* ``GroupedMLP``: ``weight1`` ``[h, E_l·N1]`` used as ``weight1.view(E_l, h, -1)[e]``
  (``[in, out]``), ``weight2.view(E_l, -1, h)[e]``; the activation-with-probs chain kept in
  fp32 and rounded once (what the ``torch.compile``d helper does); no bias.
* ``TEGroupedMLP``: ``linear_fc1.weight{e}``/``bias{e}``, ``linear_fc2.weight{e}``/``bias{e}``;
  fc1's bias inside the GEMM (``addmm``: fp32 accumulate, one rounding), the same eager
  activation as ``SequentialMLP``, and fc2's bias as ``round(out + b2·p)`` computed in fp32.

The class names match Megatron's, so ``dump_experts`` infers the layer from them. Both
linears carry an ``_extra_state`` entry (an empty tensor, as TE writes when not in fp8) that
the dump must leave out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": quick_gelu, "squared_relu": squared_relu}


@dataclass
class StandinConfig:
    """The TransformerConfig attributes dump_experts reads, with Megatron's names."""

    num_moe_experts: int
    hidden_size: int
    moe_ffn_hidden_size: int
    gated_linear_unit: bool = True
    activation_func: Callable = F.silu
    add_bias_linear: bool = False
    params_dtype: torch.dtype = torch.bfloat16
    moe_apply_probs_on_input: bool = False
    glu_linear_offset: float = 0.0
    activation_func_clamp_value: Optional[float] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    delay_wgrad_compute: bool = False


class _Linear(torch.nn.Module):
    """Holds parameters under given names and an empty ``_extra_state``."""

    def get_extra_state(self):
        return torch.empty(0)

    def set_extra_state(self, state):
        pass


def _param(shape, fan_in, dtype, device, gen, scale=1.0):
    t = (torch.rand(shape, generator=gen) * 2 - 1) * (scale / math.sqrt(fan_in))
    return torch.nn.Parameter(t.to(dtype=dtype, device=device))


def _activation(cfg: StandinConfig, a: torch.Tensor) -> torch.Tensor:
    """Megatron's generic eager activation (MLP / TEGroupedMLP non-fused path)."""
    act = cfg.activation_func
    if not cfg.gated_linear_unit:
        return act(a)
    g, l = torch.chunk(a, 2, dim=-1)
    c = cfg.activation_func_clamp_value
    if c is not None:
        g = g.clamp(min=None, max=c)
        l = l.clamp(min=-c, max=c)
    return act(g) * (l + cfg.glu_linear_offset)


def _scale_input(cfg: StandinConfig, x: torch.Tensor, probs: torch.Tensor):
    """moe_apply_probs_on_input (§4.7): x <- cast(p·x), probs <- ones."""
    if not cfg.moe_apply_probs_on_input:
        return x, probs
    x = (probs.unsqueeze(-1) * x).to(x.dtype)
    return x, torch.ones_like(probs).detach()


class _Base(torch.nn.Module):
    def __init__(self, config: StandinConfig, device):
        super().__init__()
        self.config = config
        self.num_local_experts = config.num_moe_experts // config.expert_model_parallel_size
        t = config.expert_tensor_parallel_size
        self.n2 = config.moe_ffn_hidden_size // t
        self.n1 = 2 * self.n2 if config.gated_linear_unit else self.n2
        self.h = config.hidden_size
        self.dtype = config.params_dtype
        self.device = device

    def _counts(self, tokens_per_expert) -> List[int]:
        if isinstance(tokens_per_expert, torch.Tensor):
            return [int(v) for v in tokens_per_expert.tolist()]
        return [int(v) for v in tokens_per_expert]


class SequentialMLP(_Base):
    def __init__(self, config: StandinConfig, device="cuda", seed=0):
        super().__init__(config, device)
        gen = torch.Generator().manual_seed(seed)
        experts = []
        for _ in range(self.num_local_experts):
            mlp = torch.nn.Module()
            mlp.linear_fc1 = _Linear()
            mlp.linear_fc2 = _Linear()
            mlp.linear_fc1.weight = _param((self.n1, self.h), self.h, self.dtype, device, gen)
            mlp.linear_fc2.weight = _param((self.h, self.n2), config.moe_ffn_hidden_size, self.dtype, device, gen)
            if config.add_bias_linear:
                mlp.linear_fc1.bias = _param((self.n1,), 4, self.dtype, device, gen)
                mlp.linear_fc2.bias = _param((self.h,), 4, self.dtype, device, gen)
            experts.append(mlp)
        self.local_experts = torch.nn.ModuleList(experts)

    def _expert(self, mlp, x, p):
        cfg = self.config
        a = torch.matmul(x, mlp.linear_fc1.weight.t())
        if cfg.add_bias_linear:
            a = a + mlp.linear_fc1.bias  # separate op: second rounding (§4.2)
        z = _activation(cfg, a)
        u = (z * p.unsqueeze(-1)).to(z.dtype)
        y = torch.matmul(u, mlp.linear_fc2.weight.t())
        if cfg.add_bias_linear:
            # MLP.forward: output += b2 * per_token_scale (fp32 product and sum, stored in y's dtype)
            y = (y.float() + mlp.linear_fc2.bias.float() * p.unsqueeze(-1).float()).to(y.dtype)
        return y

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x, p = _scale_input(self.config, permuted_local_hidden_states, permuted_probs)
        if self.num_local_experts == 1:  # Megatron ignores tokens_per_expert here (§4.1)
            return self._expert(self.local_experts[0], x, p), None
        counts = self._counts(tokens_per_expert)
        xs, ps = torch.split(x, counts), torch.split(p, counts)
        outs = [self._expert(m, xc, pc) for m, xc, pc in zip(self.local_experts, xs, ps)]
        return torch.cat(outs, dim=0), None


class GroupedMLP(_Base):
    def __init__(self, config: StandinConfig, device="cuda", seed=0):
        super().__init__(config, device)
        assert not config.add_bias_linear, "GroupedMLP has no bias"
        gen = torch.Generator().manual_seed(seed)
        el = self.num_local_experts
        self.weight1 = _param((self.h, el * self.n1), self.h, self.dtype, device, gen)
        self.weight2 = _param((el * self.n2, self.h), config.moe_ffn_hidden_size, self.dtype, device, gen)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        cfg = self.config
        x, p = _scale_input(cfg, permuted_local_hidden_states, permuted_probs)
        el = self.num_local_experts
        w1 = self.weight1.view(el, self.h, -1)  # the reinterpretation of spec §3.3
        w2 = self.weight2.view(el, -1, self.h)
        counts = self._counts(tokens_per_expert)
        fc1 = torch.cat([torch.matmul(xc, w1[e]) for e, xc in enumerate(torch.split(x, counts))], dim=0)
        # activation_func_with_probs: fp32 chain (clamp and offset ignored), one cast
        a = fc1.float()
        if cfg.gated_linear_unit:
            g, l = torch.chunk(a, 2, dim=-1)
            z = cfg.activation_func(g) * l
        else:
            z = cfg.activation_func(a)
        u = (z * p.unsqueeze(-1).float()).to(fc1.dtype)
        out = torch.cat([torch.matmul(uc, w2[e]) for e, uc in enumerate(torch.split(u, counts))], dim=0)
        return out, None


class TEGroupedMLP(_Base):
    def __init__(self, config: StandinConfig, device="cuda", seed=0):
        super().__init__(config, device)
        gen = torch.Generator().manual_seed(seed)
        self.linear_fc1 = _Linear()
        self.linear_fc2 = _Linear()
        for e in range(self.num_local_experts):
            setattr(self.linear_fc1, f"weight{e}", _param((self.n1, self.h), self.h, self.dtype, device, gen))
            setattr(self.linear_fc2, f"weight{e}",
                    _param((self.h, self.n2), config.moe_ffn_hidden_size, self.dtype, device, gen))
        if config.add_bias_linear:
            for e in range(self.num_local_experts):
                setattr(self.linear_fc1, f"bias{e}", _param((self.n1,), 4, self.dtype, device, gen))
            for e in range(self.num_local_experts):
                setattr(self.linear_fc2, f"bias{e}", _param((self.h,), 4, self.dtype, device, gen))

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        cfg = self.config
        x, p = _scale_input(cfg, permuted_local_hidden_states, permuted_probs)
        counts = self._counts(tokens_per_expert)
        xs, ps = torch.split(x, counts), torch.split(p, counts)
        outs = []
        for e, (xc, pc) in enumerate(zip(xs, ps)):
            w1 = getattr(self.linear_fc1, f"weight{e}")
            if cfg.add_bias_linear:
                # TE passes the bias to the GEMM: fp32 accumulate + bias, one rounding.
                a = torch.addmm(getattr(self.linear_fc1, f"bias{e}"), xc, w1.t())
            else:
                a = torch.matmul(xc, w1.t())
            z = _activation(cfg, a)
            u = (z * pc.unsqueeze(-1)).to(z.dtype)
            y = torch.matmul(u, getattr(self.linear_fc2, f"weight{e}").t())
            if cfg.add_bias_linear:
                # _apply_bias: round(out + b2·p), computed in fp32
                b2 = getattr(self.linear_fc2, f"bias{e}")
                y = (y.float() + b2.float() * pc.unsqueeze(-1).float()).to(y.dtype)
            outs.append(y)
        return torch.cat(outs, dim=0), None


CLASSES = {"sequential": SequentialMLP, "grouped": GroupedMLP, "te_grouped": TEGroupedMLP}
