//! `sd3 tune`: the sweep over the portable GEMM's tiles and its on-disk cache.

mod common;

use common::*;
use sd3_wgpu::gpu::{Gpu, GpuOptions};
use sd3_wgpu::target::GemmTile;
use sd3_wgpu::tune;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd3-tune-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn a_sweep_times_every_tile_that_fits_and_picks_the_fastest() {
    let gpu = gpu();
    let t = tune::sweep(gpu, &[(20, 12, 24), (9, 40, 5)], 1).unwrap();
    let fitting: Vec<_> = GemmTile::CANDIDATES
        .iter()
        .filter(|c| c.fits(&gpu.limits))
        .collect();
    assert_eq!(t.len(), fitting.len());
    assert!(t.iter().all(|r| r.ms > 0.0 && r.gflops > 0.0), "{t:?}");
    let best = tune::best(&t).unwrap();
    let min = t.iter().map(|r| r.ms).fold(f64::INFINITY, f64::min);
    assert_eq!(t.iter().find(|r| r.tile == best).unwrap().ms, min);
}

#[test]
fn the_cache_keeps_one_tile_per_adapter_and_rejects_bad_files() {
    let dir = temp_dir("cache");
    let tile = GemmTile::CANDIDATES[3];
    assert_eq!(tune::load(&dir, "adapter A").unwrap(), None, "no file yet");
    let path = tune::store(&dir, "adapter A", tile).unwrap();
    tune::store(&dir, "adapter B", GemmTile::DEFAULT).unwrap();
    assert_eq!(tune::load(&dir, "adapter A").unwrap(), Some(tile));
    assert_eq!(
        tune::load(&dir, "adapter B").unwrap(),
        Some(GemmTile::DEFAULT)
    );
    assert_eq!(tune::load(&dir, "adapter C").unwrap(), None);
    // A tile that is not a candidate, malformed JSON, a folder in place of
    // the file: errors naming the file, never a panic.
    std::fs::write(&path, r#"{"gemm_tiles": {"adapter A": "7x7x7"}}"#).unwrap();
    let e = tune::load(&dir, "adapter A").unwrap_err().to_string();
    assert!(e.contains("7x7x7") && e.contains(tune::CACHE_FILE), "{e}");
    std::fs::write(&path, "{\"gemm_tiles\": [").unwrap();
    let e = tune::load(&dir, "adapter A").unwrap_err().to_string();
    assert!(e.contains("not JSON"), "{e}");
    // Storing over a malformed file replaces it.
    tune::store(&dir, "adapter A", tile).unwrap();
    assert_eq!(tune::load(&dir, "adapter A").unwrap(), Some(tile));
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(tune::load(&dir, "adapter A").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The only test here that sets SD3_CACHE_DIR (the environment is shared by
/// the process's threads).
#[test]
fn a_device_opened_with_tuned_tiles_uses_the_cached_tile() {
    let dir = temp_dir("apply");
    std::env::set_var("SD3_CACHE_DIR", &dir);
    let open = |tuned_tiles| {
        Gpu::new(&GpuOptions {
            tuned_tiles,
            ..GpuOptions::from_env()
        })
        .unwrap()
    };
    let g = open(true);
    assert_eq!(g.gemm_tile, GemmTile::DEFAULT, "nothing cached yet");
    assert_eq!(g.tuning, None);
    let tile = GemmTile::CANDIDATES[5];
    tune::store(&dir, &tune::cache_key(&g), tile).unwrap();
    let g = open(true);
    assert_eq!(g.gemm_tile, tile);
    assert_eq!(g.target().gemm_tile, tile);
    assert!(g.tuning.as_deref().unwrap_or("").contains("tuned"));
    assert_eq!(open(false).gemm_tile, GemmTile::DEFAULT, "library default");
    // Another driver or version is another key: not applied.
    tune::store(&dir, &tune::cache_key(&g), GemmTile::DEFAULT).unwrap();
    std::fs::write(
        dir.join(tune::CACHE_FILE),
        format!(
            "{{\"gemm_tiles\": {{\"{} 2\": \"32x32x16\"}}}}",
            tune::cache_key(&g)
        ),
    )
    .unwrap();
    assert_eq!(open(true).gemm_tile, GemmTile::DEFAULT);
    // A broken file is reported and ignored.
    std::fs::write(dir.join(tune::CACHE_FILE), "not json").unwrap();
    let g = open(true);
    assert_eq!(g.gemm_tile, GemmTile::DEFAULT);
    assert!(g.tuning.as_deref().unwrap_or("").contains("ignoring"));
    std::env::remove_var("SD3_CACHE_DIR");
    let _ = std::fs::remove_dir_all(&dir);
}
