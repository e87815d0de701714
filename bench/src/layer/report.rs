//! The layer bench's output: a line per row as it finishes, the summary, and the CSVs of rows
//! and of interleaved-round blocks.

use super::rounds::Block;
use moe_gpu::GpuError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// CSV header of the rows (shared with `scripts/torch_experts_bench.py`).
pub(super) const CSV_HEADER: &str =
    "shape,dist,class,mode,strategy,tokens,experts,flops,min_bytes,median_ms,tflops,device";

/// A CSV field (quoted when it holds a comma or a quote).
fn csv_field(s: &str) -> String {
    if s.contains(',') || s.contains('"') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV file at `path` (none when `None`), created with its `header` line; `what` names the
/// file in errors.
fn create_csv(path: Option<&Path>, header: &str, what: &str) -> Result<Option<(PathBuf, std::fs::File)>, String> {
    let Some(path) = path else { return Ok(None) };
    let mut f = std::fs::File::create(path).map_err(|e| format!("{what}: cannot create {}: {e}", path.display()))?;
    writeln!(f, "{header}").map_err(|e| format!("{what}: cannot write {}: {e}", path.display()))?;
    Ok(Some((path.to_path_buf(), f)))
}

/// The rows, printed and (with `--csv`) appended to the CSV as they come.
pub(super) struct Report {
    pub(super) csv: Option<(PathBuf, std::fs::File)>,
    device: String,
    pub(super) dense_tflops: Option<f64>,
    pub(super) summary: Vec<String>,
}

/// One row's identity and work.
pub(super) struct Row<'a> {
    pub(super) shape: &'a str,
    pub(super) dist: &'a str,
    pub(super) class: &'a str,
    pub(super) mode: &'a str,
    pub(super) strategy: &'a str,
    pub(super) tokens: usize,
    pub(super) experts: usize,
    pub(super) flops: f64,
    pub(super) min_bytes: f64,
}

impl Report {
    pub(super) fn new(device: &str, csv: Option<&Path>) -> Result<Report, String> {
        let csv = create_csv(csv, CSV_HEADER, "--csv")?;
        Ok(Report { csv, device: device.to_string(), dense_tflops: None, summary: Vec::new() })
    }

    fn csv_line(&mut self, r: &Row, ms: &str, tflops: &str) {
        if let Some((path, f)) = &mut self.csv {
            let line = format!(
                "{},{},{},{},{},{},{},{:.0},{:.0},{ms},{tflops},{}",
                csv_field(r.shape),
                csv_field(r.dist),
                csv_field(r.class),
                csv_field(r.mode),
                csv_field(r.strategy),
                r.tokens,
                r.experts,
                r.flops,
                r.min_bytes,
                csv_field(&self.device)
            );
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .unwrap_or_else(|e| panic!("--csv: cannot write {}: {e}", path.display()));
        }
    }

    pub(super) fn ok(&mut self, r: &Row, secs: f64) {
        let tflops = r.flops / secs / 1e12;
        let dense = self.dense_tflops.map(|d| format!("{:>5.1}% dense", 100.0 * tflops / d)).unwrap_or_default();
        let line = format!(
            "TFLOP/s {:<9} {:<11} {:<13} {:<7} {:<11} T={:<6} median {:>9.3} ms  {:>7.1} TFLOP/s {dense}  {:>7.1} GB min  ({})",
            r.shape,
            r.dist,
            r.class,
            r.mode,
            r.strategy,
            r.tokens,
            secs * 1e3,
            tflops,
            r.min_bytes / 1e9,
            self.device
        );
        println!("{line}");
        self.summary.push(line);
        self.csv_line(r, &format!("{:.4}", secs * 1e3), &format!("{tflops:.1}"));
    }

    pub(super) fn err(&mut self, r: &Row, err: &GpuError) {
        let line = format!("ERR {} {} {} {} {}: {err}", r.shape, r.dist, r.class, r.mode, r.strategy);
        println!("{line}");
        self.summary.push(line);
        self.csv_line(r, "ERR", "ERR");
    }
}

/// A (shape, distribution, class, mode) of the interleaved rounds.
pub(super) struct RowId<'a> {
    pub(super) shape: &'a str,
    pub(super) dist: &'a str,
    pub(super) class: &'a str,
    pub(super) mode: &'a str,
}

/// `--rounds-csv`: every block of the interleaved rounds.
pub(super) struct RoundsCsv(Option<(PathBuf, std::fs::File)>);

impl RoundsCsv {
    const HEADER: &'static str = "shape,dist,class,mode,item,round,calls,ms,tflops,device";

    pub(super) fn open(path: Option<&Path>) -> Result<RoundsCsv, String> {
        Ok(RoundsCsv(create_csv(path, Self::HEADER, "--rounds-csv")?))
    }

    pub(super) fn write(
        &mut self,
        id: &RowId,
        labels: &[&str],
        blocks: &[Block],
        flops: &dyn Fn(usize) -> f64,
        device: &str,
    ) {
        let Some((path, f)) = &mut self.0 else { return };
        for &(item, round, calls, secs) in blocks {
            writeln!(
                f,
                "{},{},{},{},{},{round},{calls},{:.4},{:.1},{}",
                csv_field(id.shape),
                csv_field(id.dist),
                csv_field(id.class),
                csv_field(id.mode),
                csv_field(labels[item]),
                secs * 1e3,
                flops(item) / secs / 1e12,
                csv_field(device)
            )
            .and_then(|()| f.flush())
            .unwrap_or_else(|e| panic!("--rounds-csv: cannot write {}: {e}", path.display()));
        }
    }
}
