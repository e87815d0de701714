//! The grouped-GEMM executor: every [`Strategy`] against the `Loop` baseline and an
//! f64 host reference, on ragged groups with empty experts (m = 0 in fc1/fc2/dgrad, k = 0 in
//! wgrad), outputs poisoned with NaN before every run.
//!
//! Why these cases: an expert with k = 0 in wgrad must come back exactly 0 (tgale96/grouped_gemm
//! 398709f, pytorch #172439, TE #2499); an empty first/middle/last group broke TE (PR #1527);
//! pointer arrays for cuBLAS's grouped API must live on the device (cudarc's safe wrapper
//! faults). Loop vs MultiStream/Graph issue the same `cublasGemmEx` calls with the same
//! workspace size, so they are expected bit-identical; GroupedBatched and the strided-batched
//! path of Auto run other cuBLAS kernels. Every strategy's output is compared with the f64
//! reference under the harness's error model (`moe_harness::tolerance`): an output element
//! `c = Σ_l a_l·b_l` of `k` products, stored in the dtype, has the running error bound
//! `S = u·|c| + η + √k·u_f32·Σ_l |a_l·b_l|` (one rounding of an f32 accumulation;
//! `tolerance::gemm_element_scale`, `Σ|a·b|` computed on the host) and passes when
//! `|got − c| ≤ C_SAFETY·(S + rms(S over its expert's output))` ([`check_gemm_output`]). The test
//! prints which strategies were bit-exact against `Loop`.

#![cfg(feature = "cuda")]

use moe_gpu::layer::{from_bytes, to_bytes};
use moe_gpu::{DeviceBuffer, Engine, GemmProblem, Gpu, GpuError, Region, Strategy};
use moe_harness::tolerance::gemm_element_scale;
use moe_harness::Tolerance;
use moe_reference::Dtype;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STRATEGIES: [Strategy; 14] = [
    Strategy::Loop,
    Strategy::MultiStream(1),
    Strategy::MultiStream(3),
    Strategy::Graph(1),
    Strategy::Graph(4),
    Strategy::GroupedBatched,
    Strategy::Auto,
    Strategy::MultiStream(8),
    Strategy::Threads(1),
    Strategy::Threads(3),
    Strategy::Persistent(0),
    Strategy::Persistent(128),
    Strategy::Persistent(256),
    Strategy::Hybrid(1),
];

/// One grouped call: per-expert (m, n, k) with transposes, as the layers issue them.
struct Case {
    name: &'static str,
    ta: bool,
    tb: bool,
    /// (m, n, k) per expert.
    dims: Vec<(usize, usize, usize)>,
}

fn cases() -> Vec<Case> {
    let fwd =
        |name, tb, n, k, ms: &[usize]| Case { name, ta: false, tb, dims: ms.iter().map(|&m| (m, n, k)).collect() };
    let wgrad =
        |name, m, n, ks: &[usize]| Case { name, ta: true, tb: false, dims: ks.iter().map(|&k| (m, n, k)).collect() };
    vec![
        // fc1 of TEGroupedMLP ([out, in] weights): empty first, middle and last experts.
        fwd("fc1_te_ragged", true, 48, 40, &[0, 5, 17, 0, 8, 33, 0]),
        // fc1 of GroupedMLP ([in, out] weights), odd sizes around tile edges.
        fwd("fc1_grp_ragged", false, 72, 24, &[1, 0, 127, 129, 16]),
        // dgrad (TE: no transpose of [out, in] weights), larger so tensor-core kernels run.
        fwd("dgrad_te_tc", false, 256, 192, &[64, 0, 320, 96, 0, 128]),
        // wgrad: k = tokens, experts with 0 tokens must get exact zeros.
        wgrad("wgrad_ragged_k0", 24, 40, &[0, 7, 13, 0, 3, 0]),
        wgrad("wgrad_tc_k0", 128, 192, &[256, 0, 64, 512, 0]),
        // Uniform groups: Auto takes the strided-batched path.
        fwd("fc1_uniform", true, 96, 64, &[32, 32, 32, 32, 32]),
        wgrad("wgrad_uniform", 64, 96, &[48, 48, 48, 48]),
        // Uniform with one empty expert (strided progression broken: Auto falls back to 4 streams).
        fwd("fc2_uniform_hole", true, 64, 96, &[32, 0, 32, 32]),
    ]
}

