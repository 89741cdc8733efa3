//! `docs/PROTOCOL.md` checked against surelink, and against an implementation written from
//! the document alone.
//!
//! The test vectors are parsed out of the document itself (every fenced block whose info
//! string is `vector`), so the document and this test cannot drift apart. Each vector is
//! checked twice:
//!
//! - against surelink's real encoder and decoder (`surelink::wire`, `surelink::fec`): the
//!   bytes decode to the stated frame, the frame encodes to the stated bytes, a block's
//!   parity is what the real encoder produced, and the real reassembler rebuilds the
//!   messages after the stated shards are lost; a window's MESSAGE and REPAIR frames are what
//!   the real window encoder builds, and its window decoder rebuilds the lost sources;
//! - against [`spec`], a second implementation written only from `docs/PROTOCOL.md`
//!   (varints, frames, envelope, CRC-32, GF(2^8), the coding matrix, parity, rebuilding,
//!   the window code's symbols, coefficients, repairs and rebuilding), which calls nothing
//!   in surelink.
//!
//! Then the two implementations are compared on seeded random frames, random blocks, random
//! windows and randomly damaged bytes: they must agree on every frame, every parity byte,
//! every rebuilt message and every rejection reason.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use bytes::Bytes;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use surelink::fec::window::{
    self as window, WindowDecoder, WindowEncoder, WindowLimits, MAX_WINDOW,
};
use surelink::fec::{CodecCache, Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
use surelink::wire::{
    self, AckFrame, BlockHeader, CloseFrame, Envelope, FloorFrame, Frame, HelloFrame, Limits,
    MessageFrame, RefuseFrame, RepairFrame, ReplayedFrame, ShardFrame,
};

const SPEC: &str = include_str!("../docs/PROTOCOL.md");

// ---------------------------------------------------------------------------------------------
// The vectors, as the document writes them (§16.1)
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Vector {
    name: String,
    kind: String,
    /// Line of the opening fence in PROTOCOL.md (1-based), for messages.
    line: usize,
    fields: Vec<(String, String)>,
}

/// The key of a `key: value` line, if it is one (a line without one continues the previous
/// value).
fn split_key(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once(':')?;
    let is_key = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    is_key.then_some((key, value))
}

fn vectors() -> Vec<Vector> {
    let mut out = Vec::new();
    let mut lines = SPEC.lines().enumerate();
    while let Some((at, line)) = lines.next() {
        if line.trim_end() != "```vector" {
            continue;
        }
        let mut fields: Vec<(String, String)> = Vec::new();
        loop {
            let (_, line) = lines
                .next()
                .unwrap_or_else(|| panic!("PROTOCOL.md:{}: unterminated vector", at + 1));
            if line.trim() == "```" {
                break;
            }
            // Text after `#` is a comment.
            let content = line.split('#').next().unwrap_or("").trim_end();
            if content.trim().is_empty() {
                continue;
            }
            match split_key(content) {
                Some((key, value)) => fields.push((key.to_owned(), value.trim().to_owned())),
                None => {
                    let last = fields.last_mut().unwrap_or_else(|| {
                        panic!("PROTOCOL.md:{}: a continuation line with no key", at + 1)
                    });
                    last.1.push(' ');
                    last.1.push_str(content.trim());
                }
            }
        }
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("PROTOCOL.md:{}: a vector without `{key}`", at + 1))
        };
        out.push(Vector {
            name: get("name"),
            kind: get("kind"),
            line: at + 1,
            fields,
        });
    }
    out
}

impl Vector {
    fn all(&self, key: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn get(&self, key: &str) -> Option<&str> {
        let all = self.all(key);
        assert!(all.len() <= 1, "{}: `{key}` given twice", self.name);
        all.first().copied()
    }

    fn req(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("{} (line {}): no `{key}`", self.name, self.line))
    }

    fn num(&self, key: &str) -> u64 {
        number(self.req(key)).unwrap_or_else(|e| panic!("{}: `{key}`: {e}", self.name))
    }

    fn bytes(&self, key: &str) -> Vec<u8> {
        hex(self.req(key)).unwrap_or_else(|e| panic!("{}: `{key}`: {e}", self.name))
    }

    fn list(&self, key: &str) -> Vec<u64> {
        self.req(key)
            .split_whitespace()
            .map(|n| number(n).unwrap_or_else(|e| panic!("{}: `{key}`: {e}", self.name)))
            .collect()
    }

    fn ranges(&self, key: &str) -> Vec<(u64, u64)> {
        self.req(key)
            .split_whitespace()
            .map(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                let n = |s: &str| number(s).unwrap_or_else(|e| panic!("{}: {e}", self.name));
                (n(a), n(b))
            })
            .collect()
    }

    /// What the encoder writes: `canonical` when given, else `hex`.
    fn canonical(&self) -> Vec<u8> {
        match self.get("canonical") {
            Some(c) => hex(c).unwrap_or_else(|e| panic!("{}: `canonical`: {e}", self.name)),
            None => self.bytes("hex"),
        }
    }
}

fn number(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

fn hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() & 1 == 1 {
        return Err(format!("odd number of hex digits in {s:?}"));
    }
    digits
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            u8::from_str_radix(pair, 16).map_err(|e| format!("{pair:?}: {e}"))
        })
        .collect()
}

const FRAME_KINDS: [&str; 9] = [
    "shard", "ack", "hello", "close", "floor", "refuse", "replayed", "message", "repair",
];

/// The frame a vector of a frame kind describes, in the independent implementation's terms.
fn described_frame(v: &Vector) -> spec::Frame {
    match v.kind.as_str() {
        "shard" => spec::Frame::Shard(spec::Shard {
            block: v.num("block"),
            k: v.num("k"),
            n: v.num("n"),
            index: v.num("index"),
            size: v.num("shard_size"),
            first_message: v.num("first_message"),
            lengths: v.list("lengths"),
            checksum: u32::try_from(v.num("checksum")).expect("checksum is 32 bits"),
            payload: v.bytes("payload"),
        }),
        "ack" => spec::Frame::Ack {
            delay: v.num("ack_delay"),
            received: v.num("shards_received"),
            ranges: v.ranges("ranges"),
        },
        "hello" => spec::Frame::Hello {
            channel_id: v
                .bytes("channel_id")
                .try_into()
                .expect("channel_id is 16 bytes"),
            floor: v.num("floor"),
        },
        "close" => spec::Frame::Close {
            code: v.num("code"),
            reason: v.bytes("reason"),
        },
        "floor" => spec::Frame::Floor(v.num("floor")),
        "refuse" => spec::Frame::Refuse {
            reason: v.num("reason"),
            ranges: v.ranges("ranges"),
        },
        "replayed" => spec::Frame::Replayed {
            ranges: v.ranges("ranges"),
        },
        "message" => spec::Frame::Message {
            seq: v.num("seq"),
            id: v.num("id"),
            envelope: v.bytes("envelope"),
        },
        "repair" => spec::Frame::Repair {
            repair: v.num("repair"),
            first: v.num("first"),
            count: v.num("count"),
            payload: v.bytes("payload"),
        },
        other => panic!("{}: {other} is not a frame kind", v.name),
    }
}

// ---------------------------------------------------------------------------------------------
// Between the two implementations
// ---------------------------------------------------------------------------------------------

fn range(r: &RangeInclusive<u64>) -> (u64, u64) {
    (*r.start(), *r.end())
}

fn from_surelink(f: &Frame) -> spec::Frame {
    match f {
        Frame::Shard(s) => {
            let h = &s.header;
            spec::Frame::Shard(spec::Shard {
                block: h.block,
                k: u64::from(h.data_shards),
                n: u64::from(h.total_shards),
                index: u64::from(s.index),
                size: u64::from(h.shard_size),
                first_message: h.first_message,
                lengths: h.lengths.iter().map(|&l| u64::from(l)).collect(),
                checksum: h.checksum,
                payload: s.payload.to_vec(),
            })
        }
        Frame::Ack(a) => spec::Frame::Ack {
            delay: a.ack_delay_us,
            received: a.shards_received,
            ranges: a.ranges.iter().map(range).collect(),
        },
        Frame::Hello(h) => spec::Frame::Hello {
            channel_id: h.channel_id,
            floor: h.floor,
        },
        Frame::Close(c) => spec::Frame::Close {
            code: c.code,
            reason: c.reason.to_vec(),
        },
        Frame::Floor(f) => spec::Frame::Floor(f.floor),
        Frame::Refuse(r) => spec::Frame::Refuse {
            reason: r.reason,
            ranges: r.ranges.iter().map(range).collect(),
        },
        Frame::Replayed(r) => spec::Frame::Replayed {
            ranges: r.ranges.iter().map(range).collect(),
        },
        Frame::Message(m) => spec::Frame::Message {
            seq: m.seq,
            id: m.id,
            envelope: m.body.to_vec(),
        },
        Frame::Repair(r) => spec::Frame::Repair {
            repair: r.repair,
            first: r.first,
            count: r.count,
            payload: r.payload.to_vec(),
        },
    }
}

fn to_surelink(f: &spec::Frame) -> Frame {
    let ranges = |rs: &[(u64, u64)]| rs.iter().map(|&(a, b)| a..=b).collect();
    match f {
        spec::Frame::Shard(s) => Frame::Shard(ShardFrame {
            header: BlockHeader {
                block: s.block,
                data_shards: s.k as u16,
                total_shards: s.n as u16,
                shard_size: s.size as u32,
                first_message: s.first_message,
                lengths: s.lengths.iter().map(|&l| l as u32).collect(),
                checksum: s.checksum,
            },
            index: s.index as u16,
            payload: Bytes::from(s.payload.clone()),
        }),
        spec::Frame::Ack {
            delay,
            received,
            ranges: rs,
        } => Frame::Ack(AckFrame {
            ack_delay_us: *delay,
            shards_received: *received,
            ranges: ranges(rs),
        }),
        spec::Frame::Hello { channel_id, floor } => Frame::Hello(HelloFrame {
            channel_id: *channel_id,
            floor: *floor,
        }),
        spec::Frame::Close { code, reason } => Frame::Close(CloseFrame {
            code: *code,
            reason: Bytes::from(reason.clone()),
        }),
        spec::Frame::Floor(floor) => Frame::Floor(FloorFrame { floor: *floor }),
        spec::Frame::Refuse { reason, ranges: rs } => Frame::Refuse(RefuseFrame {
            reason: *reason,
            ranges: ranges(rs),
        }),
        spec::Frame::Replayed { ranges: rs } => {
            Frame::Replayed(ReplayedFrame { ranges: ranges(rs) })
        }
        spec::Frame::Message { seq, id, envelope } => Frame::Message(MessageFrame {
            seq: *seq,
            id: *id,
            body: Bytes::from(envelope.clone()),
        }),
        spec::Frame::Repair {
            repair,
            first,
            count,
            payload,
        } => Frame::Repair(RepairFrame {
            repair: *repair,
            first: *first,
            count: *count,
            payload: Bytes::from(payload.clone()),
        }),
    }
}

