//! Every bound in `Config`, at and past its limit, through the public API: the largest
//! message, messages in flight, reassembly bytes and blocks, the delivery queue, the dedupe
//! window with its hole TTL, and idempotency keys with their TTL. (Channels per server:
//! `tests/reconnect.rs`, `a_server_at_its_channel_limit_refuses_and_the_client_learns_it`.)
//!
//! Passing a limit gives a clear error, a wait, or a counted drop; never unbounded memory,
//! never a message acked that was not delivered, never one delivered twice.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{assert_once, collect, number, payment};
use surelink::channel::{Channel, Config, Messages, SendError};
use surelink::proto::{FailReason, Peer, ReceiverConfig, SenderConfig, SenderEvent};
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig};
use surelink::wire::BlockHeader;

/// A BBR pair with `delay` each way and no loss, and channels with these configs.
async fn channels(
    delay: Duration,
    client: Config,
    server: Config,
) -> (Pair, quinn::Connection, Channel, Channel, Messages) {
    let pair = Pair::new(PairConfig {
        seed: 1,
        congestion: Congestion::Bbr,
        ..PairConfig::symmetric(LinkConfig {
            delay,
            ..LinkConfig::default()
        })
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client_ch, _client_messages) = Channel::open(client_conn.clone(), client).unwrap();
    let (server_ch, server_messages) = Channel::open(server_conn, server).unwrap();
    // The client's own Messages are not used by these tests; dropping them is allowed.
    (pair, client_conn, client_ch, server_ch, server_messages)
}

#[tokio::test(start_paused = true)]
async fn the_largest_message_is_sent_and_one_byte_more_is_refused_before_sending() {
    let mut config = Config::default();
    config.max_message_size = 20_000;
    let (_pair, _conn, client, _server, mut messages) =
        channels(Duration::from_millis(10), config.clone(), config).await;

    let at_limit = Bytes::from(vec![7u8; 20_000]);
    // A stream message is acked once the application took it: receive while sending.
    let (sent, got) = tokio::join!(client.send(at_limit.clone()), messages.recv());
    sent.expect("at the limit");
    assert_eq!(got.unwrap().payload, at_limit);

    let before = client.stats();
    let past = client.send(Bytes::from(vec![7u8; 20_001])).await;
    assert!(
        matches!(
            past,
            Err(SendError::TooLarge {
                len: 20_001,
                max: 20_000
            })
        ),
        "{past:?}"
    );
    // The key counts toward the limit.
    let keyed = client
        .send_with_key(
            Bytes::from_static(b"order-1"),
            Bytes::from(vec![7u8; 19_995]),
        )
        .await;
    assert!(
        matches!(keyed, Err(SendError::TooLarge { len: 20_002, .. })),
        "{keyed:?}"
    );
    let after = client.stats();
    assert_eq!(
        (after.stream_messages_sent, after.sender.messages_sent),
        (before.stream_messages_sent, before.sender.messages_sent),
        "nothing was sent"
    );
}

#[tokio::test(start_paused = true)]
async fn sends_past_max_in_flight_wait_for_room() {
    let mut config = Config::default();
    config.sender.max_in_flight = 8;
    let (_pair, _conn, client, _server, messages) =
        channels(Duration::from_millis(50), config, Config::default()).await;
    let delivered = collect(messages, Duration::from_secs(2));

    let n = 64u32;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.send(payment(i)).await })
        })
        .collect();
    let started = tokio::time::Instant::now();
    let mut most = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        most = most.max(client.stats().in_flight);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    for t in tasks {
        t.await.unwrap().expect("every send acked once it had room");
    }
    assert_eq!(most, 8, "in flight reached the limit and never passed it");
    // 64 sends, 8 at a time, each at least one 100 ms round trip: they waited their turn.
    assert!(took >= Duration::from_millis(800), "took {took:?}");
    let delivered = delivered.await.unwrap();
    assert_once(&delivered);
    assert_eq!(delivered.len(), n as usize);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_incomplete_blocks_stays_within_the_reassembly_caps() {
    let (max_blocks, max_bytes) = (16, 16 * 1024);
    let mut server = Config::default();
    server.receiver.reassembler.max_blocks = max_blocks;
    server.receiver.reassembler.max_bytes = max_bytes;
    let (_pair, client_conn, client, server, messages) =
        channels(Duration::from_millis(10), Config::default(), server).await;
    let delivered = collect(messages, Duration::from_secs(1));

    // The hostile half of the client: first shards of 2-shard blocks that never complete,
    // 1000 bytes each, one per millisecond, with block ids far above the real sender's.
    let forged = 2000u64;
    let hostile = tokio::spawn(async move {
        let mut sent = 0u64;
        for i in 0..forged {
            let header = BlockHeader {
                block: 1_000_000 + i,
                data_shards: 2,
                total_shards: 3,
                shard_size: 1000,
                first_message: 5_000_000 + i,
                lengths: [1000u32, 1000].into_iter().collect(),
                checksum: 0,
            };
            let mut d = Vec::new();
            header.encode_shard(0, &[9; 1000], &mut d);
            if client_conn.send_datagram(Bytes::from(d)).is_ok() {
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        sent
    });
    let sampler = {
        let server = server.clone();
        tokio::spawn(async move {
            let (mut blocks, mut bytes) = (0, 0);
            for _ in 0..2500 {
                let r = server.stats().reassembly;
                blocks = blocks.max(r.blocks_buffered);
                bytes = bytes.max(r.bytes_buffered);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (blocks, bytes)
        })
    };
    let n = 200u32;
    let outcomes = common::send_paced(&client, 0..n, Duration::from_millis(10)).await;
    for (i, r) in &outcomes {
        assert!(r.is_ok(), "real payment {i} unaffected: {r:?}");
    }
    let sent = hostile.await.unwrap();
    let (most_blocks, most_bytes) = sampler.await.unwrap();
    let r = server.stats().reassembly;
    eprintln!("forged {sent}, most held {most_blocks} blocks / {most_bytes} bytes, {r:?}");
    assert_eq!(sent, forged);
    assert!(most_blocks <= max_blocks, "{most_blocks} blocks held");
    assert!(most_bytes <= max_bytes, "{most_bytes} bytes held");
    // Every forged block was either evicted (counted) or is among the few still held.
    assert!(
        r.blocks_evicted + r.blocks_buffered as u64 >= forged,
        "evictions counted: {r:?}"
    );
    let delivered = delivered.await.unwrap();
    assert_once(&delivered);
    assert_eq!(delivered.len(), n as usize, "nothing forged delivered");
}

#[tokio::test(start_paused = true)]
async fn an_application_that_stops_reading_holds_the_sender_back_and_loses_nothing() {
    let cap = 8 * 1024;
    let mut server = Config::default();
    server.receiver.max_queued_bytes = cap;
    let (_pair, _conn, client, server, mut messages) =
        channels(Duration::from_millis(10), Config::default(), server).await;

    // 300 payments of 512 bytes, one per millisecond, while the application reads nothing.
    let n = 300u32;
    let sending = {
        let client = client.clone();
        tokio::spawn(
            async move { common::send_paced(&client, 0..n, Duration::from_millis(1)).await },
        )
    };
    let mut most_queued = 0;
    for _ in 0..1500 {
        most_queued = most_queued.max(server.stats().receiver.bytes_queued);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stalled = server.stats().receiver;
    let acked_while_stalled = client.stats().sender.acked;
    eprintln!("stalled: acked {acked_while_stalled}, {stalled:?}");
    // Bounded: the cap, overshot by at most the one message that crossed it (and the
    // hand-off queue holds the first few beyond it).
    assert!(most_queued < cap + 512, "queued {most_queued} bytes");
    assert!(stalled.shards_refused_backlog > 0, "refusals counted");
    // Acked means taken by the application (issue case 1): it took none, so none is acked.
    assert_eq!(acked_while_stalled, 0);
    assert!(
        stalled.delivered > 0,
        "delivered to the hand-off, waiting to be taken"
    );
    assert!(stalled.delivered < u64::from(n));

    // The application catches up: the rest arrive through hedges, each once.
    let mut delivered = BTreeMap::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), messages.recv()).await {
        *delivered.entry(number(&m.payload)).or_insert(0u32) += 1;
    }
    let outcomes = sending.await.unwrap();
    let acked: Vec<u32> = outcomes
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(i, _)| *i)
        .collect();
    for (i, r) in &outcomes {
        if let Err(e) = r {
            assert!(matches!(e, SendError::Timeout { .. }), "payment {i}: {e:?}");
        }
    }
    assert_once(&delivered);
    for i in &acked {
        assert!(delivered.contains_key(i), "acked payment {i} was delivered");
    }
    eprintln!(
        "acked {} of {n}, delivered {}, client {:?}",
        acked.len(),
        delivered.len(),
        client.stats().sender
    );
    assert_eq!(
        acked.len(),
        n as usize,
        "a 1.5 s stall fits in the 5 s deadline"
    );
}

/// Moves every datagram `from` wants to send into `to`, `drop`ping those it selects.
fn carry(now: Instant, from: &mut Peer, to: &mut Peer) -> usize {
    let mut n = 0;
    while let Some(d) = from.poll_transmit() {
        to.handle_datagram(now, d);
        n += 1;
    }
    n
}

fn acked(peer: &mut Peer) -> Vec<u64> {
    let mut ids = Vec::new();
    while let Some(e) = peer.sender.poll_event() {
        if let SenderEvent::Acked { id, .. } = e {
            ids.push(id);
        }
    }
    ids
}

/// A sender without parity or hedging surprises: one data shard per small message.
fn plain_sender() -> SenderConfig {
    SenderConfig {
        adaptive: None,
        first_flight_repair: 0,
        deadline: Duration::from_millis(500),
        ..SenderConfig::default()
    }
}

/// Issue cases 5 and 12: past the window an id is refused (a definite outcome, at once),
/// and a lost message frees the window at the sender's deadline (its FLOOR), not after the
/// receiver's hole TTL.
#[test]
fn the_dedupe_window_takes_its_last_id_refuses_the_next_and_moves_on_at_the_deadline() {
    let t0 = Instant::now();
    let window = 16;
    let mut a = Peer::new(plain_sender(), ReceiverConfig::default());
    let mut b = Peer::new(
        plain_sender(),
        ReceiverConfig {
            dedupe_window: window,
            hole_ttl: Duration::from_secs(30),
            ..ReceiverConfig::default()
        },
    );
    // Message 0 is lost: it holds the window's low watermark.
    assert_eq!(a.sender.send(t0, payment(0)).unwrap(), 0);
    while a.poll_transmit().is_some() {}
    for i in 1..=window {
        assert_eq!(a.sender.send(t0, payment(i as u32)).unwrap(), i);
    }
    carry(t0, &mut a, &mut b);
    let mut delivered = Vec::new();
    while let Some(d) = b.receiver.poll_delivery() {
        delivered.push(d.id);
    }
    // At the limit: ids up to watermark + window - 1 are taken. Past it: refused, counted.
    assert_eq!(delivered, (1..window).collect::<Vec<_>>());
    assert_eq!(b.receiver.stats().out_of_window, 1);
    assert_eq!(b.receiver.stats().refused.out_of_window, 1);
    assert!(b.receiver.stats().ids_tracked <= window as usize);
    carry(t0, &mut b, &mut a);
    let mut acked_ids = Vec::new();
    let mut refused = Vec::new();
    while let Some(e) = a.sender.poll_event() {
        match e {
            SenderEvent::Acked { id, .. } => acked_ids.push(id),
            SenderEvent::Failed {
                id,
                reason: FailReason::Refused(code),
            } => refused.push((id, code)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acked_ids, (1..window).collect::<Vec<_>>());
    assert_eq!(refused, vec![(window, 2)], "refused at once, not acked");

    // The sender gives up on 0 at its deadline (outcome unknown, retry allowed) and says so
    // with a FLOOR: the receiver's window moves on at once.
    let t1 = t0 + Duration::from_millis(600);
    a.handle_timeout(t1);
    carry(t1, &mut a, &mut b);
    let mut failed = Vec::new();
    while let Some(e) = a.sender.poll_event() {
        if let SenderEvent::Failed { id, reason } = e {
            assert_eq!(reason, FailReason::DeadlineExceeded);
            failed.push(id);
        }
    }
    assert_eq!(failed, vec![0]);
    assert_eq!(b.receiver.floor(), window + 1);

    // The application's retry of payment 16 (a new id) is delivered, and so is what follows.
    let retry = a.sender.send(t1, payment(window as u32)).unwrap();
    let next = a.sender.send(t1, payment(99)).unwrap();
    carry(t1, &mut a, &mut b);
    let mut delivered = Vec::new();
    while let Some(d) = b.receiver.poll_delivery() {
        delivered.push(d.id);
    }
    assert_eq!(delivered, vec![retry, next]);
    carry(t1, &mut b, &mut a);
    assert_eq!(acked(&mut a), vec![retry, next]);
}

/// Issue case 6: keys are bounded by count and kept for their whole TTL: at `max_keys` a new
/// key is refused (a definite "not delivered", REFUSE code 3), never an old one forgotten.
#[test]
fn idempotency_keys_are_bounded_by_count_and_never_forgotten_early() {
    let t0 = Instant::now();
    let mut a = Peer::new(plain_sender(), ReceiverConfig::default());
    let mut b = Peer::new(
        plain_sender(),
        ReceiverConfig {
            max_keys: 2,
            key_ttl: Duration::from_secs(10),
            ..ReceiverConfig::default()
        },
    );
    // (acked, refused with this code, delivered, keys refused, duplicate keys)
    let mut send = |t: Instant, key: &str| {
        let id = a
            .sender
            .send_keyed(t, Some(key.as_bytes()), b"pay")
            .unwrap();
        carry(t, &mut a, &mut b);
        carry(t, &mut b, &mut a);
        let mut acked = false;
        let mut refused = None;
        while let Some(e) = a.sender.poll_event() {
            match e {
                SenderEvent::Acked { id: i, .. } if i == id => acked = true,
                SenderEvent::Failed {
                    id: i,
                    reason: FailReason::Refused(code),
                } if i == id => refused = Some(code),
                other => panic!("{other:?}"),
            }
        }
        let delivered = std::iter::from_fn(|| b.receiver.poll_delivery()).count();
        let st = b.receiver.stats();
        assert!(st.keys_held <= 2, "{st:?}");
        (
            acked,
            refused,
            delivered,
            st.keys_refused,
            st.duplicate_keys,
        )
    };
    assert_eq!(send(t0, "k1"), (true, None, 1, 0, 0));
    assert_eq!(send(t0, "k2"), (true, None, 1, 0, 0));
    // Past max_keys: the new key is refused, definitely not delivered.
    assert_eq!(send(t0, "k3"), (false, Some(3), 0, 1, 0));
    // Every held key is still recognised: a retry is acked, not delivered.
    assert_eq!(send(t0, "k1"), (true, None, 0, 1, 1));
    assert_eq!(send(t0, "k2"), (true, None, 0, 1, 2));
    // Within the TTL, remembered; after it, forgotten, and there is room again.
    let later = t0 + Duration::from_secs(9);
    assert_eq!(send(later, "k1"), (true, None, 0, 1, 3));
    let expired = t0 + Duration::from_secs(11);
    assert_eq!(send(expired, "k3"), (true, None, 1, 1, 3));
    assert_eq!(send(expired, "k1"), (true, None, 1, 1, 3));
    assert_eq!(b.receiver.stats().refused.keys_full, 1);
}

#[tokio::test(start_paused = true)]
async fn stream_messages_wait_for_a_slow_application_too() {
    let mut server = Config::default();
    server.receiver.max_queued_bytes = 8 * 1024;
    let (_pair, _conn, client, server, mut messages) =
        channels(Duration::from_millis(10), Config::default(), server).await;
    let big = |i: u8| Bytes::from(vec![i; 20_000]);
    let n = 8u8;
    // Stream messages parked behind the slow application hold at most `max_queued_bytes` (or
    // one message; issue 21 case 4): a new one past that is refused, definitely not
    // delivered, and its sender retries under its key.
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                loop {
                    match c.send_with_key(format!("big-{i}"), big(i)).await {
                        Err(e) if !e.may_have_been_delivered() && e.is_retryable() => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        other => return other,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stalled = server.stats();
    let acked = tasks.iter().filter(|t| t.is_finished()).count();
    eprintln!(
        "stalled: {acked} acked, {} received on streams, {:?}",
        stalled.stream_messages_received, stalled.receiver
    );
    assert!(stalled.stream_messages_received >= u64::from(n));
    // Four in the hand-off, one in the receiver (which is then over its cap); the rest are
    // held unanswered, so their senders wait. None was taken, so none is acked: a stream
    // message is acked once the application took it (issue case 1).
    assert_eq!(stalled.receiver.delivered, 5);
    assert_eq!(acked, 0, "acked means taken by the application");
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(messages.recv().await.unwrap().payload);
    }
    for t in tasks {
        t.await.unwrap().expect("acked once the application read");
    }
    got.sort();
    assert_eq!(
        got,
        (0..n).map(big).collect::<Vec<_>>(),
        "each once, intact"
    );
}

/// Issue case 8: a `send` whose future is dropped (here by a timeout) keeps its in-flight
/// slot until its message has an outcome: backpressure holds (a later send waits for room
/// instead of failing with `Backpressure`), `in_flight` stays truthful, and the abandoned
/// outcomes are counted.
#[tokio::test(start_paused = true)]
async fn a_cancelled_send_keeps_its_slot_until_its_message_has_an_outcome() {
    let mut config = Config::default();
    config.sender.max_in_flight = 4;
    let (_pair, _conn, client, _server, messages) =
        channels(Duration::from_millis(50), config, Config::default()).await;
    let delivered = collect(messages, Duration::from_secs(2));
    for i in 0..4 {
        let cancelled = tokio::time::timeout(Duration::from_millis(5), client.send(payment(i)));
        assert!(cancelled.await.is_err(), "no ack within 5 ms");
    }
    assert_eq!(
        client.stats().in_flight,
        4,
        "the cancelled messages are in flight"
    );
    let started = tokio::time::Instant::now();
    let fifth = client.send(payment(4)).await;
    assert!(fifth.is_ok(), "the fifth waited for a slot: {fifth:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(50),
        "it waited for an outcome of the first four"
    );
    let stats = client.stats();
    assert_eq!(stats.sends_abandoned, 4);
    assert_eq!(
        stats.sender.acked, 5,
        "the abandoned sends' outcomes are counted"
    );
    assert_eq!(stats.in_flight, 0);
    let delivered = delivered.await.unwrap();
    assert_once(&delivered);
    assert_eq!(delivered.len(), 5);
}

/// Issue case 8: a per-send deadline replaces the channel's for that message.
#[tokio::test(start_paused = true)]
async fn a_per_send_deadline_bounds_that_send_alone() {
    let (_pair, _conn, client, _server, messages) = channels(
        Duration::from_millis(200),
        Config::default(),
        Config::default(),
    )
    .await;
    let delivered = collect(messages, Duration::from_secs(2));
    let options = surelink::channel::SendOptions::default().deadline(Duration::from_millis(100));
    let started = tokio::time::Instant::now();
    let short = client.send_with(payment(1), options).await;
    assert!(
        matches!(short, Err(SendError::Timeout { id: 0 })),
        "{short:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    // The same channel's default deadline (5 s) covers the 400 ms round trip.
    client.send(payment(2)).await.unwrap();
    let delivered = delivered.await.unwrap();
    assert_once(&delivered);
}
