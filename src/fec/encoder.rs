//! Building blocks from messages, and the sender's copy of a block.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::CodecCache;
use crate::wire::{varint_len, BlockHeader, Limits};

/// How messages are batched into cross-message blocks by [`Encoder::push`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Longest a message waits for company before its block is closed. Default 2 ms.
    /// Zero sends every message in its own block.
    pub linger: Duration,
    /// Most messages in one block. Default 16 (each message costs a length field in every
    /// shard frame of its block); never more than [`Limits::max_block_messages`].
    pub max_messages: u16,
    /// Most data shards in one batched block. Default 16.
    pub max_data_shards: u16,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            linger: Duration::from_millis(2),
            max_messages: 16,
            max_data_shards: 16,
        }
    }
}

/// Settings of an [`Encoder`].
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    /// Largest datagram the path carries; every shard frame fits in it. Take it from
    /// `quinn::Connection::max_datagram_size()`. Default 1162, quinn's value at the start of
    /// a connection with the default 1200-byte initial MTU.
    pub max_datagram_size: usize,
    /// Limits shared with the peer's decoder. `max_message_len` (default 64 KiB) is the
    /// largest message the datagram path takes.
    pub limits: Limits,
    /// Parity shards a block may ever have, as a share of its data shards: a block of `k`
    /// data shards is coded for `m_max = max(ceil(k × repair_ratio), min_repair)` parity
    /// shards (capped so `k + m_max ≤ Limits::max_shards` and `≤ Limits::max_block_shards`). Parity is computed lazily, so an
    /// unused allowance costs nothing. Default 1.0.
    pub repair_ratio: f32,
    /// Least parity shards a block may ever have. Default 4.
    pub min_repair: u16,
    /// Batching of small messages for [`Encoder::push`].
    pub batch: BatchConfig,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            max_datagram_size: 1162,
            limits: Limits::default(),
            repair_ratio: 1.0,
            min_repair: 4,
            batch: BatchConfig::default(),
        }
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message is larger than the datagram path carries.
    #[error("message of {len} bytes exceeds the datagram path's limit of {max}")]
    MessageTooLong {
        /// Message length.
        len: usize,
        /// `Limits::max_message_len`.
        max: u32,
    },
    /// The datagram size leaves no room for shard bytes after the frame header.
    #[error(
        "datagram size {max_datagram_size} leaves no room after a {overhead}-byte shard header"
    )]
    DatagramTooSmall {
        /// The configured datagram size.
        max_datagram_size: usize,
        /// The shard frame's header size.
        overhead: usize,
    },
    /// The block would need more shards than a code over GF(2^8) (or the limit) allows.
    #[error("block needs {k} data shards plus parity, limit {max} shards")]
    TooManyShards {
        /// Data shards needed.
        k: u64,
        /// The most shards a block may have (`Limits::max_shards`, `max_block_shards`, or
        /// one more than `max_data_shards`).
        max: u16,
    },
    /// A block was asked for with no messages.
    #[error("a block needs at least one message")]
    EmptyBlock,
    /// A block was asked for with more messages than the limit.
    #[error("{count} messages in one block, limit {max}")]
    TooManyMessages {
        /// Messages given.
        count: usize,
        /// `Limits::max_block_messages`.
        max: u16,
    },
}

/// Code parameters chosen for a block.
#[derive(Clone, Copy, Debug)]
struct Plan {
    k: u16,
    n: u16,
    shard_size: u32,
}

/// Messages waiting to be closed into one block.
#[derive(Debug)]
struct Batch {
    block: u64,
    first_message: u64,
    messages: Vec<Bytes>,
    deadline: Instant,
    plan: Plan,
}

/// Turns messages into [`Block`]s. Sans-I/O: time comes in as `now`.
///
/// Two modes, freely mixed on one encoder:
/// - [`Encoder::encode`]: one message, one block, right away.
/// - [`Encoder::push`]: messages gather into a cross-message block until it is full
///   ([`BatchConfig`]) or its linger expires ([`Encoder::poll_timeout`],
///   [`Encoder::handle_timeout`]); finished blocks come out of [`Encoder::poll_block`].
///   A batch holds consecutive message ids only: a gap closes the current batch first.
#[derive(Debug)]
pub struct Encoder {
    config: EncoderConfig,
    cache: CodecCache,
    next_block: u64,
    batch: Option<Batch>,
    ready: std::collections::VecDeque<Block>,
}

