//! Which message ids were delivered: a bounded window above a low watermark, and what the
//! watermark passed without a delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

/// What the window says about an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not delivered before: deliver it (the window now records it).
    New,
    /// Delivered before: do not deliver; re-ack.
    Duplicate,
    /// Too far above the watermark to track: neither deliver nor ack (the receiver refuses
    /// it).
    OutOfWindow,
    /// Below the watermark, which passed it without a delivery (its hole outlived the TTL, or
    /// the sender's FLOOR passed it): never delivered, and never will be (the receiver
    /// refuses it).
    Passed,
    /// Below what the window remembers ([`DedupeWindow::base`]): it cannot tell whether the id
    /// was delivered, so it neither delivers nor acks nor refuses it.
    Unknown,
}

/// Most ranges of passed ids remembered below the floor; past it the oldest is let go and
/// [`DedupeWindow::base`] rises above it.
pub const MAX_PASSED_RANGES: usize = 1024;

/// Delivered ids: every id in `base .. floor` except the *passed* ranges, plus a set above the
/// floor of at most `window` ids' span.
///
/// Invariants:
/// - **An id is named delivered only if it was delivered** ([`DedupeWindow::contains`],
///   [`DedupeWindow::ack_ranges`]). Below the floor the window keeps the ranges the floor
///   passed without a delivery (`passed`), and `base`: below it nothing is known (the window
///   started there, or let the oldest passed ranges go), so nothing below it is ever acked.
/// - The floor advances past every id delivered contiguously. A hole (an id below delivered
///   ones, never delivered) holds the floor up until one of:
///   - the sender says every id below some point has its outcome
///     ([`DedupeWindow::advance_to`], from a FLOOR frame): the floor moves there at once;
///   - `hole_ttl` passes without progress: the floor jumps past the hole (a fallback for a
///     sender that sends no FLOOR).
///
///   Either way the ids it jumps over are *passed*: never delivered, refused if they come.
/// - Neither ever moves the floor past a *pinned* id ([`DedupeWindow::pin`]: a message whose
///   claim is pending), so a claim that answers late still finds its id above the floor.
/// - Memory: ids above the floor are held as disjoint ranges (memory grows with the number of
///   holes, not of ids), passed ranges are at most [`MAX_PASSED_RANGES`].
#[derive(Clone, Debug)]
pub struct DedupeWindow {
    floor: u64,
    /// Below it, nothing is known.
    base: u64,
    /// Ids in `base .. floor` passed without a delivery: start → end (inclusive), disjoint.
    passed: BTreeMap<u64, u64>,
    /// Delivered ids above the floor: start → end (inclusive), disjoint and never adjacent,
    /// every start above `floor`.
    above: BTreeMap<u64, u64>,
    /// Ids in `above`.
    tracked: u64,
    window: u64,
    hole_ttl: Duration,
    stuck_since: Option<Instant>,
    /// Ids the floor must not pass (claims pending).
    pins: BTreeSet<u64>,
}

