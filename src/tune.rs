//! Per-adapter tuning of the portable GEMM's tile (`sd3 tune`).
//!
//! The register-tiled GEMM (`linear.wgsl`) takes its tile as override
//! constants, so every [`GemmTile::CANDIDATES`] entry is a pipeline of the same
//! tested kernel. [`sweep`] times each one the adapter's limits allow on the
//! GEMM shapes of SD3 (scaled down on CPU adapters) and picks the fastest;
//! [`store`] keeps the choice in a small JSON file keyed by adapter, driver,
//! backend, activation type and engine version, so a new driver or a new
//! release tunes again. [`apply_cached`] reads it back; the CLI does that when
//! it opens the GPU. The library never reads the cache on its own.
//!
//! The file lives in `$SD3_CACHE_DIR`, else `$XDG_CACHE_HOME/sd3-wgpu`, else
//! `~/.cache/sd3-wgpu` (`%LOCALAPPDATA%\sd3-wgpu` on Windows). A missing,
//! unreadable or malformed file means "not tuned": the default tile.

use std::path::{Path, PathBuf};

use crate::bench::{random_values, time_graph};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::Graph;
use crate::ops::linear;
use crate::target::{GemmTile, KernelChoice};
use crate::tensor::{DType, Tensor};

/// The cache file's name inside the cache folder.
pub const CACHE_FILE: &str = "gemm-tiles.json";
/// Most bytes the cache file may have (it holds one line per adapter).
const CACHE_MAX_BYTES: u64 = 1 << 20;

/// One candidate's time over the sweep's shapes.
#[derive(Clone, Debug)]
pub struct TileTiming {
    /// The tile.
    pub tile: GemmTile,
    /// Total median time over the shapes, ms.
    pub ms: f64,
    /// Throughput over the shapes, GFLOP/s.
    pub gflops: f64,
}

/// The GEMM shapes (m, k, n) a sweep times: SD3's projections at 1024²
/// (4429 tokens with the context; MLP up and down), or a scaled-down set for
/// CPU adapters.
pub fn shapes(small: bool) -> Vec<(usize, usize, usize)> {
    if small {
        vec![(150, 96, 96), (150, 96, 384), (150, 384, 96)]
    } else {
        vec![(4429, 1536, 1536), (4429, 1536, 6144), (4429, 6144, 1536)]
    }
}

/// Times every candidate tile the adapter's limits allow on `shapes`, with
/// the adapter's activation type and f16 weights; `reps` timed runs each
/// (median). Results in candidate order.
pub fn sweep(gpu: &Gpu, shapes: &[(usize, usize, usize)], reps: usize) -> Result<Vec<TileTiming>> {
    let mut out = Vec::new();
    for &tile in GemmTile::CANDIDATES {
        if !tile.fits(&gpu.limits) {
            continue;
        }
        let mut target = gpu.target();
        target.gemm_tile = tile;
        // Only the portable GEMM: tensor-core kernels have their own tiles.
        target.kernels = KernelChoice::Portable;
        let (mut ns, mut flops) = (0.0, 0u64);
        for (i, &(m, k, n)) in shapes.iter().enumerate() {
            let mut g = Graph::new(target.clone());
            let a = g.act();
            let seed = 10 * i as u64;
            let x = Tensor::from_f32(gpu, &[m, k], a, &random_values(seed, m * k))?;
            let w = Tensor::from_f32(gpu, &[n, k], DType::F16, &random_values(seed + 1, n * k))?;
            let x = g.weight("x", &x);
            let w = g.weight("w", &w);
            let y = linear::linear(&mut g, x, w, None)?;
            g.keep(y);
            flops += g.cost().flops;
            ns += time_graph(gpu, g, reps)?.0;
        }
        out.push(TileTiming {
            tile,
            ms: ns / 1e6,
            gflops: flops as f64 / ns.max(1.0),
        });
    }
    Ok(out)
}

/// The fastest of a sweep's results.
pub fn best(timings: &[TileTiming]) -> Option<GemmTile> {
    timings
        .iter()
        .filter(|t| t.ms.is_finite() && t.ms > 0.0)
        .min_by(|a, b| a.ms.total_cmp(&b.ms))
        .map(|t| t.tile)
}

