//! Hostile review of requests/replies and explicit answers (issue 24). Each test states the
//! promise it checks; a failing test is a promise broken.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use surelink::channel::{Channel, Config, Listener, Messages, SendOptions};
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig, SERVER_NAME};

fn clean() -> LinkConfig {
    LinkConfig::lossy(Duration::from_millis(20), 0.0)
}

fn pair(seed: u64) -> Pair {
    Pair::new(PairConfig {
        seed,
        congestion: Congestion::Surelink,
        client_to_server: clean(),
        server_to_client: clean(),
        ..PairConfig::default()
    })
    .unwrap()
}

async fn open(
    seed: u64,
    client: Config,
    server: Config,
) -> (Pair, Channel, Messages, Channel, Messages) {
    let pair = pair(seed);
    let (cc, sc) = pair.connect().await.unwrap();
    let (c, cm) = Channel::open(cc, client).unwrap();
    let (s, sm) = Channel::open(sc, server).unwrap();
    (pair, c, cm, s, sm)
}

/// Promise: an acked message was taken by the application; with explicit acks, answered
/// with ack. A message the application dropped without an answer (given back) must never be
/// acked. Here the sender's deadline (45 s, an authorization's usual 40-60 s) is longer than
/// the receiver's hole TTL (30 s): the `Released` state expires, the id is still "delivered"
/// in the dedupe window, and the next hedge copy is acked as a duplicate.
#[tokio::test(start_paused = true)]
async fn a_given_back_message_is_never_acked_later() {
    let mut config = Config::default();
    config.explicit_ack = true;
    config.sender.deadline = Duration::from_secs(45);
    let (_pair, client, _cm, _server, mut messages) = open(31, config.clone(), config).await;
    let seen = Arc::new(Mutex::new(0u32));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = messages.recv().await {
            *s.lock().unwrap() += 1;
            drop(m); // no answer: given back
        }
    });
    let started = tokio::time::Instant::now();
    let outcome = client.send("pay 10.00 EUR").await;
    eprintln!("after {:?}: {outcome:?}", started.elapsed());
    assert_eq!(*seen.lock().unwrap(), 1);
    match outcome {
        Err(e) => assert!(e.may_have_been_delivered(), "{e}"),
        Ok(receipt) => panic!(
            "given back (never acked by the application), yet acked after {:?}: {receipt:?}",
            started.elapsed()
        ),
    }
}

/// Promise: a refusal is a definite "not processed" and must be true. The host's
/// application received a request (it is working on it) and stops receiving further
/// messages (drops `Messages`, e.g. a graceful shutdown that finishes work in flight) and
/// then replies. The requester must get the reply or an unknown outcome, never "not
/// processed".
#[tokio::test(start_paused = true)]
async fn a_request_received_before_messages_is_dropped_is_not_refused() {
    let (_pair, client, _cm, _server, mut messages) =
        open(32, Config::default(), Config::default()).await;
    let answered = Arc::new(Mutex::new(None));
    let a = answered.clone();
    tokio::spawn(async move {
        let request = messages.recv().await.unwrap();
        drop(messages); // no more messages; the request in hand is still being processed
        tokio::time::sleep(Duration::from_millis(100)).await;
        *a.lock().unwrap() = Some(request.reply("approved"));
    });
    let outcome = client.request("auth 25.00 EUR").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answered = *answered.lock().unwrap();
    eprintln!("request: {outcome:?}; the host's reply() returned {answered:?}");
    match outcome {
        Ok(reply) => assert_eq!(reply.payload, "approved"),
        Err(e) => assert!(
            e.may_have_been_delivered(),
            "the host processed and replied (reply() -> {answered:?}), yet the requester was \
             told definitely 'not processed': {e}"
        ),
    }
}

/// Promise: a keyed request is never processed twice, across channels of one server (they
/// share a key record). The host's application on channel A holds a request (processing)
/// when it drops A's `Messages`; the key is released while the work is under way, so the
/// terminal's retry under the same key on a new channel B is processed a second time.
#[tokio::test(start_paused = true)]
async fn a_request_held_when_messages_is_dropped_is_not_processed_again_elsewhere() {
    let pair = pair(33);
    let mut listener = Listener::new(pair.server.clone(), Config::default());
    let processed = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let p = processed.clone();
    let host = tokio::spawn(async move {
        let mut n = 0;
        while let Some((channel, mut messages)) = listener.accept().await {
            n += 1;
            let p = p.clone();
            if n == 1 {
                // Channel A: takes one request, stops receiving, finishes the work slowly.
                tokio::spawn(async move {
                    let request = messages.recv().await.unwrap();
                    p.lock().unwrap().push(request.payload.clone());
                    drop(messages);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    let _ = request.reply("approved #1");
                    drop(channel);
                });
            } else {
                tokio::spawn(async move {
                    let _channel = channel;
                    while let Some(request) = messages.recv().await {
                        p.lock().unwrap().push(request.payload.clone());
                        let _ = request.reply("approved #2");
                    }
                });
            }
        }
    });
    let options = SendOptions::default()
        .key("till-1/auth-1")
        .deadline(Duration::from_millis(1000));
    let (a, _am) = Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        Config::default(),
    )
    .await
    .unwrap();
    let first = a.request_with("auth 9.99", options.clone()).await;
    eprintln!("first (channel A): {first:?}");
    assert!(first.as_ref().is_err_and(|e| e.may_have_been_delivered()));
    // The terminal restarts: a new channel, the same key.
    let (b, _bm) = Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        Config::default(),
    )
    .await
    .unwrap();
    let retry = b.request_with("auth 9.99", options).await;
    eprintln!("retry (channel B): {retry:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let processed = processed.lock().unwrap().clone();
    host.abort();
    assert!(
        processed.len() <= 1,
        "one keyed request processed {} times: {processed:?}; retry got {retry:?}",
        processed.len()
    );
}

