//! Checks shared by the fuzz targets (`fuzz_targets/*.rs`) and by the crate's
//! `tests/fuzz_corpus.rs`, which replays the committed corpus under `cargo test` on stable.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use surelink::fec::{Block, CodecCache, Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
use surelink::wire::{Frame, Limits};

fn tight_limits() -> Limits {
    Limits {
        max_shards: 8,
        max_data_shards: 8,
        max_block_shards: 8,
        max_shard_size: 64,
        max_message_len: 100,
        max_block_messages: 3,
        max_ack_ranges: 3,
        max_close_reason: 4,
    }
}

/// Arbitrary bytes: decoding never panics, and a frame that decodes re-encodes to bytes that
/// decode to the same frame, under default and under tight limits.
pub fn frame_decode(data: &[u8]) {
    for limits in [Limits::default(), tight_limits()] {
        if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data), &limits) {
            let again = Frame::decode(frame.to_bytes(), &limits);
            assert_eq!(again.as_ref(), Ok(&frame), "round trip of {data:02x?}");
            if let Frame::Shard(s) = &frame {
                assert_eq!(s.validate(&limits), Ok(()));
            }
        }
    }
}

/// One step of the reassembler target.
#[derive(Arbitrary, Debug)]
enum Op {
    /// Encode a block of messages `(length, fill seed)` at a datagram size.
    Encode {
        messages: Vec<(u16, u8)>,
        datagram: u16,
    },
    /// Insert one shard of an encoded block.
    Deliver { block: u8, index: u8 },
    /// Insert every shard of an encoded block, in index order.
    DeliverAll { block: u8 },
    /// Insert a shard with one payload bit flipped (QUIC would stop this on the wire; a buggy
    /// sender would not).
    Flip { block: u8, index: u8, bit: u16 },
    /// Insert a shard with one header field changed.
    Tamper {
        block: u8,
        index: u8,
        field: u8,
        value: u32,
    },
    /// Decode arbitrary bytes and insert them if they are a shard frame.
    Raw(Vec<u8>),
}

const MAX_OPS: usize = 256;
const MAX_BLOCKS: usize = 6;
const MAX_BYTES: usize = 48 * 1024;
const COMPLETED_MEMORY: usize = 4096;

/// Codecs shared across runs: building one inverts a k × k matrix, which would otherwise
/// dominate every run (a cache holds no state that changes results).
fn codecs() -> CodecCache {
    static CACHE: OnceLock<CodecCache> = OnceLock::new();
    CACHE.get_or_init(CodecCache::new).clone()
}

struct Sent {
    block: Block,
    first_message: u64,
    messages: Vec<Bytes>,
}

