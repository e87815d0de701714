//! `moe-verify verify --gpus N` and the hidden `worker` subcommand: the distributed expert layer
//! across N processes on one host, checked against the unsharded f64 oracle.
//!
//! The launcher re-executes this binary N times as `worker` with the launcher environment of
//! torchrun and Slurm (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), so a
//! worker also starts under those launchers, on several hosts. It sets `NCCL_NVLS_ENABLE=0`,
//! `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` and `NVSHMEM_DISABLE_NVLS=1` in every worker's
//! environment (the GPUs are shared: NVLink multicast stays off). It watches the workers: when
//! one exits with an error the others get a grace period to exit on their own (their collectives
//! time out naming the rank) before they are killed; when the whole run passes its deadline the
//! workers still running are killed and named as hung.
//!
//! Each worker rendezvouses with rank 0 at `MASTER_ADDR:MASTER_PORT` (the NCCL unique id is
//! broadcast there), then runs, for every (EP, ETP) layout of the world size and every class,
//! the distributed layer (tokens on rank 0, all-to-all dispatch, ETP reduce-scatter in
//! Megatron's dtypes, combine) on its device (`--transport nccl`, the CUDA layers) or on CPU
//! (`--transport tcp`, the reference emulating bf16), and rank 0 checks outputs, input/probs
//! grads and every rank's weight grads against the oracle.

use clap::ValueEnum;
use moe_harness::case::Case;
use moe_harness::distributed::layer::gather_weight_grads;
use moe_harness::distributed::tcp::rendezvous;
use moe_harness::distributed::{check_distributed, distributed_forward_backward, Fault, Transport};
use moe_harness::properties::{PropertyFailure, Verdict};
use moe_reference::parallel::EtpReduction;
use moe_reference::{ExpertLayer, LayerClass, LayerConfig, Parallelism, WgradTiming};
use rand::{Rng, SeedableRng};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The variables that keep NVLink multicast off, set in every worker the launcher starts.
pub const NO_MULTICAST_ENV: [(&str, &str); 3] =
    [("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")];

/// How the workers talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// NCCL between GPUs, the CUDA expert layers (one GPU per worker, `LOCAL_RANK`).
    Nccl,
    /// TCP through rank 0 between CPU workers, the reference emulating the storage dtype.
    Tcp,
}

/// A fault planted into one worker, to test the launcher's detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlantedFault {
    /// No fault.
    None,
    /// The worker exits abruptly (code 86) after the rendezvous.
    Die,
    /// The worker stops answering after the rendezvous (sleeps until killed).
    Hang,
}

/// The options shared by `verify --gpus` and `worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct DistArgs {
    /// With `--gpus`: how the workers exchange tokens (`nccl`: GPUs; `tcp`: CPU workers running
    /// the reference, to test the launcher and the protocol without GPUs).
    #[arg(long, value_enum, default_value = "nccl")]
    pub transport: TransportArg,
    /// With `--gpus`: seconds a collective waits for the slowest rank before the run fails
    /// naming it (TCP transport; NCCL collectives are bounded by `--run-timeout-s`).
    #[arg(long, default_value_t = 60)]
    pub collective_timeout_s: u64,
    /// With `--gpus`: seconds the whole run may take before the launcher kills the workers still
    /// running and names them as hung.
    #[arg(long, default_value_t = 600)]
    pub run_timeout_s: u64,
    /// Test hook: a fault planted into one worker.
    #[arg(long, value_enum, default_value = "none", hide = true)]
    pub planted_fault: PlantedFault,
    /// Test hook: the rank the planted fault hits.
    #[arg(long, default_value_t = 1, hide = true)]
    pub fault_rank: usize,
    /// With `--gpus`: after the checks, time N distributed steps of one larger layer against
    /// the same layer on one GPU (0: no timing).
    #[arg(long, default_value_t = 0)]
    pub time_steps: usize,
}

/// Arguments of the hidden `worker` subcommand (one rank; the launcher environment says which).
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Seed of the cases.
    #[arg(long, default_value_t = 0x5EED)]
    pub seed: u64,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// The timed step of `--time-steps`: TEGroupedMLP bf16, 8 experts, h 1024, f 2048, 512 rows
