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
    assert_eq!(store.claim(&claim(1, 0, None)).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.claim(&claim(1, 0, None)).await.unwrap(),
        Claimed::Before
    );
    assert_eq!(store.claim(&claim(2, 0, None)).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.claim(&claim(1, 1, Some("order-1"))).await.unwrap(),
        Claimed::Now
    );
    // The same key under another id, on another channel: claimed before.
    assert_eq!(
        store.claim(&claim(3, 9, Some("order-1"))).await.unwrap(),
        Claimed::Before
    );
    assert!(store.lookup(&claim(3, 7, Some("order-1"))).await.unwrap());
    assert!(!store.lookup(&claim(3, 7, None)).await.unwrap());
    assert!(
        !store.lookup(&claim(3, 9, None)).await.unwrap(),
        "the refused claim recorded nothing"
    );
    // Ids use the whole 62-bit varint range.
    let big = (1u64 << 62) - 1;
    assert_eq!(
        store.claim(&claim(1, big, None)).await.unwrap(),
        Claimed::Now
    );
    assert!(store.lookup(&claim(1, big, None)).await.unwrap());
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
