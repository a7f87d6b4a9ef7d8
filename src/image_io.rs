//! Images in and out: PNG with text metadata (so an image remembers how it was
//! made), written whole or not at all; input images for the encoder.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::models::vae::{from_u8, to_u8};

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {what}: {e}", path.display()))
}

/// An input image: a file, or encoded bytes already in memory (an image an
/// HTTP request carried).
#[derive(Clone, Debug, PartialEq)]
pub enum ImageSource {
    /// A PNG or JPEG file.
    File(PathBuf),
    /// Encoded PNG or JPEG bytes, with the name that errors and metadata give
    /// them (e.g. `init_images[0]`).
    Bytes {
        /// What the image is called in messages.
        name: String,
        /// The encoded image.
        data: Arc<Vec<u8>>,
    },
}

impl ImageSource {
    /// The encoded bytes (a file's read with the image size bound).
    pub fn read(&self) -> Result<Arc<Vec<u8>>> {
        match self {
            ImageSource::File(p) => Ok(Arc::new(crate::files::read_bounded(
                p,
                crate::files::MAX_IMAGE_BYTES,
            )?)),
            ImageSource::Bytes { data, .. } => {
                if data.len() as u64 > crate::files::MAX_IMAGE_BYTES {
                    return Err(Error::Io(format!(
                        "{self}: {} bytes, more than the {} an image may have",
                        data.len(),
                        crate::files::MAX_IMAGE_BYTES
                    )));
                }
                Ok(data.clone())
            }
        }
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSource::File(p) => write!(f, "{}", p.display()),
            ImageSource::Bytes { name, .. } => f.write_str(name),
        }
    }
}

impl From<PathBuf> for ImageSource {
    fn from(p: PathBuf) -> Self {
        ImageSource::File(p)
    }
}

impl From<&PathBuf> for ImageSource {
    fn from(p: &PathBuf) -> Self {
        ImageSource::File(p.clone())
    }
}

impl From<&Path> for ImageSource {
    fn from(p: &Path) -> Self {
        ImageSource::File(p.to_path_buf())
    }
}

impl From<&str> for ImageSource {
    fn from(p: &str) -> Self {
        ImageSource::File(p.into())
    }
}

impl From<&ImageSource> for ImageSource {
    fn from(s: &ImageSource) -> Self {
        s.clone()
    }
}

fn image_error(src: &ImageSource, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{src}: {what}: {e}"))
}

/// Image batch [b, 3, h, w] (values about [-1, 1]) → one RGB8 buffer (HWC) per image.
pub fn to_rgb8(x: &[f32], shape: [usize; 4]) -> Result<Vec<Vec<u8>>> {
    let [b, c, h, w] = shape;
    if c != 3 || x.len() != b * c * h * w {
        return Err(Error::Graph(format!(
            "expected an RGB image batch [b, 3, h, w], got {shape:?} ({} values)",
            x.len()
        )));
    }
    Ok((0..b)
        .map(|bi| {
            let mut out = Vec::with_capacity(h * w * 3);
            for y in 0..h {
                for xx in 0..w {
                    for ci in 0..3 {
                        out.push(to_u8(x[((bi * 3 + ci) * h + y) * w + xx]));
                    }
                }
            }
            out
        })
        .collect())
}

/// Whether `key` can be a PNG text keyword: 1–79 printable Latin-1
/// characters without leading or trailing spaces.
fn valid_keyword(key: &str) -> bool {
    let n = key.chars().count();
    (1..=79).contains(&n)
        && !key.starts_with(' ')
        && !key.ends_with(' ')
        && key
            .chars()
            .all(|c| matches!(c as u32, 0x20..=0x7e | 0xa1..=0xff))
}

/// Whether a value can go into a `tEXt` chunk as it is: printable Latin-1
/// and line feeds. Anything else (CJK, emoji, RTL, control characters) goes
/// into a UTF-8 `iTXt` chunk, as PIL and the A1111 web UI do.
fn plain_latin1(text: &str) -> bool {
    text.chars()
        .all(|c| matches!(c as u32, 0x0a | 0x20..=0x7e | 0xa0..=0xff))
}

