//! Issue 21: the promises where state is shared between channels of one server (the key
//! record), and between a receiver and a peer that follows the spec but not our habits.
//! Each test names its case; each failed on the code before the fix.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::proto::{Peer, ReceiverConfig, SenderConfig, SenderEvent};
use crate::wire::{
    encode_stream_head, Envelope, Frame, Limits, REFUSE_KEYS_FULL, REFUSE_KEY_REUSED,
    STREAM_REFUSED,
};

const SIZE: usize = 1200;

/// One server channel and the client peer that talks to it.
struct Pair {
    server: Link,
    client: Peer,
    delivered: Vec<Delivered>,
    answers: Vec<(u64, Option<u8>)>,
}

impl Pair {
    fn new(now: Instant, keys: &SharedKeys, config: LinkConfig) -> Pair {
        let config = LinkConfig {
            shared_keys: Some(keys.clone()),
            ..config
        };
        Pair {
            server: Link::new(now, config, Role::Server, ConnId(1), SIZE, 0),
            client: Peer::new(SenderConfig::default(), ReceiverConfig::default()),
            delivered: Vec::new(),
            answers: Vec::new(),
        }
    }

    /// Sends `payload` under `key` from the client; returns its id.
    fn send(&mut self, now: Instant, key: &str, payload: &str) -> u64 {
        let id = self
            .client
            .sender
            .send_keyed(now, Some(key.as_bytes()), payload.as_bytes())
            .unwrap();
        self.exchange(now);
        // Refusals and replays go out at most every 10 ms: let the next batch go.
        let later = now + Duration::from_millis(20);
        self.server.handle(later, Input::Timer);
        self.exchange(later);
        id
    }

