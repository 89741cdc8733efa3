use super::*;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

fn body(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i as usize * 31 + j * 7) as u8).collect()
}

/// Sends `n` sources (ids 1000+seq) of varied lengths, a repair over the last `window`
/// after every source with probability `rate`, drops what `lost` says, and returns the ids
/// the decoder rebuilt, with the decoder.
fn run(
    n: u64,
    window: u64,
    repairs_after: impl Fn(u64) -> usize,
    lost_source: impl Fn(u64) -> bool,
) -> (Vec<u64>, WindowDecoder) {
    let mut enc = WindowEncoder::new(window);
    let mut dec = WindowDecoder::new(WindowLimits {
        max_window: window,
        ..WindowLimits::default()
    });
    let mut rebuilt = Vec::new();
    for seq in 0..n {
        let id = 1000 + seq;
        let b = body(seq, 20 + (seq as usize * 37) % 500);
        let symbol = source_symbol(id, &b).unwrap();
        assert_eq!(symbol.len(), symbol_len(id, b.len()));
        assert_eq!(enc.push(symbol.clone()), seq);
        if !lost_source(seq) {
            dec.on_source(seq, Bytes::from(symbol));
        }
        for _ in 0..repairs_after(seq) {
            let first = (seq + 1).saturating_sub(window);
            let r = enc.repair_from(first).unwrap();
            dec.on_repair(&r);
        }
        while let Some((s, id, got)) = dec.poll_recovered() {
            assert_eq!(id, 1000 + s);
            assert_eq!(&got[..], &body(s, 20 + (s as usize * 37) % 500)[..]);
            rebuilt.push(s);
        }
    }
    (rebuilt, dec)
}

#[test]
fn coefficients_are_never_zero_and_distinct_within_a_window() {
    for r in 0..256u64 {
        let row: Vec<u8> = (0..128u64).map(|s| coefficient(r, s)).collect();
        assert!(row.iter().all(|&c| c != 0));
        let mut sorted = row.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 128, "a Cauchy row has distinct entries");
    }
}

#[test]
fn a_burst_of_l_is_rebuilt_by_l_repairs_that_cover_it() {
    // Cauchy: any L repairs whose windows cover the same L lost sources rebuild them.
    for burst in 1..=12u64 {
        let start = 20;
        let (rebuilt, _) = run(
            start + burst + 20,
            32,
            |seq| usize::from(seq == start + burst + 4) * burst as usize,
            |seq| (start..start + burst).contains(&seq),
        );
        let mut rebuilt = rebuilt;
        rebuilt.sort_unstable();
        assert_eq!(
            rebuilt,
            (start..start + burst).collect::<Vec<_>>(),
            "burst {burst}"
        );
    }
}

#[test]
fn one_repair_short_rebuilds_nothing_then_the_next_completes_it() {
    let (rebuilt, _) = run(
        40,
        16,
        |seq| match seq {
            10 => 2,
            30 => 1,
            _ => 0,
        },
        |seq| (5..8).contains(&seq),
    );
    // At seq 30 the window (15..=30) no longer covers 5..8: those rows are useless.
    assert!(rebuilt.is_empty());
    let (rebuilt, _) = run(
        40,
        16,
        |seq| match seq {
            10 => 2,
            12 => 1,
            _ => 0,
        },
        |seq| (5..8).contains(&seq),
    );
    let mut rebuilt = rebuilt;
    rebuilt.sort_unstable();
    assert_eq!(rebuilt, vec![5, 6, 7]);
}

#[test]
fn random_loss_with_enough_repairs_rebuilds_everything_and_stays_bounded() {
    for seed in 1..=20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let lost: Vec<bool> = (0..2000).map(|_| rng.random_bool(0.1)).collect();
        let l = lost.clone();
        let (rebuilt, dec) = run(
            2000,
            32,
            |seq| usize::from(seq % 2 == 0),
            move |s| l[s as usize],
        );
        let want: Vec<u64> = (0..2000u64).filter(|&s| lost[s as usize]).collect();
        // Repairs at one per two sources against 10% loss: everything but the tail.
        let missed = want.iter().filter(|s| !rebuilt.contains(s)).count();
        assert!(
            missed <= 3,
            "seed {seed}: {missed} of {} not rebuilt",
            want.len()
        );
        let (known, rows) = dec.held();
        assert!(known <= 32 && rows <= 32, "state bounded by the window");
        assert_eq!(dec.stats().corrupt, 0);
    }
}