/// per expert, EP = world.
fn timing_case(world: usize, seed: u64) -> Case {
    Case {
        cfg: LayerConfig {
            class: LayerClass::TeGrouped,
            num_experts: 8,
            hidden_size: 1024,
            ffn_hidden_size: 2048,
            parallel: Parallelism { tp_size: 1, tp_rank: 0, ep_size: world, ep_rank: 0 },
            ..LayerConfig::example()
        },
        tokens_per_expert: vec![512; 8],
        seed,
        timing: WgradTiming::Immediate,
    }
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

/// `--time-steps N`: the wall time of the distributed step (dispatch all-to-all, the rank's
/// layer, combine; host-staged, as the `ExpertLayer` API is host in and out), of the dispatch
/// all-to-all alone, and (rank 0) of the same layer on the whole problem on one GPU; medians
/// of `n` after one warm-up. Rank 0 returns the line to print.
fn time_steps(t: &mut dyn Transport, layer_for: &LayerFor, n: usize, seed: u64) -> Result<Option<String>, String> {
    let (rank, world) = (t.rank(), t.world_size());
    let case = timing_case(world, seed);
    let p = case.problem();
    let layer = layer_for(case.cfg.class);
    let reduction = EtpReduction::megatron(&case.cfg);
    let source = (rank == 0).then_some((&p.inputs, &p.grad_output));
    let mut step = Vec::new();
    for i in 0..=n {
        t.barrier().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        distributed_forward_backward(
            t,
            layer.as_ref(),
            &case.cfg,
            &p.weights,
            source,
            case.timing,
            reduction,
            Fault::None,
        )
        .map_err(|e| e.to_string())?;
        if i > 0 {
            step.push(t0.elapsed().as_secs_f64());
        }
    }
    // The dispatch's bytes: every row (h inputs, its prob, h upstream grads) as f64.
    let rows = p.inputs.hidden_states.nrows();
    let per_rank = rows * (2 * case.cfg.hidden_size + 1) / world;
    let mut a2a = Vec::new();
    for i in 0..=n {
        let send = if rank == 0 { vec![vec![0.5; per_rank]; world] } else { vec![Vec::new(); world] };
        t.barrier().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        t.all_to_all(send).map_err(|e| e.to_string())?;
        if i > 0 {
            a2a.push(t0.elapsed().as_secs_f64());
        }
    }
    let mut single = Vec::new();
    if rank == 0 {
        let global = case.cfg.unsharded();
        let params = moe_reference::to_state_dict(&global, &p.weights).map_err(|e| e.to_string())?;
        for i in 0..=n {
            let t0 = Instant::now();
            layer
                .forward_backward(&global, &params, &p.inputs, &p.grad_output, case.timing)
                .map_err(|e| e.to_string())?;
            if i > 0 {
                single.push(t0.elapsed().as_secs_f64());
            }
        }
    }
    t.barrier().map_err(|e| e.to_string())?;
    Ok((rank == 0).then(|| {
        format!(
            "time [{}] te_grouped bf16 E=8 h=1024 f=2048 T={rows}: {world}-rank step {:.2} ms, 1-rank layer {:.2} ms, dispatch all_to_all of {} bytes from rank 0 {:.2} ms (medians of {n}; host-staged f64)",
            layer.name(),
            median_ms(step),
            median_ms(single),
            per_rank * 8 * world,
            median_ms(a2a)
        )
    }))
}

fn env_usize(name: &str) -> Result<usize, String> {
    let v = std::env::var(name).map_err(|_| {
        format!("{name} is not set (a worker needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    })?;
    v.parse().map_err(|_| format!("{name}={v:?} is not a non-negative integer"))
}

/// The launcher environment of one worker.
struct Launch {
    rank: usize,
    world: usize,
    local_rank: usize,
    addr: String,
}

fn launch_env() -> Result<Launch, String> {
    let rank = env_usize("RANK")?;
    let world = env_usize("WORLD_SIZE")?;
    let local_rank = env_usize("LOCAL_RANK")?;
    let port = env_usize("MASTER_PORT")?;
    let host = std::env::var("MASTER_ADDR").map_err(|_| "MASTER_ADDR is not set".to_string())?;
    if world == 0 || rank >= world {
        return Err(format!("RANK {rank} must be below WORLD_SIZE {world}"));
    }
    for (name, want) in NO_MULTICAST_ENV {
        if std::env::var(name).ok().as_deref() != Some(want) {
            return Err(format!(
                "{name} must be {want} (NVLink multicast stays off on shared GPUs): set NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (`verify --gpus` sets them)"
            ));
        }
    }
    if port == 0 || port > 65535 {
        return Err(format!("MASTER_PORT {port} is not a TCP port"));
    }
    Ok(Launch { rank, world, local_rank, addr: format!("{host}:{port}") })
}

/// The (EP, ETP) layouts of `world` ranks over 8 experts.
fn layouts(world: usize) -> Vec<(usize, usize)> {
    (1..=world).filter(|&ep| world.is_multiple_of(ep) && 8usize.is_multiple_of(ep)).map(|ep| (ep, world / ep)).collect()
}

/// The cases every worker runs, in order: per layout, every class in bf16 (immediate wgrad,
/// and deferred where the class has it), TEGroupedMLP in fp16 and SequentialMLP in fp32
/// (deferred); with EP > 1 the deferred cases give the last EP rank no tokens at all.
fn cases(world: usize, seed: u64) -> Vec<Case> {
    use moe_reference::Dtype;
    use LayerClass::{Grouped, Sequential, TeGrouped};
    use WgradTiming::{Deferred, Immediate};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let kinds = [
        (Sequential, Dtype::Bf16, Immediate),
        (Sequential, Dtype::Bf16, Deferred),
        (Grouped, Dtype::Bf16, Immediate),
        (TeGrouped, Dtype::Bf16, Immediate),
        (TeGrouped, Dtype::Bf16, Deferred),
        (TeGrouped, Dtype::F16, Immediate),
        (Sequential, Dtype::F32, Deferred),
    ];
    for (ep, tp) in layouts(world) {
        for (class, dtype, timing) in kinds {
            let mut tokens: Vec<i64> = (0..8).map(|_| rng.random_range(0..40)).collect();
            if ep > 1 && timing == Deferred {
                let el = 8 / ep;
                tokens[8 - el..].iter_mut().for_each(|t| *t = 0);
            }
            out.push(Case {
                cfg: LayerConfig {
                    class,
                    num_experts: 8,
                    hidden_size: 64,
                    ffn_hidden_size: 96,
                    params_dtype: dtype,
                    parallel: Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 },
                    ..LayerConfig::example()
                },
                tokens_per_expert: tokens,
                seed: rng.random(),
                timing,
            });
        }
    }
    out
}

/// The expert layer of `class` this worker runs.
type LayerFor = dyn Fn(LayerClass) -> Box<dyn ExpertLayer>;

#[cfg(feature = "cuda")]
fn nccl_setup(
    l: &Launch,
    rv: &mut moe_harness::distributed::tcp::Rendezvous,
    timeout: Duration,
) -> Result<(Box<dyn Transport>, Box<LayerFor>), String> {
    use moe_gpu::nccl::{unique_id, NcclTransport};
    let gpu = moe_gpu::Gpu::new(l.local_rank).map_err(|e| format!("GPU {} (LOCAL_RANK): {e}", l.local_rank))?;
    let id = if l.rank == 0 { Some(unique_id().map_err(|e| e.to_string())?) } else { None };
    let id = rv.broadcast_bytes(id, timeout)?;
    let t = NcclTransport::new(l.local_rank, l.rank, l.world, &id).map_err(|e| e.to_string())?;
    let layer = move |class: LayerClass| -> Box<dyn ExpertLayer> {
        match class {
            LayerClass::Sequential => Box::new(moe_gpu::CudaSequential::new(&gpu).with_poison(true)),
            LayerClass::Grouped => Box::new(moe_gpu::CudaGrouped::new(&gpu).with_poison(true)),
            LayerClass::TeGrouped => Box::new(moe_gpu::CudaTeGrouped::new(&gpu).with_poison(true)),
        }
    };
    Ok((Box::new(t), Box::new(layer)))
}

#[cfg(not(feature = "cuda"))]
fn nccl_setup(
    l: &Launch,
    _: &mut moe_harness::distributed::tcp::Rendezvous,
    _: Duration,
) -> Result<(Box<dyn Transport>, Box<LayerFor>), String> {
    Err(format!("--transport nccl (GPU {}, LOCAL_RANK) needs the `cuda` feature", l.local_rank))
}

/// The hidden `worker` subcommand: one rank of `verify --gpus`. Exit 0 when every case passed
/// (rank 0 checks; the others report their own errors), 1 on a failed check or a failed peer,
/// 2 on a bad launcher environment.
pub fn run_worker(args: &WorkerArgs) -> i32 {
    let l = match launch_env() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: worker: {e}");
            return 2;
        }
    };
    let tag = format!("[rank {}/{}]", l.rank, l.world);
    let timeout = Duration::from_secs(args.dist.collective_timeout_s);
    let mut rv = match rendezvous(&l.addr, l.rank, l.world, timeout) {
        Ok(rv) => rv,
        Err(e) => {
            eprintln!("{tag} error: rendezvous: {e}");
            return 1;
        }
    };
    if args.dist.fault_rank == l.rank {
        match args.dist.planted_fault {
            PlantedFault::None => {}
            PlantedFault::Die => std::process::exit(86),
            PlantedFault::Hang => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
        }
    }
    let setup = match args.dist.transport {
        TransportArg::Tcp => {
            let reference = |_: LayerClass| -> Box<dyn ExpertLayer> { Box::new(moe_reference::Reference::EMULATED) };
            Ok((
                Box::new(rv.into_transport(l.rank, l.world, timeout)) as Box<dyn Transport>,
                Box::new(reference) as Box<LayerFor>,
            ))
        }
        TransportArg::Nccl => nccl_setup(&l, &mut rv, timeout),
    };
    let (mut transport, layer_for) = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{tag} error: {e}");
            return 1;
        }
    };
    if let Err(e) = moe_harness::distributed::transport_self_test(transport.as_mut()) {
        eprintln!("{tag} FAIL transport self-test: {e}");
        return 1;
    }
    if l.rank == 0 {
        println!("{tag} transport self-test pass (uneven all_to_all, reduce_scatter/all_reduce in bf16, f32, f64)");
    }
    let mut failed = 0;
    let all = cases(l.world, args.seed);
    for case in &all {
        let p = case.problem();
        let layer = layer_for(case.cfg.class);
        let reduction = EtpReduction::megatron(&case.cfg);
        let source = (l.rank == 0).then_some((&p.inputs, &p.grad_output));
        let run = distributed_forward_backward(
            transport.as_mut(),
            layer.as_ref(),
            &case.cfg,
            &p.weights,
            source,
            case.timing,
            reduction,
            Fault::None,
        );
        let result = match run {
            Ok(r) => r,
            Err(e) => {
                eprintln!("{tag} error: {}: {e}", case.summary());
                return 1;
            }
        };
        // An EP rank without tokens must return exactly-zero weight grads (checked on the rank
        // that holds them; the oracle comparison below checks them again on rank 0).
        if result.rows.is_empty() && result.partial.weight_grads.values().any(|g| g.iter().any(|&v| v != 0.0)) {
            eprintln!("{tag} FAIL {}: no tokens here, but non-zero weight grads", case.summary());
            failed += 1;
        }
        let grads = match gather_weight_grads(transport.as_mut(), &case.cfg, &result.partial.weight_grads) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{tag} error: {}: {e}", case.summary());
                return 1;
            }
        };
        if let Some(grads) = grads {
            match check_distributed(&case.cfg, &p, reduction, &result, grads) {
                Ok(Verdict::Checked(diffs)) => {
                    let worst = diffs.iter().max_by(|a, b| a.worst_ratio.total_cmp(&b.worst_ratio));
                    let w = worst.map(|d| format!("{:.3e} ({})", d.worst_ratio, d.name)).unwrap_or_default();
                    println!("{tag} pass [{}] {}  worst err/tol {w}", layer.name(), case.summary());
                }
                Ok(Verdict::Skipped(why)) => println!("{tag} skip {}: {why}", case.summary()),
                Err(PropertyFailure::Mismatch(diffs)) => {
                    failed += 1;
                    eprintln!("{tag} FAIL {}:", case.summary());
                    diffs.iter().filter(|d| !d.passed()).for_each(|d| eprintln!("  {d}"));
                }
                Err(PropertyFailure::Error(e)) => {
                    failed += 1;
                    eprintln!("{tag} FAIL {}: {e}", case.summary());
                }
            }
        }
    }
    match checkpoint_round_trip(transport.as_mut(), args.seed) {
        Ok(Some(line)) => println!("{tag} {line}"),
        Ok(None) => {}
        Err(e) => {
            failed += 1;
            eprintln!("{tag} FAIL distributed checkpoint: {e}");
        }
    }
    if args.dist.time_steps > 0 {
        match time_steps(transport.as_mut(), layer_for.as_ref(), args.dist.time_steps, args.seed) {
            Ok(Some(line)) => println!("{tag} {line}"),
            Ok(None) => {}
            Err(e) => {
                eprintln!("{tag} error: timing: {e}");
                return 1;
            }
        }
    }
    if let Err(e) = transport.barrier() {
        eprintln!("{tag} error: final barrier: {e}");
        return 1;
    }
    if l.rank == 0 {
        println!("{tag} {} cases, {} failed", all.len(), failed);
    }
    i32::from(failed > 0)
}

