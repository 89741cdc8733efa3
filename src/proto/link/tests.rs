//! The channel's decisions, driven deterministically on a virtual clock (no quinn, no tokio).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::proto::{HedgeTo, Peer, ReceiverConfig, SenderConfig};

const SIZE: usize = 1200;

fn client(replicas: usize, attached: Attached) -> (Instant, Link) {
    client_with(replicas, attached, LinkConfig::default())
}

fn client_with(replicas: usize, attached: Attached, config: LinkConfig) -> (Instant, Link) {
    let now = Instant::now();
    let link = Link::new(
        now,
        config,
        Role::Client {
            replicas,
            current: 0,
            attached,
        },
        ConnId(1),
        SIZE,
        0,
    );
    (now, link)
}

fn drain(link: &mut Link) -> Vec<Action> {
    std::iter::from_fn(|| link.poll_action()).collect()
}

fn dials(actions: &[Action]) -> Vec<(u64, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Dial { dial, replica, .. } => Some((*dial, *replica)),
            _ => None,
        })
        .collect()
}

fn completions(actions: &[Action]) -> Vec<(u64, Result<Receipt, SendError>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Complete { token, outcome } => Some((*token, outcome.clone())),
            _ => None,
        })
        .collect()
}

fn freed(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::FreeSlot { token } => Some(*token),
            _ => None,
        })
        .collect()
}

fn transmits_to(actions: &[Action], to: ConnId) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Transmit { conn, .. } if *conn == to))
        .count()
}

/// Shard frames sent on `to` (not acks or other control frames).
fn shards_to(actions: &[Action], to: ConnId) -> usize {
    actions
        .iter()
        .filter(|a| match a {
            Action::Transmit { conn, datagram } if *conn == to => matches!(
                crate::wire::Frame::decode(datagram.clone(), &crate::wire::Limits::default()),
                Ok(crate::wire::Frame::Shard(_))
            ),
            _ => false,
        })
        .count()
}

fn stopped(actions: &[Action]) -> bool {
    actions.iter().any(|a| matches!(a, Action::Stop { .. }))
}

fn closes(actions: &[Action]) -> Vec<(ConnId, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close { conn, code, .. } => Some((*conn, *code)),
            _ => None,
        })
        .collect()
}

fn send(link: &mut Link, now: Instant, token: u64, len: usize) {
    link.handle(
        now,
        Input::Send {
            token,
            key: None,
            payload: Bytes::from(vec![7u8; len]),
            deadline: None,
        },
    );
}

fn lose(link: &mut Link, now: Instant, conn: u64) {
    link.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(conn),
            how: Lost::Retryable,
            reason: "timed out".into(),
        },
    );
}

fn dialed(conn: u64, attached: Attached) -> Result<Dialed, DialFailure> {
    Ok(Dialed {
        conn: ConnId(conn),
        attached,
        max_datagram_size: Some(SIZE),
        protocol: 2,
    })
}

fn failed() -> Result<Dialed, DialFailure> {
    Err(DialFailure {
        refused: false,
        reason: "no answer".into(),
    })
}

/// Runs the timer whenever it is due, up to `until`, collecting the actions.
fn run_until(link: &mut Link, now: &mut Instant, until: Instant) -> Vec<Action> {
    let mut out = drain(link);
    while let Some(at) = link.poll_timeout() {
        if at > until {
            break;
        }
        *now = at.max(*now);
        link.handle(*now, Input::Timer);
        out.extend(drain(link));
    }
    *now = until.max(*now);
    out
}

/// A server peer that receives what the link transmits on `conn` and answers with acks.
fn acks_from(server: &mut Peer, now: Instant, actions: &[Action], conn: ConnId) -> Vec<Bytes> {
    for a in actions {
        if let Action::Transmit { conn: c, datagram } = a {
            if *c == conn {
                server.handle_datagram(now, datagram.clone());
            }
        }
    }
    std::iter::from_fn(|| server.poll_transmit()).collect()
}

#[test]
fn reconnect_backs_off_doubling_and_gives_up_with_a_definite_error() {
    let mut config = LinkConfig::default();
    config.reconnect.give_up_after = Duration::from_secs(3);
    let (mut now, mut link) = client_with(1, Attached::Resumed, config);
    send(&mut link, now, 1, 100);
    drain(&mut link);
    let start = now;
    lose(&mut link, now, 1);
    let mut attempts = Vec::new();
    let mut actions = drain(&mut link);
    let give_up = start + link.config.reconnect.give_up_after;
    loop {
        for (dial, replica) in dials(&actions) {
            assert_eq!(replica, 0);
            attempts.push(now - start);
            link.handle(
                now,
                Input::DialDone {
                    dial,
                    result: failed(),
                },
            );
        }
        actions.extend(drain(&mut link));
        if stopped(&actions) {
            break;
        }
        actions.retain(|a| !matches!(a, Action::Dial { .. }));
        let Some(at) = link.poll_timeout() else {
            panic!("no timer while reconnecting")
        };
        assert!(at <= give_up, "a timer past the give-up");
        now = at;
        link.handle(now, Input::Timer);
        actions.extend(drain(&mut link));
    }
    // The wait doubles from 20 ms up to 1 s; no attempt whose backoff would pass the
    // give-up (3 s).
    let ms: Vec<u128> = attempts.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![0, 20, 60, 140, 300, 620, 1260, 2260]);
    let done = completions(&actions);
    assert!(
        matches!(&done[..], [(1, Err(SendError::ConnectionLost { reason }))] if reason.contains("no connection within")),
        "{done:?}"
    );
    assert!(stopped(&actions));
    assert!(link.is_stopped());
}

#[test]
fn a_refused_redial_ends_the_channel_at_once() {
    let (now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 100);
    lose(&mut link, now, 1);
    let (dial, _) = dials(&drain(&mut link))[0];
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: Err(DialFailure {
                refused: true,
                reason: "bad certificate".into(),
            }),
        },
    );
    let actions = drain(&mut link);
    assert!(matches!(
        &completions(&actions)[..],
        [(1, Err(SendError::ConnectionLost { reason }))] if reason.contains("refused")
    ));
    assert!(stopped(&actions));
}

#[test]
fn a_fatal_loss_is_not_redialled() {
    let (now, mut link) = client(1, Attached::Resumed);
    link.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(1),
            how: Lost::Fatal,
            reason: "protocol violation".into(),
        },
    );
    let actions = drain(&mut link);
    assert!(dials(&actions).is_empty());
    assert!(stopped(&actions));
}

