//! Hostile review of the receiver rewrite (one state per message, the shared key record,
//! passed ids, REPLAYED, `Reassembler::undeliver`, parked stream messages).
//!
//! Every test here FAILED on the code it was written against, because of a violation of one
//! of the promises (1: never twice; 2: acked => taken; 3: "not delivered" is true; 4: no
//! panic, no unbounded memory), and passes since its fix (each doc comment describes the
//! failure as it was found).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::link::{
    Action, Attached, ConnId, DialFailure, Dialed, Input, Link, LinkConfig, Lost, Role, SharedKeys,
};
use super::{
    ClaimOutcome, Claims, Delivered, Peer, Receiver, ReceiverConfig, SenderConfig, SenderEvent,
};
use crate::wire::{
    encode_stream_head, BlockHeader, Envelope, Frame, Limits, ShardFrame, STREAM_DELIVERED,
    STREAM_REFUSED,
};

const SIZE: usize = 1200;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

fn drain(link: &mut Link) -> Vec<Action> {
    std::iter::from_fn(|| link.poll_action()).collect()
}

fn delivered(actions: &[Action]) -> Vec<Delivered> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Deliver(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn events(peer: &mut Peer) -> Vec<SenderEvent> {
    std::iter::from_fn(|| peer.sender.poll_event()).collect()
}

fn acked(events: &[SenderEvent], id: u64) -> Option<bool> {
    events.iter().find_map(|e| match e {
        SenderEvent::Acked {
            id: i, replayed, ..
        } if *i == id => Some(*replayed),
        _ => None,
    })
}

/// Feeds every datagram `from` has to `link` on `conn`; returns the link's actions.
fn to_link(from: &mut Peer, link: &mut Link, now: Instant, conn: u64) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(d) = from.poll_transmit() {
        link.handle(
            now,
            Input::Datagram {
                conn: ConnId(conn),
                data: d,
            },
        );
        out.extend(drain(link));
    }
    out
}

/// Feeds the link's transmits on `conn` (from `actions`) to `to`.
fn to_peer(actions: &[Action], to: &mut Peer, now: Instant, conn: u64) {
    for a in actions {
        if let Action::Transmit { conn: c, datagram } = a {
            if *c == ConnId(conn) {
                to.handle_datagram(now, datagram.clone());
            }
        }
    }
}

/// A client link whose server (its peer) comes back on connection `conn` without the
/// channel's state (`Attached::New`) or as a replica sharing the claims store
/// (`Attached::Claims`).
fn reattach_client(link: &mut Link, now: Instant, old: u64, conn: u64, attached: Attached) {
    link.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(old),
            how: Lost::Retryable,
            reason: "gone".into(),
        },
    );
    let dial = drain(link)
        .iter()
        .find_map(|a| match a {
            Action::Dial { dial, .. } => Some(*dial),
            _ => None,
        })
        .expect("a redial");
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: Ok::<_, DialFailure>(Dialed {
                conn: ConnId(conn),
                attached,
                max_datagram_size: Some(SIZE),
                protocol: 2,
            }),
        },
    );
}

fn client_link(now: Instant, config: LinkConfig) -> Link {
    Link::new(
        now,
        LinkConfig {
            warm_standby: false,
            ..config
        },
        Role::Client {
            replicas: 1,
            current: 0,
            attached: Attached::Resumed,
        },
        ConnId(1),
        SIZE,
        0,
    )
}

fn server_link(now: Instant, config: LinkConfig) -> Link {
    Link::new(now, config, Role::Server, ConnId(1), SIZE, 0)
}

fn stream_message(id: u64, key: Option<&str>, len: usize) -> Bytes {
    let mut m = encode_stream_head(id).to_vec();
    m.extend_from_slice(&Envelope::encode(key.map(str::as_bytes), &vec![9u8; len]));
    Bytes::from(m)
}

/// A one-shard block `block` carrying message `id` whose envelope is `envelope`.
fn shard(block: u64, id: u64, envelope: &[u8]) -> ShardFrame {
    let mut lengths = crate::wire::Lengths::new();
    lengths.push(envelope.len() as u32);
    ShardFrame {
        header: BlockHeader {
            block,
            data_shards: 1,
            total_shards: 1,
            shard_size: envelope.len().max(1) as u32,
            first_message: id,
            lengths,
            checksum: crc32fast::hash(envelope),
        },
        index: 0,
        payload: Bytes::copy_from_slice(envelope),
    }
}

