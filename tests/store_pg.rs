//! The PostgreSQL dedupe store against a real PostgreSQL (feature `postgres`).
//!
//! Needs `SURELINK_PG_URL`; `scripts/with-postgres` starts a throwaway cluster and sets it
//! (`.ci/run` does). Without it these tests say so and pass, unless `SURELINK_REQUIRE_PG` is
//! set, as in CI, where a missing database is a failure. Each test works in its own fresh
//! database, so they run in parallel without seeing each other's claims.

#![cfg(feature = "postgres")]

use std::time::Duration;

use bytes::Bytes;
use surelink::store::{Claim, Claimed, DedupeStore, PgStore, Reserved, Settled, StoreError};
use tokio_postgres::NoTls;

mod common;
use common::fresh_database;

fn claim(channel: u8, message: u64, key: Option<&str>) -> Claim {
    Claim {
        channel: [channel; 16],
        message,
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        ..Claim::default()
    }
}

/// `claim` by `claimant`.
fn by(claimant: u64, claim: Claim) -> Claim {
    Claim { claimant, ..claim }
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
    // Three replicas, each with its own pool and claimant, all trying to claim the same 300
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
                let key = (m % 3 == 0).then(|| format!("order-{m}"));
                let c = by(r as u64 + 1, claim(7, m, key.as_deref()));
                if store.claim(&c).await.unwrap() == Claimed::Now {
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
    assert_eq!(store.claim_in(&tx, &payment).await.unwrap(), Claimed::Now);
    tx.execute("INSERT INTO ledger VALUES (42, 1000)", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(!store.lookup(&payment).await.unwrap(), "claim rolled back");

    // Again, committed: the claim and the ledger row together.
    let tx = app.transaction().await.unwrap();
    assert_eq!(store.claim_in(&tx, &payment).await.unwrap(), Claimed::Now);
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
    assert!(
        !store
            .record_reply(&claim(1, 0, Some("k")), b"approved")
            .await
            .unwrap(),
        "an anonymous claim: nobody's to reply to"
    );
    let mine = by(7, claim(2, 0, Some("auth")));
    assert_eq!(store.claim(&mine).await.unwrap(), Claimed::Now);
    assert!(store.record_reply(&mine, b"approved").await.unwrap());
    assert_eq!(store.expire().await.unwrap(), 0, "within the TTL");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(store.expire().await.unwrap(), 2);
    assert_eq!(
        store.reply(&mine).await.unwrap(),
        None,
        "a reply goes with its claim"
    );
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
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(!err.outcome_unknown(), "nothing was sent");
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
        let mut config = Config::default();
        config.store = Some(store);
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
        .await
        .unwrap()
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

/// A TCP proxy in front of the test's PostgreSQL, to break the path the way networks and
/// servers do: hold every byte (a server that does not answer at all), hold only the
/// server's answers (a statement that ran but whose answer is lost), or drop every
/// connection and refuse new ones (a server restarting).
mod proxy {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// What the proxy does with traffic.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Mode {
        /// Passes everything.
        Forward,
        /// Holds every byte, both ways (released when it forwards again).
        Freeze,
        /// Holds the server's answers only.
        Mute,
        /// Closes every connection and every new one at once.
        Down,
    }

    /// A running proxy; stops when dropped.
    pub struct Proxy {
        /// The URL to reach PostgreSQL through it.
        pub url: String,
        mode: watch::Sender<Mode>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
            self.mode.send_replace(Mode::Down);
        }
    }

    impl Proxy {
        /// A proxy to the server of `url` (`postgres://user@host:port/db`).
        pub async fn start(url: &str) -> Proxy {
            let (head, rest) = url.split_once('@').unwrap();
            let (server, db) = rest.split_once('/').unwrap();
            let target: SocketAddr = server.parse().unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("{head}@{}/{db}", listener.local_addr().unwrap());
            let (mode, watching) = watch::channel(Mode::Forward);
            let task = tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if *watching.borrow() == Mode::Down {
                        continue;
                    }
                    let watching = watching.clone();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (from_client, to_client) = inbound.into_split();
                        let (from_server, to_server) = outbound.into_split();
                        let mut down = watching.clone();
                        tokio::select! {
                            _ = pipe(from_client, to_server, watching.clone(), false) => {}
                            _ = pipe(from_server, to_client, watching, true) => {}
                            _ = down.wait_for(|m| *m == Mode::Down) => {}
                        }
                    });
                }
            });
            Proxy { url, mode, task }
        }

        /// Sets what it does from now on.
        pub fn set(&self, mode: Mode) {
            self.mode.send_replace(mode);
        }
    }

    async fn pipe(
        mut from: impl AsyncReadExt + Unpin,
        mut to: impl AsyncWriteExt + Unpin,
        mut mode: watch::Receiver<Mode>,
        answers: bool,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let held = |m: &Mode| *m == Mode::Freeze || (answers && *m == Mode::Mute);
            if mode.wait_for(|m| !held(m)).await.is_err() || *mode.borrow() == Mode::Down {
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

use proxy::{Mode, Proxy};

/// A direct connection to `url`, for the test's own look at the table.
/// A table of an older schema (created by the caller) is refused by a store that does not
/// create its schema (a column is missing), then migrated in place by one that does: every
/// column the store uses is there, the `reply` column among them (nullable, empty in the old
/// rows).
async fn refused_then_migrated(url: &str) -> PgStore {
    let err = PgStore::builder(url).connect().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN)),
        "an old table without create_schema: {err:?}"
    );
    let store = PgStore::connect(url, DAY).await.unwrap();
    let db = direct(url).await;
    let reply = db
        .query_opt(
            "SELECT data_type::text, is_nullable::text FROM information_schema.columns
             WHERE table_name = 'surelink_claims' AND column_name = 'reply'",
            &[],
        )
        .await
        .unwrap()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)));
    assert_eq!(
        reply,
        Some(("bytea".to_string(), "YES".to_string())),
        "the reply column after the migration"
    );
    let replies: i64 = db
        .query_one(
            "SELECT count(*) FROM surelink_claims WHERE reply IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(replies, 0, "old claims have no reply");
    store
}