/// Cases for the persistent kernel beyond the executor's common ones: k spanning more k-tiles
/// than its 3-5 stage ring (the ring wraps), n ragged against both tile widths, m ragged
/// against the 128-row tile, all four operand layouts, k past a 64-multiple in the row
/// contraction of MN-major operands (the rows past k belong to the next expert and must not
/// count), more experts than one launch's table holds (130 > MAX_PROBLEMS = 128: two
/// launches), and lists that read nothing. A K-major operand's row width is k, so those cases
/// keep k equal across experts, as the layers do (a list with different k there is not one
/// tensor: cuBLAS runs it).
fn persistent_cases() -> Vec<Case> {
    let ms = [300, 0, 1, 128, 257, 64];
    let mk = |name, ta, tb, n, k| Case { name, ta, tb, dims: ms.iter().map(|&m| (m, n, k)).collect() };
    let mut many: Vec<(usize, usize, usize)> = (0..130).map(|e| ((e * 37) % 200, 64, 72)).collect();
    many[129] = (40, 64, 72);
    vec![
        mk("fwd_te_kk_ring", false, true, 200, 704),
        mk("fwd_grp_kn_ring", false, false, 392, 520),
        Case {
            name: "wgrad_mn_ragged_k",
            ta: true,
            tb: false,
            dims: vec![(200, 136, 777), (200, 136, 0), (200, 136, 65)],
        },
        Case { name: "mk_layout", ta: true, tb: true, dims: vec![(136, 264, 344), (136, 264, 344), (136, 264, 0)] },
        Case { name: "130_experts", ta: false, tb: true, dims: many },
        // Nothing to read: every expert has k = 0 (the kernel only writes zeros, without tensor
        // maps), or every expert has m = 0 (no tile, no launch).
        Case { name: "wgrad_all_k0", ta: true, tb: false, dims: vec![(64, 72, 0), (136, 72, 0)] },
        Case { name: "fwd_all_m0", ta: false, tb: true, dims: vec![(0, 64, 72), (0, 64, 72)] },
    ]
}

/// A new engine, or `None` after printing the SKIP line of `gpu_grouped::<test>`
/// (`moe_gpu::gpu_or_skip`: panics where a skip is not allowed).
fn gpu(test: &str) -> Option<Gpu> {
    crate::crash_report::install();
    moe_gpu::gpu_or_skip(&format!("gpu_grouped::{test}"))
}

/// The persistent Hopper kernel against the f64 reference, in bf16 and f16, with
/// both tile widths: every element within one rounding of an f32-accumulated sum, k = 0
/// experts exactly +0.0, nothing unwritten, nothing past C, and proof that the kernel ran
/// (one launch per 128 problems, not a cuBLAS fallback).
#[test]
fn persistent_kernel_matches_the_reference_on_ragged_groups() {
    let Some(gpu) = gpu("persistent_kernel_matches_the_reference_on_ragged_groups") else {
        return;
    };
    let mut eng = gpu.lock().expect("the engine");
    if eng.arch() != "sm_90" {
        moe_gpu::print_skip(&format!(
            "SKIP gpu_grouped::persistent_kernel_matches_the_reference_on_ragged_groups: {} is not sm_90",
            eng.arch()
        ));
        return;
    }
    let mut worst = 0.0f64;
    for dt in [Dtype::Bf16, Dtype::F16] {
        let ds = dt.size_bytes();
        for (ci, case) in persistent_cases().iter().enumerate() {
            let mut p = prepare(&mut eng, case, dt, 0xbeef + ci as u64).expect("prepare");
            for tile_n in [128, 256] {
                let before = eng.launches();
                let got = run(&mut eng, &mut p, case, dt, Strategy::Persistent(tile_n))
                    .unwrap_or_else(|e| panic!("{} {dt:?} n{tile_n}: {e}", case.name));
                let computing = case.dims.iter().filter(|d| d.0 > 0 && d.1 > 0).count();
                let launches = eng.launches() - before;
                assert_eq!(
                    launches,
                    2 * (computing.div_ceil(moe_gpu::persistent::MAX_PROBLEMS) as u64 + 1),
                    "{} {dt:?} n{tile_n}: expected the persistent kernel (plus the poison memset) in each of 2 runs",
                    case.name
                );
                assert_untouched_guard_and_zero_k0(case, &p, &got, ds, &format!("{dt:?} n{tile_n}"));
                let v = from_bytes(dt, &got[..p.c_elems * ds]);
                let ratio =
                    check_gemm_output(&v, &p.host).unwrap_or_else(|e| panic!("{} {dt:?} n{tile_n}: {e}", case.name));
                worst = worst.max(ratio);
            }
        }
    }
    println!("gpu_grouped: persistent kernel, worst |error| / bound = {worst:.3}");
}

