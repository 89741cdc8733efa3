//! Arbitrary operation sequences against the receiving peer's sans-I/O state machine (honest
//! traffic, hostile frames, time, reconnects): no panic, the memory caps hold, no id or
//! idempotency key delivered twice; the honest sender's messages are judged (payload, ack,
//! refusal) unless hostile input named their ids, and at the end each has one outcome.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::receiver(data));
