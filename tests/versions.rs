//! Version 1 of `docs/PROTOCOL.md` keeps working against today's code, both ways.
//!
//! Protocol 2 added the window code (MESSAGE `0x19`, REPAIR `0x1a`) and REPLAYED (`0x18`);
//! toward a peer that negotiated `surelink/1` every message must still travel as its own
//! block of SHARD frames (`0x11`), and none of those three frame types may be sent (§2).
//!
//! - Over quinn on the simulator, with loss: a current client against a server that accepts
//!   only `surelink/1`, and a client offering only `surelink/1` against today's server.
//!   QUIC packets are encrypted, so the wire is checked through what each end's receiver
//!   counts: a protocol-1 receiver drops a MESSAGE, REPAIR or REPLAYED frame as an
//!   `unknown_type` invalid frame (`proto::Peer::handle_datagram`), its window decoder
//!   rebuilds nothing, and every message it delivers came out of its Reed-Solomon
//!   reassembler (SHARD frames), not from a MESSAGE frame. A control run between two current
//!   peers (protocol 2) shows that last check fails when the window code is in use.
//! - At the frame level, sans-I/O: a minimal version-1 peer written here from the spec
//!   (§4, §5.1, §5.2, §5.5, §5.6, §8.1, §9, §10; varints, SHARD and ACK encoding, CRC-32 and
//!   Reed-Solomon via the `crc32fast` and `reed-solomon-erasure` crates, nothing of
//!   surelink's own codec) exchanges payments with a current [`Peer`] over seeded lossy
//!   links. Told the peer speaks 1, the current peer sends only SHARD, ACK, FLOOR and
//!   REFUSE; left at 2 it sends MESSAGE, REPAIR and REPLAYED (so the check can fail), and
//!   still takes the version-1 peer's SHARD-only traffic.

mod common;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use surelink::channel::{Channel, ChannelStats, Config, Listener, Messages};
use surelink::proto::{Peer, ReceiverConfig, SenderConfig, SenderEvent};
use surelink::sim::{GilbertElliott, Link, LinkConfig, Loss, SimNetwork, TestCa, SERVER_NAME};

use common::{assert_once, collect, number, payment, send_paced};

/// A datagram on its way: (arrival, order, to, bytes).
type InFlight = (Instant, u64, usize, Vec<u8>);

// ---------------------------------------------------------------------------------------------
// Over quinn on the simulator
// ---------------------------------------------------------------------------------------------

/// Which ALPN ids an end offers or accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alpn {
    /// Today's configs: `surelink/2`, then `surelink/1`.
    Current,
    /// `surelink/1` only, as a version-1 peer.
    V1Only,
}

fn crypto_provider() -> std::sync::Arc<quinn::rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(common::crypto_provider())
}

/// A client config offering `alpn`, with surelink's transport settings.
fn client_config(alpn: Alpn, roots: quinn::rustls::RootCertStore) -> quinn::ClientConfig {
    match alpn {
        Alpn::Current => surelink::channel::client_config(roots).unwrap(),
        Alpn::V1Only => {
            // As an older surelink built it: ALPN `surelink/1` only, by hand.
            let mut tls = quinn::rustls::ClientConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&quinn::rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"surelink/1".to_vec()];
            let mut config = quinn::ClientConfig::new(std::sync::Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
            ));
            config.transport_config(std::sync::Arc::new(surelink::channel::transport_config()));
            config
        }
    }
}

/// A server config accepting `alpn`.
fn server_config(alpn: Alpn, ca: &TestCa) -> quinn::ServerConfig {
    let s = ca.server(SERVER_NAME).unwrap();
    let (chain, key) = (vec![s.cert.clone()], s.key.clone_key().into());
    match alpn {
        Alpn::Current => surelink::channel::server_config(chain, key).unwrap(),
        Alpn::V1Only => surelink::channel::server_config_with_protocols(
            chain,
            key,
            vec![b"surelink/1".to_vec()],
        )
        .unwrap(),
    }
}

