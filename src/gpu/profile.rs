//! Per-op GPU timings: a table for people, Chrome trace JSON for Perfetto.

use std::collections::BTreeMap;
use std::fmt::Write;

/// Where a profile's times come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimingSource {
    /// Timestamps between the dispatches of one pass (the run as it really is).
    InsidePass,
    /// One pass per op with pass timestamps (adds pass overhead to each op).
    PassPerOp,
    /// No GPU timestamps: only the wall clock of the whole run.
    WallClock,
}

/// One op's measurement.
#[derive(Clone, Debug)]
pub struct OpTiming {
    /// Label, e.g. `mmdit.block3.x.attn.qkv.linear`.
    pub label: String,
    /// Kernel family (entry point), e.g. `linear`, `attention`.
    pub family: String,
    /// The implementation of the op that recorded it (`flash`, `composed`, …;
    /// empty for ops with a single implementation).
    pub implementation: String,
    /// Start relative to the first op, ns (GPU timestamps only).
    pub start_ns: Option<f64>,
    /// GPU time, ns (GPU timestamps only).
    pub gpu_ns: Option<f64>,
    /// Counted floating-point operations.
    pub flops: u64,
    /// Counted global-memory bytes.
    pub bytes: u64,
}

impl OpTiming {
    /// The kernel and, where an op has several, the implementation that ran:
    /// `attention (flash)`, `linear (composed)`, `layer_norm`.
    pub fn kernel(&self) -> String {
        if self.implementation.is_empty() {
            self.family.clone()
        } else {
            format!("{} ({})", self.family, self.implementation)
        }
    }
}

/// The timings of one run.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Ops in execution order.
    pub entries: Vec<OpTiming>,
    /// Wall-clock time of the run, submit to completion, ns.
    pub wall_ns: f64,
    /// How the times were taken.
    pub source: TimingSource,
    /// Block uploads of a streamed run (see [`crate::stream`]).
    pub uploads: Option<crate::stream::UploadStats>,
}

fn rate(amount: u64, ns: f64) -> f64 {
    if ns > 0.0 {
        amount as f64 / ns
    } else {
        0.0
    }
}

/// Sum of time, FLOPs and bytes per key.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Number of ops.
    pub count: usize,
    /// GPU time, ns.
    pub ns: f64,
    /// FLOPs.
    pub flops: u64,
    /// Bytes.
    pub bytes: u64,
}

impl Profile {
    /// Sum of per-op GPU times (the wall clock where there are none).
    pub fn gpu_ns(&self) -> f64 {
        if self.entries.iter().any(|e| e.gpu_ns.is_some()) {
            self.entries.iter().filter_map(|e| e.gpu_ns).sum()
        } else {
            self.wall_ns
        }
    }

    /// GPU time between the first op's start and the last op's end in which
    /// no op ran (uploads of streamed weights, gaps between submissions);
    /// `None` without GPU timestamps.
    pub fn idle_ns(&self) -> Option<f64> {
        let mut span: Option<(f64, f64)> = None;
        let mut busy = 0.0;
        for e in &self.entries {
            let (Some(a), Some(d)) = (e.start_ns, e.gpu_ns) else {
                return None;
            };
            busy += d;
            span = Some(match span {
                None => (a, a + d),
                Some((lo, hi)) => (lo.min(a), hi.max(a + d)),
            });
        }
        span.map(|(lo, hi)| (hi - lo - busy).max(0.0))
    }

    /// Totals per kernel family and implementation ([`OpTiming::kernel`]).
    pub fn by_family(&self) -> BTreeMap<String, Totals> {
        let mut m: BTreeMap<String, Totals> = BTreeMap::new();
        for e in &self.entries {
            let t = m.entry(e.kernel()).or_default();
            t.count += 1;
            t.ns += e.gpu_ns.unwrap_or(0.0);
            t.flops += e.flops;
            t.bytes += e.bytes;
        }
        m
    }

