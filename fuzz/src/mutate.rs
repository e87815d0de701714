//! Byte- and structure-level mutations of one input.
//!
//! Byte mutations (bit flips, interesting bytes and little-endian integers, truncation, chunk
//! deletion, insertion, duplication, splicing with another corpus file) exercise the length and
//! offset checks; structure mutations edit the JSON header of a safetensors file (numbers to
//! extreme values, strings to other strings of the same header or hostile ones, then the 8-byte
//! header length fixed up) so that inputs get past the first check and reach the code that
//! trusts shapes, offsets and dtypes.

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

/// One mutated copy of `input`: one to four stacked mutations, `other` the corpus (for
/// splicing).
pub fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.random_range(0..4usize);
    for _ in 0..rounds {
        match rng.random_range(0..10u32) {
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
}
