//! What a grouped GEMM is and how it may be issued: the per-expert problem, the strategies of
//! the grouped executor, and the measured policy [`Strategy::Auto`] applies. A leaf module: it
//! knows no device, stream or buffer (a problem's operands are any handle `P`).

use std::fmt;
use std::str::FromStr;

/// Output-tile rows of the persistent grouped GEMM (`BM` of `kernels/grouped_gemm.cu`).
pub const TILE_M: usize = 128;
/// The output-tile widths the persistent grouped GEMM is compiled for (`BN`).
pub const TILE_N: [usize; 2] = [128, 256];
/// The shortest contraction [`fills_gpu_alone`] counts as large.
pub const HYBRID_MIN_K: usize = 1024;
/// [`Strategy::Auto`]'s [`Strategy::Hybrid`] threshold, in waves. Measured in interleaved rounds
/// (docs/performance.md): on Qwen3-30B-A3B with Zipf routing `Hybrid(2)` ran 2.5-4% faster
/// than the persistent kernel alone and than `Hybrid(4)`; GPT-OSS-120B with Zipf routing
/// within -1% to +5%.
pub const AUTO_HYBRID_WAVES: usize = 2;

/// One per-expert problem of a grouped GEMM: row-major `C[m, n] = op(A)·op(B)` with `A`
/// stored `[m, k]` (`[k, m]` when the call's `ta`), `B` stored `[k, n]` (`[n, k]` when `tb`)
/// and `C` compact `[m, n]`. `P` is the operand handle: a [`crate::memory::Region`] of a
/// device buffer at the engine's API, `()` where only the sizes matter (the policy below).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmProblem<P> {
    /// Rows of `C` (tokens of the expert in fc1/fc2/dgrad; may be 0).
    pub m: usize,
    /// Columns of `C`.
    pub n: usize,
    /// Contraction length (tokens of the expert in wgrad; may be 0: `C` becomes 0).
    pub k: usize,
    /// Where `A` starts.
    pub a: P,
    /// Where `B` starts.
    pub b: P,
    /// Where `C` starts.
    pub c: P,
}

impl GemmProblem<()> {
    /// A problem of these sizes without operands (for the policy functions).
    pub fn dims(m: usize, n: usize, k: usize) -> GemmProblem<()> {
        GemmProblem { m, n, k, a: (), b: (), c: () }
    }
}

impl<P> GemmProblem<P> {
    /// `2·m·n·k`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }

    /// Whether the problem multiplies anything (`m`, `n` and `k` all positive).
    pub fn computes(&self) -> bool {
        self.m > 0 && self.n > 0 && self.k > 0
    }

    /// The same problem with each operand handle mapped by `f`.
    pub fn map<Q>(&self, mut f: impl FnMut(&P) -> Q) -> GemmProblem<Q> {
        GemmProblem { m: self.m, n: self.n, k: self.k, a: f(&self.a), b: f(&self.b), c: f(&self.c) }
    }
}

/// One expert's weight-gradient GEMM over its `tokens` rows, for a grouped GEMM with
/// `ta = true, tb = false`: `out_side = (operand, columns)` is the expert's rows of the
/// output-side activation gradient, `in_side` those of the input-side activation, both
/// row-major with `tokens` rows. With `[out, in]` weights (`weights_out_in`: SequentialMLP,
/// TEGroupedMLP) the grad at `grad` is `out_sideᵀ·in_side`; GroupedMLP's `[in, out]` blocks
/// take `in_sideᵀ·out_side`. The layers and the grouped-GEMM bench build their weight
/// gradients with it.
pub fn wgrad_problem<P>(
    out_side: (P, usize),
    in_side: (P, usize),
    grad: P,
    tokens: usize,
    weights_out_in: bool,
) -> GemmProblem<P> {
    let ((a, m), (b, n)) = if weights_out_in { (out_side, in_side) } else { (in_side, out_side) };
    GemmProblem { m, n, k: tokens, a, b, c: grad }
}

