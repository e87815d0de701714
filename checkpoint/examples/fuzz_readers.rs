//! Mutation fuzzing of the `torch_dist` readers on stable Rust (not run in CI; `scripts/fuzz.sh`).
//!
//! Corpus: the real files of `tests/data/torch_dist/` — every `.metadata` pickle, and every
//! tensor item of every `.distcp` file (the byte range its `_StorageInfo` names, with the dtype
//! and chunk shape the metadata gives it). Each input is a corpus file mutated by a seeded
//! generator (byte flips, interesting values in 1/2/4/8-byte windows, truncation, deletion,
//! duplication and splicing of ranges, and for pickles opcode replacement), then handed to
//! [`dcp::parse_metadata`] or [`archive::read_tensor`]. Per input the runner checks:
//!
//! * no panic (`catch_unwind`; the input is written to `fuzz-crash-*.bin` and counted);
//! * no hang (a watchdog thread aborts the run naming the input when one takes over 10 s);
//! * no allocation larger than the input justifies: a counting global allocator records the
//!   largest single allocation and the peak live bytes while the reader runs; with `n` = input
//!   bytes + the chunk's byte size (what a distcp item legitimately decodes to), the largest
//!   allocation must stay under `16 n + 64 KiB` and the peak under `256 n + 1 MiB` (a pickle
//!   builds a tree of values, linear in its size).
//!
//! A third target is moe-verify's own format: a small checkpoint (SequentialMLP, E = 4, GLU, bias,
//! EP 2, written by [`moe_checkpoint::save`]) whose `index.json` or one safetensors part is
//! mutated, written to a scratch directory and opened, verified (every CRC) and loaded
//! ([`Checkpoint::open`], [`Checkpoint::verify`], [`Checkpoint::load_global`]); its budget `n`
//! is the size of the whole checkpoint.
//!
//! Usage: `cargo run --release -p moe-checkpoint --example fuzz_readers -- [ITERATIONS] [SEED]
//! [READERS]` (ITERATIONS per reader, default 1 000 000; READERS a comma list of `metadata`,
//! `distcp`, `own`, default all three).

use moe_checkpoint::sharded::from_canonical;
use moe_checkpoint::torch_dist::{archive, dcp};
use moe_checkpoint::{save, Checkpoint, ExpertLayout, RawTensor, SaveOptions, SavePart};
use moe_reference::{Dtype, LayerClass, LayerConfig, Parallelism};
use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live bytes, their peak and the largest single allocation (this binary only).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the same layout; the counters are
// atomics and never affect the returned memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged (caller's contract).
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged (caller's contract).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            let live = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: forwarded unchanged (caller's contract).
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// xorshift64*: seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX, 1 << 40];
/// Pickle opcodes the reader knows, for structure mutations.
const OPCODES: &[u8] = b"\x80\x95.(012NJKMIGXCUBT)t\x85\x86\x87]lae}dsu\x8f\x90\x91c\x93R\x81\x92bQqr\x94phjg\x88\x89\x8a\x8b\x8c\x8d\x8e\x96";

fn mutate(rng: &mut Rng, base: &[u8], other: &[u8], pickle: bool) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(if pickle { 8 } else { 7 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = rng.next() as u8;
            }
            2 if n > 0 => {
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(n);
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let k = w.min(n - i);
                v[i..i + k].copy_from_slice(&x[..k]);
            }
            3 => v.truncate(rng.below(n + 1)),
            4 if n > 0 => {
                let a = rng.below(n);
                let b = (a + rng.below(64)).min(n);
                v.drain(a..b);
            }
            5 if n > 0 => {
                let a = rng.below(n);
                let b = (a + rng.below(64)).min(n);
                let piece = v[a..b].to_vec();
                let at = rng.below(n + 1);
                v.splice(at..at, piece);
            }
            6 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = (a + rng.below(256)).min(other.len());
                let at = rng.below(n + 1);
                let end = (at + (b - a)).min(n);
                v.splice(at..end, other[a..b].iter().copied());
            }
            7 if n > 0 => {
                let i = rng.below(n);
                v[i] = OPCODES[rng.below(OPCODES.len())];
            }
            _ => {}
        }
    }
    v
}

