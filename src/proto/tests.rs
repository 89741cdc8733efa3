//! Two peers on a virtual clock, joined by the simulator's seeded link model.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::sim::{GilbertElliott, Link, LinkConfig, Loss};
use crate::wire::{Envelope, Frame, Limits};

const DELAY: Duration = Duration::from_millis(20);
const INTERVAL: Duration = Duration::from_millis(5);

/// A datagram in flight: (arrival, send order, to peer, bytes), earliest first.
type InFlight = Reverse<(Instant, u64, usize, Vec<u8>)>;

struct Harness {
    now: Instant,
    peers: [Peer; 2],
    /// `links[i]` carries what peer `i` sends.
    links: [Link; 2],
    queue: BinaryHeap<InFlight>,
    seq: u64,
}

/// Fixed redundancy (one parity shard per block): the older tests reason about it.
fn fixed() -> SenderConfig {
    SenderConfig {
        adaptive: None,
        ..SenderConfig::default()
    }
}

impl Harness {
    fn new(link: LinkConfig, seed: u64) -> Self {
        Self::with_sender(link, seed, fixed())
    }

    fn with_sender(link: LinkConfig, seed: u64, sender: SenderConfig) -> Self {
        let now = Instant::now();
        let peer = || Peer::new(sender.clone(), ReceiverConfig::default());
        Harness {
            now,
            peers: [peer(), peer()],
            links: [
                Link::new(link.clone(), seed, now),
                Link::new(link, seed ^ 0xdead_beef, now),
            ],
            queue: BinaryHeap::new(),
            seq: 0,
        }
    }

    /// Puts everything the peers want to send on the wire.
    fn flush(&mut self) {
        for i in 0..2 {
            while let Some(d) = self.peers[i].poll_transmit() {
                self.inject(i, d.to_vec());
            }
        }
    }

    /// Sends `data` from peer `from` through its link.
    fn inject(&mut self, from: usize, data: Vec<u8>) {
        let copies = self.links[from]
            .on_send(self.now, data.len())
            .deliveries(&data);
        for (at, data) in copies {
            self.seq += 1;
            self.queue.push(Reverse((at, self.seq, 1 - from, data)));
        }
    }

    /// Runs until `t`: arrivals first, then timers, at each instant something happens.
    fn run_until(&mut self, t: Instant) {
        loop {
            let arrival = self.queue.peek().map(|Reverse((at, ..))| *at);
            let timer = self.peers.iter().filter_map(Peer::poll_timeout).min();
            let Some(next) = [arrival, timer].into_iter().flatten().min() else {
                break;
            };
            if next > t {
                break;
            }
            self.now = self.now.max(next);
            while self
                .queue
                .peek()
                .is_some_and(|Reverse((at, ..))| *at <= self.now)
            {
                let Reverse((_, _, to, data)) = self.queue.pop().expect("peeked");
                self.peers[to].handle_datagram(self.now, Bytes::from(data));
            }
            for p in &mut self.peers {
                if p.poll_timeout().is_some_and(|at| at <= self.now) {
                    p.handle_timeout(self.now);
                }
            }
            self.flush();
        }
        self.now = self.now.max(t);
    }
}

fn payload(id: u64) -> Bytes {
    let mut p = format!("payment {id:08} ").into_bytes();
    p.resize(512, b'.');
    p.into()
}

#[derive(Debug, Default, PartialEq)]
struct Outcome {
    acked: BTreeMap<u64, Duration>,
    failed: BTreeSet<u64>,
    delivered: Vec<u64>,
    hedges: u64,
}

