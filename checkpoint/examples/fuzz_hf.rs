//! Mutation fuzzing of the Hugging Face reader (`moe_checkpoint::hf::HfSource`) on stable Rust:
//! byte and structure mutations of the committed fixtures (`tests/data/hf/*`), each opened and,
//! when it opens, every expert tensor read. Fails on a panic, on an input that takes longer
//! than a second, or on an allocation larger than the input's size justifies (a counting
//! allocator records the largest single allocation; limit `64 × input bytes + 1 MiB`: a
//! dequantized MXFP4 byte becomes two f64s). Not run in CI: `scripts/fuzz-hf.sh`.
//!
//! ```text
//! cargo run --release -p moe-checkpoint --example fuzz_hf -- ITERATIONS SEED
//! ```

use moe_checkpoint::hf::HfSource;
use moe_checkpoint::ExpertSource;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The largest single allocation since the last reset (this tool's measurement; the library
/// has no process-wide state).
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One corpus entry: a fixture directory's files.
struct Seed {
    name: String,
    files: Vec<(String, Vec<u8>)>,
}

fn corpus(root: &Path) -> Vec<Seed> {
    let mut out = Vec::new();
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for d in dirs {
        let mut files = Vec::new();
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name != "expected.safetensors" {
                files.push((name, std::fs::read(&p).unwrap()));
            }
        }
        files.sort();
        out.push(Seed { name: d.file_name().unwrap().to_string_lossy().into_owned(), files });
    }
    out
}

const INTERESTING: [u64; 8] = [0, 1, 7, 8, 255, 65535, u32::MAX as u64, u64::MAX];

/// A structure mutation of a safetensors header: one tensor's dtype, shape or offsets.
fn mutate_header(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    if bytes.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let Some(h) = bytes.get(8..8 + n) else { return };
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice::<serde_json::Value>(h) else { return };
    let keys: Vec<String> = m.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if keys.is_empty() {
        return;
    }
    let k = &keys[rng.random_range(0..keys.len())];
    let t = m.get_mut(k).unwrap();
    match rng.random_range(0..6) {
        0 => {
            t["dtype"] =
                ["F8_E4M3", "U8", "BF16", "F32", "F64", "I64", "F8_E8M0", "BOOL"][rng.random_range(0..8)].into()
        }
        1 => {
            if let Some(s) = t["shape"].as_array_mut() {
                s.reverse();
            }
        }
        2 => {
            if let Some(s) = t["shape"].as_array_mut() {
                if !s.is_empty() {
                    let i = rng.random_range(0..s.len());
                    s[i] = INTERESTING[rng.random_range(0..INTERESTING.len())].into();
                }
            }
        }
        3 => {
            if let Some(s) = t["shape"].as_array_mut() {
                if rng.random_bool(0.5) {
                    s.push(rng.random_range(0..4u64).into());
                } else {
                    s.pop();
                }
            }
        }
        4 => {
            if let Some(o) = t["data_offsets"].as_array_mut() {
                let i = rng.random_range(0..2);
                o[i] = INTERESTING[rng.random_range(0..INTERESTING.len())].into();
            }
        }
        _ => {
            let v = m.remove(k).unwrap();
            let other = format!("{k}{}", ["", ".x", "_scale_inv", "_blocks", "_scales"][rng.random_range(0..5)]);
            m.insert(other.replace("experts.1.", "experts.9."), v);
        }
    }
    let h = serde_json::to_vec(&m).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&bytes[8 + n..]);
    *bytes = out;
}

/// A mutation of a JSON file (config.json, the index): a random value replaced or removed.
fn mutate_json(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return };
    let target = v.get_mut("weight_map").filter(|_| rng.random_bool(0.7));
    let obj = match target {
        Some(serde_json::Value::Object(o)) => o,
        _ => match &mut v {
            serde_json::Value::Object(o) => o,
            _ => return,
        },
    };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() {
        return;
    }
    let k = &keys[rng.random_range(0..keys.len())];
    match rng.random_range(0..4) {
        0 => {
            obj.remove(k);
        }
        1 => {
            obj.insert(k.clone(), serde_json::Value::Null);
        }
        2 => {
            obj.insert(k.clone(), "../../etc/passwd".into());
        }
        _ => {
            obj.insert(
                k.clone(),
                ["model-00009-of-00003.safetensors", "gpt_oss", "mixtral", ""][rng.random_range(0..4)].into(),
            );
        }
    }
    *bytes = serde_json::to_vec(&v).unwrap();
}