/// Promise: with explicit acks, an ack means the application answered with ack. With a
/// claims store, a message the application nacked (or dropped) "stays claimed and unacked";
/// a retry under its key must not be acked as delivered either (the application never
/// processed the payment).
#[tokio::test(start_paused = true)]
async fn with_a_store_a_nacked_message_is_not_acked_to_its_retry() {
    use surelink::store::MemoryStore;
    let pair = pair(34);
    let mut server_config = Config::default();
    server_config.explicit_ack = true;
    server_config.store = Some(Arc::new(MemoryStore::default()));
    let mut listener = Listener::new(pair.server.clone(), server_config);
    let answers = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let a = answers.clone();
    tokio::spawn(async move {
        while let Some((channel, mut messages)) = listener.accept().await {
            let a = a.clone();
            tokio::spawn(async move {
                let _channel = channel;
                while let Some(m) = messages.recv().await {
                    // The application declines every payment: none is processed.
                    let r = m.nack();
                    eprintln!("awaits_answer {} nack -> {r:?}", m.awaits_answer());
                    a.lock().unwrap().push("nack");
                }
            });
        }
    });
    let mut config = Config::default();
    config.sender.deadline = Duration::from_millis(600);
    let (c, _cm) = Channel::connect(&pair.client, pair.server_addr, SERVER_NAME, None, config)
        .await
        .unwrap();
    let options = SendOptions::default().key("order-77");
    let first = c.send_with("pay 77.00 EUR", options.clone()).await;
    eprintln!("first: {first:?}");
    assert!(
        first.is_err(),
        "the application nacked it (Config::explicit_ack: 'stays claimed and unacked'), yet it \
         was acked: {first:?}"
    );
    let retry = c.send_with("pay 77.00 EUR", options).await;
    eprintln!(
        "retry: {retry:?}; the application answered {:?}",
        answers.lock().unwrap()
    );
    assert!(
        !answers.lock().unwrap().is_empty(),
        "the application saw the payment"
    );
    assert!(
        retry.is_err(),
        "every delivery was nacked by the application, yet the retry was acked: {retry:?}"
    );
}

/// Promise: replies kept are bounded by `max_reply_bytes`. The bound is checked only when a
/// request's key is judged, so requests judged together are all taken with their replies:
/// here 20 replies of 900 bytes are kept with a bound of 1,000 (each retry gets its kept
/// reply, which proves it is kept).
#[tokio::test(start_paused = true)]
async fn replies_kept_stay_within_max_reply_bytes() {
    let mut server_config = Config::default();
    server_config.receiver.max_reply_bytes = 1000;
    let (_pair, client, _cm, _server, mut messages) =
        open(35, Config::default(), server_config).await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(r) = messages.recv().await {
            held.push(r);
            if held.len() == 20 {
                for r in held.drain(..) {
                    let mut reply = r.payload.to_vec();
                    reply.resize(900, b'.');
                    r.reply(reply).unwrap();
                }
            }
        }
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let c = client.clone();
        tasks.spawn(async move {
            c.request_with(
                format!("auth {i}"),
                SendOptions::default().key(format!("k{i}")),
            )
            .await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let mut kept = 0;
    for i in 0..20 {
        let r = client
            .request_with(
                format!("auth {i}"),
                SendOptions::default()
                    .key(format!("k{i}"))
                    .deadline(Duration::from_millis(500)),
            )
            .await;
        if r.is_ok_and(|r| r.replayed || r.payload.len() == 900) {
            kept += 1;
        }
    }
    eprintln!("replies kept and replayed: {kept} (900 bytes each, bound 1000)");
    assert!(
        kept * 900 <= 1000,
        "{} bytes of replies kept, bound 1000",
        kept * 900
    );
}

/// Promise (PROTOCOL.md 8.3): a reply "is the channel's, not the application's: it is taken
/// even when the application reads nothing". A terminal that only sends requests never reads
/// its `Messages`; the host also sends it a few notices, which fill the terminal's delivery
/// queue (`max_queued_bytes`). From then on every shard is dropped as "backlogged", replies
/// included: every request ends without its reply (a peer's ordinary messages harm the
/// replies).
#[tokio::test(start_paused = true)]
async fn replies_get_through_while_the_application_does_not_read_messages() {
    let mut client_config = Config::default();
    client_config.receiver.max_queued_bytes = 8 << 10;
    let (_pair, client, _unread, server, mut messages) =
        open(36, client_config, Config::default()).await;
    tokio::spawn(async move {
        while let Some(r) = messages.recv().await {
            let _ = r.reply("approved");
        }
    });
    // The host's notices, which the terminal never reads.
    for i in 0..16 {
        let s = server.clone();
        tokio::spawn(async move {
            let _ = s.send(vec![i as u8; 1000]).await;
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let options = SendOptions::default()
        .key("till-4/auth-1")
        .deadline(Duration::from_secs(2));
    let reply = client.request_with("auth 1.00", options).await;
    eprintln!(
        "request: {reply:?}; client stats {:?}",
        client.stats().receiver
    );
    let reply = reply.unwrap_or_else(|e| panic!("no reply while Messages is unread: {e}"));
    assert_eq!(reply.payload, "approved");
}