/// Peer 0 sends `n` payments at 200/s to peer 1; runs until every outcome is known.
fn run(h: &mut Harness, n: u64) -> Outcome {
    let mut out = Outcome::default();
    let start = h.now;
    let base = h.peers[0].sender.stats().messages_sent;
    for i in 0..n {
        h.run_until(start + INTERVAL * i as u32);
        let id = h.peers[0]
            .sender
            .send(h.now, payload(base + i))
            .expect("send");
        assert_eq!(id, base + i);
        h.flush();
        collect(h, &mut out);
    }
    let end = h.now + SenderConfig::default().deadline + Duration::from_secs(1);
    h.run_until(end);
    collect(h, &mut out);
    out.hedges = h.peers[0].sender.stats().hedges_fired;
    out
}

fn collect(h: &mut Harness, out: &mut Outcome) {
    while let Some(e) = h.peers[0].sender.poll_event() {
        match e {
            SenderEvent::Acked { id, latency, .. } => {
                assert!(out.acked.insert(id, latency).is_none(), "{id} acked twice");
            }
            SenderEvent::Failed { id, .. } => assert!(out.failed.insert(id), "{id} failed twice"),
        }
    }
    while let Some(d) = h.peers[1].receiver.poll_delivery() {
        assert_eq!(d.payload, payload(d.id), "message {} corrupted", d.id);
        out.delivered.push(d.id);
    }
}

/// The payment semantics: every message has exactly one outcome; nothing is delivered twice;
/// everything acked was delivered.
fn check(out: &Outcome, n: u64) {
    for id in 0..n {
        let a = out.acked.contains_key(&id);
        let f = out.failed.contains(&id);
        assert!(a ^ f, "message {id}: acked {a}, failed {f}");
    }
    let unique: BTreeSet<u64> = out.delivered.iter().copied().collect();
    assert_eq!(
        unique.len(),
        out.delivered.len(),
        "a message was delivered twice"
    );
    for id in out.acked.keys() {
        assert!(
            unique.contains(id),
            "message {id} acked but never delivered"
        );
    }
}