impl Encoder {
    /// An encoder with its own codec cache.
    pub fn new(config: EncoderConfig) -> Self {
        Self::with_cache(config, CodecCache::new())
    }

    /// An encoder whose block ids start at `first_block` (a second id space on the same
    /// connection, kept apart from the first).
    pub fn starting_at(config: EncoderConfig, first_block: u64) -> Self {
        Encoder {
            next_block: first_block,
            ..Self::new(config)
        }
    }

    /// An encoder that shares `cache` (for example with a [`super::Reassembler`]).
    pub fn with_cache(mut config: EncoderConfig, cache: CodecCache) -> Self {
        config.limits = config.limits.clamped();
        config.batch.max_messages = config
            .batch
            .max_messages
            .clamp(1, config.limits.max_block_messages);
        config.batch.max_data_shards = config.batch.max_data_shards.max(1);
        Encoder {
            config,
            cache,
            next_block: 0,
            batch: None,
            ready: Default::default(),
        }
    }

    /// The settings in use (limits clamped to what the format represents).
    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    /// Changes the datagram size for blocks built from now on (the path MTU moved).
    pub fn set_max_datagram_size(&mut self, size: usize) {
        self.config.max_datagram_size = size;
    }

    /// Encodes one message as its own block.
    pub fn encode(&mut self, message_id: u64, payload: Bytes) -> Result<Block, EncodeError> {
        self.encode_block(message_id, &[payload])
    }

    /// Encodes one message as its own block of at least `data_shards` data shards (fewer when
    /// the message is short: at most one per byte, and only as many as its shard size needs),
    /// coded for at least `repair` parity shards beyond the configured allowance (so a first
    /// flight of `repair` parity still leaves some for hedges). This is how a tuner's plan
    /// (`k`, `m`) is applied to one message.
    ///
    /// The shard size is `S = ceil(len / data_shards)`, and then the block has
    /// `k = ceil(len / S)` data shards (PROTOCOL.md §9.1), which is below `data_shards` for
    /// some short messages: 5 bytes asked for in 4 shards take shards of 2 bytes, so 3 of
    /// them. A header with `k = 4` and `S = 2` would break the layout rule every receiver
    /// checks (§5.1, `layout_mismatch`).
    pub fn encode_split(
        &mut self,
        message_id: u64,
        payload: Bytes,
        data_shards: u16,
        repair: u16,
    ) -> Result<Block, EncodeError> {
        let block = self.next_block;
        let plan = self.plan_with(
            block,
            message_id,
            [payload.len()],
            u64::from(data_shards),
            u64::from(repair),
        )?;
        self.next_block += 1;
        Ok(self.assemble(block, message_id, &[payload], plan))
    }

    /// Encodes `messages`, with ids `first_message ..`, as one block.
    pub fn encode_block(
        &mut self,
        first_message: u64,
        messages: &[Bytes],
    ) -> Result<Block, EncodeError> {
        let block = self.next_block;
        let plan = self.plan(block, first_message, messages.iter().map(Bytes::len))?;
        self.next_block += 1;
        Ok(self.assemble(block, first_message, messages, plan))
    }

