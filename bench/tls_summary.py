#!/usr/bin/env python3
"""Summarise bench/tls.sh results (ts,scenario,label,round,metric,value): median (min-max) over rounds."""
import csv, statistics, sys
from collections import defaultdict

COLS = ["rps", "p99_ms", "proxy_cpu_us_per_req", "proxy_cpu_us_per_hs", "proxy_pss_mb", "errors"]

def fmt(v):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"

data = defaultdict(lambda: defaultdict(list))
for row in csv.DictReader(open(sys.argv[1])):
    try:
        data[(row["scenario"], row["label"])][row["metric"]].append(float(row["value"]))
    except ValueError:
        pass
for scen in ("tls_keepalive", "tls_handshake"):
    labels = sorted(l for s, l in data if s == scen)
    if not labels:
        continue
    cols = [c for c in COLS if any(c in data[(scen, l)] for l in labels)]
    print(f"\n### {scen}\n\n| target | n | " + " | ".join(cols) + " |\n|---" * 1 + "|---" * (len(cols) + 1) + "|")
    for l in labels:
        m = data[(scen, l)]
        cells = []
        for c in cols:
            v = m.get(c, [])
            cells.append("-" if not v else fmt(statistics.median(v)) if len(v) == 1 else
                         f"{fmt(statistics.median(v))} ({fmt(min(v))}–{fmt(max(v))})")
        print(f"| {l} | {len(m.get('rps', []))} | " + " | ".join(cells) + " |")
