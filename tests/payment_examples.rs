//! Drives the payment examples as outside checks do: real UDP on loopback, the CLI and JSON
//! lines of issue 4. `cargo test` builds the examples next to the test binaries.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;
use common::example;

/// The value of `"key":` in a one-line JSON object of numbers and strings.
fn field(json: &str, key: &str) -> String {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    json[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// Starts `payment_server` with its certificate in `dir` and `extra` flags; returns it, its
/// stdout and the address it listens on.
fn start_server(
    dir: &std::path::Path,
    extra: &[&std::ffi::OsStr],
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
) {
    let mut server = Command::new(example("payment_server"))
        .args(["--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(dir)
        .args(extra)
        .args(["--idle-exit-secs", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();
    (server, out, addr)
}

#[test]
fn server_and_client_over_real_udp() {
    let dir = std::env::temp_dir().join(format!("surelink-pay-{}", std::process::id()));
    let (mut server, mut out, addr) = start_server(&dir, &[]);

    for mode in ["surelink", "quinn-stream", "quinn-stream-bbr"] {
        // The BBR baseline gives a duration instead of a count: 200/s for 0.25 s is 50.
        let count: &[&str] = if mode == "quinn-stream-bbr" {
            &["--duration-s", "0.25"]
        } else {
            &["--count", "50"]
        };
        let client = Command::new(example("payment_client"))
            .args(["--connect", &addr, "--ca"])
            .arg(dir.join("cert.der"))
            .args(count)
            .args(["--rate", "200", "--size", "300", "--mode", mode])
            .output()
            .unwrap();
        let json = String::from_utf8(client.stdout).unwrap();
        assert!(client.status.success(), "{mode}: {json}");
        assert_eq!(field(&json, "mode"), mode);
        assert_eq!(field(&json, "sent"), "50");
        assert_eq!(field(&json, "acked"), "50");
        assert_eq!(field(&json, "failed"), "0");
        assert_eq!(field(&json, "payload_bytes"), "15000");
        for key in [
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p999_ms",
            "max_ms",
            "wire_bytes",
            "elapsed_s",
        ] {
            assert!(
                field(&json, key).parse::<f64>().unwrap() > 0.0,
                "{key} in {json}"
            );
        }
        assert!(field(&json, "send_lag_p99_ms").parse::<f64>().unwrap() >= 0.0);
        assert_eq!(field(&json, "rate"), "200", "{json}");
        // surelink's sender counters; null for the baselines.
        let data_shards = field(&json, "data_shards");
        if mode == "surelink" {
            assert!(data_shards.parse::<u64>().unwrap() >= 50, "{json}");
            field(&json, "datagram_send_errors").parse::<u64>().unwrap();
        } else {
            assert_eq!(data_shards, "null", "{json}");
        }
    }

    // SIGTERM: the server prints its tally and exits.
    let killed = Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert_eq!(field(&tally, "delivered"), "150", "{tally}");
    assert_eq!(field(&tally, "duplicates"), "0", "{tally}");
    assert_eq!(field(&tally, "invalid_frames"), "0", "{tally}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 6's flags: `payment_server --client-ca FILE` requires client certificates from that
/// CA; `payment_client --cert FILE --key FILE` presents one. Without a certificate, or with
/// one from another CA, the handshake fails and the client exits non-zero with a message
/// naming the certificate problem; with a valid one every payment is acked.
#[test]
fn mutual_tls_flags() {
    use surelink::sim::TestCa;
    let dir = std::env::temp_dir().join(format!("surelink-mtls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = TestCa::new("payments client CA").unwrap();
    std::fs::write(dir.join("client-ca.pem"), ca.cert_pem()).unwrap();
    let good = ca.client("till-7").unwrap();
    std::fs::write(dir.join("client.pem"), &good.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &good.key_pem).unwrap();
    let rogue = TestCa::new("someone else")
        .unwrap()
        .client("till-7")
        .unwrap();
    std::fs::write(dir.join("rogue.pem"), &rogue.cert_pem).unwrap();
    std::fs::write(dir.join("rogue.key"), &rogue.key_pem).unwrap();

    let client_ca = dir.join("client-ca.pem");
    let (mut server, mut out, addr) =
        start_server(&dir, &["--client-ca".as_ref(), client_ca.as_os_str()]);
    let client = |mode: &str, cert: Option<(&str, &str)>| {
        let mut cmd = Command::new(example("payment_client"));
        cmd.args(["--connect", &addr, "--ca"])
            .arg(dir.join("cert.der"))
            .args([
                "--count", "20", "--rate", "200", "--size", "100", "--mode", mode,
            ]);
        if let Some((cert, key)) = cert {
            cmd.arg("--cert").arg(dir.join(cert));
            cmd.arg("--key").arg(dir.join(key));
        }
        cmd.output().unwrap()
    };

    for mode in ["surelink", "quinn-stream"] {
        for cert in [None, Some(("rogue.pem", "rogue.key"))] {
            let refused = client(mode, cert);
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert_eq!(
                refused.status.code(),
                Some(2),
                "{mode} {cert:?}: {stderr} {}",
                String::from_utf8_lossy(&refused.stdout)
            );
            assert!(
                stderr.contains("payment_client: connecting to") && stderr.contains("certificate"),
                "{mode} {cert:?}: {stderr}"
            );
        }
        let ok = client(mode, Some(("client.pem", "client.key")));
        let json = String::from_utf8(ok.stdout).unwrap();
        assert!(ok.status.success(), "{mode}: {json}");
        assert_eq!(field(&json, "acked"), "20", "{json}");
    }

    let killed = Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert_eq!(field(&tally, "delivered"), "40", "{tally}");
    assert_eq!(field(&tally, "duplicates"), "0", "{tally}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The loss sweep's CLI and JSON contract (issue 5): `--json` prints one object per row with
/// the agreed keys; every transport appears for every model; surelink's rows account for
/// every payment, without duplicates.
#[test]
fn loss_sweep_json_rows() {
    let out = Command::new(example("loss_sweep"))
        .args([
            "--loss",
            "0,0.1",
            "--messages",
            "200",
            "--rate",
            "200",
            "--size",
            "256",
            "--delay-ms",
            "10",
            "--seed",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    // Two Bernoulli rates and the default Gilbert-Elliott case, three transports each.
    assert_eq!(rows.len(), 9, "{stdout}");
    let keys = [
        "transport",
        "model",
        "loss",
        "realized_loss",
        "messages",
        "acked",
        "failed",
        "duplicates",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "p999_ms",
        "max_ms",
        "wire_bytes",
        "payload_bytes",
    ];
    for row in &rows {
        for k in keys {
            field(row, k);
        }
        assert_eq!(field(row, "messages"), "200");
        assert_eq!(field(row, "payload_bytes"), "51200");
        let acked: u64 = field(row, "acked").parse().unwrap();
        let failed: u64 = field(row, "failed").parse().unwrap();
        assert_eq!(acked + failed, 200, "{row}");
        assert_eq!(field(row, "duplicates"), "0", "{row}");
        let wire: u64 = field(row, "wire_bytes").parse().unwrap();
        assert!(wire > 51_200, "{row}");
    }
    for t in ["surelink", "quinn-stream", "quinn-stream-bbr"] {
        let n = rows.iter().filter(|r| field(r, "transport") == t).count();
        assert_eq!(n, 3, "{t}");
    }
    let lossy = rows
        .iter()
        .find(|r| field(r, "transport") == "surelink" && field(r, "loss") == "0.1")
        .unwrap();
    let realized: f64 = field(lossy, "realized_loss").parse().unwrap();
    assert!(realized > 0.05 && realized < 0.15, "{lossy}");
    assert_eq!(field(lossy, "model"), "bernoulli");
}

/// Issue 14's cases in the loss sweep: Gilbert-Elliott bursts as a list, a blackout, a
/// bottleneck, several seeds. Each row names its model and parameters; a blackout row reports
/// its recovery and the payments caught by the outage; every row accounts for every payment.
#[test]
fn loss_sweep_burst_blackout_bottleneck_and_seeds() {
    let out = Command::new(example("loss_sweep"))
        .args(["--loss", "0", "--ge-loss", "0.05", "--ge-burst", "4,8"])
        .args(["--blackout", "0.3,0.4", "--bottleneck-kbps", "1000"])
        .args(["--messages", "200", "--size", "256", "--delay-ms", "10"])
        .args(["--seeds", "1-2", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    // One Bernoulli case, two Gilbert-Elliott, one blackout, one bottleneck; two seeds; three
    // transports.
    assert_eq!(rows.len(), 5 * 2 * 3, "{stdout}");
    let of = |model: &str| -> Vec<&str> {
        rows.iter()
            .copied()
            .filter(|r| field(r, "model") == model)
            .collect()
    };
    for row in &rows {
        let acked: u64 = field(row, "acked").parse().unwrap();
        let failed: u64 = field(row, "failed").parse().unwrap();
        assert_eq!(acked + failed, 200, "{row}");
        assert_eq!(field(row, "clock"), "virtual", "{row}");
        assert!(["1", "2"].contains(&field(row, "seed").as_str()), "{row}");
        let delivered: u64 = field(row, "delivered_bytes").parse().unwrap();
        let wire: u64 = field(row, "wire_bytes").parse().unwrap();
        assert!(delivered > 0 && delivered <= wire, "{row}");
    }
    let ge = of("gilbert-elliott");
    assert_eq!(ge.len(), 12);
    for burst in ["4.000", "8.000"] {
        assert_eq!(
            ge.iter().filter(|r| field(r, "ge_burst") == burst).count(),
            6
        );
    }
    let blackout = of("blackout");
    assert_eq!(blackout.len(), 6);
    for row in &blackout {
        assert_eq!(field(row, "blackout_start_s"), "0.300", "{row}");
        assert_eq!(field(row, "blackout_s"), "0.400", "{row}");
        assert!(
            field(row, "dropped_blackout").parse::<u64>().unwrap() > 0,
            "{row}"
        );
        // 0.4 s at 200/s: about 80 payments sent into the outage, and those in flight.
        let caught: u64 = field(row, "outage_payments").parse().unwrap();
        assert!((80..=100).contains(&caught), "{row}");
        field(row, "outage_failed").parse::<u64>().unwrap();
        field(row, "recovery_ms").parse::<f64>().unwrap();
        assert_eq!(field(row, "ge_burst"), "null", "{row}");
    }
    let surelink_blackout = blackout
        .iter()
        .find(|r| field(r, "transport") == "surelink")
        .unwrap();
    // The deadline outlasts the outage by default: max(5, 0.4 + 2) s.
    assert_eq!(
        field(surelink_blackout, "deadline_s"),
        "5",
        "{surelink_blackout}"
    );
    let bottleneck = of("bottleneck");
    assert_eq!(bottleneck.len(), 6);
    for row in &bottleneck {
        assert_eq!(field(row, "bottleneck_kbps"), "1000.000", "{row}");
        assert_eq!(field(row, "bottleneck_queue_ms"), "50.000", "{row}");
        assert_eq!(field(row, "dropped_blackout"), "0", "{row}");
    }
    for row in of("bernoulli") {
        for k in ["ge_burst", "blackout_s", "recovery_ms", "bottleneck_kbps"] {
            assert_eq!(field(row, k), "null", "{k} in {row}");
        }
        if field(row, "transport") == "surelink" {
            field(row, "hedges").parse::<u64>().unwrap();
        } else {
            assert_eq!(field(row, "hedges"), "null", "{row}");
        }
    }
}

/// Issue 7's flags over real UDP: three `payment_server --dedupe-url` replicas sharing one
/// PostgreSQL database and one `--cert-dir`; `payment_client --connect A,B,C`. The preferred
/// replica shuts down a second into the run: the client fails over, every payment is acked,
/// and the replicas delivered 600 between them, each claimed once.
#[cfg(feature = "postgres")]
#[test]
fn replicas_share_a_postgres_store_and_the_client_fails_over() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(common::fresh_database("replicas")) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("surelink-replicas-{}", std::process::id()));
    let dedupe: [&std::ffi::OsStr; 2] = ["--dedupe-url".as_ref(), url.as_ref()];
    let mut servers: Vec<_> = (0..3).map(|_| start_server(&dir, &dedupe)).collect();
    let addrs: Vec<String> = servers.iter().map(|(_, _, a)| a.clone()).collect();
    let client = Command::new(example("payment_client"))
        .args(["--connect", &addrs.join(","), "--ca"])
        .arg(dir.join("cert.der"))
        .args(["--count", "600", "--rate", "200", "--size", "200"])
        .args(["--hedge-to", "both"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let stop = |server: &mut (
        std::process::Child,
        BufReader<std::process::ChildStdout>,
        String,
    )| {
        assert!(Command::new("kill")
            .arg(server.0.id().to_string())
            .status()
            .unwrap()
            .success());
        let mut tally = String::new();
        server.1.read_line(&mut tally).unwrap();
        server.0.wait().unwrap();
        tally
    };
    let first = stop(&mut servers[0]);
    let out = client.wait_with_output().unwrap();
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{json}");
    assert_eq!(field(&json, "acked"), "600", "{json}");
    assert!(
        field(&json, "failovers").parse::<u64>().unwrap() >= 1,
        "{json}"
    );
    // Loopback loses nothing, so hedges are rare; the field is there all the same.
    field(&json, "hedges_to_secondary").parse::<u64>().unwrap();
    let mut tallies = vec![first];
    for server in servers.iter_mut().skip(1) {
        tallies.push(stop(server));
    }
    eprintln!("client {json}\nservers {tallies:?}");
    let delivered: u64 = tallies
        .iter()
        .map(|t| field(t, "delivered").parse::<u64>().unwrap())
        .sum();
    for t in &tallies {
        assert_eq!(field(t, "duplicates"), "0", "{t}");
    }
    let claims: i64 = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query_one("SELECT count(*) FROM surelink_claims", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(claims, 600, "one claim per payment");
    assert_eq!(delivered, 600, "{tallies:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The inbox example (issue 7): ledger row and claim in one PostgreSQL transaction, the ack
/// after the commit, every tenth payment failing its first attempt and retried by key. The
/// ledger holds each payment exactly once.
#[cfg(feature = "postgres")]
#[test]
fn the_inbox_example_commits_each_payment_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(common::fresh_database("inbox")) else {
        return;
    };
    let out = Command::new(example("inbox"))
        .args(["--pg-url", &url, "--payments", "300", "--loss", "0.1"])
        .args(["--fail-every", "10"])
        .output()
        .unwrap();
    let json = String::from_utf8(out.stdout).unwrap();
    eprintln!("{json}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{json}");
    assert_eq!(field(&json, "ledger_rows"), "300");
    assert_eq!(field(&json, "claims"), "300");
    assert_eq!(field(&json, "failed_attempts"), "30");
    // Each payment whose first attempt failed was handed over again and committed: by the
    // sender's own resend before its deadline (protocol 2 resends a message an ack of a
    // later one shows unacked), or after a retry by key.
    assert_eq!(field(&json, "committed"), "300", "{json}");
}

/// Issue 23's flags for outside checkers, without a store: `payment_server --deliveries FILE
/// --replica-name NAME` writes one id per payment taken (the payload's first 8 bytes, big
/// endian, signed) and names itself on its log lines; `payment_client --keyed --acked-ids
/// FILE --outcomes FILE` writes the id of every acked payment and every payment's outcome,
/// and its JSON line splits the failures into unknown and definite ones.
#[test]
fn deliveries_acked_ids_and_replica_name_flags() {
    let dir = std::env::temp_dir().join(format!("surelink-flags-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let deliveries = dir.join("deliveries");
    // A line from an earlier run: the file is appended to, never truncated.
    std::fs::write(&deliveries, "-42\n").unwrap();
    let stderr = dir.join("server.stderr");
    let mut server = Command::new(example("payment_server"))
        .args(["--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(&dir)
        .arg("--deliveries")
        .arg(&deliveries)
        .args(["--replica-name", "east-1", "--idle-exit-secs", "30"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect(&line);

    let (acked, outcomes) = (dir.join("acked"), dir.join("outcomes.csv"));
    let client = Command::new(example("payment_client"))
        .args(["--connect", addr, "--ca"])
        .arg(dir.join("cert.der"))
        .args(["--count", "100", "--rate", "500", "--size", "64", "--keyed"])
        .args(["--retries", "1", "--acked-ids"])
        .arg(&acked)
        .arg("--outcomes")
        .arg(&outcomes)
        .output()
        .unwrap();
    let json = String::from_utf8(client.stdout).unwrap();
    assert!(client.status.success(), "{json}");
    assert_eq!(field(&json, "acked"), "100", "{json}");
    assert_eq!(field(&json, "failed_unknown"), "0", "{json}");
    assert_eq!(field(&json, "failed_definite"), "0", "{json}");
    assert_eq!(field(&json, "keyed"), "true", "{json}");
    field(&json, "retries").parse::<u64>().unwrap();

    assert!(Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap()
        .success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert_eq!(field(&tally, "delivered"), "100", "{tally}");
    assert_eq!(field(&tally, "replica"), "east-1", "{tally}");
    assert_eq!(field(&tally, "payloads_without_id"), "0", "{tally}");

    let ids = |path: &std::path::Path| -> Vec<i64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap_or_else(|_| panic!("{l:?} in {path:?}")))
            .collect()
    };
    let acked = ids(&acked);
    assert_eq!(acked.len(), 100);
    let taken = ids(&deliveries);
    assert_eq!(taken[0], -42, "appended after the earlier line");
    // One run: a random 32-bit prefix, then the payment's number.
    let mut expected = acked.clone();
    expected.sort_by_key(|id| *id as u64 & 0xffff_ffff);
    for (n, id) in expected.iter().enumerate() {
        assert_eq!(
            *id as u64 & 0xffff_ffff,
            n as u64,
            "ids are prefix | number"
        );
    }
    let mut delivered = taken[1..].to_vec();
    delivered.sort();
    let mut acked_sorted = acked.clone();
    acked_sorted.sort();
    assert_eq!(delivered, acked_sorted, "each acked payment taken once");

    let csv = std::fs::read_to_string(&outcomes).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("id,sent_unix_ms,outcome,latency_ms,attempts,error")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 100);
    for row in &rows {
        assert_eq!(row.len(), 6, "{row:?}");
        assert!(acked.contains(&row[0].parse().unwrap()), "{row:?}");
        assert!(row[1].parse::<f64>().unwrap() > 1.6e12, "{row:?}");
        assert_eq!((row[2], row[5]), ("acked", ""), "{row:?}");
        assert!(row[3].parse::<f64>().unwrap() > 0.0, "{row:?}");
        assert!(row[4].parse::<u32>().unwrap() >= 1, "{row:?}");
    }

    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("replica=east-1 ") && l.contains("payment_server: ready")),
        "{log}"
    );
    assert!(
        log.lines().all(|l| l.starts_with("replica=east-1 ")),
        "every log line names the replica: {log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 23's `payment_server --dedupe-url URL --ledger`: the inbox pattern. Each payment's
/// claim and its `surelink_ledger` row commit in one transaction, named by `--replica-name`,
/// and the payment is acked after the commit; `--deliveries` records each committed payment.
#[cfg(feature = "postgres")]
#[test]
fn the_ledger_flag_commits_a_row_per_payment() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(common::fresh_database("ledger_flag")) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("surelink-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let deliveries = dir.join("deliveries");
    let flags: Vec<&std::ffi::OsStr> = vec![
        "--dedupe-url".as_ref(),
        url.as_ref(),
        "--ledger".as_ref(),
        "--replica-name".as_ref(),
        "west-2".as_ref(),
        "--deliveries".as_ref(),
        deliveries.as_os_str(),
    ];
    let (mut server, mut out, addr) = start_server(&dir, &flags);
    let acked = dir.join("acked");
    let client = Command::new(example("payment_client"))
        .args(["--connect", &addr, "--ca"])
        .arg(dir.join("cert.der"))
        .args([
            "--count", "200", "--rate", "200", "--size", "100", "--keyed",
        ])
        .arg("--acked-ids")
        .arg(&acked)
        .output()
        .unwrap();
    let json = String::from_utf8(client.stdout).unwrap();
    assert!(client.status.success(), "{json}");
    assert_eq!(field(&json, "acked"), "200", "{json}");

    assert!(Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap()
        .success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert_eq!(field(&tally, "ledger_rows"), "200", "{tally}");
    assert_eq!(field(&tally, "ledger_already"), "0", "{tally}");

    let sorted = |text: String| {
        let mut ids: Vec<i64> = text.lines().map(|l| l.parse().unwrap()).collect();
        ids.sort();
        ids
    };
    let acked = sorted(std::fs::read_to_string(&acked).unwrap());
    assert_eq!(sorted(std::fs::read_to_string(&deliveries).unwrap()), acked);
    let rows: Vec<(i64, String)> = rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query(
            "SELECT payment_id, replica FROM surelink_ledger ORDER BY payment_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    });
    assert_eq!(
        rows.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        acked,
        "one row per acked payment"
    );
    assert!(rows.iter().all(|(_, r)| r == "west-2"), "{rows:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 24's flags: `payment_server --reply-delay-ms D` answers each request `approved <payment
/// id>` D ms after taking it; `payment_client --request --keyed` sends every payment as a
/// request with its key, counts the replies in its JSON line, and writes each reply beside its
/// outcome in `--outcomes`. The round trip includes the application's processing time.
#[test]
fn request_and_reply_delay_flags() {
    let dir = std::env::temp_dir().join(format!("surelink-request-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut server, mut out, addr) =
        start_server(&dir, &["--reply-delay-ms".as_ref(), "40".as_ref()]);
    let outcomes = dir.join("outcomes.csv");
    let client = Command::new(example("payment_client"))
        .args(["--connect", &addr, "--ca"])
        .arg(dir.join("cert.der"))
        .args(["--count", "50", "--rate", "200", "--size", "64"])
        .args(["--request", "--keyed", "--retries", "1", "--outcomes"])
        .arg(&outcomes)
        .output()
        .unwrap();
    let json = String::from_utf8(client.stdout).unwrap();
    assert!(client.status.success(), "{json}");
    assert_eq!(field(&json, "acked"), "50", "{json}");
    assert_eq!(field(&json, "request"), "true", "{json}");
    assert_eq!(field(&json, "replies"), "50", "{json}");
    assert_eq!(field(&json, "replies_replayed"), "0", "{json}");
    // Every reply waited for the application's 40 ms.
    let p50: f64 = field(&json, "p50_ms").parse().unwrap();
    assert!(p50 >= 40.0, "{json}");

    let csv = std::fs::read_to_string(&outcomes).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("id,sent_unix_ms,outcome,latency_ms,attempts,error,reply,replayed")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 50);
    for row in &rows {
        assert_eq!(row.len(), 8, "{row:?}");
        assert_eq!((row[2], row[5]), ("acked", ""), "{row:?}");
        assert!(row[3].parse::<f64>().unwrap() >= 40.0, "{row:?}");
        assert_eq!(row[6], format!("approved {}", row[0]), "{row:?}");
        assert_eq!(row[7], "false", "{row:?}");
    }

    // Plain payments on the same server: acked when taken, no reply, no delay to wait for.
    let plain = Command::new(example("payment_client"))
        .args(["--connect", &addr, "--ca"])
        .arg(dir.join("cert.der"))
        .args(["--count", "20", "--rate", "200", "--size", "64"])
        .output()
        .unwrap();
    let json = String::from_utf8(plain.stdout).unwrap();
    assert!(plain.status.success(), "{json}");
    assert_eq!(field(&json, "acked"), "20", "{json}");
    assert_eq!(field(&json, "request"), "false", "{json}");
    assert_eq!(field(&json, "replies"), "null", "{json}");

    assert!(Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap()
        .success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert_eq!(field(&tally, "delivered"), "70", "{tally}");
    assert_eq!(field(&tally, "duplicates"), "0", "{tally}");
    assert_eq!(field(&tally, "replies"), "50", "{tally}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `loss_sweep --request --reply-size N` (issue 24): every transport measures a request's
/// round trip; each row says `"request":true` and its reply size, accounts for every
/// payment, and counts the replies in its payload bytes.
#[test]
fn loss_sweep_request_rows() {
    let out = Command::new(example("loss_sweep"))
        .args([
            "--request",
            "--reply-size",
            "100",
            "--loss",
            "0,0.1",
            "--ge-loss",
        ])
        .args(["--messages", "200", "--size", "256", "--delay-ms", "10"])
        .args(["--seed", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(rows.len(), 2 * 3, "{stdout}");
    for row in &rows {
        assert_eq!(field(row, "request"), "true", "{row}");
        assert_eq!(field(row, "reply_size"), "100", "{row}");
        assert_eq!(field(row, "payload_bytes"), "71200", "{row}");
        let acked: u64 = field(row, "acked").parse().unwrap();
        let failed: u64 = field(row, "failed").parse().unwrap();
        assert_eq!(acked + failed, 200, "{row}");
        assert_eq!(field(row, "duplicates"), "0", "{row}");
        // A round trip: at least both legs' 10 ms.
        let p50: f64 = field(row, "p50_ms").parse().unwrap();
        assert!(p50 >= 20.0, "{row}");
    }
    for t in ["surelink", "quinn-stream", "quinn-stream-bbr"] {
        assert_eq!(
            rows.iter().filter(|r| field(r, "transport") == t).count(),
            2,
            "{t}"
        );
    }

    // Without --request: `"request":false` and no reply size.
    let out = Command::new(example("loss_sweep"))
        .args([
            "--loss",
            "0",
            "--ge-loss",
            "--messages",
            "20",
            "--seed",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    for row in stdout.lines().filter(|l| l.starts_with('{')) {
        assert_eq!(field(row, "request"), "false", "{row}");
        assert_eq!(field(row, "reply_size"), "null", "{row}");
    }
}

/// Issue 26's `payment_server --health ADDR`: `/healthz` is 200 while it serves; `/readyz`
/// is 200 while its claims store answers, and 503 (with the reason) once it cannot (here:
/// its table was dropped under it).
#[test]
fn health_and_readiness_flag() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(url) = rt.block_on(common::fresh_database("health")) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("surelink-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let flags: Vec<&std::ffi::OsStr> = vec![
        "--dedupe-url".as_ref(),
        url.as_ref(),
        "--health".as_ref(),
        "127.0.0.1:0".as_ref(),
    ];
    let (mut server, mut out, _addr) = start_server(&dir, &flags);
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let health = line
        .trim()
        .strip_prefix("health on ")
        .expect(&line)
        .to_string();
    let get = |path: &str| {
        let mut conn = std::net::TcpStream::connect(&health).unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    };
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
    let ready = get("/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(get("/nothing").starts_with("HTTP/1.1 404"));
    // The store stops answering: its table is gone.
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "DROP TABLE {} CASCADE",
                surelink::store::DEFAULT_TABLE
            ))
            .await
            .unwrap();
    });
    let unready = get("/readyz");
    assert!(unready.starts_with("HTTP/1.1 503"), "{unready}");
    assert!(unready.contains("claims store"), "{unready}");
    assert!(
        get("/healthz").starts_with("HTTP/1.1 200"),
        "alive, though not ready"
    );
    let _ = server.kill();
    let _ = server.wait();
}