fn endpoint(
    net: &SimNetwork,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> quinn::Endpoint {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        net.bind(addr).unwrap(),
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

/// One run's outcome and both ends' counters.
struct ChannelRun {
    protocols: (u8, u8),
    client: ChannelStats,
    server: ChannelStats,
}

const N: u32 = 300;
const KEYED: u32 = 10;

/// A client offering `client` against a server accepting `server`, over `loss` both ways
/// (20 ms each way, seeded): `N` payments each way at 200/s at once, then `KEYED` keyed
/// payments from the client, each sent twice (the second a replay). Checks that every
/// payment got its receipt and was delivered exactly once, and that a replay was not
/// delivered again.
async fn channel_run(client: Alpn, server: Alpn, loss: Loss, seed: u64) -> ChannelRun {
    let ca = TestCa::new("servers").unwrap();
    let net = SimNetwork::new(seed);
    let link = LinkConfig {
        loss,
        ..LinkConfig::lossy(Duration::from_millis(20), 0.0)
    };
    let server_addr: SocketAddr = ([10, 0, 0, 2], 4433).into();
    let client_addr: SocketAddr = ([10, 0, 0, 1], 50_000).into();
    net.set_link(client_addr, server_addr, link.clone());
    net.set_link(server_addr, client_addr, link);
    let server_ep = endpoint(&net, server_addr, Some(server_config(server, &ca)));
    let client_ep = endpoint(&net, client_addr, None);
    let mut listener = Listener::new(server_ep, Config::default());
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(ca.cert()).unwrap();

    let (connected, accepted) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(30),
            Channel::connect(
                &client_ep,
                server_addr,
                SERVER_NAME,
                Some(client_config(client, roots)),
                Config::default(),
            ),
        ),
        tokio::time::timeout(Duration::from_secs(30), listener.accept()),
    );
    let (client_chan, client_messages): (Channel, Messages) = connected
        .expect("connected, not a hang")
        .expect("connected");
    let (server_chan, server_messages) = accepted.expect("accepted, not a hang").unwrap();
    let protocols = (client_chan.protocol(), server_chan.protocol());

    let quiet = Duration::from_secs(3);
    let at_server = collect(server_messages, quiet);
    let at_client = collect(client_messages, quiet);
    let every = Duration::from_millis(5);
    let (up, down) = tokio::join!(
        send_paced(&client_chan, 0..N, every),
        send_paced(&server_chan, 0..N, every),
    );
    for (what, outcomes) in [("client → server", up), ("server → client", down)] {
        for (i, outcome) in outcomes {
            let receipt = outcome.unwrap_or_else(|e| panic!("{what}: payment {i}: {e}"));
            assert!(!receipt.replayed, "{what}: payment {i} is no replay");
        }
    }
    for k in 0..KEYED {
        let (key, i) = (format!("order-{k}"), 10_000 + k);
        let first = client_chan
            .send_with_key(key.clone(), payment(i))
            .await
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(!first.replayed);
        let again = client_chan
            .send_with_key(key.clone(), payment(i))
            .await
            .unwrap_or_else(|e| panic!("{key} again: {e}"));
        assert_ne!(first.id, again.id, "a retry is a new message");
        // Protocol 1 acks a replay like a delivery; protocol 2 says it is one.
        assert_eq!(again.replayed, protocols.1 >= 2, "{key} again");
    }
    // Protocol 1 has no requests: one fails at once on either end, nothing sent.
    for (end, chan, protocol) in [
        ("client", &client_chan, protocols.0),
        ("server", &server_chan, protocols.1),
    ] {
        if protocol < 2 {
            let sent = chan.stats().sender.messages_sent;
            let outcome = chan.request("auth 1.00").await;
            assert!(
                matches!(
                    outcome,
                    Err(surelink::channel::SendError::RequestsUnsupported)
                ),
                "{end}: {outcome:?}"
            );
            assert_eq!(
                chan.stats().sender.messages_sent,
                sent,
                "{end}: nothing sent"
            );
        }
    }
    let (at_server, at_client) = (at_server.await.unwrap(), at_client.await.unwrap());
    assert_once(&at_server);
    assert_once(&at_client);
    let expected: BTreeSet<u32> = (0..N).chain(10_000..10_000 + KEYED).collect();
    assert_eq!(
        at_server.keys().copied().collect::<BTreeSet<_>>(),
        expected,
        "the server got every payment, replays not again"
    );
    assert_eq!(
        at_client.keys().copied().collect::<BTreeSet<_>>(),
        (0..N).collect::<BTreeSet<_>>(),
        "the client got every payment"
    );
    let run = ChannelRun {
        protocols,
        client: client_chan.stats(),
        server: server_chan.stats(),
    };
    let up = net.link_stats(client_addr, server_addr);
    let down = net.link_stats(server_addr, client_addr);
    eprintln!(
        "{client:?} client, {server:?} server, seed {seed}: protocols {protocols:?}, \
         packets lost up {}/{} down {}/{}",
        up.dropped(),
        up.offered_packets,
        down.dropped(),
        down.offered_packets
    );
    assert!(
        up.dropped() > 0 && down.dropped() > 0,
        "the links lost packets"
    );
    for (end, s) in [("client", &run.client), ("server", &run.server)] {
        eprintln!(
            "  {end}: sent {} data shards {} parity {} hedges {} | received {} shard frames, \
             delivered {} ({} out of the reassembler), window rebuilt {} | invalid {:?} \
             reconnects {}",
            s.sender.messages_sent,
            s.sender.data_shards,
            s.sender.repair_shards,
            s.sender.hedges_fired,
            s.receiver.shards_received,
            s.receiver.delivered,
            s.reassembly.messages_delivered,
            s.receiver.window_recovered,
            s.invalid_frames,
            s.reconnects
        );
    }
    client_chan.close().await;
    drop(net);
    run
}