/// What a tuning result is valid for: adapter, driver, backend, activation
/// type and engine version.
pub fn cache_key(gpu: &Gpu) -> String {
    let i = &gpu.info;
    format!(
        "{} [{:04x}:{:04x}] {:?} | {} {} | {} activations | sd3-wgpu {}",
        i.name,
        i.vendor,
        i.device,
        i.backend,
        i.driver,
        i.driver_info,
        gpu.activation.name(),
        env!("CARGO_PKG_VERSION")
    )
}

/// The cache folder: `$SD3_CACHE_DIR`, else `$XDG_CACHE_HOME/sd3-wgpu`, else
/// the platform's user cache folder; `None` when none is known.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("SD3_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("sd3-wgpu"));
    }
    if cfg!(windows) {
        return var("LOCALAPPDATA").map(|d| PathBuf::from(d).join("sd3-wgpu"));
    }
    var("HOME").map(|d| PathBuf::from(d).join(".cache").join("sd3-wgpu"))
}

/// Every entry of the cache file in `dir` (empty when there is none).
fn entries(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let path = dir.join(CACHE_FILE);
    if !path.exists() {
        return Ok(serde_json::Map::new());
    }
    let bytes = crate::files::read_bounded(&path, CACHE_MAX_BYTES)?;
    let bad = |why: &str| Error::Io(format!("{}: {why}", path.display()));
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(&format!("not JSON ({e})")))?;
    match v.get("gemm_tiles") {
        Some(serde_json::Value::Object(m)) => Ok(m.clone()),
        _ => Err(bad("expected an object with a \"gemm_tiles\" object")),
    }
}

/// The tile stored for `key` in `dir`, if any. Errors for an unreadable or
/// malformed file, or a stored tile that is not one of the candidates.
pub fn load(dir: &Path, key: &str) -> Result<Option<GemmTile>> {
    let Some(v) = entries(dir)?.get(key).cloned() else {
        return Ok(None);
    };
    let name = v.as_str().unwrap_or_default();
    GemmTile::parse(name).map(Some).ok_or_else(|| {
        Error::Io(format!(
            "{}: tile {v} for this adapter is not one of {}",
            dir.join(CACHE_FILE).display(),
            GemmTile::CANDIDATES
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// Stores `tile` for `key` in `dir` (created if needed), keeping the other
/// adapters' entries; the file is replaced whole or not at all. Returns its
/// path.
pub fn store(dir: &Path, key: &str, tile: GemmTile) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("{}: cannot create ({e})", dir.display())))?;
    // A malformed file is replaced rather than kept.
    let mut m = entries(dir).unwrap_or_default();
    m.insert(key.to_string(), serde_json::Value::String(tile.name()));
    let doc = serde_json::json!({ "gemm_tiles": m });
    let text = serde_json::to_string_pretty(&doc)
        .map_err(|e| Error::Io(format!("cannot encode the tuning cache: {e}")))?;
    let path = dir.join(CACHE_FILE);
    crate::files::write_bytes(&path, format!("{text}\n").as_bytes())?;
    Ok(path)
}

/// Sets `gpu.gemm_tile` from the cache, if one is stored for this adapter
/// and its limits allow it. Returns what happened, for a log line: the tile,
/// or why the default stays (`None` when simply not tuned).
pub fn apply_cached(gpu: &mut Gpu) -> Option<String> {
    let dir = cache_dir()?;
    match load(&dir, &cache_key(gpu)) {
        Ok(Some(tile)) if tile.fits(&gpu.limits) => {
            gpu.gemm_tile = tile;
            Some(format!(
                "GEMM tile {} (tuned, {})",
                tile.name(),
                dir.display()
            ))
        }
        Ok(Some(tile)) => Some(format!(
            "tuned GEMM tile {} exceeds this device's limits; using {}",
            tile.name(),
            GemmTile::DEFAULT.name()
        )),
        Ok(None) => None,
        Err(e) => Some(format!(
            "ignoring the tuning cache: {e}; using GEMM tile {}",
            GemmTile::DEFAULT.name()
        )),
    }
}