/// How the per-expert GEMMs of one grouped call are issued. Every strategy computes the same
/// function (alpha 1, beta 0, f32 accumulation, one rounding; `k = 0` gives exact zeros, `m = 0`
/// writes nothing); they differ in speed only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// One `cublasGemmEx` per expert on the engine's stream (the baseline).
    Loop,
    /// The GEMMs spread over `s` side streams (longest-first onto the least-loaded stream),
    /// each with its own cuBLAS handle, forked from and joined back to the engine's stream.
    MultiStream(usize),
    /// [`Strategy::MultiStream`] with each stream's calls issued by its own host thread
    /// (spreads the per-GEMM host cost of cuBLAS and the driver over cores).
    Threads(usize),
    /// [`Strategy::MultiStream`] captured once into a CUDA graph, keyed by the whole problem
    /// list (pointers included), and replayed: removes the per-GEMM host launch cost when the
    /// same list recurs. A new list pays one capture + instantiate.
    Graph(usize),
    /// One `cublasGemmGroupedBatchedEx` call (device pointer arrays, cached per problem list;
    /// consecutive problems of equal shape share a group).
    GroupedBatched,
    /// The persistent Hopper grouped GEMM (`kernels/grouped_gemm.cu`, [`crate::persistent`]):
    /// one launch for all experts, output tiles 128 rows by `tile_n` columns (128 or 256; 0
    /// chooses per problem list with [`choose_tile_n`]). Falls back to [`Strategy::Auto`]'s
    /// cuBLAS choice for lists the kernel does not take (fp32, extents not multiples of 8, not a
    /// compute capability 9.0 GPU).
    Persistent(usize),
    /// Split by size: the problems that fill the GPU on their own for at least `waves` waves
    /// ([`fills_gpu_alone`]) run one `cublasGemmEx` each on the engine's stream, the rest as
    /// [`Strategy::Auto`] would run a non-uniform list: one persistent-kernel launch where
    /// [`prefer_persistent`] says so and the kernel takes the list, else cuBLAS over 4 streams.
    /// For skewed routing: cuBLAS's kernels are fastest on a large expert, and the small ones
    /// then overlap without it.
    Hybrid(usize),
    /// The layers' default, chosen per call from measurements (docs/performance.md): one
    /// `cublasGemmStridedBatchedEx` when every problem that computes has the same shape and
    /// evenly strided `A`, `B`, `C` (uniform routing); else, for many small experts
    /// ([`prefer_persistent`]), [`Strategy::Hybrid`]`(`[`AUTO_HYBRID_WAVES`]`)`: the persistent
    /// kernel (where the list is eligible) with any expert that fills the GPU for 2 waves on its
    /// own taken out to cuBLAS; else [`Strategy::MultiStream`]`(4)` (not a graph: with routing
    /// that changes every step a graph would be re-captured per call, which measured no faster
    /// than issuing the streams directly).
    #[default]
    Auto,
}

impl Strategy {
    /// The accepted label forms, for messages.
    pub const FORMS: &'static str =
        "auto, persistent, persistent128, persistent256, hybridN, loop, msN, mtN, graphN or gbatched (N > 0)";

    /// A short label (`loop`, `ms4`, `mt4`, `graph4`, `gbatched`, `persistent`,
    /// `persistent128`, `hybrid2`, `auto`).
    pub fn label(&self) -> String {
        match self {
            Strategy::Loop => "loop".into(),
            Strategy::MultiStream(s) => format!("ms{s}"),
            Strategy::Threads(s) => format!("mt{s}"),
            Strategy::Graph(s) => format!("graph{s}"),
            Strategy::GroupedBatched => "gbatched".into(),
            Strategy::Persistent(0) => "persistent".into(),
            Strategy::Persistent(n) => format!("persistent{n}"),
            Strategy::Hybrid(w) => format!("hybrid{w}"),
            Strategy::Auto => "auto".into(),
        }
    }

