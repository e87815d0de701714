//! The ShardedTensor and ShardedObject entries of each class (spec §7.3–§7.5).

use super::{ExpertLayout, Half, RankCoord, ShardedEntry, ShardedObject, ShardedTensor, Source};
use moe_reference::ExpertParam;

/// SequentialMLP and TEGroupedMLP: identical keys, shapes, offsets and replica ids (§7.3, §7.4).
pub(super) fn per_expert_entries(l: &ExpertLayout, rank: RankCoord) -> Vec<ShardedEntry> {
    let c = &l.config;
    let (t, r, edp) = (c.parallel.tp_size, rank.tp_rank, rank.edp_rank);
    let (h, n2, el) = (c.hidden_size, c.n2(), c.num_local_experts());
    let p = &l.prefix;
    let mut out = Vec::new();
    for e in 0..el {
        let g = rank.ep_rank * el + e;
        // O' = O + ((len(O), g, E),) (non-singleton) or O; keys `P experts.` or `P experts.{g}.`.
        let mut pre = l.sharded_offsets.clone();
        let base = if l.singleton {
            format!("{p}experts.{g}.")
        } else {
            pre.push((pre.len(), g, c.num_experts));
            format!("{p}experts.")
        };
        let k = pre.len();
        let src = |param, half| Source { param, half, experts: e..e + 1, stacked: false };
        let with = |extra: (usize, usize, usize)| -> Vec<(usize, usize, usize)> {
            let mut v = pre.clone();
            v.push(extra);
            v
        };
        let weight_replica = [0, 0, edp];
        let replicated = [0, r, edp];
        for (name, param, local) in
            [("weight", ExpertParam::Fc1Weight, vec![n2, h]), ("bias", ExpertParam::Fc1Bias, vec![n2])]
        {
            if !param.present(c) {
                continue;
            }
            let key = format!("{base}linear_fc1.{name}");
            if c.gated_linear_unit {
                // apply_swiglu_sharded_factory: w = chunk r of 2t, v = chunk t + r of 2t
                // (singleton: separate `_w`/`_v` keys, chunk r of t each).
                let (kw, kv, ow, ov) = if l.singleton {
                    (format!("{key}_w"), format!("{key}_v"), (k, r, t), (k, r, t))
                } else {
                    (key.clone(), key.clone(), (k, r, 2 * t), (k, t + r, 2 * t))
                };
                out.push(ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(
                    kw,
                    local.clone(),
                    &with(ow),
                    weight_replica,
                    k,
                    src(param, Half::W),
                )));
                out.push(ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(
                    kv,
                    local,
                    &with(ov),
                    weight_replica,
                    k,
                    src(param, Half::V),
                )));
            } else {
                out.push(ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(
                    key,
                    local,
                    &with((k, r, t)),
                    weight_replica,
                    k,
                    src(param, Half::All),
                )));
            }
        }
        out.push(ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(
            format!("{base}linear_fc2.weight"),
            vec![h, n2],
            &with((k + 1, r, t)),
            weight_replica,
            k,
            src(ExpertParam::Fc2Weight, Half::All),
        )));
        if c.add_bias {
            out.push(ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(
                format!("{base}linear_fc2.bias"),
                vec![h],
                &pre,
                replicated,
                k,
                src(ExpertParam::Fc2Bias, Half::All),
            )));
        }
        for m in ["linear_fc1", "linear_fc2"] {
            out.push(ShardedEntry::Object(ShardedObject::from_offsets(
                format!("{base}{m}._extra_state"),
                &pre,
                replicated,
            )));
        }
    }
    out
}

/// GroupedMLP (OLD, §7.5): one factory per packed weight plus fake `_extra_state` objects.
pub(super) fn grouped_entries(l: &ExpertLayout, rank: RankCoord) -> Vec<ShardedEntry> {
    let c = &l.config;
    let (t, r, edp) = (c.parallel.tp_size, rank.tp_rank, rank.edp_rank);
    let (h, n2, el) = (c.hidden_size, c.n2(), c.num_local_experts());
    let (q, pe) = (rank.ep_rank, c.parallel.ep_size);
    let p = &l.prefix;
    let replica = [0, 0, edp];
    let mut out = Vec::new();
    // `*sharded_offsets` first, then the class's offsets on axes shifted by k = len(O)
    // (prepend_axis_num = k; the local data has no outer axes).
    let o = &l.sharded_offsets;
    let k = o.len();
    let tensor = |key: String, local: Vec<usize>, offs: &[(usize, usize, usize)], source: Source| {
        let mut all = o.clone();
        all.extend(offs.iter().map(|&(a, off, frag)| (a + k, off, frag)));
        ShardedEntry::Tensor(ShardedTensor::from_rank_offsets(key, local, &all, replica, k, source))
    };
    if !l.singleton {
        let all = |param, half| Source { param, half, experts: 0..el, stacked: true };
        let k1 = format!("{p}experts.linear_fc1.weight");
        if c.gated_linear_unit {
            out.push(tensor(
                k1.clone(),
                vec![el, n2, h],
                &[(0, q, pe), (1, r, 2 * t)],
                all(ExpertParam::Fc1Weight, Half::W),
            ));
            out.push(tensor(
                k1,
                vec![el, n2, h],
                &[(0, q, pe), (1, t + r, 2 * t)],
                all(ExpertParam::Fc1Weight, Half::V),
            ));
        } else {
            out.push(tensor(k1, vec![el, n2, h], &[(0, q, pe), (1, r, t)], all(ExpertParam::Fc1Weight, Half::All)));
        }
        out.push(tensor(
            format!("{p}experts.linear_fc2.weight"),
            vec![el, h, n2],
            &[(0, q, pe), (2, r, t)],
            all(ExpertParam::Fc2Weight, Half::All),
        ));
    } else {
        for e in 0..el {
            let g = q * el + e;
            let one = |param, half| Source { param, half, experts: e..e + 1, stacked: false };
            let k1 = format!("{p}experts.{g}.linear_fc1.weight");
            if c.gated_linear_unit {
                out.push(tensor(format!("{k1}_w"), vec![n2, h], &[(0, r, t)], one(ExpertParam::Fc1Weight, Half::W)));
                out.push(tensor(format!("{k1}_v"), vec![n2, h], &[(0, r, t)], one(ExpertParam::Fc1Weight, Half::V)));
            } else {
                out.push(tensor(k1, vec![n2, h], &[(0, r, t)], one(ExpertParam::Fc1Weight, Half::All)));
            }
            out.push(tensor(
                format!("{p}experts.{g}.linear_fc2.weight"),
                vec![h, n2],
                &[(1, r, t)],
                one(ExpertParam::Fc2Weight, Half::All),
            ));
        }
    }
    // Placeholder `_extra_state` objects mirroring SequentialMLP's, replica (0, r, edp).
    for e in 0..el {
        let g = q * el + e;
        for m in ["linear_fc1", "linear_fc2"] {
            let obj = if l.singleton {
                ShardedObject::from_offsets(format!("{p}experts.{g}.{m}._extra_state"), o, [0, r, edp])
            } else {
                let mut offs = o.clone();
                offs.push((k, g, c.num_experts));
                ShardedObject::from_offsets(format!("{p}experts.{m}._extra_state"), &offs, [0, r, edp])
            };
            out.push(ShardedEntry::Object(obj));
        }
    }
    out
}
