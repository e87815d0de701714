//! The distributed expert layer (`moe_harness::distributed`) on CPU: ranks as threads linked by
//! the fake transport (and by TCP), checked bit for bit against the in-process rank simulation
//! and under the error model against the unsharded f64 oracle; the planted distributed bugs;
//! dead and hung ranks.

use moe_harness::case::Case;
use moe_harness::distributed::layer::etp_slice;
use moe_harness::distributed::tcp::{decode, encode, rendezvous};
use moe_harness::distributed::transport::{Collective, Message};
use moe_harness::distributed::{
    check_distributed, fake::fake_transports, run_in_threads, DistributedError, Fault, RankResult, Transport,
    TransportError,
};
use moe_harness::properties::PropertyFailure;
use moe_reference::parallel::{reduce_ranks, run_ranks, EtpReduction};
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism, Reference, StateDict, WgradTiming};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(30);

fn case(class: LayerClass, ep: usize, tp: usize, tokens: Vec<i64>, timing: WgradTiming) -> Case {
    Case {
        cfg: LayerConfig {
            class,
            num_experts: 4,
            hidden_size: 16,
            ffn_hidden_size: 8,
            parallel: Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 },
            ..LayerConfig::example()
        },
        tokens_per_expert: tokens,
        seed: 11,
        timing,
    }
}

const LAYOUTS: [(usize, usize); 3] = [(2, 1), (1, 2), (2, 2)];

fn run(c: &Case, fault: Fault) -> Result<Vec<RankResult>, Vec<DistributedError>> {
    let reduction = EtpReduction::megatron(&c.cfg);
    run_in_threads(&Reference::EMULATED, &c.cfg, &c.problem(), c.timing, reduction, fault, TIMEOUT)
}

fn grads(results: &[RankResult]) -> Vec<StateDict> {
    results.iter().map(|r| r.partial.weight_grads.clone()).collect()
}

#[test]
fn fake_transport_equals_the_rank_simulation_bit_for_bit() {
    // The same layer on the same shards and rows, and reductions in the same dtypes and rank
    // order: the distributed layer must reproduce the simulation exactly, for every class and
    // layout, immediate and deferred wgrad.
    for class in LayerClass::ALL {
        for (ep, tp) in LAYOUTS {
            // GroupedMLP refuses deferred wgrad (Megatron's backward_dw is a no-op there).
            for timing in [WgradTiming::Immediate, WgradTiming::Deferred] {
                if class == LayerClass::Grouped && timing == WgradTiming::Deferred {
                    continue;
                }
                let c = case(class, ep, tp, vec![5, 3, 4, 7], timing);
                let p = c.problem();
                let results = run(&c, Fault::None).expect("distributed run");
                let sim =
                    run_ranks(&Reference::EMULATED, &c.cfg, &p.weights, &p.inputs, &p.grad_output, timing).unwrap();
                let want = reduce_ranks(&c.cfg, &sim, c.num_tokens(), 16, EtpReduction::megatron(&c.cfg)).unwrap();
                let (out, gin, gp) = results[0].combined.clone().expect("rank 0 combines");
                let at = format!("{class} ep={ep} tp={tp} {timing:?}");
                assert_eq!(out, want.output, "output {at}");
                assert_eq!(gin, want.grad_input, "grad_input {at}");
                assert_eq!(gp, want.grad_probs, "grad_probs {at}");
                for (r, s) in results.iter().zip(&sim) {
                    assert_eq!((r.ep_rank, r.tp_rank, &r.rows), (s.ep_rank, s.tp_rank, &s.rows), "{at}");
                    assert_eq!(r.partial.weight_grads, s.run.weight_grads, "rank {} weight grads {at}", r.rank);
                    assert!(r.rank == 0 || r.combined.is_none());
                }
            }
        }
    }
}

