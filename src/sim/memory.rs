//! An in-memory network of simulated hosts: quinn sockets with no OS socket under them.
//!
//! Time is tokio's clock, so a run under a paused clock (`#[tokio::test(start_paused = true)]`
//! or `tokio::time::pause()`) moves in virtual time: tokio skips ahead whenever every task is
//! waiting on a timer, including the delivery timers here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use super::link::{Link, LinkConfig, LinkCounters, LinkStats};

/// tokio's "now" as a std `Instant` (virtual when tokio's clock is paused).
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The datagrams of a transmit: one, or several of `segment_size` bytes (GSO).
pub(crate) fn datagrams<'a>(transmit: &Transmit<'a>) -> std::slice::Chunks<'a, u8> {
    let segment = transmit
        .segment_size
        .unwrap_or(transmit.contents.len())
        .max(1);
    transmit.contents.chunks(segment)
}

/// A packet on its way to a host.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Instant,
    /// Tie-breaker: equal arrival times keep send order.
    seq: u64,
    from: SocketAddr,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Host {
    /// Which socket holds the address (a crashed host's socket no longer does).
    socket: u64,
    inbox: BinaryHeap<Reverse<InFlight>>,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Net {
    seed: u64,
    start: Instant,
    default_link: LinkConfig,
    hosts: HashMap<SocketAddr, Host>,
    links: HashMap<(SocketAddr, SocketAddr), Link>,
    next_seq: u64,
    unroutable: u64,
    next_socket: u64,
}

impl Net {
    fn link(&mut self, from: SocketAddr, to: SocketAddr) -> &mut Link {
        let (seed, start, config) = (self.seed, self.start, &self.default_link);
        self.links
            .entry((from, to))
            .or_insert_with(|| Link::new(config.clone(), link_seed(seed, from, to), start))
    }
}

/// A seed for the link `from → to`, derived from the network's seed (splitmix64 over the
/// addresses), so links are independent but reproducible.
fn link_seed(seed: u64, from: SocketAddr, to: SocketAddr) -> u64 {
    let mut x = seed;
    let mut mix = |v: u64| {
        x ^= v;
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x = z ^ (z >> 31);
    };
    for addr in [from, to] {
        match addr.ip() {
            std::net::IpAddr::V4(ip) => mix(u64::from(u32::from(ip))),
            std::net::IpAddr::V6(ip) => {
                let v = u128::from(ip);
                mix(v as u64);
                mix((v >> 64) as u64);
            }
        }
        mix(u64::from(addr.port()));
    }
    x
}

/// A simulated network. Cheap to clone (a handle); every host bound on it can reach every
/// other, through a [`Link`] per direction.
#[derive(Clone)]
pub struct SimNetwork {
    inner: Arc<Mutex<Net>>,
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = self.lock();
        f.debug_struct("SimNetwork")
            .field("seed", &net.seed)
            .field("hosts", &net.hosts.len())
            .field("links", &net.links.len())
            .finish()
    }
}

impl SimNetwork {
    /// A network whose links draw from `seed`; blackouts are measured from now (tokio's clock).
    /// Links not configured with [`SimNetwork::set_link`] are perfect.
    pub fn new(seed: u64) -> Self {
        SimNetwork {
            inner: Arc::new(Mutex::new(Net {
                seed,
                start: now(),
                default_link: LinkConfig::default(),
                hosts: HashMap::new(),
                links: HashMap::new(),
                next_seq: 0,
                unroutable: 0,
                next_socket: 0,
            })),
        }
    }

    /// Sets what happens to packets from `from` to `to` (one direction), from the next
    /// packet on. The link keeps its random state and counters if it already exists.
    pub fn set_link(&self, from: SocketAddr, to: SocketAddr, config: LinkConfig) {
        self.lock().link(from, to).set_config(config);
    }

    /// The configuration links get when not set explicitly.
    pub fn set_default_link(&self, config: LinkConfig) {
        self.lock().default_link = config;
    }

    /// Counters of the link `from → to`, readable while a run goes.
    pub fn link_counters(&self, from: SocketAddr, to: SocketAddr) -> Arc<LinkCounters> {
        self.lock().link(from, to).counters()
    }

    /// A snapshot of the counters of the link `from → to`.
    pub fn link_stats(&self, from: SocketAddr, to: SocketAddr) -> LinkStats {
        self.link_counters(from, to).snapshot()
    }

    /// Starts recording the fate of packets on `from → to` (see [`Link::start_recording`]).
    pub fn start_recording(&self, from: SocketAddr, to: SocketAddr) {
        self.lock().link(from, to).start_recording();
    }

