//! Images in and out: PNG with text metadata (so an image remembers how it was
//! made), written whole or not at all; input images for the encoder.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::vae::{from_u8, to_u8};

fn io_error(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Io(format!("{}: {what}: {e}", path.display()))
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

/// The folder a new file at `path` goes into; an error when it does not exist.
pub fn output_dir(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::Io(format!(
            "{}: the folder {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    Ok(dir)
}

/// Writes `path` whole or not at all: `write` fills a temporary file beside
/// it, which is renamed into place only when complete.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io(format!("{}: not a file path", path.display())))?;
    let tmp = output_dir(path)?.join(format!(".{}.partial", name.to_string_lossy()));
    let result = write(&tmp)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| io_error(path, "cannot write", e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes an RGB8 PNG with `tEXt` chunks, whole or not at all.
pub fn save_png(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(&str, String)],
) -> Result<()> {
    if rgb.len() != width * height * 3 {
        return Err(Error::Graph(format!(
            "{} bytes for a {width}×{height} RGB image",
            rgb.len()
        )));
    }
    write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| io_error(path, "cannot write", e))?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone())
                .map_err(|e| io_error(path, "PNG text", e))?;
        }
        let mut writer = enc
            .write_header()
            .map_err(|e| io_error(path, "PNG header", e))?;
        writer
            .write_image_data(rgb)
            .map_err(|e| io_error(path, "PNG data", e))?;
        writer.finish().map_err(|e| io_error(path, "PNG finish", e))
    })
}

/// Reads the text chunks of a PNG (key, value).
pub fn png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| io_error(path, "cannot read", e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| io_error(path, "not a PNG", e))?;
    Ok(reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect())
}

/// Loads an image for the encoder: RGB, centre-cropped so that both sides are
/// multiples of `multiple` (16 for SD3), as [1, 3, h, w] values in [-1, 1].
pub fn load_image(path: &Path, multiple: usize) -> Result<(Vec<f32>, usize, usize)> {
    let img = image::open(path)
        .map_err(|e| io_error(path, "cannot read the image", e))?
        .to_rgb8();
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w0 / multiple * multiple, h0 / multiple * multiple);
    if w == 0 || h == 0 {
        return Err(Error::Io(format!(
            "{}: {w0}×{h0} is smaller than {multiple}×{multiple}",
            path.display()
        )));
    }
    let (x0, y0) = ((w0 - w) / 2, (h0 - h) / 2);
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
