//! Pillow's Gaussian blur on 8-bit grey images, byte for byte: the inpainting
//! mask's `--mask-blur`, as diffusers' `mask_processor.blur` does it.

/// Number of box-blur passes Pillow uses to approximate a Gaussian.
const PASSES: usize = 3;

/// Blurs an 8-bit grayscale ("L" mode) image exactly like Pillow's
/// `Image.filter(ImageFilter.GaussianBlur(radius))`, byte for byte.
///
/// `pixels` is row-major, `width * height` bytes; the result has the same layout.
/// `radius` is the standard deviation of the Gaussian, as in Pillow.
///
/// Like Pillow, this does not convolve with a true Gaussian. It turns the radius
/// into a fractional "extended box" radius (Gwosdek et al., 2011), then runs
/// three box-blur passes along every row and three along every column. Pixels
/// past the image border repeat the nearest edge pixel. Each pass uses Pillow's
/// 8.24 fixed-point weights and rounding, so the bytes match exactly.
///
/// A radius of zero returns an unchanged copy, as Pillow does. Negative or
/// non-finite radii, and buffers whose length is not `width * height`, also give
/// an unchanged copy (Pillow would raise an error or is undefined there).
///
/// Checked against Pillow 13.0.0 (`src/libImaging/BoxBlur.c`, unchanged since 12.0.0).
pub fn gaussian_blur_l8(pixels: &[u8], width: usize, height: usize, radius: f32) -> Vec<u8> {
    let mut out = pixels.to_vec();
    if !(radius.is_finite() && radius > 0.0) || width.checked_mul(height) != Some(pixels.len()) {
        return out;
    }
    let box_r = box_radius(radius);
    if box_r == 0.0 || pixels.is_empty() {
        return out;
    }
    let params = BoxParams::new(box_r);
    let mut tmp = vec![0u8; width.max(height)];
    for row in out.chunks_exact_mut(width) {
        params.blur_passes(row, &mut tmp[..width]);
    }
    let mut column = vec![0u8; height];
    for x in 0..width {
        for (c, row) in column.iter_mut().zip(out.chunks_exact(width)) {
            *c = row[x];
        }
        params.blur_passes(&mut column, &mut tmp[..height]);
        for (c, row) in column.iter().zip(out.chunks_exact_mut(width)) {
            row[x] = *c;
        }
    }
    out
}

/// Pillow's `_gaussian_blur_radius`: the extended-box radius whose three passes
/// have the variance of a Gaussian with standard deviation `radius`.
/// Float (`f32`) and double (`f64`) steps mirror the C code exactly.
fn box_radius(radius: f32) -> f32 {
    let sigma2 = radius * radius / PASSES as f32;
    let box_len = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let l = ((f64::from(box_len) - 1.0) / 2.0).floor() as f32;
    let a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    let a = a / (6.0 * (sigma2 - (l + 1.0) * (l + 1.0)));
    l + a
}

/// Fixed-point weights of one fractional box: `ww` for each of the `2r + 1`
/// whole taps, `fw` for each of the two partial taps just outside them.
/// All arithmetic wraps like the C `UINT32` code.
struct BoxParams {
    r: usize,
    ww: u32,
    fw: u32,
}

impl BoxParams {
    fn new(box_r: f32) -> Self {
        let r = box_r as u32; // truncation, like C's `(int)floatRadius`
        let ww = (16_777_216.0f32 / (box_r * 2.0 + 1.0)) as u32;
        let taps = r.wrapping_mul(2).wrapping_add(1);
        let fw = (1u32 << 24).wrapping_sub(taps.wrapping_mul(ww)) / 2;
        let r = usize::try_from(r).unwrap_or(usize::MAX);
        Self { r, ww, fw }
    }

    /// Runs all passes over one line in place; `tmp` must have the same length.
    fn blur_passes(&self, line: &mut [u8], tmp: &mut [u8]) {
        for _ in 0..PASSES {
            self.blur_line(line, tmp);
            line.copy_from_slice(tmp);
        }
    }

    /// One box-blur pass from `src` into `dst` with edge pixels replicated.
    fn blur_line(&self, src: &[u8], dst: &mut [u8]) {
        let last = src.len() - 1;
        let px = |i: usize| u32::from(src[i.min(last)]);
        let r = self.r;
        let r32 = u32::try_from(r).unwrap_or(u32::MAX);
        // Window sum centred on the virtual pixel x = -1 (indices -r-1 ..= r-1).
        let inside = r.min(last);
        let mut acc = px(0).wrapping_mul(r32.wrapping_add(1));
        acc = src[..inside]
            .iter()
            .fold(acc, |s, &p| s.wrapping_add(u32::from(p)));
        let rest = u32::try_from(r - inside).unwrap_or(u32::MAX);
        acc = acc.wrapping_add(px(last).wrapping_mul(rest));
        for (x, out) in dst.iter_mut().enumerate() {
            let left = px(x.saturating_sub(r.saturating_add(1)));
            let right = px(x.saturating_add(r).saturating_add(1));
            acc = acc.wrapping_add(px(x.saturating_add(r))).wrapping_sub(left);
            let bulk = acc
                .wrapping_mul(self.ww)
                .wrapping_add((left + right).wrapping_mul(self.fw));
            *out = (bulk.wrapping_add(1 << 23) >> 24) as u8;
        }
    }
}