/// An arbitrary sequence of operations against one reassembler with small caps. Checks after
/// every step: no panic; the caps hold; no (block, message) is delivered twice; a message of
/// a block whose headers were never tampered with equals what was encoded whenever it came
/// from untouched shards or from a rebuild (the block checksum must catch flipped bits).
pub fn reassembler(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let config = ReassemblerConfig {
        max_blocks: MAX_BLOCKS,
        max_bytes: MAX_BYTES,
        completed_memory: COMPLETED_MEMORY,
        ..ReassemblerConfig::default()
    };
    let limits = config.limits.clone();
    let mut r = Reassembler::with_cache(config, codecs());
    let mut enc = Encoder::with_cache(EncoderConfig::default(), codecs());
    let mut sent: Vec<Sent> = Vec::new();
    let mut by_block: HashMap<u64, usize> = HashMap::new();
    let mut header_tampered: HashSet<u64> = HashSet::new();
    let mut payload_flipped: HashSet<u64> = HashSet::new();
    let mut delivered: HashSet<(u64, u64)> = HashSet::new();
    let mut next_message = 0u64;

    for _ in 0..MAX_OPS {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        let mut frames = Vec::new();
        match op {
            Op::Encode { messages, datagram } => {
                let messages: Vec<Bytes> = messages
                    .iter()
                    .take(6)
                    .map(|&(len, seed)| {
                        // Blocks of up to ~40 data shards: large k is covered by unit tests
                        // and proptest; here it would only slow the search down.
                        let len = usize::from(len) % 1200;
                        (0..len)
                            .map(|i| (i as u8) ^ seed)
                            .collect::<Vec<u8>>()
                            .into()
                    })
                    .collect();
                enc.set_max_datagram_size(200 + usize::from(datagram) % 1300);
                if let Ok(block) = enc.encode_block(next_message, &messages) {
                    by_block.insert(block.id(), sent.len());
                    sent.push(Sent {
                        block,
                        first_message: next_message,
                        messages,
                    });
                    next_message += 100;
                }
            }
            Op::Deliver { block, index } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    frames.extend(s.block.frame(u16::from(index) % n));
                }
            }
            Op::DeliverAll { block } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    frames.extend((0..n).filter_map(|i| s.block.frame(i)));
                }
            }
            Op::Flip { block, index, bit } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    let id = s.block.id();
                    if let Some(f) = s.block.frame(u16::from(index) % n) {
                        let mut f = f.to_vec();
                        // Flip a bit in the payload (the last shard_wire_len bytes).
                        let payload = s.block.header().shard_wire_len(u16::from(index) % n);
                        if payload > 0 {
                            let at = f.len() - payload + usize::from(bit) / 8 % payload;
                            f[at] ^= 1 << (bit % 8);
                            payload_flipped.insert(id);
                        }
                        frames.push(Bytes::from(f));
                    }
                }
            }
            Op::Tamper {
                block,
                index,
                field,
                value,
            } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    if let Some(f) = s.block.frame(u16::from(index) % n) {
                        if let Ok(Frame::Shard(mut shard)) = Frame::decode(f, &limits) {
                            let h = &mut shard.header;
                            match field % 6 {
                                0 => h.checksum ^= value,
                                1 => h.first_message ^= u64::from(value),
                                2 => h.lengths[0] = h.lengths[0].wrapping_add(value),
                                3 => h.shard_size = h.shard_size.wrapping_add(value),
                                4 => h.total_shards = h.total_shards.wrapping_add(value as u16),
                                _ => shard.index = shard.index.wrapping_add(value as u16),
                            }
                            header_tampered.insert(shard.header.block);
                            r.insert(shard);
                        }
                    }
                }
            }
            Op::Raw(bytes) => frames.push(Bytes::from(bytes)),
        }
        for f in frames {
            if let Ok(Frame::Shard(shard)) = Frame::decode(f.clone(), &limits) {
                // A raw frame that names one of our blocks counts as tampering with it,
                // unless it is byte for byte a frame we encoded.
                let ours = by_block
                    .get(&shard.header.block)
                    .is_some_and(|&i| *sent[i].block.header() == shard.header);
                if !ours {
                    header_tampered.insert(shard.header.block);
                }
                r.insert(shard);
            }
        }

        while let Some(d) = r.poll_delivery() {
            assert!(
                delivered.insert((d.block, d.message_id)),
                "block {} message {} delivered twice",
                d.block,
                d.message_id
            );
            let Some(&i) = by_block.get(&d.block) else {
                continue;
            };
            if header_tampered.contains(&d.block) {
                continue;
            }
            if payload_flipped.contains(&d.block) && !d.recovered {
                continue;
            }
            let s = &sent[i];
            let j = (d.message_id - s.first_message) as usize;
            assert_eq!(
                d.payload, s.messages[j],
                "block {} message {} (recovered: {}) differs from what was encoded",
                d.block, d.message_id, d.recovered
            );
        }
        let st = r.stats();
        assert!(st.bytes_buffered <= MAX_BYTES, "{st:?}");
        assert!(st.blocks_buffered <= MAX_BLOCKS, "{st:?}");
        assert!(st.blocks_remembered <= COMPLETED_MEMORY, "{st:?}");
    }
}

fn pick(sent: &mut [Sent], i: u8) -> Option<&mut Sent> {
    let len = sent.len();
    (len > 0).then(|| &mut sent[usize::from(i) % len])
}

