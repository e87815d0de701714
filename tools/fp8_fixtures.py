"""Golden fp8 quantizer fixtures from TransformerEngine's own Python reference quantizers.

Writes ``tests/data/fp8/*.json``, which ``tests/fp8_quantizers.rs`` compares bit for bit with
``moe_reference::fp8``. TransformerEngine (TE) itself is *not* installed or imported: its
reference files are loaded from the directories given on the command line, and the two TE
modules they import (``transformer_engine.pytorch.DType`` and
``transformer_engine.pytorch.constants.TE_DType_To_Torch``, which need TE's compiled extension)
are replaced by small stand-ins defined here. No TE code is part of this script.

Usage (CPU is enough; torch >= 2.1 with float8 dtypes)::

    TE=/path/to/TransformerEngine            # a checkout, at the commit to record
    python3 tools/fp8_fixtures.py \\
        --te-references $TE/tests/pytorch/references \\
        --te-mxfp8-test $TE/tests/pytorch/test_mxfp8_2d_quantize.py \\
        --te-quantization $TE/transformer_engine/pytorch/quantization.py \\
        --te-commit "$(git -C $TE rev-parse HEAD)" \\
        --out tests/data/fp8

Only the files named are read (``references/`` needs ``quantize_scale_calc.py``,
``ref_per_tensor_cs.py`` and ``blockwise_quantizer_reference.py``); they can be copied anywhere,
the directory name does not matter. ``--te-mxfp8-test`` and ``--te-quantization`` are optional:
without them ``mxfp8.json`` / ``delayed.json`` are not written.

What comes from where:

* ``per_tensor.json``: ``references/ref_per_tensor_cs.py::ref_per_tensor_cs_cast`` (scale by
  ``references/quantize_scale_calc.py::scale_from_amax_tensor``), codes, ``scale_inv`` and the
  transposed codes.
* ``blockwise.json``: ``references/blockwise_quantizer_reference.py::BlockwiseQuantizerReference
  .quantize`` with ``munge_scale_shapes=False`` (logical scale grids), 1x128 and 128x128 tiles,
  ``return_transpose=True``.
* ``mxfp8.json``: ``test_mxfp8_2d_quantize.py::_float_to_e8m0`` and ``_e8m0_to_scale_inv`` (TE's
  E8M0 rounding written in torch), extracted from the test file's syntax tree without running its
  imports; 1x32 rowwise and 32x1 columnwise blocks are cut by this script, the 2-D (32x32) case is
  TE's ``_mxfp8_2d_quantize_reference`` itself.
* ``delayed.json``: ``quantization.py::_update_amax_history``, ``_default_get_amax_and_update_
  history`` and ``_default_sf_compute`` (TE's unfused Python update), extracted the same way, run
  over multi-step sequences whose amaxes are all finite and non-zero (where the unfused update and
  the fused CUDA kernel agree).
* ``torch_cast.json``: ``tensor.to(torch.float8_e4m3fn / float8_e5m2)`` on special values --
  PyTorch's cast, which TE's Python references use. It rounds to nearest even but does not
  saturate (E4M3: NaN above 464; E5M2: inf from 61440), unlike TE's CUDA kernels.

Inputs, outputs and scales are stored bit-exactly: tensors as base64 of their little-endian
bytes (``f32``/``bf16`` bit patterns, fp8 codes, f32 scale grids), single scales as f32 bit
patterns.
"""

from __future__ import annotations

import __future__
import argparse
import ast
import base64
import enum
import hashlib
import importlib.util
import json
import math
import os
import sys
import types
from typing import Any, Dict, List, Optional

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FMT_NAME = {E4M3: "e4m3", E5M2: "e5m2"}
DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ---------------------------------------------------------------------------------------------
# Stand-ins for the two TE modules the references import (TE needs its compiled extension).
# ---------------------------------------------------------------------------------------------


