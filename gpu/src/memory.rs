//! Device memory as the engine hands it out: [`DeviceBuffer`], a byte allocation of one engine,
//! and [`Region`], a place inside one. Raw device addresses stay inside the crate: every
//! function that issues work on a region checks that what it reads or writes lies inside the
//! region's buffer first.

use crate::error::GpuError;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// A device allocation of `bytes` bytes (at least one byte is allocated, so that an empty
/// tensor has an address). Freed, ordered after the work queued on the engine's stream, when
/// dropped.
#[derive(Debug)]
pub struct DeviceBuffer {
    mem: CudaSlice<u8>,
    /// The device address of byte 0.
    base: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// Wraps `mem`, an allocation of `bytes.max(1)` bytes made on `stream`, as a buffer of
    /// `bytes` bytes.
    pub(crate) fn new(mem: CudaSlice<u8>, stream: &CudaStream, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        if mem.len() < bytes.max(1) {
            return Err(GpuError::Shape(format!("a {}-byte allocation for a {bytes}-byte buffer", mem.len())));
        }
        let base = {
            let (base, _sync) = mem.device_ptr(stream);
            base
        };
        Ok(DeviceBuffer { mem, base, bytes })
    }

    /// Size in bytes (0 for an empty tensor).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The place `offset` bytes into the buffer. Checked where it is used: an offset past the
    /// end leaves no room for anything but an empty operand.
    pub fn at(&self, offset: usize) -> Region<'_> {
        Region { buf: self, offset }
    }

    /// The underlying cudarc allocation (for copies through cudarc's safe API).
    pub(crate) fn slice(&self) -> &CudaSlice<u8> {
        &self.mem
    }

    /// The underlying cudarc allocation, writable.
    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.mem
    }

    /// The device address of byte `offset` after checking that `len` bytes from there lie
    /// inside the buffer (`what` names the operand in the error).
    pub(crate) fn addr(&self, offset: usize, len: usize, what: &str) -> Result<u64, GpuError> {
        self.at(offset).addr(len, what)
    }
}

/// A place inside a [`DeviceBuffer`]: its byte `offset`. Operands of the engine's GEMMs are
/// regions; the GEMM checks that the matrix it reads or writes there fits the buffer.
#[derive(Clone, Copy, Debug)]
pub struct Region<'a> {
    buf: &'a DeviceBuffer,
    offset: usize,
}

impl<'a> Region<'a> {
    /// The buffer the region lies in.
    pub fn buffer(&self) -> &'a DeviceBuffer {
        self.buf
    }

    /// Its offset into the buffer, in bytes.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Bytes from the region's start to the end of its buffer (0 past the end).
    pub fn available(&self) -> usize {
        self.buf.bytes.saturating_sub(self.offset)
    }

    /// The device address of the region's start, after checking that `len` bytes fit from
    /// there (`what` names the operand in the error).
    pub(crate) fn addr(&self, len: usize, what: &str) -> Result<u64, GpuError> {
        if len > 0 && self.offset.checked_add(len).is_none_or(|end| end > self.buf.bytes) {
            return Err(GpuError::Shape(format!(
                "{what}: {len} bytes at offset {} of a {}-byte buffer",
                self.offset, self.buf.bytes
            )));
        }
        Ok(self.buf.base + self.offset as u64)
    }
}

/// An operand as the grouped executor issues it: its device address and the base address of
/// the allocation it lies in (checked by [`Region::addr`] when the engine lowered a region).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Operand {
    /// Device address of the operand's first element.
    pub(crate) addr: u64,
    /// Base address of its allocation: operands with the same `alloc` lie in one buffer.
    pub(crate) alloc: u64,
}

impl Region<'_> {
    /// The region as an [`Operand`] after checking that `len` bytes fit from its start.
    pub(crate) fn operand(&self, len: usize, what: &str) -> Result<Operand, GpuError> {
        Ok(Operand { addr: self.addr(len, what)?, alloc: self.buf.base })
    }
}
