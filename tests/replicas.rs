//! Replicas sharing a claims store (issue 7), on the simulator: one replica dies and another
//! takes over its address (as behind a virtual IP). The client's Hello tells the newcomer
//! which ids already have outcomes; it answers that it judges the rest by the shared store,
//! so the client re-sends its unacked messages with their ids, and the store recognises the
//! ones the dead replica delivered.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_once, collect, replicas, send_paced};
use surelink::channel::{Channel, Config, Listener, Messages, SendError};
use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig, SimNetwork, SERVER_NAME};
use surelink::store::{Claim, Claimed, DedupeStore, MemoryStore, Reserved, Settled, StoreFuture};

fn lossy(p: f64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(p),
        ..LinkConfig::default()
    }
}

fn pair(seed: u64) -> Pair {
    Pair::new(PairConfig {
        seed,
        client_to_server: lossy(0.05),
        server_to_client: lossy(0.05),
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        // A dead replica is noticed after 1 s of silence.
        idle_timeout: Duration::from_secs(1),
        keep_alive: Some(Duration::from_millis(300)),
        ..PairConfig::default()
    })
    .unwrap()
}

fn with_store(store: Arc<dyn DedupeStore>) -> Config {
    let mut config = Config::default();
    config.store = Some(store);
    config
}

async fn connect(pair: &Pair) -> (Channel, Messages) {
    Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        Config::default(),
    )
    .await
    .unwrap()
}

/// Replica A serves the client until it dies at 1 s; replica B takes its address at 1.5 s.
/// Both claim in `store` (A through `a_store`, which may interfere). 600 payments at 200/s.
struct Takeover {
    outcomes: Vec<(u32, Result<surelink::channel::Receipt, SendError>)>,
    by_a: BTreeMap<u32, u32>,
    by_b: BTreeMap<u32, u32>,
    client: Channel,
    b_stats: surelink::channel::ChannelStats,
}

/// [`run_takeover`], failing rather than hanging if B never gets the channel.
async fn takeover(pair: &Pair, a_store: Arc<dyn DedupeStore>, store: Arc<MemoryStore>) -> Takeover {
    tokio::time::timeout(Duration::from_secs(60), run_takeover(pair, a_store, store))
        .await
        .expect("the takeover finished within a minute")
}

