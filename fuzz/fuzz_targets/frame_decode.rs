//! Arbitrary bytes into `Frame::decode`: no panic; what decodes re-encodes to the same frame.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::frame_decode(data));