/// Writes an RGB8 PNG with text metadata, whole or not at all. Values that
/// are printable Latin-1 go into `tEXt`, all others into UTF-8 `iTXt`, so
/// every value reads back equal. A field that cannot be stored at all (a
/// keyword PNG does not allow) is dropped, and if the metadata still fails
/// the image is written without it: the image is never lost to its
/// metadata. Returns a warning for each thing dropped.
pub fn save_png(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(&str, String)],
) -> Result<Vec<String>> {
    let (bytes, warnings) = png_bytes(rgb, width, height, text)?;
    crate::files::write_bytes(path, &bytes)?;
    Ok(warnings
        .into_iter()
        .map(|w| format!("{}: {w}", path.display()))
        .collect())
}

/// An RGB8 image (HWC) encoded as PNG in memory, with text metadata as
/// [`save_png`] writes it; returns the bytes and a warning for each field
/// dropped.
pub fn png_bytes(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(&str, String)],
) -> Result<(Vec<u8>, Vec<String>)> {
    let dims = width.checked_mul(height).and_then(|p| p.checked_mul(3));
    let (w32, h32) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 && dims == Some(rgb.len()) => (w, h),
        _ => {
            return Err(Error::Graph(format!(
                "{} bytes for a {width}×{height} RGB image",
                rgb.len()
            )))
        }
    };
    let mut warnings = Vec::new();
    let mut fields = Vec::new();
    for (k, v) in text {
        if valid_keyword(k) {
            fields.push((*k, v.as_str()));
        } else {
            warnings.push(format!(
                "metadata key {k:?} is not a valid PNG keyword; that field is left out"
            ));
        }
    }
    let png_error = |what: &str, e: png::EncodingError| Error::Io(format!("PNG {what}: {e}"));
    let encode = |fields: &[(&str, &str)]| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w32, h32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in fields {
            let r = if plain_latin1(v) {
                enc.add_text_chunk(k.to_string(), v.to_string())
            } else {
                enc.add_itxt_chunk(k.to_string(), v.to_string())
            };
            r.map_err(|e| png_error("text", e))?;
        }
        let mut writer = enc.write_header().map_err(|e| png_error("header", e))?;
        writer
            .write_image_data(rgb)
            .map_err(|e| png_error("data", e))?;
        writer.finish().map_err(|e| png_error("finish", e))?;
        Ok(out)
    };
    let bytes = match encode(&fields) {
        Err(e) if !fields.is_empty() => {
            warnings.push(format!(
                "the metadata could not be written ({e}); the image is saved without it"
            ));
            encode(&[])?
        }
        r => r?,
    };
    Ok((bytes, warnings))
}

/// Reads the text chunks of a PNG (key, value): `tEXt`, `zTXt` and `iTXt`.
pub fn png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = crate::files::open_regular(path).map_err(|e| io_error(path, "cannot read", e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| io_error(path, "not a PNG", e))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        let text = t.get_text().map_err(|e| io_error(path, "PNG zTXt", e))?;
        out.push((t.keyword.clone(), text));
    }
    for t in &info.utf8_text {
        let text = t.get_text().map_err(|e| io_error(path, "PNG iTXt", e))?;
        out.push((t.keyword.clone(), text));
    }
    Ok(out)
}

/// Reads an image as 8-bit RGB (alpha dropped, palettes expanded).
fn read_rgb(src: &ImageSource) -> Result<image::RgbImage> {
    let bytes = src.read()?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| image_error(src, "cannot read the image", e))?;
    // Sides beyond any model's grid are refused before decoding (a small
    // file can claim a huge image).
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    Ok(reader
        .decode()
        .map_err(|e| image_error(src, "cannot read the image", e))?
        .to_rgb8())
}