#[test]
fn a_lost_primary_fails_over_to_the_warm_standby_without_dialling() {
    let (now, mut link) = client(3, Attached::Claims);
    let first = dials(&drain(&mut link));
    assert_eq!(first.len(), 1, "one standby dial");
    assert_eq!(first[0].1, 1, "to the next replica");
    link.handle(
        now,
        Input::DialDone {
            dial: first[0].0,
            result: dialed(2, Attached::Claims),
        },
    );
    drain(&mut link);
    assert!(link.stats().standby_ready);
    send(&mut link, now, 7, 100);
    let before = drain(&mut link);
    assert!(transmits_to(&before, ConnId(1)) > 0);
    lose(&mut link, now, 1);
    let actions = drain(&mut link);
    assert_eq!(link.primary(), Some(ConnId(2)));
    let s = link.stats();
    assert_eq!((s.standby_failovers, s.failovers, s.reconnects), (1, 1, 1));
    assert!(
        transmits_to(&actions, ConnId(2)) > 0,
        "unacked re-sent on the standby"
    );
    // A new standby is dialled among the others (replica 0 first).
    assert_eq!(
        dials(&actions).iter().map(|d| d.1).collect::<Vec<_>>(),
        vec![0]
    );
    assert!(
        completions(&actions).is_empty(),
        "the message is still in flight"
    );
}

#[test]
fn a_silent_replica_is_given_up_after_failover_after() {
    let config = LinkConfig {
        warm_standby: false,
        ..LinkConfig::default()
    };
    let (mut now, mut link) = client_with(2, Attached::Claims, config);
    send(&mut link, now, 1, 100);
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(999));
    assert!(closes(&actions).is_empty(), "not before failover_after");
    assert!(dials(&actions).is_empty());
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(1000));
    assert_eq!(closes(&actions), vec![(ConnId(1), 0)]);
    assert_eq!(
        dials(&actions).iter().map(|d| d.1).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn datagrams_from_the_peer_keep_a_replica_from_being_called_silent() {
    let config = LinkConfig {
        warm_standby: false,
        ..LinkConfig::default()
    };
    let (mut now, mut link) = client_with(2, Attached::Claims, config);
    send(&mut link, now, 1, 100);
    let start = now;
    run_until(&mut link, &mut now, start + Duration::from_millis(900));
    // Anything heard (here: an empty ack of nothing) resets the silence.
    let mut server = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    server.handle_datagram(now, Bytes::new());
    link.handle(
        now,
        Input::Datagram {
            conn: ConnId(1),
            data: Bytes::from_static(b"\xff"),
        },
    );
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(1500));
    assert!(closes(&actions).is_empty(), "{actions:?}");
}

#[test]
fn a_stream_message_restarts_on_the_next_connection_with_its_id() {
    let (now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 20_000);
    let actions = drain(&mut link);
    let Some(Action::OpenStream { conn, id, .. }) = actions.first().cloned() else {
        panic!("{actions:?}")
    };
    assert_eq!(conn, ConnId(1));
    lose(&mut link, now, 1);
    let (dial, _) = dials(&drain(&mut link))[0];
    // The old stream reports its connection's end after the new connection is up.
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: dialed(2, Attached::Resumed),
        },
    );
    assert!(drain(&mut link)
        .iter()
        .all(|a| !matches!(a, Action::OpenStream { .. })));
    link.handle(
        now,
        Input::StreamDone {
            id,
            conn: ConnId(1),
            end: StreamEnd::Connection("lost".into()),
        },
    );
    let actions = drain(&mut link);
    assert!(
        matches!(&actions[..], [Action::OpenStream { conn: ConnId(2), id: again, .. }] if *again == id),
        "{actions:?}"
    );
    link.handle(
        now + Duration::from_millis(30),
        Input::StreamDone {
            id,
            conn: ConnId(2),
            end: StreamEnd::Status(crate::wire::STREAM_DELIVERED),
        },
    );
    let done = completions(&drain(&mut link));
    assert!(matches!(&done[..], [(1, Ok(Receipt { id: i, .. }))] if *i == id));
}

#[test]
fn a_stream_message_waiting_for_a_connection_times_out_at_its_deadline() {
    let (mut now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 20_000);
    let Some(Action::OpenStream { id, .. }) = drain(&mut link).first().cloned() else {
        panic!()
    };
    lose(&mut link, now, 1);
    link.handle(
        now,
        Input::StreamDone {
            id,
            conn: ConnId(1),
            end: StreamEnd::Connection("lost".into()),
        },
    );
    let start = now;
    // Every redial fails; the stream message's deadline (5 s) comes first.
    let mut actions = drain(&mut link);
    let mut done = Vec::new();
    while done.is_empty() {
        for (dial, _) in dials(&actions) {
            link.handle(
                now,
                Input::DialDone {
                    dial,
                    result: failed(),
                },
            );
        }
        actions = drain(&mut link);
        done = completions(&actions);
        if !done.is_empty() {
            break;
        }
        now = link.poll_timeout().expect("a timer");
        link.handle(now, Input::Timer);
        actions = drain(&mut link);
        done = completions(&actions);
    }
    assert!(
        matches!(&done[..], [(1, Err(SendError::Timeout { .. }))]),
        "{done:?}"
    );
    assert_eq!(now - start, Duration::from_secs(5));
}

#[test]
fn a_server_back_without_state_fails_messages_in_flight_instead_of_resending() {
    let (now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 100);
    send(&mut link, now, 2, 20_000);
    drain(&mut link);
    lose(&mut link, now, 1);
    let (dial, _) = dials(&drain(&mut link))[0];
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: dialed(2, Attached::New),
        },
    );
    let actions = drain(&mut link);
    let done = completions(&actions);
    assert!(
        matches!(&done[..], [(1, Err(SendError::ConnectionLost { reason }))] if reason == PEER_LOST_STATE),
        "{done:?}"
    );
    assert_eq!(shards_to(&actions, ConnId(2)), 0, "nothing re-sent");
    // The stream message still running on the old connection is not re-sent either.
    link.handle(
        now,
        Input::StreamDone {
            id: 1,
            conn: ConnId(1),
            end: StreamEnd::Connection("lost".into()),
        },
    );
    let actions = drain(&mut link);
    assert!(
        matches!(&completions(&actions)[..], [(2, Err(SendError::ConnectionLost { reason }))] if reason == PEER_LOST_STATE),
        "{actions:?}"
    );
}

#[test]
fn acks_complete_sends_and_free_their_slots() {
    let (mut now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 100);
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(5));
    let mut server = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let later = now + Duration::from_millis(10);
    for ack in acks_from(&mut server, later, &actions, ConnId(1)) {
        link.handle(
            later,
            Input::Datagram {
                conn: ConnId(1),
                data: ack,
            },
        );
    }
    let actions = drain(&mut link);
    assert!(matches!(&completions(&actions)[..], [(1, Ok(_))]));
    assert_eq!(freed(&actions), vec![1]);
    assert_eq!(link.stats().in_flight, 0);
}

