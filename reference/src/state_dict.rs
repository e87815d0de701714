//! Megatron-Core parameter names and layouts for each class (spec §3), and lossless conversion
//! to and from the canonical [`ExpertSet`].
//!
//! | class | names (per rank) |
//! |---|---|
//! | SequentialMLP | `local_experts.{e}.linear_fc1.weight` `[N1,h]`, `.bias` `[N1]`, `local_experts.{e}.linear_fc2.weight` `[h,N2]`, `.bias` `[h]` |
//! | GroupedMLP | `weight1` declared `[h, E_l·N1]`, memory `[E_l, h, N1]`; `weight2` `[E_l·N2, h]`, memory `[E_l, N2, h]` |
//! | TEGroupedMLP | `linear_fc1.weight{e}` `[N1,h]`, `linear_fc1.bias{e}`, `linear_fc2.weight{e}` `[h,N2]`, `linear_fc2.bias{e}` |
//! | TEGroupedMLP, single grouped (Megatron HEAD) | `linear_fc1.weight` `[E_l,N1,h]`, `linear_fc1.bias` `[E_l,N1]`, `linear_fc2.weight` `[E_l,h,N2]`, `linear_fc2.bias` `[E_l,h]`: read by [`unpack_single_grouped`] |
//!
//! GroupedMLP's `weight1` is the subtle one: the forward does `weight1.view(E_l, h, N1)`, a
//! reinterpretation of the contiguous buffer, so expert `e` occupies the flat elements
//! `[e·h·N1, (e+1)·h·N1)` as an `[h, N1]` (`[in, out]`) matrix — *not* a column block of the
//! declared `[h, E_l·N1]` matrix.

use crate::config::{LayerClass, LayerConfig};
use crate::error::ReferenceError;
use crate::weights::{ExpertSet, ExpertWeights};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use std::collections::BTreeMap;

/// Parameters (or their gradients) by Megatron state-dict name, values in f64 (exactly
/// representable in the params dtype when they are parameters).
pub type StateDict = BTreeMap<String, ArrayD<f64>>;

/// One parameter's name and per-rank shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The state-dict name.
    pub name: String,
    /// The per-rank (declared) shape.
    pub shape: Vec<usize>,
    /// How many local experts share this tensor (1 for per-expert tensors, `E_l` for
    /// GroupedMLP's packed weights, whose flat memory splits into `E_l` equal expert blocks).
    pub expert_blocks: usize,
}

/// One of a local expert's four canonical tensors (`[out, in]` weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ExpertParam {
    /// fc1 weight `[N1, h]`.
    Fc1Weight,
    /// fc1 bias `[N1]`.
    Fc1Bias,
    /// fc2 weight `[h, N2]`.
    Fc2Weight,
    /// fc2 bias `[h]`.
    Fc2Bias,
}

impl ExpertParam {
    /// The four, in state-dict order (the order of [`per_expert_names`]).
    pub const ALL: [ExpertParam; 4] =
        [ExpertParam::Fc1Weight, ExpertParam::Fc1Bias, ExpertParam::Fc2Weight, ExpertParam::Fc2Bias];

    /// The position in [`ExpertParam::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// True for the biases (present only with `add_bias_linear`).
    pub fn is_bias(self) -> bool {
        matches!(self, ExpertParam::Fc1Bias | ExpertParam::Fc2Bias)
    }

    /// True when `cfg`'s layer has this tensor (the biases only with `add_bias`).
    pub fn present(self, cfg: &LayerConfig) -> bool {
        cfg.add_bias || !self.is_bias()
    }

    /// The canonical per-rank shape: fc1 weight `[N1, h]`, fc1 bias `[N1]`, fc2 weight
    /// `[h, N2]`, fc2 bias `[h]`.
    pub fn shape(self, cfg: &LayerConfig) -> Vec<usize> {
        let (h, n1, n2) = (cfg.hidden_size, cfg.n1(), cfg.n2());
        match self {
            ExpertParam::Fc1Weight => vec![n1, h],
            ExpertParam::Fc1Bias => vec![n1],
            ExpertParam::Fc2Weight => vec![h, n2],
            ExpertParam::Fc2Bias => vec![h],
        }
    }
}