    /// A table: per kernel family, then the `top` slowest ops, each with time,
    /// share, GFLOP/s and GB/s.
    pub fn table(&self, top: usize) -> String {
        let total = self.gpu_ns();
        let mut s = String::new();
        let src = match self.source {
            TimingSource::InsidePass => "GPU timestamps inside one pass",
            TimingSource::PassPerOp => "GPU timestamps, one pass per op",
            TimingSource::WallClock => "wall clock only (adapter has no timestamps)",
        };
        let _ = writeln!(
            s,
            "{} ops, GPU {:.3} ms, wall {:.3} ms ({src})",
            self.entries.len(),
            total / 1e6,
            self.wall_ns / 1e6
        );
        if let Some(u) = &self.uploads {
            let idle = self
                .idle_ns()
                .map(|ns| {
                    format!(
                        "; between ops the GPU stood idle {:.3} ms (uploads, submissions)",
                        ns / 1e6
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "streamed weights: {} block uploads, {:.1} MiB, {:.3} ms on the host{idle}",
                u.blocks,
                u.bytes as f64 / (1u64 << 20) as f64,
                u.host_ns / 1e6
            );
        }
        let _ = writeln!(
            s,
            "{:<24} {:>5} {:>10} {:>6} {:>10} {:>9}",
            "family", "ops", "ms", "%", "GFLOP/s", "GB/s"
        );
        let mut fam: Vec<_> = self.by_family().into_iter().collect();
        fam.sort_by(|a, b| b.1.ns.total_cmp(&a.1.ns));
        for (name, t) in fam {
            let _ = writeln!(
                s,
                "{:<24} {:>5} {:>10.3} {:>6.1} {:>10.2} {:>9.2}",
                name,
                t.count,
                t.ns / 1e6,
                100.0 * t.ns / total.max(1.0),
                rate(t.flops, t.ns),
                rate(t.bytes, t.ns)
            );
        }
        if self.entries.iter().any(|e| e.gpu_ns.is_some()) && top > 0 {
            let mut ops: Vec<&OpTiming> = self.entries.iter().collect();
            ops.sort_by(|a, b| b.gpu_ns.unwrap_or(0.0).total_cmp(&a.gpu_ns.unwrap_or(0.0)));
            let _ = writeln!(s, "\ntop {} ops", top.min(ops.len()));
            let _ = writeln!(
                s,
                "{:<48} {:<24} {:>10} {:>6} {:>10} {:>9}",
                "label", "kernel", "ms", "%", "GFLOP/s", "GB/s"
            );
            for e in ops.into_iter().take(top) {
                let ns = e.gpu_ns.unwrap_or(0.0);
                let _ = writeln!(
                    s,
                    "{:<48} {:<24} {:>10.3} {:>6.1} {:>10.2} {:>9.2}",
                    e.label,
                    e.kernel(),
                    ns / 1e6,
                    100.0 * ns / total.max(1.0),
                    rate(e.flops, ns),
                    rate(e.bytes, ns)
                );
            }
        }
        s
    }

    /// Chrome trace JSON (opens in Perfetto or chrome://tracing): one complete
    /// event per op on one track, times in microseconds.
    pub fn chrome_trace(&self) -> String {
        let mut s = String::from("{\"traceEvents\":[");
        let mut t_us = 0.0;
        for (i, e) in self.entries.iter().enumerate() {
            let dur = e.gpu_ns.unwrap_or(0.0) / 1e3;
            let ts = e.start_ns.map(|v| v / 1e3).unwrap_or(t_us);
            t_us = ts + dur;
            if i > 0 {
                s.push(',');
            }
            let _ = write!(
                s,
                "{{\"name\":{},\"cat\":{},\"ph\":\"X\",\"pid\":1,\"tid\":1,\"ts\":{ts:.3},\"dur\":{dur:.3},\"args\":{{\"implementation\":{},\"flops\":{},\"bytes\":{}}}}}",
                json_str(&e.label),
                json_str(&e.family),
                json_str(&e.implementation),
                e.flops,
                e.bytes
            );
        }
        s.push_str("],\"displayTimeUnit\":\"ms\"}");
        s
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}
