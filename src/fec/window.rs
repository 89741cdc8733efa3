//! The sliding-window code across messages (protocol 2).
//!
//! A message whose envelope fits one datagram travels whole, as a *source* with a sequence
//! number (`seq`, per connection, from 0). A *repair* is a linear combination over GF(2^8)
//! of the consecutive sources `first .. first + count` (`count ≤` [`MAX_WINDOW`]), so one
//! repair helps whichever of them was lost, and the repairs sent after a burst rebuild every
//! source in it. A message's own block code (and a hedge's fresh parity) still covers what
//! the window cannot.
//!
//! # The construction (docs/PROTOCOL.md §9.5 states it for other implementations)
//!
//! - **Source symbol** of a message `id` with envelope `body`:
//!   `L (u16, big-endian) ‖ id (varint) ‖ body ‖ CRC-32 (IEEE, big-endian) of the L bytes`,
//!   where `L = varint_len(id) + len(body)`. A repair over sources of different lengths pads
//!   each with zeros to its own length (the repair's payload length).
//! - **Coefficient** of source `s` in repair `r`: `c(r, s) = 1 / ((0x80 | (r mod 128)) ⊕
//!   (s mod 128))` in GF(2^8) with the polynomial x^8+x^4+x^3+x^2+1 (0x11D), the field of
//!   the block code. These are Cauchy-matrix entries: the two operands always differ in
//!   the high bit, so the sum is never zero, and every square submatrix of a Cauchy matrix
//!   is invertible. So any `L` repairs with distinct `r mod 128` whose windows all cover
//!   the same `L` lost sources rebuild them, whatever else was lost (no random rank
//!   failures as with random coefficients).
//! - **Repair payload** = `Σ c(r, s) · symbol(s)` over the window (each symbol zero-padded).
//!
//! # The decoder's bounds
//!
//! [`WindowDecoder`] keeps the source symbols it received for the last `max_window`
//! sequence numbers (below the highest seen), and at most one pending equation per missing
//! source in that span (online Gauss-Jordan elimination: rows in reduced echelon form, keyed
//! by their lowest unknown, so every source the equations determine is rebuilt at once,
//! whatever order sources and repairs arrive in).
//! So its state is at most `2 × max_window` symbols of at most `max_symbol` bytes each:
//! with the defaults (64, 1,500 B) about 192 KB, and usually the few symbols of the last
//! round trip. What falls below the span is forgotten; an equation that still names a lost
//! source below it is dropped (counted), and that message is left to its hedge.

use std::collections::{BTreeMap, VecDeque};

use bytes::{BufMut, Bytes};
use reed_solomon_erasure::galois_8 as gf;

use crate::wire::{get_varint, put_varint, varint_len, RepairFrame};

/// Most sources one repair may cover: sequence numbers within a window are distinct modulo
/// 128, which keeps the coefficients a Cauchy matrix.
pub const MAX_WINDOW: u64 = 128;

/// Bytes a source symbol adds to the message's id and envelope: the length and the CRC.
pub const SYMBOL_OVERHEAD: usize = 2 + 4;

/// The coefficient of source `seq` in repair `repair`.
pub fn coefficient(repair: u64, seq: u64) -> u8 {
    let x = 0x80 | (repair & 0x7f) as u8;
    let y = (seq & 0x7f) as u8;
    gf::div(1, x ^ y)
}

/// The source symbol of message `id` with envelope `body`, or `None` when `body` is too
/// long for the 16-bit length (a message that long never travels as a source).
pub fn source_symbol(id: u64, body: &[u8]) -> Option<Vec<u8>> {
    let l = varint_len(id) + body.len();
    let l16 = u16::try_from(l).ok()?;
    let mut out = Vec::with_capacity(l + SYMBOL_OVERHEAD);
    out.put_u16(l16);
    put_varint(&mut out, id);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[2..]);
    out.put_u32(crc);
    Some(out)
}

/// Length of the source symbol of message `id` with a `body_len`-byte envelope.
pub fn symbol_len(id: u64, body_len: usize) -> usize {
    varint_len(id) + body_len + SYMBOL_OVERHEAD
}

