//! What the GPU benches share ([`crate::layer`]: the expert layers, [`crate::grouped`]: the
//! grouped GEMM sets): criterion settings, random device fills, the criterion-driven timer and
//! the dense 8192³ cuBLAS reference.

use criterion::{BenchmarkFilter, Criterion, SamplingMode};
use moe_gpu::{DeviceBuffer, Engine, GemmProblem};
use moe_reference::Dtype;
use std::time::{Duration, Instant};

/// Criterion samples per benchmark (the medians reported are over these).
pub const SAMPLES: usize = 10;

/// Which benchmarks criterion times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// Every benchmark of the run.
    #[default]
    All,
    /// The benchmarks whose id (`gpu_layer/<shape>/<dist>/<class>/<mode>/<strategy>`, ...)
    /// matches this regular expression (criterion's filter).
    Filter(String),
    /// None: every row still makes its one untimed call (and the interleaved rounds run), so a
    /// profiler sees one call per row.
    Untimed,
}

/// The criterion settings for the GPU benches: few samples, short windows (device time is
/// scarce; the timed calls run 0.1-40 ms each), and the benchmarks `selection` picks.
pub fn criterion(selection: &Selection) -> Criterion {
    let c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(100))
        .measurement_time(Duration::from_millis(300))
        .nresamples(1000);
    match selection {
        Selection::All => c,
        Selection::Filter(regex) => c.with_filter(regex),
        Selection::Untimed => c.with_benchmark_filter(BenchmarkFilter::RejectAll),
    }
}

/// The median (upper median for an even count) of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// 8 Mi random bf16 values in ±0.125 on the device (never zero in bulk), for [`fill`].
pub fn random_chunk(eng: &mut Engine) -> DeviceBuffer {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let host: Vec<u8> = moe_gpu::layer::to_bytes(
        Dtype::Bf16,
        (0..(8usize << 20)).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.25
        }),
    );
    eng.upload(&host).expect("upload the random chunk")
}

/// Fills `buf` with copies of the random `chunk` (device-to-device; no zeros anywhere).
pub fn fill(eng: &mut Engine, buf: &mut DeviceBuffer, chunk: &DeviceBuffer) {
    let cb = chunk.bytes();
    let mut off = 0;
    while off < buf.bytes() {
        let n = cb.min(buf.bytes() - off);
        eng.copy(buf, off, chunk, 0, n).expect("device fill (Engine::copy)");
        off += n;
    }
}

/// Times `run` under criterion (group `group`, id `id`; [`SAMPLES`] samples of back-to-back
/// calls, the engine's stream synchronized before the clock starts and after the last call of
/// each sample) and returns the median per-call seconds of its samples. `SamplingMode::Flat`
/// gives every sample the same call count (about 30 ms of calls with [`criterion()`]). `None` when
/// criterion did not run the benchmark (filtered out).
pub fn time<F: FnMut(&mut Engine)>(
    c: &mut Criterion,
    eng: &mut Engine,
    group: &str,
    id: &str,
    mode: SamplingMode,
    mut run: F,
) -> Option<f64> {
    let mut per_iter = Vec::new();
    let mut g = c.benchmark_group(group);
    g.sampling_mode(mode);
    g.bench_function(id, |bch| {
        bch.iter_custom(|iters| {
            let per_call = timed_block(eng, iters as usize, &mut run);
            per_iter.push(per_call);
            Duration::from_secs_f64(per_call * iters as f64)
        })
    });
    g.finish();
    // Warm-up calls the routine too: the measurement samples are the last SAMPLES.
    let tail = per_iter.len().saturating_sub(SAMPLES);
    let samples = per_iter.split_off(tail);
    (!samples.is_empty()).then(|| median(samples))
}

/// Side of the dense reference GEMM.
pub const DENSE_N: usize = 8192;

/// The dense reference GEMM's operands: `DENSE_N`² bf16 matrices of random data.
pub struct DenseGemm {
    bufs: [DeviceBuffer; 3],
}

impl DenseGemm {
    /// Allocates and fills the three matrices from `chunk`.
    pub fn new(eng: &mut Engine, chunk: &DeviceBuffer) -> DenseGemm {
        let nn = DENSE_N;
        let mut bufs = [(); 3].map(|()| eng.alloc(nn * nn * 2).expect("alloc for the dense GEMM"));
        for b in &mut bufs {
            fill(eng, b, chunk);
        }
        DenseGemm { bufs }
    }

    /// FLOPs of one call.
    pub fn flops(&self) -> f64 {
        2.0 * (DENSE_N as f64).powi(3)
    }

    /// One `DENSE_N`³ bf16 `Engine::gemm` (cuBLAS, f32 accumulation), queued.
    pub fn run(&self, eng: &mut Engine) {
        let nn = DENSE_N;
        let [a, b, c] = &self.bufs;
        let p = GemmProblem { m: nn, n: nn, k: nn, a: a.at(0), b: b.at(0), c: c.at(0) };
        eng.gemm(Dtype::Bf16, false, false, &p, 0.0).expect("dense 8192³ Engine::gemm");
    }
}

/// The dense reference: one `DENSE_N`³ bf16 GEMM through `Engine::gemm` (cuBLAS, f32
/// accumulation) on random data, timed by [`time`] under `group`/`gemm8192`. Returns
/// (median seconds, FLOPs), or `None` when filtered out.
pub fn dense_gemm(
    c: &mut Criterion,
    eng: &mut Engine,
    chunk: &DeviceBuffer,
    group: &str,
    mode: SamplingMode,
) -> Option<(f64, f64)> {
    let dense = DenseGemm::new(eng, chunk);
    let secs = time(c, eng, group, "gemm8192", mode, |e| dense.run(e));
    eng.synchronize().expect("synchronize after the dense GEMM");
    secs.map(|s| (s, dense.flops()))
}

/// Per-call seconds of `calls` back-to-back calls of `run`, host-timed between two
/// synchronizations of the engine's stream.
pub fn timed_block<F: FnMut(&mut Engine)>(eng: &mut Engine, calls: usize, mut run: F) -> f64 {
    eng.synchronize().expect("synchronize before a timed block");
    let t = Instant::now();
    for _ in 0..calls {
        run(eng);
    }
    eng.synchronize().expect("synchronize after a timed block");
    t.elapsed().as_secs_f64() / calls as f64
}

/// Calls per interleaved block: about [`BLOCK_SECS`] of calls of `per_call` seconds, at least 1.
pub fn block_calls(per_call: f64) -> usize {
    ((BLOCK_SECS / per_call).round() as usize).max(1)
}

/// Length of one timed block of the interleaved measurement.
pub const BLOCK_SECS: f64 = 0.02;
