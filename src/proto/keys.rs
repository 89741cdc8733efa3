//! The idempotency-key record: which keys were delivered, which wait for the application, and
//! with which payload. One record per server (shared by its channels) or per receiver.
//!
//! # A key's lifecycle
//!
//! ```text
//!   (absent) ──judge: New──▶ Held{holder, digest} ──taken──▶ Delivered{at, digest} ──ttl──▶ (absent)
//!                              └──release (the application went away)──▶ (absent)
//! ```
//!
//! A request's key (protocol 2) is taken with the application's reply, which the key keeps
//! for its TTL: a retry of the request (same key, same payload) is answered with that reply,
//! byte for byte, on whichever channel of the server it comes.
//!
//! A receiver whose application holds a message with a held key does not stop before the
//! take or the application's end (the channel's link waits), so every held key ends in one
//! of the two.
//!
//! Invariants, kept here and nowhere else:
//! - **A key counts as delivered only once the application took its message** (`taken`).
//!   While its message waits in a hand-off queue the key is `Held`: every other message with
//!   that key, on any channel sharing the record, is neither delivered nor acked
//!   ([`KeyVerdict::Held`]); if the application never takes it the key is released and a
//!   retry is judged afresh.
//! - **A delivered key is kept exactly `ttl` after its take, never less.** At `max_keys`
//!   entries (held and delivered) a new key is refused ([`KeyVerdict::Full`]) on every path;
//!   no key is forgotten early.
//! - **A key names one payload.** The record keeps the SHA-256 of the payload the key was
//!   first delivered (or held) with: the same key with another payload is a
//!   [`KeyVerdict::Conflict`], never a replay.
//! - **Keys are scoped** by the client's identity ([`Scope`]): two clients' `order-42` are
//!   different keys. Without an identity (no mutual TLS) every client of the record shares
//!   [`ANONYMOUS`].
//!
//! - **A request's key keeps its reply.** A request and a message with the same payload have
//!   different digests ([`request_digest`]), so one is never a replay of the other. Replies
//!   kept take at most `max_reply_bytes` in all: past it a new request key is refused
//!   ([`KeyVerdict::Full`]), never a kept reply forgotten early; a request judged before it
//!   filled whose reply no longer fits is delivered without its reply kept (its retries are
//!   left unanswered: unknown, never another reply).
//!
//! Memory is bounded by `max_keys × (key length + `[`KEY_OVERHEAD_BYTES`]`)` plus
//! `max_reply_bytes`; keys and replies are copied out of their datagrams, so a kept key never
//! keeps a datagram alive.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::Digest as _;

/// Whose keys: the SHA-256 of the client's end-entity certificate under mutual TLS, or
/// [`ANONYMOUS`].
pub type Scope = [u8; 32];

/// The scope of clients without an identity (no mutual TLS): one namespace for all of them.
pub const ANONYMOUS: Scope = [0; 32];

/// SHA-256 of a message's payload, kept with its key.
pub type Digest = [u8; 32];

/// The digest a key record keeps for `payload`.
pub fn payload_digest(payload: &[u8]) -> Digest {
    sha2::Sha256::digest(payload).into()
}

/// The digest a key record keeps for a *request* with `payload` (protocol 2): SHA-256 over a
/// domain tag and the payload, so that a request never matches a message of the same bytes.
pub fn request_digest(payload: &[u8]) -> Digest {
    sha2::Sha256::new()
        .chain_update(b"surelink request\0")
        .chain_update(payload)
        .finalize()
        .into()
}

/// Replies a key record keeps at most by default, in bytes (each reply also costs its
/// length against it): 64 MiB.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 64 << 20;

/// Bytes an entry costs besides its key's bytes: the map entry (scope, digest, state) and its
/// place in the expiry queue.
pub const KEY_OVERHEAD_BYTES: usize = 192;

/// The message that holds a key while it waits for the application's take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The receiver (a token from [`KeyRecord::holder_token`]).
    pub receiver: u64,
    /// The sender's incarnation, as the receiver counts it.
    pub generation: u64,
    /// The message id.
    pub id: u64,
}

#[derive(Clone, Debug)]
enum KeyState {
    Held {
        holder: Holder,
        digest: Digest,
    },
    Delivered {
        at: Instant,
        digest: Digest,
        /// The receiver whose application took it.
        by: u64,
        /// A request's reply, kept for the key's TTL.
        reply: Option<Bytes>,
    },
}