async fn direct(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The claimant of (channel, message)'s row, if there is one.
async fn claimant_of(db: &tokio_postgres::Client, table: &str, c: &Claim) -> Option<i64> {
    db.query_opt(
        &format!("SELECT claimant FROM {table} WHERE channel_id = $1 AND message_id = $2"),
        &[&&c.channel[..], &(c.message as i64)],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

/// A store that claims in a real `PgStore` and then reports an error, as when the
/// connection breaks after COMMIT: the first `failures` claims are written but answered with
/// an error.
#[derive(Debug)]
struct CommitThenFail {
    inner: PgStore,
    failures: std::sync::atomic::AtomicU32,
}

impl DedupeStore for CommitThenFail {
    fn claim<'a>(
        &'a self,
        claim: &'a Claim,
    ) -> surelink::store::StoreFuture<'a, surelink::store::Claimed> {
        Box::pin(async move {
            let answer = self.inner.claim(claim).await?;
            let left = self.failures.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                self.failures
                    .store(left - 1, std::sync::atomic::Ordering::SeqCst);
                return Err(StoreError::Timeout {
                    after: Duration::from_secs(1),
                });
            }
            Ok(answer)
        })
    }
    fn reserve<'a>(
        &'a self,
        claim: &'a Claim,
        lease: Duration,
    ) -> surelink::store::StoreFuture<'a, Reserved> {
        self.inner.reserve(claim, lease)
    }
    fn settle<'a>(&'a self, claim: &'a Claim) -> surelink::store::StoreFuture<'a, Settled> {
        self.inner.settle(claim)
    }
    fn lookup<'a>(&'a self, claim: &'a Claim) -> surelink::store::StoreFuture<'a, bool> {
        self.inner.lookup(claim)
    }
    fn release<'a>(&'a self, claim: &'a Claim) -> surelink::store::StoreFuture<'a, bool> {
        self.inner.release(claim)
    }
    fn bind_channel(
        &self,
        channel: [u8; 16],
        owner: [u8; 32],
    ) -> surelink::store::StoreFuture<'_, bool> {
        self.inner.bind_channel(channel, owner)
    }
    fn expire(&self) -> surelink::store::StoreFuture<'_, u64> {
        self.inner.expire()
    }
    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }
}

/// Issue 13 case 2: a claim written but reported as an error. Retrying it with the same
/// claimant answers `Now` (the claim is its own), where a replica with another claimant is
/// refused; the claimant can release it. Before claimants, the retry answered `Before` and
/// nobody delivered the message.
#[tokio::test]
async fn a_claim_committed_but_answered_with_an_error_is_the_retrys_own() {
    let Some(url) = fresh_database("lost_answer").await else {
        return;
    };
    let store = CommitThenFail {
        inner: PgStore::connect(&url, DAY).await.unwrap(),
        failures: 1.into(),
    };
    let replica = PgStore::connect(&url, DAY).await.unwrap();
    let payment = by(0x5eed_0001, claim(3, 17, Some("order-17")));
    let err = store.claim(&payment).await.unwrap_err();
    assert!(err.outcome_unknown(), "{err}");
    assert!(
        store.lookup(&payment).await.unwrap(),
        "the claim was written"
    );
    assert_eq!(store.claim(&payment).await.unwrap(), Claimed::Now, "retry");
    // The replica the client fails over to has its own claimant: refused, by id or by key.
    assert_eq!(
        replica
            .claim(&by(0x5eed_0002, claim(3, 17, Some("order-17"))))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert_eq!(
        replica
            .claim(&by(0x5eed_0002, claim(9, 1, Some("order-17"))))
            .await
            .unwrap(),
        Claimed::Before
    );
    // Not handed to the application after all: released by its claimant only.
    assert!(!replica
        .release(&by(0x5eed_0002, claim(3, 17, Some("order-17"))))
        .await
        .unwrap());
    assert!(store.release(&payment).await.unwrap());
    assert!(!store.lookup(&payment).await.unwrap());
    assert_eq!(
        replica
            .claim(&by(0x5eed_0002, claim(3, 17, Some("order-17"))))
            .await
            .unwrap(),
        Claimed::Now
    );
}

/// Issue 13 case 2 for real: the INSERT reaches PostgreSQL and commits, but its answer is
/// lost on the way back (the proxy holds it). The store gives up at its deadline with an
/// error whose outcome is unknown; the retry, on a fresh connection, answers `Now`.
#[tokio::test]
async fn a_claim_whose_answer_is_lost_in_the_network_is_claimed_by_its_retry() {
    let Some(url) = fresh_database("lost_network").await else {
        return;
    };
    let proxy = Proxy::start(&url).await;
    let store = PgStore::builder(&proxy.url)
        .create_schema(true)
        .operation_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    let db = direct(&url).await;
    let payment = by(77, claim(4, 2, Some("order-2")));
    proxy.set(Mode::Mute);
    let err = store.claim(&payment).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Timeout { .. }) && err.outcome_unknown(),
        "{err:?}"
    );
    // It committed all the same.
    let mut committed = None;
    for _ in 0..50 {
        committed = claimant_of(&db, "surelink_claims", &payment).await;
        if committed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(committed, Some(77), "the claim was written");
    proxy.set(Mode::Forward);
    assert_eq!(store.claim(&payment).await.unwrap(), Claimed::Now);
    assert_eq!(
        store
            .claim(&by(78, claim(4, 2, Some("order-2"))))
            .await
            .unwrap(),
        Claimed::Before
    );
}

