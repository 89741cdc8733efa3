//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same checks the
//! fuzz targets run, so CI exercises them on the stable toolchain; then a seeded batch of
//! random inputs as a smoke test.

#[path = "../fuzz/checks.rs"]
mod checks;
#[path = "../fuzz/window.rs"]
mod window;
#[path = "../fuzz/world.rs"]
mod world;

use std::path::Path;

use rand::{RngExt, SeedableRng};

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        check(&data);
        count += 1;
    }
    assert!(count >= 10, "corpus for {target} has only {count} inputs");
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", checks::frame_decode);
}

#[test]
fn reassembler_corpus() {
    replay("reassembler", checks::reassembler);
}

#[test]
fn receiver_corpus() {
    replay("receiver", checks::receiver);
}

#[test]
fn channel_corpus() {
    replay("channel", world::channel);
}

#[test]
fn window_corpus() {
    replay("window", window::window);
}

#[test]
fn random_inputs_smoke() {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(0x5eed);
    for _ in 0..300 {
        let len = rng.random_range(0..600);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        checks::frame_decode(&data);
        checks::reassembler(&data);
        checks::receiver(&data);
        world::channel(&data);
        window::window(&data);
    }
}
