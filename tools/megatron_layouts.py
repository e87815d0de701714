"""Sharded state dicts of real Megatron-Core expert layers, as `moe-verify layout --json` prints them.

Builds Megatron-Core's ``SequentialMLP`` (local ``ColumnParallelLinear``/``RowParallelLinear``
experts) and ``GroupedMLP`` on CPU, in ``WORLD`` processes of a gloo ``torch.distributed`` group,
calls ``module.sharded_state_dict(prefix, (), {'singleton_local_shards': S})`` on every rank,
builds the ``ShardedTensorFactory`` entries the way ``dist_checkpointing.save`` does
(``apply_factories``), drops ``LocalNonpersistentObject`` values (never saved) and writes, per
configuration, ``OUT/<name>.json``:

    {"name": ..., "megatron_core": "<version>", "torch": "<version>",
     "config": {"layer", "num_experts", "hidden", "ffn", "tp", "ep", "glu", "bias",
                "singleton_local_shards", "prefix", "expert_dp_rank"},
     "layout": <exactly the JSON of `moe-verify layout ... --expert-dp-rank D --json`>}

``config.prefix`` is moe-verify's ``--prefix``: the prefix handed to the expert module's
``sharded_state_dict`` (keys become ``prefix + "experts.linear_fc1.weight"`` etc.), passed
unchanged.

Usage (CPU only; TransformerEngine is not needed and TEGroupedMLP is not covered):

    python3 -m venv /tmp/mcore-venv
    /tmp/mcore-venv/bin/pip install torch megatron-core==0.16.1 einops packaging numpy
    /tmp/mcore-venv/bin/python tools/megatron_layouts.py --out tests/data/megatron-layouts [--only NAME ...]
    /tmp/mcore-venv/bin/python tools/megatron_layouts.py --list

Configurations run in one spawn of ``WORLD`` (8) processes per (tp, ep): ``parallel_state`` is
initialized once per spawn with tensor_model_parallel_size = expert_tensor_parallel_size = tp and
expert_model_parallel_size = ep, so the expert-data-parallel size is 8 / (tp * ep). (Re-initializing
it per configuration in one spawn leaks gloo threads, about 55 per process each time.)
The layout of expert-DP rank ``D`` (``expert_dp_rank`` of the configuration) is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

WORLD = 8


def cfg(name, layer, e, h, f, tp, ep, glu=False, bias=False, singleton=False, prefix="", edp=0):
    return name, dict(layer=layer, num_experts=e, hidden=h, ffn=f, tp=tp, ep=ep, glu=glu, bias=bias,
                      singleton_local_shards=singleton, prefix=prefix, expert_dp_rank=edp)


def configs():
    out = []
    # The golden snapshots of tests/checkpoint/layout.rs (layout_golden_snapshots): E=4, h=16, f=8.
    for layer in ("sequential", "grouped"):
        out.append(cfg(f"{layer}_e4_h16_f8_glu_tp2_ep2", layer, 4, 16, 8, 2, 2, glu=True))
        out.append(cfg(f"{layer}_e4_h16_f8_glu_tp2_ep2_singleton", layer, 4, 16, 8, 2, 2, glu=True, singleton=True))
    out.append(cfg("grouped_e4_h16_f8_tp2_ep1", "grouped", 4, 16, 8, 2, 1))
    # layout__te_grouped_bias_ep2_prefix, on SequentialMLP (same layout per spec 7.4).
    out.append(cfg("sequential_e4_h8_f16_bias_ep2_prefix", "sequential", 4, 8, 16, 1, 2, bias=True,
                   prefix="decoder.layers.3.mlp."))
    # Spec 8.1's model: E=8, h=16, f=64.
    for layer in ("sequential", "grouped"):
        for tp, ep in ((1, 1), (2, 1), (1, 2), (2, 2), (4, 2)):
            for glu in (False, True):
                for singleton in (False, True):
                    if layer == "grouped" and (tp, ep) in ((2, 1), (1, 2)) and not glu:
                        continue  # keep the run short; the GLU variants cover these sizes
                    n = f"{layer}_e8_h16_f64{'_glu' if glu else ''}_tp{tp}_ep{ep}{'_singleton' if singleton else ''}"
                    out.append(cfg(n, layer, 8, 16, 64, tp, ep, glu=glu, singleton=singleton))
    for glu in (False, True):
        for singleton in (False, True):
            g = "_glu" if glu else ""
            s = "_singleton" if singleton else ""
            out.append(cfg(f"sequential_e8_h16_f64{g}_bias_tp1_ep2{s}", "sequential", 8, 16, 64, 1, 2, glu=glu,
                           bias=True, singleton=singleton))
    out.append(cfg("sequential_e8_h16_f64_glu_bias_tp1_ep1_prefix", "sequential", 8, 16, 64, 1, 1, glu=True,
                   bias=True, prefix="decoder.layers.3.mlp."))
    out.append(cfg("grouped_e8_h16_f64_glu_tp2_ep2_prefix_singleton", "grouped", 8, 16, 64, 2, 2, glu=True,
                   singleton=True, prefix="decoder.layers.3.mlp.experts."))
    out.append(cfg("sequential_e8_h16_f64_glu_tp2_ep2_prefix", "sequential", 8, 16, 64, 2, 2, glu=True,
                   prefix="decoder.layers.3.mlp.experts."))
    # Expert-DP rank > 0 (third replica-id element).
    out.append(cfg("sequential_e8_h16_f64_glu_bias_tp1_ep2_edp3", "sequential", 8, 16, 64, 1, 2, glu=True, bias=True,
                   edp=3))
    out.append(cfg("grouped_e8_h16_f64_glu_tp2_ep2_edp1", "grouped", 8, 16, 64, 2, 2, glu=True, edp=1))
    out.append(cfg("sequential_e8_h16_f64_glu_tp2_ep2_singleton_edp1", "sequential", 8, 16, 64, 2, 2, glu=True,
                   singleton=True, edp=1))
    return out


def patch_grouped_gemm():
    """GroupedMLP asserts the grouped_gemm package in __init__; sharded_state_dict never calls it."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    gg.grouped_gemm_is_available = lambda: True
    gg.assert_grouped_gemm_is_available = lambda: None
    import megatron.core.transformer.moe.experts as experts

    for name in ("grouped_gemm_is_available",):
        if hasattr(experts, name):
            setattr(experts, name, lambda: True)
    if hasattr(experts, "gg"):
        experts.gg = gg