fn surelink_decode(bytes: &[u8]) -> Result<Frame, &'static str> {
    Frame::decode(Bytes::copy_from_slice(bytes), &Limits::default()).map_err(|e| e.reason())
}

// ---------------------------------------------------------------------------------------------
// The vectors against surelink and against the independent implementation
// ---------------------------------------------------------------------------------------------

#[test]
fn the_document_has_a_vector_of_every_kind() {
    let all = vectors();
    let mut names = BTreeSet::new();
    for v in &all {
        assert!(names.insert(&v.name), "vector name {} used twice", v.name);
    }
    let kinds: BTreeSet<&str> = all.iter().map(|v| v.kind.as_str()).collect();
    let known = [
        "shard",
        "ack",
        "hello",
        "close",
        "floor",
        "refuse",
        "replayed",
        "message",
        "repair",
        "stream_message",
        "envelope",
        "invalid",
        "invalid_envelope",
        "invalid_stream",
        "block",
        "window",
    ];
    for kind in &kinds {
        assert!(known.contains(kind), "unknown vector kind {kind}");
    }
    for kind in known {
        assert!(kinds.contains(kind), "no vector of kind {kind}");
    }
    // Both halves of a block: a data shard and a parity shard, and a block that needs
    // parity to rebuild (a lost data shard).
    let shards: Vec<spec::Shard> = all
        .iter()
        .filter(|v| v.kind == "shard")
        .map(|v| match described_frame(v) {
            spec::Frame::Shard(s) => s,
            _ => unreachable!(),
        })
        .collect();
    assert!(shards.iter().any(|s| s.index < s.k));
    assert!(shards.iter().any(|s| s.index >= s.k));
    assert!(all
        .iter()
        .filter(|v| v.kind == "block")
        .any(|v| v.list("lost").iter().any(|&i| i < v.num("k"))));
    // Every key with and without a key, a hello with and without its floor, several ranges.
    assert!(all
        .iter()
        .any(|v| v.kind == "envelope" && v.req("key") == "none"));
    assert!(all
        .iter()
        .any(|v| v.kind == "envelope" && v.req("key") != "none"));
    assert!(all
        .iter()
        .any(|v| v.kind == "hello" && v.get("canonical").is_some()));
    assert!(all
        .iter()
        .any(|v| v.kind == "ack" && v.ranges("ranges").len() >= 3));
    // The window code's rejections, and windows that need what §16.6 promises: a burst of
    // three rebuilt together, sources of different lengths, repairs over different windows,
    // a keyed envelope among the sources.
    let errors: BTreeSet<&str> = all
        .iter()
        .filter(|v| v.kind == "invalid")
        .map(|v| v.req("error"))
        .collect();
    assert!(errors.contains("bad_window"));
    let windows = window_vectors();
    assert!(windows
        .iter()
        .any(|w| w.lost.len() >= 3 && w.lost.windows(2).all(|p| p[1] == p[0] + 1)));
    assert!(windows.iter().any(|w| {
        let lengths: BTreeSet<usize> = w.sources.iter().map(|s| s.2.len()).collect();
        lengths.len() > 1
    }));
    assert!(windows.iter().any(|w| {
        let spans: BTreeSet<(u64, u64)> = w
            .frames
            .iter()
            .filter_map(|f| match spec::decode(f) {
                Ok(spec::Frame::Repair { first, count, .. }) => Some((first, count)),
                _ => None,
            })
            .collect();
        spans.len() > 1
    }));
    assert!(windows.iter().any(|w| w
        .sources
        .iter()
        .any(|s| matches!(spec::decode_envelope(&s.2), Ok((Some(_), _))))));
}

#[test]
fn frame_vectors_match_surelink() {
    let mut checked = 0;
    for v in vectors()
        .iter()
        .filter(|v| FRAME_KINDS.contains(&v.kind.as_str()))
    {
        let want = to_surelink(&described_frame(v));
        let bytes = v.bytes("hex");
        assert_eq!(
            surelink_decode(&bytes),
            Ok(want.clone()),
            "{}: decode",
            v.name
        );
        assert_eq!(
            want.to_bytes().to_vec(),
            v.canonical(),
            "{}: encode",
            v.name
        );
        assert_eq!(
            surelink_decode(&v.canonical()),
            Ok(want),
            "{}: decode canonical",
            v.name
        );
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} frame vectors");
}

#[test]
fn frame_vectors_match_the_spec_implementation() {
    for v in vectors()
        .iter()
        .filter(|v| FRAME_KINDS.contains(&v.kind.as_str()))
    {
        let want = described_frame(v);
        assert_eq!(
            spec::decode(&v.bytes("hex")),
            Ok(want.clone()),
            "{}: decode",
            v.name
        );
        assert_eq!(spec::encode(&want), v.canonical(), "{}: encode", v.name);
    }
}

#[test]
fn invalid_vectors_are_rejected_for_the_stated_reason() {
    let mut checked = 0;
    for v in vectors() {
        if !v.kind.starts_with("invalid") {
            continue;
        }
        let bytes = v.bytes("hex");
        let (surelink, spec) = match v.kind.as_str() {
            "invalid" => (surelink_decode(&bytes).err(), spec::decode(&bytes).err()),
            "invalid_envelope" => (
                Envelope::decode(Bytes::from(bytes.clone()))
                    .err()
                    .map(|e| e.reason()),
                spec::decode_envelope(&bytes).err(),
            ),
            "invalid_stream" => (
                wire::decode_stream_message(Bytes::from(bytes.clone()))
                    .err()
                    .map(|e| e.reason()),
                spec::decode_stream(&bytes).err(),
            ),
            _ => continue,
        };
        let want = v.req("error");
        assert_eq!(surelink, Some(want), "{}: surelink", v.name);
        assert_eq!(spec, Some(want), "{}: spec implementation", v.name);
        checked += 1;
    }
    assert!(checked >= 20, "only {checked} invalid vectors");
}

#[test]
fn envelope_and_stream_vectors() {
    for v in vectors() {
        match v.kind.as_str() {
            "envelope" => {
                let bytes = v.bytes("hex");
                let key = match v.req("key") {
                    "none" => None,
                    _ => Some(v.bytes("key")),
                };
                let payload = v.bytes("payload");
                let e = Envelope::decode(Bytes::from(bytes.clone())).expect(&v.name);
                assert_eq!(e.key.as_deref(), key.as_deref(), "{}", v.name);
                assert_eq!(&e.payload[..], &payload[..], "{}", v.name);
                // Requests and replies (protocol 2): `message_kind`, and a reply's `reply_to`.
                let (kind, spec_kind) = match v.get("message_kind") {
                    None | Some("message") => (wire::Kind::Message, None),
                    Some("request") => (wire::Kind::Request, Some(None)),
                    Some("reply") => {
                        let to = v.num("reply_to");
                        (wire::Kind::Reply { to }, Some(Some(to)))
                    }
                    Some(other) => panic!("{}: message_kind {other}", v.name),
                };
                assert_eq!(e.kind, kind, "{}", v.name);
                assert_eq!(
                    Envelope::encode_kind(key.as_deref(), kind, &payload).to_vec(),
                    bytes,
                    "{}",
                    v.name
                );
                assert_eq!(
                    spec::decode_envelope_kind(&bytes),
                    Ok((key.clone(), spec_kind, payload.clone())),
                    "{}",
                    v.name
                );
                if kind != wire::Kind::Message {
                    continue;
                }
                assert_eq!(
                    spec::decode_envelope(&bytes),
                    Ok((key.clone(), payload.clone())),
                    "{}",
                    v.name
                );
                assert_eq!(
                    spec::encode_envelope(key.as_deref(), &payload),
                    bytes,
                    "{}",
                    v.name
                );
            }
            "stream_message" => {
                let bytes = v.bytes("hex");
                let id = v.num("id");
                let envelope = v.bytes("envelope");
                let (got_id, body) =
                    wire::decode_stream_message(Bytes::from(bytes.clone())).expect(&v.name);
                assert_eq!((got_id, &body[..]), (id, &envelope[..]), "{}", v.name);
                let mut written = wire::encode_stream_head(id).to_vec();
                written.extend_from_slice(&envelope);
                assert_eq!(written, bytes, "{}", v.name);
                assert_eq!(
                    spec::decode_stream(&bytes),
                    Ok((id, envelope.clone())),
                    "{}",
                    v.name
                );
                assert_eq!(spec::encode_stream(id, &envelope), bytes, "{}", v.name);
                // The body is an envelope both implementations read alike.
                assert_eq!(
                    Envelope::decode(body)
                        .map(|e| (e.key.map(|k| k.to_vec()), e.payload.to_vec()))
                        .map_err(|e| e.reason()),
                    spec::decode_envelope(&envelope),
                    "{}",
                    v.name
                );
            }
            _ => {}
        }
    }
}

/// A block vector, read.
struct BlockVector {
    name: String,
    block: u64,
    first_message: u64,
    k: u16,
    n: u16,
    shard_size: u32,
    checksum: u32,
    messages: Vec<Vec<u8>>,
    frames: Vec<Vec<u8>>,
    lost: Vec<u64>,
}

fn block_vectors() -> Vec<BlockVector> {
    vectors()
        .into_iter()
        .filter(|v| v.kind == "block")
        .map(|v| {
            let hexes = |key: &str| -> Vec<Vec<u8>> {
                v.all(key)
                    .iter()
                    .map(|h| hex(h).unwrap_or_else(|e| panic!("{}: {e}", v.name)))
                    .collect()
            };
            BlockVector {
                block: v.num("block"),
                first_message: v.num("first_message"),
                k: v.num("k") as u16,
                n: v.num("n") as u16,
                shard_size: v.num("shard_size") as u32,
                checksum: v.num("checksum") as u32,
                messages: hexes("message"),
                frames: hexes("frame"),
                lost: v.list("lost"),
                name: v.name,
            }
        })
        .collect()
}

