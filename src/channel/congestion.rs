//! A congestion-controller wrapper that keeps a silent path probe-able.
//!
//! Through an outage every packet in flight is lost, but quinn learns of it only from an
//! ACK: its congestion window stays full of packets that will never be acknowledged, and
//! nothing the application queues (surelink's probes included) leaves before a probe
//! timeout, which doubles through the outage (`pto × 2^n`). When the link returns, the
//! next packet can be seconds away. [`SilenceFloor`] wraps a controller (BBR by default)
//! and, once nothing has been acknowledged for `silence` while packets were sent, lets
//! packets go beyond the window: what is sent then is decided by the application (the
//! surelink sender probes at a fixed interval and spends no redundancy into a silent
//! path). The first ACK ends the silence and the inner controller's window applies
//! again.
//!
//! The packets lost in the outage are declared lost at that first ACK, and the inner
//! controller would answer as to congestion (BBR's recovery cuts its window to what is in
//! flight) just when the messages sent into the outage need resending. Worse, quinn's BBR
//! on a channel that was app-limited until then enters PROBE_RTT (a window of four packets
//! for 200 ms and more) the first time it is not, which is right after an outage (measured:
//! 480 KB to 5.8 KB after a 2 s outage). A path that went dead is not a congested one, so:
//! losses of packets sent before the silence ended are not passed to the inner controller
//! (losses of packets sent after it are, as always); and for a few round trips after the
//! silence the window is at least what it was before it, until the backlog fits the inner
//! window past its PROBE_RTT, at most a second, and no longer once a packet sent after the
//! silence is lost (the path may have come back narrower).
//!
//! PROBE_RTT outside outages is held too. quinn's BBR takes its least round trip from
//! quinn's RTT estimator, the least over the connection's life, so its PROBE_RTT (a window
//! of about four packets for 200 ms) measures nothing it uses; and it enters it the first
//! time the channel is not app-limited, which at a high rate is its first tenth of a
//! second. Measured on loopback at 20,000 messages a second: a 130-200 ms stall at the
//! start in 3 runs of 4, 8,600-14,000 resends, p99 137-201 ms; Cubic, without the stall,
//! 4.7-5.2 ms. So while the inner window is at PROBE_RTT's size and nothing was lost since
//! it was larger, the window stays at that larger size, for at most 300 ms (PROBE_RTT's
//! 200 ms and a few round trips: on a path whose bandwidth-delay product is a few packets
//! the inner window can stay that small for good).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// Builds [`SilenceFloor`] controllers around `inner`'s.
#[derive(Debug)]
pub struct SilenceFloorConfig<F> {
    inner: Arc<F>,
    silence: Duration,
    floor: u64,
}

impl<F> SilenceFloorConfig<F> {
    /// Wraps `inner`: after `silence` without an acknowledgement, `floor` bytes may be sent
    /// beyond what is in flight.
    pub fn new(inner: Arc<F>, silence: Duration, floor: u64) -> Self {
        SilenceFloorConfig {
            inner,
            silence,
            floor,
        }
    }
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for SilenceFloorConfig<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(SilenceFloor {
            inner: self.inner.clone().build(now, current_mtu),
            mtu: u64::from(current_mtu),
            silence: self.silence,
            floor: self.floor,
            last_ack: now,
            in_flight: 0,
            sent_since: 0,
            silent: false,
            resumed_at: None,
            before_silence: 0,
            held_until: None,
            hold_limit: None,
            steady: 0,
            small_since: None,
        })
    }
}

/// A controller whose window, after a silence, stays open by a floor above what is in
/// flight (see the module docs).
pub struct SilenceFloor {
    inner: Box<dyn Controller>,
    silence: Duration,
    floor: u64,
    last_ack: Instant,
    /// Bytes in flight at the last batch of acks.
    in_flight: u64,
    /// Bytes sent since then.
    sent_since: u64,
    silent: bool,
    /// When the last silence ended (its first ACK): losses of packets sent before are the
    /// outage's, not congestion.
    resumed_at: Option<Instant>,
    /// The inner window as the silence began, and until when it holds after the silence
    /// ended (see [`SilenceFloor::window`]): at least [`HOLD_ROUND_TRIPS`], then until the
    /// backlog fits the inner window past its PROBE_RTT, at most [`MAX_HOLD`]; a loss of a
    /// packet sent after the silence ends it at once.
    before_silence: u64,
    held_until: Option<Instant>,
    /// The path's current MTU.
    mtu: u64,
    /// The latest a hold lasts.
    hold_limit: Option<Instant>,
    /// The inner window when it was last above PROBE_RTT's size with no loss since (0 after
    /// a loss, or once the inner window has been that small for [`PROBE_RTT_HOLD`]): the
    /// window while the inner one is at PROBE_RTT's size.
    steady: u64,
    /// Since when the inner window has been at PROBE_RTT's size.
    small_since: Option<Instant>,
}