#[test]
fn distributed_layer_matches_the_f64_oracle() {
    // The claim of the issue: outputs, input/probs grads and every rank's weight grads of the
    // distributed layer against the unsharded oracle, reductions modelled.
    for class in LayerClass::ALL {
        for (ep, tp) in LAYOUTS {
            let c = case(class, ep, tp, vec![6, 2, 5, 3], WgradTiming::Immediate);
            let results = run(&c, Fault::None).expect("distributed run");
            let v =
                check_distributed(&c.cfg, &c.problem(), EtpReduction::megatron(&c.cfg), &results[0], grads(&results));
            assert!(v.is_ok(), "{class} ep={ep} tp={tp}: {}", v.unwrap_err());
        }
    }
}

#[test]
fn an_ep_rank_without_tokens_returns_exactly_zero_weight_grads() {
    // EP rank 1 owns experts 2 and 3, which get no tokens: its ranks are still called (with
    // zero rows, as Megatron calls them) and must return exactly-zero weight grads.
    for (ep, tp) in [(2, 1), (2, 2)] {
        let c = case(LayerClass::TeGrouped, ep, tp, vec![5, 4, 0, 0], WgradTiming::Deferred);
        let results = run(&c, Fault::None).expect("distributed run");
        for r in results.iter().filter(|r| r.ep_rank == 1) {
            assert!(r.rows.is_empty());
            for (name, g) in &r.partial.weight_grads {
                assert!(g.iter().all(|&v| v == 0.0), "rank {} {name}", r.rank);
            }
        }
        let v = check_distributed(&c.cfg, &c.problem(), EtpReduction::megatron(&c.cfg), &results[0], grads(&results));
        assert!(v.is_ok(), "ep={ep} tp={tp}: {}", v.unwrap_err());
    }
}

#[test]
fn deferred_wgrad_equals_immediate_across_ranks() {
    // Deferred wgrad only moves when the weight grads are computed: bit for bit the same.
    for (ep, tp) in LAYOUTS {
        let now =
            run(&case(LayerClass::TeGrouped, ep, tp, vec![3, 6, 2, 5], WgradTiming::Immediate), Fault::None).unwrap();
        let later =
            run(&case(LayerClass::TeGrouped, ep, tp, vec![3, 6, 2, 5], WgradTiming::Deferred), Fault::None).unwrap();
        assert_eq!(now[0].combined, later[0].combined);
        assert_eq!(grads(&now), grads(&later));
    }
}

fn mismatch(c: &Case, fault: Fault) -> bool {
    let results = run(c, fault).expect("the fault does not stop the run");
    matches!(
        check_distributed(&c.cfg, &c.problem(), EtpReduction::megatron(&c.cfg), &results[0], grads(&results)),
        Err(PropertyFailure::Mismatch(_))
    )
}

#[test]
fn planted_wrong_expert_offset_on_rank_1_is_caught() {
    // Rank 1 computing with the wrong experts' weights: its rows' outputs (EP) or its partial
    // sums (ETP) are wrong, beyond any rounding.
    for (ep, tp) in LAYOUTS {
        assert!(mismatch(
            &case(LayerClass::Sequential, ep, tp, vec![5, 3, 4, 7], WgradTiming::Immediate),
            Fault::WrongExpertOffset
        ));
    }
    assert!(!mismatch(&case(LayerClass::Sequential, 2, 1, vec![5, 3, 4, 7], WgradTiming::Immediate), Fault::None));
}

#[test]
fn planted_reduction_in_the_wrong_dtype_is_caught() {
    // An f32 layer whose ETP output partials are summed in a hard-coded bf16: 16 bits lost, far
    // beyond the f32 reduction the error model allows. (For a bf16 layer the f32 sum cast to
    // bf16 and the bf16 sum of two bf16 partials agree, so an f32 layer is the case that tells.)
    for (ep, tp) in [(1, 2), (2, 2)] {
        let mut c = case(LayerClass::TeGrouped, ep, tp, vec![9, 7, 8, 6], WgradTiming::Immediate);
        c.cfg.params_dtype = Dtype::F32;
        assert!(!mismatch(&c, Fault::None), "ep={ep} tp={tp}");
        assert!(mismatch(&c, Fault::WrongReductionDtype), "ep={ep} tp={tp}");
    }
}