/// Issue case 8: a per-send deadline gives the send its outcome at its own deadline, and the
/// sender lets the message go then (it carries each message's own deadline), so the slot is
/// freed with the outcome and `in_flight` stays truthful.
#[test]
fn a_per_send_deadline_completes_at_its_own_deadline_and_frees_the_slot() {
    let (mut now, mut link) = client(1, Attached::Resumed);
    link.handle(
        now,
        Input::Send {
            token: 1,
            key: None,
            payload: Bytes::from_static(b"pay"),
            deadline: Some(Duration::from_millis(300)),
        },
    );
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(299));
    assert!(completions(&actions).is_empty());
    assert_eq!(link.stats().in_flight, 1);
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(300));
    assert!(matches!(
        &completions(&actions)[..],
        [(1, Err(SendError::Timeout { id: 0 }))]
    ));
    assert_eq!(freed(&actions), vec![1]);
    assert_eq!(link.stats().in_flight, 0);
    let actions = run_until(&mut link, &mut now, start + Duration::from_secs(5));
    assert!(completions(&actions).is_empty(), "one outcome per send");
}

/// Issue case 9: a draining close waits for sends in flight, refuses new ones, then says
/// goodbye.
#[test]
fn a_draining_close_lets_sends_finish_then_says_goodbye() {
    let (mut now, mut link) = client(1, Attached::Resumed);
    send(&mut link, now, 1, 100);
    let start = now;
    let sent = run_until(&mut link, &mut now, start + Duration::from_millis(5));
    link.handle(now, Input::Close { drain: true });
    assert!(
        closes(&drain(&mut link)).is_empty(),
        "not while a send is in flight"
    );
    send(&mut link, now, 2, 100);
    let actions = drain(&mut link);
    assert!(matches!(
        &completions(&actions)[..],
        [(2, Err(SendError::Closed))]
    ));
    let mut server = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let later = now + Duration::from_millis(10);
    for ack in acks_from(&mut server, later, &sent, ConnId(1)) {
        link.handle(
            later,
            Input::Datagram {
                conn: ConnId(1),
                data: ack,
            },
        );
    }
    let actions = drain(&mut link);
    assert!(matches!(&completions(&actions)[..], [(1, Ok(_))]));
    assert_eq!(closes(&actions), vec![(ConnId(1), GOODBYE)]);
    assert!(stopped(&actions));
}

/// Issue case 9: with every handle dropped the link ends (no more keep-alives or redials).
#[test]
fn dropping_every_handle_ends_the_link() {
    let (now, mut link) = client(1, Attached::Resumed);
    link.handle(now, Input::HandlesDropped);
    assert!(!link.is_closed(), "the application still reads");
    link.handle(now, Input::AppGone);
    let actions = drain(&mut link);
    assert_eq!(closes(&actions), vec![(ConnId(1), GOODBYE)]);
    assert!(stopped(&actions));
    assert_eq!(link.poll_timeout(), None);
    // A dial finishing afterwards is closed at once.
    link.handle(
        now,
        Input::DialDone {
            dial: 1,
            result: dialed(5, Attached::Resumed),
        },
    );
    assert_eq!(closes(&drain(&mut link)), vec![(ConnId(5), 0)]);
}

/// Issue case 9: a server ends a channel at once on the client's goodbye, and keeps it for
/// `channel_ttl` after any other loss.
#[test]
fn a_server_keeps_a_detached_channel_for_its_ttl_but_not_after_a_goodbye() {
    let now = Instant::now();
    let mut link = Link::new(now, LinkConfig::default(), Role::Server, ConnId(1), SIZE, 0);
    link.handle(
        now,
        Input::ConnectionLost {
            conn: ConnId(1),
            how: Lost::Goodbye,
            reason: "goodbye".into(),
        },
    );
    assert!(stopped(&drain(&mut link)));

    let mut link = Link::new(now, LinkConfig::default(), Role::Server, ConnId(1), SIZE, 0);
    lose(&mut link, now, 1);
    assert!(!stopped(&drain(&mut link)));
    assert_eq!(link.poll_timeout(), Some(now + Duration::from_secs(60)));
    link.handle(
        now + Duration::from_secs(1),
        Input::Reattached {
            conn: ConnId(2),
            max_datagram_size: Some(SIZE),
            protocol: 2,
        },
    );
    assert_eq!(link.primary(), Some(ConnId(2)));
    assert_eq!(link.poll_timeout(), None, "attached again: no expiry");
}

fn hedged_to_standby(primary: Attached, standby: Attached) -> usize {
    let mut config = LinkConfig::default();
    config.sender.hedge_to = HedgeTo::Other;
    let (mut now, mut link) = client_with(2, primary, config);
    let (dial, _) = dials(&drain(&mut link))[0];
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: dialed(2, standby),
        },
    );
    drain(&mut link);
    send(&mut link, now, 1, 100);
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(900));
    transmits_to(&actions, ConnId(2))
}

/// Issue case 13c: hedge copies go to the standby only when both the primary and the
/// standby judge by the shared claims store.
#[test]
fn hedge_copies_go_to_a_standby_only_when_both_ends_claim() {
    assert!(hedged_to_standby(Attached::Claims, Attached::Claims) > 0);
    assert_eq!(hedged_to_standby(Attached::Resumed, Attached::Claims), 0);
    assert_eq!(hedged_to_standby(Attached::New, Attached::Claims), 0);
    assert_eq!(hedged_to_standby(Attached::Claims, Attached::Resumed), 0);
}

fn claims_server(config: LinkConfig) -> (Instant, Link, Peer) {
    let now = Instant::now();
    let mut config = config;
    config.receiver.claims = Claims::Owner;
    let link = Link::new(now, config, Role::Server, ConnId(1), SIZE, 0);
    let client = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    (now, link, client)
}

fn deliver_one(link: &mut Link, client: &mut Peer, now: Instant) -> Vec<Action> {
    client.sender.send(now, Bytes::from_static(b"pay")).unwrap();
    let mut out = Vec::new();
    while let Some(d) = client.poll_transmit() {
        link.handle(
            now,
            Input::Datagram {
                conn: ConnId(1),
                data: d,
            },
        );
        out.extend(drain(link));
    }
    out
}

fn claim_attempts(actions: &[Action]) -> Vec<(u64, Duration)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Claim {
                attempt, timeout, ..
            } => Some((*attempt, *timeout)),
            _ => None,
        })
        .collect()
}

fn delivered(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Deliver(_)))
        .count()
}

