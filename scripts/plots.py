#!/usr/bin/env python3
"""scripts/plots.py — the benchmark's figures, drawn by gnuplot (Debian's
gnuplot-nox, pngcairo terminal); this only shapes the data.

  plots.py outage RESULTS.jsonl OUTDIR   one timeline per outage kind,
      outage-<kind>.png: the app's goodput and each uplink's received
      throughput against time, the cut and the heal marked, mpvpn above and
      kernel MPTCP alone below (run 1 of each; bench_outage.sh's JSON lines)
  plots.py rows PLOT.tsv OUTDIR          bench-rows.png: the aggregation rows
      (Mbit/s) and the unshaped rows against the peers (% of direct kernel
      TCP), up and down (bench.sh's plot.tsv: chart, label, dir, value)
  plots.py check FILE...                 each file is a whole PNG (signature,
      every chunk's CRC, the image data inflating to its size) that is not
      blank; exit 1 otherwise

Nothing here measures: the figures show what the tables show.
"""
import json
import os
import struct
import subprocess
import sys
import zlib

KINDS = [("link-down", "link down, then up"),
         ("blackhole", "ISP drops everything, carrier up"),
         ("addr-same", "address removed, the same one back"),
         ("addr-new", "address removed, a new one")]
MODES = [("mpvpn", "mpvpn"), ("kernel", "kernel MPTCP alone")]


def gnuplot(script, name):
    """runs script, keeping it beside the figure as name (for a rerun by hand)"""
    with open(name, "w") as f:
        f.write(script)
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        sys.exit("gnuplot failed: " + r.stderr.strip()[:500])


def rates(xs, step, win=2):
    """Mbit/s over the last win steps at each sample (cumulative bytes in)."""
    out = []
    for i in range(len(xs)):
        j = max(0, i - win)
        dt = (i - j) * step
        out.append(8 * (xs[i] - xs[j]) / dt / 1e6 if dt > 0 else 0.0)
    return out


def outage(results, outdir):
    runs = {}
    with open(results) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("series") and not r.get("error"):
                runs.setdefault((r["outage"], r["mode"]), r)  # the first run
    made = []
    for kind, name in KINDS:
        have = [(m, label, runs[(kind, m)]) for m, label in MODES if (kind, m) in runs]
        if not have:
            continue
        png = os.path.join(outdir, "outage-%s.png" % kind)
        parts = ['set terminal pngcairo size 1000,%d font "sans,10"' % (300 * len(have) + 40),
                 'set output "%s"' % png,
                 'set multiplot layout %d,1 title "uplink A: %s, during a download over A and B (20 Mbit/s each)"' % (len(have), name),
                 'set ylabel "Mbit/s"', 'set grid ytics', 'set key outside right top',
                 'set yrange [0:50]']
        lo = -2.0
        hi = max(r["series"]["heal_s"] - r["series"]["cut_s"] + 4 for _, _, r in have)
        for i, (m, label, r) in enumerate(have):
            s = r["series"]
            step, cut, heal = s["step_s"], s["cut_s"], s["heal_s"]
            dat = os.path.join(outdir, "outage-%s-%s.dat" % (kind, m))
            # The app reads in bursts (whole receive buffers): its rate
            # over 250 ms; the uplinks' over 100 ms.
            app, a, b = rates(s["app"], step, 5), rates(s["a"], step), rates(s["b"], step)
            with open(dat, "w") as f:
                f.write("# t_from_cut_s app_mbps a_rx_mbps b_rx_mbps\n")
                for k in range(len(app)):
                    f.write("%.3f %.2f %.2f %.2f\n" % (k * step - cut, app[k], a[k], b[k]))
            stall = r.get("stall_ms", 0) / 1000
            rec = r.get("recovery_ms", -1)
            recs = "never" if rec < 0 else "%.2f s" % (rec / 1000)
            parts += ['unset arrow', 'unset label',
                      'set title "%s: longest stall %.2f s, A back to a fair share %s after the heal"' % (label, stall, recs),
                      'set xrange [%.1f:%.1f]' % (lo, hi),
                      'set xlabel "%s"' % ("seconds from the cut" if i == len(have) - 1 else ""),
                      'set arrow from 0, graph 0 to 0, graph 1 nohead dt 2 lw 2 lc rgb "#cf222e"',
                      'set label "cut" at 0, graph 0.95 offset 0.5,0 tc rgb "#cf222e"',
                      'set arrow from %.3f, graph 0 to %.3f, graph 1 nohead dt 2 lw 2 lc rgb "#1a7f37"' % (heal - cut, heal - cut),
                      'set label "heal" at %.3f, graph 0.95 offset 0.5,0 tc rgb "#1a7f37"' % (heal - cut),
                      'plot "%s" using 1:2 with lines lw 2.5 lc rgb "#222222" title "app goodput (250 ms)", '
                      '"" using 1:3 with lines lw 1.5 lc rgb "#0969da" title "uplink A rx (100 ms)", '
                      '"" using 1:4 with lines lw 1.5 lc rgb "#bf3989" title "uplink B rx (100 ms)"' % dat]
        parts.append("unset multiplot")
        gnuplot("\n".join(parts) + "\n", png[:-4] + ".gp")
        made.append(png)
    return made


