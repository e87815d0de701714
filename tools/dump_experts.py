"""Write a ``moe-expert-dump/1`` file from a Megatron-Core expert module.

Usage (see docs/dumps.md)::

    from dump_experts import dump_experts
    dump_experts(model.decoder.layers[3].mlp.experts,      # SequentialMLP / GroupedMLP / TEGroupedMLP
                 permuted_hidden, tokens_per_expert, permuted_probs,
                 "layer3.safetensors", tp_rank=..., ep_rank=...)

then ``moe-verify compare layer3.safetensors``.

The function runs one forward and one backward through the module, and writes its parameters
(``module.state_dict()`` minus ``_extra_state`` entries), the inputs, the upstream gradient and
what the module computed (output, input/probs gradients, every parameter gradient) into one
safetensors file, with the layer configuration as string metadata. It needs only ``torch`` and
``safetensors`` (and falls back to a built-in writer of the safetensors format when the
``safetensors`` package is missing).

FP8: with ``config.fp8`` set (Megatron's ``--fp8-format``, ``e4m3`` or ``hybrid``) the forward and
backward run inside Megatron's fp8 context (``megatron.core.fp8_utils.get_fp8_context``, i.e.
TransformerEngine's ``fp8_autocast`` with the configured recipe) and the dump records
``fp8_recipe``/``fp8_format`` (read back from TE's active recipe when TE is there, else from
``config.fp8_recipe``), ``fp8_pad_to_alignment`` (false with
``moe_router_padding_for_quantization``) and ``fp8_activation_input_store``. ``moe-verify
compare`` models the first fp8 step of a fresh module (delayed scaling: scale 1), so dump a
fresh module. A module with an ``fp8_weights()`` method (the stand-ins) also gets its quantized
weights written as ``fp8.<parameter>`` and ``fp8.<parameter>.scale_inv``.
"""

from __future__ import annotations

import contextlib
import json
import struct
import warnings
from typing import Any, Dict, Optional, Sequence, Union

import torch

FORMAT = "moe-expert-dump/1"

_LAYERS = {
    "SequentialMLP": "sequential",
    "GroupedMLP": "grouped",
    "TEGroupedMLP": "te_grouped",
    "InferenceGroupedMLP": "te_grouped",  # in training mode it is TEGroupedMLP
}
_ACTIVATIONS = {
    "silu": "silu",
    "swiglu": "silu",
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "squared_relu": "squared_relu",
}
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# TE recipe class -> the dump's fp8_recipe (Megatron's --fp8-recipe names).
_TE_RECIPES = {
    "Float8CurrentScaling": "tensorwise",
    "DelayedScaling": "delayed",
    "Float8BlockScaling": "blockwise",
    "MXFP8BlockScaling": "mxfp8",
}


def _enum_value(v: Any) -> Any:
    return getattr(v, "value", v)


def _fp8_context(config: Any):
    """Megatron's fp8 context for ``config`` (TE's fp8_autocast with its recipe); a null context
    without Megatron (the stand-ins quantize by themselves)."""
    try:
        from megatron.core.fp8_utils import get_fp8_context
    except ImportError:
        return contextlib.nullcontext()
    return get_fp8_context(config)


def _te_active_recipe() -> Optional[Dict[str, str]]:
    """The recipe of TE's active fp8_autocast, as dump metadata; None without TE or outside one."""
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    except ImportError:
        return None
    if not FP8GlobalStateManager.is_fp8_enabled():
        return None
    recipe = FP8GlobalStateManager.get_fp8_recipe()
    name = _TE_RECIPES.get(type(recipe).__name__)
    if name is None:
        raise ValueError(f"TE recipe {type(recipe).__name__} is not covered by the dump format "
                         f"(expected one of {sorted(_TE_RECIPES)})")
    fmt = recipe.fp8_format  # TE's Format enum (its values are tuples): use the member name
    out = {"fp8_recipe": name, "fp8_format": str(getattr(fmt, "name", fmt)).split(".")[-1].lower()}
    qparams = getattr(recipe, "fp8_quant_fwd_weight", None)  # current and block scaling's QParams
    if name in ("tensorwise", "blockwise") and qparams is not None:
        out["fp8_power_2_scales"] = "true" if qparams.power_2_scale else "false"
    return out


def _layer_of(module: torch.nn.Module) -> str:
    for cls in type(module).__mro__:
        if cls.__name__ in _LAYERS:
            return _LAYERS[cls.__name__]
    raise ValueError(
        f"cannot tell the layer class of {type(module).__name__}; pass layer='sequential', "
        "'grouped' or 'te_grouped'"
    )