/// The checks that nothing of protocol 2's frames crossed a protocol-1 connection, on both
/// ends (each end's receiver is what the other end sent to).
fn assert_protocol_1_only(run: &ChannelRun) {
    assert_eq!(run.protocols, (1, 1), "both ends speak protocol 1");
    for (end, s) in [("client", &run.client), ("server", &run.server)] {
        // A MESSAGE, REPAIR or REPLAYED frame reaching a protocol-1 receiver is dropped and
        // counted as `unknown_type`: none reached either end. (Nothing else was invalid
        // either: the links do not corrupt.)
        assert_eq!(
            s.invalid_frames.get("unknown_type"),
            None,
            "{end} received a frame protocol 1 does not have"
        );
        assert!(s.invalid_frames.is_empty(), "{end}: {:?}", s.invalid_frames);
        // The window decoder took nothing and rebuilt nothing.
        assert_eq!(s.receiver.window_recovered, 0, "{end}");
        assert_eq!(s.receiver.window_dropped, 0, "{end}");
        // Every message delivered came out of the Reed-Solomon reassembler, that is from
        // SHARD frames. (Its count includes copies rebuilt again and suppressed.)
        assert_eq!(s.reconnects, 0, "{end}: one connection, one reassembler");
        assert!(s.receiver.delivered > 0, "{end}");
        assert!(
            s.reassembly.messages_delivered >= s.receiver.delivered,
            "{end}: {} delivered, {} of them from SHARD frames",
            s.receiver.delivered,
            s.reassembly.messages_delivered
        );
        // Every message's first flight was its own block: at least one data shard each.
        assert!(
            s.sender.data_shards >= s.sender.messages_sent,
            "{end}: {} data shards for {} messages",
            s.sender.data_shards,
            s.sender.messages_sent
        );
        assert_eq!(
            s.stream_messages_sent, 0,
            "{end}: every payment went as datagrams"
        );
    }
}

fn bernoulli() -> Loss {
    Loss::Bernoulli(0.1)
}

fn bursts() -> Loss {
    Loss::GilbertElliott(GilbertElliott::from_mean(0.05, 4.0))
}

/// A current client against a server that speaks only protocol 1 (ALPN `surelink/1`).
#[tokio::test(start_paused = true)]
async fn a_current_client_keeps_to_protocol_1_with_a_version_1_server() {
    for (loss, seed) in [(bernoulli(), 11), (bursts(), 12)] {
        let run = channel_run(Alpn::Current, Alpn::V1Only, loss, seed).await;
        assert_protocol_1_only(&run);
    }
}

/// A client offering only `surelink/1` against today's server.
#[tokio::test(start_paused = true)]
async fn a_version_1_client_keeps_working_with_todays_server() {
    for (loss, seed) in [(bernoulli(), 21), (bursts(), 22)] {
        let run = channel_run(Alpn::V1Only, Alpn::Current, loss, seed).await;
        assert_protocol_1_only(&run);
    }
}

/// The control: two current peers speak protocol 2, and there one-shard payments travel as
/// MESSAGE frames, mostly not through the reassembler, so the last check above would fail
/// if a protocol-1 connection carried them.
#[tokio::test(start_paused = true)]
async fn two_current_peers_use_the_window_code() {
    let run = channel_run(Alpn::Current, Alpn::Current, bernoulli(), 31).await;
    assert_eq!(run.protocols, (2, 2));
    for (end, s) in [("client", &run.client), ("server", &run.server)] {
        assert!(s.invalid_frames.is_empty(), "{end}: {:?}", s.invalid_frames);
        assert!(
            s.reassembly.messages_delivered * 2 < s.receiver.delivered,
            "{end}: {} delivered, {} of them from SHARD frames",
            s.receiver.delivered,
            s.reassembly.messages_delivered
        );
        assert!(s.receiver.window_recovered > 0, "{end}: the window rebuilt");
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal version-1 peer, from the spec
// ---------------------------------------------------------------------------------------------

/// Frame types of protocol 1 (§5): SHARD, ACK, HELLO, CLOSE, FLOOR, REFUSE.
const V1_TYPES: [u8; 6] = [0x11, 0x12, 0x13, 0x14, 0x16, 0x17];

/// RFC 9000 §16 varints (§4).
fn put_varint(buf: &mut Vec<u8>, v: u64) {
    assert!(v < 1 << 62);
    if v < 1 << 6 {
        buf.push(v as u8);
    } else if v < 1 << 14 {
        buf.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes());
    } else if v < 1 << 30 {
        buf.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes());
    } else {
        buf.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes());
    }
}

