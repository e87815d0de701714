"""Megatron `torch_dist` checkpoints of tiny GPT-MoE models, written by megatron-core itself.

For each configuration, ``WORLD`` CPU processes (gloo) build a megatron-core ``GPTModel`` with
the local layer spec (``get_gpt_layer_local_spec``: SequentialMLP experts, or the legacy
GroupedMLP with ``moe_grouped_gemm``), set every expert parameter from one seeded set of
canonical per-expert tensors, and save ``model.sharded_state_dict()`` with
``megatron.core.dist_checkpointing.save`` (the ``torch_dist`` backend: ``.metadata``,
``__{rank}_{i}.distcp``, ``common.pt``, ``metadata.json``). Rank 0 also writes the same weights
in moe-verify's canonical per-expert orientation to ``reference.safetensors``:

    layers.{l}.experts.{g}.fc1_weight  [N1, h]   (GLU: gate rows [0, f), then linear rows)
    layers.{l}.experts.{g}.fc1_bias    [N1]
    layers.{l}.experts.{g}.fc2_weight  [h, f]
    layers.{l}.experts.{g}.fc2_bias    [h]

and ``fixture.json`` (configuration, versions). The test ``torch_dist_fixtures_read_exactly``
compares what the Rust reader gives with ``reference.safetensors`` bit for bit.

How the canonical tensors are put into the modules (the forward's conventions, not the
checkpoint's; megatron-core 0.16.1):

* local expert ``e`` on expert-parallel rank ``q`` is global expert ``q * E_l + e``;
* fc1 (ColumnParallelLinear, output split over expert-TP rank ``r`` of ``t``): non-GLU rows
  ``[r f/t, (r+1) f/t)``; GLU: the forward chunks the local output in two (gate, linear), so the
  local rows are gate rows ``[r f/t, (r+1) f/t)`` followed by the same linear rows;
* fc2 (RowParallelLinear): columns ``[r f/t, (r+1) f/t)``; its bias is replicated;
* GroupedMLP: ``weight1`` [h, E_l N1/t] is used as ``weight1.view(E_l, h, -1)[e] = fc1_local^T``
  and ``weight2`` [E_l f/t, h] as ``weight2.view(E_l, -1, h)[e] = fc2_local^T`` (its forward).

Usage (CPU only, no TransformerEngine):

    python3 -m venv /tmp/mcore-venv
    /tmp/mcore-venv/bin/pip install -r tools/requirements-torch-dist.txt
    /tmp/mcore-venv/bin/python tools/make_torch_dist_fixtures.py --out tests/data/torch_dist [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback

H, F, E, LAYERS, VOCAB, SEQ = 16, 8, 4, 2, 32, 8


def cfg(name, world, layer, tp, ep, etp, glu, singleton, bias=False, dtype="float32", seed=0):
    return name, dict(world=world, layer=layer, tp=tp, ep=ep, etp=etp, glu=glu, singleton_local_shards=singleton,
                      bias=bias, dtype=dtype, seed=seed, hidden=H, ffn=F, num_experts=E, num_layers=LAYERS)


def configs():
    return [
        cfg("seq_w1_glu", 1, "sequential", 1, 1, 1, True, False, seed=1),
        cfg("grouped_w1_singleton", 1, "grouped", 1, 1, 1, False, True, seed=2),
        cfg("seq_w2_ep2_glu_singleton_bias", 2, "sequential", 1, 2, 1, True, True, bias=True, seed=3),
        cfg("seq_w2_etp2_bf16", 2, "sequential", 2, 1, 2, False, False, dtype="bfloat16", seed=4),
        cfg("grouped_w2_ep2_glu", 2, "grouped", 1, 2, 1, True, False, seed=5),
        cfg("seq_w4_tp2_ep2_etp1_glu", 4, "sequential", 2, 2, 1, True, False, seed=7),
        cfg("grouped_w4_ep2_etp2_glu_singleton", 4, "grouped", 2, 2, 2, True, True, dtype="bfloat16", seed=8),
    ]


def patch_grouped_gemm():
    """GroupedMLP asserts the grouped_gemm package in __init__; sharded_state_dict never calls it."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    gg.grouped_gemm_is_available = lambda: True
    gg.assert_grouped_gemm_is_available = lambda: None
    import megatron.core.transformer.moe.experts as experts

    if hasattr(experts, "grouped_gemm_is_available"):
        experts.grouped_gemm_is_available = lambda: True
    if hasattr(experts, "gg"):
        experts.gg = gg