/// Every rank saves its shard of seeded weights at EP = world into one checkpoint (rank 0's
/// temporary directory), then loads its shard at ETP = world (another layout, same rank count)
/// and rank 0 the unsharded layer, each compared exactly with the weights. Rank 0 returns the
/// line to print.
fn checkpoint_round_trip(t: &mut dyn Transport, seed: u64) -> Result<Option<String>, String> {
    use moe_checkpoint::tensor::raw_state_dict;
    use moe_checkpoint::{ExpertLayout, RankCoord, SaveOptions};
    use moe_harness::distributed::checkpoint::{load_rank, save_distributed};
    let (rank, world) = (t.rank(), t.world_size());
    let cfg = |ep: usize, tp: usize| LayerConfig {
        class: LayerClass::TeGrouped,
        num_experts: 8,
        hidden_size: 64,
        ffn_hidden_size: 96,
        parallel: Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 },
        ..LayerConfig::example()
    };
    if !8usize.is_multiple_of(world) || !96usize.is_multiple_of(world) {
        return Ok(None);
    }
    let weights = moe_reference::ExpertSet::random(&cfg(1, 1), seed);
    let state = |c: &LayerConfig, q: usize, k: usize| {
        let rc = c.at_rank(q, k);
        let sd = moe_reference::to_state_dict(&rc, &weights.shard(&rc).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        raw_state_dict(&sd, c.params_dtype).map_err(|e| e.to_string())
    };
    let dir = std::env::temp_dir().join(format!("moe-verify-ckpt-{}", std::process::id()));
    let saved = cfg(world, 1);
    let report = save_distributed(
        t,
        &dir,
        &ExpertLayout::new(saved.clone()),
        RankCoord::new(rank, 0),
        &state(&saved, rank, 0)?,
        &SaveOptions::default(),
    )?;
    // Rank 0 made the directory; every rank reads it (one host), then rank 0 removes it.
    let dir_values: Vec<f64> = dir.to_string_lossy().bytes().map(f64::from).collect();
    let send = if rank == 0 { vec![dir_values; world] } else { vec![Vec::new(); world] };
    let got = t.all_to_all(send).map_err(|e| e.to_string())?.swap_remove(0);
    let dir = std::path::PathBuf::from(
        String::from_utf8_lossy(&got.iter().map(|&v| v as u8).collect::<Vec<u8>>()).into_owned(),
    );
    let other = cfg(1, world);
    let mine = load_rank(&dir, &ExpertLayout::new(other.clone()), RankCoord::new(0, rank));
    let ok = match mine {
        Ok(m) if m == state(&other, 0, rank)? => Ok(()),
        Ok(_) => Err(format!("rank {rank}: its ETP {world} shard differs from the weights")),
        Err(e) => Err(format!("rank {rank}: {e}")),
    };
    let whole = if rank == 0 {
        match load_rank(&dir, &ExpertLayout::new(cfg(1, 1)), RankCoord::new(0, 0)) {
            Ok(m) if m == state(&cfg(1, 1), 0, 0)? => Ok(()),
            Ok(_) => Err("the unsharded layer differs from the weights".to_string()),
            Err(e) => Err(e),
        }
    } else {
        Ok(())
    };
    t.barrier().map_err(|e| e.to_string())?;
    if rank == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    ok?;
    whole?;
    Ok((rank == 0).then(|| {
        format!(
            "pass distributed checkpoint: saved by {world} ranks at EP {world} ({} files, {} shards), loaded at ETP {world} and unsharded",
            report.files, report.shards
        )
    }))
}