fn rand_vals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| f64::from(half::bf16::from_f64(rng.random_range(-1.0..1.0)).to_f32())).collect()
}

struct Prepared {
    /// Each expert's (m, n, k) and A, B, C offsets in bytes.
    problems: Vec<GemmProblem<usize>>,
    c_offsets: Vec<usize>,
    c_elems: usize,
    host: HostReference,
    c: DeviceBuffer,
    a: DeviceBuffer,
    b: DeviceBuffer,
}

impl Prepared {
    /// The problems on the device buffers.
    fn problems(&self) -> Vec<GemmProblem<Region<'_>>> {
        self.problems
            .iter()
            .map(|p| GemmProblem { m: p.m, n: p.n, k: p.k, a: self.a.at(p.a), b: self.b.at(p.b), c: self.c.at(p.c) })
            .collect()
    }
}

const GUARD: usize = 64;

/// The f64 reference of a grouped GEMM and the error model's scale of each output element.
struct HostReference {
    /// Output dtype.
    dt: Dtype,
    /// `c = Σ_l a_l·b_l` per output element (NaN where not computed).
    reference: Vec<f64>,
    /// `S = u·|c| + η + √k·u_f32·Σ_l |a_l·b_l|` per output element (NaN where not computed).
    scale: Vec<f64>,
    /// Each expert's `(offset, len)` in C: the blocks of the rms floor.
    blocks: Vec<(usize, usize)>,
}

/// The f64 reference of `case` on host operands `av`, `bv` (the experts' A and B, packed as
/// the device holds them) for every `row_step`-th row of each expert and its last row (the
/// others NaN), with the error model's scale of each element stored in `dt`.
fn host_reference(case: &Case, av: &[f64], bv: &[f64], dt: Dtype, row_step: usize) -> HostReference {
    let c_len: usize = case.dims.iter().map(|&(m, n, _)| m * n).sum();
    let mut reference = vec![f64::NAN; c_len];
    let mut scale = vec![f64::NAN; c_len];
    let mut blocks = Vec::new();
    let (mut ao, mut bo, mut co) = (0, 0, 0);
    for &(m, n, k) in &case.dims {
        blocks.push((co, m * n));
        for i in (0..m).filter(|&i| i % row_step == 0 || i + 1 == m) {
            for j in 0..n {
                let (mut s, mut sum_abs) = (0.0, 0.0);
                for l in 0..k {
                    let x = if case.ta { av[ao + l * m + i] } else { av[ao + i * k + l] };
                    let y = if case.tb { bv[bo + j * k + l] } else { bv[bo + l * n + j] };
                    s += x * y;
                    sum_abs += (x * y).abs();
                }
                reference[co + i * n + j] = s;
                scale[co + i * n + j] = gemm_element_scale(dt, s, k, sum_abs);
            }
        }
        ao += m * k;
        bo += k * n;
        co += m * n;
    }
    HostReference { dt, reference, scale, blocks }
}

/// The worst `|error| / bound` of a grouped GEMM's output `got` (values of C) against the f64
/// reference under the error model, and where it is: element `i` of expert block `B` has the
/// bound `C_SAFETY·(S_i + rms(S over B's referenced elements))`. Elements without a reference
/// are not compared (NaN checks of those are the caller's); a NaN where there is one is an
/// infinite ratio.
fn gemm_output_ratio(got: &[f64], host: &HostReference) -> (f64, String) {
    let tol = Tolerance::error_model();
    let (mut worst, mut at) = (0.0f64, String::new());
    for (e, &(start, len)) in host.blocks.iter().enumerate() {
        let idx: Vec<usize> = (start..start + len).filter(|&i| !host.reference[i].is_nan()).collect();
        if idx.is_empty() {
            continue;
        }
        let floor = (idx.iter().map(|&i| host.scale[i].powi(2)).sum::<f64>() / idx.len() as f64).sqrt();
        for &i in &idx {
            let (g, r) = (got[i], host.reference[i]);
            let bound = tol.bound(host.scale[i], floor);
            let err = (g - r).abs();
            let ratio = if err.is_nan() {
                f64::INFINITY
            } else if err == 0.0 {
                0.0
            } else {
                err / bound
            };
            if ratio > worst || (ratio.is_infinite() && at.is_empty()) {
                worst = ratio;
                at = format!("expert {e} C[{i}] = {g:e}, reference {r:e}, bound {bound:.3e} ({:?})", host.dt);
            }
        }
    }
    (worst, at)
}

