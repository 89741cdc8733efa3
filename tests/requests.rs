//! Requests and replies (issue 24) over real quinn connections on the simulator, in virtual
//! time: the reply's leg is protected like a message, a retried request gets the first reply
//! byte for byte and is never processed twice, and explicit answers (ack, nack, none) mean
//! what they say.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use surelink::channel::{Channel, Config, Messages, SendError, SendOptions};
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig};

use common::Ends;

async fn ends(up: LinkConfig, down: LinkConfig, seed: u64, config: Config) -> Ends {
    common::open_ends(up, down, seed, config.clone(), config).await
}

fn lossy(p: f64) -> LinkConfig {
    LinkConfig::lossy(Duration::from_millis(20), p)
}

/// What the host's application did: how often it processed each request (by payload), and
/// the reply it gave the first time. A reply names the order in which the host processed
/// requests, so a request processed twice would get another reply.
#[derive(Default)]
struct Host {
    processed: BTreeMap<Bytes, u32>,
    replies: HashMap<Bytes, Bytes>,
    order: u32,
}

fn host(mut messages: Messages, delay: Duration) -> Arc<Mutex<Host>> {
    let log = Arc::new(Mutex::new(Host::default()));
    let l = log.clone();
    tokio::spawn(async move {
        while let Some(request) = messages.recv().await {
            assert!(request.is_request());
            let log = l.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let reply = {
                    let mut h = log.lock().unwrap();
                    h.order += 1;
                    *h.processed.entry(request.payload.clone()).or_default() += 1;
                    let reply = Bytes::from(format!("approved #{}", h.order));
                    h.replies.insert(request.payload.clone(), reply.clone());
                    reply
                };
                request.reply(reply).unwrap();
            });
        }
    });
    log
}

