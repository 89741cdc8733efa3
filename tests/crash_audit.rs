//! The crash audit over real processes (issue 23): two `payment_server` replicas share a real
//! PostgreSQL, a `payment_client --connect A,B` sends keyed payments, and the preferred
//! replica (A) is killed, stopped, or cut off from the database mid-run. The check reads
//! only what the programs write for outside checkers: the client's `--acked-ids` and
//! `--outcomes`, each replica's `--deliveries`, and with `--ledger` the `surelink_ledger`
//! table.
//!
//! Every run checks:
//! - every send has an outcome (the client exits; `acked + failed_unknown + failed_definite`
//!   is the count, and `--outcomes` has a line per payment);
//! - no payment id in two deliveries files, nor twice in one (across a restart);
//! - every acked id is in a deliveries file, except at most one per SIGKILL (the payment
//!   the killed replica had settled and its application had not yet taken, or taken and not
//!   yet written: the two phases' window); none missing for the other faults;
//! - with `--ledger`: every acked id is in the ledger (none missing), every delivered id
//!   too, and no replica logged a payment whose claim it won but whose row was there
//!   already.
//!
//! Runs (each in its own database, so they never see each other's claims):
//! - `kill_runs`: 2,000 payments at 200/s, A killed with SIGKILL at 1 + (i·7 mod 8) s for
//!   run i (spread over the run), restarted 3 s later with the same flags;
//! - `ledger_kill_runs`: the same with `--ledger` (the inbox pattern);
//! - `postgres_restart`: PostgreSQL restarted at 4 s (`pg_ctl restart -m fast` on the
//!   cluster behind `SURELINK_PG_URL`, found with `SHOW data_directory`; when that is not
//!   possible, every other backend of the database terminated repeatedly for 1 s instead,
//!   and the summary says so);
//! - `replica_cut_off_from_postgres`: A reaches PostgreSQL through a TCP relay in this test;
//!   at 4 s the relay drops every connection and refuses new ones for 3 s;
//! - `slow_replica_lease_expires`: A stopped with SIGSTOP at 4 s for 3 s (longer than the
//!   2 s lease), then SIGCONT.
//!
//! By default (CI) the short form: 2 kill runs, 1 ledger kill run, each fault once.
//! `SURELINK_AUDIT_RUNS=20` runs 20 kill runs and 20 ledger kill runs (kill times 1 s to 8 s),
//! and each fault with and without `--ledger`:
//!
//! ```text
//! scripts/crash_audit        # the full form in release builds: SURELINK_AUDIT_RUNS=20 by default
//! ```
//!
//! The examples must be built with the test's profile and features: the whole `cargo test
//! --features postgres` (`scripts/test`) builds them; a run of this test alone needs
//! `cargo build --features postgres --example payment_server --example payment_client` first
//! (with `--release` for a release run, as `scripts/crash_audit` does).
//!
//! Each run prints one summary line (`audit ...`): acked and failed payments, deliveries per
//! replica, missing and doubled ids, and the latency of the payments in flight when the
//! fault began (how long a takeover made them wait). A failed run keeps its directory
//! (servers' logs, ids files) and names it; `SURELINK_AUDIT_KEEP=1` keeps every run's. Needs `SURELINK_PG_URL` (`scripts/with-postgres`,
//! which `scripts/test` uses); without it the tests say so and pass, unless
//! `SURELINK_REQUIRE_PG` is set.

#![cfg(feature = "postgres")]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;
use common::{example, fresh_database};

/// Payments per run and their rate: issue 23's "done when".
const COUNT: u64 = 2000;
const RATE: u64 = 200;
/// A killed replica is started again this long after the kill.
const RESTART_AFTER: Duration = Duration::from_secs(3);
/// How long a fault other than a kill lasts (the stop, the cut), and when it begins.
const FAULT_FOR: Duration = Duration::from_secs(3);
const FAULT_AT: Duration = Duration::from_secs(4);

