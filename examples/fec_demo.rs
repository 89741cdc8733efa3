//! Encodes payments into Reed-Solomon blocks, drops shards at random and rebuilds them.
//!
//! `cargo run --release --example fec_demo` (add `-- --help` for the flags).
//!
//! For each shard-loss rate and each number of repair shards sent in the first flight, it
//! sends every payment once (no acks, no hedging: that is the channel's job), drops each shard
//! independently with a seeded RNG, feeds the survivors to a `Reassembler`, and prints how
//! many payments did not arrive next to what the binomial model predicts for a block. Reed-
//! Solomon is MDS, so a block of k data shards is lost exactly when fewer than k of its shards
//! arrive: P(lost) = P(Binomial(k + r, 1 - p) < k).
//!
//! Shards are dropped independently here. On a real link quinn may coalesce several small
//! datagrams into one packet, so losses of one block's shards are correlated; see the `fec`
//! module docs. The channel and the loss-sweep demo measure that end to end.

use bytes::Bytes;
use clap::Parser;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use surelink::fec::{Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
use surelink::wire::{Frame, Limits};

#[derive(Parser)]
#[command(about = "Encode payments, drop shards, rebuild: measured against the binomial model")]
struct Args {
    /// Payments to send per row.
    #[arg(long, default_value_t = 20_000)]
    payments: usize,
    /// Payment size in bytes.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Payments coded together in one block (1 = each payment its own block).
    #[arg(long, default_value_t = 4)]
    per_block: usize,
    /// Shard loss rates, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.05,0.1,0.2")]
    loss: Vec<f64>,
    /// Repair shards in the first flight, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    repair: Vec<usize>,
    /// Datagram size the shard frames must fit.
    #[arg(long, default_value_t = 1162)]
    datagram: usize,
    /// RNG seed for payments and drops.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// P(Binomial(n, q) < k).
fn binomial_below(n: usize, q: f64, k: usize) -> f64 {
    let mut total = 0.0;
    let mut coef = 1.0f64; // C(n, i)
    for i in 0..k.min(n + 1) {
        total += coef * q.powi(i as i32) * (1.0 - q).powi((n - i) as i32);
        coef = coef * (n - i) as f64 / (i + 1) as f64;
    }
    total
}

fn payment(rng: &mut ChaCha8Rng, id: usize, size: usize) -> Bytes {
    let mut p = format!(
        "{{\"id\":{id},\"amount_minor\":{},\"currency\":\"EUR\",\"payee\":\"DE89370400440532013000\",\"memo\":\"",
        rng.random_range(1..1_000_000)
    )
    .into_bytes();
    while p.len() + 2 < size {
        p.push(b'a' + rng.random_range(0..26));
    }
    p.extend_from_slice(b"\"}");
    p.truncate(size);
    p.into()
}

fn main() {
    let args = Args::parse();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let payments: Vec<Bytes> = (0..args.payments)
        .map(|i| payment(&mut rng, i, args.size))
        .collect();
    let payload_bytes: usize = payments.iter().map(Bytes::len).sum();
    let limits = Limits::default();

    println!(
        "{} payments of {} B, {} per block, datagrams ≤ {} B, seed {}",
        args.payments, args.size, args.per_block, args.datagram, args.seed
    );
    println!(
        "{:>6} {:>6} {:>3} {:>6} {:>12} {:>14} {:>14} {:>13}",
        "loss", "repair", "k", "sent", "undelivered", "blocks lost", "binomial", "wire/payload"
    );
    for &p in &args.loss {
        for &r in &args.repair {
            let mut enc = Encoder::new(EncoderConfig {
                max_datagram_size: args.datagram,
                min_repair: r.max(1) as u16,
                ..EncoderConfig::default()
            });
            let mut rx = Reassembler::new(ReassemblerConfig::default());
            let mut drop_rng = ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed);
            let (mut delivered, mut blocks, mut blocks_lost, mut wire) =
                (0usize, 0usize, 0usize, 0usize);
            let mut k_seen = 0;
            for (chunk_no, chunk) in payments.chunks(args.per_block.max(1)).enumerate() {
                let first = (chunk_no * args.per_block.max(1)) as u64;
                let mut block = enc
                    .encode_block(first, chunk)
                    .expect("payments fit the datagram path");
                let k = usize::from(block.header().data_shards);
                if chunk_no == 0 {
                    k_seen = k;
                }
                let mut frames = block.data_frames();
                frames.extend(block.next_repair(r));
                let mut arrived = 0;
                for f in frames {
                    wire += f.len();
                    if drop_rng.random_bool(p) {
                        continue;
                    }
                    arrived += 1;
                    let Ok(Frame::Shard(shard)) = Frame::decode(f, &limits) else {
                        unreachable!("encoded frames decode")
                    };
                    rx.insert(shard);
                }
                blocks += 1;
                blocks_lost += usize::from(arrived < k);
                while let Some(d) = rx.poll_delivery() {
                    assert_eq!(
                        d.payload, payments[d.message_id as usize],
                        "rebuilt payment differs"
                    );
                    delivered += 1;
                }
            }
            let model = binomial_below(k_seen + r, 1.0 - p, k_seen);
            println!(
                "{:>5.1}% {:>6} {:>3} {:>6} {:>11.4}% {:>13.4}% {:>13.4}% {:>12.2}×",
                p * 100.0,
                r,
                k_seen,
                k_seen + r,
                100.0 * (args.payments - delivered) as f64 / args.payments as f64,
                100.0 * blocks_lost as f64 / blocks as f64,
                100.0 * model,
                wire as f64 / payload_bytes as f64
            );
        }
    }
    println!(
        "\nundelivered: payments that did not arrive from this one flight (a payment can still\n\
         arrive when its block is lost, if its own data shards did). blocks lost vs binomial:\n\
         measured against P(Binomial(k + r, 1 - p) < k). wire/payload counts shard frames only\n\
         (QUIC and UDP/IP headers add about 30 + 28 bytes per packet)."
    );
}