/// Opens a (possibly zero-padded) source symbol: `(id, body)`, or `None` when its length
/// or CRC does not hold (a repair inconsistent with its sources).
pub fn open_symbol(symbol: &[u8]) -> Option<(u64, Bytes)> {
    let l = usize::from(u16::from_be_bytes([*symbol.first()?, *symbol.get(1)?]));
    let inner = symbol.get(2..2 + l)?;
    let crc = symbol.get(2 + l..2 + l + 4)?;
    if crc32fast::hash(inner).to_be_bytes() != crc {
        return None;
    }
    if symbol[2 + l + 4..].iter().any(|&b| b != 0) {
        return None;
    }
    let mut buf = Bytes::copy_from_slice(inner);
    let id = get_varint(&mut buf).ok()?;
    Some((id, buf))
}

/// `out += c · input` (equal lengths). The `simd-accel` build of `galois_8` indexes the
/// first byte and panics on empty slices (found by the fuzz corpus replay), so those are
/// skipped here.
fn mul_xor(c: u8, input: &[u8], out: &mut [u8]) {
    if !input.is_empty() {
        gf::mul_slice_xor(c, input, out);
    }
}

/// `acc += c · symbol`, growing `acc` with zeros to the symbol's length.
fn add_scaled(acc: &mut Vec<u8>, c: u8, symbol: &[u8]) {
    if acc.len() < symbol.len() {
        acc.resize(symbol.len(), 0);
    }
    mul_xor(c, symbol, &mut acc[..symbol.len()]);
}

/// The repair payload of repair `repair` over `sources` (`first`'s symbol first).
pub fn encode_repair<'a>(
    repair: u64,
    first: u64,
    sources: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut acc = Vec::new();
    for (i, symbol) in sources.into_iter().enumerate() {
        add_scaled(&mut acc, coefficient(repair, first + i as u64), symbol);
    }
    acc
}

/// The sending side: the recent sources' symbols, and repairs over them.
#[derive(Debug)]
pub struct WindowEncoder {
    /// Symbols of sources `base ..`, oldest first.
    sources: VecDeque<Vec<u8>>,
    base: u64,
    next_repair: u64,
    max_window: u64,
}

impl WindowEncoder {
    /// An encoder keeping at most `max_window` (clamped to `1 ..= MAX_WINDOW`) sources.
    pub fn new(max_window: u64) -> Self {
        WindowEncoder {
            sources: VecDeque::new(),
            base: 0,
            next_repair: 0,
            max_window: max_window.clamp(1, MAX_WINDOW),
        }
    }

    /// The sequence number the next source gets.
    pub fn next_seq(&self) -> u64 {
        self.base + self.sources.len() as u64
    }

    /// Lowest sequence number still kept.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Takes a source symbol ([`source_symbol`]); returns its sequence number. The oldest
    /// source is forgotten when the window is full.
    pub fn push(&mut self, symbol: Vec<u8>) -> u64 {
        let seq = self.next_seq();
        self.sources.push_back(symbol);
        while self.sources.len() as u64 > self.max_window {
            self.sources.pop_front();
            self.base += 1;
        }
        seq
    }

    /// Forgets the sources below `seq` (their messages have their outcomes).
    pub fn forget_below(&mut self, seq: u64) {
        while self.base < seq && !self.sources.is_empty() {
            self.sources.pop_front();
            self.base += 1;
        }
    }

    /// A repair over the kept sources from `first` (raised to the oldest kept) to the
    /// newest, or `None` when there is none.
    pub fn repair_from(&mut self, first: u64) -> Option<RepairFrame> {
        let first = first.max(self.base);
        let skip = usize::try_from(first - self.base).ok()?;
        if skip >= self.sources.len() {
            return None;
        }
        let repair = self.next_repair;
        self.next_repair += 1;
        let count = (self.sources.len() - skip) as u64;
        let payload = encode_repair(
            repair,
            first,
            self.sources.iter().skip(skip).map(Vec::as_slice),
        );
        Some(RepairFrame {
            repair,
            first,
            count,
            payload: Bytes::from(payload),
        })
    }

