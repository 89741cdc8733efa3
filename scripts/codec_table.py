#!/usr/bin/env python3
"""Prints the codec table from criterion's saved results (run `cargo bench --bench codec` first).

Throughput is data bytes (k x S) per second, from each benchmark's mean time; the ratio
column is surelink's time over the raw codec's time in the same run."""
import json, os, sys

root = os.path.join(os.path.dirname(__file__), "..", "target", "criterion")

def mean_ns(group, fn, label):
    path = os.path.join(root, group, fn, label, "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["mean"]["point_estimate"]

print("| code (k+m × S) | encode raw | encode surelink | ratio | per block | rebuild raw | rebuild surelink | ratio | per block | memcpy |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k, m in [(4, 2), (8, 4), (16, 4), (32, 8)]:
    for s in [256, 1200]:
        label = f"{k}+{m}x{s}"
        b = k * s
        try:
            t = {(g, fn): mean_ns(g, fn, label) for g, fn in
                 [("encode", "raw"), ("encode", "surelink"), ("encode", "memcpy"),
                  ("rebuild", "raw"), ("rebuild", "surelink")]}
        except FileNotFoundError:
            continue
        gbs = lambda ns: f"{b / ns:.2f} GB/s"
        print(f"| {k}+{m} × {s} | {gbs(t['encode','raw'])} | {gbs(t['encode','surelink'])} | "
              f"{t['encode','surelink'] / t['encode','raw']:.2f}× | {t['encode','surelink'] / 1000:.2f} µs | "
              f"{gbs(t['rebuild','raw'])} | {gbs(t['rebuild','surelink'])} | "
              f"{t['rebuild','surelink'] / t['rebuild','raw']:.2f}× | {t['rebuild','surelink'] / 1000:.2f} µs | "
              f"{gbs(t['encode','memcpy'])} |")
