//! Drives the payment examples as outside checks do: real UDP on loopback, the CLI and JSON
//! lines of issue 4. `cargo test` builds the examples next to the test binaries.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn example(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let mut p = std::env::current_exe().unwrap();
    p.pop();
    p.pop();
    p.push("examples");
    p.push(name);
    assert!(
        p.exists(),
        "{} not built: run the whole `cargo test` (it builds the examples) or `cargo build --examples`",
        p.display()
    );
    p
}

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

#[test]
fn server_and_client_over_real_udp() {
    let dir = std::env::temp_dir().join(format!("surelink-pay-{}", std::process::id()));
    let mut server = Command::new(example("payment_server"))
        .args(["--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(&dir)
        .args(["--idle-exit-secs", "30"])
        .stdout(Stdio::piped())
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

    for mode in ["surelink", "quinn-stream"] {
        let client = Command::new(example("payment_client"))
            .args(["--connect", &addr, "--ca"])
            .arg(dir.join("cert.der"))
            .args([
                "--count", "50", "--rate", "200", "--size", "300", "--mode", mode,
            ])
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
        ] {
            assert!(
                field(&json, key).parse::<f64>().unwrap() > 0.0,
                "{key} in {json}"
            );
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
    assert_eq!(field(&tally, "delivered"), "100", "{tally}");
    assert_eq!(field(&tally, "duplicates"), "0", "{tally}");
    assert_eq!(field(&tally, "invalid_frames"), "0", "{tally}");
    let _ = std::fs::remove_dir_all(dir);
}