/// 200 keyed requests at 200/s with 10% loss both ways: every request gets its own reply
/// (correlated by the protocol), each processed once.
#[tokio::test(start_paused = true)]
async fn every_request_gets_its_reply_under_loss() {
    let e = ends(lossy(0.1), lossy(0.1), 7, Config::default()).await;
    let log = host(e.server_messages, Duration::ZERO);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let c = e.client.clone();
        tasks.spawn(async move {
            let payload = Bytes::from(format!("auth {i:04}"));
            let r = c
                .request_with(payload.clone(), SendOptions::default().key(format!("k{i}")))
                .await;
            (payload, r)
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut replies = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (payload, r) = done.unwrap();
        let reply = r.unwrap_or_else(|e| panic!("{payload:?}: {e}"));
        assert!(!reply.replayed);
        replies.insert(payload, reply.payload);
    }
    let h = log.lock().unwrap();
    assert_eq!(replies.len(), 200);
    for (payload, reply) in &replies {
        assert_eq!(h.processed[payload], 1, "{payload:?} processed once");
        assert_eq!(&h.replies[payload], reply, "{payload:?}: its own reply");
    }
    let st = e.server.stats();
    assert_eq!(st.receiver.replies_replayed, 0);
}

/// Replies dropped on the way back (20% loss host → terminal and two fades, 5% the other
/// way) with short deadlines: many requests end unknown, and the terminal retries each under its key until
/// it has a reply. Every request reached the host's application at most once, and every
/// reply the terminal got for a key is the first reply, byte for byte.
#[tokio::test(start_paused = true)]
async fn retries_get_the_first_reply_and_are_never_processed_twice() {
    let mut config = Config::default();
    config.sender.deadline = Duration::from_millis(400);
    // Two fades of the way back while requests are answered: replies sent then are lost
    // until their deadline, so the outcome is unknown and the retry is what gets them.
    let mut down = lossy(0.2);
    down.blackouts = vec![
        Duration::from_millis(150)..Duration::from_millis(600),
        Duration::from_millis(800)..Duration::from_millis(1300),
    ];
    let e = ends(lossy(0.05), down, 11, config).await;
    let log = host(e.server_messages, Duration::from_millis(30));
    // Per request: each reply the terminal got, and whether it was flagged a replay.
    type Got = HashMap<Bytes, Vec<(Bytes, bool)>>;
    let got: Arc<Mutex<Got>> = Default::default();
    let unknown = Arc::new(Mutex::new(0u32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..150u32 {
        let (c, got, unknown) = (e.client.clone(), got.clone(), unknown.clone());
        tasks.spawn(async move {
            let payload = Bytes::from(format!("auth {i:04}"));
            let options = SendOptions::default().key(format!("till-3/{i}"));
            for _ in 0..40 {
                match c.request_with(payload.clone(), options.clone()).await {
                    Ok(reply) => {
                        got.lock()
                            .unwrap()
                            .entry(payload.clone())
                            .or_default()
                            .push((reply.payload, reply.replayed));
                        return;
                    }
                    Err(e) if e.may_have_been_delivered() => *unknown.lock().unwrap() += 1,
                    Err(e) => panic!("{payload:?}: a definite failure: {e}"),
                }
            }
            panic!("{payload:?}: no reply after 40 tries");
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let h = log.lock().unwrap();
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 150);
    let mut replayed = 0;
    for (payload, replies) in got.iter() {
        assert_eq!(h.processed[payload], 1, "{payload:?} processed once");
        for (reply, was_replayed) in replies {
            assert_eq!(reply, &h.replies[payload], "{payload:?}: the first reply");
            replayed += u32::from(*was_replayed);
        }
    }
    let unknown = *unknown.lock().unwrap();
    let st = e.server.stats().receiver;
    // The fades make unknown outcomes certain: the retries were exercised.
    assert!(unknown > 10, "only {unknown} unknown outcomes");
    assert!(
        st.replies_replayed > 0,
        "no retry was answered from the key"
    );
    eprintln!(
        "unknown outcomes {unknown}, replies replayed {} (flagged {replayed})",
        st.replies_replayed
    );
}

/// Explicit acks: `nack` is a definite "not processed" (and the key is free again), dropping
/// a message unanswered gives it back (unknown to its sender, delivered afresh to a retry),
/// `ack` acks; a retry after the ack is a replay, never a second delivery.
#[tokio::test(start_paused = true)]
async fn explicit_ack_nack_and_give_back() {
    let mut config = Config::default();
    config.explicit_ack = true;
    config.sender.deadline = Duration::from_millis(500);
    let e = ends(lossy(0.0), lossy(0.0), 3, config).await;
    let mut messages = e.server_messages;
    let seen = Arc::new(Mutex::new(Vec::<(Bytes, u64)>::new()));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(m) = messages.recv().await {
            assert!(m.awaits_answer());
            let n = {
                let mut seen = s.lock().unwrap();
                seen.push((m.payload.clone(), m.id));
                seen.iter().filter(|(p, _)| *p == m.payload).count()
            };
            match (&m.payload[..], n) {
                (b"nack me", 1) => m.nack().unwrap(),
                (b"drop me", 1) => drop(m),
                _ => m.ack().unwrap(),
            }
        }
    });
    let key = |k: &str| SendOptions::default().key(k.to_owned());
    let c = &e.client;
    assert!(matches!(
        c.send_with("nack me", key("a")).await,
        Err(SendError::Declined { .. })
    ));
    let retry = c.send_with("nack me", key("a")).await.unwrap();
    assert!(!retry.replayed, "delivered afresh after a nack");
    let dropped = c.send_with("drop me", key("b")).await.unwrap_err();
    assert!(dropped.may_have_been_delivered(), "{dropped}");
    let retry = c.send_with("drop me", key("b")).await.unwrap();
    assert!(!retry.replayed, "delivered afresh after a give-back");
    c.send_with("ack me", key("c")).await.unwrap();
    let again = c.send_with("ack me", key("c")).await.unwrap();
    assert!(again.replayed, "a retry after the ack is a replay");
    let seen = seen.lock().unwrap();
    let count = |p: &[u8]| seen.iter().filter(|(q, _)| &q[..] == p).count();
    assert_eq!(
        (count(b"nack me"), count(b"drop me"), count(b"ack me")),
        (2, 2, 1)
    );
    let st = e.server.stats().receiver;
    assert_eq!((st.declined, st.given_back), (1, 1));
}

/// A request answered with `nack` is declined (not processed); a reply to a message that is
/// not a request is refused by the API; a request's deadline covers its reply.
#[tokio::test(start_paused = true)]
async fn declined_requests_and_missing_replies() {
    let e = ends(lossy(0.0), lossy(0.0), 5, Config::default()).await;
    let mut messages = e.server_messages;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(m) = messages.recv().await {
            match &m.payload[..] {
                b"decline" => m.nack().unwrap(),
                // Never answered while the channel lives: the request's deadline ends it.
                _ => held.push(m),
            }
        }
    });
    let c = &e.client;
    let declined = c.request("decline").await.unwrap_err();
    assert!(matches!(declined, SendError::Declined { .. }), "{declined}");
    assert!(!declined.may_have_been_delivered());
    let options = SendOptions::default().deadline(Duration::from_millis(300));
    let slow = c.request_with("hold", options).await.unwrap_err();
    assert!(slow.may_have_been_delivered(), "{slow}");
    // A message (not a request) cannot be replied to.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut client_messages = e.client_messages;
    tokio::spawn(async move {
        let m = client_messages.recv().await.unwrap();
        let _ = tx.send((m.awaits_answer(), m.reply("no")));
    });
    e.server.send("plain").await.unwrap();
    let (awaits, replied) = rx.await.unwrap();
    assert!(!awaits);
    assert_eq!(replied, Err(surelink::channel::AnswerError::NotAwaited));
}

/// Three replicas share a claims store; the client's requests go to the first, whose
/// replies are lost on the way for 200 ms before it is killed (its application may also have
/// replied to a request whose reply was never recorded).
/// The terminal retries each request under its key until it has a reply: the retries fail
/// over to the second replica, which answers those the first processed with the reply kept
/// in the store. Each request reached the applications (all replicas together) at most once,
/// every reply the terminal got is the first one byte for byte, and at most one request is
/// left processed without a reply kept (the replica died between its reply and the record:
/// the window two-phase claims leave).
#[tokio::test(start_paused = true)]
async fn a_killed_replica_costs_no_second_processing_and_no_other_reply() {
    killed_replica(Arc::new(surelink::store::MemoryStore::default())).await;
}

/// The same over a real PostgreSQL (`PgStore`, in real time: the database's I/O does not
/// follow a paused clock), when `SURELINK_PG_URL` names one (`scripts/test`).
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_with_postgres_costs_no_second_processing_and_no_other_reply() {
    let Some(url) = common::fresh_database("requests").await else {
        return;
    };
    let store = surelink::store::PgStore::connect(&url, Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    killed_replica(Arc::new(store)).await;
}

async fn killed_replica(store: Arc<dyn surelink::store::DedupeStore>) {
    use surelink::sim::SERVER_NAME;

    let link = lossy(0.05);
    let pair = Pair::new(PairConfig {
        seed: 23,
        client_to_server: link.clone(),
        server_to_client: link.clone(),
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(1),
        keep_alive: Some(Duration::from_millis(300)),
        ..PairConfig::default()
    })
    .unwrap();
    let net = pair.net.clone().unwrap();
    let log: Arc<Mutex<Host>> = Default::default();
    let mut addrs = Vec::new();
    for (r, (addr, endpoint)) in common::replicas(&pair, 3, &link).into_iter().enumerate() {
        addrs.push(addr);
        let mut config = Config::default();
        config.store = Some(store.clone());
        let mut listener = surelink::channel::Listener::new(endpoint, config);
        let log = log.clone();
        tokio::spawn(async move {
            while let Some((_c, mut messages)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    while let Some(request) = messages.recv().await {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        let reply = {
                            let mut h = log.lock().unwrap();
                            h.order += 1;
                            *h.processed.entry(request.payload.clone()).or_default() += 1;
                            let reply = Bytes::from(format!("replica {r} approved #{}", h.order));
                            h.replies.insert(request.payload.clone(), reply.clone());
                            reply
                        };
                        let _ = request.reply(reply);
                    }
                });
            }
        });
    }
    let mut config = Config::default();
    config.sender.deadline = Duration::from_millis(800);
    let (client, _messages) =
        Channel::connect_replicas(&pair.client, &addrs, SERVER_NAME, None, config)
            .await
            .unwrap();
    let got: Arc<Mutex<HashMap<Bytes, Bytes>>> = Default::default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let (c, got) = (client.clone(), got.clone());
        tasks.spawn(async move {
            let payload = Bytes::from(format!("auth {i:04}"));
            let options = SendOptions::default().key(format!("till-9/{i}"));
            for _ in 0..30 {
                match c.request_with(payload.clone(), options.clone()).await {
                    Ok(reply) => {
                        got.lock().unwrap().insert(payload, reply.payload);
                        return;
                    }
                    Err(e) if e.may_have_been_delivered() => {}
                    Err(e) => panic!("{payload:?}: a definite failure: {e}"),
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        if i == 60 {
            // From here the first replica's replies are lost on the way (it still processes
            // and records them), until it is killed: their requests' retries are answered
            // by the second replica, from the store.
            let mut dead = link.clone();
            dead.loss = surelink::sim::Loss::Bernoulli(1.0);
            net.set_link(addrs[0], pair.client.local_addr().unwrap(), dead);
        }
        if i == 80 {
            assert!(net.crash(addrs[0]));
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let h = log.lock().unwrap();
    let got = got.lock().unwrap();
    for (payload, n) in &h.processed {
        assert_eq!(*n, 1, "{payload:?} processed {n} times");
    }
    for (payload, reply) in got.iter() {
        assert_eq!(reply, &h.replies[payload], "{payload:?}: the first reply");
    }
    let unanswered: Vec<&Bytes> = h
        .processed
        .keys()
        .filter(|p| !got.contains_key(*p))
        .collect();
    assert!(
        unanswered.len() <= 1,
        "processed without a reply kept: {unanswered:?}"
    );
    assert!(
        got.len() + unanswered.len() == 200,
        "{} of 200 answered",
        got.len()
    );
    let by_second = got.values().filter(|r| r.starts_with(b"replica 1")).count();
    let from_first = got.values().filter(|r| r.starts_with(b"replica 0")).count();
    eprintln!(
        "replies: {from_first} from the first replica, {by_second} from the second; \
         unanswered {}; replies kept in the store answered retries",
        unanswered.len()
    );
    assert!(by_second > 0, "the second replica took over");
}

/// A send's or a request's own deadline may be longer than the channel's (an authorization
/// waits 40-60 s where the channel's default is 5 s): it is honoured, not cut to the
/// channel's.
#[tokio::test(start_paused = true)]
async fn a_deadline_longer_than_the_channels_is_honoured() {
    let mut config = Config::default();
    config.explicit_ack = true;
    config.sender.deadline = Duration::from_millis(300);
    let e = ends(lossy(0.0), lossy(0.0), 13, config).await;
    let mut messages = e.server_messages;
    tokio::spawn(async move {
        while let Some(m) = messages.recv().await {
            tokio::spawn(async move {
                // The application's work takes longer than the channel's deadline.
                tokio::time::sleep(Duration::from_millis(800)).await;
                let _ = match m.is_request() {
                    true => m.reply("approved"),
                    false => m.ack(),
                };
            });
        }
    });
    let long = SendOptions::default().deadline(Duration::from_secs(3));
    let receipt = e.client.send_with("pay", long.clone().key("a")).await;
    assert!(receipt.is_ok(), "{receipt:?}");
    let reply = e.client.request_with("auth", long.key("b")).await;
    assert_eq!(reply.expect("a reply").payload, "approved");
    // The channel's own deadline still applies without one.
    let short = e.client.send_with_key("c", "pay").await.unwrap_err();
    assert!(short.may_have_been_delivered(), "{short}");
}
