//! One tensor item of a `__{rank}_{i}.distcp` file.
//!
//! torch's `FileSystemWriter` (`filesystem.py` `_write_item`, serialization format
//! `TORCH_SAVE`, the default and what Megatron-Core's `FileSystemWriterAsync` uses) writes
//! each tensor with `torch.save(tensor, stream)` at `_StorageInfo.offset`: a zip archive
//! (entries stored, not compressed) holding `{archive}/data.pkl`, `{archive}/byteorder` and
//! `{archive}/data/{key}` storage records. `data.pkl` (pickle protocol 2) is
//! `torch._utils._rebuild_tensor_v2(persistent_id(('storage', torch.FloatStorage, key,
//! location, numel)), storage_offset, size, stride, requires_grad, OrderedDict())`; the storage
//! may be larger than the tensor (a view of a bigger parameter is saved with its whole storage),
//! so elements are gathered through `storage_offset` and `stride`. With the `SAFETENSORS`
//! format an item is the tensor's raw bytes instead (its length is then exactly
//! `numel · element size`, which a zip archive never is).

use super::pickle::{self, Value};
use crate::tensor::{numel, RawTensor};
use moe_reference::Dtype;
use std::io::{Read, Seek, SeekFrom};

/// The globals a tensor item's `data.pkl` may name.
pub fn archive_allowed(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => name == "_rebuild_tensor_v2",
        "torch" => storage_dtype(name).is_some() || OTHER_STORAGES.contains(&name),
        "torch.storage" => name == "UntypedStorage",
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

/// The dtype of a typed storage class (`torch.FloatStorage` ...), for the dtypes decoded.
pub fn storage_dtype(name: &str) -> Option<Dtype> {
    match name {
        "FloatStorage" => Some(Dtype::F32),
        "BFloat16Storage" => Some(Dtype::Bf16),
        "HalfStorage" => Some(Dtype::F16),
        _ => None,
    }
}

const OTHER_STORAGES: &[&str] = &[
    "DoubleStorage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
    "Float8_e4m3fnStorage",
    "Float8_e5m2Storage",
];

/// A byte range of a file, as a `Read + Seek` stream (the zip reader sees only the item).
struct Window<F> {
    file: F,
    start: u64,
    len: u64,
    pos: u64,
}

impl<F: Read + Seek> Read for Window<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len - self.pos;
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<F: Read + Seek> Seek for Window<F> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(x) => Some(x),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(t) if t <= self.len => {
                self.pos = t;
                Ok(t)
            }
            _ => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek outside the item")),
        }
    }
}

/// Reads the tensor stored at `[offset, offset + length)` of `file` (a `.distcp` file), which must have `dtype`
/// and `shape` (the chunk's extent). Errors are messages; the caller names file and key.
pub fn read_tensor<F: Read + Seek>(
    mut file: F,
    offset: u64,
    length: u64,
    dtype: Dtype,
    shape: &[usize],
) -> Result<RawTensor, String> {
    let elem = dtype.size_bytes();
    let nbytes = numel(shape).checked_mul(elem).ok_or("chunk size overflows")?;
    let mut magic = [0u8; 4];
    if length >= 4 {
        file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        file.read_exact(&mut magic).map_err(|e| format!("reading the item: {e}"))?;
    }
    if length == nbytes as u64 && &magic != b"PK\x03\x04" {
        // Raw bytes (SerializationFormat.SAFETENSORS items).
        let mut data = vec![0u8; nbytes];
        file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        file.read_exact(&mut data).map_err(|e| format!("reading {nbytes} raw bytes: {e}"))?;
        return Ok(RawTensor { dtype, shape: shape.to_vec(), data });
    }
    let mut win = Window { file, start: offset, len: length, pos: 0 };
    check_directory(&mut win, length)?;
    let mut zip = zip::ZipArchive::new(win).map_err(|e| format!("not a torch.save archive: {e}"))?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl: Vec<&String> = names.iter().filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1).collect();
    let [pkl] = pkl.as_slice() else {
        return Err(format!("torch.save archive has {} `<name>/data.pkl` entries, expected 1", pkl.len()));
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    let read_entry =
        |zip: &mut zip::ZipArchive<Window<F>>, name: &str, expect: Option<u64>| -> Result<Vec<u8>, String> {
            let mut f = zip.by_name(name).map_err(|e| format!("entry {name}: {e}"))?;
            let size = f.size();
            if size > length {
                return Err(format!("entry {name} claims {size} bytes in a {length}-byte item"));
            }
            if let Some(want) = expect {
                if size != want {
                    return Err(format!("entry {name} has {size} bytes, expected {want}"));
                }
            }
            let mut buf = Vec::with_capacity(size as usize);
            f.read_to_end(&mut buf).map_err(|e| format!("entry {name}: {e}"))?;
            if buf.len() as u64 != size {
                return Err(format!("entry {name}: read {} of {size} bytes", buf.len()));
            }
            Ok(buf)
        };
    if names.iter().any(|n| n == &format!("{prefix}byteorder")) {
        let bo = read_entry(&mut zip, &format!("{prefix}byteorder"), None)?;
        if bo != b"little" {
            return Err(format!("byteorder {:?}, only little-endian is read", String::from_utf8_lossy(&bo)));
        }
    }
    let pickle_bytes = read_entry(&mut zip, pkl, None)?;
    let v = pickle::load(&pickle_bytes, &archive_allowed).map_err(|e| format!("{pkl}: {e}"))?;
    let rebuild = parse_rebuild(&v).map_err(|e| format!("{pkl}: {e}"))?;
    if rebuild.dtype != dtype {
        return Err(format!("stored as {} ({}), the metadata says {dtype}", rebuild.storage_class, rebuild.dtype));
    }
    if rebuild.size != shape {
        return Err(format!("stored tensor has shape {:?}, the metadata's chunk is {:?}", rebuild.size, shape));
    }
    let storage_bytes = (rebuild.storage_numel as u64).checked_mul(elem as u64).ok_or("storage size overflows")?;
    let storage = read_entry(&mut zip, &format!("{prefix}data/{}", rebuild.key), Some(storage_bytes))?;
    let data = gather(&storage, elem, rebuild.storage_numel, rebuild.storage_offset, &rebuild.size, &rebuild.stride)?;
    Ok(RawTensor { dtype, shape: shape.to_vec(), data })
}

