//! Rebuilding messages from shard frames, under memory caps.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;

use bytes::{Bytes, BytesMut};

use super::CodecCache;
use crate::wire::{BlockHeader, Limits, ShardFrame};

/// Settings of a [`Reassembler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReassemblerConfig {
    /// Limits the frames were decoded with (used to bound per-block bookkeeping).
    pub limits: Limits,
    /// Most incomplete blocks held at once; the oldest is evicted to make room. Default 8192
    /// (`max_bytes` bounds the memory: each block's bookkeeping is charged to it). With 1,024,
    /// at 50,000 messages a second on loopback the table turned over every ~20 ms, shorter
    /// than a block's shards took to arrive behind a backlog: blocks were evicted between
    /// their shards (up to 199,000 in 3 s) and half the payments failed.
    pub max_blocks: usize,
    /// Most bytes held in incomplete blocks (shard payloads plus per-block bookkeeping); the
    /// oldest blocks are evicted to make room. Default 4 MiB.
    pub max_bytes: usize,
    /// Finished blocks remembered, so late shards of a finished block are recognised as stale
    /// and never deliver a message twice. Default 16384 (about 0.5 MiB).
    pub completed_memory: usize,
}

impl Default for ReassemblerConfig {
    fn default() -> Self {
        ReassemblerConfig {
            limits: Limits::default(),
            max_blocks: 8192,
            max_bytes: 4 << 20,
            completed_memory: 16384,
        }
    }
}

/// A message rebuilt from its block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The message's id.
    pub message_id: u64,
    /// The block it came in.
    pub block: u64,
    /// The message bytes (a zero-copy slice when the message sat in one received data shard).
    pub payload: Bytes,
    /// Whether parity was needed: a data shard this message spans was lost and rebuilt.
    pub recovered: bool,
}

/// Why a shard frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// It breaks a rule of the wire format (possible only for frames built by hand: decoded
    /// frames are valid).
    Malformed,
    /// Its header disagrees with the header of earlier shards of the same block.
    Contradicts,
    /// It does not fit the byte budget even after evicting every other block.
    OverBudget,
    /// With it the block's bytes were complete (received or rebuilt), and they do not match
    /// the block checksum. Nothing of the block was delivered; the block is dropped.
    ChecksumMismatch,
}

/// What [`Reassembler::insert`] did with a shard frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored; `delivered` messages became ready (take them with [`Reassembler::poll_delivery`]).
    Accepted {
        /// Messages this shard completed.
        delivered: usize,
    },
    /// This shard was already held.
    Duplicate,
    /// The block was already finished: every message in it was delivered earlier. The sender
    /// is probably missing an ack for `messages`.
    Stale {
        /// Ids of the block's messages.
        messages: RangeInclusive<u64>,
    },
    /// Refused and counted.
    Rejected(RejectReason),
}

/// Counters of a [`Reassembler`]. Gauges (`*_buffered`) are read at the time of the call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReassemblerStats {
    /// Shard frames stored.
    pub shards_accepted: u64,
    /// Shard frames already held.
    pub shards_duplicate: u64,
    /// Shard frames of finished blocks.
    pub shards_stale: u64,
    /// Shard frames that broke a wire-format rule.
    pub shards_malformed: u64,
    /// Shard frames whose header contradicted their block's first shard.
    pub shards_contradicting: u64,
    /// Shard frames refused because they could not fit the byte budget.
    pub shards_over_budget: u64,
    /// Blocks finished (every message delivered).
    pub blocks_completed: u64,
    /// Blocks that needed parity to finish.
    pub blocks_rebuilt: u64,
    /// Incomplete blocks evicted to stay within the caps.
    pub blocks_evicted: u64,
    /// Blocks whose bytes (received or rebuilt) did not match their checksum: dropped, never
    /// delivered.
    pub checksum_failures: u64,
    /// Messages delivered.
    pub messages_delivered: u64,
    /// Messages delivered that needed parity.
    pub messages_recovered: u64,
    /// Incomplete blocks held now.
    pub blocks_buffered: usize,
    /// Bytes held now (shard payloads plus per-block bookkeeping).
    pub bytes_buffered: usize,
    /// Finished (or evicted, partly delivered) blocks remembered now.
    pub blocks_remembered: usize,
}