    /// Adds a message to the current cross-message batch. Closed blocks come out of
    /// [`Encoder::poll_block`]; call [`Encoder::handle_timeout`] at [`Encoder::poll_timeout`].
    ///
    /// Fails (and changes nothing) when the message could not be sent even in a block of its
    /// own.
    pub fn push(
        &mut self,
        now: Instant,
        message_id: u64,
        payload: Bytes,
    ) -> Result<(), EncodeError> {
        // Can it go at all? Checked against a block of its own.
        self.plan(self.next_block, message_id, [payload.len()])?;

        if let Some(batch) = &self.batch {
            let batch_cfg = &self.config.batch;
            let consecutive = batch.first_message + batch.messages.len() as u64 == message_id;
            let joined = (consecutive
                && batch.messages.len() < usize::from(batch_cfg.max_messages))
            .then(|| {
                let lengths = batch.messages.iter().map(Bytes::len).chain([payload.len()]);
                self.plan(batch.block, batch.first_message, lengths).ok()
            })
            .flatten()
            .filter(|p| p.k <= batch_cfg.max_data_shards);
            match (joined, self.batch.as_mut()) {
                (Some(plan), Some(batch)) => {
                    batch.messages.push(payload);
                    batch.plan = plan;
                    if batch.messages.len() >= usize::from(self.config.batch.max_messages)
                        || plan.k >= self.config.batch.max_data_shards
                    {
                        self.flush();
                    }
                    return Ok(());
                }
                _ => self.flush(),
            }
        }

        let block = self.next_block;
        self.next_block += 1;
        let plan = self.plan(block, message_id, [payload.len()])?;
        self.batch = Some(Batch {
            block,
            first_message: message_id,
            messages: vec![payload],
            deadline: now + self.config.batch.linger,
            plan,
        });
        if self.config.batch.linger.is_zero()
            || self.config.batch.max_messages <= 1
            || plan.k >= self.config.batch.max_data_shards
        {
            self.flush();
        }
        Ok(())
    }

    /// The next closed block, if any.
    #[must_use]
    pub fn poll_block(&mut self) -> Option<Block> {
        self.ready.pop_front()
    }

    /// When the current batch's linger expires, if a batch is open.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.batch.as_ref().map(|b| b.deadline)
    }

    /// Closes the current batch if its linger has expired at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.batch.as_ref().is_some_and(|b| now >= b.deadline) {
            self.flush();
        }
    }

    /// Closes the current batch now, whatever its linger.
    pub fn flush(&mut self) {
        if let Some(b) = self.batch.take() {
            let block = self.assemble(b.block, b.first_message, &b.messages, b.plan);
            self.ready.push_back(block);
        }
    }

    /// Chooses `k`, `n` and `S` for a block, or says why it cannot be built.
    fn plan(
        &self,
        block: u64,
        first_message: u64,
        lengths: impl IntoIterator<Item = usize>,
    ) -> Result<Plan, EncodeError> {
        self.plan_with(block, first_message, lengths, 1, 0)
    }

    /// [`Encoder::plan`] with at least `want_k` data shards (at most one per byte) and room
    /// for `extra_repair` more parity shards than the allowance.
    fn plan_with(
        &self,
        block: u64,
        first_message: u64,
        lengths: impl IntoIterator<Item = usize>,
        want_k: u64,
        extra_repair: u64,
    ) -> Result<Plan, EncodeError> {
        let limits = &self.config.limits;
        let mut count = 0usize;
        let mut total = 0u64;
        let mut lengths_overhead = 0usize;
        for len in lengths {
            if len > limits.max_message_len as usize {
                return Err(EncodeError::MessageTooLong {
                    len,
                    max: limits.max_message_len,
                });
            }
            count += 1;
            total += len as u64;
            lengths_overhead += varint_len(len as u64);
        }
        if count == 0 {
            return Err(EncodeError::EmptyBlock);
        }
        if count > usize::from(limits.max_block_messages) {
            return Err(EncodeError::TooManyMessages {
                count,
                max: limits.max_block_messages,
            });
        }
        // Header size with k, n, index and S at their widest, so any choice below fits.
        let widest_shard_field = varint_len(u64::from(limits.max_shards));
        let overhead = 1
            + varint_len(block)
            + 3 * widest_shard_field
            + varint_len(self.config.max_datagram_size as u64)
            + varint_len(first_message)
            + varint_len(count as u64)
            + lengths_overhead
            + 4;
        let s_max = self
            .config
            .max_datagram_size
            .saturating_sub(overhead)
            .min(limits.max_shard_size as usize);
        if s_max == 0 {
            return Err(EncodeError::DatagramTooSmall {
                max_datagram_size: self.config.max_datagram_size,
                overhead,
            });
        }
        // What the peer's receiver accepts (with the same limits): `k ≤ max_data_shards`,
        // `n ≤ max_block_shards`, and at least one parity shard must remain possible.
        let max_n = limits.max_shards.min(limits.max_block_shards);
        let max_k = u64::from(limits.max_data_shards);
        let k = BlockHeader::data_shards_for(total, s_max as u32).max(want_k.min(total).min(max_k));
        if k >= u64::from(max_n) || k > u64::from(limits.max_data_shards) {
            return Err(EncodeError::TooManyShards {
                k,
                max: max_n.min(limits.max_data_shards.saturating_add(1)),
            });
        }
        let shard_size = total.div_ceil(k).max(1) as u32;
        // §9.1: `k` follows from `S`. For a `k` asked for above (a tuner's), `S` rounds up
        // and may need fewer data shards than asked (5 bytes in 4 shards: S = 2, k = 3); a
        // header with the `k` asked for would be dropped as a layout mismatch. Never more
        // than asked, so the limits checked above still hold.
        let k = BlockHeader::data_shards_for(total, shard_size);
        let wanted = ((k as f32) * self.config.repair_ratio.max(0.0)).ceil() as u64;
        let m_max = wanted
            .max(u64::from(self.config.min_repair))
            .max(extra_repair + u64::from(self.config.min_repair))
            .clamp(1, u64::from(max_n) - k);
        Ok(Plan {
            k: k as u16,
            n: (k + m_max) as u16,
            shard_size,
        })
    }

    fn assemble(&self, block: u64, first_message: u64, messages: &[Bytes], plan: Plan) -> Block {
        let s = plan.shard_size as usize;
        let mut data = BytesMut::zeroed(usize::from(plan.k) * s);
        let mut at = 0;
        let mut crc = crc32fast::Hasher::new();
        for m in messages {
            data[at..at + m.len()].copy_from_slice(m);
            crc.update(m);
            at += m.len();
        }
        let header = BlockHeader {
            block,
            data_shards: plan.k,
            total_shards: plan.n,
            shard_size: plan.shard_size,
            first_message,
            lengths: messages.iter().map(|m| m.len() as u32).collect(),
            checksum: crc.finalize(),
        };
        let mut head = Vec::with_capacity(16);
        header.encode_head(&mut head);
        let mut tail = Vec::with_capacity(16 + 3 * header.lengths.len());
        header.encode_tail(&mut tail);
        Block {
            header,
            encoded_header: (head, tail),
            data: data.freeze(),
            parity: Bytes::new(),
            repair_sent: 0,
            cache: self.cache.clone(),
        }
    }
}