/// Round trips (the least seen) the window from before a silence holds after it ends, at
/// least; it holds on while the inner window is at its PROBE_RTT size (a few packets), for
/// at most [`MAX_HOLD`].
const HOLD_ROUND_TRIPS: u32 = 4;
const MAX_HOLD: Duration = Duration::from_secs(1);
/// An inner window at most this many packets is taken for PROBE_RTT's (four packets).
const PROBE_RTT_PACKETS: u64 = 8;
/// The longest the window from before a PROBE_RTT holds: its 200 ms and a few round trips.
const PROBE_RTT_HOLD: Duration = Duration::from_millis(300);

impl Controller for SilenceFloor {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        if self.in_flight == 0 && self.sent_since == 0 {
            // The first packet after an idle spell (nothing in flight, nothing sent since
            // the last ACK): a silence counts from here, not from the last ACK.
            self.last_ack = now;
        }
        self.sent_since = self.sent_since.saturating_add(bytes);
        let silent = now.saturating_duration_since(self.last_ack) >= self.silence;
        if silent && !self.silent {
            self.before_silence = self.inner.window();
        }
        self.silent = silent;
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.last_ack = now;
        if self.silent {
            self.resumed_at = Some(now);
            self.held_until = Some(now + rtt.min() * HOLD_ROUND_TRIPS);
            self.hold_limit = Some(now + MAX_HOLD);
        }
        self.silent = false;
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.in_flight = in_flight;
        self.sent_since = 0;
        // The inner controller answers these acks (and any loss reported before them) first:
        // its window is read after. While PROBE_RTT's hold keeps more in flight than its
        // four packets, it is told the pipe has drained: quinn's BBR starts PROBE_RTT's
        // 200 ms only once it sees that, and would otherwise stay in PROBE_RTT until the
        // hold ran out, then drain the pipe and start the 200 ms (measured at 50,000
        // messages a second: a 215 ms stall in one run of five).
        let holding = self.steady > 0 && self.small_since.is_some();
        let told = if holding {
            in_flight.min(self.mtu)
        } else {
            in_flight
        };
        self.inner
            .on_end_acks(now, told, app_limited, largest_packet_num_acked);
        let inner = self.inner.window();
        let probing_rtt = inner <= PROBE_RTT_PACKETS * self.mtu;
        // PROBE_RTT's hold: from the larger window it fell from, for at most
        // PROBE_RTT_HOLD (on a path whose BDP is a few packets the inner window may stay
        // that small for good).
        if !probing_rtt {
            self.steady = inner;
            self.small_since = None;
        } else if self.steady > 0 {
            let since = *self.small_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= PROBE_RTT_HOLD {
                self.steady = 0;
            }
        }
        // The hold after a silence ends once the backlog fits the inner window, which is
        // past PROBE_RTT.
        let settled = !probing_rtt && in_flight <= inner;
        if self.held_until.is_some_and(|until| now >= until)
            && (settled || self.hold_limit.is_some_and(|limit| now >= limit))
        {
            self.held_until = None;
        }
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.resumed_at.is_some_and(|resumed| sent < resumed) {
            // Packets sent into the outage (`sent` is the latest lost packet's send time).
            return;
        }
        // A loss of a packet sent after the path returned: the window from before the
        // outage no longer holds (the path may have come back narrower); nor does the one
        // from before a PROBE_RTT.
        self.held_until = None;
        self.steady = 0;
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let mut window = self.inner.window();
        // For a few round trips after a silence the window is at least what it was before
        // it: what went into the outage needs resending, and quinn's BBR, which has never
        // probed its round trip while the channel was app-limited, enters PROBE_RTT (a
        // window of four packets for 200 ms and more) the first time it is not (measured:
        // 480 KB to 5.8 KB right after a 2 s outage).
        if self.held_until.is_some() {
            window = window.max(self.before_silence);
        }
        // PROBE_RTT (see the module docs): the window from before it, unless a loss since.
        if window <= PROBE_RTT_PACKETS * self.mtu {
            window = window.max(self.steady);
        }
        if self.silent {
            window.max(self.in_flight + self.sent_since + self.floor)
        } else {
            window
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(SilenceFloor {
            inner: self.inner.clone_box(),
            silence: self.silence,
            floor: self.floor,
            last_ack: self.last_ack,
            in_flight: self.in_flight,
            sent_since: self.sent_since,
            silent: self.silent,
            resumed_at: self.resumed_at,
            before_silence: self.before_silence,
            held_until: self.held_until,
            hold_limit: self.hold_limit,
            mtu: self.mtu,
            steady: self.steady,
            small_since: self.small_since,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// An inner controller whose window the test scripts; like quinn's BBR it takes its new
    /// window when a batch of acks ends (after a loss too: its recovery window starts
    /// there).
    #[derive(Clone)]
    struct Scripted {
        next: Arc<AtomicU64>,
        window: u64,
        /// The bytes in flight it was last told.
        told: Arc<AtomicU64>,
    }

    impl Controller for Scripted {
        fn on_end_acks(&mut self, _: Instant, in_flight: u64, _: bool, _: Option<u64>) {
            self.window = self.next.load(Ordering::Relaxed);
            self.told.store(in_flight, Ordering::Relaxed);
        }
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {}
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            self.window
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            14_720
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    struct ScriptedConfig(Arc<AtomicU64>, Arc<AtomicU64>);

    impl ControllerFactory for ScriptedConfig {
        fn build(self: Arc<Self>, _: Instant, _: u16) -> Box<dyn Controller> {
            Box::new(Scripted {
                next: self.0.clone(),
                window: 14_720,
                told: self.1.clone(),
            })
        }
    }

    fn wrapped(next: &Arc<AtomicU64>, t: Instant) -> Box<dyn Controller> {
        wrapped_telling(next, &Arc::new(AtomicU64::new(0)), t)
    }

    fn wrapped_telling(
        next: &Arc<AtomicU64>,
        told: &Arc<AtomicU64>,
        t: Instant,
    ) -> Box<dyn Controller> {
        let config = Arc::new(SilenceFloorConfig::new(
            Arc::new(ScriptedConfig(next.clone(), told.clone())),
            Duration::from_millis(500),
            6000,
        ));
        config.build(t, 1200)
    }

    /// The inner window falls to PROBE_RTT's size with no loss: the wrapper keeps the
    /// window from before, for at most PROBE_RTT_HOLD; then it follows the inner one.
    #[test]
    fn probe_rtt_is_held_for_a_while() {
        let t = Instant::now();
        let next = Arc::new(AtomicU64::new(400_000));
        let told = Arc::new(AtomicU64::new(0));
        let mut c = wrapped_telling(&next, &told, t);
        let acks = |c: &mut Box<dyn Controller>, ms: u64| {
            c.on_end_acks(t + Duration::from_millis(ms), 100_000, false, Some(ms));
            c.window()
        };
        assert_eq!(acks(&mut c, 0), 400_000);
        assert_eq!(told.load(Ordering::Relaxed), 100_000);
        next.store(4 * 1200, Ordering::Relaxed);
        assert_eq!(acks(&mut c, 10), 400_000);
        // While held, the inner controller is told the pipe drained (so its PROBE_RTT runs
        // its 200 ms and ends).
        assert_eq!(acks(&mut c, 250), 400_000);
        assert_eq!(told.load(Ordering::Relaxed), 1200);
        assert_eq!(acks(&mut c, 320), 4 * 1200, "held past PROBE_RTT_HOLD");
        assert_eq!(acks(&mut c, 330), 4 * 1200);
        assert_eq!(told.load(Ordering::Relaxed), 100_000);
        assert_eq!(acks(&mut c, 400), 4 * 1200);
        next.store(300_000, Ordering::Relaxed);
        assert_eq!(acks(&mut c, 410), 300_000);
    }

    /// A loss answered by a small recovery window (applied, as quinn's BBR does, when the
    /// next batch of acks ends) is followed, not held.
    #[test]
    fn a_loss_is_answered_by_the_inner_window() {
        let t = Instant::now();
        let next = Arc::new(AtomicU64::new(400_000));
        let mut c = wrapped(&next, t);
        c.on_end_acks(t, 1200, false, Some(0));
        assert_eq!(c.window(), 400_000);
        let later = t + Duration::from_millis(10);
        c.on_sent(t, 1200, 1);
        c.on_congestion_event(later, t, false, 1200);
        next.store(4 * 1200, Ordering::Relaxed);
        c.on_end_acks(later, 1200, false, Some(2));
        assert_eq!(c.window(), 4 * 1200);
    }
}
