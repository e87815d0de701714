#!/usr/bin/env python3
"""Writes the Hugging Face MoE fixtures under tests/data/hf/ (see tools/requirements-hf.txt).

Each fixture directory holds what `transformers` `save_pretrained` writes for a tiny, randomly
initialised model built from a config in code (no download), plus `expected.safetensors`: every
routed expert's weights in moe-verify's canonical orientation, taken from the *in-memory* model
(the tensors the forward pass uses), not from the saved files:

    layers.{l}.experts.{e}.fc1.weight  [2f, h]  gate rows, then up rows
    layers.{l}.experts.{e}.fc1.bias    [2f]     (GPT-OSS)
    layers.{l}.experts.{e}.fc2.weight  [h, f]
    layers.{l}.experts.{e}.fc2.bias    [h]      (GPT-OSS)

  mixtral/          MixtralForCausalLM, bf16, one file
  mixtral-fused/    the same model saved with save_original_format=False (transformers' in-memory
                    names: mlp.experts.gate_up_proj [E, 2f, h], mlp.experts.down_proj [E, h, f])
  qwen3-moe/        Qwen3MoeForCausalLM, bf16, sharded (model.safetensors.index.json)
  deepseek-v3/      DeepseekV3ForCausalLM, bf16, first_k_dense_replace = 1 (layer 0 dense)
  gpt-oss/          GptOssForCausalLM, bf16 (gate_up_proj interleaved, biases)
  deepseek-v3-fp8/  SYNTHESIZED from deepseek-v3: expert weights quantized here to F8_E4M3 with
                    128x128 `weight_scale_inv` (the released checkpoint's naming); expected values
                    are the exact dequantization (F32)
  gpt-oss-mxfp4/    SYNTHESIZED from gpt-oss: gate_up_proj / down_proj quantized here to MXFP4
                    `_blocks`/`_scales` (the released checkpoint's naming); expected values come
                    from transformers' own `convert_moe_packed_tensors` (integrations/mxfp4.py)

The two synthesized fixtures are not written by transformers (it does not save these formats
from a bf16 model); their tensor names and layouts follow the released DeepSeek-V3 and GPT-OSS
checkpoints. Run: `python tools/make_hf_fixtures.py` (writes tests/data/hf/, replacing it).
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "hf")


def expected_from_fused(model, layers):
    """Mixtral / Qwen3-MoE / DeepSeek-V3 in memory: experts.gate_up_proj [E, 2f, h] (forward:
    `linear(x, gate_up_proj[e]).chunk(2)`: gate first), experts.down_proj [E, h, f]."""
    out = {}
    for l in layers:
        ex = model.model.layers[l].mlp.experts
        for e in range(ex.gate_up_proj.shape[0]):
            out[f"layers.{l}.experts.{e}.fc1.weight"] = ex.gate_up_proj[e].detach().clone().contiguous()
            out[f"layers.{l}.experts.{e}.fc2.weight"] = ex.down_proj[e].detach().clone().contiguous()
    return out


def expected_gpt_oss(gate_up, gate_up_bias, down, down_bias, l, out):
    """GPT-OSS: gate_up_proj [E, h, 2f], forward `gate, up = gate_up[..., ::2], gate_up[..., 1::2]`
    after `x @ gate_up_proj[e] + gate_up_proj_bias[e]`; down_proj [E, f, h], `x @ down_proj[e]`."""
    for e in range(gate_up.shape[0]):
        g = gate_up[e]
        out[f"layers.{l}.experts.{e}.fc1.weight"] = torch.cat([g[:, ::2].T, g[:, 1::2].T]).contiguous()
        b = gate_up_bias[e]
        out[f"layers.{l}.experts.{e}.fc1.bias"] = torch.cat([b[::2], b[1::2]]).contiguous()
        out[f"layers.{l}.experts.{e}.fc2.weight"] = down[e].T.contiguous()
        out[f"layers.{l}.experts.{e}.fc2.bias"] = down_bias[e].clone().contiguous()


def save(model, name, expected, **kw):
    d = os.path.join(OUT, name)
    model.save_pretrained(d, **kw)
    save_file(expected, os.path.join(d, "expected.safetensors"))
    for junk in ["generation_config.json"]:
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)
    return d


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(1)
    cfg = MixtralConfig(vocab_size=16, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                        num_experts_per_tok=2, max_position_embeddings=16)
    m = MixtralForCausalLM(cfg).to(torch.bfloat16)
    save(m, "mixtral", expected_from_fused(m, range(2)))
    # transformers' own fused layout (experts.gate_up_proj [E, 2f, h], down_proj [E, h, f]).
    save(m, "mixtral-fused", expected_from_fused(m, range(2)), save_original_format=False)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(2)
    cfg = Qwen3MoeConfig(vocab_size=16, hidden_size=16, intermediate_size=16, moe_intermediate_size=8,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=16)
    m = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    save(m, "qwen3-moe", expected_from_fused(m, range(2)), max_shard_size="4KB")


def deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(3)
    cfg = DeepseekV3Config(vocab_size=16, hidden_size=136, intermediate_size=16, moe_intermediate_size=8,
                           num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                           num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                           n_group=1, topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                           qk_nope_head_dim=4, v_head_dim=4, max_position_embeddings=16)
    m = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    return save(m, "deepseek-v3", expected_from_fused(m, [1]))


def gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(4)
    cfg = GptOssConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, max_position_embeddings=16, layer_types=["full_attention"] * 2)
    m = GptOssForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for l in range(2):
            ex = m.model.layers[l].mlp.experts
            # The initialiser zeroes the biases; random ones make their layout checkable.
            ex.gate_up_proj_bias.normal_()
            ex.down_proj_bias.normal_()
    exp = {}
    for l in range(2):
        ex = m.model.layers[l].mlp.experts
        expected_gpt_oss(ex.gate_up_proj.detach(), ex.gate_up_proj_bias.detach(), ex.down_proj.detach(),
                         ex.down_proj_bias.detach(), l, exp)
    return save(m, "gpt-oss", exp)


def fp8_blockwise(w):
    """[r, c] float -> (F8_E4M3 codes, F32 scale_inv [ceil(r/128), ceil(c/128)]): per 128x128 tile
    scale_inv = amax / 448 rounded to bf16 (so every dequantized product is exact in f32)."""
    r, c = w.shape
    br, bc = (r + 127) // 128, (c + 127) // 128
    s = torch.empty(br, bc, dtype=torch.float32)
    q = torch.empty(r, c, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            si = (tile.abs().max() / 448).to(torch.bfloat16).float().clamp(min=2.0 ** -20)
            s[i, j] = si
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (tile / si).to(torch.float8_e4m3fn)
    deq = q.double() * s.double().repeat_interleave(128, 0)[:r].repeat_interleave(128, 1)[:, :c]
    assert torch.equal(deq.float().double(), deq), "dequantized fp8 value not exact in f32"
    return q, s, deq.float()


def deepseek_v3_fp8(src):
    d = os.path.join(OUT, "deepseek-v3-fp8")
    os.makedirs(d)
    shutil.copy(os.path.join(src, "config.json"), d)
    sd = load_file(os.path.join(src, "model.safetensors"))
    out, exp = {}, {}
    for k, v in sd.items():
        parts = k.split(".")
        if ".mlp.experts." in k and k.endswith(".weight"):
            q, s, deq = fp8_blockwise(v)
            out[k], out[k + "_scale_inv"] = q, s
            l, e, proj = int(parts[2]), int(parts[5]), parts[6]
            exp[(l, e, proj)] = deq
        else:
            out[k] = v
    save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    expected = {}
    for (l, e, proj), deq in exp.items():
        if proj == "gate_proj":
            expected[f"layers.{l}.experts.{e}.fc1.weight"] = torch.cat([deq, exp[(l, e, "up_proj")]]).contiguous()
        elif proj == "down_proj":
            expected[f"layers.{l}.experts.{e}.fc2.weight"] = deq.contiguous()
    save_file(expected, os.path.join(d, "expected.safetensors"))


FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(w):
    """[E, R, K] (rows = output features, K = input features, K % 32 == 0) -> blocks [E, R, K/32, 16]
    U8 (element 2b in the low nibble, 2b + 1 in the high one) and E8M0 scales [E, R, K/32] U8."""
    E, R, K = w.shape
    g = w.float().reshape(E, R, K // 32, 32)
    amax = g.abs().amax(-1).clamp(min=2.0 ** -100)
    exp = torch.ceil(torch.log2(amax / 6.0)).to(torch.int32)
    scaled = g / torch.pow(2.0, exp.float()).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - FP4).abs().argmin(-1).to(torch.uint8)  # nearest FP4 value
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def gpt_oss_mxfp4(src):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    d = os.path.join(OUT, "gpt-oss-mxfp4")
    os.makedirs(d)
    shutil.copy(os.path.join(src, "config.json"), d)
    sd = load_file(os.path.join(src, "model.safetensors"))
    out, exp = {}, {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            # Quantized along the input axis: the stored (pre-transpose) layout is [E, out, in].
            blocks, scales = mxfp4(v.transpose(1, 2))
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
            # transformers' dequantizer: [E, in, out] again, as the forward uses it.
            exp[k] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            out[k] = v
    save_file(out, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    expected = {}
    for l in range(2):
        p = f"model.layers.{l}.mlp.experts."
        expected_gpt_oss(exp[p + "gate_up_proj"], sd[p + "gate_up_proj_bias"], exp[p + "down_proj"],
                         sd[p + "down_proj_bias"], l, expected)
    save_file(expected, os.path.join(d, "expected.safetensors"))


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    mixtral()
    qwen3_moe()
    ds = deepseek_v3()
    oss = gpt_oss()
    deepseek_v3_fp8(ds)
    gpt_oss_mxfp4(oss)
    import transformers

    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0],
                   "python": sys.version.split()[0]}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