/// The largest image side read (SD3's position grids cover at most 3072 px).
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// The centred crop of a `w0`×`h0` image whose sides are multiples of
/// `multiple`: (x0, y0, w, h).
fn centre_crop(src: &ImageSource, w0: usize, h0: usize, multiple: usize) -> Result<[usize; 4]> {
    let (w, h) = (w0 / multiple * multiple, h0 / multiple * multiple);
    if w == 0 || h == 0 {
        return Err(Error::Io(format!(
            "{src}: {w0}×{h0} is smaller than {multiple}×{multiple}"
        )));
    }
    Ok([(w0 - w) / 2, (h0 - h) / 2, w, h])
}

/// Loads an image for the encoder: RGB, centre-cropped so that both sides are
/// multiples of `multiple` (16 for SD3), as [1, 3, h, w] values in [-1, 1].
pub fn load_image(
    src: impl Into<ImageSource>,
    multiple: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    let src = src.into();
    let img = read_rgb(&src)?;
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let [x0, y0, w, h] = centre_crop(&src, w0, h0, multiple)?;
    let mut out = vec![0f32; 3 * h * w];
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel((x0 + x) as u32, (y0 + y) as u32);
            for c in 0..3 {
                out[(c * h + y) * w + x] = from_u8(p[c]);
            }
        }
    }
    Ok((out, h, w))
}

/// The size of an image (width, height), read from its header.
pub fn image_size(src: impl Into<ImageSource>) -> Result<(usize, usize)> {
    let src = src.into();
    let bytes = src.read()?;
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| image_error(&src, "cannot read the image", e))?
        .into_dimensions()
        .map_err(|e| image_error(&src, "cannot read the image", e))?;
    Ok((w as usize, h as usize))
}

/// Pillow's `convert("L")` of an RGB pixel: ITU-R 601 weights in 16-bit
/// fixed point, rounded.
fn pil_grey(p: &image::Rgb<u8>) -> u8 {
    let [r, g, b] = p.0.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
}

/// An inpainting mask on the latent grid: [lh, lw] values, 1 where the model
/// paints (white in the file), 0 where the init image is kept.
///
/// As StableDiffusion3InpaintPipeline prepares it: the file is made grey as
/// Pillow's `convert("L")` does, blurred with Pillow's Gaussian blur of radius
/// `blur` when `blur > 0` (diffusers' `mask_processor.blur`), cropped like the
/// init image, binarised at one half and sampled nearest onto the latent grid
/// (`interpolate(mode="nearest")`: pixel ⌊i · s⌋ for latent pixel i, `s` the
/// VAE's scale). The mask must have the init image's size, `image` (w, h).
pub fn load_mask(
    src: impl Into<ImageSource>,
    multiple: usize,
    vae_scale: usize,
    image: (usize, usize),
    blur: f32,
) -> Result<(Vec<f32>, usize, usize)> {
    let src = src.into();
    let img = read_rgb(&src)?;
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if (w0, h0) != image {
        return Err(Error::Io(format!(
            "{src}: the mask is {w0}×{h0}, but the init image is {}×{}; they must be the same size",
            image.0, image.1
        )));
    }
    let grey: Vec<u8> = img.pixels().map(pil_grey).collect();
    let grey = if blur > 0.0 {
        crate::blur::gaussian_blur_l8(&grey, w0, h0, blur)
    } else {
        grey
    };
    let [x0, y0, w, h] = centre_crop(&src, w0, h0, multiple)?;
    if vae_scale == 0 || !w.is_multiple_of(vae_scale) || !h.is_multiple_of(vae_scale) {
        return Err(Error::Io(format!(
            "{src}: {w}×{h} does not divide into latent pixels of {vae_scale}"
        )));
    }
    let (lh, lw) = (h / vae_scale, w / vae_scale);
    let mut out = Vec::with_capacity(lh * lw);
    for y in 0..lh {
        for x in 0..lw {
            let v = grey[(y0 + y * vae_scale) * w0 + x0 + x * vae_scale];
            // v / 255 ≥ 0.5 in f32, as diffusers binarises.
            out.push(if v >= 128 { 1.0 } else { 0.0 });
        }
    }
    Ok((out, lh, lw))
}