/// Issue case 3: every claim attempt carries its own timeout, and one that failed (or
/// timed out) is retried with doubling backoff (at most 1 s) for as long as the channel
/// runs: the attempt may have been written. Nothing is delivered or acked meanwhile.
#[test]
fn a_failing_claim_is_retried_with_backoff_while_the_channel_runs() {
    let (mut now, mut link, mut client) = claims_server(LinkConfig::default());
    let actions = deliver_one(&mut link, &mut client, now);
    let first = claim_attempts(&actions);
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].1,
        Duration::from_secs(1),
        "the attempt's own timeout"
    );
    let start = now;
    let mut attempt = first[0].0;
    let mut at = Vec::new();
    loop {
        at.push(now - start);
        link.handle(
            now,
            Input::ClaimAnswered {
                attempt,
                result: Err("timed out".into()),
            },
        );
        let actions = drain(&mut link);
        assert_eq!(delivered(&actions), 0);
        assert_eq!(transmits_to(&actions, ConnId(1)), 0, "nothing acked");
        let Some(t) = link
            .poll_timeout()
            .filter(|t| *t < start + Duration::from_secs(60))
        else {
            break;
        };
        now = t;
        link.handle(now, Input::Timer);
        let next = claim_attempts(&drain(&mut link));
        let Some(&(a, _)) = next.first() else { break };
        attempt = a;
    }
    let ms: Vec<u128> = at.iter().map(|d| d.as_millis()).collect();
    assert_eq!(&ms[..4], &[0, 10, 30, 70], "{ms:?}");
    assert!(
        *ms.last().unwrap() >= 59_000,
        "still retrying after a minute: {ms:?}"
    );
    let gaps: Vec<u128> = ms.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= 1000), "{gaps:?}");
    assert_eq!(link.peer().receiver.stats().claim_failures, 0);
    assert_eq!(link.peer().receiver.stats().claims_pending, 1);
    // The store answers at last: the message is delivered (and acked once taken).
    now = link.poll_timeout().expect("the next retry");
    link.handle(now, Input::Timer);
    let (attempt, _) = claim_attempts(&drain(&mut link))[0];
    assert_eq!(delivered(&link.claim_now(now, attempt)), 1);
}

#[test]
fn a_claim_answered_now_is_delivered_and_acked() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let actions = deliver_one(&mut link, &mut client, now);
    let (attempt, _) = claim_attempts(&actions)[0];
    let actions = link.claim_now(now, attempt);
    assert_eq!(delivered(&actions), 1);
    assert_eq!(
        transmits_to(&actions, ConnId(1)),
        0,
        "no ack before the take"
    );
    link.handle(now, Input::Took { id: 0 });
    assert!(transmits_to(&drain(&mut link), ConnId(1)) > 0, "an ack");
    // A late answer to a stale attempt changes nothing.
    assert_eq!(delivered(&link.claim_now(now, attempt)), 0);
}

#[test]
fn deliveries_wait_for_room_in_the_hand_off() {
    let now = Instant::now();
    let mut link = Link::new(now, LinkConfig::default(), Role::Server, ConnId(1), SIZE, 0);
    let mut client = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let mut n = 0;
    for _ in 0..10 {
        n += delivered(&deliver_one(&mut link, &mut client, now));
    }
    assert_eq!(n, 4, "the hand-off holds four");
    link.handle(now, Input::Took { id: 0 });
    assert_eq!(delivered(&drain(&mut link)), 1);
}

#[test]
fn a_stopped_link_answers_late_sends_with_closed() {
    let (now, mut link) = client(1, Attached::Resumed);
    link.handle(now, Input::Close { drain: false });
    let actions = drain(&mut link);
    assert_eq!(closes(&actions), vec![(ConnId(1), 0)]);
    assert!(stopped(&actions));
    send(&mut link, now, 9, 10);
    assert!(matches!(
        &completions(&drain(&mut link))[..],
        [(9, Err(SendError::Closed))]
    ));
}

#[test]
fn a_recovered_replica_is_tried_as_standby_every_few_seconds() {
    let (mut now, mut link) = client(3, Attached::Claims);
    let (dial, replica) = dials(&drain(&mut link))[0];
    assert_eq!(replica, 1);
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: failed(),
        },
    );
    let (dial, replica) = dials(&drain(&mut link))[0];
    assert_eq!(replica, 2);
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: dialed(3, Attached::Claims),
        },
    );
    drain(&mut link);
    // Replica 1 is preferred over the standby (2): an upgrade round in 5 s.
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_secs(5));
    let upgrade: Vec<_> = dials(&actions);
    assert_eq!(upgrade.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1]);
    link.handle(
        now,
        Input::DialDone {
            dial: upgrade[0].0,
            result: dialed(4, Attached::Claims),
        },
    );
    let actions = drain(&mut link);
    assert_eq!(
        closes(&actions),
        vec![(ConnId(3), 0)],
        "the old standby closed"
    );
}

#[test]
fn a_much_better_standby_takes_over_after_three_samples() {
    let (mut now, mut link) = client(2, Attached::Claims);
    let (dial, _) = dials(&drain(&mut link))[0];
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: dialed(2, Attached::Claims),
        },
    );
    drain(&mut link);
    let slow = PathSample {
        rtt: Duration::from_millis(100),
        sent_packets: 0,
        lost_packets: 0,
    };
    let fast = PathSample {
        rtt: Duration::from_millis(10),
        ..slow
    };
    for round in 0..3 {
        now += Duration::from_secs(1);
        link.handle(now, Input::Timer);
        let actions = drain(&mut link);
        assert!(actions.iter().any(
            |a| matches!(a, Action::SamplePaths { conns } if conns == &vec![ConnId(1), ConnId(2)])
        ));
        assert_eq!(link.primary(), Some(ConnId(1)), "round {round}");
        link.handle(
            now,
            Input::Samples(vec![(ConnId(1), slow), (ConnId(2), fast)]),
        );
    }
    let actions = drain(&mut link);
    assert_eq!(link.primary(), Some(ConnId(2)));
    assert_eq!(link.stats().switches, 1);
    assert_eq!(link.stats().failovers, 0);
    assert!(closes(&actions).contains(&(ConnId(1), 0)));
}

/// Issue case 2: every attempt of one claim carries the same claimant token (so a store
/// that committed an attempt whose answer was lost can recognise its own row), and the
/// claim is not given up (nor released: another replica may have acked it as claimed).
#[test]
fn claim_retries_reuse_the_claimant_and_are_not_given_up() {
    let (mut now, mut link, mut client) = claims_server(LinkConfig {
        claim_timeout: Duration::from_millis(100),
        ..LinkConfig::default()
    });
    let mut claimants = Vec::new();
    let mut actions = deliver_one(&mut link, &mut client, now);
    let start = now;
    while let Some((attempt, claimant)) = actions.iter().find_map(|a| match a {
        Action::Claim {
            attempt, claimant, ..
        } => Some((*attempt, *claimant)),
        _ => None,
    }) {
        claimants.push(claimant);
        link.handle(
            now,
            Input::ClaimAnswered {
                attempt,
                result: Err("connection reset after commit".into()),
            },
        );
        actions = drain(&mut link);
        if let Some(t) = link
            .poll_timeout()
            .filter(|t| *t < start + Duration::from_secs(1))
        {
            now = t;
            link.handle(now, Input::Timer);
            actions.extend(drain(&mut link));
        }
        if claimants.len() >= 8 {
            break;
        }
    }
    assert!(claimants.len() >= 3, "{claimants:?}");
    assert!(
        claimants.iter().all(|c| *c == claimants[0]),
        "{claimants:?}"
    );
    assert_eq!(delivered(&actions), 0);
    assert_eq!(transmits_to(&actions, ConnId(1)), 0, "nothing acked");
}

