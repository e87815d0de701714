//! A layer loaded from a checkpoint of another class and layout reproduces the f64 oracle.

use super::{dtype, global_weights, layout, save_every_rank};
use moe_checkpoint::tensor::f64_state_dict;
use moe_checkpoint::{Checkpoint, ExpertLayout, RankCoord};
use moe_reference::{from_state_dict, to_state_dict, ExpertSet, LayerClass};
use ndarray::{s, Array1, Array2};

use LayerClass::{Grouped, Sequential, TeGrouped};

/// Issue 4 ("a GPU layer loaded from a checkpoint of any layout reproduces the reference"):
/// save under one class and (tp, ep) layout, load into another class and layout, run the
/// implementations of `backend` rank by rank on the loaded state dicts (forward and backward,
/// partial sums of ETP ranks added as the dispatcher does), and compare output, input grad,
/// probs grad and every rank's weight grads with the f64 oracle on the unsharded weights under
/// the harness error model. Returns the failures (empty when all pass).
pub(crate) fn checkpoint_load_reproduces_oracle(backend: &dyn moe_harness::properties::Backend) -> Vec<String> {
    use moe_harness::compare::{compare_runs, compare_state_dicts};
    use moe_harness::Tolerance;
    use moe_reference::{oracle_with_scales, LayerRun, Numerics, WgradTiming};
    // (src class, src tp, src ep, dst class, dst tp, dst ep, glu, singleton on load).
    let pairs = [
        (Sequential, 2, 2, TeGrouped, 1, 4, true, false),
        (TeGrouped, 1, 4, Grouped, 2, 1, true, true),
        (Grouped, 2, 1, Sequential, 4, 2, false, false),
        (Sequential, 1, 1, Grouped, 1, 8, true, true),
        (TeGrouped, 4, 2, Sequential, 1, 1, false, false),
    ];
    let mut failures = Vec::new();
    for (i, &(src, stp, sep, dst, dtp, dep, glu, singleton)) in pairs.iter().enumerate() {
        let a = layout(src, stp, sep, glu, false);
        let b = layout(dst, dtp, dep, glu, singleton);
        let global = global_weights(&a, 100 + i as u64);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        save_every_rank(&dir, &a, &global);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let b_coords = b.ranks();
        let requests: Vec<(ExpertLayout, RankCoord)> = b_coords.iter().map(|c| (b.clone(), *c)).collect();
        let loaded = ckpt.load(&requests, Some(dtype())).unwrap();

        // The problem: all 8 experts, some empty, rows sorted by global expert.
        let case = moe_harness::case::Case {
            cfg: b.layer_config(RankCoord::new(0, 0), dtype()),
            tokens_per_expert: vec![5, 0, 17, 3, 0, 9, 1, 12],
            seed: 7 + i as u64,
            timing: WgradTiming::Immediate,
        };
        let mut p = case.problem();
        p.weights = global.clone();
        let global_cfg = case.cfg.unsharded();
        let o =
            oracle_with_scales(&global_cfg, &to_state_dict(&global_cfg, &global).unwrap(), &p.inputs, &p.grad_output)
                .unwrap();
        let Some(layer) = backend.layer(dst) else { continue };
        // Rank by rank on the loaded state dicts (not on freshly sharded weights).
        let el = b.local_experts();
        let (t, h) = p.inputs.hidden_states.dim();
        let reduce = Numerics::Emulated(dtype());
        let (mut y, mut dx, mut dp) = (Array2::<f64>::zeros((t, h)), Array2::<f64>::zeros((t, h)), Array1::zeros(t));
        for q in 0..b.config.parallel.ep_size {
            let (rows, inputs) = moe_reference::parallel::ep_rank_inputs(&p.inputs, el, q);
            let g = p.grad_output.slice(s![rows.clone(), ..]).to_owned();
            for (c, sd) in b_coords.iter().zip(&loaded).filter(|(c, _)| c.ep_rank == q) {
                let cfg = b.layer_config(*c, dtype());
                let params = f64_state_dict(sd);
                let run = match layer.forward_backward(&cfg, &params, &inputs, &g, WgradTiming::Immediate) {
                    Ok(r) => r,
                    Err(e) => {
                        failures.push(format!("pair {i}: rank {c:?}: {e}"));
                        continue;
                    }
                };
                // Each rank's weight grads equal the slices of the oracle's unsharded grads.
                let full = from_state_dict(&global_cfg, &o.run.weight_grads).unwrap();
                let full_s = from_state_dict(&global_cfg, &o.scales.weight_grads).unwrap();
                let full_a = from_state_dict(&global_cfg, &o.allowance.weight_grads).unwrap();
                let sd_of = |set: &ExpertSet| to_state_dict(&cfg, &set.shard(&cfg).unwrap()).unwrap();
                for d in compare_state_dicts(
                    &format!("pair {i} rank {c:?} grad."),
                    &cfg,
                    &run.weight_grads,
                    &sd_of(&full),
                    Some((&sd_of(&full_s), &sd_of(&full_a))),
                    Tolerance::error_model(),
                ) {
                    if !d.passed() {
                        failures.push(d.to_string());
                    }
                }
                let mut ys = y.slice_mut(s![rows.clone(), ..]);
                ys += &run.output.mapv(|v| reduce.fp32(v));
                let mut dxs = dx.slice_mut(s![rows.clone(), ..]);
                dxs += &run.grad_input.mapv(|v| reduce.fp32(v));
                let mut dps = dp.slice_mut(s![rows.clone()]);
                dps += &run.grad_probs;
            }
        }
        let got = LayerRun {
            output: y.mapv(|v| reduce.store(v)),
            grad_input: dx.mapv(|v| reduce.store(v)),
            grad_probs: dp,
            weight_grads: Default::default(),
        };
        let expected = LayerRun { weight_grads: Default::default(), ..o.run.clone() };
        for d in compare_runs(&global_cfg, &got, &expected, Some((&o).into()), Tolerance::error_model()) {
            if !d.passed() {
                failures.push(format!("pair {i} ({src} tp{stp} ep{sep} -> {dst} tp{dtp} ep{dep}): {d}"));
            }
        }
    }
    failures
}

/// The reference (storage-dtype emulation) run on state dicts loaded from checkpoints of other
/// classes and layouts reproduces the oracle; `tests/gpu.rs` runs the same on the CUDA layers.
#[test]
fn reference_loaded_from_another_layout_reproduces_the_oracle() {
    let failures = checkpoint_load_reproduces_oracle(&moe_harness::properties::ReferenceBackend);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
