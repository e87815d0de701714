//! Hugging Face checkpoints ([`HfSource`]): `config.json`, the `model.safetensors.index.json`
//! where there is one, and the safetensors shards of the fixtures of `tests/data/hf/` (Mixtral,
//! fused Mixtral, Qwen3-MoE, DeepSeek-V3 and its FP8 form, GPT-OSS and its MXFP4 form).

use super::{scratch, test_data, Allowance, Outcome, Restore, Target};
use crate::mutate;
use anyhow::Context;
use moe_checkpoint::hf::HfSource;
use moe_checkpoint::ExpertSource;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// A copy of every fixture directory in a scratch directory; each input replaces one of its
/// files (an empty input: removes it), then the directory is opened with [`HfSource::open`] and
/// every listed expert tensor read. A tensor read with a shape other than the listed one is a
/// finding (a panic).
pub struct HfReader {
    _dir: tempfile::TempDir,
    /// The path of each corpus file in the scratch copy.
    files: Vec<PathBuf>,
    corpus: Vec<Vec<u8>>,
    /// The bytes of the directory each corpus file is in.
    dir_bytes: Vec<usize>,
}

impl HfReader {
    /// Copies the fixtures (without the `expected.safetensors` of the tests).
    pub fn new() -> anyhow::Result<HfReader> {
        let root = test_data().join("hf");
        let dir = scratch()?;
        let mut fixtures: Vec<PathBuf> = std::fs::read_dir(&root)
            .with_context(|| root.display().to_string())?
            .map(|e| Ok(e?.path()))
            .collect::<anyhow::Result<_>>()?;
        fixtures.retain(|p| p.is_dir());
        fixtures.sort();
        let (mut files, mut corpus, mut dir_bytes) = (Vec::new(), Vec::new(), Vec::new());
        for fixture in fixtures {
            let copy = dir.path().join(fixture.file_name().context("a fixture name")?);
            std::fs::create_dir(&copy)?;
            let mut names: Vec<PathBuf> =
                std::fs::read_dir(&fixture)?.map(|e| Ok(e?.path())).collect::<anyhow::Result<_>>()?;
            names.retain(|p| !p.ends_with("expected.safetensors"));
            names.sort();
            let first = files.len();
            let mut total = 0;
            for path in names {
                let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
                let to = copy.join(path.file_name().context("a file name")?);
                std::fs::write(&to, &bytes)?;
                total += bytes.len();
                files.push(to);
                corpus.push(bytes);
            }
            dir_bytes.extend(std::iter::repeat_n(total, files.len() - first));
        }
        Ok(HfReader { _dir: dir, files, corpus, dir_bytes })
    }
}

impl Target for HfReader {
    fn name(&self) -> &'static str {
        "hf"
    }

    fn corpus(&self) -> &[Vec<u8>] {
        &self.corpus
    }

    /// Besides the byte mutations: a safetensors tensor's dtype, shape, rank, offsets or name
    /// edited in the parsed header; a JSON value of the config or the index removed, nulled or
    /// pointed elsewhere; the file removed (one draw in 13).
    fn mutate(&self, rng: &mut ChaCha8Rng, origin: usize) -> Vec<u8> {
        let extra: &[mutate::Extra] = &[mutate::safetensors_entry, mutate::json_value, mutate::remove_file];
        mutate::mutate_with(rng, &self.corpus[origin], &self.corpus, extra)
    }

    fn run(&self, origin: usize, input: &[u8]) -> anyhow::Result<Outcome> {
        let path = &self.files[origin];
        let _restore = Restore { files: vec![(path.as_path(), self.corpus[origin].as_slice())] };
        if input.is_empty() {
            std::fs::remove_file(path)?;
        } else {
            std::fs::write(path, input)?;
        }
        let dir = path.parent().expect("a file in a fixture directory");
        let outcome = match HfSource::open(dir, None) {
            Ok(src) => {
                let mut refused = None;
                for e in src.entries() {
                    match src.read(e) {
                        Ok(v) => {
                            assert_eq!(v.shape(), e.shape, "{}: read shape differs from the listed one", e.location)
                        }
                        Err(err) => refused = refused.or(Some(err.to_string())),
                    }
                }
                match refused {
                    None => Outcome::Accepted,
                    Some(msg) => Outcome::Refused(msg),
                }
            }
            Err(e) => Outcome::Refused(e.to_string()),
        };
        Ok(outcome)
    }

    /// `n` is the bytes of the directory with the mutated file in it; the default allowance of
    /// that (16 n + 1 MiB for one allocation: a dequantized MXFP4 byte becomes two `f64`, 16
    /// bytes; 64 n + 1 MiB at the peak).
    fn allowance(&self, origin: usize, input_len: usize) -> Allowance {
        let n = self.dir_bytes[origin] - self.corpus[origin].len() + input_len;
        Allowance::per_byte(n, 16, 1 << 20, 64, 1 << 20)
    }
}