/// What the record says about a message's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyVerdict {
    /// New: the key is now held for this message until it is taken or released.
    New,
    /// Another message with this key (and the same payload) waits for the application: this
    /// one is neither delivered nor acked now.
    Held(Holder),
    /// Delivered within the TTL with the same payload, by receiver `by`: a replay. Ack it,
    /// deliver nothing.
    Replay {
        /// The receiver ([`KeyRecord::holder_token`]) whose application took the key's
        /// message.
        by: u64,
    },
    /// The key was delivered (or is held) with another payload: refuse this message.
    Conflict,
    /// The record holds `max_keys` keys and this one is new: refuse this message.
    Full,
}

/// Idempotency keys held and delivered; see the [module docs](self).
#[derive(Debug)]
pub struct KeyRecord {
    ttl: Duration,
    max_keys: usize,
    keys: HashMap<(Scope, Bytes), KeyState>,
    /// Delivered keys in take order, for expiry: `(taken at, key)`.
    order: VecDeque<(Instant, Scope, Bytes)>,
    refused: u64,
    next_holder: u64,
    /// Bytes of the replies kept, and their limit.
    reply_bytes: usize,
    max_reply_bytes: usize,
    replies_not_kept: u64,
}

impl KeyRecord {
    /// A record keeping delivered keys for `ttl`, at most `max_keys` (at least 1) entries.
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        KeyRecord {
            ttl,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
            order: VecDeque::new(),
            refused: 0,
            next_holder: 0,
            reply_bytes: 0,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            replies_not_kept: 0,
        }
    }

    /// Keeps at most `bytes` of replies (see the module docs).
    pub fn with_max_reply_bytes(mut self, bytes: usize) -> Self {
        self.max_reply_bytes = bytes;
        self
    }

    /// A token naming one receiver among those sharing the record.
    pub fn holder_token(&mut self) -> u64 {
        self.next_holder += 1;
        self.next_holder
    }

    /// Judges a message with `key` and payload `digest`; a [`KeyVerdict::New`] key is held
    /// for `holder` from now on.
    pub fn judge(
        &mut self,
        now: Instant,
        scope: Scope,
        key: &Bytes,
        digest: Digest,
        holder: Holder,
    ) -> KeyVerdict {
        self.judge_kind(now, scope, key, digest, holder, false)
    }

    /// [`KeyRecord::judge`] for a message (`request` false) or a request, whose new key is
    /// refused ([`KeyVerdict::Full`]) also while the replies kept fill `max_reply_bytes`.
    pub fn judge_kind(
        &mut self,
        now: Instant,
        scope: Scope,
        key: &Bytes,
        digest: Digest,
        holder: Holder,
        request: bool,
    ) -> KeyVerdict {
        if let Some(v) = self.peek(now, scope, key, digest) {
            return v;
        }
        if self.keys.len() >= self.max_keys || (request && self.reply_bytes >= self.max_reply_bytes)
        {
            self.refused += 1;
            return KeyVerdict::Full;
        }
        self.keys.insert(
            (scope, Bytes::copy_from_slice(key)),
            KeyState::Held { holder, digest },
        );
        KeyVerdict::New
    }

    /// What [`KeyRecord::judge`] would answer for a key the record has (`None`: the key is
    /// not held, so a judge would hold it, or refuse it at the limit).
    pub fn peek(
        &mut self,
        now: Instant,
        scope: Scope,
        key: &Bytes,
        digest: Digest,
    ) -> Option<KeyVerdict> {
        self.expire(now);
        let state = self.keys.get(&(scope, key.clone()))?;
        Some(match *state {
            KeyState::Held { digest: d, .. } | KeyState::Delivered { digest: d, .. }
                if d != digest =>
            {
                KeyVerdict::Conflict
            }
            KeyState::Held { holder, .. } => KeyVerdict::Held(holder),
            KeyState::Delivered { by, .. } => KeyVerdict::Replay { by },
        })
    }

    /// The application took `holder`'s message: its key counts as delivered from `now`, for
    /// the TTL. No effect unless `holder` holds the key.
    pub fn taken(&mut self, now: Instant, scope: Scope, key: &Bytes, holder: Holder) {
        self.taken_with(now, scope, key, holder, None)
    }

    /// [`KeyRecord::taken`] for a request answered with `reply`, which the key keeps for its
    /// TTL (a retry of the request gets it: [`KeyRecord::reply`]).
    pub fn taken_with(
        &mut self,
        now: Instant,
        scope: Scope,
        key: &Bytes,
        holder: Holder,
        reply: Option<Bytes>,
    ) {
        let k = (scope, key.clone());
        if let Some(state) = self.keys.get_mut(&k) {
            if let KeyState::Held { holder: h, digest } = *state {
                if h == holder {
                    // Within `max_reply_bytes` only (requests judged while there was room may
                    // answer after it filled): past it the key is delivered without its
                    // reply, and a retry is left unanswered rather than memory unbounded.
                    let room = self.max_reply_bytes.saturating_sub(self.reply_bytes);
                    if reply.as_ref().is_some_and(|r| r.len() > room) {
                        self.replies_not_kept += 1;
                    }
                    // Copied out: a kept reply never keeps a larger buffer alive.
                    let reply = reply
                        .filter(|r| r.len() <= room)
                        .map(|r| Bytes::copy_from_slice(&r));
                    self.reply_bytes += reply.as_ref().map_or(0, Bytes::len);
                    *state = KeyState::Delivered {
                        at: now,
                        digest,
                        by: holder.receiver,
                        reply,
                    };
                    self.order.push_back((now, scope, k.1));
                }
            }
        }
    }

    /// Records `key` as delivered at `now` with `digest` (a claims store said it was), when
    /// the record has room; a full record is no reason to refuse here (the store holds the
    /// keys, the record only caches them).
    pub fn remember(&mut self, now: Instant, scope: Scope, key: &Bytes, digest: Digest, by: u64) {
        self.remember_with(now, scope, key, digest, by, None)
    }

    /// [`KeyRecord::remember`] with a request's `reply` (the store kept it), which also
    /// fills a cached entry that has none; within `max_reply_bytes` (a cache: past it, the
    /// reply is not kept here).
    pub fn remember_with(
        &mut self,
        now: Instant,
        scope: Scope,
        key: &Bytes,
        digest: Digest,
        by: u64,
        reply: Option<Bytes>,
    ) {
        self.expire(now);
        let k = (scope, Bytes::copy_from_slice(key));
        let room = self.max_reply_bytes.saturating_sub(self.reply_bytes);
        let reply = reply
            .filter(|r| r.len() <= room)
            .map(|r| Bytes::copy_from_slice(&r));
        if let Some(KeyState::Delivered {
            digest: d,
            reply: kept @ None,
            ..
        }) = self.keys.get_mut(&k)
        {
            if *d == digest {
                self.reply_bytes += reply.as_ref().map_or(0, Bytes::len);
                *kept = reply;
            }
            return;
        }
        if self.keys.contains_key(&k) || self.keys.len() >= self.max_keys {
            return;
        }
        self.reply_bytes += reply.as_ref().map_or(0, Bytes::len);
        self.keys.insert(
            k.clone(),
            KeyState::Delivered {
                at: now,
                digest,
                by,
                reply,
            },
        );
        self.order.push_back((now, scope, k.1));
    }

    /// `holder`'s message will never be taken (the application went away): the key is free
    /// again. No effect unless `holder` holds it.
    pub fn release(&mut self, scope: Scope, key: &Bytes, holder: Holder) {
        let k = (scope, key.clone());
        if matches!(self.keys.get(&k), Some(KeyState::Held { holder: h, .. }) if *h == holder) {
            self.keys.remove(&k);
        }
    }

    /// The reply kept with a delivered request's key (`None`: not delivered, or no reply).
    pub fn reply(&self, scope: Scope, key: &Bytes) -> Option<Bytes> {
        match self.keys.get(&(scope, key.clone()))? {
            KeyState::Delivered { reply, .. } => reply.clone(),
            KeyState::Held { .. } => None,
        }
    }

    /// Bytes of the replies kept.
    pub fn reply_bytes(&self) -> usize {
        self.reply_bytes
    }

    /// Replies not kept because `max_reply_bytes` was full when they came (their keys'
    /// retries are left unanswered).
    pub fn replies_not_kept(&self) -> u64 {
        self.replies_not_kept
    }

    /// Whether a new key would be refused now.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.keys.len() >= self.max_keys
    }

    /// Keys held or delivered.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// New keys refused because `max_keys` entries were held.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            let (at, scope, key) = self.order.pop_front().expect("checked");
            let k = (scope, key);
            // Only the delivery this entry stands for (a key released and delivered again
            // has a later entry of its own).
            if matches!(
                self.keys.get(&k),
                Some(KeyState::Delivered { at: a, .. }) if *a == at
            ) {
                if let Some(KeyState::Delivered { reply: Some(r), .. }) = self.keys.remove(&k) {
                    self.reply_bytes -= r.len();
                }
            }
        }
    }
}