def canonical(c):
    """The canonical per-expert tensors of every layer, the same on every rank (seeded)."""
    import torch

    dt = getattr(torch, c["dtype"])
    g = torch.Generator().manual_seed(1000 + c["seed"])
    n1 = 2 * F if c["glu"] else F
    out = {}
    for l in range(LAYERS):
        for e in range(E):
            p = f"layers.{l}.experts.{e}."
            out[p + "fc1_weight"] = torch.randn(n1, H, generator=g).to(dt)
            out[p + "fc2_weight"] = torch.randn(H, F, generator=g).to(dt)
            if c["bias"]:
                out[p + "fc1_bias"] = torch.randn(n1, generator=g).to(dt)
                out[p + "fc2_bias"] = torch.randn(H, generator=g).to(dt)
    return out


def fc1_local(w, glu, r, t):
    """Rows of a canonical fc1 weight or bias held by expert-TP rank r of t."""
    import torch

    f = w.shape[0] // 2 if glu else w.shape[0]
    fl = f // t
    if not glu:
        return w[r * fl:(r + 1) * fl]
    return torch.cat([w[r * fl:(r + 1) * fl], w[f + r * fl:f + (r + 1) * fl]], 0)


def build_model(c):
    import torch
    import torch.nn.functional as Fn
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    grouped = c["layer"] == "grouped"
    if grouped:
        patch_grouped_gemm()
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=H, num_attention_heads=4, ffn_hidden_size=F, num_moe_experts=E,
        moe_ffn_hidden_size=F, moe_router_topk=2, gated_linear_unit=c["glu"], activation_func=Fn.silu,
        add_bias_linear=c["bias"], bias_activation_fusion=False, tensor_model_parallel_size=c["tp"],
        expert_model_parallel_size=c["ep"], expert_tensor_parallel_size=c["etp"], sequence_parallel=False,
        use_cpu_initialization=True, perform_initialization=True, params_dtype=getattr(torch, c["dtype"]),
        moe_grouped_gemm=grouped, moe_token_dispatcher_type="allgather",
    )
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=grouped, moe_use_legacy_grouped_gemm=grouped)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def set_experts(model, c, canon):
    """Copies the canonical tensors into this rank's expert parameters; returns how many were set."""
    import torch
    from megatron.core import parallel_state as ps

    q, r = ps.get_expert_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    t, el, glu = c["etp"], E // c["ep"], c["glu"]
    fl = F // t
    done = 0
    for l, layer in enumerate(model.decoder.layers):
        experts = layer.mlp.experts
        can = lambda e, n: canon[f"layers.{l}.experts.{q * el + e}.{n}"]  # noqa: E731
        with torch.no_grad():
            if c["layer"] == "grouped":
                w1 = torch.stack([fc1_local(can(e, "fc1_weight"), glu, r, t).t() for e in range(el)])
                w2 = torch.stack([can(e, "fc2_weight")[:, r * fl:(r + 1) * fl].t() for e in range(el)])
                assert experts.weight1.shape == (H, w1.numel() // H), experts.weight1.shape
                assert experts.weight2.shape == (w2.numel() // H, H), experts.weight2.shape
                experts.weight1.copy_(w1.contiguous().reshape(experts.weight1.shape))
                experts.weight2.copy_(w2.contiguous().reshape(experts.weight2.shape))
                assert torch.equal(experts.weight1.view(el, H, -1)[0], w1[0])
                done += 2
                continue
            for e, mlp in enumerate(experts.local_experts):
                fc1, fc2 = mlp.linear_fc1, mlp.linear_fc2
                fc1.weight.copy_(fc1_local(can(e, "fc1_weight"), glu, r, t))
                fc2.weight.copy_(can(e, "fc2_weight")[:, r * fl:(r + 1) * fl])
                done += 2
                if c["bias"]:
                    fc1.bias.copy_(fc1_local(can(e, "fc1_bias"), glu, r, t))
                    fc2.bias.copy_(can(e, "fc2_bias"))
                    done += 2
    return done


def worker(rank, c, out, port, errfile):
    import faulthandler

    import torch

    faulthandler.dump_traceback_later(900, exit=True)  # a hung save fails instead of hanging
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        if not torch.cuda.is_available():
            # FileSystemWriterAsync.preload_tensors synchronizes CUDA unconditionally and
            # save_state_dict_async_finalize all-reduces a flag on torch.cuda.current_device():
            # on CPU there is nothing to wait for and the flag lives on the CPU (gloo).
            torch.cuda.synchronize = lambda *a, **k: None
            torch.cuda.current_device = lambda: "cpu"
        torch.distributed.init_process_group(backend="gloo", world_size=c["world"], rank=rank)
        from megatron.core import dist_checkpointing
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        ps.initialize_model_parallel(tensor_model_parallel_size=c["tp"], pipeline_model_parallel_size=1,
                                     expert_model_parallel_size=c["ep"], expert_tensor_parallel_size=c["etp"])
        torch.manual_seed(c["seed"])
        try:
            model_parallel_cuda_manual_seed(c["seed"], force_cpu=True)
        except TypeError:
            pass
        model = build_model(c)
        canon = canonical(c)
        set_experts(model, c, canon)
        sd = model.sharded_state_dict(prefix="", metadata={"singleton_local_shards": c["singleton_local_shards"]})
        dist_checkpointing.save(sd, out)
        if rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in canon.items()}, os.path.join(out, "reference.safetensors"))
        torch.distributed.barrier()
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    except Exception:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise


def make_bad(out):
    """Edited copies of ``seq_w1_glu/.metadata`` under ``OUT/bad/`` (the tests put each in a copy
    of that checkpoint), one fault each:

    * ``shape.metadata``: the storage records of an fc1 chunk and an fc2 chunk swapped (each
      chunk's bytes hold a tensor of the other's shape);
    * ``dtype.metadata``: the fc2 weight's dtype changed to float16 (its chunks hold float32);
    * ``coverage.metadata``: one chunk of the fc2 weight removed (expert 1 of layer 0 is missing);
    * ``global.metadata``: ``planner_data`` set to ``os.system`` (a pickle naming a global outside
      the allowlist; nothing may run it).
    """
    import pickle

    import torch

    src = os.path.join(out, "seq_w1_glu", ".metadata")
    bad = os.path.join(out, "bad")
    os.makedirs(bad, exist_ok=True)
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    fc2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"

    def load():
        with open(src, "rb") as f:
            return pickle.load(f)

    def dump(m, name):
        with open(os.path.join(bad, name), "wb") as f:
            pickle.dump(m, f)

    m = load()
    k1 = next(k for k in m.storage_data if k.fqn == fc1)
    k2 = next(k for k in m.storage_data if k.fqn == fc2)
    m.storage_data[k1], m.storage_data[k2] = m.storage_data[k2], m.storage_data[k1]
    dump(m, "shape.metadata")
    m = load()
    m.state_dict_metadata[fc2].properties.dtype = torch.float16
    dump(m, "dtype.metadata")
    m = load()
    chunks = m.state_dict_metadata[fc2].chunks
    gone = next(c for c in chunks if tuple(c.offsets)[:2] == (0, 1))
    chunks.remove(gone)
    dump(m, "coverage.metadata")
    m = load()
    m.planner_data = os.system
    dump(m, "global.metadata")
    print(f"[ok] bad: {sorted(os.listdir(bad))}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/torch_dist")
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    ap.add_argument("--port", type=int, default=29661)
    args = ap.parse_args()
    import megatron.core
    import torch
    import torch.multiprocessing as mp

    os.makedirs(args.out, exist_ok=True)
    failed = 0
    todo = [x for x in configs() if not args.only or x[0] in args.only]
    for i, (name, c) in enumerate(todo):
        dst = os.path.join(args.out, name)
        with tempfile.TemporaryDirectory() as tmp:
            ck = os.path.join(tmp, "ckpt")
            os.makedirs(ck)
            errfile = os.path.join(tmp, "err")
            try:
                mp.spawn(worker, args=(c, ck, args.port + i, errfile), nprocs=c["world"], join=True)
            except Exception:
                failed += 1
                errs = [open(os.path.join(tmp, f)).read() for f in os.listdir(tmp) if f.startswith("err.")]
                print(f"[FAILED] {name}:\n{errs[0] if errs else traceback.format_exc()}", flush=True)
                continue
            doc = {"name": name, "megatron_core": megatron.core.__version__, "torch": torch.__version__,
                   "config": c}
            with open(os.path.join(ck, "fixture.json"), "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
            if os.path.exists(dst):
                shutil.rmtree(dst)
            shutil.copytree(ck, dst)
        size = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst))
        print(f"[ok] {name}: {sorted(os.listdir(dst))}, {size} bytes", flush=True)
    if not args.only or "seq_w1_glu" in args.only:
        make_bad(args.out)
    print(f"{len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
