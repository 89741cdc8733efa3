//! The window code's decoder ([`surelink::fec::window::WindowDecoder`], docs/PROTOCOL.md
//! §9.5) under arbitrary operation sequences, for the `window` fuzz target and for
//! `tests/fuzz_corpus.rs`, which replays its corpus under `cargo test` on stable.
//!
//! An honest sender (a [`WindowEncoder`]) sends sources and repairs as datagrams (MESSAGE and
//! REPAIR frames) that are lost, reordered or duplicated on their way; every datagram that
//! arrives goes through `Frame::decode` into the decoder, as on a receiver. Hostile
//! operations add forged sources and repairs: arbitrary fields, well-formed symbols with
//! made-up content, consistent combinations of made-up sources (which rebuild "valid"
//! symbols), real repairs with a byte changed, raw MESSAGE / REPAIR datagrams.
//!
//! Checked after every operation: no panic; `held() ≤ (max_window, max_window)`;
//! `held_bytes() ≤ 2 × max_window × max_symbol`; each rebuilt symbol fits `max_symbol`; one
//! rebuilt message per `stats().recovered`. While the run is still honest (no hostile
//! operation yet): every rebuilt `(seq, id, body)` is exactly what was sent as `seq`, no `seq`
//! is rebuilt twice, and no rebuilt symbol fails its CRC (`stats().corrupt == 0`).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use surelink::fec::window::{
    encode_repair, source_symbol, symbol_len, WindowDecoder, WindowEncoder, WindowLimits,
    MAX_WINDOW,
};
use surelink::wire::{Frame, Limits, MessageFrame, RepairFrame, MAX_VARINT};

const MAX_OPS: usize = 512;
/// Datagrams kept in flight / for replays; older ones are forgotten (lost).
const MAX_IN_FLIGHT: usize = 64;
const MAX_HISTORY: usize = 64;
/// Longest honest envelope: longer than the largest `max_symbol` below, so some sources and
/// their repairs are too long for the decoder.
const MAX_BODY: usize = 300;
/// Type bytes of MESSAGE and REPAIR (docs/PROTOCOL.md §5.8, §5.9).
const TYPE_MESSAGE: u8 = 0x19;
const TYPE_REPAIR: u8 = 0x1a;

/// A sequence number a hostile frame names.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Seq {
    /// Relative to the highest sequence number fed so far (the decoder's window edge).
    Near(i8),
    /// Just below `2^62 - 1` (where `first + count - 1` leaves the varint range).
    Top(u8),
    /// Just below `u64::MAX` (where `first + count - 1` overflows).
    Wrap(u8),
    /// Anything.
    Any(u64),
}

impl Seq {
    fn resolve(self, top: u64) -> u64 {
        match self {
            Seq::Near(d) => top.saturating_add_signed(i64::from(d)),
            Seq::Top(d) => MAX_VARINT - u64::from(d),
            Seq::Wrap(d) => u64::MAX - u64::from(d),
            Seq::Any(s) => s,
        }
    }
}

/// One step of the window target.
#[derive(Arbitrary, Debug)]
enum Op {
    /// The sender sends a new source: id `previous + id_step`, a `len`-byte envelope made
    /// from `fill`; `lost` drops its datagram.
    Send {
        id_step: u16,
        len: u16,
        fill: u8,
        lost: bool,
    },
    /// The sender makes a repair from `back` sources behind its newest to its newest.
    Repair { back: u8, lost: bool },
    /// The sender forgets its sources below `newest - back` (their messages were acked).
    Forget { back: u8 },
    /// The datagram in flight at `index` arrives (so datagrams are reordered).
    Deliver { index: u8 },
    /// Every datagram in flight arrives, in order.
    Flush,
    /// A datagram that arrived before arrives again.
    Replay { index: u8 },
    // ----- hostile -----
    /// A source with arbitrary symbol bytes.
    ForgedSource { seq: Seq, symbol: Vec<u8> },
    /// A MESSAGE with made-up content (a well-formed symbol) at any sequence number.
    FakeMessage { seq: Seq, id: u64, body: Vec<u8> },
    /// A repair with arbitrary fields.
    ForgedRepair {
        repair: u64,
        first: Seq,
        count: u16,
        payload: Vec<u8>,
    },
    /// A repair that is a consistent combination of made-up sources: whatever it rebuilds
    /// alone passes the CRC.
    FakeRepair {
        repair: u8,
        first: Seq,
        sources: Vec<(u64, Vec<u8>)>,
    },
    /// A real repair with one payload byte changed (it still goes out honestly too, lost).
    FlipRepair { back: u8, byte: u16, xor: u8 },
    /// A raw MESSAGE (`repair == false`) or REPAIR datagram: the type byte, then `rest`.
    Raw { repair: bool, rest: Vec<u8> },
}

