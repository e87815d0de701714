//! The in-process transport: one thread per rank, linked to rank 0 by channels
//! ([`fake_transports`]), for testing the distributed layer on CPU.

use super::transport::{HubTransport, Link, Message};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// One end of a channel pair.
struct ChannelLink {
    tx: Sender<Message>,
    rx: Receiver<Message>,
}

impl Link for ChannelLink {
    fn send(&mut self, msg: &Message) -> Result<(), String> {
        self.tx.send(msg.clone()).map_err(|_| "the peer's end is gone (its thread ended)".to_string())
    }
    fn recv(&mut self, deadline: Instant) -> Result<Message, String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        self.rx.recv_timeout(wait).map_err(|e| match e {
            RecvTimeoutError::Timeout => "timed out".to_string(),
            RecvTimeoutError::Disconnected => "the peer's end is gone (its thread ended)".to_string(),
        })
    }
}

/// `world` connected transports, rank `i` at index `i`, each collective waiting at most
/// `timeout` for the other ranks. Move each into its own thread.
pub fn fake_transports(world: usize, timeout: Duration) -> Vec<HubTransport> {
    assert!(world >= 1, "a world has at least one rank");
    let mut hub_links: Vec<Box<dyn Link>> = Vec::new();
    let mut leaves = Vec::new();
    for rank in 1..world {
        let (to_leaf, from_hub) = channel();
        let (to_hub, from_leaf) = channel();
        hub_links.push(Box::new(ChannelLink { tx: to_leaf, rx: from_leaf }));
        leaves.push(HubTransport::leaf(rank, world, Box::new(ChannelLink { tx: to_hub, rx: from_hub }), timeout));
    }
    let mut out = vec![HubTransport::hub(hub_links, timeout)];
    out.extend(leaves);
    out
}