/// Issue 13 case 13d: the store's connections are killed (`pg_terminate_backend`, as a
/// failover or a restart of the server does); the store reconnects by itself. Before the
/// pool, every claim after the kill failed for good.
#[tokio::test]
async fn the_store_reconnects_after_its_connections_are_killed() {
    let Some(url) = fresh_database("killed").await else {
        return;
    };
    let store = PgStore::builder(&url)
        .create_schema(true)
        .pool_size(2)
        .connect()
        .await
        .unwrap();
    let db = direct(&url).await;
    for round in 0..3u64 {
        // Both pooled connections in use, then idle in the pool.
        let (first, second) = (claim(1, round * 100, None), claim(1, round * 100 + 1, None));
        let (a, b) = tokio::join!(store.claim(&first), store.claim(&second));
        assert_eq!((a.unwrap(), b.unwrap()), (Claimed::Now, Claimed::Now));
        let killed: i64 = db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(killed >= 1, "round {round}: killed {killed}");
        // A claim sent on a connection before its client saw it die fails (definitely or
        // not: a retry with the claimant settles it); the store then reconnects.
        let c = by(5, claim(1, round * 100 + 2, None));
        let mut failures = 0;
        let answer = loop {
            match store.claim(&c).await {
                Ok(answer) => break answer,
                Err(e) => {
                    eprintln!(
                        "round {round}: {e} (outcome unknown: {})",
                        e.outcome_unknown()
                    );
                    assert!(matches!(e, StoreError::Postgres(_)), "{e:?}");
                    failures += 1;
                    assert!(failures <= 2, "one failure per killed connection at most");
                }
            }
        };
        assert_eq!(answer, Claimed::Now, "round {round}");
        assert!(store.lookup(&c).await.unwrap());
    }
}

/// Issue 13 case 13d: a server restart seen from the client (every connection cut, new
/// ones refused for a while, then accepted): claims fail while it is down, with errors
/// that say whether they may have been written, and succeed once it is back.
#[tokio::test]
async fn the_store_recovers_when_the_server_comes_back() {
    let Some(url) = fresh_database("restart").await else {
        return;
    };
    let proxy = Proxy::start(&url).await;
    let store = PgStore::builder(&proxy.url)
        .create_schema(true)
        .operation_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    assert_eq!(store.claim(&claim(1, 0, None)).await.unwrap(), Claimed::Now);
    proxy.set(Mode::Down);
    for i in 1..4 {
        let err = store.claim(&by(3, claim(1, i, None))).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Postgres(_) | StoreError::Unavailable(_)),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("PostgreSQL dedupe store"),
            "{err}"
        );
    }
    // The last ones found no connection at all: nothing was sent.
    let err = store.claim(&by(3, claim(1, 9, None))).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)) && !err.outcome_unknown(),
        "{err:?}"
    );
    proxy.set(Mode::Forward);
    for i in 1..4 {
        assert_eq!(
            store.claim(&by(3, claim(1, i, None))).await.unwrap(),
            Claimed::Now
        );
    }
}

/// Issue 13 case 13d: PostgreSQL that does not answer at all (every byte held). Each
/// operation ends at the store's deadline with `StoreError::Timeout` (outcome unknown),
/// connecting too (`Unavailable`: nothing was sent); the store works again once it
/// answers. Before, a claim waited forever.
#[tokio::test]
async fn a_database_that_never_answers_is_a_timeout_not_a_hang() {
    let Some(url) = fresh_database("silent").await else {
        return;
    };
    let proxy = Proxy::start(&url).await;
    let builder = PgStore::builder(&proxy.url)
        .create_schema(true)
        .operation_timeout(Duration::from_millis(300));
    let store = builder.clone().connect().await.unwrap();
    proxy.set(Mode::Freeze);
    let guard = Duration::from_secs(30);
    for op in 0..3 {
        let c = by(1, claim(2, op, None));
        let err = match op {
            0 => tokio::time::timeout(guard, store.claim(&c))
                .await
                .unwrap()
                .unwrap_err(),
            1 => tokio::time::timeout(guard, store.lookup(&c))
                .await
                .unwrap()
                .unwrap_err(),
            _ => tokio::time::timeout(guard, store.expire())
                .await
                .unwrap()
                .unwrap_err(),
        };
        // The first one timed out on the pooled connection; later ones on new connections
        // that never finish connecting.
        assert!(
            matches!(err, StoreError::Timeout { .. } | StoreError::Unavailable(_)),
            "op {op}: {err:?}"
        );
        if op == 0 {
            assert!(matches!(err, StoreError::Timeout { .. }) && err.outcome_unknown());
        }
    }
    let err = tokio::time::timeout(guard, builder.clone().connect())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)) && !err.outcome_unknown(),
        "{err:?}"
    );
    proxy.set(Mode::Forward);
    assert_eq!(
        store.claim(&by(1, claim(2, 0, None))).await.unwrap(),
        Claimed::Now,
        "its own claim, whether the frozen one reached the server or not"
    );
}

/// Issue 13 case 13d: a statement that blocks (here on a lock another session holds on the
/// table) is cancelled by the server at the statement timeout: a definite error, nothing
/// written; the claim succeeds once the lock is gone.
#[tokio::test]
async fn a_blocked_claim_ends_at_the_statement_timeout() {
    let Some(url) = fresh_database("blocked").await else {
        return;
    };
    let store = PgStore::builder(&url)
        .create_schema(true)
        .statement_timeout(Duration::from_millis(300))
        .operation_timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap();
    let mut db = direct(&url).await;
    let locker = db.transaction().await.unwrap();
    locker
        .batch_execute("LOCK TABLE surelink_claims IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let payment = by(4, claim(8, 1, Some("order-1")));
    let err = tokio::time::timeout(Duration::from_secs(15), store.claim(&payment))
        .await
        .expect("the statement timeout ends it, long before the client's deadline")
        .unwrap_err();
    let StoreError::Postgres(pg) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        pg.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{err}"
    );
    assert!(
        !err.outcome_unknown(),
        "cancelled by the server: not written"
    );
    locker.rollback().await.unwrap();
    assert!(!store.lookup(&payment).await.unwrap());
    assert_eq!(store.claim(&payment).await.unwrap(), Claimed::Now);
}