/// Reads a varint from the front of `b`.
fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    if b.len() < len {
        return None;
    }
    let mut v = u64::from(first & 0x3f);
    for &byte in &b[1..len] {
        v = v << 8 | u64::from(byte);
    }
    *b = &b[len..];
    Some(v)
}

fn get_u32(b: &mut &[u8]) -> Option<u32> {
    let v = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    *b = &b[4..];
    Some(v)
}

/// Ranges of `ids` (maximal runs), descending.
fn runs(ids: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &id in ids {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == id => *end = id,
            _ => out.push((id, id)),
        }
    }
    out.reverse();
    out
}

/// A block being received.
struct Partial {
    k: usize,
    n: usize,
    size: usize,
    first: u64,
    lengths: Vec<usize>,
    checksum: u32,
    shards: Vec<Option<Vec<u8>>>,
}

/// One of the version-1 peer's own messages awaiting its ack.
struct Outgoing {
    block: u64,
    envelope: Vec<u8>,
    /// The next parity index to send.
    next_index: u64,
    resend_at: Instant,
    backoff: Duration,
}

/// The most shards one of the version-1 peer's blocks may have (§5.1: n ≤ 128 for the
/// reference receiver).
const V1_N: u64 = 64;

/// A peer that implements version 1 of `docs/PROTOCOL.md` and nothing else: it sends each
/// message as its own block (k = 1: one data shard and parity shards, which for k = 1 are
/// copies of it, §9.2), resends a fresh parity shard until acked, delivers each id once,
/// answers a key's replay with an ACK (§8.2, protocol 1), and drops and counts every frame
/// type protocol 1 does not have.
#[derive(Default)]
struct V1Peer {
    // Receiving.
    blocks: HashMap<u64, Partial>,
    finished: HashSet<u64>,
    held: HashSet<(u64, u64)>,
    shards_received: u64,
    /// Ids delivered or acked as replays: what ACKs may name.
    acked_ids: BTreeSet<u64>,
    keys: HashMap<Vec<u8>, Vec<u8>>,
    delivered: Vec<(u64, Vec<u8>)>,
    replays: u64,
    floor: u64,
    /// Blocks of more than one data shard finished, and blocks rebuilt from parity shards.
    multi_shard_blocks: u64,
    rebuilt: u64,
    /// Datagrams by type byte.
    types: BTreeMap<u8, u64>,
    /// Datagrams of types protocol 1 does not have, by type byte.
    unknown: BTreeMap<u8, u64>,
    /// Datagrams of known types that did not decode.
    invalid: u64,
    // Sending.
    next_id: u64,
    next_block: u64,
    outgoing: BTreeMap<u64, Outgoing>,
    acked: BTreeSet<u64>,
    refused: BTreeSet<u64>,
    out: VecDeque<Vec<u8>>,
}

impl V1Peer {
    /// The SHARD frame `index` of a one-message block (§5.1): k = 1, S = total.
    fn shard(id: u64, block: u64, envelope: &[u8], index: u64) -> Vec<u8> {
        let mut f = vec![0x11];
        put_varint(&mut f, block);
        put_varint(&mut f, 1); // k
        put_varint(&mut f, V1_N); // n
        put_varint(&mut f, index);
        put_varint(&mut f, envelope.len() as u64); // S
        put_varint(&mut f, id); // first_message
        put_varint(&mut f, 1); // count
        put_varint(&mut f, envelope.len() as u64);
        f.extend_from_slice(&crc32fast::hash(envelope).to_be_bytes());
        // Data shard 0 is the envelope; for k = 1 every parity shard is a copy of it, S bytes.
        f.extend_from_slice(envelope);
        f
    }

    fn send(&mut self, now: Instant, key: Option<&[u8]>, payload: &[u8]) -> u64 {
        let mut envelope = Vec::new();
        match key {
            None => envelope.push(0x00),
            Some(k) => {
                envelope.push(0x01);
                put_varint(&mut envelope, k.len() as u64);
                envelope.extend_from_slice(k);
            }
        }
        envelope.extend_from_slice(payload);
        let (id, block) = (self.next_id, self.next_block);
        self.next_id += 1;
        self.next_block += 1;
        // First flight: the data shard and one parity shard.
        self.out.push_back(Self::shard(id, block, &envelope, 0));
        self.out.push_back(Self::shard(id, block, &envelope, 1));
        let backoff = Duration::from_millis(120);
        self.outgoing.insert(
            id,
            Outgoing {
                block,
                envelope,
                next_index: 2,
                resend_at: now + backoff,
                backoff,
            },
        );
        id
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.outgoing.values().map(|o| o.resend_at).min()
    }

    fn handle_timeout(&mut self, now: Instant) {
        let mut resend = Vec::new();
        for (&id, o) in &mut self.outgoing {
            if o.resend_at <= now {
                resend.push(Self::shard(id, o.block, &o.envelope, o.next_index));
                o.next_index = if o.next_index + 1 < V1_N {
                    o.next_index + 1
                } else {
                    1
                };
                o.backoff = (o.backoff * 3 / 2).min(Duration::from_millis(500));
                o.resend_at = now + o.backoff;
            }
        }
        self.out.extend(resend);
    }

    fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    fn handle_datagram(&mut self, d: &[u8]) {
        let Some(&ty) = d.first() else {
            self.invalid += 1;
            return;
        };
        *self.types.entry(ty).or_default() += 1;
        if !V1_TYPES.contains(&ty) {
            *self.unknown.entry(ty).or_default() += 1;
            return;
        }
        let mut b = &d[1..];
        let ok = match ty {
            0x11 => self.handle_shard(&mut b),
            0x12 => self.handle_ack(&mut b),
            0x16 => get_varint(&mut b).map(|f| self.floor = self.floor.max(f)),
            0x17 => self.handle_refuse(&mut b),
            // HELLO and CLOSE never come as datagrams from the reference.
            _ => None,
        };
        if ok.is_none() || !b.is_empty() {
            self.invalid += 1;
        }
    }

    fn handle_shard(&mut self, b: &mut &[u8]) -> Option<()> {
        let block = get_varint(b)?;
        let k = get_varint(b)? as usize;
        let n = get_varint(b)? as usize;
        let index = get_varint(b)? as usize;
        let size = get_varint(b)? as usize;
        let first = get_varint(b)?;
        let count = get_varint(b)? as usize;
        let lengths = (0..count)
            .map(|_| get_varint(b).map(|l| l as usize))
            .collect::<Option<Vec<_>>>()?;
        let checksum = get_u32(b)?;
        let total: usize = lengths.iter().sum();
        // The layout rules (§5.1).
        let layout = (1..=64).contains(&count)
            && k >= 1
            && k <= n
            && n <= 128
            && index < n
            && (1..=16384).contains(&size)
            && k == total.div_ceil(size).max(1);
        let len = if index < k {
            size.min(total.saturating_sub(index * size))
        } else {
            size
        };
        if !layout || b.len() != len {
            return None;
        }
        let payload = b.to_vec();
        *b = &[];
        if self.held.insert((block, index as u64)) {
            self.shards_received += 1;
        }
        let ids: Vec<u64> = (first..first + count as u64).collect();
        if self.finished.contains(&block) {
            // A shard of a finished block: ack its ids again.
            self.ack(&ids);
            return Some(());
        }
        let p = self.blocks.entry(block).or_insert_with(|| Partial {
            k,
            n,
            size,
            first,
            lengths: lengths.clone(),
            checksum,
            shards: vec![None; n],
        });
        if (p.k, p.n, p.size, p.first, &p.lengths, p.checksum)
            != (k, n, size, first, &lengths, checksum)
        {
            return Some(()); // another header for the block: dropped (§5.1)
        }
        let mut shard = payload;
        shard.resize(size, 0); // data shards are trimmed (§9.1)
        p.shards[index] = Some(shard);
        if p.shards.iter().filter(|s| s.is_some()).count() < p.k {
            return Some(());
        }
        // Rebuild (§9.3): the reed-solomon-erasure crate is the code §9.2 names.
        if p.k > 1 {
            self.multi_shard_blocks += 1;
        }
        if p.shards[..p.k].iter().any(Option::is_none) {
            self.rebuilt += 1;
            let rs =
                reed_solomon_erasure::galois_8::ReedSolomon::new(p.k, p.n - p.k).expect("k, n");
            rs.reconstruct_data(&mut p.shards).expect("k shards");
        }
        let mut bytes: Vec<u8> = p.shards[..p.k]
            .iter()
            .flat_map(|s| s.as_ref().expect("rebuilt").iter().copied())
            .collect();
        bytes.truncate(total);
        let p = self.blocks.remove(&block).expect("held");
        if crc32fast::hash(&bytes) != p.checksum {
            return Some(()); // dropped and forgotten (§9.4)
        }
        self.finished.insert(block);
        let mut at = 0;
        for (&id, &len) in ids.iter().zip(&p.lengths) {
            self.judge(id, &bytes[at..at + len]);
            at += len;
        }
        self.ack(&ids);
        Some(())
    }

    /// Delivers message `id` once (§7), its key once (§8.2).
    fn judge(&mut self, id: u64, envelope: &[u8]) {
        if self.acked_ids.contains(&id) {
            return; // a duplicate: acked again
        }
        let mut b = envelope;
        let flags = b[0];
        b = &b[1..];
        assert_eq!(flags & !1, 0, "envelope flags");
        let key = (flags & 1 == 1).then(|| {
            let len = get_varint(&mut b).expect("key length") as usize;
            let key = b[..len].to_vec();
            b = &b[len..];
            key
        });
        if let Some(key) = key {
            if let Some(before) = self.keys.get(&key) {
                assert_eq!(before, b, "a key reused with another payload");
                // A replay: acked like a delivery (protocol 1), not delivered.
                self.replays += 1;
                self.acked_ids.insert(id);
                return;
            }
            self.keys.insert(key, b.to_vec());
        }
        self.delivered.push((id, b.to_vec()));
        self.acked_ids.insert(id);
    }

