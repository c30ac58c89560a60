//! What `bench cluster` writes: a Markdown table with the target ratios, SVG plots (one line per
//! mode against the number of services) and the JSON object.

use std::{fmt::Write, path::Path};

use anyhow::{Context, Result};

use crate::cluster::Row;

const MODES: [(&str, &str); 4] = [
    ("ebpf", "#1b9e77"),
    ("ebpf-tc", "#e7298a"),
    ("iptables", "#d95f02"),
    ("nftables", "#7570b3"),
];

fn rows_of<'a>(rows: &'a [Row], mode: &str) -> Vec<&'a Row> {
    let mut r: Vec<&Row> = rows.iter().filter(|r| r.mode == mode).collect();
    r.sort_by_key(|r| r.services);
    r
}

fn find<'a>(rows: &'a [Row], mode: &str, services: u32) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.mode == mode && r.services == services)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// The Markdown report: the table, then how each target landed.
pub fn markdown(rows: &[Row], machine: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {machine}\n");
    let _ = writeln!(
        out,
        "| mode | services | conn/s | p50 µs | p99 µs | direct conn/s | req/s | req p99 µs | Gbit/s | direct Gbit/s | UDP pkt/s | CPU µs/conn (direct) at conn/s | program ms | cold start ms | 1-endpoint change ms | kernel MiB | eBPF map MiB | rules/objects | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by_key(|r| (r.services, r.mode));
    for r in sorted {
        let program = if r.program_over_budget {
            format!("> {:.0}", r.program_ms)
        } else {
            format!("{:.1}", r.program_ms)
        };
        let change = r
            .endpoint_change_ms
            .map_or("–".into(), |v| format!("{v:.1}"));
        let maps = r.map_bytes.map_or("–".into(), mib);
        let over = if r.program_over_budget { "> " } else { "" };
        let cold = format!("{over}{:.1}", r.cold_start_ms);
        let cpu = format!(
            "{:.0} ({:.0}) at {:.0}",
            r.cpu_us_per_conn, r.direct_cpu_us_per_conn, r.cpu_rate
        );
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {cpu} | {program} | {cold} | {change} | {} | {maps} | {} | {} |",
            r.mode,
            r.services,
            r.cps,
            r.cps_p50_us,
            r.cps_p99_us,
            r.direct_cps,
            r.rr_per_s,
            r.rr_p99_us,
            r.gbps,
            r.direct_gbps,
            r.udp_pps,
            mib(r.kernel_bytes),
            r.kernel_objects,
            r.errors
        );
    }
    out.push_str("\nTargets (ratios measured in this run):\n\n");
    for line in targets(rows) {
        let _ = writeln!(out, "- {line}");
    }
    out
}