/// The sender's copy of a block: its data, the parity computed so far, and how much repair
/// has been handed out.
#[derive(Debug)]
pub struct Block {
    header: BlockHeader,
    /// The header's encoding before and after the shard index (see
    /// [`BlockHeader::encode_head`], [`BlockHeader::encode_tail`]).
    encoded_header: (Vec<u8>, Vec<u8>),
    /// `k × S` bytes: the messages, then zero padding.
    data: Bytes,
    /// Parity shards computed so far (a prefix of the `n - k`), `S` bytes each, contiguous.
    parity: Bytes,
    repair_sent: u16,
    cache: CodecCache,
}

impl Block {
    /// The header every shard frame of this block carries.
    pub fn header(&self) -> &BlockHeader {
        &self.header
    }

    /// This block's id.
    pub fn id(&self) -> u64 {
        self.header.block
    }

    /// Ids of the messages in this block.
    pub fn messages(&self) -> std::ops::RangeInclusive<u64> {
        self.header.messages()
    }

    /// Shard frames (ready-to-send datagrams) for all `k` data shards.
    pub fn data_frames(&self) -> Vec<Bytes> {
        self.frames(0..self.header.data_shards)
    }

    /// Up to `count` parity shard frames that this block has not handed out before, in index
    /// order. Fewer (possibly none) once all `n - k` are out; see
    /// [`Block::repair_remaining`].
    pub fn next_repair(&mut self, count: usize) -> Vec<Bytes> {
        let start = self.repair_sent;
        let end = start
            .saturating_add(count.min(usize::from(u16::MAX)) as u16)
            .min(self.header.parity_shards());
        self.ensure_parity(end);
        self.repair_sent = end;
        let k = self.header.data_shards;
        self.frames(k + start..k + end)
    }

    /// Parity shards handed out so far by [`Block::next_repair`].
    pub fn repair_sent(&self) -> u16 {
        self.repair_sent
    }

    /// Parity shards [`Block::next_repair`] can still hand out.
    pub fn repair_remaining(&self) -> u16 {
        self.header.parity_shards() - self.repair_sent
    }