struct Item {
    bytes: Vec<u8>,
    dtype: Dtype,
    shape: Vec<usize>,
}

fn corpus(root: &Path) -> (Vec<Vec<u8>>, Vec<Item>) {
    let mut metas = Vec::new();
    let mut items = Vec::new();
    let mut dirs: Vec<_> =
        std::fs::read_dir(root).expect("tests/data/torch_dist").flatten().map(|e| e.path()).collect();
    dirs.sort();
    for d in dirs {
        if d.ends_with("bad") {
            let mut bad: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().map(|e| e.path()).collect();
            bad.sort();
            metas.extend(bad.iter().map(|p| std::fs::read(p).unwrap()));
            continue;
        }
        let m = std::fs::read(d.join(".metadata")).unwrap();
        let meta = dcp::parse_metadata(&m).expect("corpus metadata parses");
        metas.push(m);
        for (key, t) in &meta.tensors {
            let Some(dtype) = dcp::torch_dtype(&t.dtype) else { continue };
            for c in &t.chunks {
                let si = &meta.storage[&(key.clone(), c.offsets.clone())];
                let file = std::fs::read(d.join(&si.relative_path)).unwrap();
                let bytes = file[si.offset as usize..(si.offset + si.length) as usize].to_vec();
                items.push(Item { bytes, dtype, shape: c.sizes.clone() });
            }
        }
    }
    (metas, items)
}

