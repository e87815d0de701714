//! `moe-verify diff A B`: two checkpoints compared expert by expert, whatever their formats;
//! and `inspect` / `reshard` of sources that are not moe-verify checkpoints.
//!
//! Exit codes: 0 identical (within `--atol` when given), 1 they differ, 2 bad input or usage.

use super::args::{ClassArg, FamilyArg};
use moe_checkpoint::diff::{diff, DiffOptions, DiffReport, Verdict};
use moe_checkpoint::sources::convert::reshard_source;
use moe_checkpoint::{open_source, CheckpointError, ExpertSource, SourceInfo, SourceOverrides};
use moe_reference::ExpertParam;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Arguments of `moe-verify diff`.
#[derive(clap::Args, Debug, Clone)]
pub struct DiffArgs {
    /// The first checkpoint (a moe-verify checkpoint, a torch_dist directory or a Hugging Face
    /// directory or .safetensors file).
    pub a: PathBuf,
    /// The second checkpoint.
    pub b: PathBuf,
    /// Hugging Face model family of both sides (default: config.json's model_type, then
    /// tensor names).
    #[arg(long)]
    pub family: Option<FamilyArg>,
    /// Family of A only (overrides --family).
    #[arg(long)]
    pub family_a: Option<FamilyArg>,
    /// Family of B only (overrides --family).
    #[arg(long)]
    pub family_b: Option<FamilyArg>,
    /// Megatron expert class a torch_dist side is read as (default: from its keys).
    #[arg(long, alias = "layer")]
    pub class: Option<ClassArg>,
    /// Only these decoder layers: `N` or `START..END`.
    #[arg(long, value_parser = parse_layers)]
    pub layers: Option<Range<usize>>,
    /// Count values within this absolute difference as equal (default: exact).
    #[arg(long)]
    pub atol: Option<f64>,
    /// Print every compared tensor, not only those that differ.
    #[arg(long)]
    pub all: bool,
    /// Print JSON (every row) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `N` or `START..END` (end exclusive).
pub fn parse_layers(s: &str) -> Result<Range<usize>, String> {
    let num = |t: &str| t.trim().parse::<usize>().map_err(|_| format!("{t:?} is not a layer number"));
    match s.split_once("..") {
        Some((a, b)) => {
            let r = num(a)?..num(b)?;
            if r.is_empty() {
                return Err(format!("empty layer range {s}"));
            }
            Ok(r)
        }
        None => {
            let n = num(s)?;
            Ok(n..n + 1)
        }
    }
}

fn fail(e: &CheckpointError) -> i32 {
    eprintln!("error: {e}");
    if e.is_check_failure() {
        1
    } else {
        2
    }
}

fn param_name(p: ExpertParam) -> &'static str {
    match p {
        ExpertParam::Fc1Weight => "fc1.weight",
        ExpertParam::Fc1Bias => "fc1.bias",
        ExpertParam::Fc2Weight => "fc2.weight",
        ExpertParam::Fc2Bias => "fc2.bias",
    }
}

fn print_info(side: &str, info: &SourceInfo) {
    println!(
        "{side}: {} ({:?}{})",
        info.path.display(),
        info.format,
        info.family.as_ref().map(|f| format!(", {f}")).unwrap_or_default()
    );
    for line in &info.inferred {
        println!("   {line}");
    }
}

fn detail(v: &Verdict) -> String {
    match v {
        Verdict::Differ { max_abs_diff, at, a, b, differing } => {
            format!("max |a-b| = {max_abs_diff:e} at {at:?} (a = {a:e}, b = {b:e}); {differing} elements differ")
        }
        Verdict::WithinTolerance { max_abs_diff } => format!("max |a-b| = {max_abs_diff:e}"),
        Verdict::ShapeMismatch { a, b } => format!("A {a:?}, B {b:?}"),
        Verdict::GateUpSwapped => "B's fc1 is A's with the gate and up halves exchanged".into(),
        Verdict::Transposed => "B is A transposed".into(),
        Verdict::ColumnBlocks { reverse: false } => "B = A's GroupedMLP weight1 read as column blocks".into(),
        Verdict::ColumnBlocks { reverse: true } => "A = B's GroupedMLP weight1 read as column blocks".into(),
        Verdict::PresentTwice { count_a, count_b } => format!("A lists it {count_a}x, B {count_b}x"),
        _ => String::new(),
    }
}