/// One step of the receiver target: what an authenticated but arbitrary peer can make a
/// [`Peer`] see, interleaved with an honest sender's traffic and the passage of time.
#[derive(Arbitrary, Debug)]
enum PeerOp {
    /// The honest sender sends a message of `len` bytes (with an idempotency key `key` when
    /// it is non-zero: few distinct keys, so retries by key happen).
    Send { len: u16, key: u8 },
    /// Deliver one of the honest sender's datagrams (again, if it was delivered before).
    Deliver { index: u16 },
    /// Deliver every honest datagram not yet delivered.
    DeliverAll,
    /// Deliver an honest datagram with one byte changed.
    Mutate { index: u16, at: u16, xor: u8 },
    /// Arbitrary bytes as a datagram.
    Raw(Vec<u8>),
    /// A shard frame built from arbitrary fields (it may or may not be valid).
    Shard {
        block: u64,
        first_message: u64,
        lengths: Vec<u32>,
        shard_size: u32,
        total_shards: u16,
        index: u16,
        payload: Vec<u8>,
    },
    /// A stream message (the large-message path): an arbitrary id and body.
    Stream { id: u64, body: Vec<u8> },
    /// An ack for the peer's own (empty) sender.
    Ack(Vec<u8>),
    /// Time passes.
    Tick { ms: u16 },
    /// The connection is replaced; the channel (and its dedupe window) carries on.
    NewConnection,
    /// The other side restarted without state: ids start over.
    PeerLostState,
    /// The application stops taking deliveries (`false`) or takes them again (`true`).
    Reading(bool),
    /// In a claims mode: the store (or the application) answers one outstanding claim;
    /// `outcome % 4 == 3` is a failure, otherwise the mock store decides Now or Before.
    Answer { index: u8, outcome: u8 },
    /// The application goes away for good (`Receiver::application_gone`).
    Gone,
}

const VARINT_MAX: u64 = (1 << 62) - 1;
const PEER_MAX_BYTES: usize = 32 * 1024;
const PEER_MAX_BLOCKS: usize = 8;
const PEER_WINDOW: u64 = 64;
const PEER_MAX_KEYS: usize = 16;
const PEER_MAX_QUEUED: usize = 4 * 1024;
const PEER_MAX_PENDING: usize = 8;

/// What the receiver target knows of the honest sender and of what was delivered.
#[derive(Default)]
struct Book {
    /// Who claims (the receiver's mode).
    claims: surelink::proto::Claims,
    /// The mock store: ids claimed (of the sender's current incarnation: a restarted sender
    /// is a new channel), keys claimed (global).
    claimed_ids: HashSet<u64>,
    claimed_keys: HashSet<Bytes>,
    /// Ids whose claim was answered Now (their delivery is allowed, once).
    granted: HashSet<u64>,
    /// Ids answered Now or Before: they may be acked.
    settled: HashSet<u64>,
    /// Ids the application released (rolled back): they may be delivered again.
    released: HashSet<u64>,
    /// The honest sender's idempotency keys, by id.
    sent_keys: HashMap<u64, Bytes>,
    /// The honest sender's messages (of its current incarnation), by id.
    sent: HashMap<u64, Bytes>,
    /// Ids delivered (in the current incarnation).
    ids: HashSet<u64>,
    /// Idempotency keys delivered, and when.
    keys: HashMap<Bytes, std::time::Instant>,
    /// When each delivered message not yet taken entered the receiver's queue, oldest first
    /// (the application may take it much later; the key TTL runs from delivery).
    entered: std::collections::VecDeque<std::time::Instant>,
    /// The receiver's `delivered` counter as last seen.
    delivered: u64,
    /// Ids the receiver refused (the honest sender failed them as not delivered).
    refused: HashSet<u64>,
    /// Whether the receiver acks only what the application took (`ack_on_take`).
    ack_on_take: bool,
    /// The application went away: in claims mode what was claimed for it counts as handed
    /// over (the claim is the record of the delivery) and may be acked.
    gone: bool,
    /// Ids the application took (in the current incarnation), and keys it took (ever).
    taken: HashSet<u64>,
    taken_keys: HashSet<Bytes>,
    /// The honest sender's outcomes (acked or failed) per id, of its current incarnation.
    outcomes: HashMap<u64, u32>,
}

/// What hostile input may have touched, of the honest sender's current incarnation: the
/// checks that concern one honest message (its payload, its ack, its refusal) skip these
/// ids and keep judging the others.
#[derive(Default)]
struct Taint {
    /// Ids named by forged or mutated shard frames and stream messages.
    ids: HashSet<u64>,
    /// Every id below this: a forged FLOOR said they have their outcomes.
    below: u64,
    /// The honest sender's window sources on this connection: seq → message id.
    seqs: HashMap<u64, u64>,
}

