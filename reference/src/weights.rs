//! Expert weights in the canonical per-expert `[out, in]` form, and their expert/tensor-parallel
//! sharding (spec §3, §6.2).
//!
//! Every class's parameters convert losslessly to and from this form ([`crate::state_dict`]), so
//! it is the common currency of the reference, the parallel simulation and checkpoints.

use crate::config::LayerConfig;
use crate::dtype::Dtype;
use crate::error::ReferenceError;
use ndarray::{concatenate, s, Array1, Array2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One expert's parameters in `[out, in]` orientation.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertWeights {
    /// fc1 weight `[N1, h]`, in the module's row order: with GLU rows `[0, N2)` are the gate and
    /// `[N2, 2·N2)` the linear half, or, with `glu_interleave_size`, blocks of gate and linear
    /// rows alternate (spec §4.10, [`crate::glu`]).
    pub fc1_weight: Array2<f64>,
    /// fc1 bias `[N1]` (with `add_bias_linear`).
    pub fc1_bias: Option<Array1<f64>>,
    /// fc2 weight `[h, N2]`.
    pub fc2_weight: Array2<f64>,
    /// fc2 bias `[h]` (with `add_bias_linear`).
    pub fc2_bias: Option<Array1<f64>>,
}

impl ExpertWeights {
    /// The same weights with fc1's rows (weight and bias) permuted by `order`, a function of
    /// the flat row-major items, the row count `N1` and the row length.
    fn map_fc1_rows(&self, order: impl Fn(&[f64], usize, usize) -> Vec<f64>) -> ExpertWeights {
        let (n1, h) = self.fc1_weight.dim();
        let w = self.fc1_weight.as_standard_layout();
        let rows = order(w.as_slice().expect("standard layout"), n1, h);
        ExpertWeights {
            fc1_weight: Array2::from_shape_vec((n1, h), rows).expect("a permutation keeps the shape"),
            fc1_bias: self.fc1_bias.as_ref().map(|b| Array1::from(order(&b.to_vec(), n1, 1))),
            fc2_weight: self.fc2_weight.clone(),
            fc2_bias: self.fc2_bias.clone(),
        }
    }

    /// These weights with fc1's rows in canonical `[gate; linear]` order, from a layer whose fc1
    /// is GLU-interleaved in blocks of `size` ([`crate::glu::remove_glu_interleaving`]); a copy
    /// when `size` is `None`. The caller checks that `N1` is a multiple of `2·size`.
    pub fn glu_deinterleaved(&self, size: Option<usize>) -> ExpertWeights {
        match size {
            Some(s) => self.map_fc1_rows(|d, n1, len| crate::glu::remove_glu_interleaving(d, n1, len, s)),
            None => self.clone(),
        }
    }

    /// The inverse of [`ExpertWeights::glu_deinterleaved`]: canonical fc1 rows to the
    /// interleaved order of a layer with interleave size `size`.
    pub fn glu_interleaved(&self, size: Option<usize>) -> ExpertWeights {
        match size {
            Some(s) => self.map_fc1_rows(|d, n1, len| crate::glu::apply_glu_interleaving(d, n1, len, s)),
            None => self.clone(),
        }
    }

    /// All-zero weights of the given per-rank shape (the shape of a gradient).
    pub fn zeros(hidden: usize, n1: usize, n2: usize, bias: bool) -> ExpertWeights {
        ExpertWeights {
            fc1_weight: Array2::zeros((n1, hidden)),
            fc1_bias: bias.then(|| Array1::zeros(n1)),
            fc2_weight: Array2::zeros((hidden, n2)),
            fc2_bias: bias.then(|| Array1::zeros(hidden)),
        }
    }