class _DType(enum.IntEnum):
    """Stand-in for ``transformer_engine.pytorch.DType`` (only the fp8 members are used)."""

    kFloat32 = 2
    kFloat16 = 3
    kBFloat16 = 4
    kFloat8E4M3 = 5
    kFloat8E5M2 = 6


def _install_te_stand_ins() -> None:
    te = types.ModuleType("transformer_engine")
    te.__path__ = []  # a package
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_pt.__path__ = []
    te_pt.DType = _DType
    consts = types.ModuleType("transformer_engine.pytorch.constants")
    consts.TE_DType_To_Torch = {
        _DType.kFloat8E4M3: E4M3,
        _DType.kFloat8E5M2: E5M2,
        _DType.kFloat32: torch.float32,
        _DType.kFloat16: torch.float16,
        _DType.kBFloat16: torch.bfloat16,
    }
    te.pytorch = te_pt
    te_pt.constants = consts
    sys.modules.setdefault("transformer_engine", te)
    sys.modules.setdefault("transformer_engine.pytorch", te_pt)
    sys.modules.setdefault("transformer_engine.pytorch.constants", consts)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _load_references(ref_dir: str) -> Dict[str, types.ModuleType]:
    """Imports TE's reference files as the package ``references`` (as TE's tests do)."""
    pkg = types.ModuleType("references")
    pkg.__path__ = [ref_dir]
    sys.modules["references"] = pkg
    mods = {}
    for name in ("quantize_scale_calc", "ref_per_tensor_cs", "blockwise_quantizer_reference"):
        path = os.path.join(ref_dir, name + ".py")
        if not os.path.isfile(path):
            sys.exit(f"fp8_fixtures: {path} is missing; stage TE's tests/pytorch/references/{name}.py there")
        spec = importlib.util.spec_from_file_location("references." + name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["references." + name] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods[name] = mod
    return mods


def _extract_functions(path: str, names: List[str], env: Dict[str, Any]) -> Dict[str, Any]:
    """Compiles only the named top-level functions of a TE file (decorators dropped), in `env`."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    found = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []
            found.append(node)
    missing = set(names) - {n.name for n in found}
    if missing:
        sys.exit(f"fp8_fixtures: {path} has no top-level function(s) {sorted(missing)}")
    module = ast.Module(body=found, type_ignores=[])
    # Annotations stay unevaluated (TE's files use `from __future__ import annotations` too).
    code = compile(module, path, "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, env)  # noqa: S102 -- TE's own reference functions
    return {n: env[n] for n in names}


# ---------------------------------------------------------------------------------------------
# Encoding helpers.
# ---------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    t = t.contiguous()
    if t.dtype in (E4M3, E5M2):
        raw = t.view(torch.uint8)
    elif t.dtype == torch.float32:
        raw = t.view(torch.int32)
    elif t.dtype in (torch.bfloat16, torch.float16):
        raw = t.view(torch.int16)
    elif t.dtype == torch.uint8:
        raw = t
    else:
        raise TypeError(t.dtype)
    assert sys.byteorder == "little", "the fixtures store little-endian bytes"
    return base64.b64encode(raw.numpy().tobytes()).decode()


def _f32_bits(t: torch.Tensor) -> List[int]:
    t = t.to(torch.float32).contiguous().reshape(-1)
    return [v & 0xFFFFFFFF for v in t.view(torch.int32).tolist()]


def _tensor_entry(t: torch.Tensor) -> Dict[str, Any]:
    return {"dtype": DTYPE_NAME.get(t.dtype, str(t.dtype)), "shape": list(t.shape), "b64": _b64(t)}


# ---------------------------------------------------------------------------------------------
# Inputs (seeded; every special value TE defines for finite inputs).
# ---------------------------------------------------------------------------------------------


def _many_scales(shape, tile, dtype, gen) -> torch.Tensor:
    """Every `tile` gets its own magnitude (2^-24 .. 2^24) so that scales differ per tile."""
    m, n = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    for i in range(0, m, tile[0]):
        for j in range(0, n, tile[1]):
            e = int(torch.randint(-24, 25, (1,), generator=gen))
            x[i : i + tile[0], j : j + tile[1]] *= 2.0**e
    return x.to(dtype)


def _special_rows(x: torch.Tensor) -> torch.Tensor:
    """Plants zeros, subnormals of the dtype, and exact binade values in the first rows."""
    x = x.clone()
    m, n = x.shape
    tiny = torch.finfo(x.dtype).tiny
    x[0, : min(n, 40)] = 0.0
    if m > 1:
        x[1, : min(n, 16)] = torch.tensor([tiny * 2.0**-k for k in range(1, 17)][: min(n, 16)]).to(x.dtype)
    if m > 2:
        x[2, : min(n, 8)] = torch.tensor([448.0, -448.0, 57344.0, 1.0, -1.0, 0.5, 2.0**-9, -(2.0**-16)]).to(x.dtype)
    return x


def _inputs(gen) -> Dict[str, torch.Tensor]:
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        tag = DTYPE_NAME[dtype]
        out[f"random_{tag}"] = _special_rows(_many_scales((37, 50), (37, 50), dtype, gen))
        out[f"zeros_{tag}"] = torch.zeros((4, 36), dtype=dtype)
        # Tiny amax: fp8_max / amax overflows f32, scale = value_for_inf.
        out[f"tiny_{tag}"] = (torch.rand((3, 40), generator=gen) * 1e-38).to(dtype)
        # Huge amax: the dtype's largest finite values.
        big = torch.finfo(dtype).max
        out[f"huge_{tag}"] = (torch.rand((3, 40), generator=gen) * 2 - 1).to(dtype) * big
        out[f"huge_{tag}"][0, 0] = big
        # Block tiles with partial edges in both directions (130 = 128 + 2, 136 = 128 + 8).
        blk = _many_scales((130, 136), (128, 128), dtype, gen)
        blk[:, 128:] *= 2.0**-5  # the partial column tiles get their own scales
        blk[128:, :] = (torch.randn((2, 136), generator=gen) * 3.0).to(dtype)
        blk[0:128, 0:128] = _special_rows(blk[0:128, 0:128])
        out[f"tiles_{tag}"] = blk
        out[f"tiles_tiny_{tag}"] = torch.zeros((130, 136), dtype=dtype)
        out[f"tiles_tiny_{tag}"][:5, :] = (torch.rand((5, 136), generator=gen) * 1e-38).to(dtype)
        out[f"tiles_tiny_{tag}"][128:, 128:] = torch.finfo(dtype).max
    # MXFP8: dims multiples of 32; blocks whose amax is exactly 448 * 2^k (no E8M0 round-up) and
    # its neighbours.
    mx = _many_scales((64, 96), (1, 32), torch.bfloat16, gen)
    for k, row in zip(range(-3, 4), range(4, 11)):
        mx[row, 0:32] = (torch.rand(32, generator=gen) * 100).to(torch.bfloat16)
        mx[row, 0] = 448.0 * 2.0**k
    mx[11, 32:64] = 0.0
    mx = _special_rows(mx)
    out["mx_bfloat16"] = mx
    out["mx_float32"] = _special_rows(_many_scales((64, 64), (32, 1), torch.float32, gen))
    return out


# ---------------------------------------------------------------------------------------------
# Fixture writers.
# ---------------------------------------------------------------------------------------------


def per_tensor(refs, inputs) -> Dict[str, Any]:
    ref = refs["ref_per_tensor_cs"]
    cases = []
    for name in [k for k in inputs if not k.startswith(("tiles", "mx"))]:
        x = inputs[name]
        for fp8 in (_DType.kFloat8E4M3, _DType.kFloat8E5M2):
            for pow2 in (False, True):
                for eps in (0.0, 2.0**-14):
                    qx, sx, qx_t, sx_t = ref.ref_per_tensor_cs_cast(
                        x, fp8_dtype=fp8, return_transpose=True, force_pow_2_scales=pow2, amax_epsilon=eps
                    )
                    cases.append(
                        {
                            "input": name,
                            "format": "e4m3" if fp8 == _DType.kFloat8E4M3 else "e5m2",
                            "force_pow_2_scales": pow2,
                            "amax_epsilon_bits": _f32_bits(torch.tensor([eps]))[0],
                            "data_b64": _b64(qx),
                            "scale_inv_bits": _f32_bits(sx)[0],
                            "data_t_b64": _b64(qx_t),
                            "scale_inv_t_bits": _f32_bits(sx_t)[0],
                        }
                    )
    return {"reference": "references/ref_per_tensor_cs.py::ref_per_tensor_cs_cast", "cases": cases}


def blockwise(refs, inputs) -> Dict[str, Any]:
    quantizer = refs["blockwise_quantizer_reference"].BlockwiseQuantizerReference()
    cases = []
    # (input, tile, format, force_pow_2_scales, amax_epsilon); kept small, the tensors are 130x136.
    plan = []
    for tile in ((1, 128), (128, 128)):
        for fmt in (E4M3, E5M2):
            plan.append(("tiles_bfloat16", tile, fmt, True, 0.0))
        plan.append(("tiles_bfloat16", tile, E4M3, False, 0.0))
        plan.append(("tiles_tiny_bfloat16", tile, E4M3, True, 0.0))
        plan.append(("tiles_tiny_float32", tile, E5M2, True, 0.0))
    plan += [
        ("tiles_bfloat16", (128, 128), E4M3, True, 2.0**-10),
        ("tiles_bfloat16", (1, 128), E5M2, False, 2.0**-10),
        ("tiles_float32", (1, 128), E4M3, True, 0.0),
        ("tiles_float32", (128, 128), E5M2, False, 0.0),
        ("tiles_tiny_bfloat16", (128, 128), E4M3, False, 0.0),
        ("tiles_tiny_float32", (128, 128), E4M3, False, 0.0),
    ]
    for name, tile, fmt, pow2, eps in plan:
        x = inputs[name]
        r = quantizer.quantize(
            x,
            fmt,
            return_transpose=True,
            eps=eps,
            pow_2_scales=pow2,
            quant_tile_shape=tile,
            munge_scale_shapes=False,
        )
        cases.append(
            {
                "input": name,
                "tile": f"{tile[0]}x{tile[1]}",
                "format": FMT_NAME[fmt],
                "force_pow_2_scales": pow2,
                "amax_epsilon_bits": _f32_bits(torch.tensor([eps]))[0],
                "data_b64": _b64(r.data),
                "scale_inv_shape": list(r.scale.shape),
                "scale_inv_b64": _b64(r.scale.to(torch.float32)),
                "data_t_b64": _b64(r.data_t),
                "scale_inv_t_shape": list(r.scale_t.shape),
                "scale_inv_t_b64": _b64(r.scale_t.to(torch.float32)),
            }
        )
    return {
        "reference": "references/blockwise_quantizer_reference.py::BlockwiseQuantizerReference.quantize "
        "(munge_scale_shapes=False)",
        "cases": cases,
    }


def mxfp8(path, inputs) -> Dict[str, Any]:
    env = {"torch": torch, "MXFP8_BLOCK_SIZE": 32, "FP8_E4M3_MAX": 448.0}
    fns = _extract_functions(path, ["_float_to_e8m0", "_e8m0_to_scale_inv", "_mxfp8_2d_quantize_reference"], env)
    to_e8m0, to_scale_inv = fns["_float_to_e8m0"], fns["_e8m0_to_scale_inv"]

    def rows_1x32(x: torch.Tensor):
        # Harness (this script): 1x32 blocks along rows; TE's E8M0 rounding and scale, then the
        # scaled cast exactly as TE's 2-D reference does it (x.float() / scale_inv, torch cast).
        m, n = x.shape
        blocks = x.reshape(m, n // 32, 32).to(torch.float32)
        amax = blocks.abs().amax(dim=-1)
        e = to_e8m0(amax)
        q = (blocks / to_scale_inv(e)[:, :, None]).to(E4M3).reshape(m, n)
        return q, e

    cases = []
    for name in [k for k in inputs if k.startswith("mx")]:
        x = inputs[name]
        q, e = rows_1x32(x)
        qt, et = rows_1x32(x.t().contiguous())
        cases.append(
            {
                "input": name,
                "block": "1x32",
                "format": "e4m3",
                "data_b64": _b64(q),
                "e8m0_shape": list(e.shape),
                "e8m0_b64": _b64(e.to(torch.uint8)),
                "data_t_b64": _b64(qt),
                "e8m0_t_shape": list(et.shape),
                "e8m0_t_b64": _b64(et.to(torch.uint8)),
            }
        )
        data, row_scale, _ = fns["_mxfp8_2d_quantize_reference"](x)
        block_e = row_scale[::32, :].contiguous()  # one byte per 32x32 block
        cases.append(
            {
                "input": name,
                "block": "32x32",
                "format": "e4m3",
                "data_b64": _b64(data),
                "e8m0_shape": list(block_e.shape),
                "e8m0_b64": _b64(block_e.to(torch.uint8)),
            }
        )
    # The E8M0 rounding alone on chosen amaxes (powers of two, their f32 neighbours, subnormal
    # quotients, zero, the largest finite f32).
    amaxes = [0.0, 448.0, 448.0 * 2**-130, 448.0 * 2**-126, 3.4028234663852886e38, 1e-45, 1e-40, 1.0, 447.99997]
    for k in range(-20, 21, 5):
        a = torch.tensor([448.0 * 2.0**k], dtype=torch.float32)
        amaxes += [a.item(), torch.nextafter(a, torch.tensor([0.0])).item(), torch.nextafter(a, torch.tensor([1e38])).item()]
    a = torch.tensor(amaxes, dtype=torch.float32)
    return {
        "reference": "tests/pytorch/test_mxfp8_2d_quantize.py::_float_to_e8m0, _e8m0_to_scale_inv, "
        "_mxfp8_2d_quantize_reference (1x32 blocks cut by tools/fp8_fixtures.py)",
        "e8m0": {"amax_bits": _f32_bits(a), "e8m0": [int(v) for v in to_e8m0(a).tolist()]},
        "cases": cases,
    }


def delayed(path, gen) -> Dict[str, Any]:
    fp32_max = torch.finfo(torch.float32).max
    env = {"torch": torch}
    src_names = ["_update_amax_history", "_default_get_amax_and_update_history", "_default_sf_compute"]
    fns = _extract_functions(path, src_names, env)
    sequences = []
    for fmt, fp8_max in ((E4M3, 448.0), (E5M2, 57344.0)):
        for algo in ("max", "most_recent"):
            for length, margin in ((1, 0), (4, 0), (4, 2), (16, 1)):
                history = torch.zeros((length, 1), dtype=torch.float32)
                scale = torch.ones(1, dtype=torch.float32)
                steps = []
                for step in range(24):
                    mag = 2.0 ** float(torch.randint(-30, 30, (1,), generator=gen))
                    amax = float(torch.rand(1, generator=gen)) * mag + 1e-30
                    if step == 5:
                        amax = 3.0e-40  # tiny: scale overflows to f32 max
                    history[0] = torch.maximum(history[0], torch.tensor([amax], dtype=torch.float32))
                    recorded = _f32_bits(history[0])[0]
                    history, a = fns["_default_get_amax_and_update_history"](history, algo)
                    scale = fns["_default_sf_compute"](a, scale, fp8_max, margin, fp32_max)
                    steps.append(
                        {
                            "amax_bits": recorded,
                            "scale_bits": _f32_bits(scale)[0],
                            "history_b64": _b64(history[:, 0].contiguous()),
                        }
                    )
                sequences.append(
                    {"format": FMT_NAME[fmt], "amax_compute_algo": algo, "amax_history_len": length, "margin": margin,
                     "steps": steps}
                )
    return {
        "reference": "transformer_engine/pytorch/quantization.py::_default_get_amax_and_update_history, "
        "_default_sf_compute (unfused update; all amaxes finite and non-zero)",
        "sequences": sequences,
    }


def torch_cast() -> Dict[str, Any]:
    vals = [0.0, -0.0, 1.0, -1.0, 448.0, 449.0, 460.0, 464.0, 464.00003, 479.99997, 480.0, 1e4, 57344.0, 60000.0,
            61439.996, 61440.0, 65535.996, 65536.0, 1e30, 2.0**-6, 2.0**-9, 2.0**-10, 2.0**-10 * 1.0000001,
            3 * 2.0**-10, 2.0**-14, 2.0**-16, 2.0**-17, 2.0**-17 * 1.0000001, 1e-45, -1e-45, 1.0625, 1.1875, 1.125 + 2**-5,
            math.inf, -math.inf, math.nan, -math.nan]
    x = torch.tensor(vals, dtype=torch.float32)
    out = {"input_bits": _f32_bits(x)}
    for fmt in (E4M3, E5M2):
        out[FMT_NAME[fmt]] = [int(v) for v in x.to(fmt).view(torch.uint8).tolist()]
        decoded = torch.arange(256, dtype=torch.uint8).view(fmt).to(torch.float32)
        out[FMT_NAME[fmt] + "_decoded_b64"] = _b64(decoded)
    return {"reference": "torch Tensor.to(float8) cast (not TE's satfinite kernel cast)", **out}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--te-references", required=True, help="TE's tests/pytorch/references directory")
    ap.add_argument("--te-mxfp8-test", help="TE's tests/pytorch/test_mxfp8_2d_quantize.py (optional)")
    ap.add_argument("--te-quantization", help="TE's transformer_engine/pytorch/quantization.py (optional)")
    ap.add_argument("--te-commit", default="unknown", help="the TE commit the files come from (recorded)")
    ap.add_argument("--out", default="tests/data/fp8")
    ap.add_argument("--seed", type=int, default=20260822)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    _install_te_stand_ins()
    refs = _load_references(os.path.abspath(args.te_references))
    inputs = _inputs(gen)
    os.makedirs(args.out, exist_ok=True)

    def provenance(files: List[str]) -> Dict[str, Any]:
        return {
            "generator": "tools/fp8_fixtures.py",
            "te_commit": args.te_commit,
            "te_files_sha256": {os.path.basename(f): _sha256(f) for f in files},
            "torch": torch.__version__,
            "seed": args.seed,
        }

    ref_files = [os.path.join(args.te_references, n + ".py") for n in refs]
    inputs_json = {k: _tensor_entry(v) for k, v in inputs.items()}
    outputs = {
        "per_tensor.json": (per_tensor(refs, inputs), ref_files, ("random", "zeros", "tiny", "huge")),
        "blockwise.json": (blockwise(refs, inputs), ref_files, ("tiles",)),
        "torch_cast.json": (torch_cast(), [], ()),
    }
    if args.te_mxfp8_test:
        outputs["mxfp8.json"] = (mxfp8(args.te_mxfp8_test, inputs), [args.te_mxfp8_test], ("mx",))
    if args.te_quantization:
        outputs["delayed.json"] = (delayed(args.te_quantization, gen), [args.te_quantization], ())
    for fname, (body, files, prefixes) in outputs.items():
        doc = {"provenance": provenance(files), **body}
        if prefixes:
            doc["inputs"] = {k: v for k, v in inputs_json.items() if k.startswith(prefixes)}
        path = os.path.join(args.out, fname)
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