/// GroupedMLP's two packed weights and their view reinterpretation (spec §3.3): `weight1` is
/// declared `[h, E_l·N1]` but its flat memory is `E_l` blocks `[h, N1]`, block `e` being
/// `W1[e]ᵀ` (`[in, out]`); `weight2` is declared `[E_l·N2, h]`, memory `E_l` blocks `[N2, h]`
/// = `W2[e]ᵀ`. [`GroupedWeight::unpack`] and [`GroupedWeight::pack`] work on the flat
/// row-major elements of any representation: `f64` values here, storage-dtype bytes in
/// checkpoints (an element is then `elem` consecutive items).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupedWeight {
    /// `weight1`, the packed fc1 weights.
    Weight1,
    /// `weight2`, the packed fc2 weights.
    Weight2,
}

impl GroupedWeight {
    /// Both, in state-dict order.
    pub const ALL: [GroupedWeight; 2] = [GroupedWeight::Weight1, GroupedWeight::Weight2];

    /// The state-dict name (`weight1`, `weight2`).
    pub fn name(self) -> &'static str {
        match self {
            GroupedWeight::Weight1 => "weight1",
            GroupedWeight::Weight2 => "weight2",
        }
    }

    /// The canonical per-expert tensor packed here.
    pub fn param(self) -> ExpertParam {
        match self {
            GroupedWeight::Weight1 => ExpertParam::Fc1Weight,
            GroupedWeight::Weight2 => ExpertParam::Fc2Weight,
        }
    }

    /// The declared shape: `[h, E_l·N1]` or `[E_l·N2, h]`.
    pub fn shape(self, cfg: &LayerConfig) -> Vec<usize> {
        let (h, el) = (cfg.hidden_size, cfg.num_local_experts());
        match self {
            GroupedWeight::Weight1 => vec![h, el * cfg.n1()],
            GroupedWeight::Weight2 => vec![el * cfg.n2(), h],
        }
    }

    /// One expert's block in memory, `[in, out]`: `(h, N1)` or `(N2, h)`.
    fn block(self, cfg: &LayerConfig) -> (usize, usize) {
        match self {
            GroupedWeight::Weight1 => (cfg.hidden_size, cfg.n1()),
            GroupedWeight::Weight2 => (cfg.n2(), cfg.hidden_size),
        }
    }

    /// Local expert `e`'s canonical `[out, in]` matrix, row-major, read off the packed tensor's
    /// flat row-major elements (`elem` items each).
    pub fn unpack<T: Copy>(self, cfg: &LayerConfig, packed: &[T], elem: usize, e: usize) -> Vec<T> {
        let (rows, cols) = self.block(cfg);
        let n = rows * cols * elem;
        transpose(&packed[e * n..(e + 1) * n], rows, cols, elem)
    }

    /// The packed tensor's flat row-major elements (`elem` items each) from every local
    /// expert's canonical `[out, in]` matrix, row-major, in expert order.
    pub fn pack<'a, T: Copy + 'a>(
        self,
        cfg: &LayerConfig,
        experts: impl IntoIterator<Item = &'a [T]>,
        elem: usize,
    ) -> Vec<T> {
        let (rows, cols) = self.block(cfg);
        experts.into_iter().flat_map(|w| transpose(w, cols, rows, elem)).collect()
    }
}

/// The transpose of a row-major `[rows, cols]` matrix whose elements are `elem` consecutive
/// items of `data`.
pub fn transpose<T: Copy>(data: &[T], rows: usize, cols: usize, elem: usize) -> Vec<T> {
    assert_eq!(data.len(), rows * cols * elem, "transpose: {rows}x{cols} elements of {elem}");
    let mut out = Vec::with_capacity(data.len());
    for j in 0..cols {
        for i in 0..rows {
            let at = (i * cols + j) * elem;
            out.extend_from_slice(&data[at..at + elem]);
        }
    }
    out
}