/// [`gemm_output_ratio`] as a check: the worst ratio when it is at most 1, else the failure.
fn check_gemm_output(got: &[f64], host: &HostReference) -> Result<f64, String> {
    match gemm_output_ratio(got, host) {
        (worst, _) if worst <= 1.0 => Ok(worst),
        (worst, at) => Err(format!("|error| {worst:.3}x the bound at {at}")),
    }
}

fn prepare(eng: &mut Engine, case: &Case, dt: Dtype, seed: u64) -> Result<Prepared, GpuError> {
    prepare_rows(eng, case, dt, seed, 1)
}

/// [`prepare`] with the f64 reference computed for every `row_step`-th row of each expert and
/// its last row only (the others are NaN): for cases too large to reference in full.
fn prepare_rows(eng: &mut Engine, case: &Case, dt: Dtype, seed: u64, row_step: usize) -> Result<Prepared, GpuError> {
    let ds = dt.size_bytes();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let a_len: usize = case.dims.iter().map(|&(m, _, k)| m * k).sum();
    let b_len: usize = case.dims.iter().map(|&(_, n, k)| k * n).sum();
    let c_len: usize = case.dims.iter().map(|&(m, n, _)| m * n).sum();
    // The operands as the device holds them (bf16 values below fp16's normal range round), so
    // the reference sees exactly the device's inputs.
    let av: Vec<f64> = rand_vals(&mut rng, a_len).into_iter().map(|v| dt.round(v)).collect();
    let bv: Vec<f64> = rand_vals(&mut rng, b_len).into_iter().map(|v| dt.round(v)).collect();
    let a = eng.upload(&to_bytes(dt, av.iter().copied()))?;
    let b = eng.upload(&to_bytes(dt, bv.iter().copied()))?;
    let c = eng.alloc((c_len + GUARD) * ds)?;
    let (mut ao, mut bo, mut co) = (0, 0, 0);
    let mut problems = Vec::new();
    let mut c_offsets = Vec::new();
    for &(m, n, k) in &case.dims {
        problems.push(GemmProblem { m, n, k, a: ao * ds, b: bo * ds, c: co * ds });
        c_offsets.push(co);
        ao += m * k;
        bo += k * n;
        co += m * n;
    }
    let host = host_reference(case, &av, &bv, dt, row_step);
    Ok(Prepared { problems, c_offsets, c_elems: c_len, host, c, a, b })
}

/// What every run must leave in C (`got`, bytes of `ds`-byte elements): the guard tail after the
/// last expert never written (still the 0xFF poison), and every expert with k = 0 (and rows)
/// exactly +0.0 (all bytes 0). `what` names the run in a failure.
fn assert_untouched_guard_and_zero_k0(case: &Case, p: &Prepared, got: &[u8], ds: usize, what: &str) {
    assert!(got[p.c_elems * ds..].iter().all(|&x| x == 0xFF), "{} {what}: wrote past C", case.name);
    for (e, &(m, n, k)) in case.dims.iter().enumerate() {
        if k == 0 && m > 0 {
            let s = p.c_offsets[e] * ds;
            assert!(
                got[s..s + m * n * ds].iter().all(|&x| x == 0),
                "{} {what}: expert {e} with k = 0 not zeroed",
                case.name
            );
        }
    }
}

/// Poisons C (and its guard tail), runs `strategy` (twice: the second run replays cached
/// graphs / pointer arrays), returns C's bytes.
fn run(eng: &mut Engine, p: &mut Prepared, case: &Case, dt: Dtype, strategy: Strategy) -> Result<Vec<u8>, GpuError> {
    let mut out = Vec::new();
    for _ in 0..2 {
        eng.poison(&mut p.c)?;
        eng.grouped_gemm(strategy, dt, case.ta, case.tb, &p.problems())?;
        eng.synchronize()?;
        out = eng.download(&p.c)?;
    }
    Ok(out)
}