#[test]
fn block_vectors_are_what_surelinks_encoder_builds_and_its_reassembler_rebuilds() {
    let blocks = block_vectors();
    assert!(!blocks.is_empty());
    for b in blocks {
        let name = &b.name;
        // An encoder that codes the block for exactly `n` shards.
        let config = EncoderConfig {
            repair_ratio: 0.0,
            min_repair: b.n - b.k,
            ..EncoderConfig::default()
        };
        let mut encoder = Encoder::starting_at(config, b.block);
        let messages: Vec<Bytes> = b.messages.iter().cloned().map(Bytes::from).collect();
        let mut block = if messages.len() == 1 {
            encoder.encode_split(b.first_message, messages[0].clone(), b.k, 0)
        } else {
            encoder.encode_block(b.first_message, &messages)
        }
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let h = block.header().clone();
        assert_eq!(
            (h.block, h.data_shards, h.total_shards, h.shard_size),
            (b.block, b.k, b.n, b.shard_size),
            "{name}: code parameters"
        );
        assert_eq!(h.checksum, b.checksum, "{name}: checksum");

        let mut kept = Vec::new();
        for bytes in &b.frames {
            let Ok(Frame::Shard(shard)) = surelink_decode(bytes) else {
                panic!("{name}: a frame that is not a shard");
            };
            assert_eq!(shard.header, h, "{name}: header of shard {}", shard.index);
            let real = block.frame(shard.index).expect("index below n");
            assert_eq!(real.to_vec(), *bytes, "{name}: shard {}", shard.index);
            if !b.lost.contains(&u64::from(shard.index)) {
                kept.push(shard);
            }
        }
        assert_eq!(
            kept.len() + b.lost.len(),
            b.frames.len(),
            "{name}: every lost index is a frame of the vector"
        );

        let mut reassembler = Reassembler::new(ReassemblerConfig::default());
        for shard in kept {
            reassembler.insert(shard);
        }
        let mut rebuilt = Vec::new();
        while let Some(d) = reassembler.poll_delivery() {
            assert_eq!(d.block, b.block);
            assert_eq!(
                d.recovered,
                b.lost.iter().any(|&i| i < u64::from(b.k)),
                "{name}: recovered"
            );
            rebuilt.push((d.message_id, d.payload.to_vec()));
        }
        let want: Vec<(u64, Vec<u8>)> = (b.first_message..)
            .zip(b.messages.iter().cloned())
            .collect();
        assert_eq!(rebuilt, want, "{name}: rebuilt messages");
    }
}

#[test]
fn block_vectors_match_the_spec_implementation() {
    let gf = spec::Gf::new();
    for b in block_vectors() {
        let name = &b.name;
        let shards: Vec<spec::Shard> = b
            .frames
            .iter()
            .map(|f| match spec::decode(f) {
                Ok(spec::Frame::Shard(s)) => s,
                other => panic!("{name}: {other:?}"),
            })
            .collect();
        let concatenated: Vec<u8> = b.messages.concat();
        let lengths: Vec<u64> = b.messages.iter().map(|m| m.len() as u64).collect();
        for s in &shards {
            assert_eq!(
                (s.block, s.k, s.n, s.size, s.first_message),
                (
                    b.block,
                    u64::from(b.k),
                    u64::from(b.n),
                    u64::from(b.shard_size),
                    b.first_message
                ),
                "{name}"
            );
            assert_eq!(s.lengths, lengths, "{name}: lengths");
            assert_eq!(s.checksum, b.checksum, "{name}: checksum field");
        }
        assert_eq!(spec::crc32(&concatenated), b.checksum, "{name}: CRC-32");

        let data = spec::data_shards(&concatenated, usize::from(b.k), b.shard_size as usize);
        let rows = gf.coding_rows(usize::from(b.k), usize::from(b.n));
        for s in &shards {
            let i = s.index as usize;
            let want = if i < usize::from(b.k) {
                spec::trimmed(&data[i], concatenated.len(), i, b.shard_size as usize)
            } else {
                gf.parity(&rows[i], &data)
            };
            assert_eq!(s.payload, want, "{name}: shard {i}");
        }

        let kept: Vec<(usize, Vec<u8>)> = shards
            .iter()
            .filter(|s| !b.lost.contains(&s.index))
            .map(|s| (s.index as usize, s.payload.clone()))
            .collect();
        let messages = spec::rebuild_block(&gf, &shards[0], &kept).expect("enough shards");
        assert_eq!(messages, b.messages, "{name}: rebuilt");
    }
}

/// A window vector (§16.6), read.
struct WindowVector {
    name: String,
    /// `(seq, id, envelope)`, in seq order.
    sources: Vec<(u64, u64, Vec<u8>)>,
    /// Every frame sent, in send order.
    frames: Vec<Vec<u8>>,
    /// Sequence numbers of the sources lost.
    lost: Vec<u64>,
}

fn window_vectors() -> Vec<WindowVector> {
    vectors()
        .into_iter()
        .filter(|v| v.kind == "window")
        .map(|v| {
            let sources = v
                .all("source")
                .iter()
                .map(|line| {
                    let mut words = line.split_whitespace();
                    let mut n = || {
                        let word = words.next().unwrap_or_else(|| panic!("{}", v.name));
                        number(word).unwrap_or_else(|e| panic!("{}: {e}", v.name))
                    };
                    let (seq, id) = (n(), n());
                    let envelope = hex(&words.collect::<Vec<_>>().join(" "))
                        .unwrap_or_else(|e| panic!("{}: {e}", v.name));
                    (seq, id, envelope)
                })
                .collect();
            let frames = v
                .all("frame")
                .iter()
                .map(|h| hex(h).unwrap_or_else(|e| panic!("{}: {e}", v.name)))
                .collect();
            WindowVector {
                sources,
                frames,
                lost: v.list("lost"),
                name: v.name,
            }
        })
        .collect()
}

/// A window encoder whose next source is `seq` and whose next repair is `repair`, as if the
/// connection had sent that many sources and repairs before (placeholders, forgotten).
fn window_encoder_at(seq: u64, repair: u64) -> WindowEncoder {
    let mut encoder = WindowEncoder::new(MAX_WINDOW);
    assert!(repair == 0 || seq > 0, "repairs before the first source");
    while encoder.next_seq() < seq {
        encoder.push(window::source_symbol(0, &[0]).expect("short"));
    }
    while encoder.repairs_made() < repair {
        encoder.repair_from(0).expect("a placeholder source");
    }
    encoder.forget_below(seq);
    encoder
}