    /// The bytes of shard `index` as they travel on the wire (data shards trimmed), computing
    /// parity if needed. `None` if `index ≥ n`.
    pub fn shard(&mut self, index: u16) -> Option<Bytes> {
        if index < self.header.data_shards {
            return Some(self.data_shard(index));
        }
        let j = index - self.header.data_shards;
        if j >= self.header.parity_shards() {
            return None;
        }
        self.ensure_parity(j + 1);
        let s = self.header.shard_size as usize;
        let at = usize::from(j) * s;
        Some(self.parity.slice(at..at + s))
    }

    /// The shard frame (datagram) for shard `index`. `None` if `index ≥ n`.
    /// Does not count as handing out repair.
    pub fn frame(&mut self, index: u16) -> Option<Bytes> {
        self.shard(index)?;
        self.frames(index..index + 1).pop()
    }

    fn data_shard(&self, index: u16) -> Bytes {
        let s = self.header.shard_size as usize;
        let start = usize::from(index) * s;
        self.data
            .slice(start..start + self.header.shard_wire_len(index))
    }

    /// Frames for `indices` (whose parity must be computed), written into one buffer and
    /// handed out as slices of it: one allocation however many frames. The header halves
    /// around the index are encoded once per block.
    fn frames(&self, indices: std::ops::Range<u16>) -> Vec<Bytes> {
        let h = &self.header;
        let s = h.shard_size as usize;
        let (head, tail) = &self.encoded_header;
        let len = |i: u16| head.len() + varint_len(u64::from(i)) + tail.len() + h.shard_wire_len(i);
        let mut buf = BytesMut::with_capacity(indices.clone().map(len).sum());
        for i in indices.clone() {
            let payload = match i.checked_sub(h.data_shards) {
                None => &self.data[usize::from(i) * s..][..h.shard_wire_len(i)],
                Some(j) => &self.parity[usize::from(j) * s..][..s],
            };
            buf.extend_from_slice(head);
            crate::wire::put_varint(&mut buf, u64::from(i));
            buf.extend_from_slice(tail);
            buf.extend_from_slice(payload);
        }
        let buf = buf.freeze();
        let mut at = 0;
        indices
            .map(|i| {
                let frame = buf.slice(at..at + len(i));
                at += len(i);
                frame
            })
            .collect()
    }

    /// Makes sure the first `upto` parity shards exist. The first call computes just what it
    /// needs with a codec for `(k, k + upto)`; a later one computes all `n - k` with the
    /// codec for `(k, n)`. Both give the same rows: reed-solomon-erasure's matrix is a
    /// Vandermonde matrix times the inverse of its top `k × k` square, so parity row `j`
    /// does not depend on `n` (the test `parity_rows_do_not_depend_on_n` checks this).
    fn ensure_parity(&mut self, upto: u16) {
        let s = self.header.shard_size as usize;
        if usize::from(upto) * s <= self.parity.len() {
            return;
        }
        let k = self.header.data_shards;
        let m = if self.parity.is_empty() {
            upto
        } else {
            self.header.parity_shards()
        };
        let codec = self
            .cache
            .get(k, k + m)
            .expect("k ≥ 1 and 1 ≤ m ≤ n - k by construction");
        let data: Vec<&[u8]> = self.data.chunks(s).collect();
        let mut parity = vec![0u8; usize::from(m) * s];
        let mut rows: Vec<&mut [u8]> = parity.chunks_mut(s).collect();
        codec
            .encode_sep(&data, &mut rows)
            .expect("shard counts and sizes match the codec");
        self.parity = Bytes::from(parity);
    }
}

/// Orders shards from several queues round robin: the first of each queue, then the second
/// of each, and so on. Used on shards of different blocks, it keeps consecutive datagrams,
/// which quinn may coalesce into one packet, from belonging to the same block.
pub fn interleave<T>(queues: impl IntoIterator<Item = Vec<T>>) -> Vec<T> {
    let mut iters: Vec<_> = queues.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(iters.iter().map(|i| i.len()).sum());
    loop {
        let before = out.len();
        for it in &mut iters {
            if let Some(x) = it.next() {
                out.push(x);
            }
        }
        if out.len() == before {
            return out;
        }
    }
}