fn percentile(out: &Outcome, q: f64) -> Duration {
    let mut l: Vec<Duration> = out.acked.values().copied().collect();
    l.sort();
    l[((q * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1]
}

#[test]
fn clean_link_acks_everything_in_one_round_trip() {
    let mut h = Harness::new(LinkConfig::lossy(DELAY, 0.0), 1);
    let out = run(&mut h, 500);
    check(&out, 500);
    assert_eq!(out.acked.len(), 500);
    assert_eq!(out.hedges, 0);
    assert!(out.acked.values().all(|&l| l == 2 * DELAY));
    let st = h.peers[0].sender.stats();
    assert_eq!((st.data_shards, st.repair_shards), (500, 500));
}

#[test]
fn lossy_reordering_duplicating_links_keep_payment_semantics() {
    let models = [
        Loss::Bernoulli(0.01),
        Loss::Bernoulli(0.05),
        Loss::Bernoulli(0.1),
        Loss::Bernoulli(0.2),
        Loss::Bernoulli(0.3),
        Loss::GilbertElliott(GilbertElliott::from_mean(0.05, 4.0)),
    ];
    for (i, loss) in models.into_iter().enumerate() {
        let link = LinkConfig {
            loss: loss.clone(),
            delay: DELAY,
            jitter: Duration::from_millis(2),
            reorder: 0.05,
            reorder_delay: Duration::from_millis(10),
            duplicate: 0.05,
            ..LinkConfig::default()
        };
        let mut h = Harness::new(link, 10 + i as u64);
        let n = 2000;
        let out = run(&mut h, n);
        check(&out, n);
        let st = h.peers[0].sender.stats();
        eprintln!(
            "{loss:?}: acked {} failed {} p50 {:?} p99 {:?} p99.9 {:?} max {:?} hedges {} skipped {} dup suppressed {}",
            out.acked.len(),
            out.failed.len(),
            percentile(&out, 0.5),
            percentile(&out, 0.99),
            percentile(&out, 0.999),
            percentile(&out, 1.0),
            st.hedges_fired,
            st.hedges_skipped,
            h.peers[1].receiver.stats().duplicates_suppressed,
        );
    }
}

#[test]
fn blackout_in_the_middle() {
    let link = LinkConfig {
        blackouts: vec![Duration::from_secs(2)..Duration::from_secs(4)],
        ..LinkConfig::lossy(DELAY, 0.05)
    };
    let mut h = Harness::new(link, 5);
    let n = 1200; // 6 s of sending
    let out = run(&mut h, n);
    check(&out, n);
    // Messages sent during the blackout were acked after it (the deadline is 5 s).
    assert!(
        out.failed.is_empty(),
        "{} failed: {:?}, stats {:?}",
        out.failed.len(),
        out.failed,
        h.peers[0].sender.stats()
    );
    assert!(percentile(&out, 1.0) > Duration::from_secs(1));
}

#[test]
fn garbage_and_contradictory_frames_are_counted_and_harmless() {
    let mut h = Harness::new(LinkConfig::lossy(DELAY, 0.05), 9);
    // A template shard frame with other content, re-labelled below with the ids of blocks the
    // receiver has finished: same layout (stale), or a different first message (contradicts).
    let mut enc = crate::fec::Encoder::new(crate::fec::EncoderConfig::default());
    let Ok(Frame::Shard(template)) = Frame::decode(
        enc.encode(0, Bytes::from_static(b"forged"))
            .unwrap()
            .data_frames()[0]
            .clone(),
        &Limits::default(),
    ) else {
        panic!("template");
    };
    let forge = |block: u64, first: u64| {
        let mut f = template.clone();
        f.header.block = block;
        f.header.first_message = first;
        Frame::Shard(f).to_bytes()
    };
    let start = h.now;
    let mut out = Outcome::default();
    for i in 0..400u64 {
        h.run_until(start + INTERVAL * i as u32);
        h.peers[0].sender.send(h.now, payload(i)).unwrap();
        h.flush();
        // Garbage, and forgeries of blocks finished long ago, from the (authenticated) peer.
        h.peers[1].handle_datagram(h.now, Bytes::from(vec![0x11; (i % 40) as usize]));
        h.peers[1].handle_datagram(h.now, Bytes::from_static(&[0x7f, 1, 2]));
        if i >= 20 {
            h.peers[1].handle_datagram(h.now, forge(i - 20, i - 20));
            h.peers[1].handle_datagram(h.now, forge(i - 20, i + 5000));
        }
        collect(&mut h, &mut out);
    }
    h.run_until(h.now + Duration::from_secs(6));
    collect(&mut h, &mut out);
    // `check` also compares every delivered payload with the real one: no forgery got through.
    check(&out, 400);
    assert!(out.failed.is_empty());
    let invalid = h.peers[1].invalid_frames();
    assert!(invalid.total() >= 780, "{invalid:?}");
    assert!(invalid.by_reason.contains_key("unsupported_version"));
    let r = h.peers[1].receiver.reassembly();
    assert_eq!(r.shards_contradicting, 380, "{r:?}");
    assert!(r.shards_stale >= 380, "{r:?}");
}

#[test]
fn same_seed_same_run() {
    let link = LinkConfig {
        jitter: Duration::from_millis(3),
        duplicate: 0.05,
        ..LinkConfig::lossy(DELAY, 0.1)
    };
    let a = run(&mut Harness::new(link.clone(), 77), 300);
    let b = run(&mut Harness::new(link, 77), 300);
    assert_eq!(a, b);
}

#[test]
fn the_hedge_delay_tracks_the_round_trip_without_drifting() {
    // Two feedback loops were measured here and must not come back: the hedge delay sliding
    // down (samples cut at the previous p95: 21% of messages hedged under jitter alone) and
    // climbing up (hedged messages' latencies counted as round trips once first-flight loss
    // passes 5%).
    //
    // The ack round trip is 40 ms plus up to 4 ms of jitter (2 ms each way), plus 5 ms per
    // lost ack (the next message's ack, 5 ms later, covers it). Without loss its p95 lies in
    // 40..=44 ms; with 20% loss, two acks in a row are lost 4% of the time (< 5%), so the p95
    // lies in 40..=54 ms. A drift either way leaves these ranges within a few hundred
    // messages. Hedges: without loss almost none (the hedge fires 10% beyond the p95); with
    // 20% loss, a first flight (data + parity) is lost with probability 0.2² = 4%, and an
    // ack that is lost with its successor (4%) also triggers one: about 8%, bounded at 12%.
    let n = 2000;
    for (loss, max_p95_ms, max_hedge_rate) in [(0.0, 44, 0.01), (0.2, 54, 0.12)] {
        let link = LinkConfig {
            jitter: Duration::from_millis(2),
            ..LinkConfig::lossy(DELAY, loss)
        };
        let mut h = Harness::new(link, 3);
        let out = run(&mut h, n);
        check(&out, n);
        let p95 = h.peers[0].sender.rtt().quantile(0.95);
        assert!(
            p95 >= 2 * DELAY && p95 <= Duration::from_millis(max_p95_ms),
            "loss {loss}: p95 estimate {p95:?}"
        );
        let rate = h.peers[0].sender.stats().hedges_fired as f64 / n as f64;
        assert!(rate <= max_hedge_rate, "loss {loss}: hedge rate {rate}");
    }
}

#[test]
fn a_new_connection_resends_in_flight_messages_without_double_delivery() {
    // The connection dies at 1 s: for the 100 ms before, every ack was lost (so the receiver
    // delivered messages the sender never heard about), and everything in flight at 1 s is
    // gone. Both peers move to a new connection; the sender re-sends what is unacked, with
    // the same ids, in new blocks; the receiver's dedupe window, which outlives connections,
    // recognises what it already delivered.
    let mut h = Harness::new(LinkConfig::lossy(DELAY, 0.05), 21);
    let cut = Duration::from_secs(1);
    h.links[1].set_config(LinkConfig {
        blackouts: vec![cut - Duration::from_millis(100)..cut],
        ..LinkConfig::lossy(DELAY, 0.05)
    });
    let n = 400u64;
    let start = h.now;
    let mut out = Outcome::default();
    let mut reconnected = false;
    for i in 0..n {
        let t = start + INTERVAL * i as u32;
        if !reconnected && t >= start + cut {
            h.run_until(start + cut);
            h.queue.clear();
            for p in &mut h.peers {
                p.new_connection(h.now);
            }
            h.flush();
            reconnected = true;
        }
        h.run_until(t);
        h.peers[0].sender.send(h.now, payload(i)).unwrap();
        h.flush();
        collect(&mut h, &mut out);
    }
    h.run_until(h.now + Duration::from_secs(6));
    collect(&mut h, &mut out);
    check(&out, n);
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    // The scenario happened: messages delivered before the cut were sent again after it and
    // suppressed as duplicates.
    let suppressed = h.peers[1].receiver.stats().duplicates_suppressed;
    assert!(
        suppressed >= 10,
        "only {suppressed} re-sent messages were already delivered"
    );
}

#[test]
fn first_flight_parity_leaves_after_the_spacing() {
    // quinn packs datagrams queued together into one packet; the parity must be queued later.
    let mut s = Sender::new(SenderConfig {
        first_flight_repair: 2,
        ..fixed()
    });
    let t0 = Instant::now();
    s.send(t0, payload(0)).unwrap();
    let is_parity = |d: &Bytes| match Frame::decode(d.clone(), &Limits::default()) {
        Ok(Frame::Shard(f)) => !f.is_data(),
        other => panic!("{other:?}"),
    };
    let now: Vec<Bytes> = std::iter::from_fn(|| s.poll_transmit()).collect();
    assert_eq!(now.len(), 1);
    assert!(!is_parity(&now[0]));
    let spacing = SenderConfig::default().repair_spacing;
    assert_eq!(s.poll_timeout(), Some(t0 + spacing));
    for j in 1..=2u32 {
        s.handle_timeout(t0 + spacing * j);
        let out: Vec<Bytes> = std::iter::from_fn(|| s.poll_transmit()).collect();
        assert_eq!(out.len(), 1, "one parity shard at {j} × spacing");
        assert!(is_parity(&out[0]));
    }
    // With no spacing, the whole first flight leaves at once.
    let mut s = Sender::new(SenderConfig {
        first_flight_repair: 2,
        repair_spacing: Duration::ZERO,
        ..fixed()
    });
    s.send(t0, payload(0)).unwrap();
    assert_eq!(std::iter::from_fn(|| s.poll_transmit()).count(), 3);
}

#[test]
fn an_idempotency_key_is_delivered_once_and_every_id_acked() {
    let mut h = Harness::new(LinkConfig::default(), 7);
    let t = h.now;
    let a = h.peers[0]
        .sender
        .send_keyed(t, Some(b"order-1"), b"pay 10")
        .unwrap();
    // The application retries under the same key (a new message id), and sends another.
    let b = h.peers[0]
        .sender
        .send_keyed(t, Some(b"order-1"), b"pay 10")
        .unwrap();
    let c = h.peers[0]
        .sender
        .send_keyed(t, Some(b"order-2"), b"pay 20")
        .unwrap();
    h.flush();
    h.run_until(t + Duration::from_secs(1));
    let mut acked = BTreeSet::new();
    while let Some(e) = h.peers[0].sender.poll_event() {
        if let SenderEvent::Acked { id, .. } = e {
            acked.insert(id);
        }
    }
    assert_eq!(acked, BTreeSet::from([a, b, c]), "every id has its ack");
    let mut delivered = Vec::new();
    while let Some(d) = h.peers[1].receiver.poll_delivery() {
        delivered.push((d.id, d.key.unwrap(), d.payload));
    }
    assert_eq!(
        delivered,
        vec![
            (
                a,
                Bytes::from_static(b"order-1"),
                Bytes::from_static(b"pay 10")
            ),
            (
                c,
                Bytes::from_static(b"order-2"),
                Bytes::from_static(b"pay 20")
            ),
        ]
    );
    assert_eq!(h.peers[1].receiver.stats().duplicate_keys, 1);
    let bad = [Some(&b""[..]), Some(&[7u8; 256][..])];
    for key in bad {
        assert!(matches!(
            h.peers[0].sender.send_keyed(t, key, b"x"),
            Err(SendError::InvalidKey { .. })
        ));
    }
}

#[test]
fn a_body_that_is_no_envelope_is_neither_delivered_nor_acked() {
    let t = Instant::now();
    let mut r = Receiver::new(ReceiverConfig::default());
    // A well-formed block whose message is not an envelope (unknown flags).
    let block = crate::fec::Encoder::new(Default::default())
        .encode(0, Bytes::from_static(&[0x80, 1, 2, 3]))
        .unwrap();
    for f in block.data_frames() {
        match Frame::decode(f, &Limits::default()).unwrap() {
            Frame::Shard(s) => r.handle_shard(t, s),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(r.poll_delivery(), None);
    // Issue case 12: no ack for what was not delivered, but a refusal, counted.
    let refuse = r.poll_transmit().expect("a refusal");
    assert_eq!(
        Frame::decode(refuse, &Limits::default()),
        Ok(Frame::Refuse(crate::wire::RefuseFrame {
            reason: crate::wire::REFUSE_MALFORMED,
            ranges: vec![0..=0],
        }))
    );
    assert_eq!(r.poll_transmit(), None, "no ack for what was not delivered");
    assert_eq!(r.stats().invalid_envelopes, 1);
    assert_eq!(r.stats().refused.malformed, 1);
    // The same over the stream path: refused.
    assert_eq!(
        r.handle_whole(t, 1, Bytes::from_static(&[0x80])),
        Whole::Refused
    );
    assert_eq!(
        r.handle_whole(t, 1, Envelope::encode(None, b"ok")),
        Whole::New
    );
    assert_eq!(
        r.handle_whole(t, 1, Envelope::encode(None, b"ok")),
        Whole::Duplicate
    );
    assert_eq!(
        r.poll_delivery().unwrap().payload,
        Bytes::from_static(b"ok")
    );
    assert_eq!(r.poll_delivery(), None);
}

/// Default (adaptive) sender on both peers.
fn adaptive(link: LinkConfig, seed: u64) -> Harness {
    Harness::with_sender(link, seed, SenderConfig::default())
}

#[test]
fn adaptive_redundancy_spends_nothing_once_a_clean_link_is_proven() {
    let mut h = adaptive(LinkConfig::lossy(DELAY, 0.0), 1);
    let first = run(&mut h, 1000);
    check(&first, 1000);
    assert_eq!(first.acked.len(), 1000);
    // After 1000 shards without a loss the estimate's upper bound (Wilson, 512 shards) is
    // under 0.2%, and a 512 B message needs no parity for a 0.5% residual.
    let est = h.peers[0].sender.loss_estimate();
    assert!(est < 0.002, "estimate {est}");
    let before = h.peers[0].sender.stats();
    let second = run(&mut h, 1000);
    assert_eq!(second.acked.len(), 1000);
    let after = h.peers[0].sender.stats();
    assert_eq!(after.data_shards - before.data_shards, 1000);
    assert_eq!(after.repair_shards - before.repair_shards, 0);
    assert_eq!(after.hedges_fired, 0);
}

#[test]
fn adaptive_redundancy_measures_the_loss_and_meets_its_target() {
    let link = LinkConfig {
        jitter: Duration::from_millis(2),
        reorder: 0.02,
        reorder_delay: Duration::from_millis(10),
        duplicate: 0.02,
        ..LinkConfig::lossy(DELAY, 0.1)
    };
    let mut h = adaptive(link, 5);
    let n = 2000;
    let out = run(&mut h, n);
    check(&out, n);
    assert_eq!(out.acked.len() as u64, n);
    let s = &h.peers[0].sender;
    let observed = s.loss_observed().unwrap();
    // The window holds 512 shards: 4 standard deviations of a 10% rate.
    let sd = (0.1f64 * 0.9 / 512.0).sqrt();
    assert!((observed - 0.1).abs() <= 4.0 * sd, "observed {observed}");
    // Messages not rebuilt by their first flight wait for a hedge: latency beyond the round
    // trip plus jitter (4 ms), spacing of up to 8 shards and two lost acks in a row (covered
    // by the next message's ack, 5 ms apart). The plan's residual is at most 0.5% while the
    // estimate is at or above the true loss; three acks lost in a row add 0.1%; the first
    // round trips run on the 2% prior. Allowed: 1% of messages.
    let slow = out
        .acked
        .values()
        .filter(|&&l| l > 2 * DELAY + Duration::from_millis(4 + 8 + 10))
        .count();
    let st = s.stats();
    eprintln!(
        "slow {slow}, estimate {:.4}, observed {observed:.4}, shards {} ({} data, {} repair), hedges {}",
        s.loss_estimate(),
        st.shards_sent,
        st.data_shards,
        st.repair_shards,
        st.hedges_fired
    );
    assert!(
        slow as u64 <= n / 100,
        "{slow} messages needed more than the first flight"
    );
}

/// Loss appears on a link proven clean: messages after the onset until the sender plans
/// parity for a 512 B message. At 200 messages/s a round trip (40 ms) carries 8 one-shard
/// messages; the short window believes loss after two losses within 32 shards, judged one
/// round trip (8 messages) late. At 10% loss the second loss comes after 20 shards on average
/// and by the 40th in 92% of runs, so the median over 20 seeds must be within 48 messages
/// (6 round trips); measured: 10 to 37, median 15.
#[test]
fn adaptive_redundancy_reacts_to_loss_within_a_few_round_trips() {
    let mut reactions = Vec::new();
    for seed in 0..20 {
        let mut h = adaptive(LinkConfig::lossy(DELAY, 0.0), 100 + seed);
        let _ = run(&mut h, 600);
        assert_eq!(h.peers[0].sender.current_plan(512), Some((1, 0)));
        for l in &mut h.links {
            l.set_config(LinkConfig::lossy(DELAY, 0.1));
        }
        let start = h.now;
        let mut reacted = None;
        for i in 0..400u64 {
            h.run_until(start + INTERVAL * i as u32);
            h.peers[0].sender.send(h.now, payload(i)).unwrap();
            h.flush();
            if h.peers[0].sender.current_plan(512) != Some((1, 0)) {
                reacted = Some(i);
                break;
            }
        }
        reactions.push(reacted.expect("never reacted to 10% loss"));
    }
    reactions.sort();
    let median = reactions[reactions.len() / 2];
    eprintln!("messages until parity: {reactions:?}");
    assert!(median <= 48, "median {median} messages");
}

/// A sender whose messages leave as their data shards only (no first-flight parity).
fn plain() -> SenderConfig {
    SenderConfig {
        adaptive: None,
        first_flight_repair: 0,
        ..SenderConfig::default()
    }
}

fn claims_peer(max_pending: usize) -> Peer {
    Peer::new(
        plain(),
        ReceiverConfig {
            claims: Claims::Owner,
            max_pending_claims: max_pending,
            ..ReceiverConfig::default()
        },
    )
}

fn carry(now: Instant, from: &mut Peer, to: &mut Peer) -> Vec<Bytes> {
    let mut sent = Vec::new();
    while let Some(d) = from.poll_transmit() {
        sent.push(d.clone());
        to.handle_datagram(now, d);
    }
    sent
}

fn acked_ids(peer: &mut Peer) -> Vec<u64> {
    std::iter::from_fn(|| peer.sender.poll_event())
        .filter_map(|e| match e {
            SenderEvent::Acked { id, .. } => Some(id),
            SenderEvent::Failed { .. } => None,
        })
        .collect()
}

#[test]
fn in_claims_mode_a_message_is_delivered_and_acked_only_after_its_claim() {
    let t = Instant::now();
    let mut a = Peer::new(plain(), ReceiverConfig::default());
    let mut b = claims_peer(3);
    for i in 0..4 {
        a.sender.send(t, payload(i)).unwrap();
    }
    let wire = carry(t, &mut a, &mut b);
    let requests: Vec<ClaimRequest> = std::iter::from_fn(|| b.receiver.poll_claim()).collect();
    assert_eq!(
        requests.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "claims asked, up to max_pending_claims"
    );
    let st = b.receiver.stats();
    assert_eq!((st.claims_pending, st.claims_refused), (3, 1));
    assert!(
        b.receiver.poll_delivery().is_none(),
        "nothing delivered yet"
    );
    assert!(b.poll_transmit().is_none(), "nothing acked yet");

    // The same shards again (a duplicate packet): no second claim.
    for d in wire {
        b.handle_datagram(t, d);
    }
    assert!(b.receiver.poll_claim().is_none());

    // 0: first claim, delivered and acked. 1: claimed before (another replica delivered
    // it), acked only. 2: the store failed, neither.
    b.receiver.claim_done(t, &requests[0], ClaimOutcome::Now);
    b.receiver.claim_done(t, &requests[1], ClaimOutcome::Before);
    b.receiver.claim_done(t, &requests[2], ClaimOutcome::Failed);
    // A late duplicate answer changes nothing.
    b.receiver.claim_done(t, &requests[0], ClaimOutcome::Now);
    let delivered: Vec<u64> = std::iter::from_fn(|| b.receiver.poll_delivery())
        .map(|d| d.id)
        .collect();
    assert_eq!(delivered, vec![0]);
    carry(t, &mut b, &mut a);
    assert_eq!(acked_ids(&mut a), vec![0, 1]);
    let st = b.receiver.stats();
    assert_eq!(
        (
            st.delivered,
            st.claimed_before,
            st.claim_failures,
            st.claims_pending
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(st.bytes_queued, 0, "pending bytes released");
}

#[test]
fn in_claims_mode_a_stream_message_is_answered_once_claimed() {
    let t = Instant::now();
    let mut b = claims_peer(16);
    let message = |id: u64, key: &[u8]| {
        let mut m = crate::wire::encode_stream_head(id).to_vec();
        m.extend_from_slice(&Envelope::encode(Some(key), b"big payment"));
        Bytes::from(m)
    };
    assert_eq!(
        b.handle_stream_message(t, message(7, b"order-7")),
        StreamStatus::Later(7)
    );
    let request = b.receiver.poll_claim().unwrap();
    assert_eq!(request.key.as_deref(), Some(&b"order-7"[..]));
    assert!(b.receiver.poll_stream_answer().is_none());
    b.receiver.claim_done(t, &request, ClaimOutcome::Now);
    assert_eq!(
        b.receiver.poll_stream_answer(),
        Some((7, crate::wire::STREAM_DELIVERED))
    );
    assert_eq!(b.receiver.poll_delivery().unwrap().id, 7);
    // The key is now known here: a retry under a new id is acked without a claim.
    assert_eq!(
        b.handle_stream_message(t, message(8, b"order-7")),
        StreamStatus::Now(crate::wire::STREAM_DELIVERED)
    );
    assert!(b.receiver.poll_claim().is_none());
    assert!(b.receiver.poll_delivery().is_none());
    // A failed claim refuses the stream message.
    assert_eq!(
        b.handle_stream_message(t, message(9, b"order-9")),
        StreamStatus::Later(9)
    );
    let request = b.receiver.poll_claim().unwrap();
    b.receiver.claim_done(t, &request, ClaimOutcome::Failed);
    assert_eq!(
        b.receiver.poll_stream_answer(),
        Some((9, crate::wire::STREAM_REFUSED))
    );
}

#[test]
fn a_taken_over_channel_starts_its_window_at_the_clients_floor() {
    let t = Instant::now();
    let mut b = claims_peer(16);
    b.receiver.start_at(1_000_000);
    let mut a = Peer::new(
        SenderConfig {
            max_id_span: u64::MAX,
            ..plain()
        },
        ReceiverConfig::default(),
    );
    // Ids far above the default window's reach from 0 are claimed, not refused.
    for _ in 0..1_000_000 {
        a.sender.reserve_id();
    }
    let id = a.sender.send(t, payload(1)).unwrap();
    assert_eq!(id, 1_000_000);
    carry(t, &mut a, &mut b);
    let request = b.receiver.poll_claim().expect("claimed, not out of window");
    assert_eq!(request.id, id);
    b.receiver.claim_done(t, &request, ClaimOutcome::Now);
    assert_eq!(b.receiver.poll_delivery().unwrap().id, id);
    assert_eq!(b.receiver.stats().out_of_window, 0);
    // Below the floor: already handled (the client said so), acked without a claim.
    let mut m = crate::wire::encode_stream_head(5).to_vec();
    m.extend_from_slice(&Envelope::encode(None, b"old"));
    assert_eq!(
        b.handle_stream_message(t, Bytes::from(m)),
        StreamStatus::Now(crate::wire::STREAM_DELIVERED)
    );
    assert!(b.receiver.poll_claim().is_none());
    assert!(b.receiver.poll_delivery().is_none());
}
