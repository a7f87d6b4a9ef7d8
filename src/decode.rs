//! `sd3 decode`: latents saved by `generate --save-latents` (or diffusers with
//! `output_type="latent"`) → PNG, with tiled decoding when the full frame does
//! not fit the adapter or the memory budget.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::{check_output, check_outputs_apart};
use crate::gpu::Gpu;
use crate::image_io::{save_png, to_rgb8};
use crate::models::vae::{decode_tiled, fits, Vae, VaeRun};
use crate::pipeline::MAX_BATCH;
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

/// Longest latent side accepted (16384 pixels).
pub const MAX_LATENT_SIDE: usize = 2048;

/// Reads the `latents` tensor of a safetensors file: ([b, c, h, w], values).
pub fn read_latents(path: &Path, channels: usize) -> Result<([usize; 4], Vec<f32>)> {
    let ck = Checkpoint::open(&[path.to_path_buf()])?;
    let (shape, data) = ck.read_f32("latents")?;
    let [b, c, h, w] = match shape.as_slice() {
        &[b, c, h, w]
            if c == channels
                && (1..=MAX_BATCH).contains(&b)
                && (1..=MAX_LATENT_SIDE).contains(&h)
                && (1..=MAX_LATENT_SIDE).contains(&w) =>
        {
            [b, c, h, w]
        }
        _ => {
            return Err(Error::Io(format!(
                "{}: tensor 'latents' must be [batch ≤ {MAX_BATCH}, {channels}, height/8, width/8] with sides ≤ {MAX_LATENT_SIDE}, found {shape:?}",
                path.display()
            )))
        }
    };
    if data.iter().any(|v| !v.is_finite()) {
        return Err(Error::Io(format!(
            "{}: tensor 'latents' holds NaN or infinite values",
            path.display()
        )));
    }
    Ok(([b, c, h, w], data))
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

/// Smallest VAE tile accepted, in latent pixels.
pub const MIN_TILE: usize = 4;
/// Largest VAE tile accepted, in latent pixels.
pub const MAX_TILE: usize = 4096;

/// Decodes with tiles when needed (see [`decode_sized`]). A VAE with f16
/// activations whose image comes out with non-finite values overflowed f16
/// somewhere (the real SD3 VAE's activations can exceed f16's 65504, which
/// becomes infinity and then NaN through every later op): the decode is then
/// redone with f32 activations, so an overflow costs time, never the image.
pub fn decode_auto(
    gpu: &Gpu,
    vae: &Vae,
    shape: [usize; 4],
    latents: &[f32],
    tile: Option<usize>,
    overlap: usize,
    budget: Option<u64>,
) -> Result<Vec<f32>> {
    let image = decode_sized(gpu, vae, shape, latents, tile, overlap, budget)?;
    if vae.activation == DType::F32 || image.iter().all(|v| v.is_finite()) {
        return Ok(image);
    }
    let f32_vae = Vae {
        activation: DType::F32,
        ..vae.clone()
    };
    decode_sized(gpu, &f32_vae, shape, latents, tile, overlap, budget)
}

/// Decodes with tiles when needed: the full frame when it fits `budget` and
/// the adapter's limits, else the largest power-of-two tile (from 64) that does.
pub fn decode_sized(
    gpu: &Gpu,
    vae: &Vae,
    shape: [usize; 4],
    latents: &[f32],
    tile: Option<usize>,
    overlap: usize,
    budget: Option<u64>,
) -> Result<Vec<f32>> {
    let [b, _, h, w] = shape;
    if overlap >= MAX_TILE {
        return Err(Error::Graph(format!(
            "--tile-overlap must be below {MAX_TILE} latent pixels, got {overlap}"
        )));
    }
    if let Some(t) = tile {
        if !(MIN_TILE..=MAX_TILE).contains(&t) {
            return Err(Error::Graph(format!(
                "--vae-tile must be in {MIN_TILE}..={MAX_TILE} latent pixels, got {t}"
            )));
        }
    }
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

/// Runs `sd3 decode`; returns the PNGs written and warnings about metadata
/// left out of them.
pub fn decode(gpu: &Gpu, o: &DecodeOptions) -> Result<(Vec<PathBuf>, Vec<String>)> {
    let src = VaeSource::open(&o.model)?;
    let (shape, latents) = read_latents(&o.latents, src.config.latent_channels)?;
    let outs: Vec<PathBuf> = (0..shape[0])
        .map(|i| numbered(&o.out, i, shape[0]))
        .collect();
    for p in &outs {
        check_output(p)?;
    }
    let mut inputs = src.ck.files.clone();
    inputs.push(o.latents.clone());
    let named: Vec<(&str, PathBuf)> = outs.iter().map(|p| ("--out", p.clone())).collect();
    check_outputs_apart(&named, &inputs)?;
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
    let mut warnings = Vec::new();
    for (img, p) in rgb.iter().zip(&outs) {
        warnings.extend(save_png(p, img, w * f, h * f, &text)?);
    }
    Ok((outs, warnings))
}

/// Writes latents as a safetensors file with one f32 tensor `latents`, whole or not at all.
pub fn write_latents(path: &Path, shape: [usize; 4], data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), &bytes)
            .map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
    let file = safetensors::serialize(vec![("latents", view)], None)
        .map_err(|e| Error::Io(format!("{}: cannot write: {e}", path.display())))?;
    crate::files::write_bytes(path, &file)
}