    /// The four tensors by canonical name (`fc1_weight`, `fc1_bias`, `fc2_weight`, `fc2_bias`),
    /// absent biases skipped, as flat slices with their shapes.
    pub fn tensors(&self) -> Vec<(&'static str, Vec<usize>, Vec<f64>)> {
        let mut out = vec![("fc1_weight", self.fc1_weight.shape().to_vec(), self.fc1_weight.iter().copied().collect())];
        if let Some(b) = &self.fc1_bias {
            out.push(("fc1_bias", b.shape().to_vec(), b.to_vec()));
        }
        out.push(("fc2_weight", self.fc2_weight.shape().to_vec(), self.fc2_weight.iter().copied().collect()));
        if let Some(b) = &self.fc2_bias {
            out.push(("fc2_bias", b.shape().to_vec(), b.to_vec()));
        }
        out
    }
}

/// The experts of one rank (`E_l` of them, this rank's TP slices) or, unsharded, all `E`
/// experts in full.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertSet {
    /// Experts in local order.
    pub experts: Vec<ExpertWeights>,
}

impl ExpertSet {
    /// Random weights for every expert of `cfg`'s rank, exactly representable in the params
    /// dtype. Weights ~ U(-1, 1)/√fan_in, biases ~ U(-0.5, 0.5). Deterministic in `seed`.
    pub fn random(cfg: &LayerConfig, seed: u64) -> ExpertSet {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dtype = cfg.params_dtype;
        let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
        let mut uniform = |n: usize, scale: f64| -> Vec<f64> {
            (0..n).map(|_| dtype.round(rng.random_range(-1.0..1.0) * scale)).collect()
        };
        let experts = (0..cfg.num_local_experts())
            .map(|_| ExpertWeights {
                fc1_weight: Array2::from_shape_vec((n1, h), uniform(n1 * h, 1.0 / (h as f64).sqrt())).unwrap(),
                fc1_bias: cfg.add_bias.then(|| Array1::from(uniform(n1, 0.5))),
                fc2_weight: Array2::from_shape_vec((h, n2), uniform(h * n2, 1.0 / (cfg.ffn_hidden_size as f64).sqrt()))
                    .unwrap(),
                fc2_bias: cfg.add_bias.then(|| Array1::from(uniform(h, 0.5))),
            })
            .collect();
        ExpertSet { experts }
    }

    /// All-zero weights with `cfg`'s per-rank shapes.
    pub fn zeros(cfg: &LayerConfig) -> ExpertSet {
        ExpertSet {
            experts: (0..cfg.num_local_experts())
                .map(|_| ExpertWeights::zeros(cfg.hidden_size, cfg.n1(), cfg.n2(), cfg.add_bias))
                .collect(),
        }
    }

