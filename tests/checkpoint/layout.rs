//! The sharded state dicts themselves: golden snapshots, the spec's worked example (§7.9), and
//! invariants every layout must satisfy.

use super::{layout, sized, with};
use moe_checkpoint::{layout_json, sharded_state_dict, ExpertLayout, RankCoord, ShardedEntry};
use moe_reference::LayerClass;
use proptest::prelude::*;

use LayerClass::{Grouped, Sequential, TeGrouped};

/// The snapshots' `info`: the layout's fields as the goldens record them.
#[derive(serde::Serialize)]
struct LayoutInfo<'a> {
    class: LayerClass,
    num_experts: usize,
    hidden: usize,
    ffn: usize,
    glu: bool,
    bias: bool,
    tp: usize,
    ep: usize,
    singleton: bool,
    prefix: &'a str,
}

fn snapshot(name: &str, l: &ExpertLayout) {
    let v = layout_json(l).unwrap();
    let c = &l.config;
    let info = LayoutInfo {
        class: c.class,
        num_experts: c.num_experts,
        hidden: c.hidden_size,
        ffn: c.ffn_hidden_size,
        glu: c.gated_linear_unit,
        bias: c.add_bias,
        tp: c.parallel.tp_size,
        ep: c.parallel.ep_size,
        singleton: l.singleton,
        prefix: &l.prefix,
    };
    insta::with_settings!({snapshot_path => "../../golden", prepend_module_to_snapshot => false, info => &info}, {
        insta::assert_yaml_snapshot!(name, v);
    });
}

#[test]
fn layout_golden_snapshots() {
    // The worked example of spec §7.9: E = 4, p_ep = 2, t = 2, h = 16, f = 8, GLU.
    let ex = |class, singleton| sized(layout(class, 2, 2, true, singleton), 4, 16, 8);
    snapshot("layout__sequential_glu_tp2_ep2", &ex(Sequential, false));
    snapshot("layout__grouped_glu_tp2_ep2", &ex(Grouped, false));
    snapshot("layout__sequential_glu_tp2_ep2_singleton", &ex(Sequential, true));
    snapshot("layout__grouped_glu_tp2_ep2_singleton", &ex(Grouped, true));
    let bias = ExpertLayout {
        prefix: "decoder.layers.3.mlp.".into(),
        ..with(sized(layout(TeGrouped, 1, 2, false, false), 4, 8, 16), |c| c.add_bias = true)
    };
    snapshot("layout__te_grouped_bias_ep2_prefix", &bias);
    snapshot("layout__grouped_tp2_ep1", &sized(layout(Grouped, 2, 1, false, false), 4, 16, 8));
}

#[test]
fn te_grouped_layout_equals_sequential_layout() {
    // spec §7.4: "exactly the key set, shapes, offsets and replica ids of SequentialMLP".
    for (glu, bias, singleton, tp, ep) in
        [(true, false, false, 2, 2), (false, true, true, 1, 4), (true, true, false, 1, 1)]
    {
        let seq = with(layout(Sequential, tp, ep, glu, singleton), |c| c.add_bias = bias);
        let te = with(seq.clone(), |c| c.class = TeGrouped);
        assert_eq!(layout_json(&seq).unwrap(), layout_json(&te).unwrap());
    }
}

#[test]
fn worked_example_offsets_match_spec() {
    // spec §7.9, rank r_ep = 1, r = 1: SequentialMLP expert e = 0 (g = 2): w at rows 4-7 and
    // v at rows 12-15 of expert 2; GroupedMLP: one shard per half covering experts 2-3.
    let l = sized(layout(Sequential, 2, 2, true, false), 4, 16, 8);
    let fc1 = |l: &ExpertLayout| -> Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        sharded_state_dict(l, RankCoord::new(1, 1))
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                ShardedEntry::Tensor(t) if t.key == "experts.linear_fc1.weight" => {
                    Some((t.global_offset, t.local_shape, t.axis_fragmentations))
                }
                _ => None,
            })
            .collect()
    };
    let seq = fc1(&l);
    assert_eq!(seq[0], (vec![2, 4, 0], vec![4, 16], vec![4, 4, 1]));
    assert_eq!(seq[1], (vec![2, 12, 0], vec![4, 16], vec![4, 4, 1]));
    let grp = fc1(&with(l.clone(), |c| c.class = Grouped));
    assert_eq!(
        grp,
        vec![(vec![2, 4, 0], vec![2, 4, 16], vec![2, 4, 1]), (vec![2, 12, 0], vec![2, 4, 16], vec![2, 4, 1])]
    );
}