/// `Strategy::Hybrid` splits a list by size: this case has one expert large enough to fill
/// every SM for a wave on its own (133 x 1 output tiles of 128 x 256 on a 132-SM H100, k =
/// 1024), which must run on cuBLAS, exactly as `Loop` runs it, while the small ones (an empty
/// one, ragged ones) take the persistent kernel in one launch. The small cases of
/// `every_strategy_matches_loop_and_reference` never split (all small). The large expert is
/// checked against the f64 reference on every 97th row (4.4·10⁹ multiply-adds in full).
#[test]
fn hybrid_strategy_runs_large_experts_on_cublas_and_the_rest_on_the_persistent_kernel() {
    let test = "hybrid_strategy_runs_large_experts_on_cublas_and_the_rest_on_the_persistent_kernel";
    let Some(gpu) = gpu(test) else {
        return;
    };
    let mut eng = gpu.lock().expect("the engine");
    if eng.arch() != "sm_90" {
        moe_gpu::print_skip(&format!("SKIP gpu_grouped::{test}: {} is not sm_90", eng.arch()));
        return;
    }
    let sms = eng.sm_count();
    let big = (sms + 1) * moe_gpu::gemm::TILE_M - 8;
    let case = Case {
        name: "hybrid_split",
        ta: false,
        tb: true,
        dims: vec![(40, 256, 1024), (0, 256, 1024), (big, 256, 1024), (200, 256, 1024), (8, 256, 1024)],
    };
    let waves = 1;
    let large: Vec<bool> = case
        .dims
        .iter()
        .map(|&(m, n, k)| moe_gpu::gemm::fills_gpu_alone(&GemmProblem::dims(m, n, k), waves, sms))
        .collect();
    assert_eq!(large, [false, false, true, false, false], "the split this case is built for");
    let dt = Dtype::Bf16;
    let ds = dt.size_bytes();
    let mut p = prepare_rows(&mut eng, &case, dt, 0x4b1d, 97).expect("prepare");
    let base = run(&mut eng, &mut p, &case, dt, Strategy::Loop).expect("loop");
    let before = eng.launches();
    let got = run(&mut eng, &mut p, &case, dt, Strategy::Hybrid(waves)).expect("hybrid");
    // Per run: the poison memset, one persistent launch, one cuBLAS call.
    assert_eq!(eng.launches() - before, 2 * 3, "expected poison + persistent + one cuBLAS GEMM per run");
    assert_untouched_guard_and_zero_k0(&case, &p, &got, ds, "hybrid");
    let (s, e) = (p.c_offsets[2] * ds, (p.c_offsets[2] + big * 256) * ds);
    assert!(got[s..e] == base[s..e], "the large expert must be Loop's cublasGemmEx, bit for bit");
    let v = from_bytes(dt, &got[..p.c_elems * ds]);
    if let Some(i) = v.iter().position(|g| g.is_nan()) {
        panic!("hybrid: NaN (unwritten) at {i}");
    }
    let worst = check_gemm_output(&v, &p.host).unwrap_or_else(|e| panic!("hybrid: {e}"));
    let checked = p.host.reference.iter().filter(|r| !r.is_nan()).count();
    println!("gpu_grouped: hybrid split checked on {checked} reference elements, worst |error| / bound = {worst:.3}");
}