#[test]
fn window_vectors_are_what_surelinks_encoder_builds_and_its_decoder_rebuilds() {
    let windows = window_vectors();
    assert!(windows.len() >= 4, "only {} window vectors", windows.len());
    for w in windows {
        let name = &w.name;
        let first_repair = w
            .frames
            .iter()
            .find_map(|f| match surelink_decode(f) {
                Ok(Frame::Repair(r)) => Some(r.repair),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{name}: no repair"));
        let mut encoder = window_encoder_at(w.sources[0].0, first_repair);
        let mut sources = w.sources.iter();
        let mut decoder = WindowDecoder::new(WindowLimits::default());
        for bytes in &w.frames {
            let frame = surelink_decode(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let built = match &frame {
                Frame::Message(m) => {
                    let &(seq, id, ref envelope) = sources
                        .next()
                        .unwrap_or_else(|| panic!("{name}: more MESSAGE frames than sources"));
                    assert_eq!(
                        (m.seq, m.id, &m.body[..]),
                        (seq, id, &envelope[..]),
                        "{name}: MESSAGE {seq}"
                    );
                    let symbol = window::source_symbol(id, envelope).expect("short");
                    assert_eq!(encoder.push(symbol.clone()), seq, "{name}: seq");
                    if !w.lost.contains(&seq) {
                        decoder.on_source(seq, Bytes::from(symbol));
                    }
                    Frame::Message(MessageFrame {
                        seq,
                        id,
                        body: Bytes::from(envelope.clone()),
                    })
                }
                Frame::Repair(r) => {
                    decoder.on_repair(r);
                    Frame::Repair(
                        encoder
                            .repair_from(r.first)
                            .unwrap_or_else(|| panic!("{name}: no sources for {r:?}")),
                    )
                }
                other => panic!("{name}: {other:?} in a window"),
            };
            assert_eq!(built.to_bytes().to_vec(), *bytes, "{name}: {frame:?}");
        }
        assert!(sources.next().is_none(), "{name}: a source without a frame");

        let mut rebuilt = Vec::new();
        while let Some((seq, id, envelope)) = decoder.poll_recovered() {
            rebuilt.push((seq, id, envelope.to_vec()));
        }
        rebuilt.sort();
        let want: Vec<(u64, u64, Vec<u8>)> = w
            .sources
            .iter()
            .filter(|s| w.lost.contains(&s.0))
            .cloned()
            .collect();
        assert_eq!(
            want.len(),
            w.lost.len(),
            "{name}: every lost seq is a source"
        );
        assert_eq!(rebuilt, want, "{name}: rebuilt sources");
        let stats = decoder.stats();
        assert_eq!((stats.corrupt, stats.dropped), (0, 0), "{name}: {stats:?}");
    }
}

#[test]
fn window_vectors_match_the_spec_implementation() {
    let gf = spec::Gf::new();
    for w in window_vectors() {
        let name = &w.name;
        let mut symbols: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut received = BTreeMap::new();
        let mut repairs = Vec::new();
        let mut sources = w.sources.iter();
        for (i, bytes) in w.frames.iter().enumerate() {
            match spec::decode(bytes) {
                Ok(spec::Frame::Message { seq, id, envelope }) => {
                    let &(want_seq, want_id, ref want_envelope) = sources
                        .next()
                        .unwrap_or_else(|| panic!("{name}: more MESSAGE frames than sources"));
                    assert_eq!(
                        (seq, id, &envelope),
                        (want_seq, want_id, want_envelope),
                        "{name}: frame {i}"
                    );
                    // Sources are consecutive, and the sender numbers them in order.
                    if let Some((&last, _)) = symbols.last_key_value() {
                        assert_eq!(seq, last + 1, "{name}: frame {i}");
                    }
                    let symbol = spec::source_symbol(id, &envelope).expect("short");
                    symbols.insert(seq, symbol.clone());
                    if !w.lost.contains(&seq) {
                        received.insert(seq, symbol);
                    }
                }
                Ok(spec::Frame::Repair {
                    repair,
                    first,
                    count,
                    payload,
                }) => {
                    // A repair covers sources already sent, up to the newest.
                    let window: Vec<Vec<u8>> = (first..first + count)
                        .map(|s| {
                            symbols.get(&s).cloned().unwrap_or_else(|| {
                                panic!("{name}: frame {i} covers unsent source {s}")
                            })
                        })
                        .collect();
                    assert_eq!(
                        symbols.last_key_value().map(|(&s, _)| s),
                        Some(first + count - 1),
                        "{name}: frame {i} ends at the newest source"
                    );
                    assert_eq!(
                        spec::repair_payload(&gf, repair, first, &window),
                        payload,
                        "{name}: frame {i}: payload"
                    );
                    repairs.push(spec::Repair {
                        repair,
                        first,
                        count,
                        payload,
                    });
                }
                other => panic!("{name}: frame {i}: {other:?}"),
            }
        }
        // Repairs are numbered in send order.
        for pair in repairs.windows(2) {
            assert_eq!(pair[1].repair, pair[0].repair + 1, "{name}: repair numbers");
        }
        let want: BTreeMap<u64, (u64, Vec<u8>)> = w
            .sources
            .iter()
            .filter(|s| w.lost.contains(&s.0))
            .map(|(seq, id, envelope)| (*seq, (*id, envelope.clone())))
            .collect();
        assert_eq!(
            spec::rebuild_window(&gf, &received, &repairs),
            want,
            "{name}: rebuilt sources"
        );
    }
}

/// The document's vector `name`.
fn vector(name: &str) -> Vector {
    vectors()
        .into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vector {name}"))
}

#[test]
fn a_wanted_k_gives_s_then_the_k_a_receiver_accepts() {
    // §9.1's example (issue 21): 5 bytes, 4 data shards wanted: S = 2, then k = 3.
    assert_eq!(spec::layout(5, 4), (2, 3));
    let envelope = Bytes::from_static(b"\x00tip7");
    let mut encoder = Encoder::starting_at(
        EncoderConfig {
            repair_ratio: 0.0,
            min_repair: 2,
            ..EncoderConfig::default()
        },
        9,
    );
    let mut block = encoder
        .encode_split(200, envelope.clone(), 4, 0)
        .expect("5 bytes fit");
    let h = block.header().clone();
    assert_eq!((h.data_shards, h.shard_size, h.total_shards), (3, 2, 5));
    // It is the block of the document's vector `block-five-bytes`, shard for shard.
    let five = vector("block-five-bytes");
    assert_eq!((five.num("k"), five.num("shard_size")), (3, 2));
    assert_eq!(five.bytes("message"), envelope.to_vec());
    let frames: Vec<Vec<u8>> = five
        .all("frame")
        .iter()
        .map(|f| hex(f).expect("hex"))
        .collect();
    assert_eq!(frames.len(), 5);
    for (i, want) in frames.iter().enumerate() {
        let real = block.frame(i as u16).expect("below n");
        assert_eq!(real.to_vec(), *want, "block-five-bytes: shard {i}");
    }

    // The header with the k wanted (k = 4, S = 2, total = 5) is `layout_mismatch` in both
    // decoders, and it is the document's vector `invalid-shard-layout-k-first`: shard 0
    // with k rewritten (byte 2).
    let mut k_first = frames[0].clone();
    k_first[2] = 4;
    assert_eq!(surelink_decode(&k_first).err(), Some("layout_mismatch"));
    assert_eq!(spec::decode(&k_first).err(), Some("layout_mismatch"));
    let invalid = vector("invalid-shard-layout-k-first");
    assert_eq!(invalid.req("error"), "layout_mismatch");
    assert_eq!(invalid.bytes("hex"), k_first);

    // Every (total, wanted k): the rule's (S, k) is what surelink's encoder builds, k never
    // exceeds the k wanted, and the frame decodes in both implementations; where the rule's
    // k is smaller, the wanted k with that S is `layout_mismatch` in both.
    let mut smaller = 0;
    for total in 0..=160u64 {
        let payload = Bytes::from(vec![0x5a; total as usize]);
        for want in 1..=64u64 {
            let (size, k) = spec::layout(total, want);
            assert!(k <= want, "total {total}, want {want}");
            assert_eq!(k, total.div_ceil(size).max(1));
            let mut encoder = Encoder::new(EncoderConfig::default());
            let mut block = encoder
                .encode_split(0, payload.clone(), want as u16, 0)
                .unwrap_or_else(|e| panic!("total {total}, want {want}: {e}"));
            let h = block.header().clone();
            assert_eq!(
                (u64::from(h.shard_size), u64::from(h.data_shards)),
                (size, k),
                "total {total}, want {want}"
            );
            let frame = block.frame(0).expect("k ≥ 1").to_vec();
            assert!(
                surelink_decode(&frame).is_ok(),
                "total {total}, want {want}"
            );
            assert!(spec::decode(&frame).is_ok(), "total {total}, want {want}");
            if k < want && want <= total {
                smaller += 1;
                let naive = BlockHeader {
                    data_shards: want as u16,
                    total_shards: h.total_shards.max(want as u16),
                    ..h
                };
                let bytes = Frame::Shard(ShardFrame {
                    index: 0,
                    payload: Bytes::from(vec![0x5a; size.min(total) as usize]),
                    header: naive,
                })
                .to_bytes()
                .to_vec();
                assert_eq!(surelink_decode(&bytes).err(), Some("layout_mismatch"));
                assert_eq!(spec::decode(&bytes).err(), Some("layout_mismatch"));
            }
        }
    }
    assert!(smaller > 100, "only {smaller} cases where k < k wanted");
}

#[test]
fn documented_field_and_crc_check_values() {
    let gf = spec::Gf::new();
    assert_eq!(gf.exp(8), 0x1d);
    assert_eq!(gf.mul(2, 0x30), 0x60);
    assert_eq!(gf.mul(3, 0x31), 0x53);
    assert_eq!(gf.mul(0x80, 2), 0x1d);
    assert_eq!(spec::crc32(b"123456789"), 0xcbf4_3926);
    // §9.5: the window code's coefficients, and surelink's are the same for every (r, s)
    // modulo 128 (and beyond: r and s enter only modulo 128).
    assert_eq!(spec::coefficient(&gf, 0, 0), 0x1b);
    assert_eq!(spec::coefficient(&gf, 1, 2), 0x1d);
    assert_eq!(spec::coefficient(&gf, 129, 133), 0x7c);
    for r in (0..300).chain([1 << 40, spec::MAX_VARINT]) {
        for s in (0..300).chain([1 << 40, spec::MAX_VARINT]) {
            assert_eq!(
                window::coefficient(r, s),
                spec::coefficient(&gf, r, s),
                "c({r}, {s})"
            );
        }
    }
    // §9.2: for k = 1 every row is [1]; for k = 2 row i is [i ^ 1, i].
    for (i, row) in gf.coding_rows(1, 256).iter().enumerate() {
        assert_eq!(row, &vec![1], "k = 1, row {i}");
    }
    for (i, row) in gf.coding_rows(2, 256).iter().enumerate() {
        assert_eq!(row, &vec![i as u8 ^ 1, i as u8], "k = 2, row {i}");
    }
}

#[test]
fn the_documented_matrix_is_the_codecs_matrix() {
    // Coding rows of every k the receiver accepts (k ≤ 64), read out of surelink's codec,
    // equal the rows §9.2 defines: the first 12 parity rows of each k, and every row up to
    // n = 128 for a few k (building a codec for n = 128 costs seconds in a debug build).
    // Data shard c is the unit vector e_c (k bytes), so byte c of parity shard i is M[i][c].
    let gf = spec::Gf::new();
    let cache = CodecCache::new();
    for k in 1..=64usize {
        let n = if [1, 2, 7, 64].contains(&k) {
            128
        } else {
            k + 12
        };
        let codec = cache.get(k as u16, n as u16).expect("a codec");
        let data: Vec<Vec<u8>> = (0..k)
            .map(|c| (0..k).map(|b| u8::from(b == c)).collect())
            .collect();
        let mut parity = vec![vec![0u8; k]; n - k];
        codec.encode_sep(&data, &mut parity).expect("shapes match");
        let rows = gf.coding_rows(k, n);
        for (j, p) in parity.iter().enumerate() {
            assert_eq!(p, &rows[k + j], "k {k}, row {}", k + j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random inputs: the two implementations must agree
// ---------------------------------------------------------------------------------------------

/// A value of a random varint width.
fn any_varint(rng: &mut ChaCha8Rng) -> u64 {
    match rng.random_range(0..4) {
        0 => rng.random_range(0..64),
        1 => rng.random_range(64..16384),
        2 => rng.random_range(16384..1 << 30),
        _ => rng.random_range(1 << 30..=spec::MAX_VARINT),
    }
}

fn random_bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.random()).collect()
}

/// Descending ranges with at least one id between neighbours, none below 0.
fn random_ack_ranges(rng: &mut ChaCha8Rng, count: usize) -> Vec<RangeInclusive<u64>> {
    let width = rng.random_range(1..62);
    let mut end = rng.random_range(0..1u64 << width);
    let mut out = Vec::new();
    for i in 0..count {
        if i > 0 {
            let gap = rng.random_range(0..1000);
            match end.checked_sub(gap + 2) {
                Some(e) => end = e,
                None => break,
            }
        }
        let start = end.saturating_sub(rng.random_range(0..1000));
        out.push(start..=end);
        end = start;
    }
    out
}

fn random_frame(rng: &mut ChaCha8Rng) -> Frame {
    match rng.random_range(0..8) {
        0 => {
            let count = rng.random_range(1..=6);
            let lengths: Vec<u32> = (0..count)
                .map(|_| {
                    if rng.random_bool(0.1) {
                        rng.random_range(0..=65536)
                    } else {
                        rng.random_range(0..300)
                    }
                })
                .collect();
            let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
            // S so that k stays within a code over GF(2^8).
            let least = total.div_ceil(200).max(1);
            let size = rng.random_range(least..=(least + 2000).min(16384).max(least)) as u32;
            let k = BlockHeader::data_shards_for(total, size) as u16;
            let n = (k + rng.random_range(0..=6)).min(256);
            let header = BlockHeader {
                block: any_varint(rng),
                data_shards: k,
                total_shards: n,
                shard_size: size,
                first_message: rng.random_range(0..1 << 40),
                lengths: lengths.into_iter().collect(),
                checksum: rng.random(),
            };
            let index = rng.random_range(0..n);
            let payload = random_bytes(rng, header.shard_wire_len(index));
            Frame::Shard(ShardFrame {
                header,
                index,
                payload: Bytes::from(payload),
            })
        }
        1 => {
            let count = rng.random_range(1..=64);
            Frame::Ack(AckFrame {
                ack_delay_us: any_varint(rng),
                shards_received: any_varint(rng),
                ranges: random_ack_ranges(rng, count),
            })
        }
        2 => Frame::Hello(HelloFrame {
            channel_id: rng.random(),
            floor: any_varint(rng),
        }),
        3 => {
            let len = rng.random_range(0..=256);
            Frame::Close(CloseFrame {
                code: any_varint(rng),
                reason: Bytes::from(random_bytes(rng, len)),
            })
        }
        4 => Frame::Floor(FloorFrame {
            floor: any_varint(rng),
        }),
        5 => {
            // Sometimes the longest envelope a MESSAGE may carry.
            let len = if rng.random_bool(0.01) {
                65536
            } else {
                rng.random_range(0..300)
            };
            Frame::Message(MessageFrame {
                seq: any_varint(rng),
                id: any_varint(rng),
                body: Bytes::from(random_bytes(rng, len)),
            })
        }
        6 => {
            let count = if rng.random_bool(0.1) {
                MAX_WINDOW
            } else {
                rng.random_range(1..=MAX_WINDOW)
            };
            let first = if rng.random_bool(0.05) {
                spec::MAX_VARINT - (count - 1)
            } else {
                any_varint(rng).min(spec::MAX_VARINT - (count - 1))
            };
            let len = if rng.random_bool(0.02) {
                16384
            } else {
                rng.random_range(1..300)
            };
            Frame::Repair(RepairFrame {
                repair: any_varint(rng),
                first,
                count,
                payload: Bytes::from(random_bytes(rng, len)),
            })
        }
        _ => {
            let count = rng.random_range(1..=64);
            Frame::Refuse(RefuseFrame {
                reason: any_varint(rng),
                ranges: (0..count)
                    .map(|_| {
                        let first = any_varint(rng);
                        let extra = rng.random_range(0..=1000).min(spec::MAX_VARINT - first);
                        first..=first + extra
                    })
                    .collect(),
            })
        }
    }
}

#[test]
fn random_frames_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0001);
    for round in 0..3000 {
        let frame = random_frame(&mut rng);
        let bytes = frame.to_bytes().to_vec();
        let decoded = spec::decode(&bytes)
            .unwrap_or_else(|e| panic!("round {round}: spec rejects {frame:?}: {e}"));
        assert_eq!(decoded, from_surelink(&frame), "round {round}");
        let written = spec::encode(&decoded);
        assert_eq!(written, bytes, "round {round}: spec encoding of {frame:?}");
        assert_eq!(surelink_decode(&written), Ok(frame), "round {round}");
    }
}

#[test]
fn damaged_bytes_get_the_same_answer() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0002);
    let mut rejected = BTreeSet::new();
    for round in 0..20_000 {
        let mut bytes = random_frame(&mut rng).to_bytes().to_vec();
        for _ in 0..rng.random_range(1..=3) {
            let at = rng.random_range(0..=bytes.len());
            match rng.random_range(0..6) {
                0 if at < bytes.len() => bytes[at] ^= 1 << rng.random_range(0..8),
                1 if at < bytes.len() => bytes[at] = rng.random(),
                2 => bytes.truncate(at),
                3 => bytes.insert(at, rng.random()),
                4 if at < bytes.len() => {
                    bytes.remove(at);
                }
                // Another type, assigned or not.
                _ if !bytes.is_empty() => bytes[0] = 0x10 | rng.random_range(0..16u8),
                _ => {}
            }
        }
        let theirs = surelink_decode(&bytes).map(|f| from_surelink(&f));
        let ours = spec::decode(&bytes);
        assert_eq!(ours, theirs, "round {round}: {bytes:02x?}");
        if let Err(e) = ours {
            rejected.insert(e);
        }

        // Envelopes and stream heads from the same damaged bytes.
        let envelope = Envelope::decode(Bytes::from(bytes.clone()))
            .map(|e| (e.key.map(|k| k.to_vec()), e.payload.to_vec()))
            .map_err(|e| e.reason());
        assert_eq!(spec::decode_envelope(&bytes), envelope, "round {round}");
        let mut head = bytes.clone();
        if let Some(first) = head.first_mut() {
            *first = 0x15;
        }
        let stream = wire::decode_stream_message(Bytes::from(head.clone()))
            .map(|(id, body)| (id, body.to_vec()))
            .map_err(|e| e.reason());
        assert_eq!(spec::decode_stream(&head), stream, "round {round}");
    }
    // The damage reached most rejection paths, the window code's among them.
    assert!(rejected.len() >= 16, "reasons seen: {rejected:?}");
    assert!(
        rejected.contains("bad_window"),
        "reasons seen: {rejected:?}"
    );
}

/// The window code's frames at their edges: both implementations agree on each, frame or
/// reason.
#[test]
fn window_frame_edges_agree() {
    let mut cases: Vec<Vec<u8>> = Vec::new();
    let repair = |first: u64, count: u64, payload: usize| {
        let mut out = vec![0x1a, 0x05];
        spec::put_varint(&mut out, first);
        spec::put_varint(&mut out, count);
        out.extend(std::iter::repeat_n(0xa5, payload));
        out
    };
    for count in [0, 1, 2, 64, 127, 128, 129, 1 << 20, spec::MAX_VARINT] {
        for first in [
            0,
            1,
            1 << 40,
            spec::MAX_VARINT - 128,
            spec::MAX_VARINT - 1,
            spec::MAX_VARINT,
        ] {
            for payload in [0, 1, 16384, 16385] {
                cases.push(repair(first, count, payload));
            }
        }
    }
    for envelope in [0, 1, 65536, 65537] {
        let mut out = vec![0x19, 0x40, 0x07, 0x2a];
        out.extend(std::iter::repeat_n(0x5a, envelope));
        cases.push(out);
    }
    for cut in 0..6 {
        cases.push(vec![0x19, 0x80, 0, 0, 0x07, 0x2a][..cut].to_vec());
        cases.push(vec![0x1a, 0x80, 0, 0, 0x07, 0x2a, 0x01][..cut].to_vec());
    }
    let mut reasons = BTreeSet::new();
    for bytes in cases {
        let theirs = surelink_decode(&bytes).map(|f| from_surelink(&f));
        let ours = spec::decode(&bytes);
        assert_eq!(ours, theirs, "{:02x?}", &bytes[..bytes.len().min(24)]);
        reasons.insert(ours.map(|_| "ok").unwrap_or_else(|e| e));
    }
    let want = [
        "bad_window",
        "empty",
        "message_too_long",
        "ok",
        "shard_size_out_of_range",
        "truncated",
    ];
    assert_eq!(reasons, want.into_iter().collect(), "outcomes seen");
}

/// What one random window round sent and what each decoder rebuilt from what arrived.
struct WindowRound {
    /// `seq → (id, envelope)` of every source sent.
    sent: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Sequence numbers of the sources that arrived.
    received: BTreeSet<u64>,
    /// The lost sources each decoder rebuilt.
    spec: BTreeMap<u64, (u64, Vec<u8>)>,
    surelink: BTreeMap<u64, (u64, Vec<u8>)>,
}

/// A random window: 1 to 40 sources of 1 to 199 envelope bytes, repairs over random windows
/// ending at the newest source, random loss of both; what arrives goes through both
/// decoders, in send order or (`shuffle`) in a random order.
fn random_window_round(rng: &mut ChaCha8Rng, gf: &spec::Gf, shuffle: bool) -> WindowRound {
    let start = if rng.random_bool(0.3) {
        rng.random_range(1..400)
    } else {
        0
    };
    let first_repair = if start > 0 && rng.random_bool(0.3) {
        rng.random_range(0..300)
    } else {
        0
    };
    let mut encoder = window_encoder_at(start, first_repair);
    let count = rng.random_range(1..=40u64);
    let repairs_per_source: f64 = rng.random_range(0.0..1.5);
    let widest = rng.random_range(1..=40u64);
    let lose_source = rng.random_range(0.0..0.6);
    let lose_repair = rng.random_range(0.0..0.6);
    let mut sent = BTreeMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    for _ in 0..count {
        let id = any_varint(rng);
        let len = rng.random_range(1..200);
        let envelope = random_bytes(rng, len);
        let seq = encoder.push(window::source_symbol(id, &envelope).expect("short"));
        sent.insert(seq, (id, envelope.clone()));
        frames.push(Frame::Message(MessageFrame {
            seq,
            id,
            body: Bytes::from(envelope),
        }));
        let mut earned = repairs_per_source;
        while earned > 0.0 && rng.random_bool(earned.min(1.0)) {
            earned -= 1.0;
            let first = (seq + 1).saturating_sub(rng.random_range(1..=widest));
            frames.push(Frame::Repair(encoder.repair_from(first).expect("sources")));
        }
    }
    let mut arrived: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| {
            let p = match f {
                Frame::Message(_) => lose_source,
                _ => lose_repair,
            };
            !rng.random_bool(p)
        })
        .map(|f| f.to_bytes().to_vec())
        .collect();
    if shuffle {
        arrived.shuffle(rng);
    }

    let mut decoder = WindowDecoder::new(WindowLimits::default());
    let mut received = BTreeMap::new();
    let mut repairs = Vec::new();
    for bytes in &arrived {
        match surelink_decode(bytes) {
            Ok(Frame::Message(m)) => {
                let symbol = window::source_symbol(m.id, &m.body).expect("short");
                decoder.on_source(m.seq, Bytes::from(symbol));
            }
            Ok(Frame::Repair(r)) => decoder.on_repair(&r),
            other => panic!("{other:?}"),
        }
        match spec::decode(bytes) {
            Ok(spec::Frame::Message { seq, id, envelope }) => {
                received.insert(seq, spec::source_symbol(id, &envelope).expect("short"));
            }
            Ok(spec::Frame::Repair {
                repair,
                first,
                count,
                payload,
            }) => repairs.push(spec::Repair {
                repair,
                first,
                count,
                payload,
            }),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(decoder.stats().corrupt, 0);
    // Shuffled, surelink may rebuild a source before its MESSAGE arrives: only the lost
    // ones count.
    let mut rebuilt = BTreeMap::new();
    while let Some((seq, id, envelope)) = decoder.poll_recovered() {
        if !received.contains_key(&seq) {
            let again = rebuilt.insert(seq, (id, envelope.to_vec()));
            assert!(again.is_none(), "source {seq} rebuilt twice");
        }
    }
    let spec = spec::rebuild_window(gf, &received, &repairs);
    for (seq, message) in spec.iter().chain(&rebuilt) {
        assert_eq!(
            Some(message),
            sent.get(seq),
            "source {seq}: not what was sent"
        );
    }
    WindowRound {
        sent,
        received: received.into_keys().collect(),
        spec,
        surelink: rebuilt,
    }
}

/// Random windows, frames arriving in send order: surelink's decoder and the spec's
/// rebuild the same sources with the same bytes, and those are the sources sent.
#[test]
fn random_windows_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0004);
    let gf = spec::Gf::new();
    let (mut lost, mut rebuilt, mut partly, mut jointly) = (0, 0, 0, 0);
    for round in 0..1000 {
        let w = random_window_round(&mut rng, &gf, false);
        assert_eq!(
            w.spec.keys().collect::<Vec<_>>(),
            w.surelink.keys().collect::<Vec<_>>(),
            "round {round}: sources rebuilt (spec, surelink)"
        );
        assert_eq!(w.spec, w.surelink, "round {round}: bytes rebuilt");
        let missing = w.sent.len() - w.received.len();
        lost += missing;
        rebuilt += w.spec.len();
        partly += usize::from(w.spec.len() < missing);
        jointly += usize::from(w.spec.len() >= 2);
    }
    assert!(
        rebuilt >= 2000,
        "only {rebuilt} of {lost} lost sources rebuilt"
    );
    assert!(partly >= 100, "only {partly} rounds left a loss unrebuilt");
    assert!(jointly >= 200, "only {jointly} rounds rebuilt two or more");
}

