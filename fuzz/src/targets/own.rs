//! moe-verify's own formats: expert dumps and checkpoint directories (index and parts).

use super::{scratch, test_data, Allowance, Outcome, Restore, Target};
use anyhow::Context;
use moe_checkpoint::format::Checkpoint;
use moe_checkpoint::sharded::ExpertLayout;
use moe_checkpoint::tensor::raw_state_dict;
use moe_checkpoint::{save, SaveOptions, SavePart};
use moe_harness::dump::Dump;
use moe_reference::{to_state_dict, Dtype, ExpertSet, Inputs, LayerClass, LayerConfig, Parallelism, Reference};
use ndarray::{Array1, Array2};
use std::path::{Path, PathBuf};

/// moe-expert-dump files ([`Dump::from_bytes`]): the PyTorch-written dumps of `tests/data`
/// (real files from an H100 run) and reference-written ones of every class (their headers'
/// keys sorted, see [`sorted_header`]).
pub struct DumpReader {
    corpus: Vec<Vec<u8>>,
}

impl DumpReader {
    /// Loads the corpus.
    pub fn new() -> anyhow::Result<DumpReader> {
        let mut corpus = Vec::new();
        let mut paths: Vec<PathBuf> =
            std::fs::read_dir(test_data())?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
        paths.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
        paths.sort();
        for path in paths {
            corpus.push(std::fs::read(&path).with_context(|| path.display().to_string())?);
        }
        for class in LayerClass::ALL {
            let cfg = LayerConfig {
                class,
                num_experts: 3,
                hidden_size: 8,
                ffn_hidden_size: 4,
                add_bias: class != LayerClass::Grouped,
                params_dtype: Dtype::Bf16,
                parallel: Parallelism::SINGLE,
                ..LayerConfig::example()
            };
            let weights = ExpertSet::random(&cfg, 7);
            let sd = to_state_dict(&cfg, &weights)?;
            let tokens = vec![2i64, 0, 3];
            let t = tokens.iter().sum::<i64>() as usize;
            let inputs = Inputs {
                hidden_states: Array2::from_shape_fn((t, 8), |(i, j)| (i * 8 + j) as f64 / 16.0 - 1.0),
                tokens_per_expert: tokens,
                probs: Array1::from_elem(t, 0.5),
            };
            let grad = Array2::from_elem((t, 8), 0.25);
            let dump = Dump::from_reference(&cfg, sd, inputs, Some(grad), Reference::EMULATED)?;
            corpus.push(sorted_header(dump.to_bytes()?)?);
        }
        Ok(DumpReader { corpus })
    }
}

/// `file` (a safetensors file) with the keys of its JSON header in sorted order, padded with
/// spaces to the same length. The dump writer passes its metadata to the safetensors crate as a
/// `HashMap`, so the key order of a written header changes from process to process; without
/// this the corpus, and so input `i` of a seed, would too, and a run could not be reproduced.
fn sorted_header(mut file: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let n = u64::from_le_bytes(file.get(..8).context("a safetensors file")?.try_into()?) as usize;
    let header = file.get(8..8 + n).context("a safetensors header")?;
    // serde_json's map is a BTreeMap (no `preserve_order`): serializing sorts the keys.
    let sorted = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(header)?)?;
    anyhow::ensure!(sorted.len() <= n, "the sorted header is longer than the written one");
    file[8..8 + sorted.len()].copy_from_slice(&sorted);
    file[8 + sorted.len()..8 + n].fill(b' ');
    Ok(file)
}

impl Target for DumpReader {
    fn name(&self) -> &'static str {
        "dump"
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    fn run(&self, _origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        Ok(match Dump::from_bytes(input, "fuzz.safetensors") {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Refused(e.to_string()),
        })
    }
}

/// moe-verify checkpoints ([`Checkpoint::open`], then `verify` and `load_global`): a directory
/// written by the project's own writer (SequentialMLP GLU at TP 2 × EP 2, and a singleton
/// GroupedMLP), one of whose files (the index or a part) is replaced by the mutated input.
pub struct CheckpointReader {
    dir: tempfile::TempDir,
    /// `(path in dir, original bytes)` per corpus entry.
    files: Vec<PathBuf>,
    corpus: Vec<Vec<u8>>,
    total_bytes: usize,
}