#[test]
fn late_sources_and_duplicate_repairs_are_harmless() {
    let mut enc = WindowEncoder::new(8);
    let mut dec = WindowDecoder::new(WindowLimits::default());
    let symbols: Vec<Vec<u8>> = (0..4u64)
        .map(|i| source_symbol(i, &body(i, 50)).unwrap())
        .collect();
    for s in &symbols {
        enc.push(s.clone());
    }
    let r1 = enc.repair_from(0).unwrap();
    let r2 = enc.repair_from(0).unwrap();
    dec.on_source(0, Bytes::from(symbols[0].clone()));
    dec.on_repair(&r1);
    dec.on_repair(&r1);
    assert!(dec.poll_recovered().is_none());
    // Source 1 arrives late: now r1 and r2 cover 2 unknowns (2, 3).
    dec.on_source(1, Bytes::from(symbols[1].clone()));
    dec.on_repair(&r2);
    let mut got: Vec<u64> = std::iter::from_fn(|| dec.poll_recovered())
        .map(|r| r.0)
        .collect();
    got.sort_unstable();
    assert_eq!(got, vec![2, 3]);
    // Late copies of rebuilt sources change nothing.
    dec.on_source(2, Bytes::from(symbols[2].clone()));
    assert!(dec.poll_recovered().is_none());
    assert_eq!(dec.stats().redundant, 1);
}

#[test]
fn an_inconsistent_repair_is_caught_by_the_crc() {
    let mut enc = WindowEncoder::new(8);
    let mut dec = WindowDecoder::new(WindowLimits::default());
    let symbol = source_symbol(7, b"payment").unwrap();
    enc.push(symbol);
    let mut r = enc.repair_from(0).unwrap();
    let mut p = r.payload.to_vec();
    p[5] ^= 1;
    r.payload = Bytes::from(p);
    dec.on_repair(&r);
    assert!(dec.poll_recovered().is_none());
    assert_eq!(dec.stats().corrupt, 1);
}

#[test]
fn hostile_repairs_do_not_panic_or_grow_state() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut dec = WindowDecoder::new(WindowLimits {
        max_window: 16,
        max_symbol: 64,
    });
    for i in 0..5000u64 {
        let first = if rng.random_bool(0.5) {
            rng.random_range(0..200)
        } else {
            rng.random::<u64>() >> 2
        };
        let count = rng.random_range(0..200);
        let len = rng.random_range(0..100);
        let payload: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        dec.on_repair(&RepairFrame {
            repair: i,
            first,
            count,
            payload: Bytes::from(payload.clone()),
        });
        if rng.random_bool(0.3) {
            dec.on_source(first, Bytes::from(payload));
        }
        while dec.poll_recovered().is_some() {}
        let (known, rows) = dec.held();
        assert!(known <= 16 && rows <= 16);
        assert!(dec.held_bytes() <= 32 * 64);
    }
}

#[test]
fn open_symbol_rejects_garbage() {
    assert!(open_symbol(&[]).is_none());
    assert!(open_symbol(&[0, 5, 1]).is_none());
    let mut s = source_symbol(3, b"abc").unwrap();
    assert_eq!(open_symbol(&s).unwrap(), (3, Bytes::from_static(b"abc")));
    s.extend_from_slice(&[0, 0, 0]);
    assert_eq!(open_symbol(&s).unwrap().0, 3, "zero padding is allowed");
    s.push(1);
    assert!(open_symbol(&s).is_none(), "non-zero padding is not");
}

#[test]
fn documented_coefficient_check_values() {
    // docs/PROTOCOL.md §9.5.
    assert_eq!(coefficient(0, 0), 0x1b);
    assert_eq!(coefficient(1, 2), 0x1d);
    assert_eq!(coefficient(129, 133), 0x7c);
}

#[test]
fn empty_symbols_do_not_panic() {
    // The simd-accel build of galois_8 panics on empty slices.
    let mut dec = WindowDecoder::new(WindowLimits::default());
    dec.on_source(0, Bytes::new());
    dec.on_repair(&RepairFrame {
        repair: 0,
        first: 0,
        count: 2,
        payload: Bytes::from_static(&[1, 2, 3]),
    });
    dec.on_source(1, Bytes::new());
    assert!(dec.poll_recovered().is_none());
}
