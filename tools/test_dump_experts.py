"""End-to-end test of tools/dump_experts.py with the PyTorch stand-ins of tools/standin_experts.py:
write dumps for the three classes on the GPU (CPU when there is none), then run
``moe-verify compare`` on them; every dump must pass (exit 0). Corrupted dumps must fail:
a perturbed expert weight grad with exit 1 naming the tensor, a missing parameter with exit 2
naming the key.

FP8 (``fp8_*`` cases): the stand-ins' ``torch._scaled_mm`` path (tensorwise current scaling and
delayed scaling's first step, E4M3 and HYBRID) writes dumps with the recipe and the quantized
weights; ``compare`` must pass them. Corrupted fp8 dumps must fail: a weight's ``scale_inv``
doubled exits 2 naming it, a negated ``expected.output`` exits 1, an unknown recipe exits 2.

    python3 tools/test_dump_experts.py [--bin PATH/TO/moe-verify] [--out DIR] [--only SUBSTRING]

Defaults: ``--bin`` = $MOE_VERIFY or ``.stage/dump/moe-verify`` or ``target/release/moe-verify``;
``--out`` = $OUT or /tmp/moe-dumps. A summary is written to ``OUT/dump_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dump_experts as de  # noqa: E402
from standin_experts import ACTIVATIONS, CLASSES, StandinConfig  # noqa: E402

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16

# (name, layer, overrides). Defaults: bf16 params, fp32 probs, GLU silu, no bias, E_l = 4,
# h = 64, f = 96, one expert without tokens, int64 counts, single rank.
CASES = [
    ("seq_bf16_swiglu_bias", "sequential", dict(bias=True)),
    ("seq_bf16_gelu_bf16probs", "sequential", dict(act="gelu", glu=False, probs_dtype=BF16)),
    ("seq_f32_qgeglu_clamp_offset_bias", "sequential",
     dict(dtype=F32, act="quick_gelu", bias=True, clamp=1.5, offset=1.0)),
    ("seq_f16_swiglu", "sequential", dict(dtype=F16)),
    ("seq_bf16_srelu_probs_on_input_el1", "sequential",
     dict(act="squared_relu", glu=False, experts=1, counts=[150], probs_on_input=True)),
    ("grouped_bf16_swiglu", "grouped", dict()),
    ("grouped_bf16_gelu_ep2", "grouped", dict(act="gelu", glu=True, ep=(2, 1), grad_output="generated")),
    ("te_bf16_swiglu_bias", "te_grouped", dict(bias=True)),
    ("te_bf16_gelu_bias_bf16probs_int32", "te_grouped",
     dict(act="gelu", glu=False, bias=True, probs_dtype=BF16, counts_dtype=torch.int32)),
    ("te_bf16_swiglu_tp2_ep2", "te_grouped", dict(tp=(2, 1), ep=(2, 1))),
    ("te_f32_srelu_bias_builtin_writer", "te_grouped",
     dict(dtype=F32, act="squared_relu", glu=False, bias=True, builtin_writer=True)),
    ("fp8_seq_bf16_tensorwise_hybrid_bias", "sequential", dict(fp8=("tensorwise", "hybrid"), bias=True)),
    ("fp8_seq_bf16_delayed_e4m3_gelu", "sequential", dict(fp8=("delayed", "e4m3"), act="gelu", glu=False)),
    ("fp8_te_bf16_tensorwise_e4m3_bias", "te_grouped", dict(fp8=("tensorwise", "e4m3"), bias=True)),
    ("fp8_te_bf16_delayed_hybrid", "te_grouped", dict(fp8=("delayed", "hybrid"))),
    ("fp8_te_bf16_tensorwise_hybrid_builtin_writer", "te_grouped",
     dict(fp8=("tensorwise", "hybrid"), builtin_writer=True)),
]


def build(layer, o, device, seed):
    e_l = o.get("experts", 4)
    tp_size, tp_rank = o.get("tp", (1, 0))
    ep_size, ep_rank = o.get("ep", (1, 0))
    cfg = StandinConfig(
        num_moe_experts=e_l * ep_size,
        hidden_size=64,
        moe_ffn_hidden_size=96,
        gated_linear_unit=o.get("glu", True),
        activation_func=ACTIVATIONS[o.get("act", "silu")],
        add_bias_linear=o.get("bias", False),
        params_dtype=o.get("dtype", BF16),
        moe_apply_probs_on_input=o.get("probs_on_input", False),
        glu_linear_offset=o.get("offset", 0.0),
        activation_func_clamp_value=o.get("clamp"),
        expert_model_parallel_size=ep_size,
        expert_tensor_parallel_size=tp_size,
        fp8=o["fp8"][1] if "fp8" in o else None,
        fp8_recipe=o["fp8"][0] if "fp8" in o else "tensorwise",
    )
    module = CLASSES[layer](cfg, device=device, seed=seed)
    counts = o.get("counts", [37, 0, 52, 41][:e_l])
    t = sum(counts)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(t, 64, generator=gen).to(cfg.params_dtype).to(device)
    probs = torch.rand(t, generator=gen).to(o.get("probs_dtype", F32)).to(device)
    grad = None
    if o.get("grad_output") != "generated":
        grad = (0.1 * torch.randn(t, 64, generator=gen)).to(cfg.params_dtype).to(device)
    tokens = torch.tensor(counts, dtype=o.get("counts_dtype", torch.int64))
    return module, x, tokens, probs, grad, dict(tp_rank=tp_rank, ep_rank=ep_rank)


def te_recipe_metadata():
    """dump_experts' reading of TE's active fp8 recipe, on stand-ins of TE's classes (TE is not
    installed where this runs): outside fp8_autocast, under Float8BlockScaling (E4M3), under
    Float8CurrentScaling (HYBRID). The stand-in modules are removed again afterwards."""
    import collections
    import enum
    import types

    helper = collections.namedtuple("_FormatHelper", "max_fwd max_bwd")
    fmt = enum.Enum("Format", {"E4M3": helper(448, 448), "HYBRID": helper(448, 57344)})
    qparams = collections.namedtuple("QParams", "power_2_scale amax_epsilon")
    recipes = [None, type("Float8BlockScaling", (), {"fp8_format": fmt.E4M3, "fp8_quant_fwd_weight": qparams(True, 0.0)})(),
               type("Float8CurrentScaling", (), {"fp8_format": fmt.HYBRID, "fp8_quant_fwd_weight": qparams(False, 0.0)})()]
    state = {}
    manager = type("FP8GlobalStateManager", (), {"is_fp8_enabled": staticmethod(lambda: state["r"] is not None),
                                                  "get_fp8_recipe": staticmethod(lambda: state["r"])})
    names = ["transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.fp8"]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    mods["transformer_engine.pytorch.fp8"].FP8GlobalStateManager = manager
    sys.modules.update(mods)
    try:
        out = []
        for r in recipes:
            state["r"] = r
            out.append(de._te_active_recipe())
        return out
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def compare(binary, path, *flags):
    proc = subprocess.run([binary, "compare", path, *flags], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def main():
    ap = argparse.ArgumentParser()
    default_bin = os.environ.get("MOE_VERIFY") or next(
        (p for p in (".stage/dump/moe-verify", "target/release/moe-verify") if os.path.exists(p)),
        "moe-verify")
    ap.add_argument("--bin", default=default_bin)
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/moe-dumps")
    ap.add_argument("--only", default="", help="run only the cases (and corruptions) whose name contains this")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dump_dir = os.path.join("/tmp", "moe-dumps-work")
    os.makedirs(dump_dir, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "allow_bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "binary": args.bin,
    }
    print("environment:", json.dumps(env), flush=True)
    results, failures = [], []

    def check(name, ok, detail):
        results.append({"case": name, "ok": ok, **detail})
        print(f"[{'ok' if ok else 'FAILED'}] {name}: {detail.get('summary', '')}", flush=True)
        if not ok:
            failures.append(name)

    paths = {}
    for i, (name, layer, o) in enumerate(CASES):
        if args.only not in name:
            continue
        try:
            module, x, tokens, probs, grad, ranks = build(layer, o, device, seed=100 + i)
            path = os.path.join(dump_dir, f"{name}.safetensors")
            de.USE_SAFETENSORS_PACKAGE = not o.get("builtin_writer", False)
            t0 = time.time()
            info = de.dump_experts(module, x, tokens, probs, path, grad, **ranks)
            de.USE_SAFETENSORS_PACKAGE = True
            paths[name] = path
            assert not any("_extra_state" in k for k in info["keys"]), info["keys"]
            code, out, err = compare(args.bin, path)
            jcode, jout, _ = compare(args.bin, path, "--json")
            ocode, oout, _ = compare(args.bin, path, "--json", "--oracle")
            report = json.loads(jout) if jout.strip() else {}
            oracle = json.loads(oout) if oout.strip() else {}
            worst = max((r["worst_ratio"] or 0.0 for r in report.get("rows", [])), default=None)
            oworst = max((r["worst_ratio"] or 0.0 for r in oracle.get("rows", [])), default=None)
            summary = (f"exit {code}, {len(report.get('rows', []))} tensors, worst/bound {worst}, "
                       f"oracle exit {ocode} worst/bound {oworst}, {time.time() - t0:.1f}s")
            check(name, code == 0 and jcode == 0, {
                "summary": summary, "exit": code, "oracle_exit": ocode, "worst_ratio": worst,
                "oracle_worst_ratio": oworst, "keys": info["keys"], "metadata": info["metadata"],
                "table": out, "stderr": err, "oracle_rows": oracle.get("rows")})
            if code != 0:
                print(out, err, flush=True)
        except Exception:
            check(name, False, {"summary": "exception", "traceback": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)

    # Corruptions: one expert's weight grad perturbed -> exit 1 naming it; a parameter missing -> 2.
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file

        def corrupt(src, dst, edit, meta=None):
            with safe_open(src, framework="pt") as f:
                metadata = dict(f.metadata())
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            edit(tensors)
            metadata.update(meta or {})
            save_file(tensors, dst, metadata=metadata)
            return dst

        def scale_expert3_fc1(t):
            # expert 3 has 41 tokens (expert 1 has none: its zero grads would stay zero)
            t["expected.grad.linear_fc1.weight3"] = (t["expected.grad.linear_fc1.weight3"].float() * 1.5).to(BF16)

        def grouped_block2(t):
            g = t["expected.grad.weight1"]
            flat = g.reshape(-1).clone()
            n = flat.numel() // 4  # expert 2's block of the view-reinterpreted [E_l, h, N1] memory
            flat[2 * n:3 * n] = (flat[2 * n:3 * n].float() * 1.5).to(g.dtype)
            t["expected.grad.weight1"] = flat.reshape(g.shape)

        def drop_param(t):
            del t["local_experts.2.linear_fc2.weight"]

        def double_scale(t):
            t["fp8.linear_fc1.weight2.scale_inv"] = t["fp8.linear_fc1.weight2.scale_inv"] * 2

        def negate_output(t):
            # A sign error. (A doubled output sits near 1x the bound on these small layers: against
            # the emulating reference the fp8 bound is doubled, two fp8 computations.)
            t["expected.output"] = -t["expected.output"]

        for name, src, edit, want_code, needle in [
            ("corrupt_te_fc1_weight3_grad", "te_bf16_swiglu_bias", scale_expert3_fc1, 1, "grad.linear_fc1.weight3"),
            ("corrupt_grouped_weight1_expert2", "grouped_bf16_swiglu", grouped_block2, 1, "grad.weight1"),
            ("bad_missing_parameter", "seq_bf16_swiglu_bias", drop_param, 2, "local_experts.2.linear_fc2.weight"),
            ("fp8_bad_scale_inv", "fp8_te_bf16_tensorwise_e4m3_bias", double_scale, 2,
             "fp8.linear_fc1.weight2.scale_inv"),
            ("fp8_corrupt_output", "fp8_te_bf16_tensorwise_e4m3_bias", negate_output, 1, "output"),
            ("fp8_bad_unknown_recipe", "fp8_seq_bf16_tensorwise_hybrid_bias", None, 2, "__metadata__.fp8_recipe"),
        ]:
            if args.only not in name:
                continue
            if edit is None:  # a metadata edit: the recipe renamed to one TE does not have
                dst = corrupt(paths[src], os.path.join(dump_dir, f"{name}.safetensors"), lambda t: None,
                              meta={"fp8_recipe": "nvfp4"})
            else:
                dst = corrupt(paths[src], os.path.join(dump_dir, f"{name}.safetensors"), edit)
            code, out, err = compare(args.bin, dst)
            last = (out.strip().splitlines() or [""])[-1]
            text = last if want_code == 1 else err
            ok = code == want_code and needle in text and (want_code != 1 or last.startswith("FAIL: 1 of"))
            check(name, ok, {"summary": f"exit {code} (want {want_code}): {text.strip()}", "exit": code,
                             "table": out, "stderr": err})
    except Exception:
        check("corruptions", False, {"summary": "exception", "traceback": traceback.format_exc()})
        print(traceback.format_exc(), flush=True)

    if args.only in "fp8_te_recipe_metadata":
        try:
            got = te_recipe_metadata()
            want = [None, {"fp8_recipe": "blockwise", "fp8_format": "e4m3", "fp8_power_2_scales": "true"},
                    {"fp8_recipe": "tensorwise", "fp8_format": "hybrid", "fp8_power_2_scales": "false"}]
            check("fp8_te_recipe_metadata", got == want, {"summary": f"{got}"})
        except Exception:
            check("fp8_te_recipe_metadata", False, {"summary": "exception", "traceback": traceback.format_exc()})

    with open(os.path.join(args.out, "dump_results.json"), "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=1, default=str)
    # Keep two dumps as samples (small) for the record.
    for keep in ("te_bf16_swiglu_bias", "grouped_bf16_swiglu", "fp8_te_bf16_tensorwise_e4m3_bias"):
        if keep in paths:
            with open(paths[keep], "rb") as src, open(os.path.join(args.out, f"{keep}.safetensors"), "wb") as dst:
                dst.write(src.read())
    n_ok = sum(r["ok"] for r in results)
    print(f"{n_ok} passed, {len(results) - n_ok} failed", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