/// How each target of the benchmark landed.
pub fn targets(rows: &[Row]) -> Vec<String> {
    let mut lines = Vec::new();
    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    let big = rows
        .iter()
        .map(|r| r.services)
        .filter(|&n| n <= 10_000)
        .max()
        .unwrap_or(0);
    if let (Some(e), Some(i), Some(n)) = (
        find(rows, "ebpf", big),
        find(rows, "iptables", big),
        find(rows, "nftables", big),
    ) {
        let (vs_i, vs_n) = (e.cps / i.cps, e.cps / n.cps);
        lines.push(format!(
            "{big} services: eBPF {:.0} conn/s = {vs_i:.2} x iptables (target >= 3: {}), {vs_n:.2} x nftables (target >= 1.3: {})",
            e.cps,
            mark(vs_i >= 3.0),
            mark(vs_n >= 1.3)
        ));
        lines.push(format!(
            "{big} services: p99 eBPF {:.0} µs, iptables {:.0} µs, nftables {:.0} µs (target: eBPF lowest: {})",
            e.cps_p99_us,
            i.cps_p99_us,
            n.cps_p99_us,
            mark(e.cps_p99_us < i.cps_p99_us && e.cps_p99_us < n.cps_p99_us)
        ));
        lines.push(format!(
            "{big} services: programming eBPF {:.1} ms vs iptables {}{:.0} ms = {:.0}x faster (target >= 20x: {})",
            e.program_ms,
            if i.program_over_budget { "> " } else { "" },
            i.program_ms,
            i.program_ms / e.program_ms,
            mark(i.program_ms / e.program_ms >= 20.0)
        ));
        if let Some(change) = e.endpoint_change_ms {
            lines.push(format!("{big} services: one endpoint change in eBPF mode {change:.2} ms (target < 10 ms: {})", mark(change < 10.0)));
        }
    }
    if let (Some(e), Some(i)) = (find(rows, "ebpf", 1), find(rows, "iptables", 1)) {
        lines.push(format!(
            "1 service: eBPF {:.0} conn/s vs iptables {:.0} = {:.2}x (target: no slower: {})",
            e.cps,
            i.cps,
            e.cps / i.cps,
            mark(e.cps >= i.cps * 0.97)
        ));
    }
    for e in rows_of(rows, "ebpf") {
        let ratio = e.cpu_us_per_conn / e.direct_cpu_us_per_conn;
        lines.push(format!(
            "{} services: eBPF (socket LB) {:.0} CPU µs per connection = {ratio:.2} x direct {:.0} (target <= 1.05: {})",
            e.services,
            e.cpu_us_per_conn,
            e.direct_cpu_us_per_conn,
            mark(ratio <= 1.05)
        ));
        let ratio = e.gbps / e.direct_gbps;
        lines.push(format!(
            "{} services: eBPF stream {:.2} Gbit/s = {:.0}% of the direct pod-IP stream (target >= 95%: {})",
            e.services,
            e.gbps,
            ratio * 100.0,
            mark(ratio >= 0.95)
        ));
    }
    if let (Some(t), Some(i), Some(n)) = (
        find(rows, "ebpf-tc", big),
        find(rows, "iptables", big),
        find(rows, "nftables", big),
    ) {
        let (vs_n, vs_i) = (
            t.cpu_us_per_conn / n.cpu_us_per_conn,
            t.cpu_us_per_conn / i.cpu_us_per_conn,
        );
        lines.push(format!(
            "{big} services: eBPF tc {:.0} CPU µs per connection = {vs_n:.2} x nftables (target <= 0.8: {}), {vs_i:.2} x iptables (target <= 0.5: {})",
            t.cpu_us_per_conn,
            mark(vs_n <= 0.8),
            mark(vs_i <= 0.5)
        ));
    }
    let most = rows.iter().map(|r| r.services).max().unwrap_or(0);
    for mode in ["ebpf", "ebpf-tc"] {
        if let (Some(one), Some(many)) = (find(rows, mode, 1), find(rows, mode, most))
            && most > 1
        {
            let growth = many.cpu_us_per_conn / one.cpu_us_per_conn;
            lines.push(format!(
                "{mode}: CPU per connection at {most} services = {growth:.2} x at 1 (target <= 1.1: {})",
                mark(growth <= 1.1)
            ));
        }
    }
    lines
}

