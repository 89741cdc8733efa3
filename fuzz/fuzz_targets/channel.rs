//! Arbitrary scenarios against the channel's whole policy (`proto::link::Link`): one client
//! over one to three replicas, loss, blackouts, crashes with and without state, a failing
//! claims store (errors, errors after COMMIT, hangs), applications that pause or stop, a
//! client that closes or drops its handles. The payment promises are checked with
//! `surelink::promises::Ledger` after every step and at the end.
#![no_main]

#[path = "../world.rs"]
mod world;

libfuzzer_sys::fuzz_target!(|data: &[u8]| world::channel(data));