/// A [`KeyRecord`] shared by the channels of one server (without a claims store): an
/// application that restarts comes back on a new channel, and its retry of key `order-42` must
/// be recognised there too. Cheap to clone: clones share the record.
#[derive(Clone, Debug)]
pub struct SharedKeys(Arc<Mutex<KeyRecord>>);

impl SharedKeys {
    /// A record keeping keys for `ttl`, at most `max_keys` at once.
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        SharedKeys(Arc::new(Mutex::new(KeyRecord::new(ttl, max_keys))))
    }

    /// A record keeping keys for `ttl`, at most `max_keys` at once, and at most
    /// `max_reply_bytes` of requests' replies.
    pub fn with_replies(ttl: Duration, max_keys: usize, max_reply_bytes: usize) -> Self {
        SharedKeys(Arc::new(Mutex::new(
            KeyRecord::new(ttl, max_keys).with_max_reply_bytes(max_reply_bytes),
        )))
    }

    /// Runs `f` on the record.
    pub fn with<T>(&self, f: impl FnOnce(&mut KeyRecord) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Keys held or delivered.
    pub fn len(&self) -> usize {
        self.with(|r| r.len())
    }

    /// Whether no key is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn holder(id: u64) -> Holder {
        Holder {
            receiver: 1,
            generation: 0,
            id,
        }
    }

    /// At `max_keys` a new key is refused, never an old one forgotten early; a key is kept
    /// exactly `ttl` after its take.
    #[test]
    fn keys_are_kept_ttl_after_their_take_and_never_forgotten_early() {
        let t0 = Instant::now();
        let s = ANONYMOUS;
        let d = payload_digest(b"pay");
        let mut r = KeyRecord::new(Duration::from_secs(10), 3);
        assert_eq!(r.judge(t0, s, &key("a"), d, holder(1)), KeyVerdict::New);
        r.taken(t0 + Duration::from_secs(5), s, &key("a"), holder(1));
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(
            r.peek(at(14), s, &key("a"), d),
            Some(KeyVerdict::Replay { by: 1 })
        );
        assert_eq!(
            r.peek(at(15), s, &key("a"), d),
            None,
            "expired 10 s after the take"
        );
        for (i, k) in ["b", "c", "d"].into_iter().enumerate() {
            assert_eq!(
                r.judge(at(15), s, &Bytes::from(k), d, holder(i as u64)),
                KeyVerdict::New
            );
        }
        assert_eq!(
            r.judge(at(16), s, &key("e"), d, holder(9)),
            KeyVerdict::Full
        );
        assert_eq!(r.refused(), 1);
        // Held keys never expire: they wait for their take or release.
        assert_eq!(
            r.judge(at(100), s, &key("b"), d, holder(7)),
            KeyVerdict::Held(holder(0))
        );
        r.release(s, &key("b"), holder(0));
        assert_eq!(
            r.judge(at(100), s, &key("e"), d, holder(9)),
            KeyVerdict::New
        );
    }

    /// Issue 21 cases 1, 6, 8: a held key answers Held to every other message (whatever its
    /// holder), a taken key Replay for the same payload and Conflict for another, and scopes
    /// do not meet.
    #[test]
    fn held_replay_conflict_and_scopes() {
        let t0 = Instant::now();
        let (a, b) = ([1; 32], [2; 32]);
        let (pay10, pay999) = (payload_digest(b"10.00"), payload_digest(b"999.00"));
        let mut r = KeyRecord::new(Duration::from_secs(60), 100);
        assert_eq!(r.judge(t0, a, &key("k"), pay10, holder(1)), KeyVerdict::New);
        assert_eq!(
            r.judge(t0, a, &key("k"), pay10, holder(2)),
            KeyVerdict::Held(holder(1))
        );
        assert_eq!(
            r.judge(t0, a, &key("k"), pay999, holder(2)),
            KeyVerdict::Conflict
        );
        assert_eq!(
            r.judge(t0, b, &key("k"), pay999, holder(3)),
            KeyVerdict::New,
            "another client's key"
        );
        // A take by someone else than the holder changes nothing.
        r.taken(t0, a, &key("k"), holder(2));
        assert_eq!(
            r.peek(t0, a, &key("k"), pay10),
            Some(KeyVerdict::Held(holder(1)))
        );
        r.taken(t0, a, &key("k"), holder(1));
        assert_eq!(
            r.peek(t0, a, &key("k"), pay10),
            Some(KeyVerdict::Replay { by: 1 })
        );
        assert_eq!(r.peek(t0, a, &key("k"), pay999), Some(KeyVerdict::Conflict));
        // A release after the take changes nothing either.
        r.release(a, &key("k"), holder(1));
        assert_eq!(
            r.peek(t0, a, &key("k"), pay10),
            Some(KeyVerdict::Replay { by: 1 })
        );
    }
}