def rows(tsv, outdir):
    charts = {}
    with open(tsv) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) != 4:
                continue
            chart, label, d, v = p
            c = charts.setdefault(chart, {})
            c.setdefault(label, {})[d] = v
    panels = [("agg", "one flow over A (40 Mbit/s, 20 ms) + B (20 Mbit/s, 50 ms)", "Mbit/s"),
              ("unshaped", "one flow, unshaped veths: share of direct kernel TCP", "% of direct")]
    have = [p for p in panels if p[0] in charts]
    if not have:
        return []
    png = os.path.join(outdir, "bench-rows.png")
    parts = ['set terminal pngcairo size 1200,460 font "sans,10"', 'set output "%s"' % png,
             'set multiplot layout 1,%d' % len(have),
             'set style data histograms', 'set style histogram clustered gap 1',
             'set style fill solid 0.85 border -1', 'set boxwidth 0.9', 'set grid ytics',
             'set datafile missing "NaN"', 'set xtics rotate by -25 left', 'set key top right',
             'set bmargin 7']
    for chart, title, unit in have:
        dat = os.path.join(outdir, "bench-rows-%s.dat" % chart)
        peak = 0.0
        with open(dat, "w") as f:
            f.write("# label up down\n")
            for label, v in charts[chart].items():
                vals = []
                for d in ("up", "down"):
                    try:
                        x = float(v.get(d, "NaN"))
                        peak = max(peak, x)
                        vals.append("%.2f" % x)
                    except ValueError:
                        vals.append("NaN")
                f.write('"%s" %s %s\n' % (label.replace('"', "'"), vals[0], vals[1]))
        parts += ['set title "%s"' % title, 'set ylabel "%s"' % unit, 'set yrange [0:%.1f]' % (peak * 1.15 + 1),
                  'plot "%s" using 2:xtic(1) title "up" lc rgb "#0969da", "" using 3 title "down" lc rgb "#bf3989", '
                  '"" using ($0-0.15):2:(sprintf("%%.0f",$2)) with labels offset 0,0.7 notitle, '
                  '"" using ($0+0.15):3:(sprintf("%%.0f",$3)) with labels offset 0,0.7 notitle' % dat]
    parts.append("unset multiplot")
    gnuplot("\n".join(parts) + "\n", png[:-4] + ".gp")
    return [png]


def check(path):
    """None if path is a whole, non-blank PNG, else what is wrong."""
    try:
        data = open(path, "rb").read()
    except OSError as e:
        return str(e)
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "not a PNG (no signature)"
    pos, idat, ihdr, end = 8, b"", None, False
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        crc = data[pos + 8 + n:pos + 12 + n]
        if len(body) != n or len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            return "chunk %r at %d: truncated or bad CRC" % (kind, pos)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            end = True
            break
        pos += 12 + n
    if not ihdr or not end:
        return "no IHDR or no IEND"
    w, h, depth, ctype = ihdr[:4]
    if w < 100 or h < 100 or depth != 8 or ctype not in (2, 6):
        return "unexpected header %r" % (ihdr,)
    raw = zlib.decompress(idat)
    bpp = 3 if ctype == 2 else 4
    if len(raw) != h * (1 + w * bpp):
        return "image data inflates to %d bytes, want %d" % (len(raw), h * (1 + w * bpp))
    # Not blank: rows that differ from each other (axes, lines, text).
    stride = 1 + w * bpp
    distinct = len({raw[i * stride + 1:(i + 1) * stride] for i in range(h)})
    if distinct < 20:
        return "blank: only %d distinct rows of pixels" % distinct
    return None


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    cmd = sys.argv[1]
    if cmd == "check":
        bad = 0
        for p in sys.argv[2:]:
            why = check(p)
            print("%s: %s" % (p, why or "a whole PNG"))
            bad += why is not None
        sys.exit(1 if bad else 0)
    src, outdir = sys.argv[2], sys.argv[3]
    os.makedirs(outdir, exist_ok=True)
    made = outage(src, outdir) if cmd == "outage" else rows(src, outdir) if cmd == "rows" else sys.exit(__doc__)
    for p in made:
        print(p)


if __name__ == "__main__":
    main()