impl CheckpointReader {
    /// Writes the corpus checkpoints into a temporary directory.
    pub fn new() -> anyhow::Result<CheckpointReader> {
        let dir = scratch()?;
        let mut files = Vec::new();
        let mut corpus = Vec::new();
        let mut total_bytes = 0;
        for (name, class, tp, ep, singleton) in
            [("seq", LayerClass::Sequential, 2, 2, false), ("grouped", LayerClass::Grouped, 1, 2, true)]
        {
            let config = LayerConfig {
                class,
                num_experts: 4,
                hidden_size: 8,
                ffn_hidden_size: 8,
                gated_linear_unit: true,
                add_bias: false,
                params_dtype: Dtype::Bf16,
                parallel: Parallelism { tp_size: tp, ep_size: ep, ..Parallelism::SINGLE },
                ..LayerConfig::example()
            };
            let layout = ExpertLayout { singleton, ..ExpertLayout::new(config) };
            let global = ExpertSet::random(&layout.layer_config(layout.ranks()[0], Dtype::Bf16).unsharded(), 3);
            let states = layout
                .ranks()
                .iter()
                .map(|&c| {
                    let cfg = layout.layer_config(c, Dtype::Bf16);
                    let sd = to_state_dict(&cfg, &global.shard(&cfg)?)?;
                    Ok(raw_state_dict(&sd, Dtype::Bf16)?)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ranks = layout.ranks();
            let parts: Vec<SavePart> =
                ranks.iter().zip(&states).map(|(c, s)| SavePart { layout: &layout, rank: *c, state: s }).collect();
            let ckpt = dir.path().join(name);
            save(&ckpt, &parts, &SaveOptions::default())?;
            let mut names: Vec<PathBuf> =
                std::fs::read_dir(&ckpt)?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
            names.sort();
            for path in names {
                let bytes = std::fs::read(&path)?;
                total_bytes += bytes.len();
                files.push(path);
                corpus.push(bytes);
            }
        }
        Ok(CheckpointReader { dir, files, corpus, total_bytes })
    }
}

/// The index file of a moe-verify checkpoint.
const INDEX_NAME: &str = "index.json";

impl CheckpointReader {
    /// Rewrites `index`'s record of `part` to `part`'s new size and header CRC (as the reader
    /// computes it: the 8-byte length and the JSON header); false when the mutated part has no
    /// header length that fits, so no consistent record exists.
    fn fix_up_index(&self, index: &Path, part: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
        if bytes.len() < 8 {
            return Ok(false);
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        if n > bytes.len() - 8 {
            return Ok(false);
        }
        let i = self.files.iter().position(|f| f == index).expect("the index is in the corpus");
        let mut v: serde_json::Value = serde_json::from_slice(&self.corpus[i])?;
        let name = part.file_name().and_then(|n| n.to_str()).expect("a UTF-8 file name");
        let files = v["files"].as_array_mut().context("index without files")?;
        let record = files.iter_mut().find(|f| f["name"] == name).context("part not in the index")?;
        record["bytes"] = bytes.len().into();
        record["header_crc32"] = crc32fast::hash(&bytes[..8 + n]).into();
        std::fs::write(index, serde_json::to_vec(&v)?)?;
        Ok(true)
    }
}

impl Target for CheckpointReader {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    /// A mutated part is paired, for half of the inputs (by the parity of its CRC), with an
    /// index whose record for it matches its new size and header CRC: otherwise nearly every
    /// mutated part would stop at the CRC check and the header and shard validation behind it
    /// would never see a hostile header.
    fn run(&self, origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        let path = &self.files[origin];
        let ckpt_dir = path.parent().expect("a file in a checkpoint directory");
        debug_assert!(ckpt_dir.starts_with(self.dir.path()));
        let index = ckpt_dir.join(INDEX_NAME);
        let i = self.files.iter().position(|f| f == &index).expect("the index is in the corpus");
        let mut restore = Restore { files: vec![(path.as_path(), self.corpus[origin].as_slice())] };
        std::fs::write(path, input)?;
        if path != &index && crc32fast::hash(input) & 1 == 0 && self.fix_up_index(&index, path, input)? {
            restore.files.push((index.as_path(), self.corpus[i].as_slice()));
        }
        let outcome = match Checkpoint::open(ckpt_dir).and_then(|c| {
            c.verify()?;
            c.load_global(false)
        }) {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Refused(e.to_string()),
        };
        drop(restore);
        Ok(outcome)
    }

    /// The directory holds the other files unchanged, so the allowance is the default one for
    /// the whole checkpoint with the mutated file in it.
    fn allowance(&self, origin: usize, input_len: usize) -> Allowance {
        let n = self.total_bytes - self.corpus[origin].len() + input_len;
        Allowance::per_byte(n, 16, 1 << 20, 64, 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why: input `i` of a seed is a mutation of the corpus bytes; a corpus that changes from
    /// one construction to the next (the dump writer's metadata comes out of a `HashMap`) makes
    /// a run irreproducible, and a saved failure's seed and input number useless.
    #[test]
    fn the_dump_corpus_is_the_same_bytes_every_time() {
        let a = DumpReader::new().unwrap();
        for _ in 0..4 {
            assert!(DumpReader::new().unwrap().corpus == a.corpus, "the dump corpus changed between constructions");
        }
    }
}
