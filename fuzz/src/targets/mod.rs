//! The readers under fuzz, each with its corpus of real files, its structure mutations and its
//! memory allowance.

mod hf;
mod own;
mod planted;
mod torch_dist;

pub use hf::HfReader;
pub use own::{CheckpointReader, DumpReader};
pub use planted::{Planted, PlantedReader};
pub use torch_dist::{DistcpReader, MetadataReader};

use crate::mutate;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// What one input did.
pub enum Outcome {
    /// The reader accepted it.
    Accepted,
    /// The reader refused it with an error (the message, for the report's examples).
    Refused(String),
}

/// The memory a reader may use for one input, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Allowance {
    /// The largest single allocation request.
    pub largest: usize,
    /// The peak of live heap bytes while the reader runs.
    pub peak: usize,
}

impl Allowance {
    /// `largest_per_byte · n + largest_extra` and `peak_per_byte · n + peak_extra` for `n` bytes
    /// the reader was given.
    pub fn per_byte(
        n: usize,
        largest_per_byte: usize,
        largest_extra: usize,
        peak_per_byte: usize,
        peak_extra: usize,
    ) -> Allowance {
        Allowance {
            largest: n.saturating_mul(largest_per_byte).saturating_add(largest_extra),
            peak: n.saturating_mul(peak_per_byte).saturating_add(peak_extra),
        }
    }
}

/// A reader of a file format under fuzz.
pub trait Target {
    /// Its name on the command line and in reports.
    fn name(&self) -> &'static str;
    /// The corpus: real files of the format (each mutation starts from one of them).
    fn corpus(&self) -> &[Vec<u8>];
    /// One mutant of corpus entry `origin`: byte mutations, plus the target's structure
    /// mutations where it has some.
    fn mutate(&self, rng: &mut ChaCha8Rng, origin: usize) -> Vec<u8> {
        mutate::mutate(rng, &self.corpus()[origin], self.corpus())
    }
    /// Reads `input`, a mutation of corpus entry `origin`.
    fn run(&self, origin: usize, input: &[u8]) -> anyhow::Result<Outcome>;
    /// The memory the reader may use for `input` (a mutation of `origin` of `input_len` bytes):
    /// what the bytes it is given can justify. Default: the largest allocation within 16× the
    /// input plus 1 MiB (a decoded copy of every tensor in `f64`, at most 8× the bytes of a bf16
    /// tensor, twice over), the peak within 64× plus 1 MiB (those copies and the parsed
    /// header, several at a time).
    fn allowance(&self, _origin: usize, input_len: usize) -> Allowance {
        Allowance::per_byte(input_len, 16, 1 << 20, 64, 1 << 20)
    }
}

/// `tests/data` of the repository.
fn test_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data")
}

/// A scratch directory, in memory where the machine has a tmpfs (directory targets write a
/// file or two per input).
fn scratch() -> anyhow::Result<tempfile::TempDir> {
    Ok(match Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm")?,
        false => tempfile::tempdir()?,
    })
}

/// Writes the original bytes of a corpus file back when dropped, so that the next input starts
/// from the unchanged directory even when the reader panicked on this one.
struct Restore<'a> {
    files: Vec<(&'a Path, &'a [u8])>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        for (path, bytes) in &self.files {
            if let Err(e) = std::fs::write(path, bytes) {
                eprintln!("cannot restore {}: {e}", path.display());
            }
        }
    }
}