/// Issue 13 case 13d: the table is configurable, created only when asked, and `claim_in`
/// (the application's transaction) uses it; a name that is not a plain identifier is
/// refused before any SQL is sent.
#[tokio::test]
async fn the_table_is_configurable_and_created_only_when_asked() {
    let Some(url) = fresh_database("table").await else {
        return;
    };
    let err = PgStore::builder(&url)
        .table("payment_claims")
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Postgres(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)),
        "no table and no create_schema: {err:?}"
    );
    for bad in ["claims; DROP TABLE ledger", "Claims", "x\"y", "a.b.c", ""] {
        let err = PgStore::builder(&url)
            .table(bad)
            .create_schema(true)
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{bad:?}: {err:?}");
    }
    let mut db = direct(&url).await;
    db.batch_execute("CREATE SCHEMA pay").await.unwrap();
    let store = PgStore::builder(&url)
        .table("pay.claims")
        .create_schema(true)
        .connect()
        .await
        .unwrap();
    assert_eq!(store.table(), "pay.claims");
    common::check_claim_semantics(&store).await;
    let tx = db.transaction().await.unwrap();
    assert_eq!(
        store
            .claim_in(&tx, &claim(9, 9, Some("order-9")))
            .await
            .unwrap(),
        Claimed::Now
    );
    tx.commit().await.unwrap();
    assert!(claimant_of(&db, "pay.claims", &claim(9, 9, None))
        .await
        .is_some());
    let default: Option<String> = db
        .query_one("SELECT to_regclass('surelink_claims')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(default, None, "the default table was not created");
    let channels: Option<String> = db
        .query_one("SELECT to_regclass('pay.claims_channels')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(channels.as_deref(), Some("pay.claims_channels"));
    // Without create_schema, an existing table is used as it is.
    let again = PgStore::builder(&url)
        .table("pay.claims")
        .connect()
        .await
        .unwrap();
    assert_eq!(
        again.claim(&claim(7, 9, Some("order-9"))).await.unwrap(),
        Claimed::Before
    );
}

/// Issue 13 case 2 / 13d: a table created by the previous schema (no claimant column) is
/// migrated when `create_schema` is on; its claims are kept (anonymous) and still refuse
/// their messages and keys.
#[tokio::test]
async fn a_table_of_the_previous_schema_is_migrated() {
    let Some(url) = fresh_database("migrate").await else {
        return;
    };
    let db = direct(&url).await;
    db.batch_execute(
        "CREATE TABLE surelink_claims (
             channel_id bytea       NOT NULL,
             message_id bigint      NOT NULL,
             idem_key   bytea,
             claimed_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (channel_id, message_id)
         );
         CREATE UNIQUE INDEX surelink_claims_idem_key
             ON surelink_claims (idem_key) WHERE idem_key IS NOT NULL;
         INSERT INTO surelink_claims (channel_id, message_id, idem_key)
             VALUES ('\\x01010101010101010101010101010101', 5, 'old-5');",
    )
    .await
    .unwrap();
    let store = refused_then_migrated(&url).await;
    assert_eq!(
        claimant_of(&db, "surelink_claims", &claim(1, 5, None)).await,
        Some(0)
    );
    assert_eq!(
        store
            .claim(&by(3, claim(1, 5, Some("old-5"))))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert_eq!(
        store
            .claim(&by(3, claim(2, 1, Some("old-5"))))
            .await
            .unwrap(),
        Claimed::Before
    );
    assert_eq!(
        store
            .claim(&by(3, claim(2, 1, Some("new-1"))))
            .await
            .unwrap(),
        Claimed::Now
    );
    let indexes: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'surelink_claims'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        indexes, 3,
        "primary key, the (client, key) index in place of the key index, and the claimed_at \
         index it lacked"
    );
    // Connecting again changes nothing.
    PgStore::connect(&url, DAY).await.unwrap();
}

/// Expiry in batches: a backlog larger than one batch (10,000 rows) is removed in one call.
#[tokio::test]
async fn a_large_backlog_of_expired_claims_is_removed() {
    let Some(url) = fresh_database("backlog").await else {
        return;
    };
    let store = PgStore::connect(&url, Duration::from_secs(3600))
        .await
        .unwrap();
    let db = direct(&url).await;
    db.batch_execute(
        "INSERT INTO surelink_claims (channel_id, message_id, claimed_at)
         SELECT '\\x02020202020202020202020202020202', i, now() - interval '2 hours'
         FROM generate_series(1, 25000) AS i",
    )
    .await
    .unwrap();
    store.claim(&claim(2, 0, None)).await.unwrap();
    assert_eq!(store.expire().await.unwrap(), 25_000);
    assert!(
        store.lookup(&claim(2, 0, None)).await.unwrap(),
        "the fresh claim stays"
    );
}

/// Issue 21 cases 6, 7 and 8 in PostgreSQL: keys per client, conflicts by payload digest,
/// channel owners.
#[tokio::test]
async fn keys_are_per_client_payloads_are_checked_and_channels_bound() {
    let Some(url) = fresh_database("clients").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    common::check_clients_digests_and_owners(&store).await;
}

/// Issue 21 case 7: replicas racing to bind the same new channels for different clients:
/// each channel gets exactly one owner, and only that owner's binds succeed afterwards.
#[tokio::test]
async fn replicas_racing_to_bind_a_channel_agree_on_one_owner() {
    let Some(url) = fresh_database("bind_race").await else {
        return;
    };
    let mut tasks = Vec::new();
    for r in 0..3u8 {
        let store = PgStore::connect(&url, DAY).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for c in 0..100u8 {
                if store.bind_channel([c; 16], [r; 32]).await.unwrap() {
                    won.push((c, r));
                }
            }
            (store, won)
        }));
    }
    let mut owners = std::collections::BTreeMap::new();
    let mut store = None;
    for t in tasks {
        let (s, won) = t.await.unwrap();
        for (c, r) in won {
            assert!(owners.insert(c, r).is_none(), "channel {c} bound twice");
        }
        store = Some(s);
    }
    assert_eq!(owners.len(), 100);
    let store = store.unwrap();
    for (c, r) in owners {
        assert!(store.bind_channel([c; 16], [r; 32]).await.unwrap());
        assert!(!store.bind_channel([c; 16], [r + 1; 32]).await.unwrap());
    }
}

