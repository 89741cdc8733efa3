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
    link.handle(
        now,
        Input::ClaimAnswered {
            attempt,
            result: Ok(ClaimOutcome::Now),
        },
    );
    handed.extend(delivered(&drain(&mut link)));
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
            result: Ok(ClaimOutcome::Before),
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
