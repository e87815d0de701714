//! Rendezvous and the star transport over TCP: rank 0 listens at `MASTER_ADDR:MASTER_PORT`, the
//! other ranks connect (retrying until the timeout) and say who they are; rank 0 can then
//! broadcast bytes (the NCCL unique id), and the links carry [`HubTransport`]'s collectives
//! between CPU worker processes.
//!
//! Frames are a little-endian `u64` length and a payload of tagged fields; every length is
//! checked against what is left of the frame, so a corrupt frame is an error, never a huge
//! allocation or a panic.

use super::transport::{Collective, HubTransport, Link, Message};
use moe_reference::Dtype;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The greeting a rank sends rank 0 after connecting.
const MAGIC: &[u8; 8] = b"MOEVRDV1";
/// The largest frame accepted (4 GiB).
const MAX_FRAME: u64 = 1 << 32;

/// A TCP connection carrying framed [`Message`]s.
pub struct TcpLink {
    stream: TcpStream,
    peer: String,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f64s(out: &mut Vec<u8>, v: &[f64]) {
    put_u64(out, v.len() as u64);
    for x in v {
        out.extend_from_slice(&x.to_bits().to_le_bytes());
    }
}

fn dtype_tag(d: Option<Dtype>) -> u8 {
    match d {
        None => 0,
        Some(Dtype::F32) => 1,
        Some(Dtype::Bf16) => 2,
        Some(Dtype::F16) => 3,
    }
}

/// Serialises `msg` (without the frame length).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    match msg {
        Message::Op(Collective::AllToAll(send)) => {
            out.extend_from_slice(&[0, 0]);
            put_u64(&mut out, send.len() as u64);
            send.iter().for_each(|b| put_f64s(&mut out, b));
        }
        Message::Op(Collective::Reduce { group, counts, dtype, data }) => {
            out.extend_from_slice(&[0, 1, dtype_tag(*dtype)]);
            for list in [group, counts] {
                put_u64(&mut out, list.len() as u64);
                list.iter().for_each(|&g| put_u64(&mut out, g as u64));
            }
            put_f64s(&mut out, data);
        }
        Message::Op(Collective::Barrier) => out.extend_from_slice(&[0, 2]),
        Message::Reply(bufs) => {
            out.push(1);
            put_u64(&mut out, bufs.len() as u64);
            bufs.iter().for_each(|b| put_f64s(&mut out, b));
        }
        Message::Abort(why) => {
            out.push(2);
            put_u64(&mut out, why.len() as u64);
            out.extend_from_slice(why.as_bytes());
        }
        Message::Bytes(b) => {
            out.push(3);
            put_u64(&mut out, b.len() as u64);
            out.extend_from_slice(b);
        }
    }
    out
}

/// A cursor over a frame's payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.0.len() < n {
            return Err(format!("truncated frame: needs {n} more bytes, {} left", self.0.len()));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A count of items of `size` bytes each, checked against the bytes left.
    fn len(&mut self, size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        if n.saturating_mul(size as u64) > self.0.len() as u64 {
            return Err(format!("frame announces {n} items of {size} bytes, only {} bytes left", self.0.len()));
        }
        Ok(n as usize)
    }
    fn f64s(&mut self) -> Result<Vec<f64>, String> {
        let n = self.len(8)?;
        Ok(self
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| f64::from_bits(u64::from_le_bytes(c.try_into().expect("8"))))
            .collect())
    }
    fn usizes(&mut self) -> Result<Vec<usize>, String> {
        let n = self.len(8)?;
        (0..n).map(|_| self.u64().map(|v| v as usize)).collect()
    }
    fn bufs(&mut self) -> Result<Vec<Vec<f64>>, String> {
        let n = self.len(8)?;
        (0..n).map(|_| self.f64s()).collect()
    }
}

/// Parses a frame's payload.
pub fn decode(frame: &[u8]) -> Result<Message, String> {
    let mut c = Cursor(frame);
    let msg = match c.u8()? {
        0 => Message::Op(match c.u8()? {
            0 => Collective::AllToAll(c.bufs()?),
            1 => {
                let dtype = match c.u8()? {
                    0 => None,
                    1 => Some(Dtype::F32),
                    2 => Some(Dtype::Bf16),
                    3 => Some(Dtype::F16),
                    t => return Err(format!("unknown dtype tag {t}")),
                };
                let group = c.usizes()?;
                let counts = c.usizes()?;
                Collective::Reduce { group, counts, dtype, data: c.f64s()? }
            }
            2 => Collective::Barrier,
            k => return Err(format!("unknown collective tag {k}")),
        }),
        1 => Message::Reply(c.bufs()?),
        2 => {
            let n = c.len(1)?;
            Message::Abort(String::from_utf8_lossy(c.take(n)?).into_owned())
        }
        3 => {
            let n = c.len(1)?;
            Message::Bytes(c.take(n)?.to_vec())
        }
        t => return Err(format!("unknown message tag {t}")),
    };
    if !c.0.is_empty() {
        return Err(format!("{} trailing bytes after a message", c.0.len()));
    }
    Ok(msg)
}