    /// An ACK (§5.2) naming `triggers` and, within 16 ranges, the lowest run and the newest.
    fn ack(&mut self, triggers: &[u64]) {
        let all = runs(&self.acked_ids);
        let mut chosen: BTreeSet<(u64, u64)> = BTreeSet::new();
        if let Some(&lowest) = all.last() {
            chosen.insert(lowest);
        }
        for t in triggers {
            if let Some(&r) = all.iter().find(|(s, e)| s <= t && t <= e) {
                chosen.insert(r);
            }
        }
        for &r in &all {
            if chosen.len() >= 16 {
                break;
            }
            chosen.insert(r);
        }
        let ranges: Vec<(u64, u64)> = chosen.into_iter().rev().collect();
        let Some(&(start, largest)) = ranges.first() else {
            return;
        };
        let mut f = vec![0x12];
        put_varint(&mut f, 0); // ack_delay
        put_varint(&mut f, self.shards_received);
        put_varint(&mut f, largest);
        put_varint(&mut f, ranges.len() as u64 - 1);
        put_varint(&mut f, largest - start);
        let mut prev_start = start;
        for &(s, e) in &ranges[1..] {
            put_varint(&mut f, prev_start - e - 2);
            put_varint(&mut f, e - s);
            prev_start = s;
        }
        self.out.push_back(f);
    }

    fn handle_ack(&mut self, b: &mut &[u8]) -> Option<()> {
        let _delay = get_varint(b)?;
        let _shards = get_varint(b)?;
        let largest = get_varint(b)?;
        let extra = get_varint(b)?;
        let mut start = largest.checked_sub(get_varint(b)?)?;
        let mut ranges = vec![(start, largest)];
        for _ in 0..extra {
            let end = start.checked_sub(get_varint(b)? + 2)?;
            start = end.checked_sub(get_varint(b)?)?;
            ranges.push((start, end));
        }
        for (s, e) in ranges {
            let done: Vec<u64> = self.outgoing.range(s..=e).map(|(&id, _)| id).collect();
            for id in done {
                self.outgoing.remove(&id);
                self.acked.insert(id);
            }
        }
        Some(())
    }

    fn handle_refuse(&mut self, b: &mut &[u8]) -> Option<()> {
        let _reason = get_varint(b)?;
        for _ in 0..get_varint(b)? {
            let first = get_varint(b)?;
            let extra = get_varint(b)?;
            for id in first..=first + extra {
                if self.outgoing.remove(&id).is_some() {
                    self.refused.insert(id);
                }
            }
        }
        Some(())
    }
}

// ---------------------------------------------------------------------------------------------
// A current Peer and the version-1 peer on a virtual clock
// ---------------------------------------------------------------------------------------------

const PAYMENTS: u64 = 200;
/// Payments `0 .. KEYED_V1` carry keys; payments `REPLAY_AT ..` repeat them (replays).
const KEYED_V1: u64 = 20;
const REPLAY_AT: u64 = 100;

/// What each side sends as payment `i`: its key and payload (payment `i` for fresh ones, the
/// original's for a replay).
fn plan(i: u64) -> (Option<Vec<u8>>, Bytes) {
    let original = if (REPLAY_AT..REPLAY_AT + KEYED_V1).contains(&i) {
        i - REPLAY_AT
    } else {
        i
    };
    let key = (original < KEYED_V1).then(|| format!("order-{original}").into_bytes());
    (key, payment(original as u32))
}

fn is_replay(i: u64) -> bool {
    (REPLAY_AT..REPLAY_AT + KEYED_V1).contains(&i)
}

struct FrameRun {
    /// Datagrams the current peer sent, by type byte.
    current_types: BTreeMap<u8, u64>,
    /// Ids the current peer named in REPLAYED frames.
    current_replayed: BTreeSet<u64>,
    current_acked: BTreeMap<u64, bool>,
    current_failed: BTreeSet<u64>,
    current_delivered: Vec<(u64, Bytes)>,
    current: Peer,
    v1: V1Peer,
}