/// An incomplete block.
#[derive(Debug)]
struct Partial {
    header: BlockHeader,
    shards: Vec<Option<Bytes>>,
    present: u16,
    data_present: u16,
    /// Bit `j` set: message `first_message + j` was delivered.
    delivered: u64,
    /// Creation order, for evicting the oldest.
    seq: u64,
    bytes: usize,
}

/// A finished or evicted block remembered by id.
#[derive(Clone, Copy, Debug)]
struct Done {
    first_message: u64,
    count: usize,
    delivered: u64,
    seq: u64,
}

fn full_mask(count: usize) -> u64 {
    if count >= 64 {
        u64::MAX
    } else {
        (1u64 << count) - 1
    }
}

/// Rebuilds messages from shard frames. Sans-I/O and deterministic.
///
/// Feed it every decoded [`ShardFrame`] with [`Reassembler::insert`], then drain
/// [`Reassembler::poll_delivery`]. Each message of a block is delivered once, when the whole
/// block's bytes are known and match its checksum: all `k` data shards are in, or `k` distinct
/// shards let the block be rebuilt. A block
/// id it remembers as finished is never delivered again; dedupe across blocks (the same
/// message re-sent in a new block) is the protocol layer's job.
///
/// Memory is bounded by [`ReassemblerConfig`]: incomplete blocks by count and bytes (the
/// oldest is evicted and counted), finished blocks by `completed_memory`. Byte accounting
/// counts shard payloads; each payload is a slice that keeps its whole datagram alive, which
/// is at most the frame header larger.
#[derive(Debug)]
pub struct Reassembler {
    config: ReassemblerConfig,
    cache: CodecCache,
    blocks: HashMap<u64, Partial>,
    /// seq → block id, oldest first.
    order: BTreeMap<u64, u64>,
    done: HashMap<u64, Done>,
    /// (block id, seq) in the order blocks finished; stale pairs are skipped.
    done_order: VecDeque<(u64, u64)>,
    next_seq: u64,
    bytes: usize,
    deliveries: VecDeque<Delivery>,
    stats: ReassemblerStats,
}

impl Reassembler {
    /// A reassembler with its own codec cache.
    pub fn new(config: ReassemblerConfig) -> Self {
        Self::with_cache(config, CodecCache::new())
    }

