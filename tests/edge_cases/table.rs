//! The edge-case table, each entry with why it exists and where it comes from, through every §10 property.

use super::{case, cfg, tp_ep};
use moe_harness::case::Case;
use moe_harness::properties::{check, Property, ReferenceBackend, Verdict};
use moe_reference::{Activation, Dtype, LayerClass, LayerConfig, WgradTiming};

/// One table entry.
struct EdgeCase {
    /// Test-readable name.
    name: &'static str,
    /// Why it exists and where it comes from.
    why: &'static str,
    case: Case,
}

/// The edge-case table.
fn edge_cases() -> Vec<EdgeCase> {
    use LayerClass::{Grouped, Sequential, TeGrouped};
    use WgradTiming::{Deferred, Immediate};
    let mut out = Vec::new();
    for class in LayerClass::ALL {
        let c = cfg(class, 4, 16, 32);
        let timing = if class == Grouped { Immediate } else { Deferred };
        out.extend([
            EdgeCase {
                name: "single_token",
                why: "tokens = 1: the smallest GEMM, one row in one segment (style §13)",
                case: case(c.clone(), &[0, 1, 0, 0], timing),
            },
            EdgeCase {
                name: "empty_first_expert",
                why: "TE commit 971001394 (test cites PR #1527): empty split handling, first",
                case: case(c.clone(), &[0, 5, 3, 2], timing),
            },
            EdgeCase {
                name: "empty_middle_expert",
                why: "TE commit 971001394 / PR #1527: empty split in the middle",
                case: case(c.clone(), &[5, 0, 3, 2], timing),
            },
            EdgeCase {
                name: "empty_last_expert",
                why: "TE commit 971001394 / PR #1527: GroupedLinear failed when the LAST split was empty",
                case: case(c.clone(), &[5, 3, 2, 0], timing),
            },
            EdgeCase {
                name: "all_tokens_to_one_expert",
                why: "all rows routed to one expert, the others empty (style §13; megablocks #163 many empty groups)",
                case: case(c.clone(), &[0, 0, 40, 0], timing),
            },
            EdgeCase {
                name: "all_zero_tokens",
                why: "T = 0: fanshiqing/grouped_gemm asserts on all-zero batch sizes, TE PR #3019 (cuBLAS hang), \
                      Megatron PR #4851 (skipped fc1/fc2 -> EP hang); spec §4.4 step 3, §10.4",
                case: case(c.clone(), &[0, 0, 0, 0], timing),
            },
            EdgeCase {
                name: "wgrad_with_empty_groups",
                why: "tgale96/grouped_gemm 398709f (cutlass PR #1593): k = 0 wgrad problems must write zeros",
                case: case(c.clone(), &[0, 128, 0, 64], timing),
            },
            EdgeCase {
                name: "hidden_12_misaligned",
                why: "legacy TestParallelGroupedMLP: hidden must be a multiple of 16 for CUTLASS; 12 must work or be rejected",
                case: case(cfg(class, 2, 12, 48), &[3, 5], timing),
            },
            EdgeCase {
                name: "hidden_69_misaligned",
                why: "CUTLASS misaligned address (cutlass #519/#1058): odd hidden size 69",
                case: case(cfg(class, 2, 69, 12), &[7, 4], timing),
            },
        ]);
    }
    out.extend([
        EdgeCase {
            name: "pytorch_172439_zero_groups",
            why: "pytorch #172439: grouped_mm gives non-zero dW for zero-size groups (B200). Sizes \
                  [162,0,2577,446,0,83] kept; hidden 2048 / inter 768 scaled to 24 / 16 for CI",
            case: case(
                LayerConfig {
                    gated_linear_unit: false,
                    activation: Activation::Gelu,
                    ..cfg(TeGrouped, 6, 24, 16)
                },
                &[162, 0, 2577, 446, 0, 83],
                Immediate,
            ),
        },
        EdgeCase {
            name: "swiglu_with_tp2",
            why: "Megatron #360/#985: SwiGLU with TP > 1; each rank must hold [W_r; V_r]",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 1),
                    ..cfg(Sequential, 2, 16, 8)
                },
                &[5, 4],
                Immediate,
            ),
        },
        EdgeCase {
            name: "swiglu_tp2_ep2_grouped",
            why: "Megatron #360 with EP: GroupedMLP packs [W_r; V_r] per expert block; commit d81a037afd (grad scaling under TP x EP)",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 2),
                    ..cfg(Grouped, 4, 16, 8)
                },
                &[3, 0, 6, 2],
                Immediate,
            ),
        },
        EdgeCase {
            name: "square_expert_matrices",
            why: "transformers #47031: 2*ffn == hidden makes fc1 square, so a shape-based transpose cannot tell layouts apart",
            case: case(cfg(TeGrouped, 3, 16, 8), &[4, 2, 5], Immediate),
        },
        EdgeCase {
            name: "single_local_expert_sequential",
            why: "spec §4.1: SequentialMLP with E_l = 1 sends the whole input to expert 0",
            case: case(cfg(Sequential, 1, 16, 8), &[9], Deferred),
        },
        EdgeCase {
            name: "deferred_wgrad_with_bias",
            why: "TE PR #3038 review: backward_dw crashed with biases + delay_wgrad_compute",
            case: case(
                LayerConfig {
                    add_bias: true,
                    ..cfg(TeGrouped, 3, 16, 8)
                },
                &[4, 0, 3],
                Deferred,
            ),
        },
        EdgeCase {
            name: "deferred_wgrad_with_bias_sequential",
            why: "TE PR #3038 for SequentialMLP's TE linears (MLP.backward_dw: fc2 then fc1)",
            case: case(
                LayerConfig {
                    add_bias: true,
                    params_dtype: Dtype::F32,
                    ..cfg(Sequential, 3, 16, 8)
                },
                &[0, 5, 3],
                Deferred,
            ),
        },
        EdgeCase {
            name: "megatron_te_grouped_test_shapes",
            why: "spec §8.2 TestTEGroupedMLP: h=16, E=2, GLU silu, f=64, bf16, no bias",
            case: case(cfg(TeGrouped, 2, 16, 64), &[40, 24], Immediate),
        },
        EdgeCase {
            name: "megatron_sequential_test_config",
            why: "spec §8.3 TestTEParallelSequentialMLP: E=4 over EP=2, TP=2, h=12, counts [2,2] and [0,4]",
            case: case(
                LayerConfig {
                    parallel: tp_ep(2, 2),
                    ..cfg(Sequential, 4, 12, 48)
                },
                &[2, 2, 0, 4],
                Deferred,
            ),
        },
    ]);
    out
}

/// Every table entry passes every property that applies to it, and at least one applies.
#[test]
fn every_edge_case_passes_every_property() {
    let mut failures = Vec::new();
    for ec in edge_cases() {
        let mut checked = 0;
        for property in Property::ALL {
            match check(&ReferenceBackend, property, &ec.case) {
                Ok(Verdict::Checked(_)) => checked += 1,
                Ok(Verdict::Skipped(_)) => {}
                Err(f) => {
                    failures.push(format!("{} ({}) / {}: {}\n{f}", ec.name, ec.why, property.name(), ec.case.summary()))
                }
            }
        }
        if checked == 0 {
            failures.push(format!("{}: every property skipped", ec.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