impl Taint {
    fn id(&self, id: u64) -> bool {
        id < self.below || self.ids.contains(&id)
    }

    /// Notes what a datagram that is not the honest sender's may touch.
    fn datagram(&mut self, datagram: &Bytes) {
        match Frame::decode(datagram.clone(), &Limits::default()) {
            Ok(Frame::Shard(shard)) => self.ids.extend(shard.header.messages().take(256)),
            Ok(Frame::Floor(floor)) => self.below = self.below.max(floor.floor),
            // A whole message (protocol 2) carries no checksum: QUIC's packet protection
            // is what keeps a stranger from forging one, so a forged MESSAGE is the peer's
            // own message under that id.
            Ok(Frame::Message(m)) => {
                self.ids.insert(m.id);
            }
            // A forged repair over honest sources could rebuild them wrong only past their
            // CRC-32; still, the honest messages its window covers are not judged.
            Ok(Frame::Repair(r)) => {
                for seq in (r.first..=r.first.saturating_add(r.count.saturating_sub(1))).take(128) {
                    if let Some(&id) = self.seqs.get(&seq) {
                        self.ids.insert(id);
                    }
                }
            }
            // Acks and refusals go to the receiving peer's own (idle) sender; Hello and
            // Close are the channel's business.
            _ => {}
        }
    }
}

impl Book {
    /// Notes the messages the receiver delivered since the last call, at `now`.
    fn note_deliveries(&mut self, peer: &surelink::proto::Peer, now: std::time::Instant) {
        let delivered = peer.receiver.stats().delivered;
        for _ in self.delivered..delivered {
            self.entered.push_back(now);
        }
        self.delivered = delivered;
    }

    /// The mock store's answer for a claim of `id` with `key`.
    fn decide(
        &mut self,
        id: u64,
        key: Option<&Bytes>,
        fail: bool,
    ) -> surelink::proto::ClaimOutcome {
        use surelink::proto::ClaimOutcome;
        if fail {
            return ClaimOutcome::Failed;
        }
        self.settled.insert(id);
        if self.claimed_ids.contains(&id) || key.is_some_and(|k| self.claimed_keys.contains(k)) {
            return ClaimOutcome::Before;
        }
        self.claimed_ids.insert(id);
        if let Some(k) = key {
            self.claimed_keys.insert(k.clone());
        }
        self.granted.insert(id);
        ClaimOutcome::Now
    }

    /// An ack from the receiver for `id`: in a claims mode it must have been claimed (or its
    /// key settled before, when the receiver already knew the key).
    fn check_ack(&self, id: u64, tainted: bool) {
        use surelink::proto::Claims;
        // Forged frames may reuse this honest id with another payload or key.
        if tainted {
            return;
        }
        if self.ack_on_take && self.claims != Claims::Application {
            // Acked only once taken: this id, or (a retry by key) its key's first message;
            // or, with a store, claimed before by someone else.
            let key_taken = self
                .sent_keys
                .get(&id)
                .is_some_and(|k| self.taken_keys.contains(k));
            let before = self.claims == Claims::Owner && (!self.granted.contains(&id) || self.gone);
            assert!(
                self.taken.contains(&id) || key_taken || before,
                "message {id} acked before the application took it"
            );
        }
        if self.claims == Claims::Off {
            return;
        }
        let key_settled = self
            .sent_keys
            .get(&id)
            .is_some_and(|k| self.claimed_keys.contains(k));
        assert!(
            self.settled.contains(&id) || key_settled,
            "message {id} acked without a claim"
        );
    }