/// The honest sender's messages by sequence number.
type Sent = HashMap<u64, (u64, Bytes)>;

struct Run {
    dec: WindowDecoder,
    max_window: u64,
    max_symbol: usize,
    limits: Limits,
    /// Highest sequence number named so far (sources, repairs' windows, forged or not).
    top: u64,
    /// No hostile operation yet.
    honest: bool,
    sent: Sent,
    rebuilt: HashSet<u64>,
    polled: u64,
}

impl Run {
    /// Decodes a datagram as a receiver does and feeds a MESSAGE or REPAIR to the decoder.
    fn arrive(&mut self, datagram: Bytes) {
        match Frame::decode(datagram, &self.limits) {
            Ok(Frame::Message(m)) => {
                self.top = self.top.max(m.seq);
                if let Some(symbol) = source_symbol(m.id, &m.body) {
                    self.dec.on_source(m.seq, Bytes::from(symbol));
                }
            }
            Ok(Frame::Repair(r)) => self.repair(&r),
            _ => {}
        }
    }

    fn repair(&mut self, r: &RepairFrame) {
        if let Some(last) = r.first.checked_add(r.count.saturating_sub(1)) {
            if last <= MAX_VARINT && r.count <= MAX_WINDOW {
                self.top = self.top.max(last);
            }
        }
        self.dec.on_repair(r);
    }

    /// Polls everything rebuilt and checks the invariants.
    fn check(&mut self) {
        while let Some((seq, id, body)) = self.dec.poll_recovered() {
            self.polled += 1;
            assert!(
                symbol_len(id, body.len()) <= self.max_symbol,
                "rebuilt seq {seq}: a {}-byte body is longer than max_symbol {}",
                body.len(),
                self.max_symbol
            );
            if self.honest {
                let Some((sent_id, sent_body)) = self.sent.get(&seq) else {
                    panic!("rebuilt seq {seq} (id {id}) was never sent");
                };
                assert_eq!(
                    (id, &body),
                    (*sent_id, sent_body),
                    "rebuilt seq {seq} differs from what was sent"
                );
                assert!(self.rebuilt.insert(seq), "seq {seq} rebuilt twice");
            }
        }
        let stats = self.dec.stats();
        assert_eq!(stats.recovered, self.polled, "{stats:?}");
        if self.honest {
            assert_eq!(
                stats.corrupt, 0,
                "honest traffic rebuilt a corrupt symbol: {stats:?}"
            );
        }
        let (symbols, rows) = self.dec.held();
        assert!(
            symbols as u64 <= self.max_window && rows as u64 <= self.max_window,
            "held ({symbols}, {rows}) over max_window {}",
            self.max_window
        );
        let bytes = self.dec.held_bytes();
        let cap = 2 * self.max_window as usize * self.max_symbol;
        assert!(bytes <= cap, "held_bytes {bytes} over {cap}");
    }
}

fn body(seq: u64, len: usize, fill: u8) -> Bytes {
    (0..len)
        .map(|i| fill.wrapping_add(i as u8).wrapping_mul(seq as u8 | 1))
        .collect::<Vec<u8>>()
        .into()
}

fn message(seq: u64, id: u64, body: Bytes) -> Bytes {
    Frame::Message(MessageFrame { seq, id, body }).to_bytes()
}