/// A line chart: x = services (log scale), one line per mode.
pub fn svg(
    rows: &[Row],
    title: &str,
    y_label: &str,
    log_y: bool,
    value: impl Fn(&Row) -> f64,
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 80.0, 130.0, 40.0, 50.0);
    let xs: Vec<f64> = {
        let mut v: Vec<u32> = rows.iter().map(|r| r.services).collect();
        v.sort_unstable();
        v.dedup();
        v.into_iter().map(f64::from).collect()
    };
    let values: Vec<f64> = rows
        .iter()
        .map(&value)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let (x_lo, x_hi) = (
        xs.first().copied().unwrap_or(1.0).max(1.0).log10(),
        xs.last().copied().unwrap_or(10.0).max(10.0).log10(),
    );
    let y_max = values.iter().copied().fold(0.0, f64::max) * 1.1;
    let y_min = if log_y {
        values
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(1e-3)
            / 1.5
    } else {
        0.0
    };
    let y_max = if y_max <= y_min { y_min + 1.0 } else { y_max };
    let tx =
        |x: f64| left + (x.max(1.0).log10() - x_lo) / (x_hi - x_lo).max(1e-9) * (w - left - right);
    let ty = |y: f64| {
        let f = if log_y {
            (y.max(y_min).log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            y / y_max
        };
        h - bottom - f * (h - top - bottom)
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">services (log scale)</text>\n\
         <text x=\"18\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {})\">{y_label}</text>\n",
        w / 2.0,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0
    );
    for &x in &xs {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            tx(x),
            h - bottom + 16.0,
            x as u64
        );
    }
    for i in 0..=4 {
        let y = if log_y {
            y_min * (y_max / y_min).powf(f64::from(i) / 4.0)
        } else {
            y_max * f64::from(i) / 4.0
        };
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>",
            ty(y),
            w - right,
            left - 6.0,
            ty(y) + 4.0,
            human(y)
        );
    }
    for (k, (mode, color)) in MODES.iter().enumerate() {
        let points: Vec<String> = rows_of(rows, mode)
            .iter()
            .map(|r| (f64::from(r.services), value(r)))
            .filter(|(_, v)| v.is_finite() && *v > 0.0)
            .map(|(x, v)| format!("{:.1},{:.1}", tx(x), ty(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\" points=\"{}\"/>",
            points.join(" ")
        );
        for p in &points {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                "<circle cx=\"{x}\" cy=\"{y}\" r=\"3.5\" fill=\"{color}\"/>"
            );
        }
        let ly = top + 20.0 + 20.0 * k as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2.5\"/><text x=\"{2}\" y=\"{3}\">{mode}</text>",
            w - right + 10.0,
            w - right + 34.0,
            w - right + 40.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn program_title(rows: &[Row]) -> String {
    if rows.iter().any(|r| r.program_over_budget) {
        "Programming from scratch (points at the time budget are lower bounds)".into()
    } else {
        "Programming the services from scratch".into()
    }
}

/// Writes cluster.md, cluster.json and the plots under `dir`; returns the JSON object.
pub fn write(dir: &Path, rows: &[Row], machine: &str) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = serde_json::json!({ "results": rows }).to_string();
    let files = [
        ("cluster.md", markdown(rows, machine)),
        ("cluster.json", format!("{json}\n")),
        (
            "cps.svg",
            svg(
                rows,
                "Short TCP connections per second through a ClusterIP",
                "connections/s",
                false,
                |r| r.cps,
            ),
        ),
        (
            "cps_p99.svg",
            svg(rows, "p99 connection latency", "µs", true, |r| {
                r.cps_p99_us
            }),
        ),
        (
            "cpu_per_conn.svg",
            svg(
                rows,
                "CPU time per connection at a rate every mode carries",
                "µs per connection",
                false,
                |r| r.cpu_us_per_conn,
            ),
        ),
        (
            "program.svg",
            svg(rows, &program_title(rows), "ms (log)", true, |r| {
                r.program_ms
            }),
        ),
    ];
    for (name, content) in files {
        let path = dir.join(name);
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(json)
}

/// CPU model, cores, kernel: what the figures were measured on.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} x {model}, kernel {}", kernel.trim())
}

/// Where the benchmarks write their reports: `$CARGO_TARGET_DIR/bench` (`target/bench`).
pub fn dir() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("bench")
}

/// A one-line progress display on stderr, each step stamped with the seconds since `started`.
/// The flags every benchmark binary takes.
#[derive(clap::Parser, Debug)]
pub struct Flags {
    /// Fewer services and rounds (a few minutes)
    #[arg(long)]
    pub quick: bool,
    /// End stdout with one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn progress(started: std::time::Instant) -> impl FnMut(&str) {
    move |step: &str| {
        use std::io::Write;
        eprint!("\r\x1b[2K[{:>4}s] {step}", started.elapsed().as_secs());
        let _ = std::io::stderr().flush();
    }
}