/// Issue case 3: a store that never answers is bounded by the attempt timeout the driver
/// enforces; the core asks each attempt with it and keeps retrying until `claim_timeout`.
#[test]
fn every_claim_attempt_is_bounded_by_its_own_timeout() {
    let (now, mut link, mut client) = claims_server(LinkConfig {
        claim_attempt_timeout: Duration::from_millis(250),
        ..LinkConfig::default()
    });
    let actions = deliver_one(&mut link, &mut client, now);
    assert!(claim_attempts(&actions)
        .iter()
        .all(|(_, t)| *t == Duration::from_millis(250)));
}

/// Every send gets exactly one outcome and its slot back, whatever happens around it:
/// random sequences of losses, dial results, stream ends, timers, garbage datagrams, the
/// application going away and closes, for each role (seeded; the fuzz target's smaller
/// sibling).
#[test]
fn every_send_gets_one_outcome_and_its_slot_back_under_random_events() {
    use rand::{RngExt, SeedableRng};
    use std::collections::{HashMap, HashSet};
    for seed in 0..300u64 {
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
        let now0 = Instant::now();
        let role = match seed % 3 {
            0 => Role::Plain,
            1 => Role::Server,
            _ => Role::Client {
                replicas: 1 + (seed as usize % 3),
                current: 0,
                attached: Attached::Claims,
            },
        };
        let mut config = LinkConfig::default();
        config.receiver.claims = if seed % 5 == 0 {
            Claims::Owner
        } else {
            Claims::Off
        };
        let mut link = Link::new(now0, config, role, ConnId(1), SIZE, 0);
        let mut now = now0;
        let mut next_conn = 2;
        let mut dials: Vec<u64> = Vec::new();
        let mut streams: Vec<(u64, ConnId)> = Vec::new();
        let mut claims: Vec<u64> = Vec::new();
        let mut conns: HashSet<ConnId> = [ConnId(1)].into();
        let mut completed: HashMap<u64, usize> = HashMap::new();
        let mut freed: HashSet<u64> = HashSet::new();
        let mut tokens = 0u64;
        let mut client = Peer::new(SenderConfig::default(), ReceiverConfig::default());
        for step in 0..400 {
            let input = match rng.random_range(0..14) {
                0..=2 => {
                    tokens += 1;
                    let len = if rng.random_bool(0.2) { 20_000 } else { 100 };
                    Input::Send {
                        token: tokens,
                        key: rng
                            .random_bool(0.3)
                            .then(|| Bytes::from(format!("k{}", tokens % 7))),
                        payload: Bytes::from(vec![1u8; len]),
                        deadline: rng
                            .random_bool(0.3)
                            .then(|| Duration::from_millis(rng.random_range(1..8000))),
                    }
                }
                3 => {
                    let conn = *conns.iter().next().unwrap_or(&ConnId(1));
                    Input::ConnectionLost {
                        conn,
                        how: [
                            Lost::Retryable,
                            Lost::Fatal,
                            Lost::Goodbye,
                            Lost::LocallyClosed,
                        ][rng.random_range(0..4)],
                        reason: "x".into(),
                    }
                }
                4 if !dials.is_empty() => {
                    let dial = dials.swap_remove(rng.random_range(0..dials.len()));
                    let result = if rng.random_bool(0.6) {
                        next_conn += 1;
                        conns.insert(ConnId(next_conn));
                        dialed(
                            next_conn,
                            [Attached::New, Attached::Resumed, Attached::Claims]
                                [rng.random_range(0..3)],
                        )
                    } else {
                        Err(DialFailure {
                            refused: rng.random_bool(0.1),
                            reason: "no".into(),
                        })
                    };
                    Input::DialDone { dial, result }
                }
                5 if !streams.is_empty() => {
                    let (id, conn) = streams.swap_remove(rng.random_range(0..streams.len()));
                    let end = match rng.random_range(0..4) {
                        0 => StreamEnd::Status(crate::wire::STREAM_DELIVERED),
                        1 => StreamEnd::Refused,
                        2 => StreamEnd::Deadline,
                        _ => StreamEnd::Connection("gone".into()),
                    };
                    Input::StreamDone { id, conn, end }
                }
                6 if !claims.is_empty() => {
                    let attempt = claims.swap_remove(rng.random_range(0..claims.len()));
                    let result = match rng.random_range(0..6) {
                        0 => Ok(StoreAnswer::Reserved {
                            epoch: rng.random_range(1..3),
                            took_over: rng.random_bool(0.5),
                        }),
                        1 => Ok(StoreAnswer::Before),
                        2 => Ok(StoreAnswer::Settled {
                            late: rng.random_bool(0.5),
                        }),
                        3 => Ok(StoreAnswer::Busy {
                            retry_in: Duration::from_millis(rng.random_range(0..3000)),
                        }),
                        4 => Ok(StoreAnswer::Fenced),
                        _ => Err("store down".into()),
                    };
                    Input::ClaimAnswered { attempt, result }
                }
                7 => {
                    client.sender.send(now, Bytes::from_static(b"in")).ok();
                    match client.poll_transmit() {
                        Some(d) => Input::Datagram {
                            conn: ConnId(1),
                            data: d,
                        },
                        None => Input::Timer,
                    }
                }
                8 => Input::Datagram {
                    conn: ConnId(rng.random_range(0..next_conn + 1)),
                    data: Bytes::from(
                        (0..rng.random_range(0..40))
                            .map(|_| rng.random())
                            .collect::<Vec<u8>>(),
                    ),
                },
                9 => Input::Took {
                    id: rng.random_range(0..10),
                },
                10 if step > 300 && rng.random_bool(0.1) => Input::Close {
                    drain: rng.random_bool(0.5),
                },
                11 if rng.random_bool(0.05) => Input::AppGone,
                12 if rng.random_bool(0.05) => Input::HandlesDropped,
                _ => {
                    now = link
                        .poll_timeout()
                        .map_or(now, |t| t.max(now))
                        .min(now + Duration::from_secs(2));
                    Input::Timer
                }
            };
            link.handle(now, input);
            while let Some(a) = link.poll_action() {
                match a {
                    Action::Dial { dial, .. } => dials.push(dial),
                    Action::OpenStream { id, conn, .. } => streams.push((id, conn)),
                    Action::Claim { attempt, .. } => claims.push(attempt),
                    Action::Complete { token, .. } => *completed.entry(token).or_default() += 1,
                    Action::FreeSlot { token } => {
                        assert!(freed.insert(token), "seed {seed}: slot {token} freed twice")
                    }
                    Action::Close { conn, .. } => {
                        conns.remove(&conn);
                    }
                    _ => {}
                }
            }
        }
        // The end: a close (draining for odd seeds), then time enough for every timer, with
        // the driver's tasks reporting as they would (streams and claims end by their
        // deadlines, dials fail).
        link.handle(
            now,
            Input::Close {
                drain: seed % 2 == 1,
            },
        );
        for _ in 0..10_000 {
            let mut inputs = Vec::new();
            while let Some(a) = link.poll_action() {
                match a {
                    Action::Complete { token, .. } => *completed.entry(token).or_default() += 1,
                    Action::FreeSlot { token } => {
                        assert!(freed.insert(token), "seed {seed}: slot {token} freed twice")
                    }
                    Action::Dial { dial, .. } => dials.push(dial),
                    Action::OpenStream { id, conn, .. } => streams.push((id, conn)),
                    Action::Claim { attempt, .. } => claims.push(attempt),
                    _ => {}
                }
            }
            for dial in dials.drain(..) {
                inputs.push(Input::DialDone {
                    dial,
                    result: failed(),
                });
            }
            for (id, conn) in streams.drain(..) {
                inputs.push(Input::StreamDone {
                    id,
                    conn,
                    end: StreamEnd::Deadline,
                });
            }
            for attempt in claims.drain(..) {
                inputs.push(Input::ClaimAnswered {
                    attempt,
                    result: Err("down".into()),
                });
            }
            if inputs.is_empty() {
                let Some(t) = link.poll_timeout() else { break };
                now = t.max(now);
                inputs.push(Input::Timer);
            }
            for i in inputs {
                link.handle(now, i);
            }
        }
        assert!(link.is_closed(), "seed {seed}: the close ended the link");
        for token in 1..=tokens {
            assert_eq!(
                completed.get(&token),
                Some(&1),
                "seed {seed}: send {token}'s outcomes"
            );
            assert!(freed.contains(&token), "seed {seed}: send {token}'s slot");
        }
        assert_eq!(link.stats().in_flight, 0, "seed {seed}");
    }
}