/// The runs share one PostgreSQL cluster, and one of them restarts it: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Kill runs (and ledger kill runs): `SURELINK_AUDIT_RUNS`, else the short form's.
fn runs(short: usize) -> (usize, bool) {
    match std::env::var("SURELINK_AUDIT_RUNS") {
        Ok(n) => (
            n.parse()
                .unwrap_or_else(|_| panic!("SURELINK_AUDIT_RUNS={n}: not a number")),
            true,
        ),
        Err(_) => (short, false),
    }
}

/// Run `i`'s kill time: 1 + (i·7 mod 8) s, so consecutive runs spread over 1–8 s.
fn kill_at(i: usize) -> Duration {
    Duration::from_secs(1 + (i as u64 * 7) % 8)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// SIGKILL A, start it again `RESTART_AFTER` later.
    Kill,
    /// Restart PostgreSQL (or terminate its backends, see the module docs).
    PgRestart,
    /// Cut A's connections to PostgreSQL for `FAULT_FOR`.
    Cut,
    /// SIGSTOP A for `FAULT_FOR`.
    Stop,
}

#[test]
fn kill_runs() {
    let (n, full) = runs(2);
    let at: Vec<usize> = (0..n).collect();
    audit("kill", &at, Fault::Kill, false, full);
}

#[test]
fn ledger_kill_runs() {
    // The short form's one ledger run kills at run 2's time (7 s), the kill runs' at 1 s and 8 s.
    let (n, full) = runs(1);
    let at: Vec<usize> = if full { (0..n).collect() } else { vec![2] };
    audit("ledger-kill", &at, Fault::Kill, true, full);
}

#[test]
fn postgres_restart() {
    fault_variant("pg-restart", Fault::PgRestart);
}

#[test]
fn replica_cut_off_from_postgres() {
    fault_variant("cut", Fault::Cut);
}

#[test]
fn slow_replica_lease_expires() {
    fault_variant("stop", Fault::Stop);
}

/// A fault other than a kill: once without `--ledger`; in the full form with it as well.
fn fault_variant(label: &str, fault: Fault) {
    let (_, full) = runs(1);
    audit(label, &[0], fault, false, full);
    if full {
        audit(&format!("ledger-{label}"), &[0], fault, true, full);
    }
}

/// Runs `label` once per entry of `indices` (the kill-time index), prints each run's
/// summary, and fails with every violation found once all runs are done.
fn audit(label: &str, indices: &[usize], fault: Fault, ledger: bool, full: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::var_os("SURELINK_PG_URL").is_none() {
        // Says it skipped, or fails under SURELINK_REQUIRE_PG.
        assert!(rt.block_on(fresh_database("audit")).is_none());
        return;
    }
    let mut violations = Vec::new();
    for (run, &i) in indices.iter().enumerate() {
        let at = if fault == Fault::Kill {
            kill_at(i)
        } else {
            FAULT_AT
        };
        let name = format!("{label}-{run}");
        let report = run_once(&rt, &name, fault, at, ledger);
        println!("{}", report.summary);
        if report.violations.is_empty() {
            if std::env::var_os("SURELINK_AUDIT_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(&report.dir);
            }
        } else {
            for v in &report.violations {
                violations.push(format!("{name} (fault at {at:?}): {v}"));
            }
            violations.push(format!("{name}: files kept in {}", report.dir.display()));
        }
    }
    let form = if full { "full" } else { "short" };
    assert!(
        violations.is_empty(),
        "{label} ({form} form, {} runs):\n{}",
        indices.len(),
        violations.join("\n")
    );
}

/// One replica: its flags (the same for a restart), its process, its files.
struct Replica {
    name: String,
    args: Vec<OsString>,
    dir: PathBuf,
    deliveries: PathBuf,
    child: Option<Child>,
    /// Incarnations started so far (each has its own stdout and stderr files).
    starts: usize,
}

