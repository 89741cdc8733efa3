//! Arbitrary scenarios against the channel's whole policy (`proto::link::Link`), in the
//! deterministic world of `fuzz/world.rs`: one to three client applications (which restart
//! and retry their payments on new channels) over servers that hold a channel per client —
//! sharing one idempotency-key record, or claiming in a store shared by one to three
//! replicas, or leaving the claim to the application (the inbox) — with stream messages and
//! their refusals, key records that fill up, loss, blackouts, crashes with and without
//! state, a failing claims store, applications that pause or drop their `Messages`, clients
//! that close or drop their handles, a hostile peer, and keyed requests (applications that
//! reply, nack or drop them, at once or late; replies kept with keys and in the store; replies
//! lost on the way back). The payment promises are checked with `surelink::promises::Ledger`,
//! per send and per key (for requests: processed at most once per key, every reply the first
//! processing's), after every step and at the end.
#![no_main]

#[path = "../world.rs"]
mod world;

libfuzzer_sys::fuzz_target!(|data: &[u8]| world::channel(data));