/// Issue case 9: a draining server channel lets its claims in flight finish, so their acks
/// go out before the goodbye; a claim that never answers holds the close back at most
/// `claim_timeout`.
#[test]
fn a_draining_close_waits_for_claims_in_flight_within_the_claim_timeout() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_attempts(&deliver_one(&mut link, &mut client, now))[0];
    link.handle(now, Input::Close { drain: true });
    assert!(closes(&drain(&mut link)).is_empty());
    let mut actions = link.claim_now(now, attempt);
    link.handle(now, Input::Took { id: 0 });
    actions.extend(drain(&mut link));
    let ack = actions
        .iter()
        .position(|a| matches!(a, Action::Transmit { .. }))
        .expect("the ack");
    let bye = actions
        .iter()
        .position(|a| matches!(a, Action::Close { code: GOODBYE, .. }))
        .expect("the goodbye");
    assert!(ack < bye, "{actions:?}");

    let (mut now, mut link, mut client) = claims_server(LinkConfig::default());
    deliver_one(&mut link, &mut client, now);
    link.handle(now, Input::Close { drain: true });
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(4990));
    assert!(closes(&actions).is_empty(), "the claim still has time");
    let actions = run_until(&mut link, &mut now, start + Duration::from_secs(5));
    assert_eq!(closes(&actions), vec![(ConnId(1), GOODBYE)]);
}

/// A redial that reaches a server without datagrams counts as a failed attempt: the link
/// keeps redialling instead of waiting forever without a connection.
#[test]
fn a_redialled_connection_without_datagrams_is_a_failed_attempt() {
    let (mut now, mut link) = client(1, Attached::Resumed);
    lose(&mut link, now, 1);
    let (dial, _) = dials(&drain(&mut link))[0];
    link.handle(
        now,
        Input::DialDone {
            dial,
            result: Ok(Dialed {
                conn: ConnId(2),
                attached: Attached::Resumed,
                max_datagram_size: None,
                protocol: 2,
            }),
        },
    );
    assert_eq!(closes(&drain(&mut link)), vec![(ConnId(2), 1)]);
    assert_eq!(link.primary(), None);
    let start = now;
    let actions = run_until(&mut link, &mut now, start + Duration::from_millis(20));
    assert_eq!(
        dials(&actions).len(),
        1,
        "the next attempt after the backoff"
    );
}

/// Failover to a replica of version 1 (an upgrade under way): the channel speaks the lower
/// version on that connection, so its first flights are SHARD frames a version-1 peer reads,
/// not MESSAGE frames it would drop as an unknown type (review finding: before, the sender
/// kept the first connection's version, and 340 of 400 frames were unreadable there).
#[test]
fn toward_a_version_1_replica_first_flights_are_shards() {
    let (now, mut link) = client(3, Attached::Claims);
    let first = dials(&drain(&mut link));
    let mut v1 = dialed(2, Attached::Claims).unwrap();
    v1.protocol = 1;
    link.handle(
        now,
        Input::DialDone {
            dial: first[0].0,
            result: Ok(v1),
        },
    );
    drain(&mut link);
    let kinds = |actions: &[Action], to: ConnId| -> (usize, usize) {
        let mut shards = 0;
        let mut messages = 0;
        for a in actions {
            if let Action::Transmit { conn, datagram } = a {
                if *conn != to {
                    continue;
                }
                match crate::wire::Frame::decode(datagram.clone(), &crate::wire::Limits::default())
                {
                    Ok(crate::wire::Frame::Shard(_)) => shards += 1,
                    Ok(crate::wire::Frame::Message(_) | crate::wire::Frame::Repair(_)) => {
                        messages += 1
                    }
                    _ => {}
                }
            }
        }
        (shards, messages)
    };
    // On the version-2 primary a small payment goes whole, as a window source.
    send(&mut link, now, 7, 100);
    let on_primary = drain(&mut link);
    assert_eq!(kinds(&on_primary, ConnId(1)), (0, 1));
    // The primary is lost: the payment is re-sent on the version-1 standby, as shards, and
    // so is the next one.
    lose(&mut link, now, 1);
    let actions = drain(&mut link);
    assert_eq!(link.primary(), Some(ConnId(2)));
    send(&mut link, now, 8, 100);
    let actions = [actions, drain(&mut link)].concat();
    let (shards, messages) = kinds(&actions, ConnId(2));
    assert!(shards >= 2, "{shards} shards");
    assert_eq!(messages, 0, "nothing a version-1 peer cannot read");
}