impl Replica {
    fn new(name: &str, dir: &Path, port: u16, url: &str, ledger: bool) -> Replica {
        let deliveries = dir.join(format!("{name}.deliveries"));
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--cert-dir".into(),
            dir.join("cert").into(),
            "--dedupe-url".into(),
            url.into(),
            "--deliveries".into(),
            deliveries.clone().into(),
            "--replica-name".into(),
            name.into(),
            // Stopped by this test, never by idleness (a stopped replica sees a long gap).
            "--idle-exit-secs".into(),
            "3600".into(),
        ];
        if ledger {
            args.push("--ledger".into());
        }
        Replica {
            name: name.to_string(),
            args,
            dir: dir.to_path_buf(),
            deliveries,
            child: None,
            starts: 0,
        }
    }

    fn log(&self, n: usize, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{n}.{ext}", self.name))
    }

    /// Starts it and waits for "listening on".
    fn start(&mut self) {
        self.starts += 1;
        let stdout = self.log(self.starts, "stdout");
        let child = Command::new(example("payment_server"))
            .args(&self.args)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(self.log(self.starts, "stderr")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let out = std::fs::read_to_string(&stdout).unwrap_or_default();
            if out.contains("listening on") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "replica {} exited at start ({status}): {}",
                    self.name,
                    std::fs::read_to_string(self.log(self.starts, "stderr")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < until,
                "replica {} did not start",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    fn signal(&self, sig: &str) {
        signal(&self.pid(), sig);
    }

    /// SIGKILL, and reaps it.
    fn kill(&mut self) {
        self.signal("KILL");
        self.child.take().unwrap().wait().unwrap();
    }

    /// SIGTERM (it prints its tally), SIGKILL if it does not exit within 10 s; its last JSON
    /// line.
    fn stop(&mut self) -> Option<String> {
        let mut child = self.child.take()?;
        // A stopped process would not see the SIGTERM: continue it first (harmless otherwise).
        signal(&child.id().to_string(), "CONT");
        signal(&child.id().to_string(), "TERM");
        if wait_for(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        std::fs::read_to_string(self.log(self.starts, "stdout"))
            .unwrap_or_default()
            .lines()
            .rfind(|l| l.starts_with('{'))
            .map(str::to_string)
    }

    /// Every log line of every incarnation.
    fn stderr(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log(n, "stderr")).unwrap_or_default())
            .collect()
    }

    /// Whether incarnation `n` accepted a connection (a client reached it).
    fn connected(&self, n: usize) -> bool {
        std::fs::read_to_string(self.log(n, "stderr"))
            .unwrap_or_default()
            .contains("payment_server: connection")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c.id().to_string(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `kill -SIG pid`.
fn signal(pid: &str, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}").as_str(), pid])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A UDP port free now (the replica binds it; its restart binds it again).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// The value of `"key":` in a one-line JSON object of numbers and strings.
fn field(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\":"))?;
    Some(
        json[at + key.len() + 3..]
            .split([',', '}'])
            .next()?
            .trim_matches('"')
            .to_string(),
    )
}

/// A file of ids, one per line; lines that are not ids are returned apart.
fn read_ids(path: &Path) -> (Vec<i64>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ids = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines() {
        match line.trim().parse() {
            Ok(id) => ids.push(id),
            Err(_) => bad.push(line.to_string()),
        }
    }
    (ids, bad)
}

/// One payment's line of `payment_client --outcomes`.
struct Outcome {
    id: i64,
    sent_ms: f64,
    outcome: String,
    latency_ms: f64,
}

fn read_outcomes(path: &Path) -> Vec<Outcome> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(Outcome {
                id: f.first()?.parse().ok()?,
                sent_ms: f.get(1)?.parse().ok()?,
                outcome: f.get(2)?.to_string(),
                latency_ms: f.get(3)?.parse().ok()?,
            })
        })
        .collect()
}

/// A TCP relay between a replica and PostgreSQL that can be cut: every connection dropped
/// and new ones refused (the port closed) for a while.
struct Relay {
    port: u16,
    cuts: tokio::sync::mpsc::UnboundedSender<Duration>,
}