/// Random windows, frames arriving in a random order: surelink's decoder rebuilds exactly
/// the lost sources the spec's rebuilds, with the same bytes (§9.5: a source is rebuilt when
/// the equations determine it, whatever the order; see
/// `reordered_repairs_rebuild_every_source_they_determine`).
#[test]
fn random_reordered_windows_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0005);
    let gf = spec::Gf::new();
    let mut rebuilt = 0;
    for round in 0..1000 {
        let w = random_window_round(&mut rng, &gf, true);
        assert_eq!(w.spec, w.surelink, "round {round}: sources rebuilt");
        rebuilt += w.surelink.len();
    }
    assert!(rebuilt >= 1000, "only {rebuilt} sources rebuilt");
}

/// §9.5: "A source is rebuilt when the equations determine it", whatever order the frames
/// arrive in. surelink's `WindowDecoder` once kept its equations in echelon form without
/// back substitution, so when frames were reordered it could hold a source's equation only
/// inside combinations with others and never rebuild it (found by this file's reordered
/// property test). Smallest case: three sources, all lost;
/// repair 0 covers source 0 alone (sent after source 0), repair 1 covers sources 0 to 2;
/// repair 1 arrives first. Repair 0 alone determines source 0.
#[test]
fn reordered_repairs_rebuild_every_source_they_determine() {
    let mut encoder = WindowEncoder::new(MAX_WINDOW);
    let messages: [(u64, &[u8]); 3] = [(7, b"\x00a"), (8, b"\x00bc"), (9, b"\x00d")];
    let mut symbols = messages
        .iter()
        .map(|&(id, envelope)| window::source_symbol(id, envelope).expect("short"));
    encoder.push(symbols.next().expect("three"));
    let r0 = encoder.repair_from(0).expect("source 0");
    encoder.push(symbols.next().expect("three"));
    encoder.push(symbols.next().expect("three"));
    let r1 = encoder.repair_from(0).expect("sources 0 to 2");
    assert_eq!((r0.count, r1.count), (1, 3));

    let gf = spec::Gf::new();
    let repairs: Vec<spec::Repair> = [&r1, &r0]
        .iter()
        .map(|r| spec::Repair {
            repair: r.repair,
            first: r.first,
            count: r.count,
            payload: r.payload.to_vec(),
        })
        .collect();
    let ours = spec::rebuild_window(&gf, &BTreeMap::new(), &repairs);
    assert_eq!(
        ours.get(&0),
        Some(&(7, b"\x00a".to_vec())),
        "the spec's decoder"
    );

    let mut decoder = WindowDecoder::new(WindowLimits::default());
    decoder.on_repair(&r1);
    decoder.on_repair(&r0);
    assert_eq!(
        decoder
            .poll_recovered()
            .map(|(seq, id, e)| (seq, id, e.to_vec())),
        Some((0, 7, b"\x00a".to_vec())),
        "surelink's decoder"
    );
}