    /// Carries datagrams both ways until nothing moves (no loss).
    fn exchange(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(d) = self.client.poll_transmit() {
                moved = true;
                self.server.handle(
                    now,
                    Input::Datagram {
                        conn: ConnId(1),
                        data: d,
                    },
                );
            }
            for a in std::iter::from_fn(|| self.server.poll_action()).collect::<Vec<_>>() {
                match a {
                    Action::Transmit { datagram, .. } => {
                        moved = true;
                        self.client.handle_datagram(now, datagram);
                    }
                    Action::Deliver(d) => self.delivered.push(d),
                    Action::AnswerStream { answer, status } => self.answers.push((answer, status)),
                    _ => {}
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// The application takes every message handed to it.
    fn take_all(&mut self, now: Instant) -> Vec<Delivered> {
        let taken = std::mem::take(&mut self.delivered);
        for d in &taken {
            self.server.handle(now, Input::Took { id: d.id });
        }
        self.exchange(now);
        taken
    }

    fn events(&mut self) -> Vec<SenderEvent> {
        std::iter::from_fn(|| self.client.sender.poll_event()).collect()
    }
}

fn keys() -> SharedKeys {
    SharedKeys::new(Duration::from_secs(3600), 1000)
}

fn acked(events: &[SenderEvent], id: u64) -> Option<bool> {
    events.iter().find_map(|e| match e {
        SenderEvent::Acked {
            id: i, replayed, ..
        } if *i == id => Some(*replayed),
        _ => None,
    })
}

fn refused(events: &[SenderEvent], id: u64) -> Option<u64> {
    events.iter().find_map(|e| match e {
        SenderEvent::Failed {
            id: i,
            reason: FailReason::Refused(code),
        } if *i == id => Some(*code),
        _ => None,
    })
}

/// Issue 21 case 1: a payment handed to channel A's application, which went away before
/// taking it, is given back: its key is freed, and the retry with the same key on channel B
/// of the same server is then delivered there (before issue 21: acked as a duplicate key,
/// and delivered by nobody). A answers its sender nothing (an unknown outcome: retry under
/// the key), not a refusal: B may deliver the key before a refusal from A would arrive
/// (found by the `channel` fuzz target in issue 23's session).
#[test]
fn a_given_back_payment_retried_on_another_channel_is_delivered() {
    let now = Instant::now();
    let keys = keys();
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    let id = a.send(now, "order-1", "pay 10.00");
    assert_eq!(a.delivered.len(), 1, "handed to A's application");
    a.server.handle(now, Input::AppGone);
    a.exchange(now + Duration::from_millis(20));
    let events = a.events();
    assert!(refused(&events, id).is_none(), "A: no refusal");
    assert!(acked(&events, id).is_none(), "A: no ack");

    let mut b = Pair::new(now, &keys, LinkConfig::default());
    let id = b.send(now, "order-1", "pay 10.00");
    assert_eq!(b.delivered.len(), 1, "the retry is delivered on B");
    b.take_all(now);
    assert_eq!(acked(&b.events(), id), Some(false));
}

/// Issue 21 case 1, milder form: while A's copy waits untaken, the retry on B is neither
/// delivered nor acked; once A's application takes it, B's next copy is acked as a replay.
#[test]
fn a_retry_waits_while_another_channel_holds_its_key() {
    let now = Instant::now();
    let keys = keys();
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    let first = a.send(now, "order-2", "pay 20.00");
    let mut b = Pair::new(now, &keys, LinkConfig::default());
    let retry = b.send(now, "order-2", "pay 20.00");
    assert!(b.delivered.is_empty());
    assert_eq!(
        acked(&b.events(), retry),
        None,
        "not acked while A holds the key"
    );
    a.take_all(now);
    assert_eq!(acked(&a.events(), first), Some(false));
    // B's sender hedges: a later copy finds the key delivered.
    let later = now + Duration::from_secs(1);
    b.client.handle_timeout(later);
    b.exchange(later);
    assert!(b.delivered.is_empty(), "never delivered twice");
    assert_eq!(acked(&b.events(), retry), Some(true), "acked as a replay");
}

/// Issue 21 case 2: a full shared key record refuses new keys on every channel (REFUSE 3)
/// instead of answering "first", so a retry on another channel is never delivered again.
#[test]
fn a_full_shared_key_record_refuses_new_keys_and_never_delivers_twice() {
    let now = Instant::now();
    let keys = SharedKeys::new(Duration::from_secs(3600), 2);
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    for k in ["order-5", "order-6"] {
        a.send(now, k, "pay");
    }
    a.take_all(now);
    let id = a.send(now, "order-7", "pay");
    assert!(a.delivered.is_empty());
    assert_eq!(refused(&a.events(), id), Some(REFUSE_KEYS_FULL));
    let later = now + Duration::from_secs(1);
    let mut b = Pair::new(later, &keys, LinkConfig::default());
    let id = b.send(later, "order-7", "pay");
    assert!(b.delivered.is_empty(), "refused on B too");
    assert_eq!(refused(&b.events(), id), Some(REFUSE_KEYS_FULL));
    // A key the record holds is still recognised everywhere.
    let id = b.send(later, "order-5", "pay");
    assert_eq!(acked(&b.events(), id), Some(true));
    assert!(b.delivered.is_empty());
}

/// Issue 21 case 8: a key reused with another payload is refused with its own reason (and
/// `SendError::KeyReused`), never acked; the same payload again is a replay.
#[test]
fn a_key_reused_with_another_payload_is_refused_and_a_replay_is_flagged() {
    let now = Instant::now();
    let keys = keys();
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    a.send(now, "order-8", "pay 10.00");
    a.take_all(now);
    let id = a.send(now, "order-8", "pay 999.00");
    assert!(a.delivered.is_empty());
    assert_eq!(refused(&a.events(), id), Some(REFUSE_KEY_REUSED));
    let id = a.send(now, "order-8", "pay 10.00");
    assert!(a.delivered.is_empty());
    assert_eq!(acked(&a.events(), id), Some(true), "a replay, flagged");
    // The link turns them into the application's outcomes.
    let mut b = Pair::new(now, &keys, LinkConfig::default());
    b.server.handle(
        now,
        Input::Send {
            token: 1,
            key: None,
            payload: Bytes::from_static(b"x"),
            deadline: None,
        },
    );
    let _ = std::iter::from_fn(|| b.server.poll_action()).count();
    b.server.peer.sender.handle_refuse(
        now,
        &crate::wire::RefuseFrame {
            reason: REFUSE_KEY_REUSED,
            ranges: vec![0..=0],
        },
    );
    b.server.flush(now);
    let outcomes: Vec<_> = std::iter::from_fn(|| b.server.poll_action())
        .filter_map(|a| match a {
            Action::Complete { outcome, .. } => Some(outcome),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes, vec![Err(SendError::KeyReused { id: 0 })]);
}

/// Issue 21 case 6 (the record's part): two clients' identical keys are different keys.
#[test]
fn keys_are_scoped_by_client_identity() {
    let now = Instant::now();
    let keys = keys();
    let scoped = |scope: u8| LinkConfig {
        key_scope: [scope; 32],
        ..LinkConfig::default()
    };
    let mut a = Pair::new(now, &keys, scoped(1));
    let mut b = Pair::new(now, &keys, scoped(2));
    a.send(now, "order-42", "pay A");
    b.send(now, "order-42", "pay B");
    assert_eq!(a.take_all(now).len(), 1);
    assert_eq!(b.take_all(now).len(), 1, "B's order-42 is its own");
}

fn stream_message(id: u64, key: &str, len: usize) -> Bytes {
    let mut m = encode_stream_head(id).to_vec();
    m.extend_from_slice(&Envelope::encode(Some(key.as_bytes()), &vec![9u8; len]));
    Bytes::from(m)
}

/// Issue 21 case 5: a keyed stream retry of a message that waits for the application gets no
/// definite "not delivered" (its payment may yet be taken): no answer, so its sender learns
/// an unknown outcome.
#[test]
fn a_stream_retry_of_a_held_key_is_not_told_refused() {
    let now = Instant::now();
    let keys = keys();
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    a.server.handle(
        now,
        Input::StreamMessage {
            answer: 1,
            message: stream_message(0, "order-9", 10_000),
        },
    );
    a.server.handle(
        now,
        Input::StreamMessage {
            answer: 2,
            message: stream_message(1, "order-9", 10_000),
        },
    );
    a.exchange(now);
    assert_eq!(a.delivered.len(), 1);
    assert!(
        !a.answers.contains(&(2, Some(STREAM_REFUSED))),
        "{:?}",
        a.answers
    );
    assert!(a.answers.contains(&(2, None)), "{:?}", a.answers);
    a.take_all(now);
    assert!(a.answers.contains(&(1, Some(STREAM_DELIVERED))));
}

/// Issue 21 case 4: stream messages parked while the application is behind are bounded by
/// `max_queued_bytes`, and dropped (unanswered) when the client reattaches.
#[test]
fn parked_stream_messages_are_bounded_and_dropped_on_reattach() {
    let now = Instant::now();
    let mut config = LinkConfig::default();
    config.receiver.max_queued_bytes = 1 << 20;
    let mut a = Pair::new(now, &keys(), config);
    let mut next = 0;
    for round in 0..10u64 {
        for _ in 0..100 {
            a.server.handle(
                now,
                Input::StreamMessage {
                    answer: next,
                    message: stream_message(next, &format!("k{next}"), 256 * 1024),
                },
            );
            next += 1;
        }
        assert!(
            a.server.parked_bytes <= 1 << 20,
            "{}",
            a.server.parked_bytes
        );
        a.server.handle(
            now,
            Input::Reattached {
                conn: ConnId(10 + round),
                max_datagram_size: Some(SIZE),
                protocol: 2,
            },
        );
        assert_eq!(a.server.parked_bytes, 0);
    }
    a.exchange(now);
    assert!(a.server.stats().streams_refused_parked > 0);
}

/// Issue 21 case 3, through a peer: an id whose shards were all lost until the hole TTL
/// passed is never acked; a late copy is refused (REFUSE 6), and the sender reports it as not
/// delivered, however long its deadline.
#[test]
fn an_id_the_floor_passed_is_refused_never_acked() {
    let now = Instant::now();
    let sender = SenderConfig {
        deadline: Duration::from_secs(60),
        ..SenderConfig::default()
    };
    let mut client = Peer::new(sender, ReceiverConfig::default());
    let mut server = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let carry = |from: &mut Peer, to: &mut Peer, at: Instant, drop: bool| {
        while let Some(d) = from.poll_transmit() {
            if !drop {
                to.handle_datagram(at, d);
            }
        }
    };
    let id0 = client.sender.send(now, Bytes::from_static(b"0")).unwrap();
    carry(&mut client, &mut server, now, false);
    let id1 = client.sender.send(now, Bytes::from_static(b"1")).unwrap();
    carry(&mut client, &mut server, now, true);
    let ttl = ReceiverConfig::default().hole_ttl;
    let late = now + ttl + Duration::from_secs(1);
    let id2 = client.sender.send(now, Bytes::from_static(b"2")).unwrap();
    carry(&mut client, &mut server, now, false);
    let id3 = client.sender.send(late, Bytes::from_static(b"3")).unwrap();
    carry(&mut client, &mut server, late, false);
    // The server's acks: never id 1.
    let mut acks = Vec::new();
    while let Some(d) = server.poll_transmit() {
        if let Ok(Frame::Ack(a)) = Frame::decode(d.clone(), &Limits::default()) {
            acks.push(a.clone());
        }
        client.handle_datagram(late, d);
    }
    assert!(!acks.is_empty());
    assert!(acks.iter().all(|a| !a.contains(id1)), "{acks:?}");
    let events: Vec<_> = std::iter::from_fn(|| client.sender.poll_event()).collect();
    for id in [id0, id2, id3] {
        assert!(acked(&events, id).is_some(), "{id}: {events:?}");
    }
    assert!(acked(&events, id1).is_none());
    // A late copy of id 1 (its hedge) is refused, not delivered, not acked.
    client.handle_timeout(late + Duration::from_secs(1));
    carry(&mut client, &mut server, late, false);
    let mut more = Vec::new();
    while let Some(d) = server.poll_transmit() {
        more.push(d.clone());
        client.handle_datagram(late, d);
    }
    let events: Vec<_> = std::iter::from_fn(|| client.sender.poll_event()).collect();
    assert_eq!(refused(&events, id1), Some(crate::wire::REFUSE_PASSED));
    assert_eq!(server.receiver.stats().delivered, 3);
}

/// A server channel whose client never comes back, while its application still holds a
/// message it was handed and has not taken: the link does not stop before the take (or the
/// application's end), so the take is recorded and the key counts as delivered from then, on
/// every channel. Before, the stopped link ignored the take: the key stayed held forever (or,
/// orphaned, expired a TTL after the stop rather than after the take).
#[test]
fn a_take_after_the_client_is_gone_is_recorded() {
    let now = Instant::now();
    let keys = SharedKeys::new(Duration::from_secs(3600), 1000);
    let mut a = Pair::new(now, &keys, LinkConfig::default());
    a.send(now, "order-10", "pay");
    assert_eq!(
        a.delivered.len(),
        1,
        "in the application's queue, not taken"
    );
    a.server.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(1),
            how: Lost::Retryable,
            reason: "gone".into(),
        },
    );
    let late = now + LinkConfig::default().channel_ttl + Duration::from_secs(1);
    a.server.handle(late, Input::Timer);
    assert!(
        a.server.is_closed() && !a.server.is_stopped(),
        "waits for the take"
    );
    // Meanwhile a retry elsewhere is held back.
    let mut b = Pair::new(late, &keys, LinkConfig::default());
    let id = b.send(late, "order-10", "pay");
    assert!(b.delivered.is_empty());
    assert_eq!(acked(&b.events(), id), None);
    // The application takes it: recorded, and the link stops.
    let taken = late + Duration::from_secs(10);
    a.take_all(taken);
    assert!(a.server.is_stopped());
    let retry = b.send(taken, "order-10", "pay");
    assert!(b.delivered.is_empty(), "never twice");
    assert_eq!(
        acked(&b.events(), retry),
        Some(true),
        "a replay of the take"
    );
}