/// Checks an archive's zip directory against the item's length before the zip crate reads it:
/// the end-of-central-directory record (or its zip64 form) must not claim more entries than
/// the item can hold (46 bytes per central-directory entry at least), and every central
/// directory entry's and local header's name/extra/comment lengths must lie inside the item.
/// The zip crate reserves memory for the claimed entry count and allocates each variable-length
/// field before reading it, so a few hostile bytes could otherwise cost up to 65 535 × ~230
/// bytes (or, with zip64, any amount) or 64 KiB per field; found by the fuzz runner
/// (`moe-fuzz --target distcp`). torch.save writes no archive comment, so the record is the
/// last 22 bytes.
fn check_directory<F: Read + Seek>(win: &mut Window<F>, length: u64) -> Result<(), String> {
    let bad = |m: String| format!("not a torch.save archive: {m}");
    let read_at = |win: &mut Window<F>, pos: u64, buf: &mut [u8]| -> Result<(), String> {
        if pos.checked_add(buf.len() as u64).is_none_or(|end| end > length) {
            return Err(bad(format!("zip record at byte {pos} runs past the {length}-byte item")));
        }
        win.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
        win.read_exact(buf).map_err(|e| e.to_string())
    };
    if length < 22 {
        return Err(bad("shorter than an end-of-central-directory record".into()));
    }
    let eocd_pos = length - 22;
    let mut eocd = [0u8; 22];
    read_at(win, eocd_pos, &mut eocd)?;
    if &eocd[..4] != b"PK\x05\x06" {
        return Err(bad("no end-of-central-directory record in its last 22 bytes".into()));
    }
    let u16_at = |b: &[u8], i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
    let u32_at = |b: &[u8], i: usize| u64::from(u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let mut counts = vec![u16_at(&eocd, 8), u16_at(&eocd, 10)];
    let (mut cd_size, mut cd_offset) = (u32_at(&eocd, 12), u32_at(&eocd, 16));
    // zip64: the locator (20 bytes) precedes the EOCD and points at the zip64 EOCD record,
    // whose entry counts are u64 at +24 and +32, directory size at +40 and offset at +48.
    if eocd_pos >= 20 {
        let mut loc = [0u8; 20];
        read_at(win, eocd_pos - 20, &mut loc)?;
        if &loc[..4] == b"PK\x06\x07" {
            let mut z = [0u8; 56];
            read_at(win, u64_at(&loc, 8), &mut z)?;
            counts.extend([u64_at(&z, 24), u64_at(&z, 32)]);
            (cd_size, cd_offset) = (u64_at(&z, 40), u64_at(&z, 48));
        }
    }
    if let Some(n) = counts.iter().find(|&&n| n.saturating_mul(46) > length) {
        return Err(bad(format!("zip directory claims {n} entries, more than a {length}-byte item can hold")));
    }
    let cd_end = cd_offset.checked_add(cd_size).filter(|&e| e <= eocd_pos);
    let Some(cd_end) = cd_end else {
        return Err(bad(format!("central directory {cd_offset}+{cd_size} outside the item")));
    };
    let mut pos = cd_offset;
    for _ in 0..counts[1] {
        let mut h = [0u8; 46];
        read_at(win, pos, &mut h)?;
        if &h[..4] != b"PK\x01\x02" {
            return Err(bad(format!("no central-directory entry at byte {pos}")));
        }
        let next = pos + 46 + u16_at(&h, 28) + u16_at(&h, 30) + u16_at(&h, 32);
        if next > cd_end {
            return Err(bad(format!("central-directory entry at byte {pos} runs past the directory")));
        }
        let local = u32_at(&h, 42);
        if local != 0xffff_ffff {
            let mut l = [0u8; 30];
            read_at(win, local, &mut l)?;
            if local + 30 + u16_at(&l, 26) + u16_at(&l, 28) > length {
                return Err(bad(format!("local header at byte {local} runs past the item")));
            }
        }
        pos = next;
    }
    win.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    Ok(())
}

struct Rebuild {
    storage_class: String,
    dtype: Dtype,
    key: String,
    storage_numel: usize,
    storage_offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

fn parse_rebuild(v: &Value) -> Result<Rebuild, String> {
    let Value::Object(o) = v else { return Err(format!("root is {}, expected a tensor", v.kind())) };
    let o = o.borrow();
    if !(o.class.module == "torch._utils" && o.class.name == "_rebuild_tensor_v2") || o.args.len() < 4 {
        return Err(format!(
            "root is {}.{} with {} arguments, expected _rebuild_tensor_v2",
            o.class.module,
            o.class.name,
            o.args.len()
        ));
    }
    let Value::PersId(pid) = &o.args[0] else { return Err(format!("storage argument is {}", o.args[0].kind())) };
    let Value::Tuple(pid) = &**pid else { return Err("persistent id is not a tuple".into()) };
    if pid.len() != 5 || pid[0].as_str() != Some("storage") {
        return Err("persistent id is not ('storage', type, key, location, numel)".into());
    }
    let Value::Global(g) = &pid[1] else { return Err(format!("storage type is {}", pid[1].kind())) };
    let dtype = storage_dtype(&g.name)
        .ok_or_else(|| format!("storage {}.{} is not a decoded dtype (F32, BF16, F16)", g.module, g.name))?;
    let key = pid[2].as_str().ok_or("storage key is not a str")?.to_string();
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("storage key {key:?} is not a plain name"));
    }
    let int = |x: &Value, what: &str| -> Result<usize, String> {
        x.as_int().and_then(|i| usize::try_from(i).ok()).ok_or_else(|| format!("{what} is {}", x.kind()))
    };
    let dims = |x: &Value, what: &str| -> Result<Vec<usize>, String> {
        match x {
            Value::Tuple(t) => t.iter().map(|d| int(d, what)).collect(),
            other => Err(format!("{what} is {}", other.kind())),
        }
    };
    Ok(Rebuild {
        storage_class: format!("{}.{}", g.module, g.name),
        dtype,
        key,
        storage_numel: int(&pid[4], "storage numel")?,
        storage_offset: int(&o.args[1], "storage_offset")?,
        size: dims(&o.args[2], "size")?,
        stride: dims(&o.args[3], "stride")?,
    })
}