/// Writes a small moe-verify checkpoint into `dir`; returns its files (name, bytes).
fn own_checkpoint(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let config = LayerConfig {
        class: LayerClass::Sequential,
        num_experts: 4,
        hidden_size: 4,
        ffn_hidden_size: 4,
        gated_linear_unit: true,
        add_bias: true,
        parallel: Parallelism { ep_size: 2, ..Parallelism::SINGLE },
        ..LayerConfig::example()
    };
    let layout = ExpertLayout::new(config);
    let shapes = [vec![8, 4], vec![8], vec![4, 4], vec![4]];
    let mut states = Vec::new();
    for rank in layout.ranks() {
        let el = layout.local_experts();
        let rows = (0..el)
            .map(|e| {
                std::array::from_fn(|p| {
                    let shape = shapes[p].clone();
                    let n: usize = shape.iter().product();
                    let data = (0..n * 4).map(|i| (i + 7 * e + 31 * rank.ep_rank + p) as u8).collect();
                    Some(Cow::Owned(RawTensor { dtype: Dtype::F32, shape, data }))
                })
            })
            .collect();
        states.push((rank, from_canonical(&layout, rows)));
    }
    let parts: Vec<SavePart> = states.iter().map(|(r, s)| SavePart { layout: &layout, rank: *r, state: s }).collect();
    save(dir, &parts, &SaveOptions { force: true, ..SaveOptions::default() }).expect("save the corpus checkpoint");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[derive(Default, Debug)]
struct Stats {
    inputs: u64,
    ok: u64,
    errors: u64,
    panics: u64,
    over_budget: u64,
    max_single_ratio: f64,
    max_peak_ratio: f64,
    max_time: Duration,
}

fn run_one(stats: &mut Stats, input: &[u8], extra: usize, what: &str, n: u64, f: impl FnOnce() -> bool) {
    LARGEST.store(0, Ordering::Relaxed);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t0 = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let dt = t0.elapsed();
    let n_bytes = input.len() + extra;
    let single = LARGEST.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    stats.inputs += 1;
    stats.max_time = stats.max_time.max(dt);
    stats.max_single_ratio = stats.max_single_ratio.max(single as f64 / n_bytes.max(1) as f64);
    stats.max_peak_ratio = stats.max_peak_ratio.max(peak as f64 / n_bytes.max(1) as f64);
    if single > 16 * n_bytes + (64 << 10) || peak > 256 * n_bytes + (1 << 20) {
        let used = single.max(peak);
        stats.over_budget += 1;
        let p = format!("fuzz-alloc-{what}-{n}.bin");
        std::fs::write(&p, input).unwrap();
        eprintln!("ALLOC {what} input {n}: {used} bytes for a {}-byte input (saved {p})", input.len());
    }
    match r {
        Ok(true) => stats.ok += 1,
        Ok(false) => stats.errors += 1,
        Err(_) => {
            stats.panics += 1;
            let p = format!("fuzz-crash-{what}-{n}.bin");
            std::fs::write(&p, input).unwrap();
            eprintln!("PANIC {what} input {n} (saved {p})");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters: u64 = args.get(1).map(|s| s.parse().expect("ITERATIONS")).unwrap_or(1_000_000);
    let seed: u64 = args.get(2).map(|s| s.parse().expect("SEED")).unwrap_or(0x5eed);
    let readers = args.get(3).cloned().unwrap_or_else(|| "metadata,distcp,own".into());
    let on = |r: &str| readers.split(',').any(|x| x == r);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/torch_dist");
    let (metas, items) = corpus(&root);
    println!("corpus: {} .metadata files, {} .distcp tensor items", metas.len(), items.len());
    std::panic::set_hook(Box::new(|_| {}));
    // Watchdog: the current input's start time; abort when one input runs over 10 s.
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let epoch = Instant::now();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = STARTED.load(Ordering::Relaxed);
        if s != 0 && epoch.elapsed().as_millis() as u64 > s + 10_000 {
            eprintln!("HANG: one input ran over 10 s");
            std::process::abort();
        }
    });
    let mark = || STARTED.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    let mut rng = Rng(seed | 1);
    let mut m = Stats::default();
    for n in 0..if on("metadata") { iters } else { 0 } {
        let a = &metas[rng.below(metas.len())];
        let b = &metas[rng.below(metas.len())];
        let input = mutate(&mut rng, a, b, true);
        mark();
        run_one(&mut m, &input, 0, "metadata", n, || dcp::parse_metadata(&input).is_ok());
    }
    println!(".metadata reader: {m:?}");
    let mut d = Stats::default();
    for n in 0..if on("distcp") { iters } else { 0 } {
        let it = &items[rng.below(items.len())];
        let other = &items[rng.below(items.len())].bytes;
        let input = mutate(&mut rng, &it.bytes, other, false);
        let chunk_bytes = it.shape.iter().product::<usize>() * it.dtype.size_bytes();
        mark();
        run_one(&mut d, &input, chunk_bytes, "distcp", n, || {
            archive::read_tensor(Cursor::new(&input), 0, input.len() as u64, it.dtype, &it.shape).is_ok()
        });
    }
    println!(".distcp item reader: {d:?}");
    let scratch = std::env::temp_dir().join(format!("moe-verify-fuzz-{}", std::process::id()));
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|i| eprintln!("{i}")));
    std::fs::create_dir_all(&scratch).unwrap();
    let files = own_checkpoint(&scratch.join("orig"));
    std::panic::set_hook(quiet);
    let total: usize = files.iter().map(|f| f.1.len()).sum();
    let work = scratch.join("work");
    std::fs::create_dir_all(&work).unwrap();
    for (name, bytes) in &files {
        std::fs::write(work.join(name), bytes).unwrap();
    }
    let mut o = Stats::default();
    for n in 0..if on("own") { iters } else { 0 } {
        let (name, base) = &files[rng.below(files.len())];
        let (_, other) = &files[rng.below(files.len())];
        let input = mutate(&mut rng, base, other, false);
        std::fs::write(work.join(name), &input).unwrap();
        mark();
        run_one(&mut o, &input, total, "own", n, || {
            Checkpoint::open(&work).and_then(|c| c.verify().and_then(|_| c.load_global(true))).is_ok()
        });
        std::fs::write(work.join(name), base).unwrap();
    }
    println!("moe-verify format reader (index.json and parts): {o:?}");
    let _ = std::fs::remove_dir_all(&scratch);
    STARTED.store(0, Ordering::Relaxed);
    if m.panics + d.panics + o.panics + m.over_budget + d.over_budget + o.over_budget > 0 {
        std::process::exit(1);
    }
}
