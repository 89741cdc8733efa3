//! Which message ids were delivered (a bounded window above a low watermark), and which
//! idempotency keys were (a bounded map with a TTL).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

/// What the window says about an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not delivered before: deliver it (the window now records it).
    New,
    /// Delivered before (or below the watermark): do not deliver; re-ack.
    Duplicate,
    /// Too far above the watermark to track: neither deliver nor ack; the sender will retry.
    OutOfWindow,
}

/// Delivered ids: every id below `floor`, plus a set above it of at most `window` ids' span.
///
/// The floor advances past every id delivered contiguously. A hole (an id below delivered
/// ones, never delivered) holds the floor up; after `hole_ttl` without progress the floor
/// jumps past it: the sender gives up on a message at its deadline, so `hole_ttl` must exceed
/// the sender's deadline plus an RTT, and then no ack for the skipped id can reach a sender
/// still waiting for it.
#[derive(Clone, Debug)]
pub struct DedupeWindow {
    floor: u64,
    above: BTreeSet<u64>,
    window: u64,
    hole_ttl: Duration,
    stuck_since: Option<Instant>,
}

impl DedupeWindow {
    /// A window tracking ids up to `window` above the floor, skipping holes after `hole_ttl`.
    pub fn new(window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor: 0,
            above: BTreeSet::new(),
            window: window.max(1),
            hole_ttl,
            stuck_since: None,
        }
    }

    /// A window whose floor starts at `floor`: every id below it counts as delivered (for a
    /// channel taken over from another server: the client says every id below was acked or
    /// given up).
    pub fn starting_at(floor: u64, window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor,
            ..DedupeWindow::new(window, hole_ttl)
        }
    }

    /// What [`DedupeWindow::check`] would answer for `id`, without recording it.
    pub fn peek(&mut self, now: Instant, id: u64) -> Seen {
        self.expire_holes(now);
        if id < self.floor || self.above.contains(&id) {
            Seen::Duplicate
        } else if id - self.floor >= self.window {
            Seen::OutOfWindow
        } else {
            Seen::New
        }
    }

    /// Records a delivery of `id` if it is new.
    pub fn check(&mut self, now: Instant, id: u64) -> Seen {
        self.expire_holes(now);
        if id < self.floor || self.above.contains(&id) {
            return Seen::Duplicate;
        }
        if id - self.floor >= self.window {
            return Seen::OutOfWindow;
        }
        self.above.insert(id);
        let before = self.floor;
        while self.above.first() == Some(&self.floor) {
            self.above.pop_first();
            self.floor += 1;
        }
        // The hole timer runs from the last progress of the floor.
        self.stuck_since = match (self.above.is_empty(), self.floor != before) {
            (true, _) => None,
            (false, true) => Some(now),
            (false, false) => self.stuck_since.or(Some(now)),
        };
        Seen::New
    }

    /// Whether `id` was delivered (or lies below the floor).
    pub fn contains(&self, id: u64) -> bool {
        id < self.floor || self.above.contains(&id)
    }

    /// Every id below this is delivered or was given up on.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Ids tracked above the floor.
    pub fn tracked(&self) -> usize {
        self.above.len()
    }

    /// Delivered ids as at most `max` ranges, newest first; the oldest range always reaches
    /// down to id 0 (everything below the floor) when it fits, so one ack says everything.
    pub fn ranges(&self, max: usize) -> Vec<RangeInclusive<u64>> {
        let mut ranges: Vec<RangeInclusive<u64>> = Vec::new();
        for &id in self.above.iter().rev() {
            match ranges.last_mut() {
                Some(r) if *r.start() == id + 1 => *r = id..=*r.end(),
                _ => {
                    if ranges.len() == max {
                        return ranges;
                    }
                    ranges.push(id..=id);
                }
            }
        }
        if self.floor > 0 {
            let joins = ranges.last().is_some_and(|r| *r.start() == self.floor);
            if joins {
                let last = ranges.last_mut().expect("checked");
                *last = 0..=*last.end();
            } else if ranges.len() < max {
                ranges.push(0..=self.floor - 1);
            }
        }
        ranges
    }

    fn expire_holes(&mut self, now: Instant) {
        let Some(since) = self.stuck_since else {
            return;
        };
        if now.saturating_duration_since(since) < self.hole_ttl {
            return;
        }
        // Skip the hole: the floor moves to the lowest delivered id above it, then on.
        if let Some(&lowest) = self.above.first() {
            self.floor = lowest;
            while self.above.first() == Some(&self.floor) {
                self.above.pop_first();
                self.floor += 1;
            }
        }
        self.stuck_since = (!self.above.is_empty()).then_some(now);
    }
}