    /// Checks one message the application took (`tainted`: hostile input named its id).
    fn check(&mut self, m: &surelink::proto::Delivered, tainted: bool) {
        use surelink::proto::Claims;
        let now = self.entered.pop_front().expect("every delivery was noted");
        if !self.ids.insert(m.id) {
            // Only the inbox pattern hands a message over again, after the application
            // released it.
            assert!(
                self.claims == Claims::Application && self.released.remove(&m.id),
                "message {} delivered twice",
                m.id
            );
        }
        if self.claims == Claims::Owner {
            assert!(
                self.granted.contains(&m.id),
                "message {} delivered without its claim",
                m.id
            );
        }
        // The inbox pattern may hand over a key twice: the application's claim decides.
        if let Some(k) = m
            .key
            .as_ref()
            .filter(|_| self.claims != Claims::Application)
        {
            if let Some(&at) = self.keys.get(k) {
                // A key may come back only once it could have expired (keys are never
                // forgotten early: a full window refuses new keys instead).
                assert!(
                    now.duration_since(at) >= std::time::Duration::from_secs(5),
                    "key {k:?} delivered twice within its TTL"
                );
            }
            self.keys.insert(k.clone(), now);
        }
        if !tainted {
            assert!(
                !self.refused.contains(&m.id),
                "message {} delivered after it was refused",
                m.id
            );
            assert_eq!(
                self.sent.get(&m.id),
                Some(&m.payload),
                "message {} is not what the honest sender sent",
                m.id
            );
        }
    }
}

/// Arbitrary operation sequences against a [`Peer`] (the receiver's whole sans-I/O state
/// machine: decoding, reassembly, dedupe window, idempotency keys, acks) with small caps.
/// After every step: no panic, every cap holds, no message id is delivered twice (within one
/// incarnation of the other side), no idempotency key is delivered twice, and every
/// delivered, acked or refused message of the honest sender is judged (its payload is what
/// was sent, an ack follows the take or the claim, a refusal means it was not delivered)
/// unless hostile input named its id (forged or mutated shards and stream messages, and
/// every id below a forged FLOOR). At the end the application reads, claims are answered
/// and time passes until the honest sender is done: every message it sent (in its last
/// incarnation) has exactly one outcome.
pub fn receiver(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mode = u.arbitrary::<u8>().unwrap_or(0);
    let mut h = Harness::new(mode, data.len());
    for _ in 0..MAX_OPS {
        let Ok(op) = PeerOp::arbitrary(&mut u).inspect(|op| {
            if std::env::var_os("SURELINK_RECEIVER_TRACE").is_some() {
                eprintln!("{:?} take={} {op:?}", h.book.claims, h.book.ack_on_take);
            }
        }) else {
            break;
        };
        h.step(op);
    }
    h.finish();
}

/// The receiver target's world: the peer under test, the honest sender and what the target
/// knows.
struct Harness {
    now: std::time::Instant,
    peer: surelink::proto::Peer,
    honest: surelink::proto::Sender,
    honest_config: surelink::proto::SenderConfig,
    /// The honest sender's datagrams (of its current connection), and the first not yet
    /// delivered by [`PeerOp::DeliverAll`].
    wire: Vec<Bytes>,
    next_fresh: usize,
    book: Book,
    taint: Taint,
    requests: Vec<surelink::proto::ClaimRequest>,
    unconfirmed: Vec<(u64, Option<Bytes>)>,
    /// Messages of the honest sender's earlier incarnations handed to the application and
    /// not yet taken (checked already): it takes them first, in order.
    old: std::collections::VecDeque<surelink::proto::Delivered>,
    reading: bool,
    /// The input's length (the queue's cap may be overshot by one stream message).
    input_len: usize,
}