#[test]
fn planted_dropped_all_to_all_chunk_is_an_error_naming_the_rank() {
    // Rank 1's dispatch chunk lost: rank 1 reports the short buffer, the others learn that rank
    // 1 failed instead of hanging.
    let errs = run(&case(LayerClass::Grouped, 2, 1, vec![5, 3, 4, 7], WgradTiming::Immediate), Fault::DroppedChunk)
        .expect_err("a dropped chunk must fail");
    assert_eq!(errs.len(), 2, "{errs:?}");
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert!(text[0].contains("rank 1"), "{text:?}");
    assert!(text[1].starts_with("rank 1: dispatch from rank 0 has 0 values"), "{text:?}");
}

#[test]
fn reduce_scatter_sums_in_rank_order_in_the_dtype() {
    // The fake transport's reduce-scatter rounds every partial and every addition to the dtype
    // (reference's reduce_values): 1 + 3 quarter-spacings stays 1 in bf16, is exact in f32.
    let q = 2f64.powi(-9);
    for (dtype, want) in [(Some(Dtype::Bf16), 1.0), (Some(Dtype::F32), 1.0 + 3.0 * q), (None, 1.0 + 3.0 * q)] {
        let results: Vec<Vec<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = fake_transports(4, TIMEOUT)
                .into_iter()
                .map(|mut t| {
                    s.spawn(move || {
                        let v = if t.rank() == 0 { 1.0 } else { q };
                        t.reduce_scatter(&[0, 1, 2, 3], vec![v, 2.0 * v, 0.0, 5.0], &[1, 1, 2, 0], dtype).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0], vec![want], "{dtype:?}");
        assert_eq!(results[2], vec![0.0, 20.0]);
        assert!(results[3].is_empty());
    }
    assert_eq!(etp_slice(7, 3, 0), 0..3);
    assert_eq!(etp_slice(7, 3, 2), 5..7);
}

#[test]
fn uneven_all_to_all_delivers_every_chunk() {
    let results: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = fake_transports(3, TIMEOUT)
            .into_iter()
            .map(|mut t| {
                s.spawn(move || {
                    let r = t.rank() as f64;
                    t.all_to_all((0..3).map(|j| vec![r; j + t.rank()]).collect()).unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (j, recv) in results.iter().enumerate() {
        for (i, b) in recv.iter().enumerate() {
            assert_eq!(b, &vec![i as f64; i + j]);
        }
    }
}

/// Runs `world` ranks where rank `bad` does `misbehave` instead of joining a barrier.
fn with_bad_rank(world: usize, bad: usize, misbehave: fn(&mut dyn Transport)) -> Vec<Result<(), TransportError>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = fake_transports(world, Duration::from_millis(300))
            .into_iter()
            .map(|mut t| {
                s.spawn(move || {
                    if t.rank() == bad {
                        misbehave(&mut t);
                        return Ok(());
                    }
                    t.barrier()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_dead_or_hung_rank_is_reported_by_name() {
    // Dead: rank 2's thread ends without joining. Hung: it sleeps past the timeout. Either way
    // every other rank returns an error naming rank 2 instead of waiting forever.
    let dead = with_bad_rank(3, 2, |_| {});
    let hung = with_bad_rank(3, 2, |_| std::thread::sleep(Duration::from_millis(900)));
    for results in [dead, hung] {
        for (r, res) in results.iter().enumerate().filter(|(r, _)| *r != 2) {
            let e = res.as_ref().expect_err("must fail").to_string();
            assert!(e.contains("rank 2"), "rank {r}: {e}");
        }
    }
    // Mismatched collectives (a rank one step ahead) are named too.
    let ahead = with_bad_rank(2, 1, |t| {
        let _ = t.all_to_all(vec![Vec::new(), Vec::new()]);
    });
    assert!(ahead[0]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("rank 1: called all_to_all while rank 0 called barrier"));
}

#[test]
fn tcp_frames_round_trip_and_corrupt_frames_are_errors() {
    let msgs = [
        Message::Op(Collective::AllToAll(vec![vec![1.5, -0.0], vec![], vec![f64::MIN_POSITIVE]])),
        Message::Op(Collective::Reduce {
            group: vec![0, 3],
            counts: vec![1, 2],
            dtype: Some(Dtype::Bf16),
            data: vec![1.0, 2.0, 3.0],
        }),
        Message::Op(Collective::Barrier),
        Message::Reply(vec![vec![4.0]]),
        Message::Abort("rank 1 died".into()),
        Message::Bytes(vec![0, 255, 7]),
    ];
    for m in &msgs {
        let b = encode(m);
        assert_eq!(&decode(&b).unwrap(), m);
        // Every truncation is an error, never a panic.
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "{m:?} cut at {cut}");
        }
    }
    // A length far beyond the frame is refused before allocating.
    let mut huge = vec![1u8];
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(decode(&huge).unwrap_err().contains("announces"));
}

#[test]
fn distributed_layer_over_tcp_equals_the_fake_transport() {
    // The CPU workers' transport: rendezvous on loopback, the NCCL-id broadcast, then the same
    // layer; results bit for bit those of the in-process run.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let c = case(LayerClass::TeGrouped, 1, 2, vec![4, 5, 3, 6], WgradTiming::Immediate);
    let p = c.problem();
    let reduction = EtpReduction::megatron(&c.cfg);
    let results: Vec<RankResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|rank| {
                let (addr, c, p) = (addr.clone(), &c, &p);
                s.spawn(move || {
                    let mut rv = rendezvous(&addr, rank, 2, TIMEOUT).unwrap();
                    let id = rv.broadcast_bytes((rank == 0).then(|| vec![42; 128]), TIMEOUT).unwrap();
                    assert_eq!(id, vec![42; 128]);
                    let mut t = rv.into_transport(rank, 2, TIMEOUT);
                    let source = (rank == 0).then_some((&p.inputs, &p.grad_output));
                    moe_harness::distributed::distributed_forward_backward(
                        &mut t,
                        &Reference::EMULATED,
                        &c.cfg,
                        &p.weights,
                        source,
                        c.timing,
                        reduction,
                        Fault::None,
                    )
                    .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let fake = run(&c, Fault::None).unwrap();
    assert_eq!(results[0].combined, fake[0].combined);
    assert_eq!(grads(&results), grads(&fake));
}

/// `moe-verify verify --gpus 2 --transport tcp` with extra flags: (exit code, stdout, stderr).
fn launch(extra: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(crate::moe_verify_bin())
        .args(["verify", "--gpus", "2", "--transport", "tcp"])
        .args(extra)
        .output()
        .expect("moe-verify runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn launcher_runs_cpu_workers_that_pass_every_layout() {
    // Two worker processes (re-executions of the binary with the torchrun variables; they refuse
    // to start without the no-multicast variables, so passing shows the launcher sets them):
    // (EP, ETP) = (2, 1) and (1, 2), every class, deferred wgrad, an EP rank without tokens.
    let (code, out, err) = launch(&[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("14 cases, 0 failed") && out.contains("2 workers passed"), "{out}");
    assert!(out.contains("pass [reference] te_grouped float16") && out.contains("sequential float32"), "{out}");
    assert!(out.contains("tp=1 ep=2 tokens=[") && out.contains("tp=2 ep=1"), "{out}");
    assert!(out.contains("0, 0, 0, 0] deferred-wgrad"), "{out}");
}

#[test]
fn launcher_names_a_dead_worker() {
    let (code, out, err) = launch(&["--planted-fault", "die", "--fault-rank", "1", "--collective-timeout-s", "3"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("error: rank 1 exited with code 86; rank 0 exited with code 1"), "{err}");
    assert!(err.contains("rank 1: no all_to_all contribution"), "rank 0 names it too: {err}");
}

#[test]
fn launcher_names_a_hung_worker() {
    // Rank 1 stops answering: rank 0's first collective times out naming rank 1, and the
    // launcher kills rank 1 once the grace period is over.
    let (code, out, err) = launch(&["--planted-fault", "hang", "--fault-rank", "1", "--collective-timeout-s", "1"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("rank 1: no all_to_all contribution (died or hung; waited up to 1 s)"), "{err}");
    assert!(err.contains("rank 0 exited with code 1; rank(s) [1] had not exited"), "{err}");
    // With collectives that would wait longer than the run may take, the run timeout kills
    // every worker still running.
    let (code, _, err) = launch(&[
        "--planted-fault",
        "hang",
        "--fault-rank",
        "1",
        "--collective-timeout-s",
        "60",
        "--run-timeout-s",
        "2",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("rank(s) [0, 1] still running after --run-timeout-s 2 s (hung); killed"), "{err}");
}

#[test]
fn a_worker_needs_the_launcher_environment_and_multicast_off() {
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(crate::moe_verify_bin())
            .args(["worker", "--transport", "tcp"])
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("RANK is not set"), "{err}");
    let base =
        [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")];
    let (code, err) = run(&base);
    assert_eq!(code, Some(2));
    assert!(err.contains("NCCL_NVLS_ENABLE must be 0"), "{err}");
}

#[test]
fn transport_self_test_passes_on_the_star_and_catches_a_wrong_dtype() {
    // The self-test the GPU workers run on NCCL first, here on the fake transport; a transport
    // that reduces bf16 requests in f32 must fail it.
    struct F32Reducer(moe_harness::distributed::transport::HubTransport);
    impl Transport for F32Reducer {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_to_all(&mut self, send: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, TransportError> {
            self.0.all_to_all(send)
        }
        fn reduce_scatter(
            &mut self,
            g: &[usize],
            d: Vec<f64>,
            c: &[usize],
            dt: Option<Dtype>,
        ) -> Result<Vec<f64>, TransportError> {
            self.0.reduce_scatter(g, d, c, dt.map(|_| Dtype::F32))
        }
        fn all_reduce(&mut self, g: &[usize], d: Vec<f64>, dt: Option<Dtype>) -> Result<Vec<f64>, TransportError> {
            self.0.all_reduce(g, d, dt.map(|_| Dtype::F32))
        }
        fn barrier(&mut self) -> Result<(), TransportError> {
            self.0.barrier()
        }
    }
    for world in [1, 2, 3] {
        let ok: Vec<Result<(), String>> = std::thread::scope(|s| {
            let hs: Vec<_> = fake_transports(world, TIMEOUT)
                .into_iter()
                .map(|mut t| s.spawn(move || moe_harness::distributed::transport_self_test(&mut t)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ok.iter().all(Result::is_ok), "world {world}: {ok:?}");
    }
    let bad: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = fake_transports(2, TIMEOUT)
            .into_iter()
            .map(|t| s.spawn(move || moe_harness::distributed::transport_self_test(&mut F32Reducer(t))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(bad[0].as_ref().unwrap_err().contains("in Some(Bf16)"), "{bad:?}");
}

mod checkpoints {
    //! Distributed checkpoints (`moe_harness::distributed::checkpoint`): every rank saves its
    //! shards concurrently, rank 0 writes the one index; loads at other layouts and rank counts;
    //! interrupted saves leave nothing.

    use super::TIMEOUT;
    use moe_checkpoint::tensor::raw_state_dict;
    use moe_checkpoint::{ExpertLayout, RankCoord, RawStateDict, SaveOptions};
    use moe_harness::distributed::checkpoint::{load_rank, save_distributed};
    use moe_harness::distributed::fake::fake_transports;
    use moe_harness::distributed::Transport;
    use moe_reference::{to_state_dict, Dtype, ExpertSet, LayerClass, LayerConfig, Parallelism};
    use std::path::Path;

    fn config(class: LayerClass, ep: usize, tp: usize) -> LayerConfig {
        LayerConfig {
            class,
            num_experts: 4,
            hidden_size: 16,
            ffn_hidden_size: 8,
            parallel: Parallelism { tp_size: tp, tp_rank: 0, ep_size: ep, ep_rank: 0 },
            ..LayerConfig::example()
        }
    }

    /// Rank `r`'s state dict of `weights` at `cfg`'s layout (rank order ep-major).
    fn rank_state(cfg: &LayerConfig, weights: &ExpertSet, r: usize) -> RawStateDict {
        let tp = cfg.parallel.tp_size;
        let rc = cfg.at_rank(r / tp, r % tp);
        raw_state_dict(&to_state_dict(&rc, &weights.shard(&rc).unwrap()).unwrap(), Dtype::Bf16).unwrap()
    }

    /// Every rank of `cfg`'s layout saves into `dir`; rank `r`'s options from `opts(r)`; a rank
    /// for which `dies(r)` ends before saving. Returns every rank's outcome.
    fn save_all(
        cfg: &LayerConfig,
        weights: &ExpertSet,
        dir: &Path,
        opts: impl Fn(usize) -> SaveOptions + Sync,
        dies: impl Fn(usize) -> bool + Sync,
    ) -> Vec<Result<moe_checkpoint::SaveReport, String>> {
        let world = cfg.parallel.ep_size * cfg.parallel.tp_size;
        let layout = ExpertLayout::new(cfg.clone());
        std::thread::scope(|s| {
            let hs: Vec<_> = fake_transports(world, TIMEOUT)
                .into_iter()
                .map(|mut t| {
                    let (layout, opts, dies) = (&layout, &opts, &dies);
                    s.spawn(move || {
                        let r = t.rank();
                        if dies(r) {
                            return Err("died".to_string());
                        }
                        let tp = cfg.parallel.tp_size;
                        let coord = RankCoord::new(r / tp, r % tp);
                        save_distributed(&mut t, dir, layout, coord, &rank_state(cfg, weights, r), &opts(r))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn leftovers(parent: &Path) -> Vec<String> {
        std::fs::read_dir(parent).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn saved_by_four_ranks_loads_on_two_and_one() {
        // EP 2 × ETP 2 save concurrently (four files, one index); the checkpoint then loads at
        // EP 1 × ETP 2, EP 2 × ETP 1 and unsharded, each rank's tensors exactly the weights'
        // shard at that layout, for every class.
        for class in LayerClass::ALL {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("ckpt");
            let saved = config(class, 2, 2);
            let weights = ExpertSet::random(&saved.unsharded(), 5).rounded(Dtype::Bf16);
            let out = save_all(&saved, &weights, &dir, |_| SaveOptions::default(), |_| false);
            assert!(out.iter().all(Result::is_ok), "{class}: {out:?}");
            assert_eq!(out[0].as_ref().unwrap().files, 4);
            assert_eq!(out[3], out[0]);
            assert_eq!(leftovers(tmp.path()), vec!["ckpt".to_string()]);
            for (ep, tp) in [(1, 2), (2, 1), (1, 1)] {
                let cfg = config(class, ep, tp);
                let layout = ExpertLayout::new(cfg.clone());
                for r in 0..ep * tp {
                    let got = load_rank(&dir, &layout, RankCoord::new(r / tp, r % tp)).unwrap();
                    assert_eq!(got, rank_state(&cfg, &weights, r), "{class} ep={ep} tp={tp} rank {r}");
                }
            }
        }
    }

    #[test]
    fn an_interrupted_multi_rank_save_leaves_nothing() {
        // Rank 2 crashes while writing its file, or rank 3 dies before saving: every rank
        // reports the failed rank, and neither the target nor the staging directory remains.
        let cfg = config(LayerClass::TeGrouped, 2, 2);
        let weights = ExpertSet::random(&cfg.unsharded(), 6).rounded(Dtype::Bf16);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        let crash = |r: usize| SaveOptions { abort_after_files: (r == 2).then_some(0), ..SaveOptions::default() };
        let out = save_all(&cfg, &weights, &dir, crash, |_| false);
        for (r, o) in out.iter().enumerate() {
            let e = o.as_ref().expect_err("must fail");
            assert!(e.contains("rank 2"), "rank {r}: {e}");
        }
        let out = save_all(&cfg, &weights, &dir, |_| SaveOptions::default(), |r| r == 3);
        for o in out.iter().take(3) {
            assert!(o.as_ref().unwrap_err().contains("rank 3"), "{o:?}");
        }
        assert!(leftovers(tmp.path()).is_empty(), "{:?}", leftovers(tmp.path()));
        // An existing checkpoint is neither overwritten without force nor harmed.
        assert!(save_all(&cfg, &weights, &dir, |_| SaveOptions::default(), |_| false).iter().all(Result::is_ok));
        let other = ExpertSet::random(&cfg.unsharded(), 7).rounded(Dtype::Bf16);
        let again = save_all(&cfg, &other, &dir, |_| SaveOptions::default(), |_| false);
        assert!(again.iter().all(|o| o.as_ref().unwrap_err().contains("exists")), "{again:?}");
        let layout = ExpertLayout::new(cfg.clone());
        assert_eq!(load_rank(&dir, &layout, RankCoord::new(1, 1)).unwrap(), rank_state(&cfg, &weights, 3));
        // With force, a failed save keeps the old checkpoint.
        let forced = |r: usize| SaveOptions { force: true, abort_after_files: (r == 1).then_some(0) };
        assert!(save_all(&cfg, &other, &dir, forced, |_| false).iter().all(Result::is_err));
        assert_eq!(load_rank(&dir, &layout, RankCoord::new(1, 1)).unwrap(), rank_state(&cfg, &weights, 3));
        assert_eq!(leftovers(tmp.path()), vec!["ckpt".to_string()]);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn nccl_on_two_gpus_passes_every_layout() {
    // The real thing where two GPUs are present: `verify --gpus 2` over NCCL with the CUDA
    // layers (the device script's `nccl` step runs it with timings too). With fewer GPUs, or
    // without libnccl, one SKIP line, as the other GPU tests print.
    let test = "distributed::nccl_on_two_gpus_passes_every_layout";
    if let Err(e) = moe_gpu::engine::probe(1) {
        moe_gpu::print_skip(&format!("SKIP {test}: needs 2 GPUs ({e})"));
        return;
    }
    if !moe_gpu::nccl::nccl_present() {
        assert!(!moe_harness::cuda_required(), "{test}: libnccl cannot be loaded (MOE_REQUIRE_CUDA=1)");
        moe_gpu::print_skip(&format!("SKIP {test}: libnccl cannot be loaded"));
        return;
    }
    let out = std::process::Command::new(crate::moe_verify_bin())
        .args(["verify", "--gpus", "2", "--run-timeout-s", "300"])
        .output()
        .expect("moe-verify runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("transport self-test pass") && stdout.contains("14 cases, 0 failed"), "{stdout}");
    assert!(stdout.contains("[cuda-te-grouped]"), "the CUDA layers ran: {stdout}");
}

#[test]
fn workers_start_from_the_torchrun_environment() {
    // No launcher: two `worker` processes started as torchrun or Slurm would start them (RANK,
    // WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, the no-multicast variables) meet at
    // the address and pass; rank 1 started first waits for rank 0 to listen.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let spawn = |rank: &str| {
        std::process::Command::new(crate::moe_verify_bin())
            .args(["worker", "--transport", "tcp", "--collective-timeout-s", "30"])
            .envs([("RANK", rank), ("WORLD_SIZE", "2"), ("LOCAL_RANK", rank), ("MASTER_ADDR", "127.0.0.1")])
            .env("MASTER_PORT", &port)
            .envs([("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let one = spawn("1");
    std::thread::sleep(Duration::from_millis(300));
    let zero = spawn("0");
    let (zero, one) = (zero.wait_with_output().unwrap(), one.wait_with_output().unwrap());
    let out0 = String::from_utf8_lossy(&zero.stdout);
    assert!(zero.status.success() && one.status.success(), "{out0}\n{}", String::from_utf8_lossy(&one.stderr));
    assert!(out0.contains("[rank 0/2] 14 cases, 0 failed"), "{out0}");
}

#[test]
fn malformed_reduction_groups_are_refused() {
    // A group that repeats a rank would count its partial twice; one without the caller is a
    // caller bug: both refused before anything is sent.
    let mut t = fake_transports(1, TIMEOUT).pop().unwrap();
    for group in [vec![0, 0], vec![1]] {
        let e = t.all_reduce(&group, vec![1.0], None).unwrap_err();
        assert!(matches!(e, TransportError::Invalid(_)), "{group:?}: {e}");
    }
    assert!(t.reduce_scatter(&[0], vec![1.0, 2.0], &[1], None).is_err(), "counts must add up");
    assert_eq!(t.all_reduce(&[0], vec![1.5], Some(Dtype::Bf16)).unwrap(), vec![1.5]);
}