// ---------------------------------------------------------------------------------------
// Issue 23: two-phase claims (reserve, settle one at a time, lease, fencing)
// ---------------------------------------------------------------------------------------

/// The claim attempts among `actions`: (attempt, step).
fn claim_steps(actions: &[Action]) -> Vec<(u64, ClaimStep)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Claim { attempt, step, .. } => Some((*attempt, step.clone())),
            _ => None,
        })
        .collect()
}

fn answer(link: &mut Link, now: Instant, attempt: u64, answer: StoreAnswer) -> Vec<Action> {
    link.handle(
        now,
        Input::ClaimAnswered {
            attempt,
            result: Ok(answer),
        },
    );
    drain(link)
}

const HELD: StoreAnswer = StoreAnswer::Reserved {
    epoch: 1,
    took_over: false,
};

/// A settle is asked only once every message handed over was taken, so a replica that dies
/// holds at most one message settled and not taken; the reservations go ahead meanwhile.
#[test]
fn settles_go_one_at_a_time_after_the_take() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let mut reserves = Vec::new();
    for _ in 0..3 {
        reserves.extend(claim_steps(&deliver_one(&mut link, &mut client, now)));
    }
    assert_eq!(reserves.len(), 3, "three reservations go out at once");
    assert!(reserves
        .iter()
        .all(|(_, s)| matches!(s, ClaimStep::Reserve { lease } if *lease == DEFAULT_LEASE)));
    let mut settles = Vec::new();
    for &(attempt, _) in &reserves {
        settles.extend(claim_steps(&answer(&mut link, now, attempt, HELD)));
    }
    assert_eq!(settles.len(), 1, "one settle at a time: {settles:?}");
    assert_eq!(link.stats().reservations_held, 3);
    let out = answer(
        &mut link,
        now,
        settles[0].0,
        StoreAnswer::Settled { late: false },
    );
    assert_eq!(delivered(&out), 1);
    assert!(claim_steps(&out).is_empty(), "no settle before the take");
    assert_eq!(transmits_to(&out, ConnId(1)), 0, "no ack before the take");
    link.handle(now, Input::Took { id: 0 });
    let out = drain(&mut link);
    assert!(transmits_to(&out, ConnId(1)) > 0, "acked after the take");
    let next = claim_steps(&out);
    assert_eq!(next.len(), 1, "the next settle, once the first was taken");
    assert!(matches!(next[0].1, ClaimStep::Settle { epoch: 1 }));
    assert_eq!(link.stats().reservations_held, 2);
}

/// Another replica's live reservation answers busy: the message is neither delivered nor
/// acked, and it is reserved again once the holder's lease ends (taken over if the holder
/// died), then settled and delivered.
#[test]
fn a_busy_reservation_is_asked_again_when_the_lease_ends() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_steps(&deliver_one(&mut link, &mut client, now))[0];
    let retry_in = Duration::from_millis(1500);
    let out = answer(&mut link, now, attempt, StoreAnswer::Busy { retry_in });
    assert_eq!(delivered(&out), 0);
    assert_eq!(transmits_to(&out, ConnId(1)), 0, "busy is not acked");
    let at = link.poll_timeout().expect("a retry");
    assert!(at >= now + retry_in, "not before the lease ends");
    assert!(at <= now + retry_in + Duration::from_millis(20));
    link.handle(at, Input::Timer);
    let again = claim_steps(&drain(&mut link));
    assert!(
        matches!(again[..], [(_, ClaimStep::Reserve { .. })]),
        "{again:?}"
    );
    let took = StoreAnswer::Reserved {
        epoch: 2,
        took_over: true,
    };
    let settle = claim_steps(&answer(&mut link, at, again[0].0, took));
    assert!(matches!(settle[..], [(_, ClaimStep::Settle { epoch: 2 })]));
    let out = answer(
        &mut link,
        at,
        settle[0].0,
        StoreAnswer::Settled { late: false },
    );
    assert_eq!(delivered(&out), 1);
    let stats = link.stats();
    assert_eq!((stats.claims_busy, stats.takeovers), (1, 1));
}

/// A settle fenced by a takeover: the message is not handed over here, and not acked (the
/// replica that took it over delivers it).
#[test]
fn a_fenced_settle_is_neither_delivered_nor_acked() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_steps(&deliver_one(&mut link, &mut client, now))[0];
    let settle = claim_steps(&answer(&mut link, now, attempt, HELD));
    let out = answer(&mut link, now, settle[0].0, StoreAnswer::Fenced);
    assert_eq!(delivered(&out), 0);
    assert_eq!(transmits_to(&out, ConnId(1)), 0, "no ack");
    assert_eq!(link.stats().fenced_settles, 1);
    assert_eq!(link.stats().reservations_held, 0);
    // A copy of it is judged again, not acked from the window.
    let later = now + Duration::from_millis(300);
    client.handle_timeout(later);
    let mut out = Vec::new();
    while let Some(d) = client.poll_transmit() {
        link.handle(
            later,
            Input::Datagram {
                conn: ConnId(1),
                data: d,
            },
        );
        out.extend(drain(&mut link));
    }
    assert_eq!(transmits_to(&out, ConnId(1)), 0, "still no ack for a copy");
}

/// The application goes away: reservations waiting for their settle are released at once
/// (other replicas need not wait for their leases), and nothing more is settled.
#[test]
fn reservations_are_released_when_the_application_goes() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let mut reserves = Vec::new();
    for _ in 0..2 {
        reserves.extend(claim_steps(&deliver_one(&mut link, &mut client, now)));
    }
    let mut settles = Vec::new();
    for &(attempt, _) in &reserves {
        settles.extend(claim_steps(&answer(&mut link, now, attempt, HELD)));
    }
    assert_eq!(settles.len(), 1);
    link.handle(now, Input::AppGone);
    let out = drain(&mut link);
    let released: Vec<_> = claim_steps(&out)
        .into_iter()
        .filter(|(_, s)| matches!(s, ClaimStep::Release { epoch: 1 }))
        .collect();
    assert_eq!(released.len(), 1, "the reservation waiting for its turn");
    assert_eq!(link.stats().reservations_released, 1);
    // The settle in flight answers: nobody will take its message, so its claim is released
    // too, and nothing is handed over or recorded (a copy is not acked from here).
    let settled = StoreAnswer::Settled { late: false };
    let out = answer(&mut link, now, settles[0].0, settled);
    assert_eq!(delivered(&out), 0);
    let steps = claim_steps(&out);
    assert!(
        matches!(steps[..], [(0, ClaimStep::Release { epoch: 1 })]),
        "{steps:?}"
    );
    assert_eq!(link.stats().reservations_held, 0);
    assert_eq!(transmits_to(&out, ConnId(1)), 0, "not acked");
}