impl Harness {
    fn new(mode: u8, input_len: usize) -> Harness {
        use std::time::Duration;
        use surelink::proto::{Claims, Peer, ReceiverConfig, SenderConfig};
        let claims = match mode % 3 {
            0 => Claims::Off,
            1 => Claims::Owner,
            _ => Claims::Application,
        };
        let ack_on_take = mode & 0x40 != 0;
        let receiver = ReceiverConfig {
            claims,
            ack_on_take,
            max_pending_claims: PEER_MAX_PENDING,
            reassembler: ReassemblerConfig {
                max_blocks: PEER_MAX_BLOCKS,
                max_bytes: PEER_MAX_BYTES,
                completed_memory: 64,
                ..ReassemblerConfig::default()
            },
            dedupe_window: PEER_WINDOW,
            hole_ttl: Duration::from_secs(2),
            max_keys: PEER_MAX_KEYS,
            key_ttl: Duration::from_secs(5),
            max_queued_bytes: PEER_MAX_QUEUED,
            ..ReceiverConfig::default()
        };
        // A fixed code (one parity shard per block): the tuner's search would dominate each
        // run, and it is covered by its own tests.
        let honest_config = SenderConfig {
            max_in_flight: 1 << 20,
            adaptive: None,
            // Shorter than the receiver's hole TTL (2 s), as the docs require.
            deadline: Duration::from_secs(1),
            ..SenderConfig::default()
        };
        Harness {
            now: std::time::Instant::now(),
            peer: Peer::new(SenderConfig::default(), receiver),
            honest: surelink::proto::Sender::new(honest_config.clone()),
            honest_config,
            wire: Vec::new(),
            next_fresh: 0,
            book: Book {
                claims,
                ack_on_take,
                ..Book::default()
            },
            taint: Taint::default(),
            requests: Vec::new(),
            unconfirmed: Vec::new(),
            old: std::collections::VecDeque::new(),
            reading: true,
            input_len,
        }
    }

    /// Collects the honest sender's datagrams.
    fn collect(&mut self) {
        while let Some(d) = self.honest.poll_transmit() {
            if let Ok(Frame::Message(m)) = Frame::decode(d.clone(), &Limits::default()) {
                self.taint.seqs.insert(m.seq, m.id);
            }
            self.wire.push(d);
        }
    }