/// Issue 21 case 7: a binding is swept once it is older than the TTL and no claim of its
/// channel is left; until then no other client may bind the channel.
#[tokio::test]
async fn a_binding_expires_with_its_channels_claims() {
    let Some(url) = fresh_database("bind_ttl").await else {
        return;
    };
    let store = PgStore::connect(&url, Duration::from_millis(600))
        .await
        .unwrap();
    let (a, b) = ([1; 32], [2; 32]);
    assert!(store.bind_channel([1; 16], a).await.unwrap());
    assert!(store.bind_channel([2; 16], a).await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.claim(&claim(1, 0, None)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // 800 ms after the binds; channel 1's claim is 400 ms old.
    assert_eq!(store.expire().await.unwrap(), 0);
    assert!(
        !store.bind_channel([1; 16], b).await.unwrap(),
        "its claim keeps the binding"
    );
    assert!(
        store.bind_channel([2; 16], b).await.unwrap(),
        "no claim: swept, the id is free"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.expire().await.unwrap(), 1);
    assert!(
        store.bind_channel([1; 16], b).await.unwrap(),
        "gone with its last claim"
    );
}

/// Issue 21 cases 6 and 8: a table of the previous schema (claimant column, keys unique
/// across clients, no channel table) is migrated in place by `create_schema`: the `client`
/// (all zeros for the old rows: the anonymous client) and `digest` columns are added, the key
/// index is replaced by one on (client, key), and the channel table is created. Old claims
/// still refuse their messages and the anonymous client's keys; keys are per client from then
/// on. Connecting again changes nothing; without `create_schema` the old table is refused.
#[tokio::test]
async fn a_table_without_clients_and_digests_is_migrated() {
    let Some(url) = fresh_database("migrate21").await else {
        return;
    };
    let db = direct(&url).await;
    db.batch_execute(
        "CREATE TABLE surelink_claims (
             channel_id bytea       NOT NULL,
             message_id bigint      NOT NULL,
             idem_key   bytea,
             claimed_at timestamptz NOT NULL DEFAULT now(),
             claimant   bigint      NOT NULL DEFAULT 0,
             PRIMARY KEY (channel_id, message_id)
         );
         CREATE UNIQUE INDEX surelink_claims_idem_key
             ON surelink_claims (idem_key) WHERE idem_key IS NOT NULL;
         CREATE INDEX surelink_claims_claimed_at ON surelink_claims (claimed_at);
         INSERT INTO surelink_claims (channel_id, message_id, idem_key, claimant)
             VALUES ('\\x01010101010101010101010101010101', 5, 'old-5', 7);",
    )
    .await
    .unwrap();
    let store = refused_then_migrated(&url).await;
    let row = db
        .query_one(
            "SELECT client, digest FROM surelink_claims WHERE message_id = 5",
            &[],
        )
        .await
        .unwrap();
    let (client, digest): (Vec<u8>, Option<Vec<u8>>) = (row.get(0), row.get(1));
    assert_eq!(
        client,
        vec![0; 32],
        "an old claim is the anonymous client's"
    );
    assert_eq!(digest, None);
    // The old claim refuses its message and, for the anonymous client, its key.
    let old = Claim {
        digest: Some(surelink::proto::payload_digest(b"anything")),
        ..claim(1, 5, Some("old-5"))
    };
    assert_eq!(
        store.claim(&by(3, old.clone())).await.unwrap(),
        Claimed::Before
    );
    assert_eq!(
        store
            .claim(&Claim {
                channel: [2; 16],
                ..old.clone()
            })
            .await
            .unwrap(),
        Claimed::Before,
        "no digest on the old claim: no conflict"
    );
    assert_eq!(
        store
            .claim(&Claim {
                channel: [2; 16],
                client: [9; 32],
                ..old
            })
            .await
            .unwrap(),
        Claimed::Now,
        "another client's key"
    );
    let indexes: Vec<String> = db
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'surelink_claims'
             ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        indexes,
        [
            "surelink_claims_claimed_at",
            "surelink_claims_client_key",
            "surelink_claims_pkey"
        ]
    );
    assert!(store.bind_channel([1; 16], [1; 32]).await.unwrap());
    // Connecting again changes nothing, and the schema run by hand neither.
    PgStore::connect(&url, DAY).await.unwrap();
    db.batch_execute(surelink::store::PG_SCHEMA).await.unwrap();
    assert!(!store.bind_channel([1; 16], [2; 32]).await.unwrap());
    let claims: i64 = db
        .query_one("SELECT count(*) FROM surelink_claims", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(claims, 2);
}

/// Two-phase claims in PostgreSQL: the semantics `MemoryStore` has (`tests/common`), on the
/// database's clock with short real leases.
#[tokio::test]
async fn reservations_have_the_memory_stores_semantics() {
    let Some(url) = fresh_database("reserve").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    common::check_reservation_semantics(&store, Duration::from_millis(400)).await;
}

/// `N` tasks, spread over `stores` (replicas, each with its own pool), each running `op` on
/// its own claim `make(task)` at the same moment; the answers by task.
async fn race<T, F, Fut>(stores: &[PgStore], make: impl Fn(u64) -> Claim, op: F) -> Vec<(u64, T)>
where
    T: Send + 'static,
    F: Fn(PgStore, Claim) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    const N: u64 = 16;
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(N as usize));
    let mut tasks = Vec::new();
    for task in 0..N {
        let (store, claim) = (stores[task as usize % stores.len()].clone(), make(task));
        let (start, op) = (start.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            (task, op(store, claim).await)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The answers that hold the message, and that every other answer is `Busy`.
fn holders(answers: &[(u64, Reserved)], what: &str) -> Vec<(u64, Reserved)> {
    for (task, r) in answers {
        assert!(
            matches!(r, Reserved::Held { .. } | Reserved::Busy { .. }),
            "{what}: task {task}: {r:?}"
        );
    }
    answers
        .iter()
        .filter(|(_, r)| matches!(r, Reserved::Held { .. }))
        .copied()
        .collect()
}

/// Replicas racing to reserve the same message (by its id, or by its key under different
/// ids) get exactly one holder; once its lease ended, replicas racing to take it over get
/// exactly one new holder, at the next epoch, and the old one is fenced; a race of one-phase
/// claims and reservations for an ended reservation has exactly one winner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_racing_to_reserve_or_take_over_get_exactly_one_holder() {
    let Some(url) = fresh_database("reserve_race").await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(PgStore::connect(&url, DAY).await.unwrap());
    }
    // Long enough that every racer answers within it, on a slow machine too.
    let lease = Duration::from_secs(1);
    let reserve = move |s: PgStore, c: Claim| async move { s.reserve(&c, lease).await.unwrap() };
    let keyed = |channel: u8, message: u64, key: String, claimant: u64| Claim {
        digest: Some(surelink::proto::payload_digest(key.as_bytes())),
        ..by(claimant, claim(channel, message, Some(&key)))
    };
    for round in 0..3u64 {
        let (id_key, key) = (format!("id-{round}"), format!("key-{round}"));
        // The same (channel, message), and the same key under 16 ids.
        let same_id = |claimant| keyed(1, round, id_key.clone(), claimant);
        let same_key =
            |channel, claimant| keyed(channel, round * 100 + claimant, key.clone(), claimant);
        let won = holders(&race(&stores, |t| same_id(t + 1), reserve).await, "by id");
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(
            won[0].1,
            Reserved::Held {
                epoch: 1,
                took_over: false
            }
        );
        let old_id = same_id(won[0].0 + 1);
        let won = holders(
            &race(&stores, |t| same_key(2, t + 1), reserve).await,
            "by key",
        );
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(
            won[0].1,
            Reserved::Held {
                epoch: 1,
                took_over: false
            }
        );
        let old_key = same_key(2, won[0].0 + 1);

        tokio::time::sleep(lease + lease / 2).await;
        // New claimants take over: one of them.
        let won = holders(
            &race(&stores, |t| same_id(t + 101), reserve).await,
            "take over by id",
        );
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(
            won[0].1,
            Reserved::Held {
                epoch: 2,
                took_over: true
            }
        );
        let new_id = Claim {
            epoch: 2,
            ..same_id(won[0].0 + 101)
        };
        let won = holders(
            &race(&stores, |t| same_key(3, t + 101), reserve).await,
            "take over by key",
        );
        assert_eq!(won.len(), 1, "round {round}: {won:?}");
        assert_eq!(
            won[0].1,
            Reserved::Held {
                epoch: 2,
                took_over: true
            }
        );
        let new_key = Claim {
            epoch: 2,
            ..same_key(3, won[0].0 + 101)
        };
        let store = &stores[0];
        for old in [old_id, old_key.clone()] {
            let old = Claim { epoch: 1, ..old };
            assert_eq!(store.settle(&old).await.unwrap(), Settled::Fenced);
        }
        assert!(!store
            .lookup(&Claim {
                key: None,
                ..old_key.clone()
            })
            .await
            .unwrap());
        for new in [new_id, new_key] {
            assert_eq!(
                store.settle(&new).await.unwrap(),
                Settled::Now { late: false }
            );
        }

        // An ended reservation, raced for by one-phase claims and reservations at once.
        let held = keyed(4, round, format!("mixed-{round}"), 1);
        store
            .reserve(&held, Duration::from_millis(100))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answers = race(
            &stores,
            |t| keyed(4, round, format!("mixed-{round}"), t + 2),
            move |s: PgStore, c: Claim| async move {
                if c.claimant % 2 == 0 {
                    match s.claim(&c).await.unwrap() {
                        Claimed::Now => "won",
                        Claimed::Busy | Claimed::Before => "lost",
                        c => panic!("{c:?}"),
                    }
                } else {
                    match s.reserve(&c, lease).await.unwrap() {
                        Reserved::Held {
                            epoch: 2,
                            took_over: true,
                        } => "won",
                        Reserved::Busy { .. } | Reserved::Before => "lost",
                        r => panic!("{r:?}"),
                    }
                }
            },
        )
        .await;
        let winners: Vec<_> = answers.iter().filter(|(_, a)| *a == "won").collect();
        assert_eq!(winners.len(), 1, "round {round}: {answers:?}");
    }
}

