//! Helpers shared by the integration tests: numbered payments, a delivery counter and a
//! paced sender.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use surelink::channel::{Channel, Messages, Receipt, SendError};

/// Payment `i`: 512 bytes that name their number.
pub fn payment(i: u32) -> Bytes {
    let mut p = format!("payment {i:08} ").into_bytes();
    p.resize(512, b'.');
    p.into()
}

/// The number of a payment built by [`payment`], checking its bytes.
pub fn number(p: &[u8]) -> u32 {
    let i: u32 = std::str::from_utf8(&p[8..16]).unwrap().parse().unwrap();
    assert_eq!(p, &payment(i)[..], "payment {i} arrived intact");
    i
}

/// Counts deliveries per payment until no message came for `quiet`.
pub fn collect(
    mut messages: Messages,
    quiet: Duration,
) -> tokio::task::JoinHandle<BTreeMap<u32, u32>> {
    tokio::spawn(async move {
        let mut delivered = BTreeMap::new();
        while let Ok(Some(m)) = tokio::time::timeout(quiet, messages.recv()).await {
            *delivered.entry(number(&m.payload)).or_default() += 1;
        }
        delivered
    })
}

/// Sends payments `range` every `every`, each in its own task; the outcomes in order.
pub async fn send_paced(
    channel: &Channel,
    range: std::ops::Range<u32>,
    every: Duration,
) -> Vec<(u32, Result<Receipt, SendError>)> {
    let mut tasks = Vec::new();
    for i in range {
        let c = channel.clone();
        tasks.push(tokio::spawn(async move { (i, c.send(payment(i)).await) }));
        tokio::time::sleep(every).await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Asserts no payment was delivered twice.
pub fn assert_once(delivered: &BTreeMap<u32, u32>) {
    for (i, count) in delivered {
        assert_eq!(*count, 1, "payment {i} delivered {count} times");
    }
}

/// Replica endpoints at `pair.server_addr` and `n - 1` more addresses, each reachable from
/// the client over `link` both ways.
pub fn replicas(
    pair: &surelink::sim::Pair,
    n: usize,
    link: &surelink::sim::LinkConfig,
) -> Vec<(std::net::SocketAddr, quinn::Endpoint)> {
    let net = pair.net.clone().unwrap();
    let client = pair.client.local_addr().unwrap();
    let mut out = vec![(pair.server_addr, pair.server.clone())];
    for i in 1..n {
        let addr: std::net::SocketAddr = ([10, 0, 9, i as u8], 4433).into();
        net.set_link(client, addr, link.clone());
        net.set_link(addr, client, link.clone());
        let endpoint =
            surelink::sim::Pair::server_endpoint(&net, addr, pair.server_config.clone()).unwrap();
        out.push((addr, endpoint));
    }
    out
}

/// A fresh database on the PostgreSQL server at `SURELINK_PG_URL`, and its URL; `None` (the
/// test then says it was skipped) when the variable is unset, unless `SURELINK_REQUIRE_PG`
/// is set, as in CI, where a missing database is a failure.
#[cfg(feature = "postgres")]
pub async fn fresh_database(name: &str) -> Option<String> {
    let Ok(url) = std::env::var("SURELINK_PG_URL") else {
        assert!(
            std::env::var_os("SURELINK_REQUIRE_PG").is_none(),
            "SURELINK_REQUIRE_PG is set but SURELINK_PG_URL is not"
        );
        eprintln!("skipped: no SURELINK_PG_URL (run under scripts/with-postgres)");
        return None;
    };
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let db = format!("surelink_{name}_{}", rand::random::<u32>());
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let base = url.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{db}"))
}

/// The claim semantics every `DedupeStore` must have, checked on a fresh `store`: a message
/// (channel id + message id) or an idempotency key (across channels) is claimed once; a
/// refused claim records nothing; message ids use the whole 62-bit range; a claimant
/// retrying its own claim (issue 13 case 2: the answer was lost) gets `Now`, anyone else
/// `Before`; `release` undoes only the claimant's own claim.
pub async fn check_claim_semantics(store: &dyn surelink::store::DedupeStore) {
    use surelink::store::{Claim, Claimed};
    let claim = |channel: u8, message: u64, key: Option<&str>| Claim {
        channel: [channel; 16],
        message,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        ..Claim::default()
    };
    let by = |claimant: u64, c: Claim| Claim { claimant, ..c };
    assert_eq!(store.claim(&claim(1, 0, None)).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.claim(&claim(1, 0, None)).await.unwrap(),
        Claimed::Before
    );
    // Same id on another channel: another message.
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
    let big = (1u64 << 62) - 1;
    assert_eq!(
        store.claim(&claim(1, big, None)).await.unwrap(),
        Claimed::Now
    );
    assert!(store.lookup(&claim(1, big, None)).await.unwrap());

    // Claimants. Anonymous (0) never matches: the first claim above is refused to itself.
    assert_eq!(
        store.claim(&claim(1, 0, None)).await.unwrap(),
        Claimed::Before
    );
    let mine = by(u64::MAX, claim(4, 1, Some("order-4")));
    assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.claim(&mine).await.unwrap(),
        Claimed::Now,
        "the same claimant retrying: its own claim"
    );
    for (other, what) in [
        (by(7, claim(4, 1, Some("order-4"))), "another claimant"),
        (claim(4, 1, Some("order-4")), "anonymous"),
        (
            by(u64::MAX, claim(4, 2, Some("order-4"))),
            "the key under another id",
        ),
        (
            by(u64::MAX, claim(5, 1, Some("order-4"))),
            "the key on another channel",
        ),
        (
            by(u64::MAX, claim(4, 1, Some("order-5"))),
            "the id under another key",
        ),
        (by(u64::MAX, claim(4, 1, None)), "the id without its key"),
    ] {
        assert_eq!(
            store.claim(&other).await.unwrap(),
            Claimed::Before,
            "{what}"
        );
        assert!(!store.release(&other).await.unwrap(), "released by {what}");
    }
    // A claimant's claim of a message someone else claimed first is refused to it.
    assert_eq!(
        store
            .claim(&by(9, claim(1, 1, Some("order-1"))))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert!(
        !store.release(&claim(1, 0, None)).await.unwrap(),
        "anonymous"
    );
    // Released by its claimant: gone, id and key; claimable again by anyone.
    assert!(store.release(&mine).await.unwrap());
    assert!(!store.release(&mine).await.unwrap(), "released once");
    assert!(!store.lookup(&claim(9, 9, Some("order-4"))).await.unwrap());
    assert!(!store.lookup(&claim(4, 1, None)).await.unwrap());
    assert_eq!(
        store
            .claim(&by(7, claim(6, 3, Some("order-4"))))
            .await
            .unwrap(),
        Claimed::Now
    );
    assert_eq!(store.claim(&claim(4, 1, None)).await.unwrap(), Claimed::Now);
}

/// The two-phase claims every `DedupeStore` must have (reserve, then settle; the module docs
/// of `surelink::store`), checked on a fresh `store` with leases of `lease`. It sleeps past
/// leases with tokio's clock: under paused time (`MemoryStore`) that advances at once; a
/// store on a real clock (PostgreSQL) needs a lease long enough for a few round trips.
pub async fn check_reservation_semantics(
    store: &dyn surelink::store::DedupeStore,
    lease: Duration,
) {
    use surelink::store::{Claim, Claimed, Reserved, Settled};
    let pay = |channel: u8, key: Option<&str>, claimant: u64, payload: &str| Claim {
        channel: [channel; 16],
        message: 1,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        digest: Some(surelink::proto::payload_digest(payload.as_bytes())),
        claimant,
        ..Claim::default()
    };
    let at = |epoch: u64, c: &Claim| Claim { epoch, ..c.clone() };
    let held = |epoch, took_over| Reserved::Held { epoch, took_over };
    let now = Settled::Now { late: false };
    // Past a lease, by the store's clock too.
    let lapse = || tokio::time::sleep(lease + lease / 2);
    let busy = |r: Reserved, what: &str| match r {
        Reserved::Busy { retry_in } => assert!(
            retry_in <= lease && retry_in > lease / 4,
            "{what}: retry in {retry_in:?} of a {lease:?} lease"
        ),
        r => panic!("{what}: {r:?}, not Busy"),
    };

    // A fresh reservation holds the message, and its key, against every other claimant.
    let a = pay(1, Some("order-1"), 7, "10.00");
    assert_eq!(store.reserve(&a, lease).await.unwrap(), held(1, false));
    busy(
        store
            .reserve(&pay(1, Some("order-1"), 8, "10.00"), lease)
            .await
            .unwrap(),
        "another claimant",
    );
    busy(
        store
            .reserve(&pay(2, Some("order-1"), 8, "10.00"), lease)
            .await
            .unwrap(),
        "its key under another id",
    );
    busy(
        store
            .reserve(&pay(2, Some("order-1"), 7, "10.00"), lease)
            .await
            .unwrap(),
        "its key under another id, by its own claimant",
    );
    assert_eq!(
        store
            .reserve(&pay(2, Some("order-1"), 8, "99.00"), lease)
            .await
            .unwrap(),
        Reserved::Conflict,
        "its key with another payload"
    );
    assert_eq!(
        store
            .claim(&pay(1, Some("order-1"), 8, "10.00"))
            .await
            .unwrap(),
        Claimed::Busy,
        "a one-phase claim against a live reservation"
    );
    assert_eq!(
        store
            .claim(&pay(2, Some("order-1"), 0, "10.00"))
            .await
            .unwrap(),
        Claimed::Busy,
        "an anonymous one-phase claim of its key"
    );
    assert!(
        store.lookup(&a).await.unwrap(),
        "a reservation is looked up"
    );
    // Its owner again: renewed, same epoch.
    assert_eq!(store.reserve(&a, lease).await.unwrap(), held(1, false));
    // Settled only by its owner at its epoch.
    for (wrong, what) in [
        (at(2, &a), "another epoch"),
        (at(0, &a), "no epoch"),
        (
            at(1, &pay(1, Some("order-1"), 8, "10.00")),
            "another claimant",
        ),
        (at(1, &pay(1, None, 7, "10.00")), "without its key"),
    ] {
        assert_eq!(
            store.settle(&wrong).await.unwrap(),
            Settled::Fenced,
            "{what}"
        );
    }
    assert_eq!(store.settle(&at(1, &a)).await.unwrap(), now);
    assert_eq!(store.settle(&at(1, &a)).await.unwrap(), now, "a retry");
    // Settled: delivered, for everyone.
    for (other, what) in [
        (pay(1, Some("order-1"), 8, "10.00"), "another claimant"),
        (
            pay(2, Some("order-1"), 8, "10.00"),
            "its key under another id",
        ),
        (a.clone(), "its owner's reservation"),
    ] {
        assert_eq!(
            store.reserve(&other, lease).await.unwrap(),
            Reserved::Before,
            "{what}"
        );
    }
    assert_eq!(
        store
            .claim(&pay(2, Some("order-1"), 8, "10.00"))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert_eq!(
        store.claim(&a).await.unwrap(),
        Claimed::Now,
        "its owner's one-phase retry"
    );
    for payload_changed in [
        store
            .reserve(&pay(3, Some("order-1"), 8, "99.00"), lease)
            .await
            .unwrap(),
        match store
            .claim(&pay(3, Some("order-1"), 8, "99.00"))
            .await
            .unwrap()
        {
            Claimed::Conflict => Reserved::Conflict,
            c => panic!("{c:?}"),
        },
    ] {
        assert_eq!(payload_changed, Reserved::Conflict);
    }
    assert_eq!(
        store.reserve(&pay(3, None, 0, "x"), lease).await.unwrap(),
        Reserved::Busy { retry_in: lease },
        "an anonymous reservation is never held"
    );
    assert!(!store.lookup(&pay(3, None, 0, "x")).await.unwrap());

    // A lease ends: the next claimant takes the message over, the old owner is fenced.
    let x = pay(10, Some("order-10"), 7, "x");
    let y = pay(10, Some("order-10"), 8, "x");
    assert_eq!(store.reserve(&x, lease).await.unwrap(), held(1, false));
    lapse().await;
    assert_eq!(store.reserve(&y, lease).await.unwrap(), held(2, true));
    busy(store.reserve(&x, lease).await.unwrap(), "the old owner");
    assert_eq!(store.settle(&at(1, &x)).await.unwrap(), Settled::Fenced);
    assert_eq!(store.settle(&at(2, &y)).await.unwrap(), now);
    assert_eq!(store.reserve(&x, lease).await.unwrap(), Reserved::Before);
    assert_eq!(store.settle(&at(1, &x)).await.unwrap(), Settled::Fenced);

    // An owner whose lease ended, and whom nobody took over, still settles (late).
    let slow = pay(11, None, 7, "s");
    assert_eq!(store.reserve(&slow, lease).await.unwrap(), held(1, false));
    lapse().await;
    assert_eq!(
        store.settle(&at(1, &slow)).await.unwrap(),
        Settled::Now { late: true }
    );
    assert_eq!(store.settle(&at(1, &slow)).await.unwrap(), now, "a retry");
    // One whose lease ended renews it: its own, same epoch.
    let renew = pay(12, None, 7, "r");
    assert_eq!(store.reserve(&renew, lease).await.unwrap(), held(1, false));
    lapse().await;
    assert_eq!(store.reserve(&renew, lease).await.unwrap(), held(1, false));
    busy(
        store.reserve(&pay(12, None, 8, "r"), lease).await.unwrap(),
        "renewed",
    );

    // Taken over through its key, from another id: the old id's row goes.
    let k1 = pay(13, Some("order-13"), 7, "k");
    let k2 = pay(14, Some("order-13"), 8, "k");
    assert_eq!(store.reserve(&k1, lease).await.unwrap(), held(1, false));
    lapse().await;
    assert_eq!(
        store
            .reserve(&pay(15, Some("order-13"), 9, "other"), lease)
            .await
            .unwrap(),
        Reserved::Conflict,
        "an ended lease still names its payload"
    );
    assert_eq!(store.reserve(&k2, lease).await.unwrap(), held(2, true));
    assert!(
        !store.lookup(&pay(13, None, 0, "")).await.unwrap(),
        "the old id's row is gone"
    );
    assert_eq!(store.settle(&at(1, &k1)).await.unwrap(), Settled::Fenced);
    busy(
        store.reserve(&k1, lease).await.unwrap(),
        "the old id, by its key",
    );
    assert_eq!(store.settle(&at(2, &k2)).await.unwrap(), now);
    assert_eq!(store.reserve(&k1, lease).await.unwrap(), Reserved::Before);

    // One-phase claims meet reservations: a live one is busy, an ended one taken over and
    // settled at once; its owner's own is settled.
    let o = pay(16, Some("order-16"), 7, "o");
    let other = pay(16, Some("order-16"), 9, "o");
    assert_eq!(store.reserve(&o, lease).await.unwrap(), held(1, false));
    assert_eq!(store.claim(&other).await.unwrap(), Claimed::Busy);
    lapse().await;
    assert_eq!(store.claim(&other).await.unwrap(), Claimed::Now);
    assert_eq!(store.settle(&at(1, &o)).await.unwrap(), Settled::Fenced);
    assert_eq!(
        store.claim(&other).await.unwrap(),
        Claimed::Now,
        "its retry"
    );
    assert_eq!(store.reserve(&o, lease).await.unwrap(), Reserved::Before);
    let k3 = pay(17, Some("order-17"), 7, "k");
    assert_eq!(store.reserve(&k3, lease).await.unwrap(), held(1, false));
    lapse().await;
    assert_eq!(
        store
            .claim(&pay(18, Some("order-17"), 9, "k"))
            .await
            .unwrap(),
        Claimed::Now,
        "an ended reservation of its key"
    );
    assert_eq!(store.settle(&at(1, &k3)).await.unwrap(), Settled::Fenced);
    let own = pay(19, None, 7, "own");
    assert_eq!(store.reserve(&own, lease).await.unwrap(), held(1, false));
    assert_eq!(store.claim(&own).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.settle(&at(1, &own)).await.unwrap(),
        now,
        "settled by its owner's one-phase claim"
    );
    assert_eq!(
        store
            .reserve(&pay(19, None, 8, "own"), lease)
            .await
            .unwrap(),
        Reserved::Before
    );

    // Released by its claimant: free again, id and key.
    let r = pay(20, Some("order-20"), 7, "r");
    assert_eq!(store.reserve(&r, lease).await.unwrap(), held(1, false));
    assert!(!store
        .release(&pay(20, Some("order-20"), 8, "r"))
        .await
        .unwrap());
    assert!(store.release(&r).await.unwrap());
    assert!(!store.lookup(&r).await.unwrap());
    assert_eq!(
        store
            .reserve(&pay(21, Some("order-20"), 8, "r"), lease)
            .await
            .unwrap(),
        held(1, false),
        "its key"
    );
    assert_eq!(
        store.reserve(&pay(20, None, 8, "r"), lease).await.unwrap(),
        held(1, false),
        "its id"
    );
    assert_eq!(store.settle(&at(1, &r)).await.unwrap(), Settled::Fenced);
}

/// Issue 21 cases 6, 7 and 8 on a fresh `store`: idempotency keys are per client, a key
/// names one payload (another digest is a conflict that records nothing; an unknown digest
/// never conflicts), and a channel id is bound to one owner.
pub async fn check_clients_digests_and_owners(store: &dyn surelink::store::DedupeStore) {
    use surelink::store::{Claim, Claimed};
    let digest = |p: &str| Some(surelink::proto::payload_digest(p.as_bytes()));
    let claim =
        |channel: u8, message: u64, client: [u8; 32], key: &str, digest: Option<[u8; 32]>| Claim {
            channel: [channel; 16],
            message,
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            client,
            digest,
            ..Claim::default()
        };
    let (a, b) = ([0xaa; 32], [0xbb; 32]);
    let anonymous = surelink::proto::ANONYMOUS;
    // Case 6: two clients' "order-42" are two keys, whatever the payloads.
    for (channel, client) in [(1, a), (2, b), (3, anonymous)] {
        assert_eq!(
            store
                .claim(&claim(channel, 0, client, "order-42", digest("10.00")))
                .await
                .unwrap(),
            Claimed::Now,
            "client {:x}",
            client[0]
        );
    }
    // The same client's key on another channel, same payload: claimed before.
    assert_eq!(
        store
            .claim(&claim(4, 0, a, "order-42", digest("10.00")))
            .await
            .unwrap(),
        Claimed::Before
    );
    // Case 8: another payload is a conflict, and records nothing.
    assert_eq!(
        store
            .claim(&claim(4, 1, a, "order-42", digest("999.00")))
            .await
            .unwrap(),
        Claimed::Conflict
    );
    assert!(!store
        .lookup(&Claim {
            key: None,
            ..claim(4, 1, a, "", None)
        })
        .await
        .unwrap());
    // A claimant retrying is still answered by its own claim first.
    let mine = Claim {
        claimant: 5,
        ..claim(5, 0, b, "order-5", digest("1.00"))
    };
    assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
    assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
    assert_eq!(
        store
            .claim(&Claim {
                client: a,
                ..mine.clone()
            })
            .await
            .unwrap(),
        Claimed::Before,
        "the same claimant under another client is someone else"
    );
    assert_eq!(
        store
            .claim(&Claim {
                message: 1,
                digest: digest("2.00"),
                ..mine.clone()
            })
            .await
            .unwrap(),
        Claimed::Conflict,
        "the claimant's key with another payload under another id"
    );
    // A claimed (channel, message) answers by its pair, whatever the digest.
    assert_eq!(
        store
            .claim(&claim(1, 0, a, "order-42", digest("999.00")))
            .await
            .unwrap(),
        Claimed::Before
    );
    // An unknown digest, on either side, never conflicts.
    assert_eq!(
        store
            .claim(&claim(6, 0, a, "order-42", None))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert_eq!(
        store.claim(&claim(6, 1, a, "old", None)).await.unwrap(),
        Claimed::Now
    );
    assert_eq!(
        store
            .claim(&claim(6, 2, a, "old", digest("x")))
            .await
            .unwrap(),
        Claimed::Before
    );
    // Lookups and releases are per client too.
    assert!(store
        .lookup(&claim(9, 9, b, "order-42", None))
        .await
        .unwrap());
    assert!(!store
        .lookup(&claim(9, 9, [0xcc; 32], "order-42", None))
        .await
        .unwrap());
    assert!(!store
        .release(&Claim {
            client: a,
            ..mine.clone()
        })
        .await
        .unwrap());
    assert!(store.release(&mine).await.unwrap());

    // Case 7: a channel id is bound to one owner; its owner may bind it again.
    assert!(store.bind_channel([1; 16], a).await.unwrap());
    assert!(store.bind_channel([1; 16], a).await.unwrap());
    assert!(!store.bind_channel([1; 16], b).await.unwrap());
    assert!(!store.bind_channel([1; 16], anonymous).await.unwrap());
    assert!(store.bind_channel([2; 16], anonymous).await.unwrap());
    assert!(!store.bind_channel([2; 16], a).await.unwrap());
    assert!(store.bind_channel([2; 16], anonymous).await.unwrap());
}

/// The path of example `name` built beside this test binary (the whole `cargo test` builds
/// the examples); panics with how to build it when it is missing.
pub fn example(name: &str) -> std::path::PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    p.pop();
    p.push("examples");
    p.push(name);
    assert!(
        p.exists(),
        "{} not built: run the whole `cargo test` (it builds the examples) or `cargo build --examples`",
        p.display()
    );
    p
}

/// The rustls crypto provider the build has (as surelink chooses it: aws-lc-rs, the default,
/// else ring), for tests that build a TLS config of their own.
#[allow(dead_code)]
pub fn crypto_provider() -> quinn::rustls::crypto::CryptoProvider {
    #[cfg(feature = "aws-lc-rs")]
    let provider = quinn::rustls::crypto::aws_lc_rs::default_provider();
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    #[allow(deprecated)]
    let provider = quinn::rustls::crypto::ring::default_provider();
    provider
}

/// The replies every `DedupeStore` that keeps them must have (`DedupeStore::record_reply`
/// and `DedupeStore::reply`), checked on a fresh `store`: a reply recorded by the claimant
/// that settled a claim is read back byte for byte by any replica (another claimant) for the
/// same client's key with the same payload, or for a keyless claim by its (channel,
/// message); a claim that is not the recorder's (another claimant, client or key, a stale
/// epoch after a takeover), or not settled, records nothing; a second, different reply is
/// refused and the same one is idempotent; a digest that differs reads nothing; a reply is
/// at most `MAX_REPLY` bytes and goes with its claim. Leases of 200 ms lapse by tokio's
/// clock (at once under paused time; in real time for a store on a real clock).
pub async fn check_reply_semantics(store: &dyn surelink::store::DedupeStore) {
    use surelink::store::{Claim, Claimed, Reserved, Settled, StoreError, MAX_REPLY};
    let pay = |channel: u8, message: u64, key: Option<&str>, claimant: u64, payload: &str| Claim {
        channel: [channel; 16],
        message,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        digest: Some(surelink::proto::payload_digest(payload.as_bytes())),
        claimant,
        ..Claim::default()
    };
    let at = |epoch: u64, c: &Claim| Claim { epoch, ..c.clone() };
    let lease = Duration::from_millis(200);
    let approved: &[u8] = b"approved: auth code 4711, 10.00 EUR";
    let declined: &[u8] = b"declined: insufficient funds";

    // Keyed, one-phase: recorded by its claimant (epoch 0: any epoch of its own claim), read
    // by the retry of another replica (another claimant) on another channel and id.
    let a = pay(1, 1, Some("auth-1"), 7, "10.00");
    assert_eq!(store.claim(&a).await.unwrap(), Claimed::Now);
    assert_eq!(store.reply(&a).await.unwrap(), None, "nothing recorded yet");
    assert!(store.record_reply(&a, approved).await.unwrap());
    let retry = pay(2, 9, Some("auth-1"), 8, "10.00");
    assert_eq!(store.claim(&retry).await.unwrap(), Claimed::Before);
    for (reader, what) in [
        (retry.clone(), "the retry on another replica"),
        (a.clone(), "its own claim"),
        (pay(3, 3, Some("auth-1"), 0, "10.00"), "an anonymous reader"),
        (
            Claim {
                digest: None,
                ..retry.clone()
            },
            "a reader that does not know the digest",
        ),
    ] {
        assert_eq!(
            store.reply(&reader).await.unwrap().as_deref(),
            Some(approved),
            "{what}"
        );
    }
    for (reader, what) in [
        (pay(2, 9, Some("auth-1"), 8, "99.00"), "another payload"),
        (
            Claim {
                client: [5; 32],
                ..retry.clone()
            },
            "another client's key",
        ),
        (pay(2, 9, Some("auth-2"), 8, "10.00"), "another key"),
        (pay(1, 1, None, 8, "10.00"), "its pair without its key"),
    ] {
        assert_eq!(store.reply(&reader).await.unwrap(), None, "{what}");
    }
    // The same reply again: idempotent; another: refused, the first kept.
    assert!(store.record_reply(&a, approved).await.unwrap(), "a retry");
    assert!(!store.record_reply(&a, declined).await.unwrap());
    assert!(!store.record_reply(&a, b"").await.unwrap());
    assert_eq!(
        store.reply(&retry).await.unwrap().as_deref(),
        Some(approved)
    );
    // Fenced: not the claim of its recorder.
    for (wrong, what) in [
        (retry.clone(), "another claimant (the retry's)"),
        (pay(1, 1, Some("auth-1"), 0, "10.00"), "anonymous"),
        (pay(1, 1, Some("auth-9"), 7, "10.00"), "under another key"),
        (pay(1, 1, None, 7, "10.00"), "without its key"),
        (pay(1, 2, Some("auth-1"), 7, "10.00"), "another message id"),
        (
            Claim {
                client: [5; 32],
                ..a.clone()
            },
            "another client",
        ),
        (at(5, &a), "another epoch"),
    ] {
        assert!(
            !store.record_reply(&wrong, declined).await.unwrap(),
            "{what}"
        );
    }
    assert_eq!(
        store.reply(&retry).await.unwrap().as_deref(),
        Some(approved)
    );

    // Keyless: by (channel, message), for the same client.
    let k = pay(4, 1, None, 7, "keyless");
    assert_eq!(store.claim(&k).await.unwrap(), Claimed::Now);
    assert!(store.record_reply(&k, declined).await.unwrap());
    let copy = pay(4, 1, None, 8, "keyless");
    assert_eq!(store.claim(&copy).await.unwrap(), Claimed::Before);
    assert_eq!(
        store.reply(&copy).await.unwrap().as_deref(),
        Some(declined),
        "a copy of the message on another replica"
    );
    for (reader, what) in [
        (pay(4, 2, None, 8, "keyless"), "another message id"),
        (pay(5, 1, None, 8, "keyless"), "another channel"),
        (pay(4, 1, None, 8, "changed"), "another payload"),
        (
            Claim {
                client: [5; 32],
                ..copy.clone()
            },
            "another client",
        ),
    ] {
        assert_eq!(store.reply(&reader).await.unwrap(), None, "{what}");
    }
    assert!(!store.record_reply(&copy, approved).await.unwrap());
    // A zero-length reply is a reply.
    let empty = pay(4, 3, None, 7, "empty");
    assert_eq!(store.claim(&empty).await.unwrap(), Claimed::Now);
    assert!(store.record_reply(&empty, b"").await.unwrap());
    assert_eq!(
        store.reply(&empty).await.unwrap().as_deref(),
        Some(&b""[..])
    );
    assert!(!store.record_reply(&empty, b"x").await.unwrap());

    // Two phases: not while reserved; by its owner at its epoch once settled.
    let r = pay(6, 1, Some("auth-6"), 7, "6.00");
    let Reserved::Held { epoch: 1, .. } = store.reserve(&r, lease).await.unwrap() else {
        panic!("a fresh reservation")
    };
    assert!(
        !store.record_reply(&at(1, &r), approved).await.unwrap(),
        "not settled"
    );
    assert!(
        !store.record_reply(&r, approved).await.unwrap(),
        "not settled (epoch 0)"
    );
    assert_eq!(store.reply(&r).await.unwrap(), None, "reserved: no reply");
    assert_eq!(
        store.settle(&at(1, &r)).await.unwrap(),
        Settled::Now { late: false }
    );
    assert!(!store.record_reply(&at(2, &r), approved).await.unwrap());
    assert!(store.record_reply(&at(1, &r), approved).await.unwrap());
    assert!(store.record_reply(&r, approved).await.unwrap(), "epoch 0");
    assert_eq!(
        store
            .reply(&pay(7, 4, Some("auth-6"), 9, "6.00"))
            .await
            .unwrap()
            .as_deref(),
        Some(approved)
    );

    // A takeover: the old owner is fenced, whatever epoch it names; the new one records at
    // its own epoch only.
    let x = pay(8, 1, Some("auth-8"), 7, "8.00");
    let y = pay(8, 1, Some("auth-8"), 8, "8.00");
    assert!(matches!(
        store.reserve(&x, lease).await.unwrap(),
        Reserved::Held { epoch: 1, .. }
    ));
    tokio::time::sleep(lease + lease / 2).await;
    assert_eq!(
        store.reserve(&y, lease).await.unwrap(),
        Reserved::Held {
            epoch: 2,
            took_over: true
        }
    );
    assert_eq!(store.settle(&at(1, &x)).await.unwrap(), Settled::Fenced);
    assert_eq!(
        store.settle(&at(2, &y)).await.unwrap(),
        Settled::Now { late: false }
    );
    for (stale, what) in [
        (at(1, &x), "the old owner at its epoch"),
        (x.clone(), "the old owner, epoch 0"),
        (at(1, &y), "the new owner at the stale epoch"),
    ] {
        assert!(
            !store.record_reply(&stale, declined).await.unwrap(),
            "{what}"
        );
    }
    assert!(store.record_reply(&at(2, &y), approved).await.unwrap());
    assert_eq!(
        store.reply(&x).await.unwrap().as_deref(),
        Some(approved),
        "the old owner reads the new owner's reply"
    );

    // At most MAX_REPLY bytes.
    let big = pay(9, 1, Some("auth-9"), 7, "9.00");
    assert_eq!(store.claim(&big).await.unwrap(), Claimed::Now);
    let err = store
        .record_reply(&big, &vec![7; MAX_REPLY + 1])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ReplyTooLarge { len, max } if len == MAX_REPLY + 1 && max == MAX_REPLY),
        "{err:?}"
    );
    assert!(!err.outcome_unknown());
    assert!(err.to_string().contains("65536"), "{err}");
    assert_eq!(store.reply(&big).await.unwrap(), None, "nothing recorded");
    assert!(store.record_reply(&big, &vec![7; MAX_REPLY]).await.unwrap());
    assert_eq!(
        store.reply(&big).await.unwrap().map(|r| r.len()),
        Some(MAX_REPLY)
    );

    // Never claimed: nothing. Released: the reply goes with its claim.
    assert_eq!(
        store
            .reply(&pay(10, 1, Some("auth-10"), 7, "x"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.reply(&pay(10, 1, None, 7, "x")).await.unwrap(), None);
    assert!(!store
        .record_reply(&pay(10, 1, Some("auth-10"), 7, "x"), approved)
        .await
        .unwrap());
    assert!(store.release(&a).await.unwrap());
    assert_eq!(store.reply(&retry).await.unwrap(), None, "released");
    assert_eq!(store.claim(&retry).await.unwrap(), Claimed::Now);
    assert_eq!(
        store.reply(&retry).await.unwrap(),
        None,
        "claimed afresh: no reply yet"
    );
}

/// Two channels over one simulated quinn pair (`up` client → server, `down` back), each
/// opened on its end with its own config ([`open_ends`]).
pub struct Ends {
    /// The pair (kept alive).
    pub pair: surelink::sim::Pair,
    /// The client's channel and its messages.
    pub client: Channel,
    pub client_messages: Messages,
    /// The server's channel and its messages.
    pub server: Channel,
    pub server_messages: Messages,
}

/// [`Ends`] over a surelink-congestion pair with `seed`.
pub async fn open_ends(
    up: surelink::sim::LinkConfig,
    down: surelink::sim::LinkConfig,
    seed: u64,
    client: surelink::channel::Config,
    server: surelink::channel::Config,
) -> Ends {
    let pair = surelink::sim::Pair::new(surelink::sim::PairConfig {
        seed,
        congestion: surelink::sim::Congestion::Surelink,
        client_to_server: up,
        server_to_client: down,
        ..surelink::sim::PairConfig::default()
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client_ch, client_messages) = Channel::open(client_conn, client).unwrap();
    let (server_ch, server_messages) = Channel::open(server_conn, server).unwrap();
    Ends {
        pair,
        client: client_ch,
        client_messages,
        server: server_ch,
        server_messages,
    }
}