/// The window two-phase claims leave, stated: a message settled and handed over, then left
/// untaken when the application drops its queue, stays settled (another replica may have
/// acked a copy as settled already), so nothing is released and it counts as delivered.
#[test]
fn a_settled_message_the_application_never_took_stays_settled() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_steps(&deliver_one(&mut link, &mut client, now))[0];
    let settle = claim_steps(&answer(&mut link, now, attempt, HELD));
    let settled = StoreAnswer::Settled { late: false };
    let out = answer(&mut link, now, settle[0].0, settled);
    assert_eq!(delivered(&out), 1);
    link.handle(now, Input::AppGone);
    let out = drain(&mut link);
    assert!(claim_steps(&out).is_empty(), "not released");
}

/// The inbox pattern with a store: the message is reserved first, then handed to the
/// application with its lease (for its transaction to settle), and acked on its confirm.
#[test]
fn the_inbox_application_gets_its_message_with_its_reservation() {
    let now = Instant::now();
    let mut config = LinkConfig {
        reserve: true,
        claimant_seed: 77,
        ..LinkConfig::default()
    };
    config.receiver.claims = Claims::Application;
    let mut link = Link::new(now, config, Role::Server, ConnId(1), SIZE, 0);
    let mut client = Peer::new(SenderConfig::default(), ReceiverConfig::default());
    let out = deliver_one(&mut link, &mut client, now);
    assert_eq!(delivered(&out), 0, "not before its reservation");
    let steps = claim_steps(&out);
    let out = answer(
        &mut link,
        now,
        steps[0].0,
        StoreAnswer::Reserved {
            epoch: 3,
            took_over: true,
        },
    );
    let lease = out
        .iter()
        .find_map(|a| match a {
            Action::Deliver(d) => Some(d.lease),
            _ => None,
        })
        .expect("handed over");
    let lease = lease.expect("with its reservation");
    assert_eq!(lease.epoch, 3);
    assert_eq!(lease.claimant, claims::claimant(77, 0, 0));
    assert!(claim_steps(&out).is_empty(), "the application settles it");
    link.handle(now, Input::Took { id: 0 });
    assert_eq!(transmits_to(&drain(&mut link), ConnId(1)), 0, "not before");
    link.handle(
        now,
        Input::Confirm {
            id: 0,
            outcome: ClaimOutcome::Now,
        },
    );
    assert!(transmits_to(&drain(&mut link), ConnId(1)) > 0, "acked");
}

/// A claimant names one message of one incarnation of the peer: distinct per message and
/// per incarnation, never 0, the same for every attempt.
#[test]
fn claimants_are_per_message_and_incarnation() {
    let mut seen = std::collections::HashSet::new();
    for generation in 0..4 {
        for id in 0..1000 {
            let c = claims::claimant(9, generation, id);
            assert_ne!(c, 0);
            assert!(seen.insert(c), "{generation}/{id}");
            assert_eq!(c, claims::claimant(9, generation, id));
        }
    }
}

// Found by the review of issue 23 (each failed before its fix).

/// A reservation in flight when the application goes away, answered after: released at
/// once, not held until the channel ends.
#[test]
fn a_reservation_answered_after_the_application_went_is_released() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, step) = claim_steps(&deliver_one(&mut link, &mut client, now))[0].clone();
    assert!(matches!(step, ClaimStep::Reserve { .. }));
    link.handle(now, Input::AppGone);
    drain(&mut link);
    let out = answer(&mut link, now, attempt, HELD);
    assert!(
        claim_steps(&out)
            .iter()
            .any(|(_, s)| matches!(s, ClaimStep::Release { epoch: 1 })),
        "released"
    );
    assert_eq!(link.stats().reservations_held, 0);
}

/// A busy reservation answered after the application went away: not asked again every
/// lease for a message nobody can take.
#[test]
fn a_busy_reservation_is_not_asked_again_after_the_application_went() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_steps(&deliver_one(&mut link, &mut client, now))[0];
    link.handle(now, Input::AppGone);
    drain(&mut link);
    let busy = StoreAnswer::Busy {
        retry_in: Duration::from_secs(2),
    };
    answer(&mut link, now, attempt, busy);
    let mut t = now;
    for _ in 0..60 {
        t += Duration::from_secs(1);
        link.handle(t, Input::Timer);
        let asked = claim_steps(&drain(&mut link));
        assert!(
            !asked
                .iter()
                .any(|(_, s)| matches!(s, ClaimStep::Reserve { .. })),
            "reserved again at {t:?}"
        );
    }
}

/// A settle retrying after an error when the application goes away is released, not
/// retried: were it written afterwards, nobody would take its message, and this replica
/// would ack copies of it from its window (the review's trace: a hung settle written 2 s
/// after the application left, its message acked here 1 s later).
#[test]
fn a_settle_retrying_when_the_application_went_is_released_and_never_acked() {
    let (now, mut link, mut client) = claims_server(LinkConfig::default());
    let (attempt, _) = claim_steps(&deliver_one(&mut link, &mut client, now))[0];
    let settle = claim_steps(&answer(&mut link, now, attempt, HELD))[0].0;
    let t1 = now + Duration::from_secs(1);
    link.handle(
        t1,
        Input::ClaimAnswered {
            attempt: settle,
            result: Err("timed out".into()),
        },
    );
    drain(&mut link);
    link.handle(t1, Input::AppGone);
    let out = drain(&mut link);
    assert!(
        claim_steps(&out)
            .iter()
            .any(|(_, s)| matches!(s, ClaimStep::Release { epoch: 1 })),
        "released (the failed attempt may have been written)"
    );
    // Nothing retries it, and copies the sender hedges are never acked from here.
    let mut t = t1;
    for _ in 0..30 {
        t += Duration::from_millis(100);
        client.handle_timeout(t);
        while let Some(d) = client.poll_transmit() {
            link.handle(
                t,
                Input::Datagram {
                    conn: ConnId(1),
                    data: d,
                },
            );
        }
        link.handle(t, Input::Timer);
        let out = drain(&mut link);
        assert!(claim_steps(&out)
            .iter()
            .all(|(_, s)| !matches!(s, ClaimStep::Settle { .. })));
        for a in out {
            if let Action::Transmit { datagram, .. } = a {
                client.handle_datagram(t, datagram);
            }
        }
    }
    let acked = std::iter::from_fn(|| client.sender.poll_event())
        .filter(|e| matches!(e, SenderEvent::Acked { .. }))
        .count();
    assert_eq!(acked, 0, "never taken, never acked");
}