/// The elements of a strided view of `storage`, row-major.
fn gather(
    storage: &[u8],
    elem: usize,
    storage_numel: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
) -> Result<Vec<u8>, String> {
    if size.len() != stride.len() {
        return Err(format!("size {size:?} and stride {stride:?} differ in rank"));
    }
    let n = numel(size);
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut last = offset;
    for (&s, &st) in size.iter().zip(stride) {
        last = (s - 1).checked_mul(st).and_then(|x| x.checked_add(last)).ok_or("view overflows")?;
    }
    if last >= storage_numel {
        return Err(format!("view (offset {offset}, size {size:?}, stride {stride:?}) reaches element {last} of a {storage_numel}-element storage"));
    }
    let mut out = Vec::with_capacity(n * elem);
    let nd = size.len();
    let mut idx = vec![0usize; nd];
    loop {
        let e: usize = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&storage[e * elem..(e + 1) * elem]);
        let mut d = nd;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn gather_follows_offset_and_strides() {
        // A [2, 2] view at offset 1 with strides (3, 1) of a 6-element 1-byte storage: elements
        // 1, 2, 4, 5.
        let s: Vec<u8> = (0..6).collect();
        assert_eq!(gather(&s, 1, 6, 1, &[2, 2], &[3, 1]).unwrap(), vec![1, 2, 4, 5]);
        // One past the end is refused, not read.
        assert!(gather(&s, 1, 6, 2, &[2, 2], &[3, 1]).is_err());
    }
}