    /// Repairs made so far.
    pub fn repairs_made(&self) -> u64 {
        self.next_repair
    }
}

/// Bounds of a [`WindowDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLimits {
    /// Sequence numbers below the highest seen for which symbols and equations are kept.
    /// Default 64; at most [`MAX_WINDOW`].
    pub max_window: u64,
    /// Longest symbol (a repair's payload) taken; longer repairs are dropped. Default
    /// 16 KiB (`Limits::max_shard_size`).
    pub max_symbol: usize,
}

impl Default for WindowLimits {
    fn default() -> Self {
        WindowLimits {
            max_window: 64,
            max_symbol: 16 * 1024,
        }
    }
}

/// What a [`WindowDecoder`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Sources taken (received whole).
    pub sources: u64,
    /// Repairs taken.
    pub repairs: u64,
    /// Sources rebuilt from repairs.
    pub recovered: u64,
    /// Repairs that brought nothing new (every source they cover was known, or the
    /// equation was a combination of ones held).
    pub redundant: u64,
    /// Repairs or equations dropped: too long, too wide, or naming a lost source that fell
    /// below the window.
    pub dropped: u64,
    /// Rebuilt symbols whose length or CRC did not hold (an inconsistent peer): dropped.
    pub corrupt: u64,
}

/// One equation: `Σ coeffs · unknowns = symbol`, unknowns ascending, the first (the pivot)
/// with coefficient 1 once stored.
#[derive(Clone, Debug)]
struct Row {
    coeffs: Vec<(u64, u8)>,
    symbol: Vec<u8>,
}

impl Row {
    /// `self -= c · other` (GF(2^8): subtraction is addition).
    fn sub_scaled(&mut self, c: u8, other: &Row) {
        add_scaled(&mut self.symbol, c, &other.symbol);
        let mut merged = Vec::with_capacity(self.coeffs.len() + other.coeffs.len());
        let (mut i, mut j) = (0, 0);
        while i < self.coeffs.len() || j < other.coeffs.len() {
            let a = self.coeffs.get(i).copied();
            let b = other.coeffs.get(j).copied();
            match (a, b) {
                (Some((sa, ca)), Some((sb, cb))) if sa == sb => {
                    let v = ca ^ gf::mul(c, cb);
                    if v != 0 {
                        merged.push((sa, v));
                    }
                    i += 1;
                    j += 1;
                }
                (Some((sa, ca)), Some((sb, _))) if sa < sb => {
                    merged.push((sa, ca));
                    i += 1;
                }
                (Some(_), Some((sb, cb))) | (None, Some((sb, cb))) => {
                    merged.push((sb, gf::mul(c, cb)));
                    j += 1;
                }
                (Some(a), None) => {
                    merged.push(a);
                    i += 1;
                }
                (None, None) => break,
            }
        }
        self.coeffs = merged;
    }

    fn scale(&mut self, c: u8) {
        if c == 1 {
            return;
        }
        for (_, v) in &mut self.coeffs {
            *v = gf::mul(c, *v);
        }
        let copy = std::mem::take(&mut self.symbol);
        self.symbol = vec![0; copy.len()];
        mul_xor(c, &copy, &mut self.symbol);
    }

    /// Substitutes the known source `seq` (removes its term).
    fn substitute(&mut self, seq: u64, symbol: &[u8]) {
        if let Ok(i) = self.coeffs.binary_search_by_key(&seq, |&(s, _)| s) {
            let (_, c) = self.coeffs.remove(i);
            add_scaled(&mut self.symbol, c, symbol);
        }
    }
}

/// The receiving side: sources and repairs in, rebuilt sources out.
///
/// Never panics on any input; state bounded as the module doc says.
#[derive(Debug)]
pub struct WindowDecoder {
    limits: WindowLimits,
    /// Symbols of the sources known (received or rebuilt), by sequence number.
    known: BTreeMap<u64, Bytes>,
    /// Pending equations by their pivot (lowest unknown).
    rows: BTreeMap<u64, Row>,
    /// Highest sequence number seen (in a source or a repair's window).
    highest: Option<u64>,
    /// Rebuilt sources not yet polled.
    out: VecDeque<(u64, u64, Bytes)>,
    /// Repair numbers taken lately (at most 256), to count distinct frames.
    repairs_seen: std::collections::BTreeSet<u64>,
    stats: WindowStats,
}