impl DedupeWindow {
    /// A window tracking ids up to `window` above the floor, skipping holes after `hole_ttl`.
    pub fn new(window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor: 0,
            base: 0,
            passed: BTreeMap::new(),
            above: BTreeMap::new(),
            tracked: 0,
            window: window.max(1),
            hole_ttl,
            stuck_since: None,
            pins: BTreeSet::new(),
        }
    }

    /// A window whose floor starts at `floor` (for a channel taken over from another server:
    /// the client says every id below it was acked or given up). What happened to the ids
    /// below is not known here: they are neither delivered nor acked ([`Seen::Unknown`]).
    pub fn starting_at(floor: u64, window: u64, hole_ttl: Duration) -> Self {
        DedupeWindow {
            floor,
            base: floor,
            ..DedupeWindow::new(window, hole_ttl)
        }
    }

    /// What [`DedupeWindow::check`] would answer for `id`, without recording it.
    pub fn peek(&mut self, now: Instant, id: u64) -> Seen {
        self.expire_holes(now);
        if id < self.base {
            Seen::Unknown
        } else if self.is_passed(id) {
            Seen::Passed
        } else if self.contains(id) {
            Seen::Duplicate
        } else if id - self.floor >= self.window {
            Seen::OutOfWindow
        } else {
            Seen::New
        }
    }

    /// Records a delivery of `id` if it is new.
    pub fn check(&mut self, now: Instant, id: u64) -> Seen {
        let seen = self.peek(now, id);
        if seen != Seen::New {
            return seen;
        }
        let before = self.floor;
        self.insert(id);
        self.absorb();
        // The hole timer runs from the last progress of the floor.
        self.stuck_since = match (self.above.is_empty(), self.floor != before) {
            (true, _) => None,
            (false, true) => Some(now),
            (false, false) => self.stuck_since.or(Some(now)),
        };
        Seen::New
    }

    /// Adds `id` (at or above the floor, not held) to `above`, merging with neighbours.
    fn insert(&mut self, id: u64) {
        let prev = self
            .above
            .range(..id)
            .next_back()
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e + 1 == id);
        let next = id
            .checked_add(1)
            .and_then(|n| self.above.remove(&n).map(|e| (n, e)));
        let start = prev.map_or(id, |(s, _)| s);
        let end = next.map_or(id, |(_, e)| e);
        self.above.insert(start, end);
        self.tracked += 1;
    }

    /// Moves the floor over a range starting at it.
    fn absorb(&mut self) {
        if let Some(end) = self.above.remove(&self.floor) {
            self.tracked -= end - self.floor + 1;
            self.floor = end + 1;
        }
    }

    /// Moves the floor up to `target`: the ids in between that were not delivered are passed.
    fn pass_to(&mut self, target: u64) {
        while self.floor < target {
            match self.above.first_key_value().map(|(&s, &e)| (s, e)) {
                Some((s, e)) if s <= target => {
                    if s > self.floor {
                        self.add_passed(self.floor, s - 1);
                    }
                    self.above.pop_first();
                    self.tracked -= e - s + 1;
                    self.floor = e + 1;
                }
                _ => {
                    self.add_passed(self.floor, target - 1);
                    self.floor = target;
                }
            }
        }
        self.absorb();
    }

    fn add_passed(&mut self, start: u64, end: u64) {
        // Adjacent to the last passed range: extend it.
        if let Some((_, e)) = self.passed.iter_mut().next_back() {
            if *e + 1 == start {
                *e = end;
                return;
            }
        }
        self.passed.insert(start, end);
        while self.passed.len() > MAX_PASSED_RANGES {
            let (_, e) = self.passed.pop_first().expect("not empty");
            self.base = e + 1;
        }
    }

    fn is_passed(&self, id: u64) -> bool {
        id < self.floor
            && self
                .passed
                .range(..=id)
                .next_back()
                .is_some_and(|(_, &e)| e >= id)
    }

    /// Whether `id` was delivered.
    pub fn contains(&self, id: u64) -> bool {
        if id < self.floor {
            return id >= self.base && !self.is_passed(id);
        }
        self.above
            .range(..=id)
            .next_back()
            .is_some_and(|(_, &e)| e >= id)
    }

    /// Whether `id` is below the floor (delivered, passed or unknown: never delivered again).
    pub fn below_floor(&self, id: u64) -> bool {
        id < self.floor
    }

    /// Every id below this is delivered, passed or below [`DedupeWindow::base`].
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Below this the window does not know what was delivered.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Ids tracked above the floor.
    pub fn tracked(&self) -> usize {
        usize::try_from(self.tracked).unwrap_or(usize::MAX)
    }

    /// Keeps the floor from passing `id` (a message whose claim is pending) until
    /// [`DedupeWindow::unpin`].
    pub fn pin(&mut self, id: u64) {
        if id >= self.floor {
            self.pins.insert(id);
        }
    }

    /// Releases a [`DedupeWindow::pin`].
    pub fn unpin(&mut self, id: u64) {
        self.pins.remove(&id);
    }

    /// The sender says every id below `floor` has its outcome (acked or given up): the floor
    /// moves up to it (never down, and never past a pinned id); the ids it passes that were
    /// not delivered are passed. Whether it moved.
    pub fn advance_to(&mut self, now: Instant, floor: u64) -> bool {
        let target = self.pins.first().map_or(floor, |&p| p.min(floor));
        if target <= self.floor {
            return false;
        }
        self.pass_to(target);
        self.stuck_since = (!self.above.is_empty()).then_some(now);
        true
    }

    /// The delivered runs below the floor, highest first: `[base, floor)` less the passed
    /// ranges.
    fn below_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut hi = self.floor;
        let mut gaps = self.passed.iter().rev();
        let mut done = self.floor <= self.base;
        std::iter::from_fn(move || loop {
            if done {
                return None;
            }
            match gaps.next() {
                Some((&s, &e)) => {
                    let run = (e + 1 < hi).then(|| (e + 1, hi - 1));
                    hi = s;
                    if run.is_some() {
                        return run;
                    }
                }
                None => {
                    done = true;
                    return (self.base < hi).then(|| (self.base, hi - 1));
                }
            }
        })
    }

    /// Delivered ids for an ack, as at most `max` ranges in descending order, leaving out
    /// the ids in `withheld` (delivered but not to be acked yet). In order of priority:
    /// 1. the lowest delivered run below the floor (the range from id 0 when nothing was
    ///    passed) and the run just below the floor;
    /// 2. the range around each id in `triggers` (the ids that caused this ack: new
    ///    deliveries, re-sent copies), so an ack always names what it answers, however many
    ///    holes lie above;
    /// 3. the newest ranges.
    ///
    /// Passed ids and ids below [`DedupeWindow::base`] are never named.
    pub fn ack_ranges<V>(
        &self,
        max: usize,
        triggers: &[u64],
        withheld: &BTreeMap<u64, V>,
    ) -> Vec<RangeInclusive<u64>> {
        let max = max.max(1);
        let mut out: Vec<RangeInclusive<u64>> = Vec::new();
        let add = |r: Option<RangeInclusive<u64>>, out: &mut Vec<RangeInclusive<u64>>| {
            if let Some(r) = r {
                if out.len() < max && !out.contains(&r) {
                    out.push(r);
                }
            }
        };
        if self.floor > self.base {
            let lowest = if self.passed.is_empty() {
                Some(self.base)
            } else {
                self.below_runs().last().map(|(s, _)| s)
            };
            if let Some(low) = lowest {
                add(self.piece_around(low, withheld), &mut out);
            }
            add(self.piece_around(self.floor - 1, withheld), &mut out);
        }
        for &id in triggers {
            add(self.piece_around(id, withheld), &mut out);
        }
        // Newest first: ranges above the floor from the top, then the runs below it, each
        // split around withheld ids.
        let spans = self
            .above
            .iter()
            .rev()
            .map(|(&s, &e)| (s, e))
            .chain(self.below_runs());
        'fill: for (s, e) in spans {
            let mut hi = e;
            let mut cuts = withheld.range(s..=e).rev().map(|(id, _)| id);
            loop {
                if out.len() >= max {
                    break 'fill;
                }
                match cuts.next() {
                    Some(&w) => {
                        if w < hi {
                            add(Some(w + 1..=hi), &mut out);
                        }
                        if w == s {
                            break;
                        }
                        hi = w - 1;
                    }
                    None => {
                        add(Some(s..=hi), &mut out);
                        break;
                    }
                }
            }
        }
        out.sort_by(|a, b| b.start().cmp(a.start()));
        out
    }

    /// The largest run of ackable ids (delivered, not withheld) around `id`, if it is one.
    fn piece_around<V>(&self, id: u64, withheld: &BTreeMap<u64, V>) -> Option<RangeInclusive<u64>> {
        if withheld.contains_key(&id) || !self.contains(id) {
            return None;
        }
        let (s, e) = if id < self.floor {
            let s = self
                .passed
                .range(..id)
                .next_back()
                .map_or(self.base, |(_, &e)| e + 1);
            let e = self
                .passed
                .range(id..)
                .next()
                .map_or(self.floor - 1, |(&s, _)| s - 1);
            (s, e)
        } else {
            let (&s, &e) = self.above.range(..=id).next_back()?;
            (s, e)
        };
        let lo = withheld.range(s..id).next_back().map_or(s, |(&w, _)| w + 1);
        let hi = if id < e {
            withheld.range(id + 1..=e).next().map_or(e, |(&w, _)| w - 1)
        } else {
            e
        };
        Some(lo..=hi)
    }

    fn expire_holes(&mut self, now: Instant) {
        let Some(since) = self.stuck_since else {
            return;
        };
        if now.saturating_duration_since(since) < self.hole_ttl {
            return;
        }
        // Skip the hole: the floor moves to the lowest delivered id above it (never past a
        // pinned id), then on; the hole's ids are passed.
        if let Some((&lowest, _)) = self.above.first_key_value() {
            let target = self.pins.first().map_or(lowest, |&p| p.min(lowest));
            if target > self.floor {
                self.pass_to(target);
            }
        }
        self.stuck_since = (!self.above.is_empty()).then_some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_window_ranges_and_holes() {
        let t0 = Instant::now();
        let none: BTreeMap<u64, ()> = BTreeMap::new();
        let mut w = DedupeWindow::new(100, Duration::from_secs(10));
        for id in [0, 1, 2, 5, 6, 9] {
            assert_eq!(w.check(t0, id), Seen::New);
        }
        assert_eq!(w.check(t0, 1), Seen::Duplicate);
        assert_eq!(w.check(t0, 6), Seen::Duplicate);
        assert_eq!(w.floor(), 3);
        assert_eq!(w.tracked(), 3);
        assert_eq!(w.ack_ranges(10, &[], &none), vec![9..=9, 5..=6, 0..=2]);
        assert_eq!(w.ack_ranges(2, &[], &none), vec![9..=9, 0..=2]);
        assert_eq!(w.ack_ranges(2, &[5], &none), vec![5..=6, 0..=2]);
        assert_eq!(w.check(t0, 103), Seen::OutOfWindow);
        assert!(!w.contains(103) && !w.contains(3) && w.contains(5));
        // Filling the hole moves the floor.
        w.check(t0, 3);
        w.check(t0, 4);
        assert_eq!(
            (w.floor(), w.ack_ranges(10, &[], &none)),
            (7, vec![9..=9, 0..=6])
        );
        // Hole at 7, 8 never filled: after the TTL the floor skips it.
        w.check(t0 + Duration::from_secs(5), 11);
        assert_eq!(w.floor(), 7);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 20), Seen::New);
        assert_eq!(w.floor(), 10);
        assert_eq!(w.check(t0 + Duration::from_secs(11), 8), Seen::Passed);
        assert!(!w.contains(7) && !w.contains(8) && w.contains(9));
    }

    /// Issue 21 case 3: after the hole TTL (or a FLOOR) passes a missing id, acks never name
    /// it, and a late copy of it is `Passed` (refused), not a duplicate (re-acked).
    #[test]
    fn acks_never_name_ids_the_floor_passed() {
        let t0 = Instant::now();
        let none: BTreeMap<u64, ()> = BTreeMap::new();
        let ttl = Duration::from_secs(30);
        let mut w = DedupeWindow::new(1000, ttl);
        for id in [0, 2, 3] {
            w.check(t0, id);
        }
        assert_eq!(w.check(t0 + ttl, 4), Seen::New, "the hole at 1 expires");
        assert_eq!(w.floor(), 5);
        let r = w.ack_ranges(16, &[4], &none);
        assert_eq!(r, vec![2..=4, 0..=0]);
        assert!(!r.iter().any(|r| r.contains(&1)), "{r:?}");
        assert_eq!(w.check(t0 + ttl, 1), Seen::Passed);
        // A FLOOR over undelivered ids passes them too.
        w.check(t0 + ttl, 7);
        assert!(w.advance_to(t0 + ttl, 10));
        assert_eq!(w.ack_ranges(16, &[], &none), vec![7..=7, 2..=4, 0..=0]);
        for id in [5, 6, 8, 9] {
            assert_eq!(w.peek(t0 + ttl, id), Seen::Passed, "{id}");
        }
        // A window started above 0 (a channel taken over) knows nothing below its start.
        let mut w = DedupeWindow::starting_at(100, 1000, ttl);
        assert_eq!(w.check(t0, 50), Seen::Unknown);
        assert_eq!(w.check(t0, 100), Seen::New);
        assert_eq!(w.ack_ranges(16, &[], &none), vec![100..=100]);
        // Passed ranges are bounded: the oldest are let go and the base rises above them.
        let mut w = DedupeWindow::new(1 << 20, ttl);
        for i in 0..(MAX_PASSED_RANGES as u64 + 10) {
            w.check(t0, 2 * i + 1);
            w.advance_to(t0, 2 * i + 2);
        }
        assert!(w.passed.len() <= MAX_PASSED_RANGES);
        assert_eq!(w.peek(t0, 0), Seen::Unknown);
        assert_eq!(w.peek(t0, 1), Seen::Unknown);
        let top = 2 * (MAX_PASSED_RANGES as u64 + 9);
        assert_eq!(w.peek(t0, top), Seen::Passed);
        assert_eq!(w.peek(t0, top + 1), Seen::Duplicate);
        assert!(w
            .ack_ranges(16, &[], &none)
            .iter()
            .all(|r| r.start() % 2 == 1));
    }

    /// Issue case 7: with more holes above the floor than an ack has ranges, an ack still
    /// names the range from 0 and the ids that triggered it.
    #[test]
    fn acks_name_the_floor_and_their_triggers_past_many_holes() {
        let t0 = Instant::now();
        let none: BTreeMap<u64, ()> = BTreeMap::new();
        let mut w = DedupeWindow::new(1000, Duration::from_secs(10));
        // 0 delivered, 1 missing, then 20 holes: 3, 5, ..., 41 delivered.
        w.check(t0, 0);
        for id in (3..=41).step_by(2) {
            w.check(t0, id);
        }
        let r = w.ack_ranges(16, &[], &none);
        assert_eq!(r.len(), 16);
        assert_eq!(r.last(), Some(&(0..=0)), "the range from 0 is always named");
        // A new id below the holes: named.
        assert_eq!(w.check(t0, 10), Seen::New);
        let r = w.ack_ranges(16, &[10], &none);
        assert!(r.contains(&(9..=11)), "{r:?}");
        assert_eq!(r.len(), 16);
        assert!(
            r.windows(2).all(|p| *p[0].start() > p[1].end() + 1),
            "{r:?}"
        );
        // A re-sent old id: named too.
        let r = w.ack_ranges(16, &[5], &none);
        assert!(r.contains(&(5..=5)), "{r:?}");
        // More triggers than ranges: still at most `max` (the wire's limit holds), the
        // range from 0 first.
        let all: Vec<u64> = (0..=41).collect();
        let r = w.ack_ranges(16, &all, &none);
        assert_eq!((r.len(), r.last()), (16, Some(&(0..=0))));
        // Withheld ids are never named, even under the floor.
        let withheld: BTreeMap<u64, ()> = [(0, ()), (10, ())].into();
        let r = w.ack_ranges(64, &[10, 11], &withheld);
        assert!(
            !r.iter().any(|r| r.contains(&0) || r.contains(&10)),
            "{r:?}"
        );
        assert!(r.contains(&(11..=11)), "{r:?}");
    }

    /// Issue cases 3, 4, 5: the sender's floor moves the window at once, but never past a
    /// pinned (claim pending) id; nor does the hole timer.
    #[test]
    fn floor_advances_on_request_but_never_past_a_pin() {
        let t0 = Instant::now();
        let mut w = DedupeWindow::new(64, Duration::from_secs(10));
        assert_eq!(w.check(t0, 1000), Seen::OutOfWindow);
        assert!(w.advance_to(t0, 1000));
        assert!(!w.advance_to(t0, 900), "never backwards");
        assert_eq!(w.check(t0, 1000), Seen::New);
        assert_eq!(w.floor(), 1001);
        // A pending claim at 1001; later ids delivered; the hole timer and the sender's
        // floor both stop at the pin.
        w.pin(1001);
        for id in 1002..1010 {
            w.check(t0, id);
        }
        assert_eq!(w.check(t0 + Duration::from_secs(11), 1020), Seen::New);
        assert_eq!(w.floor(), 1001);
        w.advance_to(t0, 2000);
        assert_eq!(w.floor(), 1001);
        assert!(!w.contains(1001));
        w.unpin(1001);
        assert_eq!(w.check(t0, 1001), Seen::New);
        assert_eq!(w.floor(), 1010);
        w.advance_to(t0, 1030);
        assert_eq!((w.floor(), w.tracked()), (1030, 0));
    }
}