    fn step(&mut self, op: PeerOp) {
        use std::time::Duration;
        use surelink::wire::{BlockHeader, ShardFrame};
        let now = self.now;
        let mut datagrams = Vec::new();
        match op {
            PeerOp::Send { len, key } => {
                let len = usize::from(len) % 3000;
                let payload: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31)).collect();
                let key = (key != 0).then(|| vec![key % 8 + 1]);
                if let Ok(id) = self.honest.send_keyed(now, key.as_deref(), &payload) {
                    self.book.sent.insert(id, Bytes::from(payload));
                    if let Some(k) = key {
                        self.book.sent_keys.insert(id, Bytes::from(k));
                    }
                }
                self.collect();
            }
            PeerOp::Deliver { index } => {
                if !self.wire.is_empty() {
                    datagrams.push(self.wire[usize::from(index) % self.wire.len()].clone());
                }
            }
            PeerOp::DeliverAll => {
                datagrams.extend(self.wire[self.next_fresh..].iter().cloned());
                self.next_fresh = self.wire.len();
            }
            PeerOp::Mutate { index, at, xor } => {
                if !self.wire.is_empty() && xor != 0 {
                    let mut d = self.wire[usize::from(index) % self.wire.len()].to_vec();
                    if !d.is_empty() {
                        let at = usize::from(at) % d.len();
                        d[at] ^= xor;
                        let d = Bytes::from(d);
                        self.taint.datagram(&d);
                        datagrams.push(d);
                    }
                }
            }
            PeerOp::Raw(bytes) => {
                let d = Bytes::from(bytes);
                self.taint.datagram(&d);
                datagrams.push(d);
            }
            PeerOp::Shard {
                block,
                first_message,
                lengths,
                shard_size,
                total_shards,
                index,
                payload,
            } => {
                // Varints carry at most 62 bits; the encoder asserts it (decoding checks).
                let header = BlockHeader {
                    block: block & VARINT_MAX,
                    first_message: first_message & VARINT_MAX,
                    lengths: lengths.into_iter().take(8).collect(),
                    shard_size,
                    data_shards: total_shards / 2,
                    total_shards,
                    checksum: 0,
                };
                let frame = Frame::Shard(ShardFrame {
                    header,
                    index,
                    payload: Bytes::from(payload),
                });
                let d = frame.to_bytes();
                self.taint.datagram(&d);
                datagrams.push(d);
            }
            PeerOp::Stream { id, body } => {
                let id = id & VARINT_MAX;
                self.taint.ids.insert(id);
                let mut m = surelink::wire::encode_stream_head(id).to_vec();
                m.extend_from_slice(&body);
                // The channel holds stream messages while the receiver is backlogged.
                if !self.peer.receiver.backlogged() {
                    let _ = self.peer.handle_stream_message(now, Bytes::from(m));
                }
            }
            PeerOp::Ack(bytes) => {
                let mut d = vec![0x12];
                d.extend_from_slice(&bytes);
                datagrams.push(Bytes::from(d));
            }
            PeerOp::Tick { ms } => self.tick(Duration::from_millis(u64::from(ms))),
            PeerOp::NewConnection => {
                self.peer.new_connection(now);
                // Block ids start over on a new connection: the honest sender re-sends
                // what is unacked in new blocks.
                self.honest.new_connection(now);
                self.wire.clear();
                self.next_fresh = 0;
                // Window sequence numbers start over too.
                self.taint.seqs.clear();
                self.collect();
            }
            PeerOp::PeerLostState => {
                // Messages already delivered (queued, perhaps unread) belong to the old
                // incarnation, whose ids are about to be reused: check them against it.
                self.book.note_deliveries(&self.peer, now);
                while let Some(m) = self.peer.receiver.poll_delivery() {
                    // Once the application is gone nobody reads them (claims mode hands
                    // claimed messages to the closed queue); otherwise it takes them when
                    // it reads, before anything newer.
                    if !self.book.gone {
                        self.book.check(&m, self.taint.id(m.id));
                        self.old.push_back(m);
                    }
                }
                self.peer.receiver.peer_lost_state();
                // The old sender is gone with whatever it had in flight (its outcomes are
                // nobody's now): the new one starts over.
                self.honest = surelink::proto::Sender::new(self.honest_config.clone());
                self.wire.clear();
                self.next_fresh = 0;
                let b = &mut self.book;
                b.sent.clear();
                b.sent_keys.clear();
                b.ids.clear();
                b.claimed_ids.clear();
                b.granted.clear();
                b.settled.clear();
                b.released.clear();
                b.refused.clear();
                b.taken.clear();
                b.outcomes.clear();
                self.taint = Taint::default();
                self.requests.clear();
                self.unconfirmed.clear();
            }
            // An application that dropped its `Messages` never reads again.
            PeerOp::Reading(r) => self.reading = r && !self.book.gone,
            PeerOp::Gone => {
                self.book.note_deliveries(&self.peer, now);
                self.peer.receiver.application_gone(now);
                self.book.gone = true;
                self.reading = false;
                self.old.clear();
                // What it discarded never reaches the application.
                self.book.entered.clear();
                self.book.delivered = self.peer.receiver.stats().delivered;
            }
            PeerOp::Answer { index, outcome } => self.answer(usize::from(index), outcome % 4 == 3),
        }
        self.pump(datagrams);
    }

    /// Time passes.
    fn tick(&mut self, d: std::time::Duration) {
        self.now += d;
        self.peer.handle_timeout(self.now);
        self.honest.handle_timeout(self.now);
        self.collect();
    }

    /// The store (or the application) answers one outstanding claim.
    fn answer(&mut self, index: usize, fail: bool) {
        let now = self.now;
        let trace = std::env::var_os("SURELINK_RECEIVER_TRACE").is_some();
        if !self.requests.is_empty() {
            let request = self.requests.swap_remove(index % self.requests.len());
            let answer = self.book.decide(request.id, request.key.as_ref(), fail);
            if trace {
                eprintln!("  claim {} {answer:?}", request.id);
            }
            self.peer.receiver.claim_done(now, &request, answer);
        } else if !self.unconfirmed.is_empty() {
            let (id, key) = self.unconfirmed.swap_remove(index % self.unconfirmed.len());
            let answer = self.book.decide(id, key.as_ref(), fail);
            if trace {
                eprintln!("  confirm {id} {answer:?}");
            }
            if fail {
                self.book.released.insert(id);
            }
            self.peer.receiver.confirm(now, id, answer);
        }
    }

    /// Feeds `datagrams` to the peer, then moves everything that follows: acks and
    /// refusals to the honest sender, its outcomes to the checks, claims to the queue,
    /// deliveries to the application; and checks the caps.
    fn pump(&mut self, datagrams: Vec<Bytes>) {
        use surelink::proto::{Claims, FailReason, SenderEvent};
        let now = self.now;
        for d in datagrams {
            self.peer.handle_datagram(now, d);
        }
        // Acks go back to the honest sender (which also drives its hedges).
        while let Some(ack) = self.peer.poll_transmit() {
            match Frame::decode(ack, &Limits::default()) {
                Ok(Frame::Ack(a)) => self.honest.handle_ack(now, &a),
                Ok(Frame::Refuse(r)) => self.honest.handle_refuse(now, &r),
                _ => {}
            }
        }
        self.collect();
        let trace = std::env::var_os("SURELINK_RECEIVER_TRACE").is_some();
        while let Some(event) = self.honest.poll_event() {
            if trace {
                eprintln!("  sender {event:?}");
            }
            let id = match event {
                SenderEvent::Acked { id, .. } | SenderEvent::Failed { id, .. } => id,
            };
            let n = self.book.outcomes.entry(id).or_default();
            *n += 1;
            assert_eq!(*n, 1, "message {id} has a second outcome: {event:?}");
            let tainted = self.taint.id(id);
            match event {
                SenderEvent::Acked { id, .. } => self.book.check_ack(id, tainted),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(_),
                } => {
                    // (An inbox application that rolled its transaction back did not take
                    // the message in effect: a refusal after that is true.)
                    assert!(
                        tainted || !self.book.ids.contains(&id) || self.book.released.contains(&id),
                        "message {id} refused after it was delivered"
                    );
                    self.book.refused.insert(id);
                }
                SenderEvent::Failed { .. } => {}
            }
        }
        while let Some(request) = self.peer.receiver.poll_claim() {
            self.requests.push(request);
        }
        self.book.note_deliveries(&self.peer, now);
        while self.reading {
            if let Some(m) = self.old.pop_front() {
                if let Some(k) = &m.key {
                    self.book.taken_keys.insert(k.clone());
                }
                self.peer.receiver.taken(now, m.id);
                continue;
            }
            let Some(m) = self.peer.receiver.poll_delivery() else {
                break;
            };
            if trace {
                eprintln!("  taken {} key {:?}", m.id, m.key);
            }
            self.book.check(&m, self.taint.id(m.id));
            self.book.taken.insert(m.id);
            if let Some(k) = &m.key {
                self.book.taken_keys.insert(k.clone());
            }
            self.peer.receiver.taken(now, m.id);
            if self.book.claims == Claims::Application {
                self.unconfirmed.push((m.id, m.key.clone()));
            }
        }
        let st = self.peer.receiver.stats();
        assert!(st.claims_pending <= PEER_MAX_PENDING);
        let r = self.peer.receiver.reassembly();
        assert!(r.bytes_buffered <= PEER_MAX_BYTES, "{r:?}");
        assert!(r.blocks_buffered <= PEER_MAX_BLOCKS, "{r:?}");
        assert!(st.ids_tracked as u64 <= PEER_WINDOW, "{st:?}");
        assert!(st.keys_held <= PEER_MAX_KEYS, "{st:?}");
        // The delivery queue: its cap, overshot at most by what one shard completes (a
        // block, which the reassembler held within its own cap) or one stream message.
        assert!(
            st.bytes_queued <= PEER_MAX_QUEUED + PEER_MAX_BYTES.max(self.input_len),
            "{st:?}"
        );
    }

    /// Promise 3: the application reads (unless it is gone), every claim is answered and
    /// time passes (nothing more arrives: its cost would dominate the run) until the honest
    /// sender is done; then every message it sent has its one outcome.
    fn finish(mut self) {
        use std::time::Duration;
        if std::env::var_os("SURELINK_RECEIVER_TRACE").is_some() {
            eprintln!("finish");
        }
        self.reading = !self.book.gone;
        // The honest sender gives every message up at its deadline (1 s) at the latest.
        for _ in 0..4 {
            while !self.requests.is_empty() || !self.unconfirmed.is_empty() {
                self.answer(0, false);
            }
            self.pump(Vec::new());
            if self.honest.in_flight() == 0 {
                break;
            }
            self.tick(self.honest_config.deadline + Duration::from_millis(10));
        }
        assert_eq!(self.honest.in_flight(), 0, "the honest sender is not done");
        let mut missing: Vec<u64> = self
            .book
            .sent
            .keys()
            .filter(|id| !self.book.outcomes.contains_key(id))
            .copied()
            .collect();
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "messages without an outcome: {missing:?}"
        );
    }
}