impl WindowDecoder {
    /// A decoder with these limits (`max_window` clamped to `1 ..= MAX_WINDOW`).
    pub fn new(limits: WindowLimits) -> Self {
        WindowDecoder {
            limits: WindowLimits {
                max_window: limits.max_window.clamp(1, MAX_WINDOW),
                max_symbol: limits.max_symbol.max(1),
            },
            known: BTreeMap::new(),
            rows: BTreeMap::new(),
            highest: None,
            out: VecDeque::new(),
            repairs_seen: std::collections::BTreeSet::new(),
            stats: WindowStats::default(),
        }
    }

    /// What it counted.
    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    /// The message ids of the known sources among `first .. first + count` (at most
    /// `max_window` of them).
    pub fn known_ids(&self, first: u64, count: u64) -> Vec<u64> {
        let last = first.saturating_add(count.saturating_sub(1));
        self.known
            .range(first..=last)
            .filter_map(|(_, symbol)| {
                let mut rest = symbol.get(2..)?;
                get_varint(&mut rest).ok()
            })
            .collect()
    }

    /// Whether source `seq` is known (received or rebuilt) within the window.
    pub fn knows(&self, seq: u64) -> bool {
        self.known.contains_key(&seq)
    }

    /// Whether repair number `repair` was taken before (among the last 256 numbers); notes
    /// it. For counting distinct frames: a duplicated datagram is not a second repair.
    pub fn repair_seen(&mut self, repair: u64) -> bool {
        if !self.repairs_seen.insert(repair) {
            return true;
        }
        while self.repairs_seen.len() > 256 {
            self.repairs_seen.pop_first();
        }
        false
    }

    /// Lowest sequence number still in the window.
    fn low(&self) -> u64 {
        self.highest
            .map_or(0, |h| (h + 1).saturating_sub(self.limits.max_window))
    }

    /// Symbols and equations held, for the memory bound's tests.
    pub fn held(&self) -> (usize, usize) {
        (self.known.len(), self.rows.len())
    }

    /// Bytes of symbols held.
    pub fn held_bytes(&self) -> usize {
        self.known.values().map(Bytes::len).sum::<usize>()
            + self.rows.values().map(|r| r.symbol.len()).sum::<usize>()
    }

    fn advance(&mut self, seq: u64) {
        if self.highest.is_some_and(|h| h >= seq) {
            return;
        }
        self.highest = Some(seq);
        let low = self.low();
        self.known = self.known.split_off(&low);
        // A row naming an unknown below the window can never be used now.
        let before = self.rows.len();
        self.rows = self.rows.split_off(&low);
        self.stats.dropped += (before - self.rows.len()) as u64;
    }

    /// Takes a source received whole: its sequence number and symbol
    /// ([`source_symbol`]). Rebuilt sources that it completes can be polled.
    pub fn on_source(&mut self, seq: u64, symbol: Bytes) {
        if seq > crate::wire::MAX_VARINT || symbol.len() > self.limits.max_symbol {
            self.stats.dropped += 1;
            return;
        }
        self.stats.sources += 1;
        self.advance(seq);
        if seq < self.low() || self.known.contains_key(&seq) {
            return;
        }
        self.learn(seq, symbol, false);
    }