#[test]
fn random_blocks_agree() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0003);
    let gf = spec::Gf::new();
    let mut built = 0;
    for round in 0..400 {
        let config = EncoderConfig {
            max_datagram_size: rng.random_range(60..=1500),
            repair_ratio: rng.random_range(0.0..2.0),
            min_repair: rng.random_range(0..=6),
            ..EncoderConfig::default()
        };
        let mut encoder = Encoder::starting_at(config, any_varint(&mut rng) >> 2);
        let count = rng.random_range(1..=4);
        let messages: Vec<Bytes> = (0..count)
            .map(|_| {
                let len = rng.random_range(0..400);
                Bytes::from(random_bytes(&mut rng, len))
            })
            .collect();
        let first = rng.random_range(0..1u64 << 40);
        let block = if count == 1 && rng.random_bool(0.5) {
            let (k, m) = (rng.random_range(1..=12), rng.random_range(0..=4));
            encoder.encode_split(first, messages[0].clone(), k, m)
        } else {
            encoder.encode_block(first, &messages)
        };
        // Inputs the encoder refuses (too many shards for the limits) are not blocks.
        let Ok(mut block) = block else { continue };
        let h = block.header().clone();
        built += 1;
        let (k, n, s) = (
            usize::from(h.data_shards),
            usize::from(h.total_shards),
            h.shard_size as usize,
        );
        let frames: Vec<Vec<u8>> = (0..h.total_shards)
            .map(|i| block.frame(i).expect("below n").to_vec())
            .collect();
        let shards: Vec<spec::Shard> = frames
            .iter()
            .map(|f| match spec::decode(f) {
                Ok(spec::Frame::Shard(s)) => s,
                other => panic!("round {round}: {other:?}"),
            })
            .collect();
        let concatenated: Vec<u8> = messages.concat();
        assert_eq!(spec::crc32(&concatenated), h.checksum, "round {round}");
        let data = spec::data_shards(&concatenated, k, s);
        let rows = gf.coding_rows(k, n);
        for shard in &shards {
            let i = shard.index as usize;
            let want = if i < k {
                spec::trimmed(&data[i], concatenated.len(), i, s)
            } else {
                gf.parity(&rows[i], &data)
            };
            assert_eq!(
                shard.payload, want,
                "round {round}: shard {i} of k {k}, n {n}"
            );
        }

        // Any k shards rebuild the block, in both implementations.
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        order.truncate(k);
        let kept: Vec<(usize, Vec<u8>)> = order
            .iter()
            .map(|&i| (i, shards[i].payload.clone()))
            .collect();
        let ours = spec::rebuild_block(&gf, &shards[0], &kept).expect("k shards");
        let want: Vec<Vec<u8>> = messages.iter().map(|m| m.to_vec()).collect();
        assert_eq!(ours, want, "round {round}: spec rebuild from {order:?}");
        let mut reassembler = Reassembler::new(ReassemblerConfig::default());
        for &i in &order {
            let Ok(Frame::Shard(shard)) = surelink_decode(&frames[i]) else {
                panic!("round {round}: shard {i} does not decode");
            };
            reassembler.insert(shard);
        }
        let mut theirs = Vec::new();
        while let Some(d) = reassembler.poll_delivery() {
            theirs.push(d.payload.to_vec());
        }
        assert_eq!(
            theirs, want,
            "round {round}: surelink rebuild from {order:?}"
        );
    }
    assert!(built >= 300, "only {built} blocks built");
}

// ---------------------------------------------------------------------------------------------
// The independent implementation: written from docs/PROTOCOL.md only. Nothing below calls
// surelink.
// ---------------------------------------------------------------------------------------------

mod spec {
    use std::collections::{BTreeMap, BTreeSet};

    /// §4: the largest varint.
    pub const MAX_VARINT: u64 = (1 << 62) - 1;
    // §6.2: the limits a decoder enforces.
    const MAX_SHARDS: u64 = 256;
    const MAX_SHARD_SIZE: u64 = 16384;
    const MAX_MESSAGE_LEN: u64 = 65536;
    const MAX_BLOCK_MESSAGES: u64 = 64;
    const MAX_RANGES: u64 = 64;
    const MAX_CLOSE_REASON: u64 = 256;
    // §8.1.
    const MAX_KEY_LEN: u64 = 255;
    /// §5.9: the most sources one repair covers.
    pub const MAX_WINDOW: u64 = 128;

    /// A rejection reason, named as in §14.1.
    pub type Error = &'static str;