#[test]
fn every_strategy_matches_loop_and_reference() {
    let Some(gpu) = gpu("every_strategy_matches_loop_and_reference") else {
        return;
    };
    let mut eng = gpu.lock().expect("the engine");
    let mut exact_report = Vec::new();
    for dt in [Dtype::Bf16, Dtype::F32] {
        let ds = dt.size_bytes();
        for (ci, case) in cases().iter().enumerate() {
            let mut p = prepare(&mut eng, case, dt, 0x5eed + ci as u64).expect("prepare");
            let base = run(&mut eng, &mut p, case, dt, Strategy::Loop).expect("loop");
            let base_v = from_bytes(dt, &base[..p.c_elems * ds]);
            // Loop against the f64 reference (one rounding to dt of an f32-accumulated sum).
            check_gemm_output(&base_v, &p.host).unwrap_or_else(|e| panic!("{} {dt:?} loop: {e}", case.name));
            for strategy in STRATEGIES {
                let got = run(&mut eng, &mut p, case, dt, strategy)
                    .unwrap_or_else(|e| panic!("{} {strategy:?}: {e}", case.name));
                assert_untouched_guard_and_zero_k0(case, &p, &got, ds, &format!("{dt:?} {strategy:?}"));
                let v = from_bytes(dt, &got[..p.c_elems * ds]);
                let mut max_diff = 0.0f64;
                for (i, (&g, &b)) in v.iter().zip(&base_v).enumerate() {
                    assert!(!g.is_nan(), "{} {strategy:?}: NaN (unwritten) at {i}", case.name);
                    max_diff = max_diff.max((g - b).abs());
                }
                // Each strategy against the reference under the same bound as Loop (two runs
                // each within it are within twice it of each other).
                check_gemm_output(&v, &p.host).unwrap_or_else(|e| panic!("{} {dt:?} {strategy:?}: {e}", case.name));
                let exact = got[..p.c_elems * ds] == base[..p.c_elems * ds];
                exact_report.push(format!(
                    "{}/{dt:?}/{}: {}",
                    case.name,
                    strategy.label(),
                    if exact { "exact".to_string() } else { format!("max |diff| {max_diff:.3e}") }
                ));
            }
        }
    }
    let inexact: Vec<_> = exact_report.iter().filter(|l| !l.ends_with("exact")).collect();
    println!(
        "gpu_grouped: {} strategy runs, {} bit-exact vs loop; not exact: {inexact:?}",
        exact_report.len(),
        exact_report.len() - inexact.len()
    );
}

/// Runs on every machine: [`check_gemm_output`] passes outputs that are one rounding of the exact
/// sums (inside the model), and fails on one element 1.2x its bound away from the reference
/// (either sign) while passing it at 0.8x, for each output dtype and for sparse references (the
/// hybrid test's sampled rows); NaN never passes.
#[test]
fn gemm_output_check_fails_at_1_2x_its_bound_and_passes_at_0_8x() {
    let case = Case { name: "host", ta: false, tb: true, dims: vec![(5, 7, 40), (0, 7, 40), (9, 7, 40), (3, 7, 0)] };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let a_len: usize = case.dims.iter().map(|&(m, _, k)| m * k).sum();
    let b_len: usize = case.dims.iter().map(|&(_, n, k)| k * n).sum();
    let (av, bv) = (rand_vals(&mut rng, a_len), rand_vals(&mut rng, b_len));
    for dt in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        for row_step in [1, 4] {
            let host = host_reference(&case, &av, &bv, dt, row_step);
            let rounded: Vec<f64> = host.reference.iter().map(|&r| if r.is_nan() { r } else { dt.round(r) }).collect();
            let worst = check_gemm_output(&rounded, &host).unwrap();
            assert!(worst <= 0.5, "{dt:?}: one rounding is at most half the bound, got {worst}");
            // Expert 2, row 4, column 3: referenced for both row steps.
            let i = 5 * 7 + 4 * 7 + 3;
            let with = |delta: f64| {
                let mut got = host.reference.clone();
                got[i] += delta;
                got
            };
            // The bound does not depend on `got`: one probe far outside it gives it.
            let probe = 1e3;
            let bound = probe / gemm_output_ratio(&with(probe), &host).0;
            for sign in [1.0, -1.0] {
                let high = gemm_output_ratio(&with(sign * 1.2 * bound), &host).0;
                assert!((high - 1.2).abs() < 1e-6, "{dt:?} row_step {row_step}: 1.2x reported as {high}");
                assert!(check_gemm_output(&with(sign * 1.2 * bound), &host).is_err());
                let low = check_gemm_output(&with(sign * 0.8 * bound), &host)
                    .unwrap_or_else(|e| panic!("{dt:?} row_step {row_step}: 0.8x failed: {e}"));
                assert!((low - 0.8).abs() < 1e-6, "{dt:?} row_step {row_step}: 0.8x reported as {low}");
            }
            assert!(check_gemm_output(&with(f64::NAN), &host).is_err(), "{dt:?}: NaN passed");
        }
    }
}
