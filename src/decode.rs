//! `sd3 decode`: latents saved by `generate --save-latents` (or diffusers with
//! `output_type="latent"`) → PNG, with tiled decoding when the full frame does
//! not fit the adapter or the memory budget.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::image_io::{output_dir, save_png, to_rgb8, write_atomically};
use crate::models::vae::{decode_tiled, fits, Vae, VaeRun};
use crate::tensor::DType;
use crate::weights::vae::VaeSource;
use crate::weights::Checkpoint;

/// What `sd3 decode` was asked to do.
#[derive(Clone, Debug)]
pub struct DecodeOptions {
    /// Checkpoint holding the VAE (single file or diffusers folder).
    pub model: PathBuf,
    /// Safetensors file with one f32 tensor `latents` [b, 16, h, w].
    pub latents: PathBuf,
    /// Output PNG; with a batch, `name-0.png`, `name-1.png`, …
    pub out: PathBuf,
    /// Tile size in latent pixels (decode in tiles); automatic when `None`.
    pub tile: Option<usize>,
    /// Tile overlap in latent pixels.
    pub overlap: usize,
    /// Most bytes of intermediates a full-frame decode may take before tiling.
    pub budget: Option<u64>,
    /// Storage of conv/linear weights.
    pub matrix: DType,
}

/// Reads the `latents` tensor of a safetensors file: ([b, c, h, w], values).
pub fn read_latents(path: &Path, channels: usize) -> Result<([usize; 4], Vec<f32>)> {
    let ck = Checkpoint::open(&[path.to_path_buf()])?;
    let (shape, data) = ck.read_f32("latents")?;
    match shape.as_slice() {
        &[b, c, h, w] if c == channels && b > 0 && h > 0 && w > 0 => Ok(([b, c, h, w], data)),
        _ => Err(Error::Io(format!(
            "{}: tensor 'latents' must be [batch, {channels}, height/8, width/8], found {shape:?}",
            path.display()
        ))),
    }
}

/// The output path of image `i` of `n`.
pub fn numbered(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{i}.{ext}"))
}

/// Decodes with tiles when needed: the full frame when it fits `budget` and
/// the adapter's limits, else the largest power-of-two tile (from 64) that does.
pub fn decode_auto(
    gpu: &Gpu,
    vae: &Vae,
    shape: [usize; 4],
    latents: &[f32],
    tile: Option<usize>,
    overlap: usize,
    budget: Option<u64>,
) -> Result<Vec<f32>> {
    let [b, _, h, w] = shape;
    let tile = match tile {
        Some(t) => Some(t),
        None if fits(gpu, vae, b, h, w, budget)? => None,
        None => {
            let mut t = 64.min(h.max(w));
            while t > overlap + 1 && !fits(gpu, vae, b, t.min(h), t.min(w), budget)? {
                t /= 2;
            }
            if t <= overlap + 1 {
                return Err(Error::Graph(format!(
                    "even small tiles of these latents do not fit the adapter's limits{}",
                    budget
                        .map(|b| format!(" or the budget of {b} bytes"))
                        .unwrap_or_default()
                )));
            }
            Some(t)
        }
    };
    match tile {
        None => VaeRun::decoder(gpu, vae, b, h, w)?.run(gpu, latents),
        Some(t) => decode_tiled(
            gpu,
            vae,
            latents,
            shape,
            t,
            overlap.min(t.saturating_sub(1)),
        ),
    }
}

/// Runs `sd3 decode`; returns the PNGs written.
pub fn decode(gpu: &Gpu, o: &DecodeOptions) -> Result<Vec<PathBuf>> {
    let src = VaeSource::open(&o.model)?;
    let (shape, latents) = read_latents(&o.latents, src.config.latent_channels)?;
    let outs: Vec<PathBuf> = (0..shape[0])
        .map(|i| numbered(&o.out, i, shape[0]))
        .collect();
    for p in &outs {
        output_dir(p)?;
    }
    let vae = Vae::load(gpu, &src, o.matrix)?;
    let image = decode_auto(gpu, &vae, shape, &latents, o.tile, o.overlap, o.budget)?;
    let f = vae.scale();
    let [b, _, h, w] = shape;
    let rgb = to_rgb8(&image, [b, 3, h * f, w * f])?;
    let text = [
        (
            "Software",
            format!("sd3-wgpu {}", env!("CARGO_PKG_VERSION")),
        ),
        ("sd3:model", o.model.display().to_string()),
        ("sd3:latents", o.latents.display().to_string()),
    ];
    for (img, p) in rgb.iter().zip(&outs) {
        save_png(p, img, w * f, h * f, &text)?;
    }
    Ok(outs)
}

/// Writes latents as a safetensors file with one f32 tensor `latents`, whole or not at all.
pub fn write_latents(path: &Path, shape: [usize; 4], data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(vec![("latents", view)], None, tmp)
            .map_err(|e| Error::Io(format!("{}: cannot write: {e}", path.display())))
    })
}

/// Fails unless `path`'s folder exists and accepts a new file (checked by
/// creating and removing a probe), so a long run does not end in a failed write.
pub fn check_writable(path: &Path) -> Result<()> {
    let probe = output_dir(path)?.join(format!(".sd3-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| Error::Io(format!("{}: cannot write there: {e}", path.display())))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
