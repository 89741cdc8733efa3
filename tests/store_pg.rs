//! The PostgreSQL dedupe store against a real PostgreSQL (feature `postgres`).
//!
//! Needs `SURELINK_PG_URL`; `scripts/with-postgres` starts a throwaway cluster and sets it
//! (`.ci/run` does). Without it these tests say so and pass, unless `SURELINK_REQUIRE_PG` is
//! set, as in CI, where a missing database is a failure. Each test works in its own fresh
//! database, so they run in parallel without seeing each other's claims.

#![cfg(feature = "postgres")]

use std::time::Duration;

use bytes::Bytes;
use surelink::store::{Claim, Claimed, DedupeStore, PgStore, StoreError};
use tokio_postgres::NoTls;

mod common;
use common::fresh_database;

fn claim(channel: u8, message: u64, key: Option<&str>) -> Claim {
    Claim {
        channel: [channel; 16],
        message,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

#[tokio::test]
async fn a_message_or_key_is_claimed_once() {
    let Some(url) = fresh_database("once").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    common::check_claim_semantics(&store).await;
}

#[tokio::test]
async fn replicas_racing_for_the_same_messages_claim_each_exactly_once() {
    let Some(url) = fresh_database("race").await else {
        return;
    };
    // Three replicas, each with its own connection, all trying to claim the same 300
    // messages (100 of them keyed) at once.
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(PgStore::connect(&url, DAY).await.unwrap());
    }
    let mut tasks = Vec::new();
    for (r, store) in replicas.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for i in 0..300u64 {
                // Replica r starts at a different point so they collide from all sides.
                let m = (i + 100 * r as u64) % 300;
                let key = m.is_multiple_of(3).then(|| format!("order-{m}"));
                if store.claim(&claim(7, m, key.as_deref())).await.unwrap() == Claimed::Now {
                    won.push(m);
                }
            }
            won
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    assert_eq!(
        all,
        (0..300).collect::<Vec<_>>(),
        "each message claimed once"
    );
}

#[tokio::test]
async fn a_claim_inside_the_applications_transaction_commits_or_rolls_back_with_it() {
    let Some(url) = fresh_database("inbox").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    let (mut app, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    app.batch_execute("CREATE TABLE ledger (payment bigint PRIMARY KEY, cents bigint)")
        .await
        .unwrap();
    let payment = claim(5, 42, Some("order-42"));

    // The application fails after claiming: both roll back.
    let tx = app.transaction().await.unwrap();
    assert_eq!(
        PgStore::claim_in(&tx, &payment).await.unwrap(),
        Claimed::Now
    );
    tx.execute("INSERT INTO ledger VALUES (42, 1000)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(!store.lookup(&payment).await.unwrap(), "claim rolled back");

    // Again, committed: the claim and the ledger row together.
    let tx = app.transaction().await.unwrap();
    assert_eq!(
        PgStore::claim_in(&tx, &payment).await.unwrap(),
        Claimed::Now
    );
    tx.execute("INSERT INTO ledger VALUES (42, 1000)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(store.lookup(&payment).await.unwrap());
    // A retry anywhere (another replica's store, by key under a new id) is refused.
    assert_eq!(
        store.claim(&claim(6, 1, Some("order-42"))).await.unwrap(),
        Claimed::Before
    );
    let rows: i64 = app
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn claims_expire_after_the_ttl() {
    let Some(url) = fresh_database("ttl").await else {
        return;
    };
    let store = PgStore::connect(&url, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(
        store.claim(&claim(1, 0, Some("k"))).await.unwrap(),
        Claimed::Now
    );
    assert_eq!(store.expire().await.unwrap(), 0, "within the TTL");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(store.expire().await.unwrap(), 1);
    assert_eq!(
        store.claim(&claim(1, 0, Some("k"))).await.unwrap(),
        Claimed::Now,
        "expired: claimable again"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error() {
    // A port nothing listens on (the tests' own server is elsewhere).
    let err = PgStore::connect("postgres://postgres@127.0.0.1:9/postgres", DAY)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Postgres(_)), "{err:?}");
    assert!(
        err.to_string().starts_with("PostgreSQL dedupe store"),
        "{err}"
    );
}

/// Issue 7's test: three replicas on the simulator sharing one PostgreSQL store, a client
/// sending 5,000 payments at 200/s under 5% loss each way. The preferred replica is blacked
/// out (both directions) from 8 s to 14 s and then restored. Every payment is acked, none is
/// delivered twice (counted by the applications and by the store), and the latencies around
/// the failover are reported. Real time (the store is real I/O): about 27 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_postgres_store_through_a_blackout() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use surelink::channel::{Channel, Config, Listener};
    use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig, SERVER_NAME};

    let Some(url) = fresh_database("three").await else {
        return;
    };
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.05),
        ..LinkConfig::default()
    };
    let (blackout_from, blackout_to) = (Duration::from_secs(8), Duration::from_secs(14));
    let dark = LinkConfig {
        blackouts: vec![blackout_from..blackout_to],
        ..link.clone()
    };
    let pair = Pair::new(PairConfig {
        seed: 41,
        client_to_server: dark.clone(),
        server_to_client: dark,
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(1),
        keep_alive: Some(Duration::from_millis(300)),
        ..PairConfig::default()
    })
    .unwrap();
    let start = tokio::time::Instant::now();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let mut addrs = Vec::new();
    let mut collectors = Vec::new();
    for (addr, endpoint) in common::replicas(&pair, 3, &link) {
        addrs.push(addr);
        let store: Arc<dyn DedupeStore> = Arc::new(PgStore::connect(&url, DAY).await.unwrap());
        let config = Config {
            store: Some(store),
            ..Config::default()
        };
        let mut listener = Listener::new(endpoint, config);
        let mut done = done_rx.clone();
        collectors.push(tokio::spawn(async move {
            // A replica may see the channel more than once (each failover to it).
            let mut tasks = Vec::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        // A channel may sit idle for long (the warm standby): read it
                        // until the run is over, then drain it.
                        Some((_channel, mut messages)) => {
                            let mut done = done.clone();
                            tasks.push(tokio::spawn(async move {
                                let mut got = BTreeMap::new();
                                let mut record = |p: &[u8]| {
                                    *got.entry(common::number(p)).or_insert(0u32) += 1;
                                };
                                loop {
                                    tokio::select! {
                                        m = messages.recv() => match m {
                                            Some(m) => record(&m.payload),
                                            None => break,
                                        },
                                        _ = done.changed() => {
                                            let quiet = Duration::from_millis(500);
                                            while let Ok(Some(m)) =
                                                tokio::time::timeout(quiet, messages.recv()).await
                                            {
                                                record(&m.payload);
                                            }
                                            break;
                                        }
                                    }
                                }
                                got
                            }));
                        }
                        None => break,
                    },
                    _ = done.changed() => break,
                }
            }
            let mut all = BTreeMap::new();
            for t in tasks {
                for (i, n) in t.await.unwrap() {
                    *all.entry(i).or_insert(0u32) += n;
                }
            }
            all
        }));
    }
    let (client, _m) =
        Channel::connect_replicas(&pair.client, &addrs, SERVER_NAME, None, Config::default())
            .await
            .unwrap();
    let n = 5000u32;
    let mut tasks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_millis(5) * i).await;
        let c = client.clone();
        let sent = start.elapsed();
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let r = c.send(common::payment(i)).await;
            (i, sent, r.map(|_| t0.elapsed()))
        }));
    }
    let mut latencies = Vec::new();
    let mut window = Vec::new();
    for t in tasks {
        let (i, sent, r) = t.await.unwrap();
        let l = r.unwrap_or_else(|e| panic!("payment {i}: {e}"));
        latencies.push(l);
        if sent + Duration::from_secs(1) >= blackout_from
            && sent <= blackout_from + Duration::from_secs(3)
        {
            window.push(l);
        }
    }
    let s = client.stats();
    client.close().await;
    done_tx.send(true).unwrap();
    let mut total = BTreeMap::new();
    let mut per_replica = Vec::new();
    for c in collectors {
        let by = c.await.unwrap();
        per_replica.push(by.len());
        for (i, k) in by {
            *total.entry(i).or_insert(0u32) += k;
        }
    }
    let q = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    let claims: i64 = store
        .client()
        .query_one("SELECT count(*) FROM surelink_claims", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "5000 payments: delivered per replica {per_replica:?}, claims {claims}, failovers {} \
         ({} to the warm standby), reconnects {}; p50 {:?} p99 {:?} max {:?}; failover window ({} payments sent \
         7–11 s): p50 {:?} p99 {:?} max {:?}",
        s.failovers,
        s.standby_failovers,
        s.reconnects,
        q(&mut latencies, 0.5),
        q(&mut latencies, 0.99),
        q(&mut latencies, 1.0),
        window.len(),
        q(&mut window, 0.5),
        q(&mut window, 0.99),
        q(&mut window, 1.0),
    );
    common::assert_once(&total);
    assert_eq!(total.len(), n as usize, "every payment delivered");
    assert_eq!(claims, i64::from(n), "one claim per payment");
    assert!(s.failovers >= 1, "the client failed over");
}