/// The inbox pattern with a reservation: `claim_in` settles it in the application's
/// transaction (rolled back: still a reservation), answers `Busy` once another replica
/// holds it, `Before` once another settled it, and a one-phase `claim_in` meets
/// reservations too.
#[tokio::test]
async fn the_inbox_claim_settles_the_messages_reservation() {
    let Some(url) = fresh_database("inbox_settle").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    let mut app = direct(&url).await;
    app.batch_execute("CREATE TABLE ledger (payment bigint PRIMARY KEY)")
        .await
        .unwrap();
    let long = Duration::from_secs(30);
    let payment = by(7, claim(5, 42, Some("order-42")));
    let other = by(8, claim(5, 42, Some("order-42")));
    let Reserved::Held { epoch, .. } = store.reserve(&payment, long).await.unwrap() else {
        panic!("not held");
    };
    let mine = Claim {
        epoch,
        ..payment.clone()
    };
    assert_eq!(
        store
            .claim_in(
                &app,
                &Claim {
                    epoch: 0,
                    ..other.clone()
                }
            )
            .await
            .unwrap(),
        Claimed::Busy,
        "a one-phase claim against the live reservation"
    );

    // Rolled back with the application: still reserved.
    let tx = app.transaction().await.unwrap();
    assert_eq!(store.claim_in(&tx, &mine).await.unwrap(), Claimed::Now);
    tx.rollback().await.unwrap();
    assert!(matches!(
        store.reserve(&other, long).await.unwrap(),
        Reserved::Busy { .. }
    ));
    // Committed with the ledger row: settled.
    let tx = app.transaction().await.unwrap();
    assert_eq!(store.claim_in(&tx, &mine).await.unwrap(), Claimed::Now);
    tx.execute("INSERT INTO ledger VALUES (42)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.reserve(&other, long).await.unwrap(), Reserved::Before);
    assert_eq!(
        store.claim_in(&app, &mine).await.unwrap(),
        Claimed::Before,
        "a transaction retried after a lost commit answer: its effect is there already"
    );
    assert_eq!(
        store.settle(&mine).await.unwrap(),
        Settled::Now { late: false },
        "the link's own retry of a settle whose answer was lost"
    );

    // Taken over by another replica: fenced (busy); settled there: before.
    let slow = by(7, claim(5, 43, None));
    let fast = by(8, claim(5, 43, None));
    store
        .reserve(&slow, Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.reserve(&fast, long).await.unwrap(),
        Reserved::Held {
            epoch: 2,
            took_over: true
        }
    );
    let slow = Claim { epoch: 1, ..slow };
    let tx = app.transaction().await.unwrap();
    assert_eq!(store.claim_in(&tx, &slow).await.unwrap(), Claimed::Busy);
    tx.rollback().await.unwrap();
    assert_eq!(
        store.settle(&Claim { epoch: 2, ..fast }).await.unwrap(),
        Settled::Now { late: false }
    );
    let tx = app.transaction().await.unwrap();
    assert_eq!(store.claim_in(&tx, &slow).await.unwrap(), Claimed::Before);
    tx.rollback().await.unwrap();
    // No reservation at all: not held, busy.
    let tx = app.transaction().await.unwrap();
    let never = Claim {
        epoch: 1,
        ..by(7, claim(5, 44, None))
    };
    assert_eq!(store.claim_in(&tx, &never).await.unwrap(), Claimed::Busy);
    tx.rollback().await.unwrap();
    assert!(!store.lookup(&never).await.unwrap());

    // A one-phase claim_in takes over an ended reservation of its key, in the transaction.
    let stale = by(7, claim(5, 45, Some("order-45")));
    store
        .reserve(&stale, Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tx = app.transaction().await.unwrap();
    let retry = by(9, claim(6, 1, Some("order-45")));
    assert_eq!(store.claim_in(&tx, &retry).await.unwrap(), Claimed::Now);
    tx.commit().await.unwrap();
    assert_eq!(
        store
            .settle(&Claim {
                epoch: 1,
                ..stale.clone()
            })
            .await
            .unwrap(),
        Settled::Fenced
    );
    assert_eq!(store.reserve(&stale, long).await.unwrap(), Reserved::Before);
}

/// The schema of the previous version (clients and digests, no reservations), as its
/// `PG_SCHEMA` was.
const SCHEMA_WITHOUT_RESERVATIONS: &str = r"
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    client     bytea       NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    digest     bytea,
    PRIMARY KEY (channel_id, message_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_client_key
    ON surelink_claims (client, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
CREATE TABLE IF NOT EXISTS surelink_claims_channels (
    channel_id bytea       PRIMARY KEY,
    owner      bytea       NOT NULL,
    bound_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS surelink_claims_bound_at ON surelink_claims_channels (bound_at);
";

/// A table of the previous version (no `epoch`, no `lease_until`) is refused without
/// `create_schema` and migrated in place with it: its rows are settled claims, which answer
/// `Before` to a reservation (by id or by key) and `Now` to their own claimant's one-phase
/// retry; new reservations work beside them. Connecting again, or running `PG_SCHEMA` by
/// hand, changes nothing.
#[tokio::test]
async fn a_table_without_reservations_is_migrated() {
    let Some(url) = fresh_database("migrate_reserve").await else {
        return;
    };
    let db = direct(&url).await;
    db.batch_execute(SCHEMA_WITHOUT_RESERVATIONS).await.unwrap();
    db.batch_execute(
        "INSERT INTO surelink_claims (channel_id, message_id, idem_key, claimant)
             VALUES ('\\x01010101010101010101010101010101', 5, 'old-5', 7);",
    )
    .await
    .unwrap();
    let store = refused_then_migrated(&url).await;
    let row = db
        .query_one(
            "SELECT epoch, lease_until IS NULL FROM surelink_claims WHERE message_id = 5",
            &[],
        )
        .await
        .unwrap();
    let (epoch, settled): (i64, bool) = (row.get(0), row.get(1));
    assert_eq!((epoch, settled), (0, true), "an old row is a settled claim");
    let lease = Duration::from_secs(30);
    for old in [
        by(8, claim(1, 5, Some("old-5"))),
        by(8, claim(2, 1, Some("old-5"))),
        by(7, claim(1, 5, Some("old-5"))),
    ] {
        assert_eq!(
            store.reserve(&old, lease).await.unwrap(),
            Reserved::Before,
            "{old:?}"
        );
    }
    assert_eq!(
        store
            .claim(&by(7, claim(1, 5, Some("old-5"))))
            .await
            .unwrap(),
        Claimed::Now,
        "its own claimant's retry"
    );
    assert_eq!(
        store
            .settle(&Claim {
                epoch: 0,
                ..by(7, claim(1, 5, Some("old-5")))
            })
            .await
            .unwrap(),
        Settled::Fenced,
        "epoch 0 is no reservation"
    );
    let new = by(8, claim(3, 1, Some("new-1")));
    assert_eq!(
        store.reserve(&new, lease).await.unwrap(),
        Reserved::Held {
            epoch: 1,
            took_over: false
        }
    );
    PgStore::connect(&url, DAY).await.unwrap();
    db.batch_execute(surelink::store::PG_SCHEMA).await.unwrap();
    assert_eq!(
        store.settle(&Claim { epoch: 1, ..new }).await.unwrap(),
        Settled::Now { late: false }
    );
    let claims: i64 = db
        .query_one("SELECT count(*) FROM surelink_claims", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(claims, 2);
}

/// Replies in PostgreSQL: the semantics `MemoryStore` has (`tests/common`), on the
/// database's clock with short real leases.
#[tokio::test]
async fn replies_have_the_memory_stores_semantics() {
    let Some(url) = fresh_database("replies").await else {
        return;
    };
    let store = PgStore::connect(&url, DAY).await.unwrap();
    common::check_reply_semantics(&store).await;
}

/// A reply recorded by one replica (its own pool and claimant) is read byte for byte by
/// another, for a retry under the same key on another channel; replicas racing to record
/// different replies for the same claim leave exactly one, the one every reader gets.
#[tokio::test]
async fn a_reply_recorded_by_one_replica_is_read_by_another() {
    let Some(url) = fresh_database("replies_replicas").await else {
        return;
    };
    let a = PgStore::connect(&url, DAY).await.unwrap();
    let b = PgStore::connect(&url, DAY).await.unwrap();
    let digest = Some(surelink::proto::payload_digest(b"10.00 EUR"));
    let first = Claim {
        digest,
        ..by(7, claim(1, 1, Some("auth-1")))
    };
    let retry = Claim {
        digest,
        ..by(8, claim(2, 5, Some("auth-1")))
    };
    assert_eq!(a.claim(&first).await.unwrap(), Claimed::Now);
    // Every byte value, so that nothing is lost to an encoding.
    let reply: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    assert!(a.record_reply(&first, &reply).await.unwrap());
    assert_eq!(b.claim(&retry).await.unwrap(), Claimed::Before);
    assert_eq!(b.reply(&retry).await.unwrap().as_deref(), Some(&reply[..]));
    assert!(!b.record_reply(&retry, b"declined").await.unwrap());

    // The same claimant recording through two pools at once (a retry racing its first
    // attempt), with different replies: one wins, the other is refused, never overwritten.
    for round in 0..20u8 {
        let (x, y) = (vec![b'x', round], vec![b'y', round]);
        let probe = by(
            9,
            claim(3, 2 + u64::from(round), Some(&format!("auth-r{round}"))),
        );
        assert_eq!(a.claim(&probe).await.unwrap(), Claimed::Now);
        let (rx, ry) = tokio::join!(a.record_reply(&probe, &x), b.record_reply(&probe, &y));
        let (rx, ry) = (rx.unwrap(), ry.unwrap());
        assert!(rx != ry, "round {round}: exactly one recorded ({rx}, {ry})");
        let kept = if rx { x } else { y };
        assert_eq!(
            b.reply(&probe).await.unwrap().as_deref(),
            Some(&kept[..]),
            "round {round}"
        );
    }
}

/// The schema of the previous version (reservations, no replies), as its `PG_SCHEMA` was.
const SCHEMA_WITHOUT_REPLIES: &str = r"
CREATE TABLE IF NOT EXISTS surelink_claims (
    channel_id bytea       NOT NULL,
    message_id bigint      NOT NULL,
    idem_key   bytea,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    claimant   bigint      NOT NULL DEFAULT 0,
    client     bytea       NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea,
    digest     bytea,
    epoch      bigint      NOT NULL DEFAULT 0,
    lease_until timestamptz,
    PRIMARY KEY (channel_id, message_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS surelink_claims_client_key
    ON surelink_claims (client, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS surelink_claims_claimed_at ON surelink_claims (claimed_at);
CREATE TABLE IF NOT EXISTS surelink_claims_channels (
    channel_id bytea       PRIMARY KEY,
    owner      bytea       NOT NULL,
    bound_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS surelink_claims_bound_at ON surelink_claims_channels (bound_at);
";

/// A table of the previous version (no `reply`) is refused without `create_schema` and
/// migrated in place with it: its rows are settled claims without a reply, and their own
/// claimant may record one (epoch 0 names any epoch; the old rows' is 0); a live reservation
/// of the old version stays one. Connecting again, or running `PG_SCHEMA` by hand, changes
/// nothing and keeps the reply.
#[tokio::test]
async fn a_table_without_replies_is_migrated() {
    let Some(url) = fresh_database("migrate_replies").await else {
        return;
    };
    let db = direct(&url).await;
    db.batch_execute(SCHEMA_WITHOUT_REPLIES).await.unwrap();
    db.batch_execute(
        "INSERT INTO surelink_claims (channel_id, message_id, idem_key, claimant)
             VALUES ('\\x01010101010101010101010101010101', 5, 'old-5', 7);
         INSERT INTO surelink_claims (channel_id, message_id, idem_key, claimant, epoch,
                                      lease_until)
             VALUES ('\\x02020202020202020202020202020202', 1, 'old-6', 7, 1,
                     now() + interval '1 hour');",
    )
    .await
    .unwrap();
    let store = refused_then_migrated(&url).await;
    let old = by(7, claim(1, 5, Some("old-5")));
    assert_eq!(store.reply(&old).await.unwrap(), None);
    assert!(
        !store
            .record_reply(
                &Claim {
                    epoch: 1,
                    ..old.clone()
                },
                b"approved"
            )
            .await
            .unwrap(),
        "an old claim's epoch is 0"
    );
    assert!(!store
        .record_reply(&by(8, claim(1, 5, Some("old-5"))), b"approved")
        .await
        .unwrap());
    assert!(store.record_reply(&old, b"approved").await.unwrap());
    let reserved = Claim {
        epoch: 1,
        ..by(7, claim(2, 1, Some("old-6")))
    };
    assert!(
        !store.record_reply(&reserved, b"approved").await.unwrap(),
        "a reservation of the old version: not settled"
    );
    assert_eq!(
        store.settle(&reserved).await.unwrap(),
        Settled::Now { late: false }
    );
    assert!(store.record_reply(&reserved, b"declined").await.unwrap());
    PgStore::connect(&url, DAY).await.unwrap();
    db.batch_execute(surelink::store::PG_SCHEMA).await.unwrap();
    assert_eq!(
        store
            .reply(&by(9, claim(3, 3, Some("old-5"))))
            .await
            .unwrap()
            .as_deref(),
        Some(&b"approved"[..])
    );
    assert_eq!(
        store
            .reply(&by(9, claim(3, 4, Some("old-6"))))
            .await
            .unwrap()
            .as_deref(),
        Some(&b"declined"[..])
    );
    let claims: i64 = db
        .query_one("SELECT count(*) FROM surelink_claims", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(claims, 2);
}