/// A current [`Peer`] speaking `protocol` and a [`V1Peer`] each send `PAYMENTS` payments
/// (every 5 ms, the first `KEYED_V1` keyed and replayed from `REPLAY_AT` on) over `loss`
/// both ways (20 ms each way, seeded), for 30 s of virtual time.
fn frame_run(protocol: u8, loss: Loss, seed: u64) -> FrameRun {
    let start = Instant::now();
    let mut current = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    current.sender.set_protocol(protocol);
    current.receiver.set_protocol(protocol);
    let link = LinkConfig {
        loss,
        ..LinkConfig::lossy(Duration::from_millis(20), 0.0)
    };
    // links[0]: current → v1; links[1]: v1 → current.
    let mut links = [
        Link::new(link.clone(), seed, start),
        Link::new(link, seed ^ 0x5eed_0001, start),
    ];
    let mut run = FrameRun {
        current_types: BTreeMap::new(),
        current_replayed: BTreeSet::new(),
        current_acked: BTreeMap::new(),
        current_failed: BTreeSet::new(),
        current_delivered: Vec::new(),
        current,
        v1: V1Peer::default(),
    };
    let mut queue: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    let mut seq = 0u64;
    let every = Duration::from_millis(5);
    let mut next_payment = 0u64;
    let mut now = start;
    let end = start + Duration::from_secs(30);
    let limits = surelink::wire::Limits::default();
    loop {
        // Put what both want to send on the wire.
        while let Some(d) = run.current.poll_transmit() {
            *run.current_types.entry(d[0]).or_default() += 1;
            if let Ok(surelink::wire::Frame::Replayed(r)) =
                surelink::wire::Frame::decode(d.clone(), &limits)
            {
                run.current_replayed
                    .extend(r.ranges.iter().flat_map(|r| r.clone()));
            }
            for (at, data) in links[0].on_send(now, d.len()).deliveries(&d) {
                seq += 1;
                queue.push(Reverse((at, seq, 1, data)));
            }
        }
        while let Some(d) = run.v1.poll_transmit() {
            for (at, data) in links[1].on_send(now, d.len()).deliveries(&d) {
                seq += 1;
                queue.push(Reverse((at, seq, 0, data)));
            }
        }
        while let Some(m) = run.current.receiver.poll_delivery() {
            run.current_delivered.push((m.id, m.payload));
        }
        while let Some(e) = run.current.sender.poll_event() {
            match e {
                SenderEvent::Acked { id, replayed, .. } => {
                    assert!(run.current_acked.insert(id, replayed).is_none(), "{id}");
                }
                SenderEvent::Failed { id, .. } => {
                    run.current_failed.insert(id);
                }
            }
        }
        let payment_at = (next_payment < PAYMENTS).then(|| start + every * next_payment as u32);
        let arrival = queue.peek().map(|Reverse((at, ..))| *at);
        let Some(next) = [
            arrival,
            run.current.poll_timeout(),
            run.v1.poll_timeout(),
            payment_at,
        ]
        .into_iter()
        .flatten()
        .min() else {
            break;
        };
        if next > end {
            break;
        }
        now = now.max(next);
        while queue.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
            let Reverse((_, _, to, data)) = queue.pop().expect("peeked");
            if to == 1 {
                run.v1.handle_datagram(&data);
            } else {
                run.current.handle_datagram(now, Bytes::from(data));
            }
        }
        if run.current.poll_timeout().is_some_and(|at| at <= now) {
            run.current.handle_timeout(now);
        }
        if run.v1.poll_timeout().is_some_and(|at| at <= now) {
            run.v1.handle_timeout(now);
        }
        if payment_at.is_some_and(|at| at <= now) {
            let (key, payload) = plan(next_payment);
            let id = run
                .current
                .sender
                .send_keyed(now, key.as_deref(), &payload)
                .unwrap();
            assert_eq!(id, next_payment);
            let id = run.v1.send(now, key.as_deref(), &payload);
            assert_eq!(id, next_payment);
            next_payment += 1;
        }
    }
    assert_eq!(next_payment, PAYMENTS);
    assert!(
        links[0].counters().snapshot().dropped() > 0
            && links[1].counters().snapshot().dropped() > 0,
        "the links lost packets"
    );
    eprintln!(
        "protocol {protocol} seed {seed}: current sent {:?}; v1 received unknown {:?}, invalid \
         {}, blocks of k > 1 {}, rebuilt {}; links lost {}/{} and {}/{}",
        run.current_types,
        run.v1.unknown,
        run.v1.invalid,
        run.v1.multi_shard_blocks,
        run.v1.rebuilt,
        links[0].counters().snapshot().dropped(),
        links[0].counters().snapshot().offered_packets,
        links[1].counters().snapshot().dropped(),
        links[1].counters().snapshot().offered_packets,
    );
    run
}

/// Each payment delivered once, in its own bytes; replays not delivered.
fn assert_delivered_once(what: &str, delivered: &[(u64, Vec<u8>)]) {
    let mut ids = BTreeSet::new();
    for (id, payload) in delivered {
        assert!(ids.insert(*id), "{what}: id {id} delivered twice");
        assert!(!is_replay(*id), "{what}: replay {id} delivered");
        assert_eq!(number(payload), *id as u32, "{what}: id {id}");
    }
    let fresh: BTreeSet<u64> = (0..PAYMENTS).filter(|&i| !is_replay(i)).collect();
    assert_eq!(ids, fresh, "{what}: every fresh payment delivered");
}

