//! Hostile review of cd7db18, 3984ba8, 626a0a8, 6803f92: the bugs it found (a huge per-send
//! deadline overflowed the clock and killed the driver; a stream send's longer deadline was
//! given up at the channel's), each with the test that failed before its fix.

mod common;

use std::time::{Duration, Instant};

use common::Ends;

use bytes::Bytes;
use surelink::channel::{Config, SendError, SendOptions};
use surelink::proto::{Sender, SenderConfig};
use surelink::sim::{LinkConfig, RateLimit};
use surelink::wire::Kind;

async fn ends(up: LinkConfig, down: LinkConfig, seed: u64, config: Config) -> Ends {
    ends_with(up, down, seed, config.clone(), config).await
}

async fn ends_with(
    up: LinkConfig,
    down: LinkConfig,
    seed: u64,
    config: Config,
    server_config: Config,
) -> Ends {
    common::open_ends(up, down, seed, config, server_config).await
}

fn clean() -> LinkConfig {
    LinkConfig::lossy(Duration::from_millis(20), 0.0)
}

/// 3984ba8 removed `deadline.filter(|d| *d < own)`: a per-send deadline is now added to
/// `now` unchecked (`Sender::send_until`, `Link::send`). A huge one (an application's
/// "no deadline of my own": `Duration::MAX`) overflows `Instant + Duration` and panics.
/// Sans-I/O input sequence: one call.
#[test]
fn sender_send_until_with_a_huge_deadline_does_not_panic() {
    let now = Instant::now();
    let mut sender = Sender::new(SenderConfig::default());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sender.send_until(now, None, Kind::Message, b"pay", Duration::MAX)
    }));
    assert!(outcome.is_ok(), "send_until panicked on Duration::MAX");
}

/// The same through the public API: the driver task panics on the huge deadline, and every
/// other send in flight on the channel (here one the peer's application already received)
/// learns `Closed`, which says "not delivered": untruthful.
#[tokio::test(start_paused = true)]
async fn a_huge_per_send_deadline_does_not_kill_the_channel_or_lie_about_other_sends() {
    let mut config = Config::default();
    config.explicit_ack = true;
    let e = ends(clean(), clean(), 21, config).await;
    let mut messages = e.server_messages;
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = received.clone();
    tokio::spawn(async move {
        while let Some(m) = messages.recv().await {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = m.ack();
            });
        }
    });
    let client = e.client.clone();
    let first = tokio::spawn(async move { client.send_with_key("a", "first").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(received.load(std::sync::atomic::Ordering::SeqCst), 1);
    let huge = e
        .client
        .send_with(
            "second",
            SendOptions::default().key("b").deadline(Duration::MAX),
        )
        .await;
    let first = first.await.unwrap();
    if let Err(err) = &first {
        assert!(
            err.may_have_been_delivered(),
            "the first send was received by the application but its outcome says not \
             delivered: {err:?}"
        );
    }
    assert!(first.is_ok(), "first: {first:?}");
    assert!(huge.is_ok(), "second: {huge:?}");
}

/// 3984ba8 lets a stream send (a message above `stream_threshold`) keep its own, longer
/// deadline, but its id is reserved in the sender (`Sender::reserve_id`) and given up at the
/// *channel's* deadline (`stamp_reserved`: `now + config.deadline`): the sender's FLOOR
/// then passes the id while the stream is still on its way, and the receiver refuses it
/// as passed. A 5 s stream send on a 300 ms channel, taking ~1.5 s on a slow link, fails.
/// (The server reads a stream for at most its own deadline, the default 5 s here: a server
/// whose deadline is shorter refuses slower streams, truthfully.)
#[tokio::test(start_paused = true)]
async fn a_stream_send_with_a_longer_deadline_is_not_passed_at_the_channels_deadline() {
    let mut config = Config::default();
    config.sender.deadline = Duration::from_millis(300);
    let mut slow = clean();
    slow.rate = Some(RateLimit {
        bytes_per_sec: 100_000,
        queue_bytes: 32_000,
    });
    let e = ends_with(slow, clean(), 22, config, Config::default()).await;
    let mut messages = e.server_messages;
    tokio::spawn(async move { while messages.recv().await.is_some() {} });
    let big = Bytes::from(vec![7u8; 150_000]);
    let outcome = e
        .client
        .send_with(big, SendOptions::default().deadline(Duration::from_secs(5)))
        .await;
    assert!(outcome.is_ok(), "{outcome:?}");
}

/// Control for the test above: the same stream on a channel whose own deadline is 5 s gets
/// through (so the failure above is the reserved id's deadline, not the link).
#[tokio::test(start_paused = true)]
async fn control_the_same_stream_with_the_channels_deadline_long() {
    let mut config = Config::default();
    config.sender.deadline = Duration::from_secs(5);
    let mut slow = clean();
    slow.rate = Some(RateLimit {
        bytes_per_sec: 100_000,
        queue_bytes: 32_000,
    });
    let e = ends(slow, clean(), 22, config).await;
    let mut messages = e.server_messages;
    tokio::spawn(async move { while messages.recv().await.is_some() {} });
    let big = Bytes::from(vec![7u8; 150_000]);
    let outcome = e.client.send(big).await;
    assert!(outcome.is_ok(), "{outcome:?}");
}

#[allow(dead_code)]
fn _uses(_: SendError) {}