/// Every parameter `cfg`'s class has on this rank, in state-dict order.
pub fn param_specs(cfg: &LayerConfig) -> Vec<ParamSpec> {
    let el = cfg.num_local_experts();
    let one = |e: usize, p: ExpertParam| ParamSpec {
        name: per_expert_name(cfg.class, e, p),
        shape: p.shape(cfg),
        expert_blocks: 1,
    };
    let present = ExpertParam::ALL.into_iter().filter(|p| p.present(cfg));
    match cfg.class {
        // Expert-major: local_experts.{e}.linear_fc1.weight, .bias, linear_fc2.weight, .bias.
        LayerClass::Sequential => (0..el).flat_map(|e| present.clone().map(move |p| one(e, p))).collect(),
        // Parameter-major: linear_fc1.weight0..{E_l-1}, linear_fc1.bias0.., ...
        LayerClass::TeGrouped => present.flat_map(|p| (0..el).map(move |e| one(e, p))).collect(),
        LayerClass::Grouped => GroupedWeight::ALL
            .into_iter()
            .map(|w| ParamSpec { name: w.name().into(), shape: w.shape(cfg), expert_blocks: el })
            .collect(),
    }
}

/// TEGroupedMLP's single grouped parameters (Megatron HEAD's `moe_single_grouped_weight` /
/// `moe_single_grouped_bias`, spec §3.2), each the expert-major stack of the per-expert tensors
/// `{name}{e}` of [`param_specs`]: `linear_fc1.weight` `[E_l, N1, h]`, `linear_fc2.weight`
/// `[E_l, h, N2]` and, with biases, `linear_fc1.bias` `[E_l, N1]`, `linear_fc2.bias`
/// `[E_l, h]`. Empty for the other classes.
pub fn single_grouped_specs(cfg: &LayerConfig) -> Vec<ParamSpec> {
    if cfg.class != LayerClass::TeGrouped {
        return Vec::new();
    }
    let (h, n1, n2, el) = (cfg.hidden_size, cfg.n1(), cfg.n2(), cfg.num_local_experts());
    let packed = |name: &str, shape: Vec<usize>| ParamSpec { name: name.into(), shape, expert_blocks: el };
    let mut specs = vec![packed("linear_fc1.weight", vec![el, n1, h]), packed("linear_fc2.weight", vec![el, h, n2])];
    if cfg.add_bias {
        specs.push(packed("linear_fc1.bias", vec![el, n1]));
        specs.push(packed("linear_fc2.bias", vec![el, h]));
    }
    specs
}

/// Splits every single grouped TEGroupedMLP tensor of `sd` ([`single_grouped_specs`]) into its
/// per-expert tensors (`linear_fc1.weight` `[E_l, N1, h]` → `linear_fc1.weight0` ...
/// `linear_fc1.weight{E_l-1}`), as Megatron's load pre-hook does, so that a state dict (or a
/// set of weight gradients) of a layer built with `moe_single_grouped_weight` /
/// `moe_single_grouped_bias` reads like any other; weight and bias are packed independently.
/// Everything else in `sd`, and every state dict of the other classes, is returned unchanged
/// (an unknown name is left for [`from_state_dict`] to reject). A single grouped tensor of the
/// wrong shape, or one whose per-expert names are present too, is an error naming it.
pub fn unpack_single_grouped(cfg: &LayerConfig, mut sd: StateDict) -> Result<StateDict, ReferenceError> {
    for spec in single_grouped_specs(cfg) {
        let Some(packed) = sd.remove(&spec.name) else { continue };
        if packed.shape() != spec.shape.as_slice() {
            return Err(ReferenceError::Shape { name: spec.name, expected: spec.shape, got: packed.shape().to_vec() });
        }
        let per_expert = |e: usize| format!("{}{e}", spec.name);
        if let Some(other) = (0..spec.expert_blocks).map(per_expert).find(|n| sd.contains_key(n)) {
            return Err(ReferenceError::TwoLayouts { name: spec.name, other });
        }
        for (e, block) in packed.outer_iter().enumerate() {
            sd.insert(per_expert(e), block.to_owned());
        }
    }
    Ok(sd)
}

