//! Byte- and structure-level mutations of one input.
//!
//! Byte mutations (bit flips, interesting bytes and little-endian integers, truncation, chunk
//! deletion, insertion, duplication, splicing with another corpus file) exercise the length and
//! offset checks; structure mutations edit the JSON header of a safetensors file (numbers to
//! extreme values, strings to other strings of the same header or hostile ones, then the 8-byte
//! header length fixed up) so that inputs get past the first check and reach the code that
//! trusts shapes, offsets and dtypes.
//!
//! Format-specific structure mutations are added by a target as [`Extra`]s, drawn as often as
//! each byte mutation: pickle opcodes ([`pickle_opcode`]), a safetensors tensor's dtype, shape,
//! rank, offsets or name ([`safetensors_entry`]), a JSON file's values ([`json_value`]), and a
//! file of a directory removed ([`remove_file`]).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Integers that break length arithmetic.
const INTERESTING_U64: [u64; 12] =
    [0, 1, 2, 7, 8, 0x7f, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, 0x7fff_ffff_ffff_ffff, u64::MAX];

/// Numbers written into a JSON header in place of another number.
const INTERESTING_NUMBERS: [&str; 12] = [
    "0",
    "1",
    "-1",
    "2",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "99999999999999999999999",
    "1e308",
    "0.5",
    "-0",
];

/// Strings written into a JSON header in place of another string.
const INTERESTING_STRINGS: [&str; 10] =
    ["", "F64", "BF16", "F8_E4M3", "U8", "../escape", "a/b", "moe-expert-dump/2", "\\u0000", "NaN"];

/// A format-specific mutation: edits the input in place, false when it does not apply (then a
/// bit flip is done instead).
pub type Extra = fn(&mut ChaCha8Rng, &mut Vec<u8>) -> bool;

/// One mutated copy of `input`: one to four stacked mutations, `other` the corpus (for
/// splicing).
pub fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[Vec<u8>]) -> Vec<u8> {
    mutate_with(rng, input, other, &[])
}

/// As [`mutate`], with the target's own structure mutations `extra` drawn besides the byte
/// mutations, each as often as one of them.
pub fn mutate_with(rng: &mut ChaCha8Rng, input: &[u8], other: &[Vec<u8>], extra: &[Extra]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.random_range(0..4usize);
    for _ in 0..rounds {
        let k = rng.random_range(0..10 + extra.len());
        if k >= 10 {
            if !extra[k - 10](rng, &mut v) {
                flip_bit(rng, &mut v);
            }
            continue;
        }
        match k {
            0 => flip_bit(rng, &mut v),
            1 => set_byte(rng, &mut v),
            2 => set_integer(rng, &mut v),
            3 => truncate(rng, &mut v),
            4 => delete_chunk(rng, &mut v),
            5 => insert_chunk(rng, &mut v),
            6 => splice(rng, &mut v, other),
            _ => {
                if !header_mutation(rng, &mut v) {
                    flip_bit(rng, &mut v);
                }
            }
        }
    }
    v
}

fn flip_bit(rng: &mut ChaCha8Rng, v: &mut [u8]) {
    if !v.is_empty() {
        let i = rng.random_range(0..v.len());
        v[i] ^= 1 << rng.random_range(0..8u32);
    }
}

fn set_byte(rng: &mut ChaCha8Rng, v: &mut [u8]) {
    if !v.is_empty() {
        let i = rng.random_range(0..v.len());
        v[i] = [0u8, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}', b'[', b','][rng.random_range(0..10usize)];
    }
}

fn set_integer(rng: &mut ChaCha8Rng, v: &mut [u8]) {
    let width = [1usize, 2, 4, 8][rng.random_range(0..4usize)];
    if v.len() < width {
        return;
    }
    // The header length of a safetensors file (offset 0) is the most valuable target.
    let at = if rng.random_bool(0.25) { 0 } else { rng.random_range(0..=v.len() - width) };
    let mut x = INTERESTING_U64[rng.random_range(0..INTERESTING_U64.len())];
    if rng.random_bool(0.3) {
        x = (v.len() as u64).wrapping_add(rng.random_range(0..3u64)).wrapping_sub(1);
    }
    v[at..at + width].copy_from_slice(&x.to_le_bytes()[..width]);
}

fn truncate(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) {
    if !v.is_empty() {
        let n = rng.random_range(0..v.len());
        v.truncate(n);
    }
}

fn chunk(rng: &mut ChaCha8Rng, len: usize) -> (usize, usize) {
    let a = rng.random_range(0..=len);
    let n = rng.random_range(0..=(len - a).min(64));
    (a, a + n)
}

fn delete_chunk(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) {
    let (a, b) = chunk(rng, v.len());
    v.drain(a..b);
}

fn insert_chunk(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) {
    let at = rng.random_range(0..=v.len());
    let bytes: Vec<u8> = if rng.random_bool(0.5) && !v.is_empty() {
        let (a, b) = chunk(rng, v.len());
        v[a..b].to_vec()
    } else {
        (0..rng.random_range(1..32usize)).map(|_| rng.random()).collect()
    };
    v.splice(at..at, bytes);
}

fn splice(rng: &mut ChaCha8Rng, v: &mut Vec<u8>, other: &[Vec<u8>]) {
    if other.is_empty() {
        return;
    }
    let o = &other[rng.random_range(0..other.len())];
    let cut = rng.random_range(0..=v.len());
    let from = rng.random_range(0..=o.len());
    v.truncate(cut);
    v.extend_from_slice(&o[from..]);
}

/// Edits the JSON header of a safetensors file (8-byte little-endian length, then that many
/// bytes of JSON) and rewrites the length; false when `v` does not start with a plausible one.
fn header_mutation(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) -> bool {
    if v.len() < 8 {
        return false;
    }
    let n = u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) as usize;
    if n == 0 || n > v.len() - 8 {
        return false;
    }
    let header = match std::str::from_utf8(&v[8..8 + n]) {
        Ok(s) => s.to_string(),
        Err(_) => return false,
    };
    let edited = if rng.random_bool(0.5) { edit_number(rng, &header) } else { edit_string(rng, &header) };
    let Some(edited) = edited else { return false };
    let mut out = Vec::with_capacity(v.len() + edited.len());
    out.extend_from_slice(&(edited.len() as u64).to_le_bytes());
    out.extend_from_slice(edited.as_bytes());
    out.extend_from_slice(&v[8 + n..]);
    *v = out;
    true
}