impl Relay {
    fn start(rt: &tokio::runtime::Runtime, upstream: SocketAddr) -> Relay {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cuts, rx) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(relay(listener, upstream, rx));
        Relay { port, cuts }
    }

    fn cut(&self, down: Duration) {
        self.cuts.send(down).unwrap();
    }
}

async fn relay(
    listener: tokio::net::TcpListener,
    upstream: SocketAddr,
    mut cuts: tokio::sync::mpsc::UnboundedReceiver<Duration>,
) {
    let addr = listener.local_addr().unwrap();
    let mut listener = Some(listener);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Some(l) = &listener else {
            // Back after a cut: the same port again.
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                if let Ok((mut down, _)) = accepted {
                    conns.spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                            // As the client's own socket: no Nagle delay on small writes (with
                            // it, each round trip of a transaction waited for delayed ACKs).
                            let _ = down.set_nodelay(true);
                            let _ = up.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                }
            }
            cut = cuts.recv() => {
                let Some(down) = cut else { return };
                // Closed port (new connections refused) and every connection dropped.
                listener = None;
                conns.abort_all();
                while conns.join_next().await.is_some() {}
                tokio::time::sleep(down).await;
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Restarts the PostgreSQL cluster behind `url` with `pg_ctl restart -m fast`; when that is
/// not possible, terminates every other backend of the database for 1 s instead. Says
/// which it did, and how long it took.
fn restart_postgres(rt: &tokio::runtime::Runtime, url: &str) -> String {
    let data_dir: Option<String> = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        c.query_one("SHOW data_directory", &[])
            .await
            .ok()
            .map(|r| r.get(0))
    });
    let pg_ctl = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string() + "/pg_ctl")
        .filter(|p| Path::new(p).exists());
    let why_not = match (&data_dir, &pg_ctl) {
        (Some(dir), Some(pg_ctl)) => {
            let cmd = format!("{pg_ctl} -D '{dir}' restart -m fast -w");
            let root = Command::new("id")
                .arg("-u")
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
            let mut run = if root {
                let mut c = Command::new("su");
                c.args(["postgres", "-c", &cmd]);
                c
            } else {
                let mut c = Command::new("sh");
                c.args(["-c", &cmd]);
                c
            };
            let t0 = Instant::now();
            match run.stdout(Stdio::null()).output() {
                Ok(o) if o.status.success() => {
                    return format!("pg_ctl restart -m fast took {:?}", t0.elapsed())
                }
                Ok(o) => format!("pg_ctl failed: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => format!("pg_ctl: {e}"),
            }
        }
        _ => "no data directory or pg_ctl found".to_string(),
    };
    let t0 = Instant::now();
    let mut terminated = 0i64;
    rt.block_on(async {
        while t0.elapsed() < Duration::from_secs(1) {
            if let Ok((c, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                if let Ok(rows) = c
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                {
                    terminated += rows.len() as i64;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    format!(
        "stand-in for a restart ({}): terminated {terminated} backends over 1 s",
        why_not.trim()
    )
}

struct Report {
    summary: String,
    violations: Vec<String>,
    dir: PathBuf,
}

fn run_once(
    rt: &tokio::runtime::Runtime,
    name: &str,
    fault: Fault,
    at: Duration,
    ledger: bool,
) -> Report {
    let url = rt
        .block_on(fresh_database(&name.replace('-', "_")))
        .expect("SURELINK_PG_URL");
    let dir = std::env::temp_dir().join(format!("surelink-audit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // A reaches PostgreSQL through the relay in the cut variant, directly otherwise.
    let pg: tokio_postgres::Config = url.parse().unwrap();
    let pg_addr: SocketAddr = match (&pg.get_hosts()[0], pg.get_ports()[0]) {
        (tokio_postgres::config::Host::Tcp(h), port) => format!("{h}:{port}").parse().unwrap(),
        #[allow(unreachable_patterns)]
        _ => panic!("SURELINK_PG_URL must name a TCP host"),
    };
    let relay = (fault == Fault::Cut).then(|| Relay::start(rt, pg_addr));
    let url_a = match &relay {
        Some(r) => url.replacen(
            &format!(":{}/", pg_addr.port()),
            &format!(":{}/", r.port),
            1,
        ),
        None => url.clone(),
    };
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let mut a = Replica::new("A", &dir, port_a, &url_a, ledger);
    let mut b = Replica::new("B", &dir, port_b, &url, ledger);
    // A first: it writes the shared certificate that B then reuses.
    a.start();
    b.start();

    let (acked_path, outcomes_path) = (dir.join("acked"), dir.join("outcomes.csv"));
    let mut client = Command::new(example("payment_client"))
        .arg("--connect")
        .arg(format!("127.0.0.1:{port_a},127.0.0.1:{port_b}"))
        .arg("--ca")
        .arg(dir.join("cert").join("cert.der"))
        .args(["--count", &COUNT.to_string(), "--rate", &RATE.to_string()])
        .args(["--size", "256", "--keyed", "--retries", "2"])
        .arg("--acked-ids")
        .arg(&acked_path)
        .arg("--outcomes")
        .arg(&outcomes_path)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("client.stderr")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    std::thread::sleep(at);
    let fault_ms = unix_ms(SystemTime::now());
    let what = match fault {
        Fault::Kill => {
            a.kill();
            std::thread::sleep(RESTART_AFTER);
            a.start();
            format!("SIGKILL A, restarted after {RESTART_AFTER:?}")
        }
        Fault::Stop => {
            a.signal("STOP");
            std::thread::sleep(FAULT_FOR);
            a.signal("CONT");
            format!("SIGSTOP A for {FAULT_FOR:?}")
        }
        Fault::Cut => {
            relay.as_ref().unwrap().cut(FAULT_FOR);
            std::thread::sleep(FAULT_FOR);
            format!("A cut off from PostgreSQL for {FAULT_FOR:?}")
        }
        Fault::PgRestart => restart_postgres(rt, &url),
    };
    // The fault's end: A back (kill), continued (stop), reconnectable (cut, restart).
    let restarted_at = started.elapsed();
    let fault_end_ms = unix_ms(SystemTime::now());

    // Every send ends in an outcome: the client exits (its deadline is 5 s, 2 retries).
    let limit = Duration::from_secs(COUNT / RATE + 90);
    let status = wait_for(&mut client, limit.saturating_sub(started.elapsed()));
    let mut violations = Vec::new();
    if status.is_none() {
        let _ = client.kill();
        violations.push(format!("the client did not exit within {limit:?}"));
    }
    let json = {
        use std::io::Read;
        let mut s = String::new();
        let _ = client.stdout.take().unwrap().read_to_string(&mut s);
        s.lines()
            .rfind(|l| l.starts_with('{'))
            .unwrap_or("")
            .to_string()
    };
    let client_elapsed = started.elapsed();
    // Give the replicas a moment to hand over what they acked last, then stop them.
    std::thread::sleep(Duration::from_millis(300));
    let rejoined = a.starts > 1 && a.connected(a.starts);
    // A restarted replica rejoins as the client's standby: the client tries the replicas
    // before its standby every 5 s, so one that was back 6 s before the client's end must
    // have been reached.
    let back_for = client_elapsed.saturating_sub(restarted_at);
    if a.starts > 1 && !rejoined && back_for >= Duration::from_secs(6) {
        violations.push(format!(
            "A was back for {back_for:?} before the client ended, and no client connected to it"
        ));
    }
    let tallies = [a.stop(), b.stop()];
    let logs = [a.stderr(), b.stderr()];

    // The client's account.
    let num = |k: &str| -> u64 {
        field(&json, k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no {k} in the client's line {json:?}"))
    };
    let (acked_n, unknown, definite) = if json.is_empty() {
        violations.push("the client printed no summary".into());
        (0, 0, 0)
    } else {
        (num("acked"), num("failed_unknown"), num("failed_definite"))
    };
    if !json.is_empty() && (num("sent") != COUNT || acked_n + unknown + definite != COUNT) {
        violations.push(format!(
            "outcomes do not add up: sent {} = acked {acked_n} + unknown {unknown} + definite {definite}?",
            num("sent")
        ));
    }
    let outcomes = read_outcomes(&outcomes_path);
    if outcomes.len() as u64 != COUNT {
        violations.push(format!(
            "{} outcome lines for {COUNT} payments",
            outcomes.len()
        ));
    }
    let (acked, bad) = read_ids(&acked_path);
    if !bad.is_empty() || acked.len() as u64 != acked_n {
        violations.push(format!(
            "--acked-ids has {} ids ({} unreadable lines) for {acked_n} acked",
            acked.len(),
            bad.len()
        ));
    }
    let sent: BTreeSet<i64> = outcomes.iter().map(|o| o.id).collect();

    // The replicas' account: who took what, how often.
    let mut taken: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    let mut per_replica = Vec::new();
    for r in [&a, &b] {
        let (ids, bad) = read_ids(&r.deliveries);
        if !bad.is_empty() {
            violations.push(format!("{}'s deliveries: unreadable lines {bad:?}", r.name));
        }
        per_replica.push(format!("{}={}", r.name, ids.len()));
        for id in ids {
            taken.entry(id).or_default().push(r.name.as_str());
        }
    }
    let doubles: Vec<_> = taken.iter().filter(|(_, by)| by.len() > 1).collect();
    if !doubles.is_empty() {
        violations.push(format!(
            "{} ids taken more than once: {:?}",
            doubles.len(),
            doubles.iter().take(10).collect::<Vec<_>>()
        ));
    }
    let strangers: Vec<_> = taken.keys().filter(|id| !sent.contains(id)).collect();
    if !strangers.is_empty() {
        violations.push(format!("ids taken that were never sent: {strangers:?}"));
    }
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !taken.contains_key(id))
        .collect();
    let kills = usize::from(fault == Fault::Kill);
    if missing.len() > kills {
        violations.push(format!(
            "{} acked ids in no deliveries file (at most {kills} allowed): {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    let taken_unacked = taken.len() - (acked.len() - missing.len());

    // With --ledger: the ledger has every acked payment and every taken one.
    let mut ledger_note = String::new();
    if ledger {
        let rows: Vec<(i64, String)> = rt.block_on(async {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            c.query("SELECT payment_id, replica FROM surelink_ledger", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        });
        let in_ledger: BTreeSet<i64> = rows.iter().map(|(id, _)| *id).collect();
        let not_in_ledger: Vec<_> = acked.iter().filter(|id| !in_ledger.contains(id)).collect();
        if !not_in_ledger.is_empty() {
            violations.push(format!(
                "{} acked ids not in the ledger: {:?}",
                not_in_ledger.len(),
                &not_in_ledger[..not_in_ledger.len().min(10)]
            ));
        }
        let taken_no_row: Vec<_> = taken.keys().filter(|id| !in_ledger.contains(id)).collect();
        if !taken_no_row.is_empty() {
            violations.push(format!(
                "{} ids in a deliveries file without a ledger row: {:?}",
                taken_no_row.len(),
                &taken_no_row[..taken_no_row.len().min(10)]
            ));
        }
        let rows_untaken = in_ledger
            .iter()
            .filter(|id| !taken.contains_key(id))
            .count();
        if rows_untaken > kills {
            violations.push(format!(
                "{rows_untaken} ledger rows in no deliveries file (at most {kills}: a kill between commit and write)"
            ));
        }
        let already: usize = logs
            .iter()
            .map(|l| l.matches("is in the ledger already").count())
            .sum();
        if already > 0 {
            violations.push(format!(
                "{already} payments claimed Now whose ledger row existed (taken twice)"
            ));
        }
        let by_a = rows.iter().filter(|(_, r)| r == "A").count();
        ledger_note = format!(
            " ledger={} (A {by_a}, B {}) not_in_ledger={}",
            rows.len(),
            rows.len() - by_a,
            not_in_ledger.len()
        );
    }

    // How long the fault made payments wait: those in flight when it began.
    let inflight: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.sent_ms <= fault_ms && o.sent_ms + o.latency_ms > fault_ms)
        .map(|o| o.sent_ms + o.latency_ms - fault_ms)
        .collect();
    let mut waits = inflight.clone();
    waits.sort_by(f64::total_cmp);
    let max_latency = outcomes.iter().map(|o| o.latency_ms).fold(0.0, f64::max);
    // The latency before the fault (payments acked before it began), for comparison.
    let mut before: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.outcome == "acked" && o.sent_ms + o.latency_ms <= fault_ms)
        .map(|o| o.latency_ms)
        .collect();
    before.sort_by(f64::total_cmp);
    let pct = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 * q).ceil() as usize).clamp(1, v.len().max(1)) - 1)
            .copied()
            .unwrap_or(0.0)
    };
    // Each missing id: when its ack came, against the fault (before: the killed replica
    // acked it, so its application had taken it; after: another replica acked it, finding
    // it settled by the killed one, which had not handed it over).
    let missing_detail: Vec<String> = missing
        .iter()
        .filter_map(|id| outcomes.iter().find(|o| o.id == *id))
        .map(|o| {
            format!(
                "{} sent {:+.0} ms acked {:+.0} ms from the fault",
                o.id,
                o.sent_ms - fault_ms,
                o.sent_ms + o.latency_ms - fault_ms
            )
        })
        .collect();
    // Payments sent while the fault lasted: how long they took.
    let during: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.sent_ms >= fault_ms && o.sent_ms <= fault_end_ms)
        .map(|o| o.latency_ms)
        .collect();
    let during_max = during.iter().copied().fold(0.0, f64::max);
    let failed_kinds: BTreeMap<String, usize> = outcomes
        .iter()
        .filter(|o| o.outcome != "acked")
        .fold(BTreeMap::new(), |mut m, o| {
            *m.entry(o.outcome.clone()).or_default() += 1;
            m
        });
    let summary = format!(
        "audit {name}: fault at {:.1}s ({what}); client {:.1}s exit={:?} acked={acked_n} unknown={unknown} definite={definite} {failed_kinds:?} \
         delivered {} taken_not_acked={taken_unacked} missing={} {missing_detail:?} doubles={}{ledger_note} \
         latency before the fault p50 {:.1} ms p99 {:.1} ms; \
         inflight_at_fault={} their wait after the fault: max {:.0} ms, median {:.0} ms; max latency {:.0} ms; \
         sent during the fault: {} (max latency {during_max:.0} ms); fault over at {:.1}s{} failovers={} tallies={tallies:?}",
        at.as_secs_f64(),
        client_elapsed.as_secs_f64(),
        status.and_then(|s| s.code()),
        per_replica.join(" "),
        missing.len(),
        doubles.len(),
        pct(&before, 0.5),
        pct(&before, 0.99),
        inflight.len(),
        waits.last().copied().unwrap_or(0.0),
        waits.get(waits.len() / 2).copied().unwrap_or(0.0),
        max_latency,
        during.len(),
        restarted_at.as_secs_f64(),
        if fault == Fault::Kill {
            format!(" A rejoined={rejoined}")
        } else {
            String::new()
        },
        field(&json, "failovers").unwrap_or_default(),
    );
    // A failed run's database stays for a look (the throwaway cluster goes anyway).
    let _ = violations.is_empty()
        && rt
            .block_on(async {
                let (c, conn) = tokio_postgres::connect(
                    &format!("{}/postgres", url.rsplit_once('/').unwrap().0),
                    tokio_postgres::NoTls,
                )
                .await?;
                tokio::spawn(conn);
                let db = url.rsplit_once('/').unwrap().1;
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .await
            })
            .is_ok();
    Report {
        summary,
        violations,
        dir,
    }
}