/// An arbitrary operation sequence against one `WindowDecoder` with small limits; see the
/// module doc for what is checked.
pub fn window(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let setup: (u8, u8, u8) = u.arbitrary().unwrap_or_default();
    let max_window = [16, 16, 8, 3, 1, 0][usize::from(setup.0) % 6];
    let max_symbol = [256, 256, 64, 0][usize::from(setup.1) % 4];
    // The sender's window may be wider than the receiver's (its wide repairs are dropped).
    let mut enc = WindowEncoder::new(1 + u64::from(setup.2) % 24);
    let mut run = Run {
        dec: WindowDecoder::new(WindowLimits {
            max_window,
            max_symbol,
        }),
        // What the decoder clamps them to.
        max_window: max_window.clamp(1, MAX_WINDOW),
        max_symbol: max_symbol.max(1),
        limits: Limits::default(),
        top: 0,
        honest: true,
        sent: Sent::new(),
        rebuilt: HashSet::new(),
        polled: 0,
    };
    let mut in_flight: VecDeque<Bytes> = VecDeque::new();
    let mut history: VecDeque<Bytes> = VecDeque::new();
    let mut next_id = 0u64;

    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        let mut arrived: Vec<Bytes> = Vec::new();
        match op {
            Op::Send {
                id_step,
                len,
                fill,
                lost,
            } => {
                next_id = (next_id + u64::from(id_step)).min(MAX_VARINT);
                let body = body(enc.next_seq(), usize::from(len) % (MAX_BODY + 1), fill);
                let symbol = source_symbol(next_id, &body).expect("short body");
                let seq = enc.push(symbol);
                run.sent.insert(seq, (next_id, body.clone()));
                if !lost {
                    in_flight.push_back(message(seq, next_id, body));
                }
            }
            Op::Repair { back, lost } => {
                let first = enc.next_seq().saturating_sub(1 + u64::from(back));
                if let Some(r) = enc.repair_from(first) {
                    if !lost {
                        in_flight.push_back(Frame::Repair(r).to_bytes());
                    }
                }
            }
            Op::Forget { back } => enc.forget_below(enc.next_seq().saturating_sub(u64::from(back))),
            Op::Deliver { index } => {
                if !in_flight.is_empty() {
                    let i = usize::from(index) % in_flight.len();
                    arrived.extend(in_flight.remove(i));
                }
            }
            Op::Flush => arrived.extend(in_flight.drain(..)),
            Op::Replay { index } => {
                if !history.is_empty() {
                    arrived.push(history[usize::from(index) % history.len()].clone());
                }
            }
            Op::ForgedSource { seq, symbol } => {
                run.honest = false;
                let seq = seq.resolve(run.top);
                run.top = run.top.max(seq.min(MAX_VARINT));
                run.dec.on_source(seq, Bytes::from(symbol));
            }
            Op::FakeMessage { seq, id, body } => {
                run.honest = false;
                let seq = seq.resolve(run.top).min(MAX_VARINT);
                arrived.push(message(seq, id & MAX_VARINT, Bytes::from(body)));
            }
            Op::ForgedRepair {
                repair,
                first,
                count,
                payload,
            } => {
                run.honest = false;
                let frame = RepairFrame {
                    repair,
                    first: first.resolve(run.top),
                    count: u64::from(count),
                    payload: Bytes::from(payload),
                };
                run.repair(&frame);
            }
            Op::FakeRepair {
                repair,
                first,
                sources,
            } => {
                run.honest = false;
                let symbols: Vec<Vec<u8>> = sources
                    .iter()
                    .take(MAX_WINDOW as usize)
                    .filter_map(|(id, body)| {
                        source_symbol(id & MAX_VARINT, &body[..body.len().min(MAX_BODY)])
                    })
                    .collect();
                if !symbols.is_empty() {
                    let first = first.resolve(run.top);
                    let frame = RepairFrame {
                        repair: u64::from(repair),
                        first,
                        count: symbols.len() as u64,
                        payload: Bytes::from(encode_repair(
                            u64::from(repair),
                            first,
                            symbols.iter().map(Vec::as_slice),
                        )),
                    };
                    run.repair(&frame);
                }
            }
            Op::FlipRepair { back, byte, xor } => {
                run.honest = false;
                let first = enc.next_seq().saturating_sub(1 + u64::from(back));
                if let Some(mut r) = enc.repair_from(first) {
                    let mut payload = r.payload.to_vec();
                    let i = usize::from(byte) % payload.len();
                    payload[i] ^= xor;
                    r.payload = Bytes::from(payload);
                    run.repair(&r);
                }
            }
            Op::Raw { repair, rest } => {
                run.honest = false;
                let mut datagram = vec![if repair { TYPE_REPAIR } else { TYPE_MESSAGE }];
                datagram.extend_from_slice(&rest);
                arrived.push(Bytes::from(datagram));
            }
        }
        for datagram in arrived {
            run.arrive(datagram.clone());
            history.push_back(datagram);
            if history.len() > MAX_HISTORY {
                history.pop_front();
            }
            run.check();
        }
        while in_flight.len() > MAX_IN_FLIGHT {
            in_flight.pop_front();
        }
        run.check();
    }
    // Whatever is still in flight arrives.
    for datagram in in_flight {
        run.arrive(datagram);
        run.check();
    }
}
