//! Readers with planted bugs, for the runner's self-tests.

use super::{Allowance, Outcome, Target};

/// A reader with a planted bug, for the runner's self-tests (`fuzz/tests/self_test.rs`): each
/// must be caught by exactly the check named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planted {
    /// Panics on every input whose first byte is odd (the panic check).
    Panic,
    /// Sizes a buffer from the input's first 8 bytes as an untrusted length, up to 1 GiB
    /// (the largest-allocation check; its peak allowance is unlimited, so that check alone
    /// can see it).
    Allocation,
    /// Builds a list of 64 KiB pieces, as many as the input's first byte says (up to 16 MiB in all,
    /// no piece near the largest-allocation allowance: the peak check).
    Peak,
    /// Never returns (the watchdog).
    Hang,
}

/// The corpus and the reader of a [`Planted`] bug.
pub struct PlantedReader {
    bug: Planted,
    corpus: Vec<Vec<u8>>,
}

impl PlantedReader {
    /// A reader with `bug`, over a small corpus of 16-byte inputs.
    pub fn new(bug: Planted) -> PlantedReader {
        PlantedReader { bug, corpus: (0..4u8).map(|i| vec![i; 16]).collect() }
    }
}

impl Target for PlantedReader {
    fn name(&self) -> &'static str {
        match self.bug {
            Planted::Panic => "planted-panic",
            Planted::Allocation => "planted-allocation",
            Planted::Peak => "planted-peak",
            Planted::Hang => "planted-hang",
        }
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    fn run(&self, _origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        match self.bug {
            Planted::Panic => {
                if input.first().is_some_and(|b| b % 2 == 1) {
                    panic!("planted: odd first byte");
                }
            }
            Planted::Allocation => {
                let mut n = [0u8; 8];
                let k = input.len().min(8);
                n[..k].copy_from_slice(&input[..k]);
                let len = (u64::from_le_bytes(n) % (1 << 30)) as usize;
                let buf: Vec<u8> = Vec::with_capacity(len);
                std::hint::black_box(&buf);
            }
            Planted::Peak => {
                let count = usize::from(input.first().copied().unwrap_or(0));
                let pieces: Vec<Vec<u8>> = (0..count).map(|_| Vec::with_capacity(64 << 10)).collect();
                std::hint::black_box(&pieces);
            }
            Planted::Hang => loop {
                std::thread::sleep(std::time::Duration::from_millis(50));
            },
        }
        Ok(Outcome::Refused("planted reader".into()))
    }

    fn allowance(&self, _origin: usize, input_len: usize) -> Allowance {
        let default = Allowance::per_byte(input_len, 16, 1 << 20, 64, 1 << 20);
        match self.bug {
            Planted::Allocation => Allowance { peak: usize::MAX, ..default },
            _ => default,
        }
    }
}
