//! Claims of delivered messages, shared by the replicas of a service.
//!
//! A server that delivers a message first *claims* it: the pair (channel id, message id) and,
//! when the sender attached one, the application's idempotency key. A claim succeeds once;
//! every later claim of the same pair, or of the same key under any id, is refused as
//! [`Claimed::Before`]. Replicas that share one store therefore deliver each message at most
//! once between them, and a server acks a message only after its claim is durable, so a
//! replica that crashes after acking cannot cause a second delivery elsewhere.
//!
//! Two stores: [`MemoryStore`] (the default, one process, no setup) and, with the `postgres`
//! feature, `PgStore` (a table keyed by channel id + message id and by idempotency key,
//! `INSERT … ON CONFLICT DO NOTHING`, expiry by TTL).
//!
//! **Scope of keys.** Message ids are per channel; idempotency keys are global to the store
//! (an application that retries after a restart comes back on a new channel, and its key must
//! still be recognised). Keys must therefore be unique across the application's clients
//! (a UUID, or a merchant id and order number).
//!
//! **Expiry.** A claim lives at least the store's TTL: [`DedupeStore::expire`] removes claims
//! older than that, and nothing else does. Until then a retry of the message, by id or by
//! key, is refused; after it the message could be delivered again, so the TTL must exceed
//! the longest time an application retries (payment APIs keep keys for 24 h).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "postgres")]
pub use pg::{PgStore, PG_SCHEMA};

/// What a server claims before it delivers a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Claim {
    /// The channel's id (the same on every replica: the client chooses it).
    pub channel: [u8; 16],
    /// The message id on that channel.
    pub message: u64,
    /// The application's idempotency key, if the sender attached one.
    pub key: Option<Bytes>,
}

impl Claim {
    /// The claim of a message delivered on channel `channel` (its [`Channel::id`](crate::channel::Channel::id)).
    pub fn of(channel: [u8; 16], delivered: &crate::proto::Delivered) -> Claim {
        Claim {
            channel,
            message: delivered.id,
            key: delivered.key.clone(),
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// This claim is the first: deliver the message.
    Now,
    /// The message, or its idempotency key, was claimed before (here or on another replica):
    /// it was delivered; ack it without delivering it again.
    Before,
}

/// Why a store could not answer. The message is then neither delivered nor acked: the
/// sender hedges and retries, and its deadline gives the application a definite outcome.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The in-memory store is full of unexpired claims (`MemoryStore::new`'s `max_claims`).
    #[error("dedupe store full: {max} unexpired claims")]
    Full {
        /// The limit.
        max: usize,
    },
    /// PostgreSQL refused or could not be reached.
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL dedupe store: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

/// A boxed future of a store's answer (the trait is object safe: servers hold
/// `Arc<dyn DedupeStore>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A record of claimed messages, possibly shared by several servers.
pub trait DedupeStore: Send + Sync + fmt::Debug {
    /// Claims `claim`; durable before the future completes with `Ok`. Refused
    /// ([`Claimed::Before`]) if its (channel, message) pair or its key was claimed before
    /// and has not expired.
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed>;

    /// Whether `claim`'s pair, or its key, is claimed.
    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool>;

    /// Removes claims older than the store's TTL; returns how many.
    fn expire(&self) -> StoreFuture<'_, u64>;

    /// The store's TTL: how long a claim is kept at least.
    fn ttl(&self) -> Duration;
}

/// Runs `store.expire()` every `every` on a tokio task until the handle is aborted (a
/// [`Listener`](crate::channel::Listener) with a store does this itself). A failed sweep is
/// logged and tried again at the next tick.
pub fn spawn_expiry(store: Arc<dyn DedupeStore>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match store.expire().await {
                Ok(n) if n > 0 => tracing::debug!(expired = n, "surelink: claims expired"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "surelink: expiring claims failed"),
            }
        }
    })
}

/// Claims in this process's memory: the default store for a single server. Bounded: at most
/// `max_claims` unexpired claims; past that, claims fail with [`StoreError::Full`] (the
/// message is not acked and its sender retries later) rather than forgetting a claim early,
/// which could deliver a payment twice. Time is tokio's clock, so the store follows virtual
/// time in tests.
#[derive(Debug)]
pub struct MemoryStore {
    ttl: Duration,
    max_claims: usize,
    inner: Mutex<Memory>,
}

/// (channel id, message id).
type Pair = ([u8; 16], u64);

