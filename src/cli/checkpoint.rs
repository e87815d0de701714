//! `moe-verify layout`, `reshard` and `inspect`: Megatron-Core sharded state dicts and
//! checkpoint conversion.
//!
//! Exit codes: 0 success, 1 a check failed (verify-after-write), 2 bad input or usage. Errors
//! go to stderr and name the file or key at fault.

use super::args::ClassArg;
use moe_checkpoint::{self as checkpoint, format::parse_key, CheckpointError, ExpertLayout};
use moe_reference::{LayerConfig, Parallelism};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Arguments of `moe-verify layout`.
#[derive(clap::Args, Debug, Clone)]
pub struct LayoutArgs {
    /// Expert class (`--layer` is accepted too).
    #[arg(long, alias = "layer")]
    pub class: ClassArg,
    /// Global number of experts E.
    #[arg(long)]
    pub num_experts: usize,
    /// hidden_size h.
    #[arg(long)]
    pub hidden: usize,
    /// Unsplit moe_ffn_hidden_size f.
    #[arg(long)]
    pub ffn: usize,
    /// Expert-tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Expert-parallel size.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Gated linear unit (fc1 is [gate; linear]).
    #[arg(long)]
    pub glu: bool,
    /// add_bias_linear.
    #[arg(long)]
    pub bias: bool,
    /// metadata['singleton_local_shards']: one key per global expert.
    #[arg(long)]
    pub singleton_local_shards: bool,
    /// Key prefix (e.g. `decoder.layers.3.mlp.`).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Expert-data-parallel rank (third element of every replica id).
    #[arg(long, default_value_t = 0)]
    pub expert_dp_rank: usize,
    /// Layers of a stacked `decoder.layers` block: prepends the layer axis
    /// `sharded_offsets = ((0, layer_offset, num_layers),)` (a whole model, homogeneous layers).
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// The layer's index on the layer axis (with --num-layers).
    #[arg(long, requires = "num_layers")]
    pub layer_offset: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `moe-verify reshard`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReshardArgs {
    /// Source checkpoint directory.
    pub src: PathBuf,
    /// Destination directory (must not exist unless --force).
    pub dst: PathBuf,
    /// Destination class (`--layer` is accepted too).
    #[arg(long, alias = "layer", required_unless_present = "hf")]
    pub class: Option<ClassArg>,
    /// Write a Hugging Face directory of this family instead (experts only: for `diff` and
    /// inspection, not a loadable model).
    #[arg(long, conflicts_with_all = ["class", "tp", "ep", "singleton_local_shards", "verify", "dry_run"])]
    pub hf: Option<super::args::FamilyArg>,
    /// Destination expert-tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Destination expert-parallel size.
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Write per-expert (singleton) keys.
    #[arg(long)]
    pub singleton_local_shards: bool,
    /// Replace an existing destination.
    #[arg(long)]
    pub force: bool,
    /// Check layouts, coverage, shapes and dtypes; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// After writing, re-read the destination (CRCs) and compare every tensor with the source.
    #[arg(long)]
    pub verify: bool,
}

/// Arguments of `moe-verify inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// Checkpoint directory.
    pub dir: PathBuf,
    /// Read every shard and check its CRC.
    #[arg(long)]
    pub verify: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn fail(e: &CheckpointError) -> i32 {
    eprintln!("error: {e}");
    if e.is_check_failure() {
        1
    } else {
        2
    }
}

/// Runs `moe-verify layout`; returns the exit code.
pub fn run_layout(args: &LayoutArgs) -> i32 {
    let config = LayerConfig {
        class: args.class.0,
        num_experts: args.num_experts,
        hidden_size: args.hidden,
        ffn_hidden_size: args.ffn,
        gated_linear_unit: args.glu,
        add_bias: args.bias,
        parallel: Parallelism { tp_size: args.tp, ep_size: args.ep, ..Parallelism::SINGLE },
        ..LayerConfig::example()
    };
    let layout = ExpertLayout {
        singleton: args.singleton_local_shards,
        prefix: args.prefix.clone(),
        sharded_offsets: args.num_layers.map(|n| vec![(0, args.layer_offset.unwrap_or(0), n)]).unwrap_or_default(),
        ..ExpertLayout::new(config)
    };
    let value = match checkpoint::layout_json_at(&layout, args.expert_dp_rank) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value).expect("JSON serializes"));
        return 0;
    }
    let fmt = |v: &serde_json::Value| -> String {
        match v {
            serde_json::Value::Array(a) => {
                format!("({})", a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
            }
            serde_json::Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    for rank in value.as_array().expect("array of ranks") {
        println!("ep_rank {} tp_rank {}", rank["ep_rank"], rank["tp_rank"]);
        println!(
            "  {:<48} {:<6} {:<14} {:<14} {:<12} {:<12} {:<9} prepend",
            "key", "kind", "global_shape", "global_offset", "local_shape", "fragments", "replica"
        );
        for e in rank["entries"].as_array().expect("entries") {
            println!(
                "  {:<48} {:<6} {:<14} {:<14} {:<12} {:<12} {:<9} {}",
                e["key"].as_str().unwrap_or(""),
                e["kind"].as_str().unwrap_or(""),
                fmt(&e["global_shape"]),
                fmt(&e["global_offset"]),
                fmt(&e["local_shape"]),
                fmt(&e["axis_fragmentations"]),
                fmt(&e["replica_id"]),
                fmt(&e["prepend_axis_num"]),
            );
        }
    }
    0
}

/// Runs `moe-verify reshard`; returns the exit code.
pub fn run_reshard(args: &ReshardArgs) -> i32 {
    let Some(ClassArg(class)) = args.class else { return super::diff::reshard_to_hf(args) };
    if checkpoint::detect_format(&args.src).is_ok_and(|(f, _)| f != checkpoint::SourceFormat::MoeVerify) {
        return super::diff::reshard_from_source(args);
    }
    let target = checkpoint::ReshardTarget { class, tp: args.tp, ep: args.ep, singleton: args.singleton_local_shards };
    let opts = checkpoint::ReshardOptions { force: args.force, dry_run: args.dry_run, verify: args.verify };
    match checkpoint::reshard(&args.src, &args.dst, target, opts) {
        Ok(r) => {
            for l in &r.layouts {
                println!("{}", layout_line(l));
            }
            if !r.skipped_keys.is_empty() {
                eprintln!(
                    "warning: {} non-expert keys were not converted (e.g. {})",
                    r.skipped_keys.len(),
                    r.skipped_keys[0]
                );
            }
            if r.written {
                println!(
                    "wrote {} ({} files, {} bytes of tensors; read {} bytes){}",
                    args.dst.display(),
                    r.files,
                    r.write_bytes,
                    r.read_bytes,
                    if r.verified { "; verified" } else { "" }
                );
            } else {
                println!(
                    "dry run: would read {} bytes and write {} bytes of tensors to {}",
                    r.read_bytes,
                    r.write_bytes,
                    args.dst.display()
                );
            }
            0
        }
        Err(e) => fail(&e),
    }
}

/// Runs `moe-verify inspect`; returns the exit code.
pub fn run_inspect(args: &InspectArgs) -> i32 {
    if checkpoint::detect_format(&args.dir).is_ok_and(|(f, _)| f != checkpoint::SourceFormat::MoeVerify) {
        return super::diff::inspect_source(&args.dir, args.json, args.verify);
    }
    let ckpt = match checkpoint::Checkpoint::open(&args.dir) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let verified = if args.verify {
        match ckpt.verify() {
            Ok(b) => Some(b),
            Err(e) => return fail(&e),
        }
    } else {
        None
    };
    // key -> (global shape, dtype, shards, bytes)
    let mut keys: BTreeMap<&str, (Vec<usize>, &str, usize, u64)> = BTreeMap::new();
    for s in &ckpt.index.shards {
        let e = keys.entry(&s.key).or_insert((s.global_shape.clone(), &s.dtype, 0, 0));
        e.2 += 1;
        e.3 += s.nbytes;
    }
    let models = checkpoint::infer_models(&ckpt).unwrap_or_default();
    let total: u64 = ckpt.index.shards.iter().map(|s| s.nbytes).sum();
    let files: u64 = ckpt.index.files.iter().map(|f| f.bytes).sum();
    let expert_keys = keys.keys().filter(|k| parse_key(k).is_some()).count();
    if args.json {
        let v = serde_json::json!({
            "dir": args.dir.display().to_string(),
            "files": ckpt.index.files.len(),
            "file_bytes": files,
            "tensor_bytes": total,
            "shards": ckpt.index.shards.len(),
            "objects": ckpt.index.objects.len(),
            "verified_bytes": verified,
            "models": models,
            "keys": keys.iter().map(|(k, (shape, dtype, n, b))| serde_json::json!({
                "key": k, "global_shape": shape, "dtype": dtype, "shards": n, "bytes": b,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON serializes"));
        return 0;
    }
    println!(
        "{}: {} files ({} bytes), {} keys ({} expert keys), {} shards, {} objects, {} bytes of tensors",
        args.dir.display(),
        ckpt.index.files.len(),
        files,
        keys.len(),
        expert_keys,
        ckpt.index.shards.len(),
        ckpt.index.objects.len(),
        total
    );
    for m in &models {
        println!(
            "  layer {}: E={} h={} f={} glu={} bias={} singleton={} dtype={}",
            if m.prefix.is_empty() { "(no prefix)" } else { &m.prefix },
            m.num_experts,
            m.hidden,
            m.ffn,
            m.glu,
            m.bias,
            m.singleton,
            m.dtype
        );
    }
    println!("  {:<56} {:<18} {:<9} {:>7} {:>14}", "key", "global_shape", "dtype", "shards", "bytes");
    for (k, (shape, dtype, n, b)) in &keys {
        println!("  {:<56} {:<18} {:<9} {:>7} {:>14}", k, format!("{shape:?}"), dtype, n, b);
    }
    if let Some(b) = verified {
        println!("verified: every shard's CRC-32 matches ({b} bytes read)");
    }
    0
}

/// One line describing a written layout (`reshard`'s report, from any source format).
pub(super) fn layout_line(l: &checkpoint::ExpertLayout) -> String {
    format!(
        "{}: {} E={} h={} f={} glu={} bias={} tp={} ep={} singleton={}",
        if l.prefix.is_empty() { "(no prefix)" } else { &l.prefix },
        l.config.class.megatron_name(),
        l.config.num_experts,
        l.config.hidden_size,
        l.config.ffn_hidden_size,
        l.config.gated_linear_unit,
        l.config.add_bias,
        l.config.parallel.tp_size,
        l.config.parallel.ep_size,
        l.singleton
    )
}