fn print_report(r: &DiffReport, all: bool) {
    print_info("A", &r.a);
    print_info("B", &r.b);
    for row in &r.rows {
        if all || !row.verdict.is_same() {
            let loc = |v: &[moe_checkpoint::ExpertEntry]| {
                v.iter().map(|e| format!("{} ({})", e.location, e.stored_as)).collect::<Vec<_>>().join("; ")
            };
            println!(
                "layer {} expert {} {}: {} {}",
                row.key.layer,
                row.key.expert,
                param_name(row.key.param),
                row.verdict.label(),
                detail(&row.verdict)
            );
            if !row.verdict.is_same() {
                if !row.a.is_empty() {
                    println!("    A: {}", loc(&row.a));
                }
                if !row.b.is_empty() {
                    println!("    B: {}", loc(&row.b));
                }
            }
        }
    }
    for f in &r.findings {
        println!("finding: {f}");
    }
    let counts: BTreeMap<&str, usize> = r.counts();
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!(
        "{} tensors compared: {}; {}",
        r.rows.len(),
        summary.join(", "),
        if r.same() { "IDENTICAL" } else { "DIFFERENT" }
    );
}

fn open(path: &Path, family: Option<FamilyArg>, args: &DiffArgs) -> Result<Box<dyn ExpertSource>, CheckpointError> {
    let o = SourceOverrides {
        format: None,
        family: family.map(|f| f.0),
        class: args.class.map(|c| c.0),
        layers: args.layers.clone(),
    };
    open_source(path, &o)
}

