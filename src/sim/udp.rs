//! A real UDP socket with a [`Link`] on its outgoing side, for real-time runs on loopback.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use tokio::sync::mpsc;

use super::link::{Link, LinkConfig, LinkCounters};
use super::memory::{datagrams, now};

/// Most packets held in the delay line; beyond it packets are dropped and counted in
/// [`LossyUdpSocket::overflow`].
const MAX_DELAYED: usize = 65_536;

/// A packet waiting out its delay.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    at: Instant,
    seq: u64,
    to: SocketAddr,
    data: Vec<u8>,
}

/// A real UDP socket (through quinn's tokio runtime) whose outgoing packets pass a [`Link`]:
/// dropped, delayed, duplicated or corrupted before they reach the kernel. Incoming packets
/// are untouched; give the peer its own `LossyUdpSocket` for the other direction.
///
/// Delayed packets wait in a delay line served by one tokio task per socket. Needs a tokio
/// runtime; runs in real time.
pub struct LossyUdpSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    link: Mutex<Link>,
    delay_line: mpsc::UnboundedSender<Delayed>,
    state: Arc<Mutex<DelayState>>,
}

#[derive(Debug, Default)]
struct DelayState {
    queued: usize,
    seq: u64,
    overflow: u64,
    send_errors: u64,
}

impl fmt::Debug for LossyUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossyUdpSocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl LossyUdpSocket {
    /// Binds a UDP socket at `addr` with `config` on its outgoing packets, drawing from
    /// `seed`. Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, config: LinkConfig, seed: u64) -> io::Result<Arc<Self>> {
        let socket = std::net::UdpSocket::bind(addr)?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Delayed>();
        let state = Arc::new(Mutex::new(DelayState::default()));
        let this = Arc::new(LossyUdpSocket {
            inner: inner.clone(),
            link: Mutex::new(Link::new(config, seed, now())),
            delay_line: tx,
            state: state.clone(),
        });
        // The delay line: a heap of packets by due time, each sent when it is due.
        tokio::spawn(async move {
            let mut heap: BinaryHeap<Reverse<Delayed>> = BinaryHeap::new();
            loop {
                let next = heap.peek().map(|Reverse(d)| d.at);
                tokio::select! {
                    packet = rx.recv() => match packet {
                        Some(p) => heap.push(Reverse(p)),
                        None => break, // socket dropped
                    },
                    _ = async {
                        match next {
                            Some(at) => tokio::time::sleep_until(at.into()).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let now = now();
                        while heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
                            let Reverse(d) = heap.pop().expect("peeked");
                            let transmit = Transmit {
                                destination: d.to,
                                ecn: None,
                                contents: &d.data,
                                segment_size: None,
                                src_ip: None,
                            };
                            let failed = inner.try_send(&transmit).is_err();
                            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                            st.queued -= 1;
                            st.send_errors += u64::from(failed);
                        }
                    }
                }
            }
        });
        Ok(this)
    }

    /// Counters of the outgoing link.
    pub fn counters(&self) -> Arc<LinkCounters> {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .counters()
    }

    /// Changes the outgoing link's configuration from the next packet on.
    pub fn set_link(&self, config: LinkConfig) {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_config(config);
    }

    /// Packets dropped because the delay line was full.
    pub fn overflow(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .overflow
    }

    /// Delayed packets the kernel refused (e.g. a full send buffer): lost.
    pub fn send_errors(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_errors
    }

    fn send_one(&self, to: SocketAddr, data: &[u8]) -> io::Result<()> {
        let now = now();
        let copies = self
            .link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_send(now, data.len())
            .deliveries(data);
        // No copies: lost; quinn sees a successful send.
        for (at, data) in copies {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.queued >= MAX_DELAYED {
                st.overflow += 1;
                continue;
            }
            st.queued += 1;
            st.seq += 1;
            let seq = st.seq;
            drop(st);
            let packet = Delayed { at, seq, to, data };
            if self.delay_line.send(packet).is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "delay line stopped",
                ));
            }
        }
        Ok(())
    }
}

impl AsyncUdpSocket for LossyUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        for datagram in datagrams(transmit) {
            self.send_one(transmit.destination, datagram)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