/// Writes canonical weights (or gradients) in `cfg`'s class layout.
pub fn to_state_dict(cfg: &LayerConfig, set: &ExpertSet) -> Result<StateDict, ReferenceError> {
    set.check_shapes(cfg)?;
    let mut sd = StateDict::new();
    match cfg.class {
        LayerClass::Sequential | LayerClass::TeGrouped => {
            for (e, w) in set.experts.iter().enumerate() {
                let (fc1w, fc1b, fc2w, fc2b) = per_expert_names(cfg.class, e);
                sd.insert(fc1w, w.fc1_weight.clone().into_dyn());
                sd.insert(fc2w, w.fc2_weight.clone().into_dyn());
                if let (Some(b1), Some(b2)) = (&w.fc1_bias, &w.fc2_bias) {
                    sd.insert(fc1b, b1.clone().into_dyn());
                    sd.insert(fc2b, b2.clone().into_dyn());
                }
            }
        }
        LayerClass::Grouped => {
            for packed in GroupedWeight::ALL {
                let canonical: Vec<_> = set.experts.iter().map(|w| grouped_canonical(w, packed)).collect();
                let flat = packed.pack(cfg, canonical.iter().map(|w| w.as_slice().expect("standard layout")), 1);
                sd.insert(packed.name().into(), ArrayD::from_shape_vec(IxDyn(&packed.shape(cfg)), flat).unwrap());
            }
        }
    }
    Ok(sd)
}

/// The canonical weight of `w` that `packed` holds, in standard (row-major) layout.
fn grouped_canonical(w: &ExpertWeights, packed: GroupedWeight) -> ndarray::CowArray<'_, f64, ndarray::Ix2> {
    match packed {
        GroupedWeight::Weight1 => w.fc1_weight.as_standard_layout(),
        GroupedWeight::Weight2 => w.fc2_weight.as_standard_layout(),
    }
}

/// The state-dict name of local expert `e`'s `param` for the per-expert classes
/// (SequentialMLP's `local_experts.{e}.linear_fc*.*`, TEGroupedMLP's
/// `linear_fc*.weight{e}`/`bias{e}`). GroupedMLP packs all experts into `weight1`/`weight2`
/// and has no per-expert names; it gets SequentialMLP's.
pub fn per_expert_name(class: LayerClass, e: usize, param: ExpertParam) -> String {
    let (linear, kind) = match param {
        ExpertParam::Fc1Weight => ("linear_fc1", "weight"),
        ExpertParam::Fc1Bias => ("linear_fc1", "bias"),
        ExpertParam::Fc2Weight => ("linear_fc2", "weight"),
        ExpertParam::Fc2Bias => ("linear_fc2", "bias"),
    };
    match class {
        LayerClass::TeGrouped => format!("{linear}.{kind}{e}"),
        LayerClass::Sequential | LayerClass::Grouped => format!("local_experts.{e}.{linear}.{kind}"),
    }
}

/// [`per_expert_name`] of local expert `e`'s fc1 weight, fc1 bias, fc2 weight and fc2 bias
/// ([`ExpertParam::ALL`] order).
pub fn per_expert_names(class: LayerClass, e: usize) -> (String, String, String, String) {
    let [fc1w, fc1b, fc2w, fc2b] = ExpertParam::ALL.map(|p| per_expert_name(class, e, p));
    (fc1w, fc1b, fc2w, fc2b)
}