    /// §5.1.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Shard {
        pub block: u64,
        pub k: u64,
        pub n: u64,
        pub index: u64,
        pub size: u64,
        pub first_message: u64,
        pub lengths: Vec<u64>,
        pub checksum: u32,
        pub payload: Vec<u8>,
    }

    /// §5. Ranges are `(start, end)`, inclusive, in wire order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Frame {
        Shard(Shard),
        Ack {
            delay: u64,
            received: u64,
            ranges: Vec<(u64, u64)>,
        },
        Hello {
            channel_id: [u8; 16],
            floor: u64,
        },
        Close {
            code: u64,
            reason: Vec<u8>,
        },
        Floor(u64),
        Refuse {
            reason: u64,
            ranges: Vec<(u64, u64)>,
        },
        Replayed {
            ranges: Vec<(u64, u64)>,
        },
        /// §5.8 (protocol 2).
        Message {
            seq: u64,
            id: u64,
            envelope: Vec<u8>,
        },
        /// §5.9 (protocol 2).
        Repair {
            repair: u64,
            first: u64,
            count: u64,
            payload: Vec<u8>,
        },
    }

    struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        fn left(&self) -> u64 {
            self.rest.len() as u64
        }

        fn take(&mut self, n: u64) -> Result<&'a [u8], Error> {
            if self.left() < n {
                return Err("truncated");
            }
            let (head, rest) = self.rest.split_at(n as usize);
            self.rest = rest;
            Ok(head)
        }

        /// §4: two high bits give the length; accepts non-minimal encodings.
        fn varint(&mut self) -> Result<u64, Error> {
            let first = *self.rest.first().ok_or("truncated")?;
            let len = 1u64 << (first >> 6);
            let bytes = self.take(len)?;
            let mut v = u64::from(first & 0x3f);
            for &b in &bytes[1..] {
                v = (v << 8) | u64::from(b);
            }
            Ok(v)
        }

        fn u32(&mut self) -> Result<u32, Error> {
            let b = self.take(4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
    }

    /// §4: the minimal encoding.
    pub fn put_varint(out: &mut Vec<u8>, v: u64) {
        assert!(v <= MAX_VARINT);
        if v < 1 << 6 {
            out.push(v as u8);
        } else if v < 1 << 14 {
            out.extend_from_slice(&(0x4000 | v as u16).to_be_bytes());
        } else if v < 1 << 30 {
            out.extend_from_slice(&(0x8000_0000 | v as u32).to_be_bytes());
        } else {
            out.extend_from_slice(&(0xc000_0000_0000_0000 | v).to_be_bytes());
        }
    }

    /// One datagram (§4, §5, checks in the order of §14.1).
    pub fn decode(bytes: &[u8]) -> Result<Frame, Error> {
        let (&ty, rest) = bytes.split_first().ok_or("empty")?;
        if ty >> 4 != 1 {
            return Err("unsupported_version");
        }
        let mut r = Reader { rest };
        let frame = match ty & 0x0f {
            0x1 => Frame::Shard(shard(&mut r)?),
            0x2 => ack(&mut r)?,
            0x3 => {
                let channel_id: [u8; 16] = r.take(16)?.try_into().expect("16 bytes");
                let floor = if r.left() > 0 { r.varint()? } else { 0 };
                Frame::Hello { channel_id, floor }
            }
            0x4 => {
                let code = r.varint()?;
                let len = r.varint()?;
                if len > MAX_CLOSE_REASON {
                    return Err("reason_too_long");
                }
                Frame::Close {
                    code,
                    reason: r.take(len)?.to_vec(),
                }
            }
            0x6 => Frame::Floor(r.varint()?),
            0x7 => refuse(&mut r)?,
            0x8 => Frame::Replayed {
                ranges: id_ranges(&mut r)?,
            },
            // §5.8: the envelope is the rest of the datagram.
            0x9 => {
                let seq = r.varint()?;
                let id = r.varint()?;
                if r.left() > MAX_MESSAGE_LEN {
                    return Err("message_too_long");
                }
                let envelope = r.take(r.left())?.to_vec();
                Frame::Message { seq, id, envelope }
            }
            // §5.9: the payload is the rest of the datagram.
            0xa => {
                let repair = r.varint()?;
                let first = r.varint()?;
                let count = r.varint()?;
                // `1 ≤ count ≤ 128` and `first + count - 1 ≤ 2^62 - 1`.
                if count == 0 || count > MAX_WINDOW || first > MAX_VARINT - (count - 1) {
                    return Err("bad_window");
                }
                if r.left() == 0 {
                    return Err("truncated");
                }
                if r.left() > MAX_SHARD_SIZE {
                    return Err("shard_size_out_of_range");
                }
                let payload = r.take(r.left())?.to_vec();
                Frame::Repair {
                    repair,
                    first,
                    count,
                    payload,
                }
            }
            _ => return Err("unknown_type"),
        };
        if r.left() > 0 {
            return Err("trailing_bytes");
        }
        Ok(frame)
    }

    fn shard(r: &mut Reader<'_>) -> Result<Shard, Error> {
        let block = r.varint()?;
        let k = r.varint()?;
        let n = r.varint()?;
        let index = r.varint()?;
        let size = r.varint()?;
        let first_message = r.varint()?;
        let count = r.varint()?;
        if count > MAX_BLOCK_MESSAGES {
            return Err("too_many_messages");
        }
        if r.left() < count {
            return Err("truncated");
        }
        let mut lengths = Vec::new();
        for _ in 0..count {
            let len = r.varint()?;
            if len > MAX_MESSAGE_LEN {
                return Err("message_too_long");
            }
            lengths.push(len);
        }
        let checksum = r.u32()?;
        if n > MAX_SHARDS {
            return Err("too_many_shards");
        }
        if k == 0 {
            return Err("zero_data_shards");
        }
        if k > n {
            return Err("k_exceeds_n");
        }
        if index >= n {
            return Err("index_out_of_range");
        }
        if size == 0 || size > MAX_SHARD_SIZE {
            return Err("shard_size_out_of_range");
        }
        if count == 0 {
            return Err("no_messages");
        }
        if first_message > MAX_VARINT - (count - 1) {
            return Err("message_id_overflow");
        }
        let total: u64 = lengths.iter().sum();
        if total.div_ceil(size).max(1) != k {
            return Err("layout_mismatch");
        }
        let expected = if index < k {
            size.min(total.saturating_sub(index * size))
        } else {
            size
        };
        if r.left() < expected {
            return Err("shard_len_mismatch");
        }
        if r.left() > expected {
            return Err("trailing_bytes");
        }
        let payload = r.take(expected)?.to_vec();
        Ok(Shard {
            block,
            k,
            n,
            index,
            size,
            first_message,
            lengths,
            checksum,
            payload,
        })
    }

    fn ack(r: &mut Reader<'_>) -> Result<Frame, Error> {
        let delay = r.varint()?;
        let received = r.varint()?;
        let largest = r.varint()?;
        let extra = r.varint()?;
        if extra >= MAX_RANGES {
            return Err("too_many_ack_ranges");
        }
        if r.left() < 1 + 2 * extra {
            return Err("truncated");
        }
        let first = r.varint()?;
        let mut start = largest.checked_sub(first).ok_or("invalid_ack_range")?;
        let mut ranges = vec![(start, largest)];
        for _ in 0..extra {
            let gap = r.varint()?;
            let len = r.varint()?;
            let end = start.checked_sub(gap + 2).ok_or("invalid_ack_range")?;
            start = end.checked_sub(len).ok_or("invalid_ack_range")?;
            ranges.push((start, end));
        }
        Ok(Frame::Ack {
            delay,
            received,
            ranges,
        })
    }

    fn refuse(r: &mut Reader<'_>) -> Result<Frame, Error> {
        let reason = r.varint()?;
        let ranges = id_ranges(r)?;
        Ok(Frame::Refuse { reason, ranges })
    }

    /// REFUSE's and REPLAYED's `count` and `(first, extra)` pairs.
    fn id_ranges(r: &mut Reader<'_>) -> Result<Vec<(u64, u64)>, Error> {
        let count = r.varint()?;
        if count == 0 {
            return Err("invalid_refuse_range");
        }
        if count > MAX_RANGES {
            return Err("too_many_ack_ranges");
        }
        if r.left() < 2 * count {
            return Err("truncated");
        }
        let mut ranges = Vec::new();
        for _ in 0..count {
            let first = r.varint()?;
            let extra = r.varint()?;
            let last = first
                .checked_add(extra)
                .filter(|&l| l <= MAX_VARINT)
                .ok_or("invalid_refuse_range")?;
            ranges.push((first, last));
        }
        Ok(ranges)
    }

    fn put_ranges(out: &mut Vec<u8>, ranges: &[(u64, u64)]) {
        put_varint(out, ranges.len() as u64);
        for &(first, last) in ranges {
            put_varint(out, first);
            put_varint(out, last - first);
        }
    }

    pub fn encode(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        match frame {
            Frame::Shard(s) => {
                out.push(0x11);
                for v in [s.block, s.k, s.n, s.index, s.size, s.first_message] {
                    put_varint(&mut out, v);
                }
                put_varint(&mut out, s.lengths.len() as u64);
                for &l in &s.lengths {
                    put_varint(&mut out, l);
                }
                out.extend_from_slice(&s.checksum.to_be_bytes());
                out.extend_from_slice(&s.payload);
            }
            Frame::Ack {
                delay,
                received,
                ranges,
            } => {
                out.push(0x12);
                put_varint(&mut out, *delay);
                put_varint(&mut out, *received);
                let (start, largest) = ranges[0];
                put_varint(&mut out, largest);
                put_varint(&mut out, ranges.len() as u64 - 1);
                put_varint(&mut out, largest - start);
                let mut previous_start = start;
                for &(start, end) in &ranges[1..] {
                    put_varint(&mut out, previous_start - end - 2);
                    put_varint(&mut out, end - start);
                    previous_start = start;
                }
            }
            Frame::Hello { channel_id, floor } => {
                out.push(0x13);
                out.extend_from_slice(channel_id);
                put_varint(&mut out, *floor);
            }
            Frame::Close { code, reason } => {
                out.push(0x14);
                put_varint(&mut out, *code);
                put_varint(&mut out, reason.len() as u64);
                out.extend_from_slice(reason);
            }
            Frame::Floor(floor) => {
                out.push(0x16);
                put_varint(&mut out, *floor);
            }
            Frame::Refuse { reason, ranges } => {
                out.push(0x17);
                put_varint(&mut out, *reason);
                put_ranges(&mut out, ranges);
            }
            Frame::Replayed { ranges } => {
                out.push(0x18);
                put_ranges(&mut out, ranges);
            }
            Frame::Message { seq, id, envelope } => {
                out.push(0x19);
                put_varint(&mut out, *seq);
                put_varint(&mut out, *id);
                out.extend_from_slice(envelope);
            }
            Frame::Repair {
                repair,
                first,
                count,
                payload,
            } => {
                out.push(0x1a);
                put_varint(&mut out, *repair);
                put_varint(&mut out, *first);
                put_varint(&mut out, *count);
                out.extend_from_slice(payload);
            }
        }
        out
    }

    /// §8.1: `(key, payload)`.
    pub fn decode_envelope(bytes: &[u8]) -> Result<(Option<Vec<u8>>, Vec<u8>), Error> {
        decode_envelope_kind(bytes).map(|(key, _, payload)| (key, payload))
    }

    /// §8.1 with its kind: `None` a message, `Some(None)` a request, `Some(Some(to))` a
    /// reply to request `to`.
    #[allow(clippy::type_complexity)]
    pub fn decode_envelope_kind(
        bytes: &[u8],
    ) -> Result<(Option<Vec<u8>>, Option<Option<u64>>, Vec<u8>), Error> {
        let (&flags, rest) = bytes.split_first().ok_or("empty")?;
        if flags & !7 != 0 || flags & 6 == 6 {
            return Err("unknown_envelope_flags");
        }
        let mut r = Reader { rest };
        let key = if flags & 1 == 1 {
            let len = r.varint()?;
            if len == 0 || len > MAX_KEY_LEN {
                return Err("key_length");
            }
            Some(r.take(len)?.to_vec())
        } else {
            None
        };
        let kind = match flags & 6 {
            2 => Some(None),
            4 => Some(Some(r.varint()?)),
            _ => None,
        };
        Ok((key, kind, r.rest.to_vec()))
    }

    pub fn encode_envelope(key: Option<&[u8]>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match key {
            Some(key) => {
                out.push(0x01);
                put_varint(&mut out, key.len() as u64);
                out.extend_from_slice(key);
            }
            None => out.push(0x00),
        }
        out.extend_from_slice(payload);
        out
    }

    /// §12: `(id, envelope)`.
    pub fn decode_stream(bytes: &[u8]) -> Result<(u64, Vec<u8>), Error> {
        let (&ty, rest) = bytes.split_first().ok_or("empty")?;
        if ty >> 4 != 1 {
            return Err("unsupported_version");
        }
        if ty != 0x15 {
            return Err("unknown_type");
        }
        let mut r = Reader { rest };
        let id = r.varint()?;
        Ok((id, r.rest.to_vec()))
    }

    pub fn encode_stream(id: u64, envelope: &[u8]) -> Vec<u8> {
        let mut out = vec![0x15];
        put_varint(&mut out, id);
        out.extend_from_slice(envelope);
        out
    }

    /// §9.4: CRC-32/ISO-HDLC, bit by bit.
    pub fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// §9.1 step 2: `(S, k)` for a block of `total` bytes whose sender wants `want_k` data
    /// shards: `S` from the wanted `k`, then the `k` it sends from `S`.
    pub fn layout(total: u64, want_k: u64) -> (u64, u64) {
        assert!(want_k >= 1);
        let size = total.div_ceil(want_k).max(1);
        (size, total.div_ceil(size).max(1))
    }

    /// §9.1: the block's bytes, padded and cut into `k` data shards of `size` bytes.
    pub fn data_shards(block: &[u8], k: usize, size: usize) -> Vec<Vec<u8>> {
        let mut padded = block.to_vec();
        padded.resize(k * size, 0);
        padded.chunks(size).map(<[u8]>::to_vec).collect()
    }

    /// §9.1: what data shard `i` carries on the wire.
    pub fn trimmed(shard: &[u8], total: usize, i: usize, size: usize) -> Vec<u8> {
        shard[..size.min(total.saturating_sub(i * size))].to_vec()
    }

    /// §9.2: GF(2^8) modulo 0x11d.
    pub struct Gf {
        exp: [u8; 255],
        log: [u8; 256],
        /// `mul` for every pair, from `exp` and `log` (only for speed).
        table: Vec<[u8; 256]>,
    }

    impl Gf {
        pub fn new() -> Gf {
            let mut exp = [0u8; 255];
            let mut log = [0u8; 256];
            let mut x: u16 = 1;
            for (j, e) in exp.iter_mut().enumerate() {
                *e = x as u8;
                log[usize::from(x)] = j as u8;
                x <<= 1;
                if x >= 256 {
                    x ^= 0x11d;
                }
            }
            let mut gf = Gf {
                exp,
                log,
                table: Vec::new(),
            };
            gf.table = (0..=255u8)
                .map(|a| std::array::from_fn(|b| gf.mul_by_logs(a, b as u8)))
                .collect();
            gf
        }

        pub fn exp(&self, j: usize) -> u8 {
            self.exp[j % 255]
        }

        pub fn mul(&self, a: u8, b: u8) -> u8 {
            self.table[usize::from(a)][usize::from(b)]
        }

        fn mul_by_logs(&self, a: u8, b: u8) -> u8 {
            if a == 0 || b == 0 {
                return 0;
            }
            self.exp(
                (usize::from(self.log[usize::from(a)]) + usize::from(self.log[usize::from(b)]))
                    % 255,
            )
        }

        fn pow(&self, a: u8, e: usize) -> u8 {
            if e == 0 {
                1
            } else if a == 0 {
                0
            } else {
                self.exp(usize::from(self.log[usize::from(a)]) * e % 255)
            }
        }

        pub fn inv(&self, a: u8) -> u8 {
            assert_ne!(a, 0, "0 has no inverse");
            self.exp((255 - usize::from(self.log[usize::from(a)])) % 255)
        }

        /// Gauss-Jordan elimination; `None` if `m` is singular.
        #[allow(clippy::needless_range_loop)]
        fn invert(&self, mut m: Vec<Vec<u8>>) -> Option<Vec<Vec<u8>>> {
            let k = m.len();
            let mut out: Vec<Vec<u8>> = (0..k)
                .map(|r| (0..k).map(|c| u8::from(r == c)).collect())
                .collect();
            for col in 0..k {
                let pivot = (col..k).find(|&r| m[r][col] != 0)?;
                m.swap(col, pivot);
                out.swap(col, pivot);
                let scale = self.inv(m[col][col]);
                for c in 0..k {
                    m[col][c] = self.mul(m[col][c], scale);
                    out[col][c] = self.mul(out[col][c], scale);
                }
                for r in 0..k {
                    let f = m[r][col];
                    if r == col || f == 0 {
                        continue;
                    }
                    for c in 0..k {
                        m[r][c] ^= self.mul(f, m[col][c]);
                        out[r][c] ^= self.mul(f, out[col][c]);
                    }
                }
            }
            Some(out)
        }

        /// `a · b`.
        fn product(&self, a: &[Vec<u8>], b: &[Vec<u8>]) -> Vec<Vec<u8>> {
            a.iter()
                .map(|row| {
                    (0..b[0].len())
                        .map(|c| {
                            row.iter()
                                .zip(b)
                                .fold(0, |acc, (&x, b_row)| acc ^ self.mul(x, b_row[c]))
                        })
                        .collect()
                })
                .collect()
        }

        /// §9.2: rows `0 .. n` of `M = V · T⁻¹` for `k` data shards.
        pub fn coding_rows(&self, k: usize, n: usize) -> Vec<Vec<u8>> {
            let v: Vec<Vec<u8>> = (0..n)
                .map(|r| (0..k).map(|c| self.pow(r as u8, c)).collect())
                .collect();
            let t_inv = self.invert(v[..k].to_vec()).expect("T is invertible");
            self.product(&v, &t_inv)
        }

        /// §9.2: `Σ row[c] · D_c`, byte by byte.
        pub fn parity(&self, row: &[u8], data: &[Vec<u8>]) -> Vec<u8> {
            let mut out = vec![0u8; data[0].len()];
            for (&coef, shard) in row.iter().zip(data) {
                for (o, &d) in out.iter_mut().zip(shard) {
                    *o ^= self.mul(coef, d);
                }
            }
            out
        }
    }

    /// §9.3 and §9.4: the block's messages from `kept` shards `(index, payload)` of the block
    /// `header` describes; `None` with fewer than `k` distinct shards or a CRC mismatch.
    pub fn rebuild_block(
        gf: &Gf,
        header: &Shard,
        kept: &[(usize, Vec<u8>)],
    ) -> Option<Vec<Vec<u8>>> {
        let (k, n, size) = (header.k as usize, header.n as usize, header.size as usize);
        let mut chosen: Vec<(usize, Vec<u8>)> = Vec::new();
        for (index, payload) in kept {
            if chosen.len() < k && !chosen.iter().any(|(i, _)| i == index) {
                let mut padded = payload.clone();
                padded.resize(size, 0);
                chosen.push((*index, padded));
            }
        }
        if chosen.len() < k {
            return None;
        }
        let rows = gf.coding_rows(k, n);
        let a: Vec<Vec<u8>> = chosen.iter().map(|(i, _)| rows[*i].clone()).collect();
        let received: Vec<Vec<u8>> = chosen.into_iter().map(|(_, p)| p).collect();
        let data = gf.product(&gf.invert(a)?, &received);
        let total: u64 = header.lengths.iter().sum();
        let mut block: Vec<u8> = data.concat();
        block.truncate(total as usize);
        if crc32(&block) != header.checksum {
            return None;
        }
        let mut messages = Vec::new();
        let mut at = 0;
        for &len in &header.lengths {
            messages.push(block[at..at + len as usize].to_vec());
            at += len as usize;
        }
        Some(messages)
    }

    // -----------------------------------------------------------------------------------------
    // §9.5: the window code across messages
    // -----------------------------------------------------------------------------------------

    /// §9.5: `L ‖ id ‖ E ‖ C` of message `id` with envelope `envelope`; `None` when `L`
    /// exceeds 65535 (such a message is never a source).
    pub fn source_symbol(id: u64, envelope: &[u8]) -> Option<Vec<u8>> {
        let mut inner = Vec::new();
        put_varint(&mut inner, id);
        inner.extend_from_slice(envelope);
        let l = u16::try_from(inner.len()).ok()?;
        let mut symbol = l.to_be_bytes().to_vec();
        symbol.extend_from_slice(&inner);
        symbol.extend_from_slice(&crc32(&inner).to_be_bytes());
        Some(symbol)
    }

    /// §9.5: `c(r, s) = inverse((0x80 | r mod 128) ⊕ (s mod 128))`.
    pub fn coefficient(gf: &Gf, r: u64, s: u64) -> u8 {
        gf.inv((0x80 | (r % 128) as u8) ^ (s % 128) as u8)
    }

    /// §9.5: the payload of repair `repair` over `symbols`, source `first`'s first: each
    /// symbol padded with zeros to the longest, `Σ c(repair, s) · symbol(s)`.
    pub fn repair_payload(gf: &Gf, repair: u64, first: u64, symbols: &[Vec<u8>]) -> Vec<u8> {
        let longest = symbols.iter().map(Vec::len).max().unwrap_or(0);
        let mut payload = vec![0u8; longest];
        for (s, symbol) in (first..).zip(symbols) {
            let c = coefficient(gf, repair, s);
            for (p, &b) in payload.iter_mut().zip(symbol) {
                *p ^= gf.mul(c, b);
            }
        }
        payload
    }

    /// §9.5: a rebuilt (zero-padded) symbol's `(id, envelope)`, when `L` fits, the bytes
    /// after `C` are zero and `C` is the CRC-32 of `id ‖ E`.
    pub fn open_symbol(symbol: &[u8]) -> Option<(u64, Vec<u8>)> {
        let mut r = Reader { rest: symbol };
        let l = r.take(2).ok()?;
        let l = u64::from(u16::from_be_bytes([l[0], l[1]]));
        let inner = r.take(l).ok()?;
        let crc = r.u32().ok()?;
        if r.rest.iter().any(|&b| b != 0) || crc32(inner) != crc {
            return None;
        }
        let mut inner = Reader { rest: inner };
        let id = inner.varint().ok()?;
        Some((id, inner.rest.to_vec()))
    }

    /// A REPAIR frame's fields (§5.9).
    #[derive(Clone, Debug)]
    pub struct Repair {
        pub repair: u64,
        pub first: u64,
        pub count: u64,
        pub payload: Vec<u8>,
    }

    /// §9.5 "Rebuilding", all at once: from the symbols of the sources received (by seq) and
    /// the repairs received, every source the equations determine and whose rebuilt symbol
    /// passes its checks, as `seq → (id, envelope)`.
    ///
    /// Each repair minus `c · symbol` of its received sources is one equation over its
    /// missing sources; Gauss-Jordan elimination brings them to reduced row echelon form, in
    /// which a source is determined exactly when one row names it alone.
    pub fn rebuild_window(
        gf: &Gf,
        received: &BTreeMap<u64, Vec<u8>>,
        repairs: &[Repair],
    ) -> BTreeMap<u64, (u64, Vec<u8>)> {
        // Equations: (coefficient per missing source, right-hand side).
        let mut equations: Vec<(BTreeMap<u64, u8>, Vec<u8>)> = Vec::new();
        'repairs: for repair in repairs {
            let mut rhs = repair.payload.clone();
            let mut unknowns = BTreeMap::new();
            for s in repair.first..repair.first + repair.count {
                let c = coefficient(gf, repair.repair, s);
                match received.get(&s) {
                    // A source longer than the payload (the payload is the longest symbol
                    // of its window): not a repair of these sources.
                    Some(symbol) if symbol.len() > rhs.len() => continue 'repairs,
                    Some(symbol) => {
                        for (x, &b) in rhs.iter_mut().zip(symbol) {
                            *x ^= gf.mul(c, b);
                        }
                    }
                    None => {
                        unknowns.insert(s, c);
                    }
                }
            }
            if !unknowns.is_empty() {
                equations.push((unknowns, rhs));
            }
        }
        let columns: Vec<u64> = equations
            .iter()
            .flat_map(|(u, _)| u.keys().copied())
            .collect::<BTreeSet<u64>>()
            .into_iter()
            .collect();
        let width = equations
            .iter()
            .map(|(_, rhs)| rhs.len())
            .max()
            .unwrap_or(0);
        let mut rows: Vec<(Vec<u8>, Vec<u8>)> = equations
            .into_iter()
            .map(|(unknowns, mut rhs)| {
                rhs.resize(width, 0);
                let coefficients = columns
                    .iter()
                    .map(|s| unknowns.get(s).copied().unwrap_or(0))
                    .collect();
                (coefficients, rhs)
            })
            .collect();

        // Gauss-Jordan elimination.
        let mut pivots = Vec::new();
        let mut next = 0;
        for col in 0..columns.len() {
            let Some(p) = (next..rows.len()).find(|&r| rows[r].0[col] != 0) else {
                continue;
            };
            rows.swap(next, p);
            let scale = gf.inv(rows[next].0[col]);
            let (coefficients, rhs) = &mut rows[next];
            for x in coefficients.iter_mut().chain(rhs.iter_mut()) {
                *x = gf.mul(scale, *x);
            }
            let pivot = rows[next].clone();
            for (r, row) in rows.iter_mut().enumerate() {
                let f = row.0[col];
                if r == next || f == 0 {
                    continue;
                }
                let targets = row.0.iter_mut().chain(row.1.iter_mut());
                let sources = pivot.0.iter().chain(pivot.1.iter());
                for (x, &y) in targets.zip(sources) {
                    *x ^= gf.mul(f, y);
                }
            }
            pivots.push(col);
            next += 1;
        }

        let mut rebuilt = BTreeMap::new();
        for (row, &col) in rows.iter().zip(&pivots) {
            let alone = row.0.iter().enumerate().all(|(c, &x)| c == col || x == 0);
            if alone {
                if let Some(message) = open_symbol(&row.1) {
                    rebuilt.insert(columns[col], message);
                }
            }
        }
        rebuilt
    }
}
