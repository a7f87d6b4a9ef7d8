//! Kernel benchmarks at SD3 shapes: `sd3 bench kernels`.
//!
//! Each case is one op in its own planned graph with seeded random inputs,
//! once per implementation of the op that the adapter supports (side by side,
//! with each one's speed relative to the preferred one); it is run once to
//! warm up, then `reps` times with per-op timing, and the median is reported
//! with the achieved GFLOP/s and GB/s.

use crate::error::Result;
use crate::gpu::profile::TimingSource;
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::ops::choice::Implementation;
use crate::ops::{attention, linear};
use crate::tensor::{DType, Tensor};

/// One benchmark result.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// What ran, e.g. `linear 4429x1536 · 6144x1536ᵀ f16`.
    pub name: String,
    /// The implementation (`flash`, `composed`; `tiled` for single ones),
    /// or why it was skipped.
    pub implementation: String,
    /// Whether it was skipped (the adapter or `--kernels` refuses it).
    pub skipped: bool,
    /// Median time, ms.
    pub ms: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
    /// Achieved GB/s (counted bytes).
    pub gbps: f64,
    /// Where the time came from.
    pub source: TimingSource,
    /// The case's key (see [`Case::key`]).
    pub key: String,
    /// Counted FLOPs of one run.
    pub flops: u64,
}

/// A case of the kernel benchmark.
#[derive(Clone, Copy, Debug)]
pub enum Case {
    /// x [m, k] · w [n, k]ᵀ + b.
    Linear {
        /// Tokens.
        m: usize,
        /// Input width.
        k: usize,
        /// Output width.
        n: usize,
    },
    /// Joint attention of `tokens` tokens, `heads` heads of 64, batch `batch`.
    Attention {
        /// Batch (2 with CFG).
        batch: usize,
        /// Heads.
        heads: usize,
        /// Tokens (queries = keys).
        tokens: usize,
    },
}

/// Which shapes `sd3 bench kernels` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseSet {
    /// Scaled-down shapes, for software adapters such as lavapipe.
    Small,
    /// SD3 medium and SD3.5 large at 1024² (one CFG half).
    Sd3,
    /// The shapes `tools/gpu-report` sets beside PyTorch's
    /// (`torch_baseline.py`): for hidden d ∈ {1536, 2432}, m ∈ {4429, 8858}
    /// tokens (one and both CFG halves) × (k, n) ∈ {(d, d), (d, 3d), (d, 4d),
    /// (4d, d)}, and the joint attention of both CFG halves.
    Report,
}

/// The cases of a set.
pub fn cases(set: CaseSet) -> Vec<Case> {
    match set {
        CaseSet::Sd3 => {
            let m = 4429;
            let mut v: Vec<Case> = [
                (1536, 1536),
                (1536, 6144),
                (6144, 1536),
                (2432, 2432),
                (2432, 9728),
                (9728, 2432),
            ]
            .iter()
            .map(|&(k, n)| Case::Linear { m, k, n })
            .collect();
            v.push(Case::Attention {
                batch: 1,
                heads: 24,
                tokens: 4429,
            });
            v
        }
        CaseSet::Report => {
            let mut v = Vec::new();
            for d in [1536, 2432] {
                for m in [4429, 2 * 4429] {
                    for (k, n) in [(d, d), (d, 3 * d), (d, 4 * d), (4 * d, d)] {
                        v.push(Case::Linear { m, k, n });
                    }
                }
                v.push(Case::Attention {
                    batch: 2,
                    heads: d / 64,
                    tokens: 4429,
                });
            }
            v
        }
        CaseSet::Small => vec![
            Case::Linear {
                m: 333,
                k: 192,
                n: 192,
            },
            Case::Linear {
                m: 333,
                k: 192,
                n: 768,
            },
            Case::Attention {
                batch: 1,
                heads: 3,
                tokens: 333,
            },
        ],
    }
}