    /// The drop trace recorded on `from → to`, for [`super::Loss::Replay`]; recording stops.
    pub fn take_recording(&self, from: SocketAddr, to: SocketAddr) -> Vec<bool> {
        self.lock().link(from, to).take_recording()
    }

    /// Packets sent to an address no host was bound to.
    pub fn unroutable(&self) -> u64 {
        self.lock().unroutable
    }

    /// Binds a host at `addr`. Dropping the socket unbinds it (packets in flight to it are
    /// lost), so an address can be bound again, e.g. for a restarted server.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<Arc<SimSocket>> {
        let mut net = self.lock();
        if net.hosts.contains_key(&addr) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{addr} is already bound on this simulated network"),
            ));
        }
        let socket = net.next_socket;
        net.next_socket += 1;
        net.hosts.insert(
            addr,
            Host {
                socket,
                ..Host::default()
            },
        );
        Ok(Arc::new(SimSocket {
            net: self.clone(),
            addr,
            id: socket,
            timer: Mutex::new(None),
        }))
    }

    /// The host at `addr` crashes, as a process that dies: its socket stops sending and
    /// receiving at once (no goodbye packets), packets in flight to it are lost, and the
    /// address can be bound again (a restarted server). The crashed endpoint's tasks idle
    /// until it is dropped. Returns whether a host was bound there.
    pub fn crash(&self, addr: SocketAddr) -> bool {
        self.lock().hosts.remove(&addr).is_some()
    }

    /// Whether socket `id` still holds `addr`.
    fn holds(&self, addr: SocketAddr, id: u64) -> bool {
        self.lock().hosts.get(&addr).is_some_and(|h| h.socket == id)
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        // Critical sections here cannot panic half-way, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let now = now();
        let mut net = self.lock();
        let copies = net.link(from, to).on_send(now, data.len()).deliveries(data);
        if copies.is_empty() {
            return;
        }
        if !net.hosts.contains_key(&to) {
            net.unroutable += 1;
            return;
        }
        for (at, data) in copies {
            let seq = net.next_seq;
            net.next_seq += 1;
            let host = net.hosts.get_mut(&to).expect("checked above");
            host.inbox.push(Reverse(InFlight {
                at,
                seq,
                from,
                data,
            }));
            if let Some(w) = host.waker.take() {
                w.wake();
            }
        }
    }
}

/// A socket on a [`SimNetwork`], for `quinn::Endpoint::new_with_abstract_socket`.
pub struct SimSocket {
    net: SimNetwork,
    addr: SocketAddr,
    /// Tells this socket from a later one bound at the same address.
    id: u64,
    /// Wakes the receiving task when the earliest packet in flight arrives.
    timer: Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        let mut net = self.net.lock();
        if net
            .hosts
            .get(&self.addr)
            .is_some_and(|h| h.socket == self.id)
        {
            net.hosts.remove(&self.addr);
        }
    }
}

/// Always writable: a simulated link never pushes back (a rate limit drops instead).
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if !self.net.holds(self.addr, self.id) {
            // Crashed: nothing leaves.
            return Ok(());
        }
        for datagram in datagrams(transmit) {
            self.net.send(self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let now = now();
        let next = {
            let mut net = self.net.lock();
            let Some(host) = net
                .hosts
                .get_mut(&self.addr)
                .filter(|h| h.socket == self.id)
            else {
                // Crashed (or replaced): nothing arrives, ever.
                return Poll::Pending;
            };
            let mut n = 0;
            while n < bufs.len().min(meta.len()) {
                match host.inbox.peek() {
                    Some(Reverse(p)) if p.at <= now => {}
                    _ => break,
                }
                let Reverse(p) = host.inbox.pop().expect("peeked");
                let len = p.data.len().min(bufs[n].len());
                bufs[n][..len].copy_from_slice(&p.data[..len]);
                meta[n] = RecvMeta {
                    addr: p.from,
                    len,
                    stride: len,
                    ecn: None,
                    dst_ip: Some(self.addr.ip()),
                };
                n += 1;
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            host.waker = Some(cx.waker().clone());
            host.inbox.peek().map(|Reverse(p)| p.at)
        };
        // Nothing due: wake at the earliest arrival (a new earlier packet wakes us via `waker`).
        if let Some(at) = next {
            let mut timer = self.timer.lock().unwrap_or_else(|e| e.into_inner());
            let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
            sleep.as_mut().reset(at.into());
            if sleep.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}