impl TcpLink {
    fn read_exact_until(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
        let mut got = 0;
        while got < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out".into());
            }
            self.stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.stream.read(&mut buf[got..]) {
                Ok(0) => return Err(format!("{} closed the connection (process ended?)", self.peer)),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err("timed out".into())
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("reading from {}: {e}", self.peer)),
            }
        }
        Ok(())
    }
}

impl Link for TcpLink {
    fn send(&mut self, msg: &Message) -> Result<(), String> {
        let body = encode(msg);
        let mut frame = (body.len() as u64).to_le_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).map_err(|e| format!("writing to {}: {e}", self.peer))
    }
    fn recv(&mut self, deadline: Instant) -> Result<Message, String> {
        let mut len = [0u8; 8];
        self.read_exact_until(&mut len, deadline)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(format!("{} sent a frame of {len} bytes (limit {MAX_FRAME})", self.peer));
        }
        let mut body = vec![0u8; len as usize];
        self.read_exact_until(&mut body, deadline)?;
        decode(&body).map_err(|e| format!("bad frame from {}: {e}", self.peer))
    }
}

/// The result of [`rendezvous`].
pub enum Rendezvous {
    /// Rank 0: a link to every other rank, `links[i]` to rank `i + 1`.
    Root(Vec<TcpLink>),
    /// Another rank: its link to rank 0.
    Peer(TcpLink),
}

/// Connects the `world` ranks: rank 0 listens at `addr` and accepts every other rank (each
/// announcing its rank), the others connect to it, retrying until `timeout`. Errors name what
/// is missing (which ranks never came, which address could not be reached).
pub fn rendezvous(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Rendezvous, String> {
    let deadline = Instant::now() + timeout;
    if rank >= world {
        return Err(format!("RANK {rank} is not below WORLD_SIZE {world}"));
    }
    if rank == 0 {
        let listener = TcpListener::bind(addr).map_err(|e| format!("rank 0 cannot listen at {addr}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut links: Vec<Option<TcpLink>> = (1..world).map(|_| None).collect();
        while links.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                    let _ = stream.set_nodelay(true);
                    let mut link = TcpLink { stream, peer: format!("{from}") };
                    let mut hello = [0u8; 24];
                    link.read_exact_until(&mut hello, deadline)?;
                    let r = u64::from_le_bytes(hello[8..16].try_into().expect("8")) as usize;
                    let w = u64::from_le_bytes(hello[16..24].try_into().expect("8")) as usize;
                    if &hello[..8] != MAGIC || w != world || r == 0 || r >= world {
                        return Err(format!(
                            "{from} greeted rank 0 as rank {r} of {w} (expected a rank 1..{world} of {world})"
                        ));
                    }
                    if links[r - 1].is_some() {
                        return Err(format!("two processes claim rank {r}"));
                    }
                    link.peer = format!("rank {r}");
                    links[r - 1] = Some(link);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            links.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(i, _)| i + 1).collect();
                        return Err(format!(
                            "rank(s) {missing:?} did not connect to {addr} within {} s",
                            timeout.as_secs_f64()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("accepting at {addr}: {e}")),
            }
        }
        Ok(Rendezvous::Root(links.into_iter().map(|l| l.expect("all connected")).collect()))
    } else {
        loop {
            let attempt = addr
                .to_socket_addrs()
                .map_err(|e| format!("MASTER_ADDR:MASTER_PORT {addr} does not resolve: {e}"))?
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
            if let Some(mut stream) = attempt {
                let _ = stream.set_nodelay(true);
                let mut hello = MAGIC.to_vec();
                hello.extend_from_slice(&(rank as u64).to_le_bytes());
                hello.extend_from_slice(&(world as u64).to_le_bytes());
                stream.write_all(&hello).map_err(|e| format!("greeting rank 0 at {addr}: {e}"))?;
                return Ok(Rendezvous::Peer(TcpLink { stream, peer: "rank 0".into() }));
            }
            if Instant::now() >= deadline {
                return Err(format!("rank {rank} could not reach rank 0 at {addr} within {} s", timeout.as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Rendezvous {
    /// Sends `bytes` (rank 0's argument; others pass `None`) to every rank and returns them.
    pub fn broadcast_bytes(&mut self, bytes: Option<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>, String> {
        match self {
            Rendezvous::Root(links) => {
                let b = bytes.ok_or("rank 0 must supply the broadcast bytes")?;
                for (i, l) in links.iter_mut().enumerate() {
                    l.send(&Message::Bytes(b.clone())).map_err(|e| format!("rank {}: {e}", i + 1))?;
                }
                Ok(b)
            }
            Rendezvous::Peer(l) => match l.recv(Instant::now() + timeout)? {
                Message::Bytes(b) => Ok(b),
                Message::Abort(why) => Err(format!("aborted by rank 0: {why}")),
                other => Err(format!("rank 0 sent {other:?} instead of the broadcast bytes")),
            },
        }
    }

    /// The star transport over these links.
    pub fn into_transport(self, rank: usize, world: usize, timeout: Duration) -> HubTransport {
        match self {
            Rendezvous::Root(links) => {
                HubTransport::hub(links.into_iter().map(|l| Box::new(l) as Box<dyn Link>).collect(), timeout)
            }
            Rendezvous::Peer(link) => HubTransport::leaf(rank, world, Box::new(link), timeout),
        }
    }
}