/// Spans `[a, b)` of the runs of ASCII digits (with a leading `-`) of `s`.
fn number_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            spans.push((start, j));
            i = j;
        } else {
            i += 1;
        }
    }
    spans
}

fn edit_number(rng: &mut ChaCha8Rng, s: &str) -> Option<String> {
    let spans = number_spans(s);
    if spans.is_empty() {
        return None;
    }
    let (a, b) = spans[rng.random_range(0..spans.len())];
    let old: i128 = s[a..b].parse().unwrap_or(0);
    let new = match rng.random_range(0..4u32) {
        0 => (old + 1).to_string(),
        1 => (old - 1).to_string(),
        2 => (old * 2).to_string(),
        _ => INTERESTING_NUMBERS[rng.random_range(0..INTERESTING_NUMBERS.len())].to_string(),
    };
    Some(format!("{}{}{}", &s[..a], new, &s[b..]))
}

/// Spans `[a, b)` of the contents of the JSON strings of `s` (between the quotes).
fn string_spans(s: &str) -> Vec<(usize, usize)> {
    let b = s.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            if j >= b.len() {
                break;
            }
            spans.push((i + 1, j));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    spans
}

fn edit_string(rng: &mut ChaCha8Rng, s: &str) -> Option<String> {
    let spans = string_spans(s);
    if spans.is_empty() {
        return None;
    }
    let (a, b) = spans[rng.random_range(0..spans.len())];
    let new = if rng.random_bool(0.5) {
        let (c, d) = spans[rng.random_range(0..spans.len())];
        s[c..d].to_string()
    } else {
        INTERESTING_STRINGS[rng.random_range(0..INTERESTING_STRINGS.len())].to_string()
    };
    Some(format!("{}{}{}", &s[..a], new, &s[b..]))
}

/// The pickle opcodes the `.metadata` reader knows (protocol 2 to 5), written over a byte.
const PICKLE_OPCODES: &[u8] =
    b"\x80\x95.(012NJKMIGXCUBT)t\x85\x86\x87]lae}dsu\x8f\x90\x91c\x93R\x81\x92bQqr\x94phjg\x88\x89\x8a\x8b\x8c\x8d\x8e\x96";

/// Replaces one byte with a pickle opcode, so that the reader's stack and memo handling sees
/// opcodes in places a pickler never puts them.
pub fn pickle_opcode(rng: &mut ChaCha8Rng, v: &mut [u8]) -> bool {
    if v.is_empty() {
        return false;
    }
    let i = rng.random_range(0..v.len());
    v[i] = PICKLE_OPCODES[rng.random_range(0..PICKLE_OPCODES.len())];
    true
}

/// Integers written into a parsed safetensors header's shapes and offsets.
const HEADER_INTEGERS: [u64; 8] = [0, 1, 7, 8, 255, 65535, u32::MAX as u64, u64::MAX];