/// Runs `moe-verify diff`; returns the exit code.
pub fn run(args: &DiffArgs) -> i32 {
    if let Some(t) = args.atol {
        if !(t >= 0.0 && t.is_finite()) {
            eprintln!("error: --atol {t}: expected a finite value >= 0");
            return 2;
        }
    }
    let a = match open(&args.a, args.family_a.or(args.family), args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let b = match open(&args.b, args.family_b.or(args.family), args) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let report = match diff(a.as_ref(), b.as_ref(), &DiffOptions { atol: args.atol, ..DiffOptions::default() }) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if report.rows.is_empty() {
        // Nothing compared is not "identical": a layer range that selects nothing, or two
        // sources without expert tensors, is bad input.
        eprintln!(
            "error: no expert tensors to compare in {} and {}{}",
            args.a.display(),
            args.b.display(),
            args.layers.as_ref().map(|r| format!(" in layers {}..{}", r.start, r.end)).unwrap_or_default()
        );
        return 2;
    }
    if args.json {
        let v = serde_json::json!({
            "a": report.a,
            "b": report.b,
            "identical": report.same(),
            "counts": report.counts(),
            "findings": report.findings,
            "rows": report.rows,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON serializes"));
    } else {
        print_report(&report, args.all);
    }
    if report.same() {
        0
    } else {
        1
    }
}

/// `moe-verify inspect` of a source that is not a moe-verify checkpoint: what was inferred and
/// one line per layer and tensor (experts, shapes, stored forms).
/// With `verify`, every tensor is read (decoded, dequantized) once.
pub fn inspect_source(dir: &Path, json: bool, verify: bool) -> i32 {
    let src = match open_source(dir, &SourceOverrides::default()) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let mut verified = None;
    if verify {
        let mut n = 0usize;
        for e in src.entries() {
            match src.read(e) {
                Ok(v) if v.shape() == e.shape => n += 1,
                Ok(v) => {
                    eprintln!("error: {}: read shape {:?}, listed as {:?}", e.location, v.shape(), e.shape);
                    return 2;
                }
                Err(err) => return fail(&err),
            }
        }
        verified = Some(n);
    }
    // (layer, param) -> (experts, shapes, stored forms)
    type Summary = (Vec<usize>, BTreeMap<String, usize>, BTreeMap<String, usize>);
    let mut by: BTreeMap<(usize, ExpertParam), Summary> = BTreeMap::new();
    for e in src.entries() {
        let s = by.entry((e.key.layer, e.key.param)).or_default();
        s.0.push(e.key.expert);
        *s.1.entry(format!("{:?}", e.shape)).or_default() += 1;
        *s.2.entry(e.stored_as.clone()).or_default() += 1;
    }
    if json {
        let v = serde_json::json!({ "source": src.info(), "entries": src.entries(), "verified_tensors": verified });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON serializes"));
        return 0;
    }
    print_info("source", src.info());
    println!("  {:<6} {:<11} {:>8} {:<16} stored as", "layer", "tensor", "experts", "shape");
    for ((layer, p), (experts, shapes, stored)) in &by {
        let join = |m: &BTreeMap<String, usize>| m.keys().cloned().collect::<Vec<_>>().join(" | ");
        println!("  {:<6} {:<11} {:>8} {:<16} {}", layer, param_name(*p), experts.len(), join(shapes), join(stored));
    }
    if let Some(n) = verified {
        println!("verified: all {n} expert tensors read and decoded");
    }
    0
}

/// `moe-verify reshard` from a source that is not a moe-verify checkpoint.
pub fn reshard_from_source(args: &super::checkpoint::ReshardArgs) -> i32 {
    let src = match open_source(&args.src, &SourceOverrides::default()) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    print_info("source", src.info());
    let target = moe_checkpoint::ReshardTarget {
        class: args.class.expect("reshard_to_hf handles --hf").0,
        tp: args.tp,
        ep: args.ep,
        singleton: args.singleton_local_shards,
    };
    let opts = moe_checkpoint::ReshardOptions { force: args.force, dry_run: args.dry_run, verify: args.verify };
    match reshard_source(src.as_ref(), &args.dst, target, opts) {
        Ok(r) => {
            for l in &r.layouts {
                println!("{}", super::checkpoint::layout_line(l));
            }
            if r.written {
                println!(
                    "wrote {} ({} files, {} bytes of tensors){}",
                    args.dst.display(),
                    r.files,
                    r.write_bytes,
                    if r.verified { "; verified: diff against the source is identical" } else { "" }
                );
            } else {
                println!("dry run: would write {} bytes of tensors to {}", r.write_bytes, args.dst.display());
            }
            0
        }
        Err(e) => fail(&e),
    }
}

/// `moe-verify reshard SRC DST --hf FAMILY`: any source's experts as a Hugging Face directory.
pub fn reshard_to_hf(args: &super::checkpoint::ReshardArgs) -> i32 {
    let Some(FamilyArg(family)) = args.hf else {
        eprintln!("error: reshard needs --class or --hf");
        return 2;
    };
    let src = match open_source(&args.src, &SourceOverrides::default()) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    print_info("source", src.info());
    match moe_checkpoint::hf::write::write_hf(src.as_ref(), &args.dst, family, args.force) {
        Ok(bytes) => {
            println!(
                "wrote {} ({} model.safetensors, {bytes} bytes of expert tensors)",
                args.dst.display(),
                family.name()
            );
            0
        }
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_parse() {
        assert_eq!(parse_layers("3"), Ok(3..4));
        assert_eq!(parse_layers("1..5"), Ok(1..5));
        assert!(parse_layers("5..5").is_err());
        assert!(parse_layers("x").is_err());
    }
}