/// The current peer, told its peer speaks protocol 1, sends only frame types a version-1
/// peer knows, and the two exchange every payment both ways under loss.
#[test]
fn a_current_peer_told_protocol_1_sends_only_version_1_frames() {
    for (loss, seed) in [(bernoulli(), 41), (bursts(), 42), (bernoulli(), 43)] {
        let run = frame_run(1, loss, seed);
        // What a version-1 peer knows: SHARD, ACK, FLOOR, REFUSE; nothing else was sent.
        for ty in run.current_types.keys() {
            assert!(
                [0x11, 0x12, 0x16, 0x17].contains(ty),
                "the current peer sent frame type {ty:#04x} to a version-1 peer: {:?}",
                run.current_types
            );
        }
        assert!(run.v1.unknown.is_empty(), "{:?}", run.v1.unknown);
        assert_eq!(run.v1.invalid, 0, "every frame decoded by the spec's rules");
        // The current sender cut payments into several data shards, and the spec's code
        // (§9.2, as the reed-solomon-erasure crate implements it) rebuilt lost ones.
        assert!(run.v1.multi_shard_blocks > 0 && run.v1.rebuilt > 0);
        // Current → v1: every payment acked (a replay acked like a delivery), each fresh
        // one delivered once, replays not again.
        assert!(run.current_failed.is_empty(), "{:?}", run.current_failed);
        assert_eq!(run.current_acked.len() as u64, PAYMENTS);
        assert!(
            run.current_acked.values().all(|&r| !r),
            "no replay flag in protocol 1"
        );
        assert_delivered_once("v1 peer", &run.v1.delivered);
        assert_eq!(run.v1.replays, KEYED_V1);
        // v1 → current: the same.
        assert!(
            run.v1.outgoing.is_empty(),
            "unacked: {:?}",
            run.v1.outgoing.keys()
        );
        assert!(run.v1.refused.is_empty(), "{:?}", run.v1.refused);
        assert_eq!(run.v1.acked.len() as u64, PAYMENTS);
        let delivered: Vec<(u64, Vec<u8>)> = run
            .current_delivered
            .iter()
            .map(|(id, p)| (*id, p.to_vec()))
            .collect();
        assert_delivered_once("current peer", &delivered);
        let r = run.current.receiver.stats();
        assert_eq!((r.window_recovered, r.window_dropped), (0, 0));
        assert_eq!(r.duplicate_keys, KEYED_V1);
        assert_eq!(run.current.invalid_frames().total(), 0);
        let w = run.current.sender.window_stats();
        assert_eq!(
            (w.sources, w.repairs),
            (0, 0),
            "no window source, no repair"
        );
        assert!(run.current.sender.stats().data_shards >= PAYMENTS);
    }
}

/// The control: left at protocol 2 the current peer sends MESSAGE, REPAIR and REPLAYED
/// frames, which the version-1 peer cannot read (the checks above would fail); and as a
/// protocol-2 receiver it still takes the version-1 peer's SHARD-only traffic: every fresh
/// payment delivered once and acked, the replays named in REPLAYED frames.
#[test]
fn a_current_peer_at_protocol_2_sends_what_version_1_does_not_know() {
    for (loss, seed) in [(bernoulli(), 51), (bursts(), 52)] {
        let run = frame_run(2, loss, seed);
        for ty in [0x18, 0x19, 0x1a] {
            assert!(
                run.current_types.get(&ty).is_some_and(|&n| n > 0),
                "frame type {ty:#04x} sent: {:?}",
                run.current_types
            );
            assert!(run.v1.unknown.get(&ty).is_some_and(|&n| n > 0));
        }
        let w = run.current.sender.window_stats();
        assert!(w.sources > 0 && w.repairs > 0, "{w:?}");
        // The protocol-2 receiver and SHARD-only traffic.
        let delivered: Vec<(u64, Vec<u8>)> = run
            .current_delivered
            .iter()
            .map(|(id, p)| (*id, p.to_vec()))
            .collect();
        assert_delivered_once("current peer", &delivered);
        assert!(run.v1.refused.is_empty(), "{:?}", run.v1.refused);
        let fresh: BTreeSet<u64> = (0..PAYMENTS).filter(|&i| !is_replay(i)).collect();
        assert_eq!(
            run.v1.acked.intersection(&fresh).count(),
            fresh.len(),
            "every fresh payment acked"
        );
        let replays: BTreeSet<u64> = (0..PAYMENTS).filter(|&i| is_replay(i)).collect();
        assert!(
            replays.is_subset(&run.current_replayed),
            "replays named in REPLAYED: {:?}",
            run.current_replayed
        );
        assert_eq!(run.current.receiver.stats().window_recovered, 0);
    }
}