async fn run_takeover(
    pair: &Pair,
    a_store: Arc<dyn DedupeStore>,
    store: Arc<MemoryStore>,
) -> Takeover {
    let net = pair.net.clone().unwrap();
    let mut a = Listener::new(pair.server.clone(), with_store(a_store));
    let (client, _client_messages) = connect(pair).await;
    let (_a_channel, a_messages) = a.accept().await.unwrap();
    let by_a = collect(a_messages, Duration::from_secs(5));
    let sender = {
        let client = client.clone();
        tokio::spawn(async move { send_paced(&client, 0..600, Duration::from_millis(5)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(net.crash(pair.server_addr), "replica A was bound");
    drop(a);
    // The path from the address to the client is as it was (whatever A's store did to it).
    let client_addr = pair.client.local_addr().unwrap();
    net.set_link(pair.server_addr, client_addr, lossy(0.05));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let endpoint =
        Pair::server_endpoint(&net, pair.server_addr, pair.server_config.clone()).unwrap();
    let mut b = Listener::new(endpoint, with_store(store));
    let (b_channel, b_messages) = b.accept().await.unwrap();
    let by_b = collect(b_messages, Duration::from_secs(5));
    let outcomes = sender.await.unwrap();
    Takeover {
        outcomes,
        by_a: by_a.await.unwrap(),
        by_b: by_b.await.unwrap(),
        client,
        b_stats: b_channel.stats(),
    }
}

/// Every payment acked exactly once across the replicas, every outcome a receipt.
fn check(t: &Takeover) {
    assert_once(&t.by_a);
    assert_once(&t.by_b);
    let twice: Vec<&u32> = t.by_a.keys().filter(|i| t.by_b.contains_key(i)).collect();
    assert!(twice.is_empty(), "delivered by both replicas: {twice:?}");
    for (i, r) in &t.outcomes {
        assert!(r.is_ok(), "payment {i}: {r:?}");
        assert!(
            t.by_a.contains_key(i) || t.by_b.contains_key(i),
            "payment {i} acked, not delivered"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_taking_over_with_the_shared_store_acks_everything_and_delivers_once() {
    let store = Arc::new(MemoryStore::default());
    let t = takeover(&pair(31), store.clone(), store.clone()).await;
    let s = t.client.stats();
    eprintln!(
        "delivered by A {}, by B {}; claims {}; client reconnects {}",
        t.by_a.len(),
        t.by_b.len(),
        store.len(),
        s.reconnects
    );
    check(&t);
    assert_eq!(
        t.by_a.len() + t.by_b.len(),
        600,
        "nothing lost across the takeover"
    );
    assert_eq!(store.len(), 600, "one claim per payment");
    assert!(!t.by_b.is_empty(), "B carried on");
    assert_eq!(s.reconnects, 1);
}

/// A store through which replica A claims: from payment `victim`'s claim on, every packet
/// from A to the client is lost (so A delivers and acks, but the ack never arrives).
#[derive(Debug)]
struct AcksLostAfter {
    inner: Arc<MemoryStore>,
    victim: u64,
    net: SimNetwork,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    claimed_victim: std::sync::atomic::AtomicBool,
}

impl AcksLostAfter {
    /// From the victim's claim (one-phase, or the settle of its reservation) on, A's packets
    /// to the client are lost.
    fn trip(&self, claim: &Claim) {
        if claim.message == self.victim {
            self.net.set_link(
                self.from,
                self.to,
                LinkConfig {
                    loss: Loss::Bernoulli(1.0),
                    ..lossy(0.0)
                },
            );
            self.claimed_victim
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl DedupeStore for AcksLostAfter {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        self.trip(claim);
        self.inner.claim(claim)
    }
    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
        self.inner.reserve(claim, lease)
    }
    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
        self.trip(claim);
        self.inner.settle(claim)
    }
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        self.inner.lookup(claim)
    }
    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
        self.inner.bind_channel(channel, owner)
    }
    fn expire(&self) -> StoreFuture<'_, u64> {
        self.inner.expire()
    }
    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_dies_after_claiming_but_before_its_ack_arrives_costs_no_second_delivery() {
    // Message 150 (sent at 0.75 s) is claimed and delivered by A, whose acks from then on are
    // all lost; A dies at 1 s. The client re-sends it (and everything after it) to B, whose
    // claim finds it claimed: B acks without delivering.
    let pair = pair(32);
    let store = Arc::new(MemoryStore::default());
    let a_store = Arc::new(AcksLostAfter {
        inner: store.clone(),
        victim: 150,
        net: pair.net.clone().unwrap(),
        from: pair.server_addr,
        to: pair.client.local_addr().unwrap(),
        claimed_victim: Default::default(),
    });
    let t = takeover(&pair, a_store.clone(), store.clone()).await;
    assert!(a_store
        .claimed_victim
        .load(std::sync::atomic::Ordering::SeqCst));
    eprintln!(
        "delivered by A {} (up to {:?}), by B {}; claims {}",
        t.by_a.len(),
        t.by_a.keys().last(),
        t.by_b.len(),
        store.len()
    );
    check(&t);
    assert!(t.by_a.contains_key(&150), "A delivered the victim");
    assert!(!t.by_b.contains_key(&150), "B did not deliver it again");
    // Every payment A delivered after the acks stopped came back to B, which found it claimed.
    let unacked_at_a = t.by_a.keys().filter(|&&i| i >= 150).count() as u64;
    assert!(
        t.b_stats.receiver.claimed_before >= unacked_at_a,
        "{unacked_at_a} re-sent, {:?}",
        t.b_stats.receiver
    );
    assert_eq!(t.by_a.len() + t.by_b.len(), 600);
}

#[tokio::test(start_paused = true)]
async fn without_a_store_the_takeover_fails_unacked_messages_instead() {
    // The same takeover with the default config: the newcomer answers that the channel is
    // new, so the client fails what was in flight rather than risk a second delivery.
    let pair = pair(33);
    let net = pair.net.clone().unwrap();
    let mut a = Listener::new(pair.server.clone(), Config::default());
    let (client, _m) = connect(&pair).await;
    let (_a_channel, a_messages) = a.accept().await.unwrap();
    let by_a = collect(a_messages, Duration::from_secs(5));
    let sender = {
        let client = client.clone();
        tokio::spawn(async move { send_paced(&client, 0..300, Duration::from_millis(5)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    net.crash(pair.server_addr);
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let endpoint =
        Pair::server_endpoint(&net, pair.server_addr, pair.server_config.clone()).unwrap();
    let _b = Listener::new(endpoint, Config::default());
    let outcomes = sender.await.unwrap();
    let by_a = by_a.await.unwrap();
    let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count();
    assert!(
        failed > 0,
        "in-flight messages failed with a definite error"
    );
    for (i, r) in &outcomes {
        if r.is_ok() && *i < 150 {
            assert!(by_a.contains_key(i), "payment {i} acked, not delivered");
        }
    }
}

/// Listeners with `store` on each replica endpoint, and one task per replica that gathers
/// what its channels deliver (a replica may see the channel more than once: as the standby,
/// after failovers) until `idle` passes without a new channel or message.
fn serve(
    endpoints: Vec<(std::net::SocketAddr, quinn::Endpoint)>,
    store: &Arc<MemoryStore>,
    idle: Duration,
) -> (
    Vec<std::net::SocketAddr>,
    Vec<tokio::task::JoinHandle<BTreeMap<u32, u32>>>,
) {
    let mut addrs = Vec::new();
    let mut collectors = Vec::new();
    for (addr, endpoint) in endpoints {
        addrs.push(addr);
        let mut listener = Listener::new(endpoint, with_store(store.clone()));
        collectors.push(tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Ok(Some((_c, m))) = tokio::time::timeout(idle, listener.accept()).await {
                tasks.push(collect(m, idle));
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
    (addrs, collectors)
}

/// A client of the replicas at `addrs` ([`Channel::connect_replicas`]) sending `n` payments,
/// one every `every_ms`, in a task whose result is their outcomes.
async fn start_client(
    pair: &Pair,
    addrs: &[std::net::SocketAddr],
    config: Config,
    n: u32,
    every_ms: u64,
) -> (
    Channel,
    Messages,
    tokio::task::JoinHandle<Vec<(u32, Result<surelink::channel::Receipt, SendError>)>>,
) {
    let (client, messages) =
        Channel::connect_replicas(&pair.client, addrs, SERVER_NAME, None, config)
            .await
            .unwrap();
    let sender = {
        let client = client.clone();
        tokio::spawn(
            async move { send_paced(&client, 0..n, Duration::from_millis(every_ms)).await },
        )
    };
    (client, messages, sender)
}

/// Each replica's deliveries, and all of them together, checked: none delivered twice.
async fn gather(
    collectors: Vec<tokio::task::JoinHandle<BTreeMap<u32, u32>>>,
) -> (Vec<BTreeMap<u32, u32>>, BTreeMap<u32, u32>) {
    let mut by = Vec::new();
    let mut total = BTreeMap::new();
    for c in collectors {
        let b = c.await.unwrap();
        for (i, n) in &b {
            *total.entry(*i).or_insert(0u32) += n;
        }
        by.push(b);
    }
    assert_once(&total);
    (by, total)
}

#[tokio::test(start_paused = true)]
async fn a_client_of_three_replicas_fails_over_when_its_replica_dies() {
    // Three replicas share one store; the client prefers the first. It dies at 1 s and never
    // comes back: the client moves to the second with its unacked messages.
    let pair = pair(34);
    let net = pair.net.clone().unwrap();
    let store = Arc::new(MemoryStore::default());
    let (addrs, collectors) = serve(
        replicas(&pair, 3, &lossy(0.05)),
        &store,
        Duration::from_secs(5),
    );
    let (client, _m, sender) = start_client(&pair, &addrs, Config::default(), 600, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(net.crash(addrs[0]));
    let outcomes = sender.await.unwrap();
    // Counters as the sends ended: afterwards the servers' collectors stop, their channels
    // say goodbye and the client moves again.
    let s = client.stats();
    let (by, all) = gather(collectors).await;
    eprintln!(
        "delivered by replica {:?}; failovers {}, reconnects {}; claims {}",
        by.iter().map(BTreeMap::len).collect::<Vec<_>>(),
        s.failovers,
        s.reconnects,
        store.len()
    );
    for (i, r) in &outcomes {
        assert!(r.is_ok(), "payment {i}: {r:?}");
    }
    assert_eq!(all.len(), 600);
    assert_eq!((s.failovers, s.reconnects, s.standby_failovers), (1, 1, 1));
    assert!(!by[1].is_empty(), "the second replica took over");
    assert!(by[2].is_empty(), "the third was not needed");
}

#[tokio::test(start_paused = true)]
async fn a_silent_replica_is_given_up_after_failover_after_not_the_idle_timeout() {
    // The connection's idle timeout is 30 s; the replica dies without a word at 1 s. The
    // channel hears nothing while payments wait and fails over after `failover_after` (1 s),
    // well inside the payments' 5 s deadline.
    let pair = Pair::new(PairConfig {
        seed: 35,
        client_to_server: lossy(0.05),
        server_to_client: lossy(0.05),
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(30),
        keep_alive: Some(Duration::from_secs(1)),
        ..PairConfig::default()
    })
    .unwrap();
    let net = pair.net.clone().unwrap();
    let store = Arc::new(MemoryStore::default());
    let mut addrs = Vec::new();
    let mut listeners = Vec::new();
    for (addr, endpoint) in replicas(&pair, 2, &lossy(0.05)) {
        addrs.push(addr);
        let mut listener = Listener::new(endpoint, with_store(store.clone()));
        // The replica's application takes what arrives (a message is acked once taken).
        listeners.push(tokio::spawn(async move {
            while let Some((_channel, mut messages)) = listener.accept().await {
                tokio::spawn(async move { while messages.recv().await.is_some() {} });
            }
        }));
    }
    let (client, _m, sender) = start_client(&pair, &addrs, Config::default(), 600, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(net.crash(addrs[0]));
    let outcomes = sender.await.unwrap();
    let slowest = outcomes
        .iter()
        .map(|(i, r)| match r {
            Ok(receipt) => receipt.latency,
            Err(e) => panic!("payment {i}: {e}"),
        })
        .max()
        .unwrap();
    let s = client.stats();
    eprintln!(
        "failovers {}, slowest ack {slowest:?}, claims {}",
        s.failovers,
        store.len()
    );
    assert_eq!(s.failovers, 1);
    assert_eq!(s.standby_failovers, 1, "the warm standby took over");
    assert_eq!(store.len(), 600);
    for l in listeners {
        l.abort();
    }
}

/// One run of 600 payments over two replicas sharing a store, the primary's path degraded to
/// 30% loss each way from 1 s on; hedges go where `hedge_to` says. Returns the latencies and
/// the client's stats, after checking every payment was acked and delivered once.
async fn degraded_primary(
    hedge_to: surelink::proto::HedgeTo,
    seed: u64,
) -> (Vec<Duration>, surelink::channel::ChannelStats) {
    let pair = pair(seed);
    let net = pair.net.clone().unwrap();
    let client_addr = pair.client.local_addr().unwrap();
    let store = Arc::new(MemoryStore::default());
    let (addrs, collectors) = serve(
        replicas(&pair, 2, &lossy(0.05)),
        &store,
        Duration::from_secs(10),
    );
    let mut config = Config::default();
    config.sender.hedge_to = hedge_to;
    // Stay on the degraded primary: this compares hedging, not moving.
    config.switch_ratio = 0.0;
    let (client, _m, sender) = start_client(&pair, &addrs, config, 600, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    net.set_link(client_addr, addrs[0], lossy(0.3));
    net.set_link(addrs[0], client_addr, lossy(0.3));
    let outcomes = sender.await.unwrap();
    // Counters as the sends ended: afterwards the servers' collectors stop, their channels
    // say goodbye and the client moves again.
    let stats = client.stats();
    let (_, total) = gather(collectors).await;
    let mut latencies = Vec::new();
    for (i, r) in outcomes {
        let receipt = r.unwrap_or_else(|e| panic!("payment {i}: {e}"));
        assert!(total.contains_key(&i), "payment {i} acked, not delivered");
        latencies.push(receipt.latency);
    }
    assert_eq!(store.len(), 600);
    latencies.sort();
    (latencies, stats)
}

#[tokio::test(start_paused = true)]
async fn hedges_to_a_secondary_replica_are_delivered_once() {
    // Same semantics whichever way hedges go; the copies to the secondary are counted. The
    // tail is printed for comparison (`-- --nocapture`), not asserted: speed is measured, not
    // tested.
    use surelink::proto::HedgeTo;
    for (hedge_to, seed) in [
        (HedgeTo::Same, 36),
        (HedgeTo::Both, 36),
        (HedgeTo::Other, 36),
    ] {
        let (l, s) = degraded_primary(hedge_to, seed).await;
        let q = |p: f64| l[((p * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1];
        eprintln!(
            "{hedge_to:?}: p50 {:?} p99 {:?} max {:?}; hedges {} (to the secondary {}, {} \
             shards), failovers {}, switches {}",
            q(0.5),
            q(0.99),
            q(1.0),
            s.sender.hedges_fired,
            s.sender.hedges_to_secondary,
            s.sender.secondary_shards,
            s.failovers,
            s.switches
        );
        if hedge_to == HedgeTo::Same {
            assert_eq!(s.sender.hedges_to_secondary, 0);
        } else {
            assert!(
                s.sender.hedges_to_secondary > 0,
                "{hedge_to:?}: copies sent"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_recovered_replica_rejoins_as_the_standby() {
    // The preferred replica A is unreachable for the first 3 s: the client starts on B with
    // C as its standby. A comes back; within a few upgrade rounds it replaces C as the
    // standby, so when B dies at 12 s the channel moves to A.
    let pair = Pair::new(PairConfig {
        seed: 37,
        client_to_server: LinkConfig {
            blackouts: vec![Duration::ZERO..Duration::from_secs(3)],
            ..lossy(0.05)
        },
        server_to_client: lossy(0.05),
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        idle_timeout: Duration::from_secs(1),
        keep_alive: Some(Duration::from_millis(300)),
        ..PairConfig::default()
    })
    .unwrap();
    let net = pair.net.clone().unwrap();
    let store = Arc::new(MemoryStore::default());
    let (addrs, collectors) = serve(
        replicas(&pair, 3, &lossy(0.05)),
        &store,
        Duration::from_secs(20),
    );
    let (client, _m, sender) = start_client(&pair, &addrs, Config::default(), 1500, 10).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(client.stats().standby_ready);
    assert!(net.crash(addrs[1]), "B was up");
    let outcomes = sender.await.unwrap();
    // Counters as the sends ended: afterwards the servers' collectors stop, their channels
    // say goodbye and the client moves again.
    let s = client.stats();
    let (by, total) = gather(collectors).await;
    eprintln!(
        "delivered by A, B, C: {:?}; failovers {} ({} to the standby)",
        by.iter().map(BTreeMap::len).collect::<Vec<_>>(),
        s.failovers,
        s.standby_failovers
    );
    for (i, r) in &outcomes {
        assert!(r.is_ok(), "payment {i}: {r:?}");
    }
    assert_eq!(total.len(), 1500);
    assert_eq!((s.failovers, s.standby_failovers), (1, 1));
    assert!(!by[0].is_empty(), "A took over from B");
    assert!(
        by[2].is_empty(),
        "C, the first standby, was replaced before it was needed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_channel_moves_to_a_much_better_replica() {
    // Two replicas sharing a store. From 2 s on the primary's path turns bad (30% loss and
    // 150 ms each way); the standby's stays at 20 ms and 5%. The channel scores both, moves
    // to the standby once it has measured several times better, and carries on: every
    // payment acked and delivered once.
    let pair = pair(38);
    let net = pair.net.clone().unwrap();
    let client_addr = pair.client.local_addr().unwrap();
    let store = Arc::new(MemoryStore::default());
    let (addrs, collectors) = serve(
        replicas(&pair, 2, &lossy(0.05)),
        &store,
        Duration::from_secs(15),
    );
    let (client, _m, sender) = start_client(&pair, &addrs, Config::default(), 1000, 10).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bad = LinkConfig {
        delay: Duration::from_millis(150),
        ..lossy(0.3)
    };
    net.set_link(client_addr, addrs[0], bad.clone());
    net.set_link(addrs[0], client_addr, bad);
    let outcomes = sender.await.unwrap();
    // Counters as the sends ended: afterwards the servers' collectors stop, their channels
    // say goodbye and the client moves again.
    let s = client.stats();
    let (by, total) = gather(collectors).await;
    eprintln!(
        "delivered by A, B: {:?}; switches {}, failovers {}; scores {:?}",
        by.iter().map(BTreeMap::len).collect::<Vec<_>>(),
        s.switches,
        s.failovers,
        s.replica_scores
    );
    for (i, r) in &outcomes {
        assert!(r.is_ok(), "payment {i}: {r:?}");
    }
    assert_eq!(total.len(), 1000);
    assert_eq!((s.switches, s.failovers), (1, 0));
    assert!(
        by[1].len() > 500,
        "most payments after the switch went to B"
    );
}

#[tokio::test]
async fn the_memory_store_has_the_claim_semantics() {
    common::check_claim_semantics(&MemoryStore::default()).await;
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_has_the_reservation_semantics() {
    common::check_reservation_semantics(&MemoryStore::default(), Duration::from_secs(2)).await;
}

#[tokio::test(start_paused = true)]
async fn the_memory_store_keeps_replies() {
    common::check_reply_semantics(&MemoryStore::default()).await;
}

/// A store whose first claim of each message hangs forever (no error, no answer); later
/// claims go through.
#[derive(Debug, Default)]
struct HangsOnce {
    inner: MemoryStore,
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
}

impl DedupeStore for HangsOnce {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        if self.seen.lock().unwrap().insert(claim.message) {
            return Box::pin(std::future::pending());
        }
        self.inner.claim(claim)
    }
    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
        // The first store call of each message hangs, a reservation as much as a claim.
        if self.seen.lock().unwrap().insert(claim.message) {
            return Box::pin(std::future::pending());
        }
        self.inner.reserve(claim, lease)
    }
    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
        self.inner.settle(claim)
    }
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        self.inner.lookup(claim)
    }
    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
        self.inner.bind_channel(channel, owner)
    }
    fn expire(&self) -> StoreFuture<'_, u64> {
        self.inner.expire()
    }
    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }
}

/// Issue case 3: a claim that hangs (no error, no answer) is bounded by
/// `claim_attempt_timeout` and retried: the message is claimed, delivered once and acked
/// within its deadline (on main it stayed pending and its sender timed out).
#[tokio::test(start_paused = true)]
async fn a_hung_claim_times_out_and_is_retried() {
    let pair = pair(41);
    let mut listener = Listener::new(
        pair.server.clone(),
        with_store(Arc::new(HangsOnce::default())),
    );
    let (client, _client_messages) = connect(&pair).await;
    let (_server, messages) = listener.accept().await.unwrap();
    let delivered = collect(messages, Duration::from_secs(3));
    // Claims run at most the hand-off's room (4) at a time, so with every first attempt
    // hanging for its 1 s timeout 12 payments take about three rounds, within their 5 s.
    let outcomes = send_paced(&client, 0..12, Duration::from_millis(10)).await;
    for (i, r) in &outcomes {
        assert!(r.is_ok(), "payment {i}: {r:?}");
    }
    let delivered = delivered.await.unwrap();
    assert_once(&delivered);
    assert_eq!(delivered.len(), 12);
}

/// Issue case 13c: hedge copies go to a standby only when the primary judges by the shared
/// claims store too. Here the preferred replica has no store (it answers that the channel
/// is new) and the standby has one: a copy delivered there would be a second delivery, so
/// none is sent, whatever `hedge_to` says.
#[tokio::test(start_paused = true)]
async fn no_hedge_copies_to_a_standby_when_the_primary_does_not_claim() {
    let pair = pair(37);
    let net = pair.net.clone().unwrap();
    let client_addr = pair.client.local_addr().unwrap();
    let endpoints = replicas(&pair, 2, &lossy(0.05));
    let store = Arc::new(MemoryStore::default());
    let mut collectors = Vec::new();
    let mut addrs = Vec::new();
    for (i, (addr, endpoint)) in endpoints.into_iter().enumerate() {
        addrs.push(addr);
        let config = if i == 0 {
            Config::default()
        } else {
            with_store(store.clone())
        };
        let mut listener = Listener::new(endpoint, config);
        collectors.push(tokio::spawn(async move {
            let mut tasks = Vec::new();
            let idle = Duration::from_secs(10);
            while let Ok(Some((_c, m))) = tokio::time::timeout(idle, listener.accept()).await {
                tasks.push(collect(m, idle));
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
    let mut config = Config::default();
    config.sender.hedge_to = surelink::proto::HedgeTo::Other;
    config.switch_ratio = 0.0;
    let (client, _m, sender) = start_client(&pair, &addrs, config, 300, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.stats().standby_ready, "the standby is up");
    net.set_link(client_addr, addrs[0], lossy(0.3));
    net.set_link(addrs[0], client_addr, lossy(0.3));
    let outcomes = sender.await.unwrap();
    let s = client.stats();
    let (_, total) = gather(collectors).await;
    assert!(s.sender.hedges_fired > 0, "the lossy primary needed hedges");
    assert_eq!(s.sender.hedges_to_secondary, 0, "no copy to the standby");
    for (i, r) in &outcomes {
        if r.is_ok() {
            assert!(total.contains_key(i), "payment {i} acked, not delivered");
        }
    }
}

/// Issue 21 cases 6, 7 and 8 in the memory store: keys per client, conflicts by payload
/// digest, channel owners.
#[tokio::test]
async fn the_memory_store_scopes_keys_checks_payloads_and_binds_channels() {
    common::check_clients_digests_and_owners(&MemoryStore::default()).await;
}

/// Two replicas sharing `store` at `pair`'s address and a second one, each with a listener
/// whose channels' messages are counted by payload; their addresses, and per replica a task
/// with what was delivered (payload → count) once `idle` passed without anything new.
fn two_replicas(
    pair: &Pair,
    store: Arc<dyn DedupeStore>,
    idle: Duration,
) -> (
    [std::net::SocketAddr; 2],
    Vec<tokio::task::JoinHandle<BTreeMap<bytes::Bytes, u32>>>,
) {
    let endpoints = replicas(pair, 2, &lossy(0.0));
    let addrs = [endpoints[0].0, endpoints[1].0];
    let mut collectors = Vec::new();
    for (_, endpoint) in endpoints {
        let mut listener = Listener::new(endpoint, with_store(store.clone()));
        collectors.push(tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Ok(Some((_c, mut m))) = tokio::time::timeout(idle, listener.accept()).await {
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(Some(d)) = tokio::time::timeout(idle, m.recv()).await {
                        got.push(d.payload);
                    }
                    got
                }));
            }
            let mut all = BTreeMap::new();
            for t in tasks {
                for p in t.await.unwrap() {
                    *all.entry(p).or_insert(0u32) += 1;
                }
            }
            all
        }));
    }
    (addrs, collectors)
}

/// A channel to the replica at `addr` alone.
async fn connect_to(pair: &Pair, addr: std::net::SocketAddr) -> Channel {
    Channel::connect(&pair.client, addr, SERVER_NAME, None, Config::default())
        .await
        .unwrap()
        .0
}

/// Issue 21 case 8 across replicas: a key delivered by one replica and sent again with
/// another payload to the other (a retry that changed the amount, or a key reused by
/// mistake) is refused there with `KeyReused`, and not delivered; with the same payload it is
/// acked as a replay without a second delivery. Before, the store knew only that the key
/// was claimed: the changed payment was acked as "claimed before" and never delivered.
#[tokio::test(start_paused = true)]
async fn a_key_reused_with_another_payload_on_another_replica_is_refused() {
    let pair = pair(51);
    let store = Arc::new(MemoryStore::default());
    let (addrs, collectors) = two_replicas(&pair, store.clone(), Duration::from_secs(3));
    let first = connect_to(&pair, addrs[0]).await;
    let receipt = first
        .send_with_key("order-42", "pay 10.00 EUR")
        .await
        .unwrap();
    assert!(!receipt.replayed);
    // The application restarts, and comes back on a new channel to the other replica.
    let second = connect_to(&pair, addrs[1]).await;
    match second.send_with_key("order-42", "pay 999.00 EUR").await {
        Err(SendError::KeyReused { .. }) => {}
        other => panic!("expected KeyReused, got {other:?}"),
    }
    let replay = second
        .send_with_key("order-42", "pay 10.00 EUR")
        .await
        .expect("the same payment again is acked");
    assert!(replay.replayed, "and said to be a replay");
    first.close().await;
    second.close().await;
    let mut collectors = collectors.into_iter();
    let a = collectors.next().unwrap().await.unwrap();
    let b = collectors.next().unwrap().await.unwrap();
    assert_eq!(
        a.into_iter().collect::<Vec<_>>(),
        vec![(bytes::Bytes::from("pay 10.00 EUR"), 1)]
    );
    assert!(
        b.is_empty(),
        "nothing delivered by the second replica: {b:?}"
    );
    assert_eq!(store.len(), 1, "the refused claim recorded nothing");
}

/// A store whose first `failures` channel bindings fail.
#[derive(Debug)]
struct BindFails {
    inner: MemoryStore,
    failures: std::sync::atomic::AtomicU32,
}

impl DedupeStore for BindFails {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        self.inner.claim(claim)
    }
    fn reserve<'a>(&'a self, claim: &'a Claim, lease: Duration) -> StoreFuture<'a, Reserved> {
        self.inner.reserve(claim, lease)
    }
    fn settle<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Settled> {
        self.inner.settle(claim)
    }
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        self.inner.lookup(claim)
    }
    fn bind_channel(&self, channel: [u8; 16], owner: [u8; 32]) -> StoreFuture<'_, bool> {
        use std::sync::atomic::Ordering;
        if self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Box::pin(std::future::ready(Err(surelink::store::StoreError::Full {
                max: 0,
            })));
        }
        self.inner.bind_channel(channel, owner)
    }
    fn expire(&self) -> StoreFuture<'_, u64> {
        self.inner.expire()
    }
    fn ttl(&self) -> Duration {
        self.inner.ttl()
    }
}

/// Issue 21 case 7: a server with a store takes a channel over only once the store bound it
/// to its client. When the store cannot answer, the connection is closed with GOODBYE (the
/// client may retry, here or elsewhere) and no channel opens; the next attempt, with the
/// store back, gets the channel.
#[tokio::test(start_paused = true)]
async fn without_the_stores_answer_no_channel_is_taken_over() {
    let pair = pair(52);
    let store = Arc::new(BindFails {
        inner: MemoryStore::default(),
        failures: 1.into(),
    });
    let server = surelink::channel::Server::new(with_store(store.clone()));
    let accept = |server: surelink::channel::Server, endpoint: quinn::Endpoint| async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        server.accept_connection(conn).await.map(|c| c.is_some())
    };
    let accepting = tokio::spawn(accept(server.clone(), pair.server.clone()));
    let refused = Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        Config::default(),
    )
    .await
    .map(|_| ())
    .unwrap_err();
    match &refused {
        surelink::channel::ConnectError::Connection(quinn::ConnectionError::ApplicationClosed(
            c,
        )) => assert_eq!(c.error_code, quinn::VarInt::from_u32(3), "GOODBYE"),
        other => panic!("expected a goodbye, got {other}"),
    }
    assert!(matches!(
        accepting.await.unwrap(),
        Err(surelink::channel::AcceptError::StoreUnavailable(_))
    ));
    assert_eq!(server.channels(), 0);
    assert_eq!(store.inner.channels_bound(), 0);
    let accepting = tokio::spawn(accept(server.clone(), pair.server.clone()));
    let (client, _m) = connect(&pair).await;
    assert!(accepting.await.unwrap().unwrap(), "a new channel");
    assert_eq!(store.inner.channels_bound(), 1);
    drop(client);
}