def build_module(c):
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe import experts as ex
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, ep = c["tp"], c["ep"]
    config = TransformerConfig(
        num_layers=1, hidden_size=c["hidden"], num_attention_heads=4, ffn_hidden_size=c["ffn"],
        num_moe_experts=c["num_experts"], moe_ffn_hidden_size=c["ffn"], moe_router_topk=2,
        gated_linear_unit=c["glu"], activation_func=F.silu, add_bias_linear=c["bias"],
        bias_activation_fusion=False, tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp, sequence_parallel=tp > 1, use_cpu_initialization=True,
        perform_initialization=False, params_dtype=torch.float32,
        moe_grouped_gemm=c["layer"] == "grouped",
    )
    el = c["num_experts"] // ep
    pgc = get_default_pg_collection()
    if c["layer"] == "sequential":
        sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        return ex.SequentialMLP(el, config, sub, pg_collection=pgc)
    if c["layer"] == "grouped":
        patch_grouped_gemm()
        return ex.GroupedMLP(el, config, pg_collection=pgc)
    raise ValueError(c["layer"])


def walk(x, out):
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedObject, ShardedTensor,
                                                          ShardedTensorFactory)

    if isinstance(x, dict):
        for v in x.values():
            walk(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            walk(v, out)
    elif isinstance(x, ShardedTensor):
        assert x.flattened_range is None, x.key
        out.append({"key": x.key, "kind": "tensor", "global_shape": list(x.global_shape),
                    "global_offset": list(x.global_offset), "local_shape": list(x.local_shape),
                    "axis_fragmentations": list(x.axis_fragmentations), "replica_id": list(x.replica_id),
                    "prepend_axis_num": x.prepend_axis_num})
    elif isinstance(x, ShardedObject):
        out.append({"key": x.key, "kind": "object", "global_shape": list(x.global_shape),
                    "global_offset": list(x.global_offset), "replica_id": list(x.replica_id)})
    elif isinstance(x, ShardedTensorFactory):
        raise AssertionError(f"unbuilt factory {x.key}")
    elif isinstance(x, LocalNonpersistentObject):
        pass  # not saved
    else:
        raise TypeError(f"unexpected sharded state dict value {type(x)}: {x!r}")


def rank_layout(c):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import apply_factories

    module = build_module(c)
    sd = module.sharded_state_dict(prefix=c["prefix"], sharded_offsets=(),
                                   metadata={"singleton_local_shards": c["singleton_local_shards"]})
    apply_factories(sd)  # what dist_checkpointing.save does before writing
    entries = []
    walk(sd, entries)
    entries.sort(key=lambda d: (d["key"], d["global_offset"]))
    return {"tp_rank": ps.get_expert_tensor_parallel_rank(), "ep_rank": ps.get_expert_model_parallel_rank(),
            "edp_rank": ps.get_expert_data_parallel_rank(), "entries": entries}


def worker(rank, world, todo, tmp, port):
    """One process: parallel_state is initialized once (all of ``todo`` share tp and ep)."""
    import torch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group(backend="gloo", world_size=world, rank=rank)
    from megatron.core import parallel_state as ps

    tp, ep = todo[0][1]["tp"], todo[0][1]["ep"]
    assert all((c["tp"], c["ep"]) == (tp, ep) for _, c in todo)
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)
    for name, c in todo:
        res = {"rank": rank}
        try:
            res["layout"] = rank_layout(c)
        except Exception:
            res["error"] = traceback.format_exc()
        with open(os.path.join(tmp, f"{name}.{rank}.json"), "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def dumps(doc):
    """The fixture's JSON: one line per sharded entry."""
    head = {k: v for k, v in doc.items() if k != "layout"}
    ranks = []
    for r in doc["layout"]:
        entries = ",\n".join("   " + json.dumps(e) for e in r["entries"])
        ranks.append(f' {{"tp_rank": {r["tp_rank"]}, "ep_rank": {r["ep_rank"]}, "entries": [\n{entries}\n ]}}')
    return json.dumps(head)[:-1] + ', "layout": [\n' + ",\n".join(ranks) + "\n]}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/megatron-layouts")
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--port", type=int, default=29561)
    args = ap.parse_args()
    todo = [x for x in configs() if not args.only or x[0] in args.only]
    if args.list:
        for n, c in todo:
            print(n, json.dumps(c))
        return 0
    import megatron.core
    import torch
    import torch.multiprocessing as mp

    os.makedirs(args.out, exist_ok=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        groups = {}
        for name, c in todo:  # one spawn per (tp, ep): gloo groups are costly to re-create
            groups.setdefault((c["tp"], c["ep"]), []).append((name, c))
        for i, group in enumerate(groups.values()):
            mp.spawn(worker, args=(WORLD, group, tmp, args.port + i), nprocs=WORLD, join=True)
        for name, c in todo:
            per = [json.load(open(os.path.join(tmp, f"{name}.{r}.json"))) for r in range(WORLD)]
            errs = [p["error"] for p in per if "error" in p]
            if errs:
                failed += 1
                print(f"[FAILED] {name}:\n{errs[0]}", flush=True)
                continue
            ranks = {}
            for p in per:
                lay = p["layout"]
                if lay["edp_rank"] != c["expert_dp_rank"]:
                    continue
                key = (lay["ep_rank"], lay["tp_rank"])
                entry = {"tp_rank": lay["tp_rank"], "ep_rank": lay["ep_rank"], "entries": lay["entries"]}
                assert key not in ranks or ranks[key] == entry, f"{name}: two processes disagree at {key}"
                ranks[key] = entry
            assert len(ranks) == c["tp"] * c["ep"], f"{name}: ranks {sorted(ranks)}"
            doc = {"name": name, "megatron_core": megatron.core.__version__, "torch": torch.__version__,
                   "config": c, "layout": [ranks[k] for k in sorted(ranks)]}
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                f.write(dumps(doc))
            n = sum(len(r["entries"]) for r in doc["layout"])
            print(f"[ok] {name}: {len(ranks)} ranks, {n} entries", flush=True)
    print(f"{len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
