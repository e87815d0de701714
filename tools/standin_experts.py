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

FP8 without TransformerEngine: with ``config.fp8`` (``"e4m3"`` or ``"hybrid"``, Megatron's
``--fp8-format``) and ``config.fp8_recipe`` ``"tensorwise"`` (TE's ``Float8CurrentScaling``:
``scale = 448/amax`` in f32, per tensor) or ``"delayed"`` (TE's ``DelayedScaling`` at its first
step: scale 1), SequentialMLP and TEGroupedMLP pad each expert's rows to 16 with zero rows and
zero probs (Megatron's ``get_fp8_align_size``) and run every linear's three GEMMs through
``torch._scaled_mm`` on ``torch.float8_e4m3fn``/``float8_e5m2`` operands, quantized as TE
quantizes them: fprop ``x``, ``W`` (E4M3), dgrad ``dy`` (E5M2 with ``hybrid``) times ``W``'s
transposed bytes, wgrad ``dyᵀ`` times ``xᵀ`` (the same bytes transposed, same scales); bias
gradients from the high-precision ``dy``. ``_scaled_mm`` runs on CUDA (sm_89+) and, in recent
torch, on CPU. ``fp8_weights()`` returns each weight as quantized in the last forward, for the
dump's ``fp8.<parameter>`` tensors. Blockwise and MXFP8 have no stand-in here (their block
scales need TE or torch's blockwise ``_scaled_mm``, not used).
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
    fp8: Optional[str] = None  # Megatron's --fp8-format: "e4m3" or "hybrid"
    fp8_recipe: str = "tensorwise"  # "tensorwise" (current scaling) or "delayed" (first step)


_FP8_ALIGN = 16  # Megatron's get_fp8_align_size for every recipe but MXFP8


def _quantize(t: torch.Tensor, dtype: torch.dtype, recipe: str):
    """TE's per-tensor quantization of ``t``: codes and ``scale_inv`` (f32 scalar tensor).
    Current scaling: ``scale = fp8_max / amax`` (f32 division; amax 0 -> scale 1); delayed
    scaling's first step: scale 1. The cast is PyTorch's (RNE); TE's satfinite cast agrees
    because ``|t·scale|`` never exceeds the format's largest value here (checked)."""
    fp8_max = torch.finfo(dtype).max
    t32 = t.float()
    if recipe == "tensorwise":
        amax = t32.abs().max() if t32.numel() else torch.zeros((), device=t.device)
        scale = torch.where(amax > 0, torch.tensor(fp8_max, device=t.device, dtype=torch.float32) / amax,
                            torch.ones((), device=t.device))
    elif recipe == "delayed":
        scale = torch.ones((), device=t.device)
    else:
        raise ValueError(f"the stand-in has no {recipe!r} recipe (tensorwise or delayed)")
    scaled = t32 * scale
    # Below max + half an ulp both casts round to at most max; from there TE saturates and
    # PyTorch's cast gives NaN (E4M3) or inf (E5M2).
    limit = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}[dtype]
    if scaled.numel() and scaled.abs().max() >= limit:
        raise ValueError(f"|x·scale| reaches {limit}: TE would saturate, PyTorch's cast would not")
    return scaled.to(dtype), torch.reciprocal(scale).float()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major (what ``_scaled_mm`` wants as its second operand)."""
    return t.t().contiguous().t()


class _Fp8Linear(torch.autograd.Function):
    """``y = x·Wᵀ (+ bias)`` as TE's fp8 Linear/GroupedLinear GEMMs (per-tensor scales)."""

    @staticmethod
    def forward(ctx, x, w, bias, recipe, grad_dtype, store):
        xq, xs = _quantize(x, torch.float8_e4m3fn, recipe)
        wq, ws = _quantize(w, torch.float8_e4m3fn, recipe)
        if store is not None:
            store.append((wq, ws))
        kw = {"bias": bias} if bias is not None else {}
        y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype, **kw)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.recipe, ctx.grad_dtype, ctx.has_bias, ctx.out_dtype = recipe, grad_dtype, bias is not None, x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        dyq, dys = _quantize(dy, ctx.grad_dtype, ctx.recipe)
        # dgrad dx = dy·W (W's columnwise copy: its bytes transposed), wgrad dW = dyᵀ·x.
        dx = torch._scaled_mm(dyq, _col_major(wq), scale_a=dys, scale_b=ws, out_dtype=ctx.out_dtype)
        dw = torch._scaled_mm(dyq.t().contiguous(), _col_major(xq), scale_a=dys, scale_b=xs, out_dtype=ctx.out_dtype)
        db = dy.float().sum(0).to(ctx.out_dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None


def _fp8_grad_dtype(cfg) -> torch.dtype:
    if cfg.fp8 not in ("e4m3", "hybrid"):
        raise ValueError(f"config.fp8 must be 'e4m3' or 'hybrid', not {cfg.fp8!r}")
    return torch.float8_e5m2 if cfg.fp8 == "hybrid" else torch.float8_e4m3fn


def _linear(cfg, x, w, bias=None, store=None):
    """``x·Wᵀ (+ bias inside the GEMM)``, in fp8 when ``cfg.fp8`` is set."""
    if cfg.fp8:
        return _Fp8Linear.apply(x, w, bias, cfg.fp8_recipe, _fp8_grad_dtype(cfg), store)
    if bias is not None:
        return torch.addmm(bias, x, w.t())
    return torch.matmul(x, w.t())


def _pad_rows(cfg, x, p):
    """Megatron's padding of one expert's rows for fp8 (zero rows, zero probs): (x, p, n)."""
    n = x.shape[0]
    pad = (-n) % _FP8_ALIGN if cfg.fp8 else 0
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        p = torch.cat([p, p.new_zeros(pad)])
    return x, p, n


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
    _fp8_store = None

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
        if x.shape[0] == 0 and cfg.fp8:  # no fp8 GEMM for an empty expert: zero grads
            return x.new_zeros(0, self.h) + sum(0 * t.sum() for t in mlp.parameters())
        x, p, n = _pad_rows(cfg, x, p)
        store = self._fp8_store
        if store is not None:
            self._fp8_ran.append(list(self.local_experts).index(mlp))
        a = _linear(cfg, x, mlp.linear_fc1.weight, store=store)
        if cfg.add_bias_linear:
            a = a + mlp.linear_fc1.bias  # separate op: second rounding (§4.2)
        z = _activation(cfg, a)
        u = (z * p.unsqueeze(-1)).to(z.dtype)
        y = _linear(cfg, u, mlp.linear_fc2.weight, store=store)
        if cfg.add_bias_linear:
            # MLP.forward: output += b2 * per_token_scale (fp32 product and sum, stored in y's dtype)
            y = (y.float() + mlp.linear_fc2.bias.float() * p.unsqueeze(-1).float()).to(y.dtype)
        return y[:n]

    def fp8_weights(self):
        """``{parameter name: (codes, scale_inv)}`` of the last forward's quantized weights (experts
        with tokens; an fp8 GEMM is not run for an empty expert)."""
        names = [f"local_experts.{e}.linear_fc{i}.weight" for e in self._fp8_ran for i in (1, 2)]
        return dict(zip(names, self._fp8_store or []))

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        self._fp8_store = [] if self.config.fp8 else None
        self._fp8_ran = []
        return self._forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)

    def _forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
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
    _fp8_store = None

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
        self._fp8_store = [] if cfg.fp8 else None
        self._fp8_ran = [c > 0 for c in counts]
        for e, (xc, pc) in enumerate(zip(xs, ps)):
            w1 = getattr(self.linear_fc1, f"weight{e}")
            w2 = getattr(self.linear_fc2, f"weight{e}")
            if xc.shape[0] == 0 and cfg.fp8:  # no fp8 GEMM for an empty expert: zero grads
                own = [t for n, t in self.named_parameters() if n.endswith(f"weight{e}") or n.endswith(f"bias{e}")]
                outs.append(xc.new_zeros(0, self.h) + sum(0 * t.sum() for t in own))
                continue
            xc, pc, n = _pad_rows(cfg, xc, pc)
            # TE passes the bias to the GEMM: fp32 accumulate + bias, one rounding.
            b1 = getattr(self.linear_fc1, f"bias{e}") if cfg.add_bias_linear else None
            a = _linear(cfg, xc, w1, b1, store=self._fp8_store)
            z = _activation(cfg, a)
            u = (z * pc.unsqueeze(-1)).to(z.dtype)
            y = _linear(cfg, u, w2, store=self._fp8_store)
            if cfg.add_bias_linear:
                # _apply_bias: round(out + b2·p), computed in fp32
                b2 = getattr(self.linear_fc2, f"bias{e}")
                y = (y.float() + b2.float() * pc.unsqueeze(-1).float()).to(y.dtype)
            outs.append(y[:n])
        return torch.cat(outs, dim=0), None

    def fp8_weights(self):
        """``{parameter name: (codes, scale_inv)}`` of the last forward's quantized weights (experts
        with tokens; an fp8 GEMM is not run for an empty expert)."""
        out, store = {}, list(self._fp8_store or [])
        for e in range(self.num_local_experts):
            if self._fp8_ran[e]:
                out[f"linear_fc1.weight{e}"], out[f"linear_fc2.weight{e}"] = store.pop(0), store.pop(0)
        return out


CLASSES = {"sequential": SequentialMLP, "grouped": GroupedMLP, "te_grouped": TEGroupedMLP}
