//! The NCCL transport of the distributed expert layer: [`NcclTransport`] implements
//! `moe_harness::distributed::Transport` with NCCL collectives on one device per process.
//!
//! Host buffers are copied to the device, exchanged by NCCL, and copied back: the all-to-all is
//! grouped `ncclSend`/`ncclRecv` after an `ncclAllGather` of the split sizes; a reduce-scatter
//! runs `ncclReduceScatter` in the requested dtype (bf16, fp16, fp32, or fp64 for an exact sum),
//! its uneven chunks padded with zeros to the largest. Reductions are over the whole world (the
//! layouts of two GPUs: ETP = world or ETP = 1); smaller ETP groups would need split
//! communicators and are refused with an error. NVLink SHARP (NVLS) is never requested: the
//! launcher sets `NCCL_NVLS_ENABLE=0` in every worker, and nothing here calls
//! `cuMulticastCreate`.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use moe_harness::distributed::transport::check_reduce;
use moe_harness::distributed::{Transport, TransportError};
use moe_reference::Dtype;
use std::sync::Arc;

/// True when the NCCL library can be loaded (it is opened lazily; without it the first NCCL
/// call would panic, so callers check this first).
pub fn nccl_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names; no symbol is called.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// A new NCCL unique id (rank 0 makes it and broadcasts the 128 bytes at rendezvous).
pub fn unique_id() -> Result<Vec<u8>, TransportError> {
    if !nccl_present() {
        return Err(TransportError::Backend("the NCCL library (libnccl.so) cannot be loaded".into()));
    }
    let id = Id::new().map_err(nccl)?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

fn nccl(e: cudarc::nccl::result::NcclError) -> TransportError {
    TransportError::Backend(format!("NCCL: {e:?}"))
}

fn driver(e: cudarc::driver::DriverError) -> TransportError {
    TransportError::Backend(format!("CUDA: {e}"))
}

/// One rank's NCCL communicator on its device.
pub struct NcclTransport {
    comm: Comm,
    stream: Arc<CudaStream>,
}

impl NcclTransport {
    /// Joins the communicator of `world` ranks as `rank` on device `ordinal`, with the unique
    /// id rank 0 broadcast (`id`: 128 bytes).
    pub fn new(ordinal: usize, rank: usize, world: usize, id: &[u8]) -> Result<NcclTransport, TransportError> {
        if !nccl_present() {
            return Err(TransportError::Backend("the NCCL library (libnccl.so) cannot be loaded".into()));
        }
        let bytes: [u8; 128] = id
            .try_into()
            .map_err(|_| TransportError::Invalid(format!("an NCCL unique id has 128 bytes, got {}", id.len())))?;
        let ctx = CudaContext::new(ordinal).map_err(driver)?;
        let stream = ctx.new_stream().map_err(driver)?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(bytes.map(|b| b as _))).map_err(nccl)?;
        Ok(NcclTransport { comm, stream })
    }

    fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, TransportError> {
        // A zero-length allocation is not allowed; one padding element stands in.
        if host.is_empty() {
            return self.stream.alloc_zeros_dummy();
        }
        self.stream.clone_htod(host).map_err(driver)
    }

    fn download<T: DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>, TransportError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut v = self.stream.clone_dtoh(dev).map_err(driver)?;
        v.truncate(len);
        Ok(v)
    }

    /// Reduce-scatter (`counts` given) or all-reduce over the world in element type `T`.
    fn reduce_as<T: NcclType + DeviceRepr + ValidAsZeroBits + Default + Clone>(
        &mut self,
        data: &[f64],
        counts: Option<&[usize]>,
        to: fn(f64) -> T,
        from: fn(T) -> f64,
    ) -> Result<Vec<f64>, TransportError> {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        match counts {
            Some(counts) => {
                let m = counts.iter().copied().max().unwrap_or(0).max(1);
                let mut padded = vec![T::default(); m * world];
                let mut at = 0;
                for (k, &c) in counts.iter().enumerate() {
                    for i in 0..c {
                        padded[k * m + i] = to(data[at + i]);
                    }
                    at += c;
                }
                let send = self.upload(&padded)?;
                let mut recv = self.stream.alloc_zeros::<T>(m).map_err(driver)?;
                self.comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum).map_err(nccl)?;
                self.stream.synchronize().map_err(driver)?;
                Ok(self.download(&recv, counts[rank])?.into_iter().map(from).collect())
            }
            None => {
                let host: Vec<T> = data.iter().map(|&v| to(v)).collect();
                let send = self.upload(&host)?;
                let mut recv = self.stream.alloc_zeros::<T>(host.len().max(1)).map_err(driver)?;
                self.comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(nccl)?;
                self.stream.synchronize().map_err(driver)?;
                Ok(self.download(&recv, host.len())?.into_iter().map(from).collect())
            }
        }
    }

    fn reduce(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        counts: Option<&[usize]>,
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError> {
        let world = self.comm.world_size();
        check_reduce(self.comm.rank(), group, data.len(), counts)?;
        if group.len() == 1 {
            let sum = moe_harness::distributed::transport::sum_in;
            return Ok(data.into_iter().map(|v| sum([v], dtype)).collect());
        }
        if group != (0..world).collect::<Vec<_>>() {
            return Err(TransportError::Invalid(format!(
                "the NCCL transport reduces over all {world} ranks or one; group {group:?} would need a split communicator"
            )));
        }
        match dtype {
            None => self.reduce_as::<f64>(&data, counts, |v| v, |v| v),
            Some(Dtype::F32) => self.reduce_as::<f32>(&data, counts, |v| v as f32, f64::from),
            Some(Dtype::Bf16) => self.reduce_as::<half::bf16>(&data, counts, half::bf16::from_f64, half::bf16::to_f64),
            Some(Dtype::F16) => self.reduce_as::<half::f16>(&data, counts, half::f16::from_f64, half::f16::to_f64),
        }
    }
}

