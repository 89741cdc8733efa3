//! surelink: payment messages over lossy networks.
//!
//! surelink delivers small, important messages (payments) over QUIC ([`quinn`]) so that a
//! lost packet costs no retransmission timeout: each message travels as Reed-Solomon coded
//! shards in QUIC DATAGRAM frames, any `k` of `n` shards rebuild it, and a late ack triggers
//! fresh repair shards instead of a wait.
//!
//! # Layout
//!
//! | module   | owns | knows nothing of |
//! |----------|------|------------------|
//! | [`wire`] | bytes ⇄ frames (shard, ack, hello, close), varints, [`wire::DecodeError`] | codes, time, sockets |
//! | [`fec`]  | messages ⇄ shards: block building (per message or across messages), parity via `reed-solomon-erasure`, extra repair on demand, reassembly under memory caps | byte layout beyond [`wire`], time sources, sockets |
//! | [`proto`] | the sans-I/O protocol: message ids, first flights, acks, RTT percentile, hedges (budget, backoff), deadlines, dedupe window, redundant acks; input `(now, datagram)`, output datagrams, timers, events. [`proto::link`]: the channel's whole policy (connection lifecycle, reconnect, failover/standby/ranking, claims pipeline, stream path, hand-off, shutdown) as a `Link` driven by `(now, Input)` → `Action`s and a timer | quinn, tokio, the clock |
//! | [`tune`] | loss models' math (binomial tail, Gilbert-Elliott chain), choosing (k, m, linger, hedge delay) for a target, the online per-shard loss estimate | I/O |
//! | [`channel`] | the async shell: one driver task performs what a `proto::link::Link` decides over quinn connections (datagrams, plus streams for large messages, dials, store calls); `Channel::open`/`connect`, `Listener`/`Server` (channel ids, reconnects), `send` → `Receipt`, `Messages` (bounded), `stats()`, TLS config helpers (PEM/DER identities, CA trust or pinning, mutual TLS; never 0-RTT) | codes |
//! | [`promises`] | the payment promises stated once: a [`promises::Ledger`] of what each sender saw and each application received, checked by every scenario test and fuzz target | transport |
//! | [`store`] | claims of delivered messages shared by replicas: the `DedupeStore` trait, `MemoryStore`, `PgStore` (feature `postgres`) | transport |
//! | `sim` (feature `sim`, default) | the packet-loss simulator: a seeded link model, an in-memory network of quinn sockets on tokio's clock, the same model over a real UDP socket, an endpoint-pair harness | surelink's protocol: it works under any quinn application |
//!
//! `wire`, `fec`, `proto` and `tune` are pure: they take bytes, messages and `now` as inputs and return bytes,
//! blocks, deadlines and events. Nothing in them spawns a task or reads a clock, which keeps the
//! decoder fuzzable and the protocol deterministic under the simulator. `sim` does I/O (it is
//! a socket) but its link model is pure too.
//!
//! Redundancy is adaptive by default: the sender measures the link's loss per shard from its
//! acks and plans each message's code with [`tune::plan`] (see `proto::SenderConfig::adaptive`).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod channel;
pub mod fec;
pub mod metrics;
pub mod promises;
pub mod proto;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
pub mod tune;
pub mod wire;
