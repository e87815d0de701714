//! Megatron `torch_dist` checkpoints: the `.metadata` pickle and the tensor items of the
//! `.distcp` files (each a small zip archive holding one tensor's storage).

use super::{test_data, Allowance, Outcome, Target};
use crate::mutate;
use anyhow::Context;
use moe_checkpoint::torch_dist::{archive, dcp};
use moe_reference::Dtype;
use rand_chacha::ChaCha8Rng;
use std::io::Cursor;
use std::path::PathBuf;

/// The checkpoint directories of `tests/data/torch_dist/` (written by megatron-core), sorted,
/// and the hand-made bad `.metadata` files of its `bad/`.
fn fixtures() -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let root = test_data().join("torch_dist");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| root.display().to_string())?
        .map(|e| Ok(e?.path()))
        .collect::<anyhow::Result<_>>()?;
    dirs.sort();
    let mut bad = Vec::new();
    if let Some(i) = dirs.iter().position(|d| d.ends_with("bad")) {
        let b = dirs.remove(i);
        bad = std::fs::read_dir(&b)?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
        bad.sort();
    }
    Ok((dirs, bad))
}

/// The `.metadata` reader ([`dcp::parse_metadata`], a restricted pickle reader): every
/// `.metadata` of `tests/data/torch_dist/`, with pickle-opcode mutations besides the byte ones.
pub struct MetadataReader {
    corpus: Vec<Vec<u8>>,
}

impl MetadataReader {
    /// Loads the corpus.
    pub fn new() -> anyhow::Result<MetadataReader> {
        let (dirs, bad) = fixtures()?;
        let mut corpus = Vec::new();
        for path in dirs.iter().map(|d| d.join(".metadata")).chain(bad) {
            corpus.push(std::fs::read(&path).with_context(|| path.display().to_string())?);
        }
        Ok(MetadataReader { corpus })
    }
}

impl Target for MetadataReader {
    fn name(&self) -> &'static str {
        "metadata"
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    fn mutate(&self, rng: &mut ChaCha8Rng, origin: usize) -> Vec<u8> {
        mutate::mutate_with(rng, &self.corpus[origin], &self.corpus, &[|r, v| mutate::pickle_opcode(r, v)])
    }

    fn run(&self, _origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        Ok(match dcp::parse_metadata(input) {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Refused(e.to_string()),
        })
    }

    /// A pickle builds a tree of values, linear in its size but with a node per opcode: the
    /// peak may reach 256× the input plus 1 MiB; the largest allocation stays within 16× plus
    /// 64 KiB (no single buffer a pickle can justify is larger).
    fn allowance(&self, _origin: usize, input_len: usize) -> Allowance {
        Allowance::per_byte(input_len, 16, 64 << 10, 256, 1 << 20)
    }
}

/// The `.distcp` item reader ([`archive::read_tensor`]): every tensor item of every `.distcp`
/// file of `tests/data/torch_dist/` (the byte range its `_StorageInfo` names), read with the
/// dtype and chunk shape the metadata gives it.
pub struct DistcpReader {
    corpus: Vec<Vec<u8>>,
    /// `(dtype, chunk shape)` per corpus entry.
    items: Vec<(Dtype, Vec<usize>)>,
}

impl DistcpReader {
    /// Cuts the items out of the fixtures.
    pub fn new() -> anyhow::Result<DistcpReader> {
        let (dirs, _) = fixtures()?;
        let mut corpus = Vec::new();
        let mut items = Vec::new();
        for d in dirs {
            let meta = dcp::parse_metadata(&std::fs::read(d.join(".metadata"))?)
                .map_err(|e| anyhow::anyhow!("{}: the corpus metadata does not parse: {e}", d.display()))?;
            for (key, t) in &meta.tensors {
                let Some(dtype) = dcp::torch_dtype(&t.dtype) else { continue };
                for c in &t.chunks {
                    let si = meta.storage.get(&(key.clone(), c.offsets.clone())).context("a chunk without storage")?;
                    let file = std::fs::read(d.join(&si.relative_path))?;
                    let bytes = file
                        .get(si.offset as usize..(si.offset + si.length) as usize)
                        .context("an item beyond its file")?
                        .to_vec();
                    corpus.push(bytes);
                    items.push((dtype, c.sizes.clone()));
                }
            }
        }
        Ok(DistcpReader { corpus, items })
    }
}

impl Target for DistcpReader {
    fn name(&self) -> &'static str {
        "distcp"
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    fn run(&self, origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        let (dtype, shape) = &self.items[origin];
        Ok(match archive::read_tensor(Cursor::new(input), 0, input.len() as u64, *dtype, shape) {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Refused(e.to_string()),
        })
    }

    /// `n` is the input plus the byte size of the chunk it should decode to (what an item
    /// legitimately yields); the largest allocation stays within 16 n + 64 KiB, the peak within
    /// 256 n + 1 MiB (the zip crate's directory structures).
    fn allowance(&self, origin: usize, input_len: usize) -> Allowance {
        let (dtype, shape) = &self.items[origin];
        let chunk = shape.iter().product::<usize>() * dtype.size_bytes();
        Allowance::per_byte(input_len + chunk, 16, 64 << 10, 256, 1 << 20)
    }
}