    /// Parses [`Strategy::label`].
    pub fn parse(s: &str) -> Option<Strategy> {
        let count = |rest: &str| rest.parse().ok().filter(|&n: &usize| n > 0);
        match s {
            "loop" => Some(Strategy::Loop),
            "gbatched" => Some(Strategy::GroupedBatched),
            "auto" => Some(Strategy::Auto),
            "persistent" => Some(Strategy::Persistent(0)),
            _ => {
                if let Some(n) = s.strip_prefix("persistent") {
                    n.parse().ok().filter(|n| TILE_N.contains(n)).map(Strategy::Persistent)
                } else if let Some(w) = s.strip_prefix("hybrid") {
                    count(w).map(Strategy::Hybrid)
                } else if let Some(n) = s.strip_prefix("ms") {
                    count(n).map(Strategy::MultiStream)
                } else if let Some(n) = s.strip_prefix("mt") {
                    count(n).map(Strategy::Threads)
                } else if let Some(n) = s.strip_prefix("graph") {
                    count(n).map(Strategy::Graph)
                } else {
                    None
                }
            }
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// [`Strategy::parse`] for command-line parsers; the error names the value and the accepted
/// forms.
impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Strategy, String> {
        Strategy::parse(s.trim()).ok_or_else(|| format!("{s:?} is not a GEMM strategy (expected {})", Strategy::FORMS))
    }
}

/// The output-tile width of the persistent kernel for a problem list: 256 (better operand
/// reuse; measured at least as fast as 128 on every model-shape row, docs/performance.md) unless
/// the 256-wide tiles would not cover the SMs once, where the narrower tile spreads the work
/// wider.
pub fn choose_tile_n<P>(problems: &[GemmProblem<P>], sms: usize) -> usize {
    let tiles: usize =
        problems.iter().filter(|p| p.m > 0 && p.n > 0).map(|p| p.m.div_ceil(TILE_M) * p.n.div_ceil(256)).sum();
    if tiles >= sms {
        256
    } else {
        128
    }
}

/// Whether `p` keeps the GPU busy on its own, for [`Strategy::Hybrid`]: at least `waves` waves
/// of 128 x 256 output tiles over `sms` multiprocessors, and a contraction of at least
/// [`HYBRID_MIN_K`] (16 k-steps of 64, so a tile's epilogue, which cuBLAS does not overlap with
/// the next tile, is a small part of it). Such a GEMM runs on cuBLAS at about the dense rate;
/// smaller ones leave SMs idle or spend their time in epilogues, which the persistent kernel
/// overlaps across experts.
pub fn fills_gpu_alone<P>(p: &GemmProblem<P>, waves: usize, sms: usize) -> bool {
    p.k >= HYBRID_MIN_K && p.m.div_ceil(TILE_M) * p.n.div_ceil(256) >= waves * sms
}

/// Whether [`Strategy::Auto`] should run a non-uniform list on the persistent kernel rather
/// than cuBLAS on several streams. Measured (docs/performance.md, H100): the kernel wins where
/// experts are many and small — the mean expert GEMM under 8·10⁹ multiply-adds (Qwen3-30B-A3B,
/// GPT-OSS-120B) — as long as each output tile has enough k-steps to hide its epilogue (mean k
/// of at least 384; GPT-OSS's weight gradients with 256 tokens per expert stay on cuBLAS). Few
/// large experts (Mixtral, DeepSeek-V3) fill the GPU one cuBLAS GEMM at a time, which is faster.
pub fn prefer_persistent<P>(problems: &[GemmProblem<P>]) -> bool {
    let computing: Vec<&GemmProblem<P>> = problems.iter().filter(|p| p.computes()).collect();
    if computing.is_empty() {
        return false;
    }
    let n = computing.len() as f64;
    let mean_macs = computing.iter().map(|p| p.m as f64 * p.n as f64 * p.k as f64).sum::<f64>() / n;
    let mean_k = computing.iter().map(|p| p.k as f64).sum::<f64>() / n;
    mean_macs < 8e9 && mean_k >= 384.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_labels_round_trip() {
        for s in [
            Strategy::Loop,
            Strategy::MultiStream(4),
            Strategy::Graph(8),
            Strategy::Threads(2),
            Strategy::GroupedBatched,
            Strategy::Persistent(0),
            Strategy::Persistent(256),
            Strategy::Hybrid(2),
            Strategy::Auto,
        ] {
            assert_eq!(Strategy::parse(&s.label()), Some(s));
            assert_eq!(s.label().parse::<Strategy>(), Ok(s));
        }
        assert_eq!(Strategy::parse("persistent64"), None);
        assert_eq!(Strategy::parse("ms0"), None);
        assert_eq!(Strategy::parse("hybrid0"), None);
        assert_eq!(Strategy::parse("nope"), None);
        let err = "ms-four".parse::<Strategy>().unwrap_err();
        assert!(err.contains("\"ms-four\" is not a GEMM strategy") && err.contains("msN"), "{err}");
        assert_eq!(" ms4 ".parse::<Strategy>(), Ok(Strategy::MultiStream(4)));
    }

    /// The weight-gradient orientation both the layers and the GEMM-set bench use: `[out, in]`
    /// weights take out_sideᵀ·in_side, GroupedMLP's `[in, out]` blocks in_sideᵀ·out_side; the
    /// contraction is over the expert's token rows either way.
    #[test]
    fn wgrad_problem_orients_by_weight_layout() {
        let (out_side, in_side) = ((0x1000u64, 4), (0x2000u64, 6));
        let te = wgrad_problem(out_side, in_side, 0x3000, 5, true);
        assert_eq!((te.m, te.n, te.k, te.a, te.b, te.c), (4, 6, 5, 0x1000, 0x2000, 0x3000));
        let grouped = wgrad_problem(out_side, in_side, 0x3000, 5, false);
        assert_eq!(
            (grouped.m, grouped.n, grouped.k, grouped.a, grouped.b, grouped.c),
            (6, 4, 5, 0x2000, 0x1000, 0x3000)
        );
    }

    /// The hybrid split at the DeepSeek-V3 shape on a 132-SM H100: fc1 (n = 2·2048, k = 7168)
    /// of an expert with 2176 tokens is 17 x 16 = 272 tiles, two waves; one with 2048 tokens
    /// is 256 tiles, under two; a weight gradient with 512 tokens is short in k however many
    /// tiles it has.
    #[test]
    fn fills_gpu_alone_counts_waves_of_tiles_and_needs_a_long_contraction() {
        let p = GemmProblem::dims;
        assert!(fills_gpu_alone(&p(2176, 4096, 7168), 2, 132));
        assert!(!fills_gpu_alone(&p(2048, 4096, 7168), 2, 132));
        assert!(fills_gpu_alone(&p(2048, 4096, 7168), 1, 132));
        assert!(!fills_gpu_alone(&p(4096, 7168, 512), 1, 132));
        assert!(fills_gpu_alone(&p(4096, 7168, HYBRID_MIN_K), 1, 132));
        assert!(!fills_gpu_alone(&p(0, 4096, 7168), 1, 132));
    }

    #[test]
    fn tile_width_follows_the_waves() {
        let p = |m, n| GemmProblem::dims(m, n, 64);
        // One 128x256 tile cannot cover 132 SMs: narrow tiles.
        assert_eq!(choose_tile_n(&[p(128, 256)], 132), 128);
        assert_eq!(choose_tile_n(&[p(4096, 4096); 8], 132), 256);
    }

    /// The Auto policy on the model shapes' Zipf lists (the sizes of the shape registry's bench
    /// distributions): many small experts go to the kernel, few large ones and short-k weight
    /// gradients stay on cuBLAS.
    #[test]
    fn auto_prefers_the_kernel_for_many_small_experts() {
        let fwd = |rows: &[usize], n, k| -> Vec<GemmProblem<()>> {
            rows.iter().map(|&m| GemmProblem::dims(m, n, k)).collect()
        };
        let wgrad = |rows: &[usize], m, n| -> Vec<GemmProblem<()>> {
            rows.iter().map(|&k| GemmProblem::dims(m, n, k)).collect()
        };
        let qwen: Vec<usize> = (0..128).map(|e| if e < 8 { 0 } else { 512 + e }).collect();
        let gptoss: Vec<usize> = (0..128).map(|e| if e < 8 { 0 } else { 256 + e }).collect();
        let mixtral = [0, 7616, 3000, 2000, 1500, 1200, 1068, 0];
        assert!(prefer_persistent(&fwd(&qwen, 1536, 2048)));
        assert!(prefer_persistent(&wgrad(&qwen, 1536, 2048)));
        assert!(prefer_persistent(&fwd(&gptoss, 5760, 2880)));
        assert!(!prefer_persistent(&wgrad(&gptoss, 5760, 2880)));
        assert!(!prefer_persistent(&fwd(&mixtral, 28672, 4096)));
        assert!(!prefer_persistent(&fwd(&[0, 0], 64, 64)));
    }
}