/// Reads canonical weights from `cfg`'s class layout, checking that every expected name is
/// present with its exact shape and finite values, and that no other name is. A TEGroupedMLP
/// state dict with Megatron HEAD's single grouped tensors is converted first, at the boundary
/// where it comes in, by [`unpack_single_grouped`] (the dump reader does).
pub fn from_state_dict(cfg: &LayerConfig, sd: &StateDict) -> Result<ExpertSet, ReferenceError> {
    cfg.validate()?;
    let layer = cfg.class.megatron_name();
    let specs = param_specs(cfg);
    for spec in &specs {
        let t =
            sd.get(&spec.name).ok_or_else(|| ReferenceError::MissingParameter { name: spec.name.clone(), layer })?;
        if t.shape() != spec.shape.as_slice() {
            return Err(ReferenceError::Shape {
                name: spec.name.clone(),
                expected: spec.shape.clone(),
                got: t.shape().to_vec(),
            });
        }
    }
    for spec in &specs {
        crate::layer::check_finite(&spec.name, &sd[&spec.name])?;
    }
    if let Some(extra) = sd.keys().find(|k| !specs.iter().any(|s| &s.name == *k)) {
        return Err(ReferenceError::UnexpectedParameter { name: extra.clone(), layer, example: specs[0].name.clone() });
    }
    let get2 = |name: &str| -> Array2<f64> { sd[name].clone().into_dimensionality().unwrap() };
    let get1 = |name: &str| -> Array1<f64> { sd[name].clone().into_dimensionality().unwrap() };
    let experts = match cfg.class {
        LayerClass::Sequential | LayerClass::TeGrouped => (0..cfg.num_local_experts())
            .map(|e| {
                let (fc1w, fc1b, fc2w, fc2b) = per_expert_names(cfg.class, e);
                ExpertWeights {
                    fc1_weight: get2(&fc1w),
                    fc1_bias: cfg.add_bias.then(|| get1(&fc1b)),
                    fc2_weight: get2(&fc2w),
                    fc2_bias: cfg.add_bias.then(|| get1(&fc2b)),
                }
            })
            .collect(),
        LayerClass::Grouped => {
            // The view reinterpretation of spec §3.3, read off the flat (row-major) buffers.
            // Indexed by discriminant, the order of `GroupedWeight::ALL`.
            let packed = GroupedWeight::ALL.map(|w| sd[w.name()].as_standard_layout());
            let expert = |w: GroupedWeight, e: usize| {
                let flat = packed[w as usize].as_slice().expect("standard layout");
                let [rows, cols] = w.param().shape(cfg)[..] else { unreachable!("weights are matrices") };
                Array2::from_shape_vec((rows, cols), w.unpack(cfg, flat, 1, e)).unwrap()
            };
            (0..cfg.num_local_experts())
                .map(|e| ExpertWeights {
                    fc1_weight: expert(GroupedWeight::Weight1, e),
                    fc1_bias: None,
                    fc2_weight: expert(GroupedWeight::Weight2, e),
                    fc2_bias: None,
                })
                .collect()
        }
    };
    Ok(ExpertSet { experts })
}