fn frames(r: &mut Receiver) -> Vec<Frame> {
    std::iter::from_fn(|| r.poll_transmit())
        .map(|d| Frame::decode(d, &Limits::default()).expect("the receiver's own frame"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Promise 4: memory
// ---------------------------------------------------------------------------------------

/// **Promise 4 (unbounded memory).** `max_queued_bytes` bounds the *payload bytes* waiting
/// for the application, and nothing else bounds the queue: a message with an empty payload
/// (a 1-byte envelope) costs 0 bytes there, so a peer (hostile, or just faster than the
/// application) sending empty or 1-byte messages to an application that is behind makes the
/// receiver queue a `Delivered` and a `Msg::Handed` state per message, without limit (the
/// dedupe window does not bound it either: handed ids are delivered, so the floor moves on).
/// With 1-byte payloads the default 16 MiB limit admits 16 M messages, ~100+ bytes of
/// bookkeeping each. Expected: the receiver becomes backlogged (drops shards unacked) after a
/// bounded number of untaken messages. Actual: every one is queued.
/// receiver.rs `backlogged` (`queued_bytes >= max_queued_bytes`), `deliver`.
#[test]
fn empty_messages_queue_without_bound_behind_a_slow_application() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig {
        ack_on_take: true,
        max_queued_bytes: 1024,
        ..ReceiverConfig::default()
    });
    let empty = Envelope::encode(None, b"");
    let n = 50_000u64;
    for id in 0..n {
        r.handle_shard(now, shard(id, id, &empty));
        let _ = frames(&mut r);
    }
    let stats = r.stats();
    assert!(
        stats.deliveries_queued <= 4096 && stats.awaiting_take <= 4096,
        "{} messages queued and {} handed states for an application that took none \
         (max_queued_bytes = 1024, bytes queued = {})",
        stats.deliveries_queued,
        stats.awaiting_take,
        stats.bytes_queued
    );
}

// ---------------------------------------------------------------------------------------
// Promise 2: peer_lost_state
// ---------------------------------------------------------------------------------------

/// **Promise 2 (an ack names an id that was not taken).** `Receiver::peer_lost_state` moves
/// the old incarnation's untaken messages to `old_handed`, a map keyed by *message id only*
/// (receiver.rs `peer_lost_state`: `self.old_handed.insert(id, ..)`). When the peer loses its
/// state twice while the application is behind (a server that crash-loops), the second
/// restart overwrites the first incarnation's entry for the same id. Then the application's
/// take of the *first* incarnation's message 0 consumes the second's entry, and its take of
/// the *second* incarnation's message 0 is applied to the *third* incarnation's message 0,
/// which is acked although the application never took it (and keys: the first incarnation's
/// key is never taken nor released, so it stays `Held` for ever; the second's is marked
/// delivered before its message was taken).
#[test]
fn two_restarts_of_the_peer_make_an_old_take_ack_a_new_untaken_message() {
    let now = Instant::now();
    let mut link = client_link(now, LinkConfig::default());
    let mut handed = Vec::new();
    // Incarnation 0 of the server sends its message 0 on connection 1.
    let mut s0 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s0.sender
        .send(now, Bytes::from_static(b"from incarnation 0"))
        .unwrap();
    handed.extend(delivered(&to_link(&mut s0, &mut link, now, 1)));
    // The server restarts: incarnation 1, connection 2, its message 0.
    reattach_client(&mut link, now, 1, 2, Attached::New);
    let mut s1 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s1.sender
        .send(now, Bytes::from_static(b"from incarnation 1"))
        .unwrap();
    handed.extend(delivered(&to_link(&mut s1, &mut link, now, 2)));
    // And again: incarnation 2, connection 3, its message 0.
    reattach_client(&mut link, now, 2, 3, Attached::New);
    let mut s2 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s2.sender
        .send(now, Bytes::from_static(b"from incarnation 2"))
        .unwrap();
    handed.extend(delivered(&to_link(&mut s2, &mut link, now, 3)));
    assert_eq!(
        handed.len(),
        3,
        "all three handed to the application, none taken"
    );
    // The application takes the first two, in order; incarnation 2's message stays untaken.
    let mut out = Vec::new();
    for d in &handed[..2] {
        link.handle(now, Input::Took { id: d.id });
        out.extend(drain(&mut link));
    }
    to_peer(&out, &mut s2, now, 3);
    assert_eq!(
        acked(&events(&mut s2), 0),
        None,
        "incarnation 2's message 0 was acked, but the application never took it"
    );
}

// ---------------------------------------------------------------------------------------
// Promises 2 and 3: claims after peer_lost_state
// ---------------------------------------------------------------------------------------

/// **Promise 2 (inbox pattern: acked although the application did not commit it).**
/// `Input::Confirm { id, outcome }` (receiver.rs `confirm` -> `settle`) names a message by id
/// alone. After the peer lost its state its ids start over at 0, so the application's
/// confirmation of the *old* incarnation's message 0 (its transaction committed) settles the
/// *new* incarnation's message 0, which is acked before the application's transaction for
/// it ran; if that transaction then rolls back (`Failed`, ignored: no longer `Claiming`) the
/// message is acked and not recorded. With `ClaimOutcome::Conflict` for the old message, the
/// new one is refused with REFUSE 7 (`KeyReused`: "not delivered") while the application
/// holds it and may commit it (promise 3).
#[test]
fn an_old_incarnations_confirm_settles_the_new_incarnations_message() {
    let now = Instant::now();
    let mut config = LinkConfig::default();
    config.receiver.claims = Claims::Application;
    let mut link = client_link(now, config);
    let mut s0 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s0.sender
        .send(now, Bytes::from_static(b"old payment"))
        .unwrap();
    let old = delivered(&to_link(&mut s0, &mut link, now, 1));
    assert_eq!(old.len(), 1);
    reattach_client(&mut link, now, 1, 2, Attached::New);
    drain(&mut link);
    let mut s1 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s1.sender
        .send(now, Bytes::from_static(b"new payment"))
        .unwrap();
    let new = delivered(&to_link(&mut s1, &mut link, now, 2));
    assert_eq!(new.len(), 1);
    assert_eq!((old[0].id, new[0].id), (0, 0));
    // The application commits the OLD message and confirms it.
    link.handle(
        now,
        Input::Confirm {
            id: old[0].id,
            outcome: ClaimOutcome::Now,
        },
    );
    let out = drain(&mut link);
    to_peer(&out, &mut s1, now, 2);
    assert_eq!(
        acked(&events(&mut s1), 0),
        None,
        "the new incarnation's message was acked by the old one's confirmation, before the \
         application committed it"
    );
}

/// **Promise 2 (acked, delivered by nobody), claims store.** A claim asked for the old
/// incarnation's message and answered `Now` after `peer_lost_state` (here: the client fails
/// over to a replica sharing the claims store, `Attached::Claims`, which calls
/// `Receiver::peer_lost_state`) is ignored (receiver.rs `claim_done`: `request.generation !=
/// self.generation`): the store recorded the claim, so the key counts as delivered, but the
/// payload is dropped and never handed over. The retry of that key by the new incarnation is
/// then answered `Before` by the store and acked as a replay: the payment is acked and no
/// application ever received it. (Unlike the documented one-phase gap, the answer *did*
/// arrive; the receiver threw it away.)
#[test]
fn a_claim_answered_now_for_the_old_incarnation_is_lost_and_its_retry_acked() {
    let now = Instant::now();
    let mut config = LinkConfig::default();
    config.receiver.claims = Claims::Owner;
    let mut link = client_link(now, config);
    let mut s0 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    s0.sender
        .send_keyed(now, Some(b"order-1"), b"pay 10.00")
        .unwrap();
    let out = to_link(&mut s0, &mut link, now, 1);
    let attempt = out
        .iter()
        .find_map(|a| match a {
            Action::Claim { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .expect("a claim");
    // The replica fails; a replica sharing the store takes over (its ids start over).
    reattach_client(&mut link, now, 1, 2, Attached::Claims);
    let mut handed = delivered(&drain(&mut link));
    // The store answers the first claim: written, claimed now.
    handed.extend(delivered(&link.claim_now(now, attempt)));
    // The new replica's application retries the payment under the same key.
    let mut s1 = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let retry = s1
        .sender
        .send_keyed(now, Some(b"order-1"), b"pay 10.00")
        .unwrap();
    let out = to_link(&mut s1, &mut link, now, 2);
    handed.extend(delivered(&out));
    let Some(attempt) = out.iter().find_map(|a| match a {
        Action::Claim { attempt, .. } => Some(*attempt),
        _ => None,
    }) else {
        // Fixed: the old incarnation's claimed message was handed over, and its key held
        // until it is taken, so the retry waits (no claim, no ack) instead.
        assert_eq!(handed.len(), 1, "the claimed payment was handed over");
        assert!(acked(&events(&mut s1), retry).is_none());
        return;
    };
    // The store knows the key: claimed before (by the first attempt).
    link.handle(
        now,
        Input::ClaimAnswered {
            attempt,
            result: Ok(crate::proto::link::StoreAnswer::Before),
        },
    );
    let out = drain(&mut link);
    handed.extend(delivered(&out));
    to_peer(&out, &mut s1, now + Duration::from_millis(20), 2);
    link.handle(now + Duration::from_millis(20), Input::Timer);
    to_peer(
        &drain(&mut link),
        &mut s1,
        now + Duration::from_millis(20),
        2,
    );
    let ev = events(&mut s1);
    assert!(
        acked(&ev, retry).is_none() || !handed.is_empty(),
        "the payment was acked ({ev:?}) but never handed to any application"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 3: parked stream messages
// ---------------------------------------------------------------------------------------

/// **Promise 3 (STREAM_REFUSED for a message delivered later).** While the application is
/// behind, stream messages are parked unjudged. Past the parked bound, a new copy is refused
/// if `Receiver::is_new(id)` (link/streams.rs `park`) — but `is_new` does not look at the
/// parked messages, so a second stream carrying the *same* message as one already parked (a
/// re-send, which §12 anticipates: "a re-send of the same message took over the answer") is
/// answered `0x01` ("not delivered and never will be") and the parked copy is delivered
/// afterwards, with `0x00` on the first stream.
#[test]
fn a_stream_copy_of_a_parked_message_is_refused_then_delivered() {
    let now = Instant::now();
    let mut config = LinkConfig::default();
    config.receiver.max_queued_bytes = 15_000;
    let mut link = server_link(now, config);
    let mut handed = Vec::new();
    let mut answers = Vec::new();
    let mut collect = |actions: Vec<Action>, handed: &mut Vec<Delivered>| {
        for a in actions {
            match a {
                Action::Deliver(d) => handed.push(d),
                Action::AnswerStream { answer, status } => answers.push((answer, status)),
                _ => {}
            }
        }
    };
    // Six messages: four fill the hand-off, two more make the receiver backlogged.
    for id in 0..6u64 {
        link.handle(
            now,
            Input::StreamMessage {
                answer: 100 + id,
                message: stream_message(id, None, 10_000),
            },
        );
        collect(drain(&mut link), &mut handed);
    }
    assert!(link.peer().receiver.backlogged());
    // Message 6 arrives on a stream: parked. A re-send of it on another stream: refused.
    for answer in [1, 2] {
        link.handle(
            now,
            Input::StreamMessage {
                answer,
                message: stream_message(6, None, 10_000),
            },
        );
        collect(drain(&mut link), &mut handed);
    }
    // The application catches up.
    for _ in 0..4 {
        let taken: Vec<u64> = handed.drain(..).map(|d| d.id).collect();
        for id in taken {
            link.handle(now, Input::Took { id });
            collect(drain(&mut link), &mut handed);
        }
    }
    let answers = answers;
    let refused_6 = answers.contains(&(2, Some(STREAM_REFUSED)));
    let delivered_6 = answers.contains(&(1, Some(STREAM_DELIVERED)));
    assert!(
        !(refused_6 && delivered_6),
        "message 6 answered refused (not delivered, never will be) on one stream and \
         delivered on the other: {answers:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 1: keys of a stopped channel
// ---------------------------------------------------------------------------------------

/// **Promise 1 (a key delivered twice within the key TTL of its take).** A channel that stops
/// with a message handed to the application and not yet taken orphans its key
/// (`Receiver::stopping`), and the orphan expires `key_ttl` after the *stop*. A take that
/// happens after the stop is ignored (a `Stopped` link drops `Input::Took`), so the key is
/// never recorded as delivered at its take: `key_ttl` after the stop a retry under that key
/// is delivered again, although the application took the first message less than `key_ttl`
/// before (README: keys are kept "24 h after the take"; keys.rs: "kept exactly ttl after its
/// take, never less").
#[test]
fn a_key_taken_after_its_channel_stopped_is_delivered_again_within_the_ttl() {
    let now = Instant::now();
    let ttl = Duration::from_secs(3600);
    let keys = SharedKeys::new(ttl, 1000);
    let config = LinkConfig {
        shared_keys: Some(keys.clone()),
        ..LinkConfig::default()
    };
    let mut a = server_link(now, config.clone());
    let mut ca = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    ca.sender
        .send_keyed(now, Some(b"order-10"), b"pay")
        .unwrap();
    let first = delivered(&to_link(&mut ca, &mut a, now, 1));
    assert_eq!(first.len(), 1, "in the application's queue, not taken yet");
    // The client goes away; the channel stops after its TTL.
    a.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(1),
            how: Lost::Retryable,
            reason: "gone".into(),
        },
    );
    let stop = now + config.channel_ttl + Duration::from_secs(1);
    a.handle(stop, Input::Timer);
    drain(&mut a);
    // Fixed: the link waits for the take instead of stopping (and orphaning the key).
    assert!(!a.is_stopped());
    // The application reads its queue a little later: it takes the message.
    let take = stop + Duration::from_secs(600);
    a.handle(take, Input::Took { id: first[0].id });
    // The client retries on a new channel, within the key TTL of the take.
    let retry_at = stop + ttl + Duration::from_secs(1);
    assert!(retry_at < take + ttl);
    let mut b = server_link(retry_at, config);
    let mut cb = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    cb.sender
        .send_keyed(retry_at, Some(b"order-10"), b"pay")
        .unwrap();
    let second = delivered(&to_link(&mut cb, &mut b, retry_at, 1));
    assert!(
        second.is_empty(),
        "order-10 delivered a second time {:?} after the application took it",
        retry_at - take
    );
}

// ---------------------------------------------------------------------------------------
// Promise 3: refused states forgotten while the floor has not passed the id
// ---------------------------------------------------------------------------------------

/// **Promise 3 (REFUSE 7 / KeyReused, then delivered).** A refusal is remembered for
/// `hole_ttl` from the *first* refusal (receiver.rs `refuse`: a copy refused again does not
/// refresh it; `expire`). Whether a later copy is then refused depends on the floor having
/// passed the id by then, which needs the sender's FLOOR (SHOULD, sent at most 3 times) or a
/// delivered id above it (the hole timer does not run while nothing above is delivered). So
/// with no FLOOR within `hole_ttl`, a copy that arrives after it is judged afresh: here the
/// key that conflicted was released meanwhile (its holder's application went away), and the
/// message told `KeyReused` ("not delivered ... never will be under that key", §8.2 "Nothing
/// is delivered, then or later, under that key") is delivered.
#[test]
fn a_message_refused_with_key_reused_is_delivered_by_a_late_copy() {
    let now = Instant::now();
    let keys = SharedKeys::new(Duration::from_secs(3600), 1000);
    let config = ReceiverConfig {
        ack_on_take: true,
        ..ReceiverConfig::default()
    };
    let ttl = config.hole_ttl;
    // Channel A holds order-7 for 10.00 (handed, not taken).
    let mut a = Receiver::new(config.clone());
    a.share_keys(keys.clone(), super::ANONYMOUS);
    a.handle_shard(
        now,
        shard(0, 0, &Envelope::encode(Some(b"order-7"), b"10.00")),
    );
    assert_eq!(a.deliveries_queued(), 1);
    // Channel B sends order-7 for 999.00: REFUSE 7.
    let mut b = Receiver::new(config);
    b.share_keys(keys, super::ANONYMOUS);
    let other = Envelope::encode(Some(b"order-7"), b"999.00");
    b.handle_shard(now, shard(0, 0, &other));
    let f = frames(&mut b);
    assert!(
        f.iter()
            .any(|f| matches!(f, Frame::Refuse(r) if r.reason == crate::wire::REFUSE_KEY_REUSED)),
        "{f:?}"
    );
    // A hedge just before the TTL: refused again (the sender hears this one).
    b.handle_shard(now + ttl - Duration::from_millis(5), shard(1, 0, &other));
    assert!(b.deliveries_queued() == 0);
    // A's application goes away: order-7 is free again.
    a.application_gone(now + Duration::from_secs(1));
    // A copy that was in flight when the REFUSE reached the sender lands just after the TTL.
    b.handle_shard(now + ttl + Duration::from_millis(5), shard(2, 0, &other));
    assert_eq!(
        b.deliveries_queued(),
        0,
        "message 0 was refused with KeyReused (not delivered), then delivered"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 3: ids below the base refused by the block check
// ---------------------------------------------------------------------------------------

/// **Promise 3 (REFUSE for an id the receiver does not know), low severity.** §7.2: an id
/// below the window's base ("the receiver does not know whether it delivered it") is
/// "neither delivered, acked nor refused". The block-parameter check in
/// `Receiver::handle_shard` (receiver.rs, first lines: `if !self.dedupe.contains(id) &&
/// !self.messages.contains_key(&id) { self.refuse(.., REFUSE_BLOCK, ..) }`) skips only ids
/// `contains` calls delivered, which is false below the base, so an id below the base that
/// comes in a block wider than the receiver's limits is refused (REFUSE 4: "not delivered")
/// although it may have been delivered (the base rises over delivered ids when the oldest
/// passed ranges are let go, or starts at a taken-over channel's Hello floor).
#[test]
fn an_id_below_the_base_is_refused_by_the_block_check() {
    let now = Instant::now();
    let mut r = Receiver::new(ReceiverConfig {
        ack_on_take: true,
        ..ReceiverConfig::default()
    });
    r.start_at(100);
    let env = Envelope::encode(None, b"x");
    let mut wide = shard(0, 50, &env);
    wide.header.total_shards = 200; // above max_block_shards (128), within the decoder's 256
    r.handle_shard(now, wide);
    let f = frames(&mut r);
    assert!(
        !f.iter()
            .any(|f| matches!(f, Frame::Refuse(x) if x.ranges.iter().any(|g| g.contains(&50)))),
        "id 50 is below the base (unknown: maybe delivered) and was refused: {f:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Review of protocol 2's window code (MESSAGE / REPAIR, src/fec/window.rs,
// src/proto/repair.rs, the window paths of sender.rs and receiver.rs)
// ---------------------------------------------------------------------------------------

mod window_review {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::{Duration, Instant};

    use bytes::Bytes;

    use crate::fec::window::{source_symbol, WindowEncoder};
    use crate::proto::{Peer, Receiver, ReceiverConfig, SenderConfig, SenderEvent, WindowConfig};
    use crate::wire::{BlockHeader, Envelope, MessageFrame, ShardFrame};

    /// Two peers joined by a loss-free link of fixed one-way delay; `drop_to_1` decides
    /// which of peer 0's datagrams never reach peer 1.
    struct Duo {
        now: Instant,
        peers: [Peer; 2],
        delay: Duration,
        queue: BinaryHeap<Reverse<InFlight>>,
        seq: u64,
        drop_to_1: fn(&Bytes) -> bool,
    }

    /// A datagram on its way: (arrival, order, to, bytes).
    type InFlight = (Instant, u64, usize, Vec<u8>);

    impl Duo {
        fn new(a: Peer, b: Peer, delay: Duration) -> Self {
            Duo {
                now: Instant::now(),
                peers: [a, b],
                delay,
                queue: BinaryHeap::new(),
                seq: 0,
                drop_to_1: |_| false,
            }
        }

        fn flush(&mut self) {
            for i in 0..2 {
                while let Some(d) = self.peers[i].poll_transmit() {
                    if i == 0 && (self.drop_to_1)(&d) {
                        continue;
                    }
                    self.seq += 1;
                    self.queue.push(Reverse((
                        self.now + self.delay,
                        self.seq,
                        1 - i,
                        d.to_vec(),
                    )));
                }
            }
        }

        fn run_until(&mut self, t: Instant) {
            loop {
                let arrival = self.queue.peek().map(|Reverse((at, ..))| *at);
                let timer = self.peers.iter().filter_map(Peer::poll_timeout).min();
                let Some(next) = [arrival, timer].into_iter().flatten().min() else {
                    break;
                };
                if next > t {
                    break;
                }
                self.now = self.now.max(next);
                while self
                    .queue
                    .peek()
                    .is_some_and(|Reverse((at, ..))| *at <= self.now)
                {
                    let Reverse((_, _, to, data)) = self.queue.pop().expect("peeked");
                    self.peers[to].handle_datagram(self.now, Bytes::from(data));
                }
                for p in &mut self.peers {
                    if p.poll_timeout().is_some_and(|at| at <= self.now) {
                        p.handle_timeout(self.now);
                    }
                }
                self.flush();
            }
            self.now = self.now.max(t);
        }
    }

    fn envelope(i: u64) -> Bytes {
        Envelope::encode(None, format!("payment {i:04}").as_bytes())
    }

    /// A one-shard block `block` carrying message `id` (a hedge of a window source).
    fn shard(block: u64, id: u64, envelope: &[u8]) -> ShardFrame {
        let mut lengths = crate::wire::Lengths::new();
        lengths.push(envelope.len() as u32);
        ShardFrame {
            header: BlockHeader {
                block,
                data_shards: 1,
                total_shards: 1,
                shard_size: envelope.len().max(1) as u32,
                first_message: id,
                lengths,
                checksum: crc32fast::hash(envelope),
            },
            index: 0,
            payload: Bytes::copy_from_slice(envelope),
        }
    }

    /// **Promise 4 (the backlog bound), low.** `Receiver::handle_message` lets a MESSAGE
    /// through while backlogged when its id was delivered (`self.dedupe.contains(id)`: "it
    /// only repeats an ack"), but then feeds its symbol to the window decoder and judges
    /// every message that completes (`judge_recovered`): new messages are delivered, and
    /// queued, while the receiver is backlogged, which `backlogged` promises does not happen
    /// ("New messages are refused (unacked) until it catches up"; `handle_repair` drops
    /// repairs then for exactly this reason). Bounded by the decoder's window (64 messages
    /// of up to 16 KiB per backlog episode), hence low.
    /// Scenario: repairs r0, r1 over sources 0..=2 arrive (rows, 3 unknowns); message 1
    /// arrives as a hedge (SHARD) and is delivered: backlogged; its late first flight (the
    /// MESSAGE of seq 1) passes the backlog check and completes the equations: messages 0
    /// and 2 are delivered behind the full queue.
    /// Fix: in `handle_message`, while backlogged, judge the frame's own id (repeat its ack)
    /// but do not call `window.on_source` (or do not poll `judge_recovered`) — the same
    /// rule as `handle_repair`.
    #[test]
    fn a_backlogged_receiver_delivers_nothing_new_from_a_late_duplicate_message() {
        let now = Instant::now();
        let mut r = Receiver::new(ReceiverConfig {
            ack_on_take: true,
            max_queued_bytes: 1,
            ..ReceiverConfig::default()
        });
        r.set_protocol(2);
        let mut enc = WindowEncoder::new(32);
        for i in 0..3 {
            enc.push(source_symbol(i, &envelope(i)).unwrap());
        }
        let r0 = enc.repair_from(0).unwrap();
        let r1 = enc.repair_from(0).unwrap();
        r.handle_repair(now, &r0);
        r.handle_repair(now, &r1);
        assert_eq!(r.deliveries_queued(), 0);
        // Message 1's hedge: delivered, and the queue is full.
        r.handle_shard(now, shard(7, 1, &envelope(1)));
        assert_eq!(r.deliveries_queued(), 1);
        assert!(r.backlogged());
        // Its first flight, late.
        r.handle_message(
            now,
            MessageFrame {
                seq: 1,
                id: 1,
                body: envelope(1),
            },
        );
        assert_eq!(
            r.deliveries_queued(),
            1,
            "a backlogged receiver delivered {} new messages (window_recovered {})",
            r.deliveries_queued() - 1,
            r.stats().window_recovered
        );
    }

    /// **§10.3 (`shards_received` counts distinct frames), low.** A duplicated SHARD is not
    /// counted (receiver.rs `handle_shard`: "a duplicated packet must not hide a lost
    /// one"), but `handle_message` and `handle_repair` count every copy, so on a path that
    /// duplicates datagrams the sender's loss estimate (and with it `window_ratio`) is too
    /// low for window sources. Fix: count a MESSAGE only when its seq was new to the
    /// decoder (or its id new), and a REPAIR only when its `(repair, first, count)` was new.
    #[test]
    fn a_duplicated_message_counts_once_in_shards_received() {
        let now = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::default());
        r.set_protocol(2);
        let m = MessageFrame {
            seq: 0,
            id: 0,
            body: envelope(0),
        };
        r.handle_message(now, m.clone());
        r.handle_message(now, m);
        assert_eq!(r.stats().shards_received, 1);
    }

    /// **Promise 4 (no panic), low: configuration.** `Sender::window_ratio` ends in
    /// `.clamp(config.min_ratio, config.max_ratio)` and `RepairWindow::send` in
    /// `ratio.clamp(min_ratio, max_ratio.max(0.0))`; `f64::clamp` panics when min > max (or
    /// either is NaN). `WindowConfig` is public through `channel::Config::sender.window`
    /// and nothing validates it, so e.g. `min_ratio: 0.5, max_ratio: 0.25` (or a NaN in
    /// either) makes the sender — in a channel, its driver task — panic on the first message
    /// sent as a window source (`RepairWindow::send`), and the sends in flight then have no
    /// outcome. Fix: sanitise at construction (`min = min.max(0)`,
    /// `max = max.max(min)`, NaN → default), or use `max(min).min(max)` instead of clamp.
    #[test]
    fn a_window_config_with_min_above_max_does_not_panic() {
        let config = SenderConfig {
            window: Some(WindowConfig {
                min_ratio: 0.5,
                max_ratio: 0.25,
                ..WindowConfig::default()
            }),
            ..SenderConfig::default()
        };
        let a = Peer::new(config, ReceiverConfig::default());
        let b = Peer::new(SenderConfig::default(), ReceiverConfig::default());
        let mut duo = Duo::new(a, b, Duration::from_millis(10));
        let start = duo.now;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in 0..100u64 {
                duo.run_until(start + Duration::from_millis(5) * i as u32);
                let now = duo.now;
                duo.peers[0]
                    .sender
                    .send(now, Bytes::from(format!("p{i}")))
                    .unwrap();
                duo.flush();
            }
            duo.run_until(start + Duration::from_secs(2));
        }));
        assert!(result.is_ok(), "the sender panicked");
    }

    // (The version-1 replica finding became `link::tests::toward_a_version_1_replica_first_flights_are_shards`.)

    // (The finding that a MESSAGE frame carries no checksum of its own is answered in
    // docs/PROTOCOL.md §5.8: like a shard in transit, QUIC's packet protection guards it;
    // the window's CRC-32 guards what is rebuilt.)

    /// Not a finding: the payment semantics with the window code on, over a lossy,
    /// reordering, duplicating link, with keyed sends (some keys reused, same payload),
    /// `ack_on_take` with an application that takes late, and a new connection in the middle
    /// (`proto/tests.rs`'s lossy/reconnect tests all run with `window: None`).
    #[cfg(feature = "sim")]
    #[test]
    fn window_on_keeps_payment_semantics_under_loss_reorder_dup_and_reconnect() {
        use crate::sim::{GilbertElliott, Link, LinkConfig, Loss};
        use std::collections::{BTreeMap, BTreeSet, HashMap};
        for seed in 1..=6u64 {
            let loss = if seed % 2 == 0 {
                Loss::Bernoulli(0.15)
            } else {
                Loss::GilbertElliott(GilbertElliott::from_mean(0.1, 6.0))
            };
            let link = LinkConfig {
                loss,
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(3),
                reorder: 0.1,
                reorder_delay: Duration::from_millis(15),
                duplicate: 0.1,
                ..LinkConfig::default()
            };
            let now0 = Instant::now();
            let receiver = ReceiverConfig {
                ack_on_take: true,
                max_queued_bytes: 4096,
                ..ReceiverConfig::default()
            };
            let mut peers = [
                Peer::new(SenderConfig::default(), receiver.clone()),
                Peer::new(SenderConfig::default(), receiver),
            ];
            let mut links = [
                Link::new(link.clone(), seed, now0),
                Link::new(link, seed ^ 0xfeed, now0),
            ];
            let mut queue: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
            let mut qseq = 0u64;
            let mut now = now0;
            let mut sent: BTreeMap<u64, (Option<Vec<u8>>, Bytes)> = BTreeMap::new();
            let mut outcome: BTreeMap<u64, bool> = BTreeMap::new();
            let mut delivered_ids: BTreeSet<u64> = BTreeSet::new();
            let mut delivered_keys: HashMap<Vec<u8>, u64> = HashMap::new();
            let mut taken: BTreeSet<u64> = BTreeSet::new();
            let mut waiting: Vec<(Instant, u64)> = Vec::new();
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rand = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let n = 1500u64;
            let cut = 700u64;
            let end = now0 + Duration::from_millis(4) * n as u32 + Duration::from_secs(8);
            let mut i = 0u64;
            while now < end {
                // Sends every 4 ms.
                let next_send = (i < n).then(|| now0 + Duration::from_millis(4) * i as u32);
                let arrival = queue.peek().map(|Reverse((at, ..))| *at);
                let timer = peers.iter().filter_map(Peer::poll_timeout).min();
                let take = waiting.iter().map(|&(at, _)| at).min();
                let Some(next) = [next_send, arrival, timer, take, Some(end)]
                    .into_iter()
                    .flatten()
                    .min()
                else {
                    break;
                };
                now = now.max(next);
                if next_send.is_some_and(|t| t <= now) {
                    if i == cut {
                        queue.clear();
                        for p in &mut peers {
                            p.new_connection(now);
                        }
                    }
                    let key =
                        (rand() % 3 != 0).then(|| format!("k{}", rand() % (n / 2)).into_bytes());
                    let payload = match &key {
                        Some(k) => Bytes::from(format!("pay {}", String::from_utf8_lossy(k))),
                        None => Bytes::from(format!("unkeyed {i}")),
                    };
                    if let Ok(id) = peers[0].sender.send_keyed(now, key.as_deref(), &payload) {
                        sent.insert(id, (key, payload));
                    }
                    i += 1;
                }
                while queue.peek().is_some_and(|Reverse((at, ..))| *at <= now) {
                    let Reverse((_, _, to, data)) = queue.pop().expect("peeked");
                    peers[to].handle_datagram(now, Bytes::from(data));
                }
                for p in &mut peers {
                    if p.poll_timeout().is_some_and(|at| at <= now) {
                        p.handle_timeout(now);
                    }
                }
                // The application takes each message 0-60 ms after it was delivered.
                let due: Vec<u64> = waiting
                    .iter()
                    .filter(|&&(at, _)| at <= now)
                    .map(|&(_, id)| id)
                    .collect();
                waiting.retain(|&(at, _)| at > now);
                for id in due {
                    taken.insert(id);
                    peers[1].receiver.taken(now, id);
                }
                while let Some(d) = peers[1].receiver.poll_delivery() {
                    assert!(
                        delivered_ids.insert(d.id),
                        "seed {seed}: id {} delivered twice",
                        d.id
                    );
                    let (key, payload) = sent.get(&d.id).expect("delivered an id never sent");
                    assert_eq!(&d.payload, payload, "seed {seed}: id {} payload", d.id);
                    if let Some(k) = key {
                        if let Some(other) = delivered_keys.insert(k.clone(), d.id) {
                            panic!(
                                "seed {seed}: key delivered twice (ids {other} and {})",
                                d.id
                            );
                        }
                    }
                    waiting.push((now + Duration::from_millis(rand() % 60), d.id));
                }
                while let Some(e) = peers[0].sender.poll_event() {
                    let (id, ok) = match e {
                        SenderEvent::Acked { id, .. } => (id, true),
                        SenderEvent::Failed { id, .. } => (id, false),
                    };
                    assert!(
                        outcome.insert(id, ok).is_none(),
                        "seed {seed}: {id} two outcomes"
                    );
                    if ok {
                        let (key, _) = &sent[&id];
                        let fine = taken.contains(&id)
                            || key.as_ref().is_some_and(|k| {
                                delivered_keys.get(k).is_some_and(|d| taken.contains(d))
                            });
                        assert!(fine, "seed {seed}: {id} acked but not taken (key {key:?})");
                    }
                }
                for (from, p) in peers.iter_mut().enumerate() {
                    while let Some(d) = p.poll_transmit() {
                        for (at, data) in links[from].on_send(now, d.len()).deliveries(&d) {
                            qseq += 1;
                            queue.push(Reverse((at, qseq, 1 - from, data)));
                        }
                    }
                }
            }
            let missing: Vec<u64> = sent
                .keys()
                .filter(|id| !outcome.contains_key(id))
                .copied()
                .collect();
            assert!(
                missing.is_empty(),
                "seed {seed}: no outcome for {missing:?}"
            );
            let w = peers[1].receiver.stats();
            let failed = outcome.values().filter(|ok| !**ok).count();
            eprintln!(
                "seed {seed}: sent {} acked {} failed {failed} window_recovered {} sources {:?}",
                sent.len(),
                outcome.len() - failed,
                w.window_recovered,
                peers[0].sender.window_stats()
            );
        }
    }
}