def _activation_of(config: Any) -> str:
    fn = getattr(config, "activation_func", None)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    raise ValueError(
        f"cannot map activation_func {fn!r} to a dump activation; pass activation='silu', "
        "'gelu', 'quick_gelu' or 'squared_relu'"
    )


def _group_rank_size(module: torch.nn.Module, attr: str) -> Optional[tuple]:
    """(rank, size) of a Megatron process group attribute (``tp_group`` = expert-TP,
    ``ep_group``), or None when the module has none."""
    group = getattr(module, attr, None)
    try:
        return int(group.rank()), int(group.size())
    except Exception:
        return None


def _bool(v: Any) -> str:
    return "true" if bool(v) else "false"


def _num(v: Any) -> str:
    return repr(float(v))


# Set False to use the built-in writer even where the safetensors package is installed (tests).
USE_SAFETENSORS_PACKAGE = True


def _save(tensors: Dict[str, torch.Tensor], path: str, metadata: Dict[str, str]) -> None:
    save_file = None
    if USE_SAFETENSORS_PACKAGE:
        try:
            from safetensors.torch import save_file
        except ImportError:
            save_file = None
    if save_file is not None:
        save_file(tensors, path, metadata=metadata)
        return
    # The safetensors format: u64 little-endian header length, JSON header, raw data.
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    header: Dict[str, Any] = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = bytes(t.reshape(-1).view(torch.uint8).tolist()) if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def dump_experts(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    tokens_per_expert: Union[torch.Tensor, Sequence[int]],
    probs: torch.Tensor,
    path: str,
    grad_output: Optional[torch.Tensor] = None,
    *,
    layer: Optional[str] = None,
    config: Any = None,
    tp_rank: Optional[int] = None,
    ep_rank: Optional[int] = None,
    tp_size: Optional[int] = None,
    ep_size: Optional[int] = None,
    activation: Optional[str] = None,
    ffn_hidden_size: Optional[int] = None,
    gated_linear_unit: Optional[bool] = None,
    add_bias: Optional[bool] = None,
    apply_probs_on_input: Optional[bool] = None,
    glu_linear_offset: Optional[float] = None,
    clamp_value: Optional[float] = None,
    padding_multiple: Optional[int] = None,
    backward: bool = True,
    seed: int = 0,
    extra_metadata: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Run ``module`` forward (and backward) on the given inputs and write a dump to ``path``.

    Args:
        module: a Megatron-Core ``SequentialMLP``, ``GroupedMLP`` or ``TEGroupedMLP`` (or any
            module with the same state-dict names and call contract).
        hidden_states: ``permuted_local_hidden_states`` ``[T, h]`` in the params dtype (leading
            dims ``[s, b, h]`` are flattened to ``[T, h]``).
        tokens_per_expert: ``[E_l]`` counts (int64/int32 tensor or a list), summing to ``T``.
        probs: ``permuted_probs`` ``[T]`` (fp32, or the activation dtype).
        path: the output ``.safetensors`` file.
        grad_output: the upstream gradient ``[T, h]``; when omitted a seeded
            ``0.1 * randn`` (in the params dtype) is used.
        layer, config: override the class (``sequential``/``grouped``/``te_grouped``) and the
            ``TransformerConfig`` (default ``module.config``).
        tp_rank, ep_rank, tp_size, ep_size: this module's expert-tensor-parallel and
            expert-parallel ranks and sizes. Default: read off the module's ``tp_group``
            (Megatron's ``pg_collection.expt_tp``) and ``ep_group``; without those, rank 0 and
            the config's ``expert_tensor_parallel_size`` (else ``tensor_model_parallel_size``)
            and ``expert_model_parallel_size``.
        activation, ffn_hidden_size, gated_linear_unit, add_bias, apply_probs_on_input,
        glu_linear_offset, clamp_value, padding_multiple: override what is read off the config.
        backward: set False to dump only ``expected.output`` (no gradients).
        seed: seed of the generated ``grad_output``.
        extra_metadata: more string metadata (ignored by ``moe-verify``).

    Returns:
        ``{"path", "metadata", "keys"}`` describing what was written.
    """
    config = config if config is not None else getattr(module, "config", None)

    def cfg(name: str, default: Any = None) -> Any:
        return getattr(config, name, default) if config is not None else default

    def pick(override: Any, value: Any, what: str) -> Any:
        if override is not None:
            return override
        if value is None:
            raise ValueError(f"cannot read {what} off the module's config; pass {what}=...")
        return value

    layer = layer or _layer_of(module)
    if layer not in ("sequential", "grouped", "te_grouped"):
        raise ValueError(f"layer must be sequential, grouped or te_grouped, not {layer!r}")
    if cfg("fp4"):
        raise ValueError("config.fp4 is set: fp4 expert GEMMs are not covered by the dump format")
    fp8 = cfg("fp8")
    if fp8 and str(_enum_value(fp8)).lower() not in ("e4m3", "hybrid"):
        raise ValueError(f"config.fp8 = {fp8!r}: expected e4m3 or hybrid (TE refuses pure e5m2)")
    if cfg("use_te_activation_func"):
        warnings.warn("use_te_activation_func: TE's GELU/GEGLU use the tanh approximation; "
                      "the reference uses exact erf GELU")

    params = [p for p in module.parameters()]
    if not params:
        raise ValueError("the module has no parameters")
    params_dtype = params[0].dtype
    if params_dtype not in _DTYPES:
        raise ValueError(f"params dtype {params_dtype} is not float32, bfloat16 or float16")

    h = hidden_states.shape[-1]
    x_in = hidden_states.detach().reshape(-1, h).clone()
    p_in = probs.detach().reshape(-1).clone()
    if x_in.dtype != params_dtype:
        raise ValueError(f"hidden_states dtype {x_in.dtype} differs from the params dtype {params_dtype}")
    if p_in.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"probs dtype {p_in.dtype}: expected float32 or bfloat16")
    if isinstance(tokens_per_expert, torch.Tensor):
        counts = tokens_per_expert.detach()
        if counts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens_per_expert dtype {counts.dtype}: expected int64 or int32")
    else:
        counts = torch.tensor(list(tokens_per_expert), dtype=torch.int64)
    num_local_experts = getattr(module, "num_local_experts", None) or counts.numel()

    tp_group = _group_rank_size(module, "tp_group")
    ep_group = _group_rank_size(module, "ep_group")
    if tp_rank is None:
        tp_rank = tp_group[0] if tp_group else 0
    if ep_rank is None:
        ep_rank = ep_group[0] if ep_group else 0
    if tp_size is None:
        tp_size = (tp_group[1] if tp_group else None) or cfg("expert_tensor_parallel_size") \
            or cfg("tensor_model_parallel_size") or 1
    if ep_size is None:
        ep_size = (ep_group[1] if ep_group else None) or cfg("expert_model_parallel_size") or 1
    gated = pick(gated_linear_unit, cfg("gated_linear_unit"), "gated_linear_unit")
    metadata = {
        "format": FORMAT,
        "layer": layer,
        "num_local_experts": str(int(num_local_experts)),
        "hidden_size": str(int(h)),
        "ffn_hidden_size": str(int(pick(ffn_hidden_size, cfg("moe_ffn_hidden_size") or cfg("ffn_hidden_size"),
                                        "ffn_hidden_size"))),
        "gated_linear_unit": _bool(gated),
        "activation": activation or _activation_of(config),
        "add_bias": _bool(pick(add_bias, cfg("add_bias_linear"), "add_bias")),
        "params_dtype": _DTYPES[params_dtype],
        "apply_probs_on_input": _bool(pick(apply_probs_on_input, cfg("moe_apply_probs_on_input", False),
                                           "apply_probs_on_input")),
        "glu_linear_offset": _num(pick(glu_linear_offset, cfg("glu_linear_offset", 0.0) or 0.0,
                                       "glu_linear_offset")),
        "tp_size": str(int(tp_size)),
        "tp_rank": str(int(tp_rank)),
        "ep_size": str(int(ep_size)),
        "ep_rank": str(int(ep_rank)),
        "producer": "tools/dump_experts.py",
        "torch_version": torch.__version__,
    }
    clamp = clamp_value if clamp_value is not None else cfg("activation_func_clamp_value")
    if clamp is not None:
        metadata["clamp_value"] = _num(clamp)
    if padding_multiple is not None:
        metadata["padding_multiple"] = str(int(padding_multiple))
    # Megatron-Core >= 0.18.0: TEGroupedMLP with GLU un-interleaves fc1 blocks of this size
    # (experts.py `_remove_glu_interleaving`); SequentialMLP ignores the option, so it is
    # recorded only where it changes what the layer computes (docs/spec §4.10).
    interleave = cfg("moe_mlp_glu_interleave_size")
    if interleave is not None and layer == "te_grouped" and gated:
        metadata["glu_interleave_size"] = str(int(interleave))
    if cfg("num_moe_experts") is not None:
        metadata["num_experts"] = str(int(cfg("num_moe_experts")))
    if fp8:
        recipe = str(_enum_value(cfg("fp8_recipe", "delayed"))).lower()
        if recipe not in _TE_RECIPES.values():
            raise ValueError(f"config.fp8_recipe = {recipe!r}: expected one of {sorted(_TE_RECIPES.values())}")
        metadata["fp8_recipe"] = recipe
        metadata["fp8_format"] = str(_enum_value(fp8)).lower()
        metadata["fp8_pad_to_alignment"] = _bool(not cfg("moe_router_padding_for_quantization", False))
        metadata["fp8_activation_input_store"] = _bool(cfg("activation_func_fp8_input_store", False))
        if recipe == "delayed":
            warnings.warn("delayed scaling: moe-verify compare models the first fp8 step of a fresh module "
                          "(scale 1); dump a fresh module")
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})

    # Forward and backward on fresh leaf copies of the inputs.
    device = params[0].device
    x = x_in.to(device).requires_grad_(backward)
    p = p_in.to(device).requires_grad_(backward)
    module.zero_grad(set_to_none=True)
    for param in params:
        if getattr(param, "main_grad", None) is not None:
            param.main_grad.zero_()  # gradient_accumulation_fusion accumulates into main_grad
    # Without backward, run under no_grad: cheaper, and it sidesteps autograd-only failures
    # such as megatron-core 0.19.2's in-place expert bias add on a custom Function's view.
    fp8_ctx = _fp8_context(config) if fp8 else contextlib.nullcontext()
    with torch.enable_grad() if backward else torch.no_grad():
        with fp8_ctx:
            te_recipe = _te_active_recipe() if fp8 else None
            out = module(x, tokens_per_expert, p)  # the counts exactly as the caller passes them
        if te_recipe is not None:
            # The recipe TE actually ran wins over the config's names; they must agree.
            if te_recipe["fp8_recipe"] != metadata["fp8_recipe"]:
                raise ValueError(f"TE ran recipe {te_recipe['fp8_recipe']}, config.fp8_recipe says "
                                 f"{metadata['fp8_recipe']}")
            metadata.update(te_recipe)
        if isinstance(out, tuple):
            out, bias = out[0], (out[1] if len(out) > 1 else None)
            if bias is not None:
                raise ValueError("the module returned a separate bias; expert layers fold it into the output")
        if backward:
            if grad_output is None:
                gen = torch.Generator(device="cpu").manual_seed(seed)
                grad_output = 0.1 * torch.randn(out.shape, generator=gen)
            grad_output = grad_output.detach().reshape(out.shape).to(device=device, dtype=out.dtype)
            out.backward(grad_output)
            if cfg("delay_wgrad_compute") or cfg("overlap_dispatch_backward_with_experts_wgrad"):
                module.backward_dw()

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous().clone()

    tensors: Dict[str, torch.Tensor] = {}
    state = {k: v for k, v in module.state_dict().items() if "_extra_state" not in k}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"state_dict entry {name} is not a tensor")
        tensors[name] = cpu(value)
    tensors["input.permuted_local_hidden_states"] = cpu(x_in)
    tensors["input.tokens_per_expert"] = cpu(counts)
    tensors["input.permuted_probs"] = cpu(p_in)
    tensors["expected.output"] = cpu(out)
    if backward:
        tensors["input.grad_output"] = cpu(grad_output)
        tensors["expected.grad.permuted_local_hidden_states"] = cpu(x.grad)
        if p.grad is not None:
            tensors["expected.grad.permuted_probs"] = cpu(p.grad)
        for name, param in module.named_parameters():
            grad = param.grad if param.grad is not None else getattr(param, "main_grad", None)
            if name not in state:
                raise ValueError(f"parameter {name} is not in the module's state_dict")
            if grad is None:
                warnings.warn(f"parameter {name} has no gradient; expected.grad.{name} is not written")
                continue
            tensors[f"expected.grad.{name}"] = cpu(grad)
    if fp8 and hasattr(module, "fp8_weights"):
        for name, (codes, scale_inv) in module.fp8_weights().items():
            tensors[f"fp8.{name}"] = cpu(codes)
            tensors[f"fp8.{name}.scale_inv"] = cpu(scale_inv.float().reshape(()))
    _save(tensors, path, metadata)
    return {"path": path, "metadata": metadata, "keys": sorted(tensors)}