fn arb_layout() -> impl Strategy<Value = ExpertLayout> {
    (
        prop::sample::select(LayerClass::ALL.to_vec()),
        prop::sample::select(vec![1usize, 2, 4]),
        prop::sample::select(vec![1usize, 2, 4]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec!["", "0.", "decoder.layers.7.mlp."]),
    )
        .prop_map(|(class, tp, ep, glu, bias, singleton, prefix)| {
            let bias = bias && tp == 1 && class != Grouped;
            ExpertLayout {
                prefix: prefix.into(),
                ..with(sized(layout(class, tp, ep, glu, singleton), 4, 6, 8), |c| c.add_bias = bias)
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Invariants of every sharded state dict, independent of how it was built: offsets are
    /// multiples of the extents and global = fragmentation x extent on every axis; the main
    /// replicas of each key tile its global tensor exactly once over all ranks (and over all
    /// expert-DP ranks only rank 0 writes); every rank emits one `_extra_state` object per local
    /// expert and linear; and the three classes cover the same logical elements.
    #[test]
    fn sharded_state_dicts_tile_their_global_tensors(l in arb_layout(), edp in 1usize..=2) {
        use moe_checkpoint::format::to_logical;
        use moe_checkpoint::Region;
        use std::collections::BTreeMap;
        let mut covered: BTreeMap<String, (Vec<usize>, usize)> = BTreeMap::new();
        let mut logical: BTreeMap<String, Vec<Region>> = BTreeMap::new();
        for rank in l.ranks() {
            for d in 0..edp {
                let entries = sharded_state_dict(&l, RankCoord { edp_rank: d, ..rank }).unwrap();
                let objects = entries.iter().filter(|e| matches!(e, ShardedEntry::Object(_))).count();
                prop_assert_eq!(objects, 2 * l.local_experts());
                for e in entries {
                    if let ShardedEntry::Tensor(t) = e {
                        prop_assert!(t.key.starts_with(&l.prefix));
                        let ext = t.extent();
                        for (a, &x) in ext.iter().enumerate() {
                            prop_assert_eq!(t.global_offset[a] % x, 0);
                            prop_assert_eq!(t.global_shape[a], t.axis_fragmentations[a] * x);
                        }
                        if t.is_main_replica() {
                            prop_assert_eq!(d, 0);
                            let c = covered.entry(t.key.clone()).or_insert((t.global_shape.clone(), 0));
                            prop_assert_eq!(&c.0, &t.global_shape);
                            c.1 += ext.iter().product::<usize>();
                            let region = Region { offset: t.global_offset.clone(), shape: ext };
                            let (k, r, _) = to_logical(&t.key, &region, &t.global_shape, l.config.num_experts);
                            logical.entry(k).or_default().push(r);
                        }
                    }
                }
            }
        }
        for (k, (shape, n)) in &covered {
            prop_assert_eq!(*n, shape.iter().product::<usize>(), "{} not tiled", k);
        }
        // Same logical elements as the SequentialMLP layout of the same model.
        let seq = ExpertLayout { singleton: false, ..with(l.clone(), |c| c.class = Sequential) };
        let mut seq_logical: BTreeMap<String, usize> = BTreeMap::new();
        for rank in seq.ranks() {
            for e in sharded_state_dict(&seq, rank).unwrap() {
                if let ShardedEntry::Tensor(t) = e {
                    if t.is_main_replica() {
                        *seq_logical.entry(t.key.clone()).or_default() += t.extent().iter().product::<usize>();
                    }
                }
            }
        }
        let ours: BTreeMap<String, usize> =
            logical.iter().map(|(k, rs)| (k.clone(), rs.iter().map(Region::numel).sum())).collect();
        prop_assert_eq!(ours, seq_logical);
    }
}