impl Case {
    /// The key PyTorch's baseline prints for the same shape
    /// (`linear 4429x1536->6144`, `attention 2x24x4429x64`).
    pub fn key(&self) -> String {
        match *self {
            Case::Linear { m, k, n } => format!("linear {m}x{k}->{n}"),
            Case::Attention {
                batch,
                heads,
                tokens,
            } => format!("attention {batch}x{heads}x{tokens}x64"),
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1) (SplitMix64).
pub fn random_values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn input(
    gpu: &Gpu,
    g: &mut Graph,
    name: &str,
    shape: &[usize],
    dtype: DType,
    seed: u64,
) -> Result<Value> {
    let n = shape.iter().product();
    let t = Tensor::from_f32(gpu, shape, dtype, &random_values(seed, n))?;
    Ok(g.weight(name, &t))
}

/// One implementation's graph of a case: (case name, implementation, the
/// graph or why the implementation was skipped).
type Variant = (String, String, std::result::Result<Graph, String>);

/// `imp` recorded into `g` (its output kept), or why it cannot take `call`.
fn variant<A>(
    mut g: Graph,
    imp: &Implementation<A>,
    call: &A,
) -> Result<std::result::Result<Graph, String>> {
    Ok(match imp.refusal(g.target(), call) {
        Some(why) => Err(why),
        None => {
            let y = imp.record(&mut g, call)?;
            g.keep(y);
            Ok(g)
        }
    })
}

/// One graph per implementation of the case's op.
fn build(gpu: &Gpu, case: Case, wdtype: DType) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    match case {
        Case::Linear { m, k, n } => {
            let name = format!("linear {m}x{k} · {n}x{k}ᵀ ({} weights)", wdtype.name());
            for imp in linear::IMPLEMENTATIONS {
                let mut g = Graph::new(gpu.target());
                let a = g.act();
                let x = input(gpu, &mut g, "x", &[m, k], a, 1)?;
                let w = input(gpu, &mut g, "w", &[n, k], wdtype, 2)?;
                let b = input(gpu, &mut g, "b", &[n], DType::F32, 3)?;
                let call = linear::linear_call(&mut g, x, w, Some(b))?;
                out.push((name.clone(), imp.name.to_string(), variant(g, imp, &call)?));
            }
        }
        Case::Attention {
            batch,
            heads,
            tokens,
        } => {
            let name = format!("attention {batch}x{heads}x{tokens}x64");
            let w = heads * attention::HEAD_DIM;
            for imp in attention::IMPLEMENTATIONS {
                let mut g = Graph::new(gpu.target());
                let a = g.act();
                let qkv = input(gpu, &mut g, "qkv", &[batch, tokens, 3 * w], a, 4)?;
                let h = |col_offset| attention::Heads {
                    value: qkv,
                    col_offset,
                };
                let call = attention::AttentionCall {
                    q: h(0),
                    k: h(w),
                    v: h(2 * w),
                    o: attention::AttentionOptions::new(heads),
                };
                out.push((name.clone(), imp.name.to_string(), variant(g, imp, &call)?));
            }
        }
    }
    Ok(out)
}

/// Plans `g`, runs it once to warm up, then `reps` (at least 1) profiled
/// times: the median time in ns and where the times came from.
pub fn time_graph(gpu: &Gpu, g: Graph, reps: usize) -> Result<(f64, TimingSource)> {
    let plan = g.plan(gpu)?;
    plan.run(gpu)?;
    let mut times = Vec::with_capacity(reps.max(1));
    let mut source = TimingSource::WallClock;
    for _ in 0..reps.max(1) {
        let prof = plan.run_profiled(gpu)?;
        source = prof.source;
        times.push(prof.gpu_ns());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], source))
}

/// Runs one case for each implementation: a warm-up run, then `reps` timed
/// runs; the median is reported. Skipped implementations are listed with why.
pub fn run_case(gpu: &Gpu, case: Case, wdtype: DType, reps: usize) -> Result<Vec<BenchResult>> {
    let mut results = Vec::new();
    for (name, implementation, graph) in build(gpu, case, wdtype)? {
        let g = match graph {
            Ok(g) => g,
            Err(why) => {
                results.push(BenchResult {
                    name,
                    implementation: format!("{implementation}: skipped, {why}"),
                    skipped: true,
                    ms: 0.0,
                    gflops: 0.0,
                    gbps: 0.0,
                    source: TimingSource::WallClock,
                    key: case.key(),
                    flops: 0,
                });
                continue;
            }
        };
        let cost = g.cost();
        let (ns, source) = time_graph(gpu, g, reps)?;
        results.push(BenchResult {
            name,
            implementation,
            skipped: false,
            ms: ns / 1e6,
            gflops: cost.flops as f64 / ns,
            gbps: cost.bytes as f64 / ns,
            source,
            key: case.key(),
            flops: cost.flops,
        });
    }
    Ok(results)
}

/// The header of [`row`]'s table.
pub fn header() -> String {
    format!(
        "{:<44} {:<16} {:>10} {:>10} {:>9} {:>8}",
        "case", "implementation", "ms", "GFLOP/s", "GB/s", "× first"
    )
}

/// A result as a table row; `first` is the case's first (preferred)
/// implementation, for the speed ratio.
pub fn row(r: &BenchResult, first: Option<&BenchResult>) -> String {
    if r.skipped {
        return format!("{:<44} {}", r.name, r.implementation);
    }
    let ratio = first
        .filter(|f| !f.skipped && r.ms > 0.0)
        .map(|f| format!("{:.2}", f.ms / r.ms))
        .unwrap_or_default();
    format!(
        "{:<44} {:<16} {:>10.3} {:>10.1} {:>9.1} {:>8}",
        r.name, r.implementation, r.ms, r.gflops, r.gbps, ratio
    )
}

/// Prints one case's results (each implementation side by side).
pub fn print_case(results: &[BenchResult]) {
    let first = results.iter().find(|r| !r.skipped);
    for r in results {
        println!("{}", row(r, first));
    }
}

/// Results as JSON: one object per implementation of each case.
pub fn json(results: &[BenchResult]) -> String {
    use crate::gpu::profile::json_str;
    let rows: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{{\"key\":{},\"name\":{},\"implementation\":{},\"skipped\":{},\"ms\":{},\"gflops\":{},\"gbps\":{},\"flops\":{}}}",
                json_str(&r.key),
                json_str(&r.name),
                json_str(&r.implementation),
                r.skipped,
                r.ms,
                r.gflops,
                r.gbps,
                r.flops
            )
        })
        .collect();
    format!("[{}]\n", rows.join(",\n"))
}