    /// Checks that every tensor has `cfg`'s per-rank shape and bias presence.
    pub fn check_shapes(&self, cfg: &LayerConfig) -> Result<(), ReferenceError> {
        if self.experts.len() != cfg.num_local_experts() {
            return Err(ReferenceError::Shape {
                name: "experts".into(),
                expected: vec![cfg.num_local_experts()],
                got: vec![self.experts.len()],
            });
        }
        let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
        for (e, w) in self.experts.iter().enumerate() {
            let check = |name: &str, got: &[usize], expected: Vec<usize>| {
                if got == expected.as_slice() {
                    Ok(())
                } else {
                    Err(ReferenceError::Shape { name: format!("expert {e} {name}"), expected, got: got.to_vec() })
                }
            };
            check("fc1_weight", w.fc1_weight.shape(), vec![n1, h])?;
            check("fc2_weight", w.fc2_weight.shape(), vec![h, n2])?;
            for (name, bias, len) in [("fc1_bias", &w.fc1_bias, n1), ("fc2_bias", &w.fc2_bias, h)] {
                match (bias, cfg.add_bias) {
                    (Some(b), true) => check(name, b.shape(), vec![len])?,
                    (None, false) => {}
                    (Some(_), false) => {
                        return Err(ReferenceError::Config(format!(
                            "expert {e} has {name} but add_bias_linear is false"
                        )))
                    }
                    (None, true) => {
                        return Err(ReferenceError::Config(format!(
                            "expert {e} lacks {name} but add_bias_linear is true"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Rounds every value to `dtype` (used to make f64 weights storable).
    pub fn rounded(&self, dtype: Dtype) -> ExpertSet {
        let r = |a: &Array2<f64>| a.mapv(|x| dtype.round(x));
        let rb = |b: &Option<Array1<f64>>| b.as_ref().map(|b| b.mapv(|x| dtype.round(x)));
        ExpertSet {
            experts: self
                .experts
                .iter()
                .map(|w| ExpertWeights {
                    fc1_weight: r(&w.fc1_weight),
                    fc1_bias: rb(&w.fc1_bias),
                    fc2_weight: r(&w.fc2_weight),
                    fc2_bias: rb(&w.fc2_bias),
                })
                .collect(),
        }
    }

    /// Every expert with [`ExpertWeights::glu_deinterleaved`] applied.
    pub fn glu_deinterleaved(&self, size: Option<usize>) -> ExpertSet {
        ExpertSet { experts: self.experts.iter().map(|w| w.glu_deinterleaved(size)).collect() }
    }

    /// Every expert with [`ExpertWeights::glu_interleaved`] applied.
    pub fn glu_interleaved(&self, size: Option<usize>) -> ExpertSet {
        ExpertSet { experts: self.experts.iter().map(|w| w.glu_interleaved(size)).collect() }
    }

    /// Cuts this rank's share out of the full, unsharded experts (`self` holds all `E` experts
    /// at t = 1): local experts `r_ep·E_l .. (r_ep+1)·E_l`; fc1 rows of ETP slice `r` (with GLU,
    /// `[gate slice r; linear slice r]`, i.e. chunks `r` and `t + r` of `2t`); fc2 columns of
    /// slice `r`; biases whole (bias requires t = 1).
    ///
    /// With `cfg.glu_interleave_size` the fc1 rows of both sides are in the module's interleaved
    /// order, which is per TP-local tensor (spec §4.10): the full experts are un-interleaved
    /// (as one t = 1 tensor), sharded as above, and each slice is interleaved on its own, so the
    /// shard computes the same units as the full layer.
    pub fn shard(&self, cfg: &LayerConfig) -> Result<ExpertSet, ReferenceError> {
        cfg.validate()?;
        self.check_shapes(&cfg.unsharded())?;
        if let Some(size) = cfg.glu_interleave_size {
            let plain = LayerConfig { glu_interleave_size: None, ..cfg.clone() };
            return Ok(self.glu_deinterleaved(Some(size)).shard(&plain)?.glu_interleaved(Some(size)));
        }
        let (t, r) = (cfg.parallel.tp_size, cfg.parallel.tp_rank);
        let f = cfg.ffn_hidden_size;
        let k = f / t;
        let rows = |a: &Array2<f64>| -> Array2<f64> {
            if cfg.gated_linear_unit {
                concatenate![Axis(0), a.slice(s![r * k..(r + 1) * k, ..]), a.slice(s![f + r * k..f + (r + 1) * k, ..])]
            } else {
                a.slice(s![r * k..(r + 1) * k, ..]).to_owned()
            }
        };
        let rows1 = |b: &Array1<f64>| -> Array1<f64> {
            if cfg.gated_linear_unit {
                concatenate![Axis(0), b.slice(s![r * k..(r + 1) * k]), b.slice(s![f + r * k..f + (r + 1) * k])]
            } else {
                b.slice(s![r * k..(r + 1) * k]).to_owned()
            }
        };
        let first = cfg.global_expert(0);
        Ok(ExpertSet {
            experts: self.experts[first..first + cfg.num_local_experts()]
                .iter()
                .map(|w| ExpertWeights {
                    fc1_weight: rows(&w.fc1_weight),
                    fc1_bias: w.fc1_bias.as_ref().map(rows1),
                    fc2_weight: w.fc2_weight.slice(s![.., r * k..(r + 1) * k]).to_owned(),
                    fc2_bias: w.fc2_bias.clone(),
                })
                .collect(),
        })
    }

    /// The inverse of [`ExpertSet::shard`]: reassembles the full experts from every rank's share,
    /// `shards[ep_rank][tp_rank]`. `cfg` gives the sizes (its ranks are ignored).
    ///
    /// With `cfg.glu_interleave_size` each shard's fc1 rows are un-interleaved on their own and
    /// the full experts interleaved as one t = 1 tensor (see [`ExpertSet::shard`]).
    pub fn unshard(cfg: &LayerConfig, shards: &[Vec<ExpertSet>]) -> Result<ExpertSet, ReferenceError> {
        cfg.validate()?;
        if let Some(size) = cfg.glu_interleave_size {
            for (q, ep_shards) in shards.iter().enumerate() {
                for (r, s) in ep_shards.iter().enumerate() {
                    s.check_shapes(&cfg.at_rank(q, r))?;
                }
            }
            let plain = LayerConfig { glu_interleave_size: None, ..cfg.clone() };
            let canonical: Vec<Vec<ExpertSet>> =
                shards.iter().map(|ep| ep.iter().map(|s| s.glu_deinterleaved(Some(size))).collect()).collect();
            return Ok(ExpertSet::unshard(&plain, &canonical)?.glu_interleaved(Some(size)));
        }
        let p = cfg.parallel;
        if shards.len() != p.ep_size || shards.iter().any(|s| s.len() != p.tp_size) {
            return Err(ReferenceError::Config(format!(
                "unshard needs {}x{} (ep x tp) shards, got {}x{:?}",
                p.ep_size,
                p.tp_size,
                shards.len(),
                shards.iter().map(Vec::len).collect::<Vec<_>>()
            )));
        }
        let k = cfg.n2();
        let mut experts = Vec::with_capacity(cfg.num_experts);
        for (q, ep_shards) in shards.iter().enumerate() {
            for (r, s) in ep_shards.iter().enumerate() {
                s.check_shapes(&cfg.at_rank(q, r))?;
            }
            for e in 0..cfg.num_local_experts() {
                let parts: Vec<&ExpertWeights> = ep_shards.iter().map(|s| &s.experts[e]).collect();
                let (fc1_weight, fc1_bias) = if cfg.gated_linear_unit {
                    let gates: Vec<_> = parts.iter().map(|w| w.fc1_weight.slice(s![..k, ..])).collect();
                    let lins: Vec<_> = parts.iter().map(|w| w.fc1_weight.slice(s![k.., ..])).collect();
                    let w = concatenate(
                        Axis(0),
                        &[concatenate(Axis(0), &gates).unwrap().view(), concatenate(Axis(0), &lins).unwrap().view()],
                    )
                    .unwrap();
                    let b = parts[0].fc1_bias.as_ref().map(|_| {
                        let g: Vec<_> = parts.iter().map(|w| w.fc1_bias.as_ref().unwrap().slice(s![..k])).collect();
                        let l: Vec<_> = parts.iter().map(|w| w.fc1_bias.as_ref().unwrap().slice(s![k..])).collect();
                        concatenate(
                            Axis(0),
                            &[concatenate(Axis(0), &g).unwrap().view(), concatenate(Axis(0), &l).unwrap().view()],
                        )
                        .unwrap()
                    });
                    (w, b)
                } else {
                    let ws: Vec<_> = parts.iter().map(|w| w.fc1_weight.view()).collect();
                    let b = parts[0].fc1_bias.as_ref().map(|_| {
                        let bs: Vec<_> = parts.iter().map(|w| w.fc1_bias.as_ref().unwrap().view()).collect();
                        concatenate(Axis(0), &bs).unwrap()
                    });
                    (concatenate(Axis(0), &ws).unwrap(), b)
                };
                let fc2: Vec<_> = parts.iter().map(|w| w.fc2_weight.view()).collect();
                experts.push(ExpertWeights {
                    fc1_weight,
                    fc1_bias,
                    fc2_weight: concatenate(Axis(1), &fc2).unwrap(),
                    fc2_bias: parts[0].fc2_bias.clone(),
                });
            }
        }
        Ok(ExpertSet { experts })
    }
}