    /// Takes a repair. Rebuilt sources can be polled.
    pub fn on_repair(&mut self, frame: &RepairFrame) {
        let count_ok = (1..=self.limits.max_window).contains(&frame.count);
        let Some(last) = frame.first.checked_add(frame.count.saturating_sub(1)) else {
            self.stats.dropped += 1;
            return;
        };
        if !count_ok
            || last > crate::wire::MAX_VARINT
            || frame.payload.is_empty()
            || frame.payload.len() > self.limits.max_symbol
        {
            self.stats.dropped += 1;
            return;
        }
        self.stats.repairs += 1;
        self.advance(last);
        let low = self.low();
        let mut row = Row {
            coeffs: Vec::new(),
            symbol: frame.payload.to_vec(),
        };
        for seq in frame.first..=last {
            let c = coefficient(frame.repair, seq);
            match self.known.get(&seq) {
                Some(symbol) => {
                    if symbol.len() > row.symbol.len() {
                        // Inconsistent with a source longer than the repair: useless.
                        self.stats.dropped += 1;
                        return;
                    }
                    mul_xor(c, symbol, &mut row.symbol[..symbol.len()]);
                }
                None if seq < low => {
                    // A lost source below the window: this equation cannot be used.
                    self.stats.dropped += 1;
                    return;
                }
                None => row.coeffs.push((seq, c)),
            }
        }
        if row.coeffs.is_empty() {
            self.stats.redundant += 1;
            return;
        }
        if !self.insert(row) {
            self.stats.redundant += 1;
        }
        self.solve();
    }

    /// Eliminates `row` against the pivots held and stores what is left; `false` when
    /// nothing was left (a combination of the rows held). The rows stay in reduced echelon
    /// form: each holds its pivot (its lowest unknown, its key) with coefficient 1, and no
    /// other row's pivot. So a source the equations determine is a row of one unknown: a row
    /// with more names an unknown no row pivots on, on which its pivot still depends.
    fn insert(&mut self, mut row: Row) -> bool {
        // Remove every held pivot from the new row (each step brings in only unknowns
        // above that pivot that are no row's pivot, or pivots handled in a later step).
        while let Some((seq, c)) = row
            .coeffs
            .iter()
            .copied()
            .find(|(s, _)| self.rows.contains_key(s))
        {
            let existing = self.rows.get(&seq).expect("found above");
            row.sub_scaled(c, existing);
        }
        let Some(&(pivot, c)) = row.coeffs.first() else {
            return false;
        };
        row.scale(gf::div(1, c));
        // And the new pivot from every other row (their own pivots are below it or not in
        // the new row, so their keys stay their lowest unknowns).
        for other in self.rows.values_mut() {
            if let Ok(i) = other.coeffs.binary_search_by_key(&pivot, |&(s, _)| s) {
                let factor = other.coeffs[i].1;
                other.sub_scaled(factor, &row);
            }
        }
        self.rows.insert(pivot, row);
        true
    }

    /// Solves every row left with one unknown, and what that solves in turn.
    fn solve(&mut self) {
        loop {
            let single = self
                .rows
                .iter()
                .find(|(_, r)| r.coeffs.len() == 1)
                .map(|(&s, _)| s);
            let Some(seq) = single else { return };
            let Some(row) = self.rows.remove(&seq) else {
                return;
            };
            self.learn(seq, Bytes::from(row.symbol), true);
        }
    }

    /// Records source `seq`'s symbol and substitutes it into every row naming it.
    fn learn(&mut self, seq: u64, symbol: Bytes, rebuilt: bool) {
        let mut symbol = symbol;
        if rebuilt {
            match open_symbol(&symbol) {
                Some((id, body)) => {
                    self.stats.recovered += 1;
                    // Without the repair's zero padding: a later, shorter repair over it
                    // must still be able to subtract it.
                    symbol.truncate(symbol_len(id, body.len()));
                    self.out.push_back((seq, id, body));
                }
                None => {
                    // Keep it out of further equations too: they share its inconsistency.
                    self.stats.corrupt += 1;
                    return;
                }
            }
        }
        // A row pivoted on `seq` loses its pivot: take it out and put the rest back.
        let pivoted = self.rows.remove(&seq);
        for row in self.rows.values_mut() {
            row.substitute(seq, &symbol);
        }
        if let Some(mut row) = pivoted {
            row.substitute(seq, &symbol);
            if !row.coeffs.is_empty() {
                self.insert(row);
            }
        }
        // A row keeps its pivot: it is its lowest unknown, and only the row pivoted on
        // `seq` had `seq` as that.
        self.known.insert(seq, symbol);
        self.solve();
    }

    /// A source rebuilt from repairs: `(seq, message id, envelope)`.
    pub fn poll_recovered(&mut self) -> Option<(u64, u64, Bytes)> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests;