/// Edits one tensor of a safetensors header as parsed JSON (its dtype, a dimension, its rank,
/// the order of its shape, an offset, or its name toward a sibling of a quantized format:
/// `_scale_inv`, `_blocks`, `_scales`, another expert number) and rewrites the length; false
/// when `v` has no parseable header.
pub fn safetensors_entry(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) -> bool {
    if v.len() < 8 {
        return false;
    }
    let n = u64::from_le_bytes(v[..8].try_into().expect("8 bytes")) as usize;
    let Some(h) = v.get(8..8usize.saturating_add(n)) else { return false };
    let Ok(serde_json::Value::Object(mut m)) = serde_json::from_slice::<serde_json::Value>(h) else { return false };
    let keys: Vec<String> = m.keys().filter(|k| *k != "__metadata__").cloned().collect();
    if keys.is_empty() {
        return false;
    }
    let k = keys[rng.random_range(0..keys.len())].clone();
    let Some(t) = m.get_mut(&k) else { return false };
    let pick = |rng: &mut ChaCha8Rng| HEADER_INTEGERS[rng.random_range(0..HEADER_INTEGERS.len())];
    match rng.random_range(0..6u32) {
        0 => {
            t["dtype"] =
                ["F8_E4M3", "U8", "BF16", "F32", "F64", "I64", "F8_E8M0", "BOOL"][rng.random_range(0..8usize)].into()
        }
        1 => {
            if let Some(s) = t["shape"].as_array_mut() {
                s.reverse();
            }
        }
        2 => {
            if let Some(s) = t["shape"].as_array_mut().filter(|s| !s.is_empty()) {
                let i = rng.random_range(0..s.len());
                s[i] = pick(rng).into();
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
            if let Some(o) = t["data_offsets"].as_array_mut().filter(|o| !o.is_empty()) {
                let i = rng.random_range(0..o.len());
                o[i] = pick(rng).into();
            }
        }
        _ => {
            let value = m.remove(&k).expect("a key of the map");
            let suffix = ["", ".x", "_scale_inv", "_blocks", "_scales"][rng.random_range(0..5usize)];
            m.insert(format!("{k}{suffix}").replace("experts.1.", "experts.9."), value);
        }
    }
    let Ok(h) = serde_json::to_vec(&m) else { return false };
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend_from_slice(&v[8 + n..]);
    *v = out;
    true
}

/// Edits a JSON file (`config.json`, a `model.safetensors.index.json`): one value of the
/// `weight_map` (most draws) or of the top level removed, nulled, pointed outside the directory
/// or at a missing shard, or replaced by another family's name; false when `v` is not JSON.
pub fn json_value(rng: &mut ChaCha8Rng, v: &mut Vec<u8>) -> bool {
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(v) else { return false };
    let use_map = rng.random_bool(0.7) && doc.get("weight_map").is_some_and(|m| m.is_object());
    let obj = match (use_map, &mut doc) {
        (true, d) => d.get_mut("weight_map").and_then(|m| m.as_object_mut()),
        (false, d) => d.as_object_mut(),
    };
    let Some(obj) = obj else { return false };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() {
        return false;
    }
    let k = keys[rng.random_range(0..keys.len())].clone();
    match rng.random_range(0..4u32) {
        0 => {
            obj.remove(&k);
        }
        1 => {
            obj.insert(k, serde_json::Value::Null);
        }
        2 => {
            obj.insert(k, "../../etc/passwd".into());
        }
        _ => {
            let value = ["model-00009-of-00003.safetensors", "gpt_oss", "mixtral", ""][rng.random_range(0..4usize)];
            obj.insert(k, value.into());
        }
    }
    let Ok(out) = serde_json::to_vec(&doc) else { return false };
    *v = out;
    true
}

/// Empties the input, which a directory target reads as "this file is missing" (a shard the
/// index names, the config).
pub fn remove_file(_rng: &mut ChaCha8Rng, v: &mut Vec<u8>) -> bool {
    v.clear();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Why: a header mutation that does not fix up the length would never get past the first
    /// check of a safetensors reader, and the structure-aware half of the fuzzing would be void.
    #[test]
    fn header_mutations_keep_the_length_prefix_consistent() {
        let header = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&[0u8; 12]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut changed = 0;
        for _ in 0..200 {
            let mut v = file.clone();
            assert!(header_mutation(&mut rng, &mut v));
            let n = u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
            assert_eq!(v.len(), 8 + n + 12, "length prefix not fixed up");
            changed += usize::from(v != file);
        }
        assert!(changed > 150, "only {changed} of 200 header mutations changed the header");
    }

    /// Why: the parsed-header mutation rewrites the JSON; without the length fix-up every
    /// mutant would stop at the header-length check of the Hugging Face reader.
    #[test]
    fn safetensors_entry_mutations_keep_the_length_prefix_consistent() {
        let header = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&[0u8; 12]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut changed = 0;
        for _ in 0..200 {
            let mut v = file.clone();
            assert!(safetensors_entry(&mut rng, &mut v));
            let n = u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
            assert_eq!(v.len(), 8 + n + 12, "length prefix not fixed up");
            assert!(serde_json::from_slice::<serde_json::Value>(&v[8..8 + n]).is_ok());
            changed += usize::from(v != file);
        }
        assert!(changed > 100, "only {changed} of 200 entry mutations changed the header");
    }
}
