//! Kernel benchmarks at SD3 shapes: `sd3 bench kernels`.
//!
//! Each case is one op in its own planned graph with seeded random inputs;
//! it is run once to warm up, then `reps` times with per-op timing, and the
//! median is reported with the achieved GFLOP/s and GB/s.

use crate::error::Result;
use crate::gpu::profile::TimingSource;
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::ops::{attention, linear};
use crate::tensor::{DType, Tensor};

/// One benchmark result.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// What ran, e.g. `linear 4429x1536 · 6144x1536ᵀ f16`.
    pub name: String,
    /// Median time, ms.
    pub ms: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
    /// Achieved GB/s (counted bytes).
    pub gbps: f64,
    /// Where the time came from.
    pub source: TimingSource,
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

/// The SD3 shapes (`full`) or a scaled-down set for software adapters.
pub fn cases(full: bool) -> Vec<Case> {
    if full {
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
    } else {
        vec![
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
        ]
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

fn build(gpu: &Gpu, case: Case, wdtype: DType) -> Result<(String, Graph)> {
    let mut g = Graph::new();
    let name = match case {
        Case::Linear { m, k, n } => {
            let x = input(gpu, &mut g, "x", &[m, k], DType::F32, 1)?;
            let w = input(gpu, &mut g, "w", &[n, k], wdtype, 2)?;
            let b = input(gpu, &mut g, "b", &[n], DType::F32, 3)?;
            let y = linear::linear(&mut g, x, w, Some(b))?;
            g.keep(y);
            format!("linear {m}x{k} · {n}x{k}ᵀ ({} weights)", wdtype.name())
        }
        Case::Attention {
            batch,
            heads,
            tokens,
        } => {
            let w = heads * attention::HEAD_DIM;
            let qkv = input(gpu, &mut g, "qkv", &[batch, tokens, 3 * w], DType::F32, 4)?;
            let h = |col_offset| attention::Heads {
                value: qkv,
                col_offset,
            };
            let o = attention::AttentionOptions::new(heads);
            let y = attention::attention(&mut g, h(0), h(w), h(2 * w), &o)?;
            g.keep(y);
            format!("attention {batch}x{heads}x{tokens}x64")
        }
    };
    Ok((name, g))
}

/// Runs one case: a warm-up run, then `reps` timed runs; the median is reported.
pub fn run_case(gpu: &Gpu, case: Case, wdtype: DType, reps: usize) -> Result<BenchResult> {
    let (name, g) = build(gpu, case, wdtype)?;
    let cost = g.cost();
    let plan = g.plan(gpu)?;
    plan.run(gpu)?;
    let mut times = Vec::with_capacity(reps);
    let mut source = TimingSource::WallClock;
    for _ in 0..reps.max(1) {
        let prof = plan.run_profiled(gpu)?;
        source = prof.source;
        times.push(prof.gpu_ns());
    }
    times.sort_by(f64::total_cmp);
    let ns = times[times.len() / 2];
    Ok(BenchResult {
        name,
        ms: ns / 1e6,
        gflops: cost.flops as f64 / ns,
        gbps: cost.bytes as f64 / ns,
        source,
    })
}