/// Byte mutations: flips, overwrites with interesting values, truncation, insertion.
fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut ChaCha8Rng) {
    if bytes.is_empty() {
        return;
    }
    // Favour the header (first 8 + n bytes): most of a file's structure is there.
    let hdr =
        bytes.len().min(8 + bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize).unwrap_or(0));
    let pos = |rng: &mut ChaCha8Rng, len: usize| {
        if rng.random_bool(0.7) && hdr > 0 {
            rng.random_range(0..hdr.min(len))
        } else {
            rng.random_range(0..len)
        }
    };
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let i = pos(rng, bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let i = pos(rng, bytes.len());
            bytes[i] = [b'"', b'{', b'}', b'[', b']', b',', b'0', b'9', b'-', 0, 0xFF][rng.random_range(0..11)];
        }
        2 => {
            let i = rng.random_range(0..bytes.len());
            bytes.truncate(i);
        }
        3 => {
            let i = pos(rng, bytes.len());
            let junk: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
            bytes.splice(i..i, junk);
        }
        _ => {
            let v = INTERESTING[rng.random_range(0..INTERESTING.len())].to_le_bytes();
            let i = rng.random_range(0..bytes.len().saturating_sub(8).max(1));
            let end = (i + 8).min(bytes.len());
            bytes[i..end].copy_from_slice(&v[..end - i]);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fuzz_hf ITERATIONS SEED [ALLOC_FACTOR]";
    let iterations: u64 = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    let seed: u64 = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let factor: usize = args.get(3).map(|a| a.parse().expect(usage)).unwrap_or(64);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/hf");
    let seeds = corpus(&root);
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let work = tempfile::tempdir_in(base).unwrap();
    let dir = work.path().join("ckpt");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut opened, mut rejected, mut read_tensors, mut read_errors) = (0u64, 0u64, 0u64, 0u64);
    let mut slowest = Duration::ZERO;
    let mut largest_abs = 0usize;
    let start = Instant::now();
    for it in 0..iterations {
        let s = &seeds[rng.random_range(0..seeds.len())];
        let mut files = s.files.clone();
        for _ in 0..rng.random_range(1..4) {
            let fi = rng.random_range(0..files.len());
            let (name, bytes) = &mut files[fi];
            match (name.ends_with(".json"), rng.random_range(0..3)) {
                (true, 0) => mutate_bytes(bytes, &mut rng),
                (true, _) => mutate_json(bytes, &mut rng),
                (false, 0) => mutate_header(bytes, &mut rng),
                (false, _) => mutate_bytes(bytes, &mut rng),
            }
        }
        if rng.random_bool(0.05) {
            let fi = rng.random_range(0..files.len());
            files.remove(fi);
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let mut total = 0usize;
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
            total += bytes.len();
        }
        LARGEST.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        let result = std::panic::catch_unwind(|| match HfSource::open(&dir, None) {
            Ok(src) => {
                let (mut ok, mut bad) = (0u64, 0u64);
                for e in src.entries() {
                    match src.read(e) {
                        Ok(v) => {
                            assert_eq!(v.shape(), e.shape, "{}: read shape differs from the listed one", e.location);
                            ok += 1;
                        }
                        Err(_) => bad += 1,
                    }
                }
                Some((ok, bad))
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
                None
            }
        });
        let took = t0.elapsed();
        slowest = slowest.max(took);
        let largest = LARGEST.load(Ordering::Relaxed);
        let keep = |why: &str| {
            let out = PathBuf::from(format!("fuzz-hf-failure-{seed}-{it}"));
            let _ = std::fs::remove_dir_all(&out);
            std::fs::create_dir_all(&out).unwrap();
            for (name, bytes) in &files {
                std::fs::write(out.join(name), bytes).unwrap();
            }
            eprintln!("iteration {it} (seed {seed}, from {}): {why}; input kept in {}", s.name, out.display());
            std::process::exit(1);
        };
        match result {
            Ok(Some((ok, bad))) => {
                opened += 1;
                read_tensors += ok;
                read_errors += bad;
            }
            Ok(None) => rejected += 1,
            Err(_) => keep("panic"),
        }
        if took > Duration::from_secs(1) {
            keep(&format!("took {took:?}"));
        }
        if largest > factor * total + (1 << 20) {
            keep(&format!("allocated {largest} bytes at once for {total} input bytes"));
        }
        largest_abs = largest_abs.max(largest);
    }
    println!(
        "{iterations} inputs (seed {seed}) in {:.1?}: {opened} opened ({read_tensors} tensors read, {read_errors} reads refused), \
         {rejected} rejected at open, 0 panics, slowest {slowest:?}, largest single allocation {largest_abs} bytes",
        start.elapsed()
    );
}