    /// A reassembler sharing `cache`.
    pub fn with_cache(mut config: ReassemblerConfig, cache: CodecCache) -> Self {
        config.limits = config.limits.clamped();
        Reassembler {
            config,
            cache,
            blocks: HashMap::new(),
            order: BTreeMap::new(),
            done: HashMap::new(),
            done_order: VecDeque::new(),
            next_seq: 0,
            bytes: 0,
            deliveries: VecDeque::new(),
            stats: ReassemblerStats::default(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &ReassemblerConfig {
        &self.config
    }

    /// Counters and current gauges.
    pub fn stats(&self) -> ReassemblerStats {
        ReassemblerStats {
            blocks_buffered: self.blocks.len(),
            bytes_buffered: self.bytes,
            blocks_remembered: self.done.len(),
            ..self.stats
        }
    }

    #[cfg(test)]
    pub(crate) fn remembered_queue_len(&self) -> usize {
        self.done_order.len()
    }

    /// The next message ready for the application, if any. Drain after every insert.
    #[must_use]
    pub fn poll_delivery(&mut self) -> Option<Delivery> {
        self.deliveries.pop_front()
    }

    /// Whether block `id` is remembered as finished (its shards are stale).
    pub fn is_finished(&self, id: u64) -> bool {
        self.done.contains_key(&id)
    }

    /// Message `message` of block `block` was rebuilt but its receiver could not take it yet
    /// (its idempotency key's message waits for the application elsewhere): it counts as not
    /// delivered, so a later shard of the block rebuilds it again and the receiver judges it
    /// anew. No effect on a block this reassembler does not know.
    pub fn undeliver(&mut self, block: u64, message: u64) {
        if let Some(p) = self.blocks.get_mut(&block) {
            if let Some(bit) = message.checked_sub(p.header.first_message) {
                if bit < 64 {
                    p.delivered &= !(1u64 << bit);
                }
            }
            return;
        }
        if let Some(d) = self.done.get_mut(&block) {
            if let Some(bit) = message.checked_sub(d.first_message) {
                if bit < 64 {
                    d.delivered &= !(1u64 << bit);
                }
            }
            if d.delivered == 0 {
                self.done.remove(&block);
            }
        }
    }

    /// Whether block `id` is held, incomplete.
    pub fn holds(&self, id: u64) -> bool {
        self.blocks.contains_key(&id)
    }

    /// Takes one shard frame of a block whose every message the caller knows was delivered
    /// (its dedupe window says so) and which this reassembler holds no part of: counted as
    /// stale, as if the block were still remembered as finished, instead of opening a new
    /// incomplete block for it. Late copies of long-finished blocks (hedges, retransmissions
    /// queued behind a backlog) would otherwise fill the table of incomplete blocks and evict
    /// blocks still being rebuilt, whose later shards then start afresh and never reach `k`.
    pub fn insert_delivered(&mut self, frame: ShardFrame) -> InsertOutcome {
        let id = frame.header.block;
        if self.blocks.contains_key(&id) || self.done.contains_key(&id) {
            return self.insert(frame);
        }
        if frame.validate(&self.config.limits).is_err() {
            self.stats.shards_malformed += 1;
            return InsertOutcome::Rejected(RejectReason::Malformed);
        }
        self.stats.shards_stale += 1;
        InsertOutcome::Stale {
            messages: frame.header.messages(),
        }
    }

    /// Takes one shard frame.
    pub fn insert(&mut self, frame: ShardFrame) -> InsertOutcome {
        if frame.validate(&self.config.limits).is_err() {
            self.stats.shards_malformed += 1;
            return InsertOutcome::Rejected(RejectReason::Malformed);
        }
        let id = frame.header.block;
        let index = usize::from(frame.index);

        // The common case first: a shard of a block already held. One lookup.
        if let Some(p) = self.blocks.get_mut(&id) {
            if p.header != frame.header {
                self.stats.shards_contradicting += 1;
                return InsertOutcome::Rejected(RejectReason::Contradicts);
            }
            if p.shards[index].is_some() {
                self.stats.shards_duplicate += 1;
                return InsertOutcome::Duplicate;
            }
            let cost = frame.payload.len();
            if self.bytes + cost > self.config.max_bytes && !self.make_room(id, cost, false) {
                return InsertOutcome::Rejected(RejectReason::OverBudget);
            }
            return self.store(id, frame, cost);
        }

        // A block we finished (or evicted after delivering part of it)?
        let count = frame.header.lengths.len();
        let mut revived = None;
        if let Some(d) = self.done.get(&id) {
            if d.first_message != frame.header.first_message || d.count != count {
                self.stats.shards_contradicting += 1;
                return InsertOutcome::Rejected(RejectReason::Contradicts);
            }
            if d.delivered == full_mask(count) {
                self.stats.shards_stale += 1;
                return InsertOutcome::Stale {
                    messages: frame.header.messages(),
                };
            }
            revived = Some(d.delivered);
        }

        let cost = frame.payload.len() + partial_overhead(&frame.header);
        if !self.make_room(id, cost, true) {
            return InsertOutcome::Rejected(RejectReason::OverBudget);
        }
        if revived.is_some() {
            self.done.remove(&id);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id);
        let n = usize::from(frame.header.total_shards);
        self.blocks.insert(
            id,
            Partial {
                header: frame.header.clone(),
                shards: vec![None; n],
                present: 0,
                data_present: 0,
                delivered: revived.unwrap_or(0),
                seq,
                bytes: 0,
            },
        );
        self.store(id, frame, cost)
    }

    /// Evicts the oldest blocks other than `keep` until `cost` more bytes (and, for a new
    /// block, one more block) fit. False, and counted, if they cannot.
    fn make_room(&mut self, keep: u64, cost: usize, new_block: bool) -> bool {
        while self.bytes + cost > self.config.max_bytes
            || (new_block && self.blocks.len() >= self.config.max_blocks.max(1))
        {
            if !self.evict_oldest_except(keep) {
                self.stats.shards_over_budget += 1;
                return false;
            }
        }
        true
    }

    /// Stores a validated, new shard of held block `id` and delivers what it allows.
    fn store(&mut self, id: u64, frame: ShardFrame, cost: usize) -> InsertOutcome {
        let p = self.blocks.get_mut(&id).expect("caller holds the block");
        p.present += 1;
        if frame.index < p.header.data_shards {
            p.data_present += 1;
        }
        p.bytes += cost;
        let index = usize::from(frame.index);
        p.shards[index] = Some(frame.payload);
        self.bytes += cost;
        self.stats.shards_accepted += 1;

        match progress(p, &self.cache, &mut self.deliveries, &mut self.stats) {
            Progress::Pending(delivered) => {
                // Held: copied. A received datagram is a slice of the transport's receive
                // buffer (with GRO, a batch of up to ~64 KB), which a held slice would keep
                // whole; copied, `max_bytes` bounds the memory held, not only the bytes
                // counted. (A shard that completes its block is never held: the common
                // one-shard message stays zero-copy.)
                if let Some(held) = p.shards[index].as_mut() {
                    *held = Bytes::copy_from_slice(held);
                }
                InsertOutcome::Accepted { delivered }
            }
            Progress::Finished(delivered) => {
                let p = self.remove(id);
                self.stats.blocks_completed += 1;
                self.remember(&p.header, p.delivered);
                InsertOutcome::Accepted { delivered }
            }
            Progress::ChecksumMismatch => {
                // Nothing of it was delivered (delivery waits for the checksum). Forgotten,
                // not remembered as finished: shards sent later (a retransmission) may
                // rebuild it intact.
                self.stats.checksum_failures += 1;
                let p = self.remove(id);
                if p.delivered != 0 {
                    self.remember(&p.header, p.delivered);
                }
                InsertOutcome::Rejected(RejectReason::ChecksumMismatch)
            }
        }
    }

    fn remove(&mut self, id: u64) -> Partial {
        let p = self.blocks.remove(&id).expect("caller holds the block");
        self.order.remove(&p.seq);
        self.bytes -= p.bytes;
        p
    }

    /// Evicts the oldest incomplete block other than `keep`. False if there is none.
    fn evict_oldest_except(&mut self, keep: u64) -> bool {
        let Some(id) = self.order.values().copied().find(|&b| b != keep) else {
            return false;
        };
        let p = self.remove(id);
        self.stats.blocks_evicted += 1;
        // Remember what was delivered, so shards arriving later never deliver it again.
        if p.delivered != 0 {
            self.remember(&p.header, p.delivered);
        }
        true
    }

    fn remember(&mut self, h: &BlockHeader, delivered: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.done.insert(
            h.block,
            Done {
                first_message: h.first_message,
                count: h.lengths.len(),
                delivered,
                seq,
            },
        );
        self.done_order.push_back((h.block, seq));
        while self.done.len() > self.config.completed_memory.max(1) {
            let Some((id, seq)) = self.done_order.pop_front() else {
                break;
            };
            if self.done.get(&id).is_some_and(|d| d.seq == seq) {
                self.done.remove(&id);
            }
        }
        // Drop stale order entries so the queue stays bounded too.
        while self
            .done_order
            .front()
            .is_some_and(|&(id, seq)| self.done.get(&id).is_none_or(|d| d.seq != seq))
        {
            self.done_order.pop_front();
        }
    }
}

/// What a block can do after a new shard.
enum Progress {
    /// Still incomplete; this many messages came out.
    Pending(usize),
    /// Every message is out; this many just now.
    Finished(usize),
    /// Rebuilt, but the bytes do not match the checksum; nothing more came out.
    ChecksumMismatch,
}

/// Delivers the block's messages once its bytes are known and match the block checksum:
/// every data shard here (checked as received), or `k` distinct shards (rebuilt, then
/// checked). A message is never delivered from data shards alone before the whole block is
/// checked: a shard with flipped bits must not be delivered (or acked).
fn progress(
    p: &mut Partial,
    cache: &CodecCache,
    deliveries: &mut VecDeque<Delivery>,
    stats: &mut ReassemblerStats,
) -> Progress {
    let h = &p.header;
    let s = u64::from(h.shard_size);
    let k = h.data_shards;
    let count = h.lengths.len();
    let mut delivered = 0;

    if p.data_present == k {
        // Data shards travel trimmed: in index order they are exactly the block's bytes.
        let mut crc = crc32fast::Hasher::new();
        for shard in p.shards[..usize::from(k)].iter().flatten() {
            crc.update(shard);
        }
        if crc.finalize() != h.checksum {
            return Progress::ChecksumMismatch;
        }
        let mut offset = 0u64;
        for (j, &len) in h.lengths.iter().enumerate() {
            let len = u64::from(len);
            if p.delivered & (1 << j) == 0 {
                deliveries.push_back(Delivery {
                    message_id: h.first_message + j as u64,
                    block: h.block,
                    payload: gather(&p.shards, offset, len, s),
                    recovered: false,
                });
                p.delivered |= 1 << j;
                delivered += 1;
            }
            offset += len;
        }
    } else if p.present >= k {
        // Enough shards to rebuild what is missing (the checksum is checked there).
        let Some(data) = rebuild(cache, p) else {
            return Progress::ChecksumMismatch;
        };
        stats.blocks_rebuilt += 1;
        let h = &p.header;
        let mut offset = 0u64;
        for (j, &len) in h.lengths.iter().enumerate() {
            let len = u64::from(len);
            if p.delivered & (1 << j) == 0 {
                deliveries.push_back(Delivery {
                    message_id: h.first_message + j as u64,
                    block: h.block,
                    payload: data.slice(offset as usize..(offset + len) as usize),
                    recovered: true,
                });
                p.delivered |= 1 << j;
                delivered += 1;
                stats.messages_recovered += 1;
            }
            offset += len;
        }
    }

    stats.messages_delivered += delivered as u64;
    if p.delivered == full_mask(count) {
        Progress::Finished(delivered)
    } else {
        Progress::Pending(delivered)
    }
}

/// Bookkeeping bytes charged for an incomplete block, beyond its shard payloads.
fn partial_overhead(h: &BlockHeader) -> usize {
    std::mem::size_of::<Partial>()
        + usize::from(h.total_shards) * std::mem::size_of::<Option<Bytes>>()
        + h.lengths.len() * std::mem::size_of::<u32>()
}

/// Data shard indices that the bytes `offset .. offset + len` occupy (empty for `len = 0`).
fn shard_span(offset: u64, len: u64, s: u64) -> std::ops::Range<usize> {
    if len == 0 {
        return 0..0;
    }
    (offset / s) as usize..((offset + len - 1) / s + 1) as usize
}

/// The bytes `offset .. offset + len` of the block, from received data shards that hold them.
fn gather(shards: &[Option<Bytes>], offset: u64, len: u64, s: u64) -> Bytes {
    let span = shard_span(offset, len, s);
    let piece = |i: usize| {
        let shard = shards[i].as_ref().expect("caller checked presence");
        let base = i as u64 * s;
        let from = offset.max(base) - base;
        let to = (offset + len).min(base + s) - base;
        shard.slice(from as usize..to as usize)
    };
    if span.len() <= 1 {
        return span.map(piece).next().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(len as usize);
    for i in span {
        out.extend_from_slice(&piece(i));
    }
    out.freeze()
}

/// Rebuilds the block's bytes from any `k` of its shards, checking the checksum. `None` when
/// the codec refuses or the checksum does not match.
///
/// The data rows are rebuilt in place in the output buffer: one allocation for the block,
/// one for the parity rows used.
fn rebuild(cache: &CodecCache, p: &Partial) -> Option<Bytes> {
    let h = &p.header;
    let k = usize::from(h.data_shards);
    let s = h.shard_size as usize;
    let codec = cache.get(h.data_shards, h.total_shards)?;
    let (data_shards, parity_shards) = p.shards.split_at(k);
    // Exactly k shards go in: every data shard present, then the first parity shards.
    let parity_needed = k - usize::from(p.data_present);
    let used_parity: Vec<usize> = (0..parity_shards.len())
        .filter(|&j| parity_shards[j].is_some())
        .take(parity_needed)
        .collect();

    let mut data = vec![0u8; k * s];
    let mut parity = vec![0u8; used_parity.len() * s];
    for (row, shard) in data.chunks_mut(s).zip(data_shards) {
        if let Some(shard) = shard {
            row[..shard.len()].copy_from_slice(shard);
        }
    }
    for (row, &j) in parity.chunks_mut(s).zip(&used_parity) {
        row.copy_from_slice(parity_shards[j].as_deref()?);
    }
    let mut slots: Vec<(&mut [u8], bool)> = Vec::with_capacity(p.shards.len());
    slots.extend(
        data.chunks_mut(s)
            .zip(data_shards.iter().map(Option::is_some)),
    );
    let mut parity_rows = parity.chunks_mut(s);
    let mut used = used_parity.iter().peekable();
    for j in 0..parity_shards.len() {
        if used.next_if(|&&u| u == j).is_some() {
            slots.push((parity_rows.next()?, true));
        } else {
            slots.push((Default::default(), false));
        }
    }
    codec.reconstruct_data(&mut slots).ok()?;
    drop(slots);
    data.truncate(h.total_len() as usize);
    (crc32fast::hash(&data) == h.checksum).then(|| Bytes::from(data))
}