/// Converts one class's parameters to another's through the canonical form (lossless). A
/// GLU-interleaved TEGroupedMLP (spec §4.10) converts to another class with its fc1 rows
/// un-interleaved (rank by rank, as the layer does): the other classes have no interleaving.
pub fn convert(from: &LayerConfig, sd: &StateDict, to: LayerClass) -> Result<StateDict, ReferenceError> {
    let set = from_state_dict(from, sd)?;
    let keep = to == LayerClass::TeGrouped;
    let to_cfg =
        LayerConfig { class: to, glu_interleave_size: from.glu_interleave_size.filter(|_| keep), ..from.clone() };
    to_cfg.validate()?;
    let set = if keep { set } else { set.glu_deinterleaved(from.glu_interleave_size) };
    to_state_dict(&to_cfg, &set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Parallelism;

    /// Stacks `cfg`'s per-expert TEGroupedMLP tensors named in `packed` into single grouped
    /// tensors, as a layer built with `moe_single_grouped_weight`/`_bias` holds them.
    fn pack(cfg: &LayerConfig, mut sd: StateDict, packed: &[&str]) -> StateDict {
        for spec in single_grouped_specs(cfg).into_iter().filter(|s| packed.contains(&s.name.as_str())) {
            let blocks: Vec<ArrayD<f64>> =
                (0..spec.expert_blocks).map(|e| sd.remove(&format!("{}{e}", spec.name)).unwrap()).collect();
            let views: Vec<_> = blocks.iter().map(|b| b.view()).collect();
            sd.insert(spec.name, ndarray::stack(ndarray::Axis(0), &views).unwrap());
        }
        sd
    }

    /// Megatron HEAD's single grouped TEGroupedMLP parameters (spec §3.2) read as the same
    /// experts as the per-expert layout, with weight and bias packed independently (the two
    /// flags are separate). Square per-expert matrices (h = N1 = N2) so that a transposed or
    /// expert-swapped unpacking cannot hide behind a shape check.
    #[test]
    fn single_grouped_te_parameters_unpack_to_the_per_expert_layout() {
        let cfg = LayerConfig {
            class: LayerClass::TeGrouped,
            num_experts: 3,
            hidden_size: 4,
            ffn_hidden_size: 4,
            gated_linear_unit: false,
            add_bias: true,
            parallel: Parallelism::SINGLE,
            ..LayerConfig::example()
        };
        let set = ExpertSet::random(&cfg, 5);
        let discrete = to_state_dict(&cfg, &set).unwrap();
        for packed in [
            &["linear_fc1.weight", "linear_fc2.weight", "linear_fc1.bias", "linear_fc2.bias"][..],
            &["linear_fc1.weight", "linear_fc2.weight"],
            &["linear_fc1.bias", "linear_fc2.bias"],
        ] {
            let sd = pack(&cfg, discrete.clone(), packed);
            assert!(packed.iter().all(|p| sd.contains_key(*p)));
            let unpacked = unpack_single_grouped(&cfg, sd).unwrap();
            assert_eq!(unpacked, discrete, "{packed:?}");
            assert_eq!(from_state_dict(&cfg, &unpacked).unwrap(), set);
        }
        // Both layouts of one parameter: an error naming both.
        let mut both = pack(&cfg, discrete.clone(), &["linear_fc2.weight"]);
        both.insert("linear_fc2.weight1".into(), discrete["linear_fc2.weight1"].clone());
        let err = unpack_single_grouped(&cfg, both).unwrap_err();
        assert_eq!(
            err,
            ReferenceError::TwoLayouts { name: "linear_fc2.weight".into(), other: "linear_fc2.weight1".into() }
        );
        // A packed tensor of another expert count.
        let mut short = pack(&cfg, discrete.clone(), &["linear_fc1.weight"]);
        short.insert("linear_fc1.weight".into(), ArrayD::zeros(IxDyn(&[2, 4, 4])));
        let err = unpack_single_grouped(&cfg, short).unwrap_err();
        assert!(matches!(err, ReferenceError::Shape { ref name, .. } if name == "linear_fc1.weight"), "{err}");
        // Other classes have no single grouped layout: their state dicts pass through as given.
        let seq = LayerConfig { class: LayerClass::Sequential, ..cfg.clone() };
        let seq_sd = to_state_dict(&seq, &set).unwrap();
        assert_eq!(unpack_single_grouped(&seq, seq_sd.clone()).unwrap(), seq_sd);
    }

    #[test]
    fn parameter_names_shapes_and_order_per_class() {
        let cfg = LayerConfig {
            num_experts: 2,
            hidden_size: 4,
            ffn_hidden_size: 3,
            add_bias: true,
            ..LayerConfig::example()
        };
        let specs = |class| {
            let cfg = LayerConfig { class, add_bias: class != LayerClass::Grouped, ..cfg.clone() };
            param_specs(&cfg).into_iter().map(|s| (s.name, s.shape, s.expert_blocks)).collect::<Vec<_>>()
        };
        let v = |n: &str, shape: &[usize], b: usize| (n.to_string(), shape.to_vec(), b);
        assert_eq!(
            specs(LayerClass::Sequential),
            vec![
                v("local_experts.0.linear_fc1.weight", &[6, 4], 1),
                v("local_experts.0.linear_fc1.bias", &[6], 1),
                v("local_experts.0.linear_fc2.weight", &[4, 3], 1),
                v("local_experts.0.linear_fc2.bias", &[4], 1),
                v("local_experts.1.linear_fc1.weight", &[6, 4], 1),
                v("local_experts.1.linear_fc1.bias", &[6], 1),
                v("local_experts.1.linear_fc2.weight", &[4, 3], 1),
                v("local_experts.1.linear_fc2.bias", &[4], 1),
            ]
        );
        assert_eq!(
            specs(LayerClass::TeGrouped),
            vec![
                v("linear_fc1.weight0", &[6, 4], 1),
                v("linear_fc1.weight1", &[6, 4], 1),
                v("linear_fc1.bias0", &[6], 1),
                v("linear_fc1.bias1", &[6], 1),
                v("linear_fc2.weight0", &[4, 3], 1),
                v("linear_fc2.weight1", &[4, 3], 1),
                v("linear_fc2.bias0", &[4], 1),
                v("linear_fc2.bias1", &[4], 1),
            ]
        );
        assert_eq!(specs(LayerClass::Grouped), vec![v("weight1", &[4, 12], 2), v("weight2", &[6, 4], 2)]);
        assert_eq!(
            per_expert_names(LayerClass::TeGrouped, 3),
            (
                "linear_fc1.weight3".into(),
                "linear_fc1.bias3".into(),
                "linear_fc2.weight3".into(),
                "linear_fc2.bias3".into()
            )
        );
    }

    /// GroupedMLP with E_l = 2, h = 2, N1 = N2 = 3 (no GLU, f = 3).
    fn small_grouped() -> LayerConfig {
        LayerConfig {
            class: LayerClass::Grouped,
            num_experts: 2,
            hidden_size: 2,
            ffn_hidden_size: 3,
            gated_linear_unit: false,
            parallel: Parallelism::SINGLE,
            ..LayerConfig::example()
        }
    }

    #[test]
    fn grouped_packing_works_on_bytes_as_on_values() {
        // The same reinterpretation on 2-byte elements: expert e's fc2 weight [h, N2] = [2, 3].
        let cfg = small_grouped();
        let experts: Vec<Vec<u8>> = (0..2u8).map(|e| (0..12).map(|b| e * 100 + b).collect()).collect();
        let packed = GroupedWeight::Weight2.pack(&cfg, experts.iter().map(Vec::as_slice), 2);
        // Block 0 is W2[0]ᵀ [N2, h]: element (i, j) is W2[0] element (j, i).
        assert_eq!(&packed[..12], &[0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]);
        for (e, w) in experts.iter().enumerate() {
            assert_eq!(&GroupedWeight::Weight2.unpack(&cfg, &packed, 2, e), w);
        }
    }

    #[test]
    fn grouped_weight1_is_a_view_reinterpretation_not_column_blocks() {
        // E_l = 2, h = 2, N1 = 3 (no GLU, f = 3). Expert e's fc1 W1[e] = [[e*10 + 0, +1], [+2, +3], [+4, +5]].
        let cfg = small_grouped();
        let mut set = ExpertSet::zeros(&cfg);
        for (e, w) in set.experts.iter_mut().enumerate() {
            w.fc1_weight = Array2::from_shape_fn((3, 2), |(i, j)| (e * 10 + i * 2 + j) as f64);
        }
        let sd = to_state_dict(&cfg, &set).unwrap();
        let w1 = &sd["weight1"];
        assert_eq!(w1.shape(), &[2, 6]);
        // Flat memory: expert 0's W1ᵀ ([[0,2,4],[1,3,5]]) then expert 1's ([[10,12,14],[11,13,15]]).
        let flat: Vec<f64> = w1.iter().copied().collect();
        assert_eq!(flat, vec![0., 2., 4., 1., 3., 5., 10., 12., 14., 11., 13., 15.]);
        // So row 0 of the declared [h, E_l*N1] matrix mixes both halves of expert 0: not a column block.
        assert_eq!(from_state_dict(&cfg, &sd).unwrap(), set);
    }

    #[test]
    fn non_finite_parameters_are_rejected_with_name_and_index() {
        // Bad input must never reach the math: a NaN weight names the parameter and element.
        let cfg = LayerConfig::example();
        let mut sd = to_state_dict(&cfg, &ExpertSet::random(&cfg, 1)).unwrap();
        sd.get_mut("local_experts.2.linear_fc2.weight").unwrap()[[3, 5]] = f64::INFINITY;
        let err = from_state_dict(&cfg, &sd).unwrap_err().to_string();
        assert!(
            err.contains("local_experts.2.linear_fc2.weight") && err.contains("[3, 5]") && err.contains("inf"),
            "{err}"
        );
    }
}
