//! Arbitrary operation sequences against the window code's decoder (`fec::window`): an
//! honest sender's sources and repairs lost, reordered and duplicated, then forged sources and
//! repairs. No panic, the bounds hold (`held`, `held_bytes`), and while the traffic is honest
//! every rebuilt message is exactly the one sent under its sequence number, once.
#![no_main]

#[path = "../window.rs"]
mod window;

libfuzzer_sys::fuzz_target!(|data: &[u8]| window::window(data));