/// Idempotency keys delivered within the last `ttl`, at most `max_keys` of them.
///
/// Keys expire `ttl` after their delivery (payment APIs keep theirs 24 h). When `max_keys`
/// unexpired keys are held, the oldest is forgotten early and counted in
/// [`KeyWindow::evicted`]: memory stays bounded, and the count says when the bound was too
/// small for the traffic.
#[derive(Clone, Debug)]
pub struct KeyWindow {
    ttl: Duration,
    max_keys: usize,
    keys: HashMap<bytes::Bytes, Instant>,
    order: VecDeque<(Instant, bytes::Bytes)>,
    evicted: u64,
}

impl KeyWindow {
    /// A window remembering keys for `ttl`, at most `max_keys` (at least 1) at a time.
    pub fn new(ttl: Duration, max_keys: usize) -> Self {
        KeyWindow {
            ttl,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Records `key` as delivered at `now`; `false` if it was delivered within the TTL.
    pub fn check(&mut self, now: Instant, key: &bytes::Bytes) -> bool {
        self.expire(now);
        if self.keys.contains_key(key) {
            return false;
        }
        if self.keys.len() >= self.max_keys {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.keys.remove(&oldest);
                self.evicted += 1;
            }
        }
        self.keys.insert(key.clone(), now);
        self.order.push_back((now, key.clone()));
        true
    }

    /// Whether `key` was delivered within the TTL, without recording it.
    pub fn contains(&mut self, now: Instant, key: &bytes::Bytes) -> bool {
        self.expire(now);
        self.keys.contains_key(key)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Unexpired keys forgotten because `max_keys` were held.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            let (_, key) = self.order.pop_front().expect("checked");
            self.keys.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_dedupe_within_ttl_and_stay_bounded() {
        let t0 = Instant::now();
        let key = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
        let mut w = KeyWindow::new(Duration::from_secs(10), 3);
        assert!(w.check(t0, &key("a")));
        assert!(
            !w.check(t0 + Duration::from_secs(9), &key("a")),
            "within the TTL"
        );
        assert!(
            w.check(t0 + Duration::from_secs(10), &key("a")),
            "expired, then new"
        );
        assert!(w.check(t0 + Duration::from_secs(10), &key("b")));
        assert!(w.check(t0 + Duration::from_secs(10), &key("c")));
        assert_eq!((w.len(), w.evicted()), (3, 0));
        // A fourth key evicts the oldest unexpired one.
        assert!(w.check(t0 + Duration::from_secs(11), &key("d")));
        assert_eq!((w.len(), w.evicted()), (3, 1));
        assert!(!w.check(t0 + Duration::from_secs(11), &key("d")));
        assert!(
            w.check(t0 + Duration::from_secs(11), &key("a")),
            "evicted: forgotten"
        );
    }

    #[test]
    fn floor_window_ranges_and_holes() {
        let t0 = Instant::now();
        let mut w = DedupeWindow::new(100, Duration::from_secs(10));
        for id in [0, 1, 2, 5, 6, 9] {
            assert_eq!(w.check(t0, id), Seen::New);
        }
        assert_eq!(w.check(t0, 1), Seen::Duplicate);
        assert_eq!(w.check(t0, 6), Seen::Duplicate);
        assert_eq!(w.floor(), 3);
        assert_eq!(w.ranges(10), vec![9..=9, 5..=6, 0..=2]);
        assert_eq!(w.ranges(2), vec![9..=9, 5..=6]);
        assert_eq!(w.check(t0, 103), Seen::OutOfWindow);
        assert!(!w.contains(103) && !w.contains(3) && w.contains(5));
        // Filling the hole moves the floor.
        w.check(t0, 3);
        w.check(t0, 4);
        assert_eq!((w.floor(), w.ranges(10)), (7, vec![9..=9, 0..=6]));
        // Hole at 7, 8 never filled: after the TTL the floor skips it.
        w.check(t0 + Duration::from_secs(5), 11);
        assert_eq!(w.floor(), 7);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 20), Seen::New);
        assert_eq!(w.floor(), 10);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 8), Seen::Duplicate);
    }
}