/// A one-element zero allocation standing in for an empty buffer.
trait DummyAlloc {
    fn alloc_zeros_dummy<T: DeviceRepr>(&self) -> Result<CudaSlice<T>, TransportError>;
}

impl DummyAlloc for Arc<CudaStream> {
    fn alloc_zeros_dummy<T: DeviceRepr>(&self) -> Result<CudaSlice<T>, TransportError> {
        // SAFETY: the element is never read: every consumer of an empty buffer transfers zero
        // elements from it (the download of an empty result returns before reading).
        unsafe { self.alloc::<T>(1) }.map_err(driver)
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_to_all(&mut self, send: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>, TransportError> {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        if send.len() != world {
            return Err(TransportError::Invalid(format!("all_to_all with {} buffers for {world} ranks", send.len())));
        }
        // Split sizes: row i of the gathered matrix is what rank i sends to each rank.
        let lens: Vec<u64> = send.iter().map(|b| b.len() as u64).collect();
        let lens_dev = self.upload(&lens)?;
        let mut all = self.stream.alloc_zeros::<u64>(world * world).map_err(driver)?;
        self.comm.all_gather(&lens_dev, &mut all).map_err(nccl)?;
        let all = self.stream.clone_dtoh(&all).map_err(driver)?;
        let recv_len: Vec<usize> = (0..world).map(|i| all[i * world + rank] as usize).collect();

        let send_dev: Vec<Option<CudaSlice<f64>>> = send
            .iter()
            .map(|b| if b.is_empty() { Ok(None) } else { self.upload(b).map(Some) })
            .collect::<Result<_, _>>()?;
        let mut recv_dev: Vec<Option<CudaSlice<f64>>> = recv_len
            .iter()
            .map(|&n| if n == 0 { Ok(None) } else { self.stream.alloc_zeros::<f64>(n).map(Some).map_err(driver) })
            .collect::<Result<_, _>>()?;
        {
            let send_views: Vec<_> = send_dev.iter().map(|s| s.as_ref().map(|s| s.as_view())).collect();
            let recv_views: Vec<_> = recv_dev.iter_mut().map(|r| r.as_mut().map(|r| r.as_view_mut())).collect();
            let mut group = self.comm.group();
            for (peer, v) in send_views.into_iter().enumerate() {
                if let Some(v) = v {
                    group.send(v, peer as i32).map_err(nccl)?;
                }
            }
            for (peer, v) in recv_views.into_iter().enumerate() {
                if let Some(v) = v {
                    group.recv(v, peer as i32).map_err(nccl)?;
                }
            }
            // Dropping the group ends it (ncclGroupEnd) and launches the transfers.
        }
        self.stream.synchronize().map_err(driver)?;
        recv_dev
            .iter()
            .zip(&recv_len)
            .map(|(d, &n)| match d {
                Some(d) => self.download(d, n),
                None => Ok(Vec::new()),
            })
            .collect()
    }

    fn reduce_scatter(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        counts: &[usize],
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError> {
        self.reduce(group, data, Some(counts), dtype)
    }

    fn all_reduce(
        &mut self,
        group: &[usize],
        data: Vec<f64>,
        dtype: Option<Dtype>,
    ) -> Result<Vec<f64>, TransportError> {
        self.reduce(group, data, None, dtype)
    }

    fn barrier(&mut self) -> Result<(), TransportError> {
        let world: Vec<usize> = (0..self.comm.world_size()).collect();
        self.reduce(&world, vec![0.0], None, Some(Dtype::F32)).map(|_| ())
    }
}