/// How a worker ended.
fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("was killed by signal {sig}");
        }
    }
    match status.code() {
        Some(c) => format!("exited with code {c}"),
        None => "ended".into(),
    }
}

/// `verify --gpus N`: starts N workers of this binary on this host and waits for them (module
/// doc). Exit 0 when all pass, 1 when a check failed or a worker died or hung, 2 on bad input.
pub fn launch(gpus: usize, seed: u64, args: &DistArgs) -> i32 {
    if gpus == 0 {
        eprintln!("error: --gpus must be at least 1");
        return 2;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot find this executable to start the workers: {e}");
            return 2;
        }
    };
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => {
            eprintln!("error: no free loopback port for the rendezvous: {e}");
            return 2;
        }
    };
    let transport = args.transport.to_possible_value().expect("no skipped values").get_name().to_string();
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..gpus {
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .args(["--seed", &seed.to_string(), "--transport", &transport])
            .args(["--collective-timeout-s", &args.collective_timeout_s.to_string()])
            .args(["--run-timeout-s", &args.run_timeout_s.to_string()])
            .args(["--fault-rank", &args.fault_rank.to_string()])
            .args(["--time-steps", &args.time_steps.to_string()])
            .args(["--planted-fault", args.planted_fault.to_possible_value().expect("named").get_name()])
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", gpus.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .envs(NO_MULTICAST_ENV);
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                eprintln!("error: cannot start worker {rank}: {e}");
                kill_all(&mut children);
                return 2;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(args.run_timeout_s);
    let grace = Duration::from_secs(2 * args.collective_timeout_s + 5);
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; gpus];
    loop {
        for (rank, slot) in children.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Ok(Some(st)) = child.try_wait() {
                    statuses[rank] = Some(st);
                    *slot = None;
                    if !st.success() && first_failure.is_none() {
                        first_failure = Some((rank, st, Instant::now()));
                    }
                }
            }
        }
        let running: Vec<usize> = (0..gpus).filter(|&r| children[r].is_some()).collect();
        if running.is_empty() {
            break;
        }
        let now = Instant::now();
        if let Some((rank, st, at)) = first_failure {
            if now >= at + grace {
                kill_all(&mut children);
                eprintln!(
                    "error: rank {rank} {}; rank(s) {running:?} had not exited {} s later and were killed",
                    describe(st),
                    grace.as_secs()
                );
                return 1;
            }
        }
        if now >= deadline {
            kill_all(&mut children);
            eprintln!(
                "error: rank(s) {running:?} still running after --run-timeout-s {} s (hung); killed",
                args.run_timeout_s
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let failed: Vec<(usize, ExitStatus)> =
        statuses.iter().enumerate().filter_map(|(r, s)| s.filter(|s| !s.success()).map(|s| (r, s))).collect();
    if failed.is_empty() {
        println!("{gpus} workers passed");
        return 0;
    }
    // A worker that saw a peer fail reports it and exits 1; one that crashed exits otherwise:
    // name the crashed one first, whatever order the exits were noticed in.
    let mut order = failed.clone();
    order.sort_by_key(|&(r, s)| (s.code() == Some(1), r));
    let text: Vec<String> = order.iter().map(|&(r, s)| format!("rank {r} {}", describe(s))).collect();
    eprintln!("error: {}", text.join("; "));
    if failed.iter().any(|(_, s)| s.code() == Some(2)) {
        2
    } else {
        1
    }
}

fn kill_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        // Only our own children, by handle; a child that already exited is fine.
        let _ = child.kill();
        let _ = child.wait();
    }
}