#[derive(Debug, Default)]
struct Memory {
    pairs: HashMap<Pair, Instant>,
    keys: HashMap<Bytes, Instant>,
    /// (claimed at, pair, key) in claim order, for expiry.
    order: VecDeque<(Instant, Pair, Option<Bytes>)>,
}

impl MemoryStore {
    /// A store keeping claims for `ttl`, at most `max_claims` at once.
    pub fn new(ttl: Duration, max_claims: usize) -> MemoryStore {
        MemoryStore {
            ttl,
            max_claims: max_claims.max(1),
            inner: Mutex::default(),
        }
    }

    /// Claims held now (expired ones included until [`DedupeStore::expire`] runs).
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether no claim is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expire_now(&self, m: &mut Memory) -> u64 {
        let now = Instant::now();
        let mut removed = 0;
        while let Some((at, _, _)) = m.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            let (_, pair, key) = m.order.pop_front().expect("front exists");
            m.pairs.remove(&pair);
            if let Some(k) = key {
                m.keys.remove(&k);
            }
            removed += 1;
        }
        removed
    }
}

impl Default for MemoryStore {
    /// 24 h, at most 1,000,000 claims (about 100 MB at most with short keys).
    fn default() -> Self {
        MemoryStore::new(Duration::from_secs(24 * 3600), 1_000_000)
    }
}

impl DedupeStore for MemoryStore {
    fn claim<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let result = (|| {
            let mut m = self.lock();
            let pair = (claim.channel, claim.message);
            let known = m.pairs.contains_key(&pair)
                || claim.key.as_ref().is_some_and(|k| m.keys.contains_key(k));
            if known {
                return Ok(Claimed::Before);
            }
            if m.order.len() >= self.max_claims {
                self.expire_now(&mut m);
                if m.order.len() >= self.max_claims {
                    return Err(StoreError::Full {
                        max: self.max_claims,
                    });
                }
            }
            let now = Instant::now();
            m.pairs.insert(pair, now);
            if let Some(k) = &claim.key {
                m.keys.insert(k.clone(), now);
            }
            m.order.push_back((now, pair, claim.key.clone()));
            Ok(Claimed::Now)
        })();
        Box::pin(std::future::ready(result))
    }

    fn lookup<'a>(&'a self, claim: &'a Claim) -> StoreFuture<'a, bool> {
        let m = self.lock();
        let known = m.pairs.contains_key(&(claim.channel, claim.message))
            || claim.key.as_ref().is_some_and(|k| m.keys.contains_key(k));
        Box::pin(std::future::ready(Ok(known)))
    }

    fn expire(&self) -> StoreFuture<'_, u64> {
        let removed = self.expire_now(&mut self.lock());
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(channel: u8, message: u64, key: Option<&'static str>) -> Claim {
        Claim {
            channel: [channel; 16],
            message,
            key: key.map(|k| Bytes::from_static(k.as_bytes())),
        }
    }

    // The claim semantics themselves: `tests/common::check_claim_semantics`, run on both
    // stores (`tests/replicas.rs`, `tests/store_pg.rs`).
    #[tokio::test(start_paused = true)]
    async fn claims_expire_after_the_ttl() {
        let store = MemoryStore::new(Duration::from_secs(10), 100);
        store.claim(&claim(1, 0, None)).await.unwrap();
        store.claim(&claim(2, 0, None)).await.unwrap();
        store.claim(&claim(1, 1, Some("order-1"))).await.unwrap();
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(store.expire().await.unwrap(), 0, "within the TTL");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(store.expire().await.unwrap(), 3);
        assert!(store.is_empty());
        assert_eq!(
            store.claim(&claim(3, 9, Some("order-1"))).await.unwrap(),
            Claimed::Now,
            "expired: claimable again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_refuses_rather_than_forgets() {
        let store = MemoryStore::new(Duration::from_secs(10), 2);
        store.claim(&claim(1, 0, None)).await.unwrap();
        store.claim(&claim(1, 1, None)).await.unwrap();
        assert!(matches!(
            store.claim(&claim(1, 2, None)).await,
            Err(StoreError::Full { max: 2 })
        ));
        // Still remembered: nothing was forgotten to make room.
        assert_eq!(
            store.claim(&claim(1, 0, None)).await.unwrap(),
            Claimed::Before
        );
        // Once the oldest expire, there is room again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(store.claim(&claim(1, 2, None)).await.unwrap(), Claimed::Now);
        assert_eq!(store.len(), 1);
    }
}
