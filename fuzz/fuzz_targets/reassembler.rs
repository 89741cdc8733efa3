//! Arbitrary operation sequences against the reassembler: no panic, the memory caps hold, no
//! message of a block delivered twice, every rebuilt message matches what was encoded.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::reassembler(data));
