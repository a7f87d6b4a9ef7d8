//! GGML's block-quantized weight formats on the CPU (the GPU decodes them in
//! `shaders/weights.wgsl`): dequantization as `ggml-quants.c` does it (for
//! reading back and as the tests' reference) and a quantizer (for the
//! engine's own quantized tensors: random benchmark weights, tests).
//!
//! Every format packs blocks of consecutive elements of the flattened tensor
//! (a GGUF tensor's rows are whole blocks). Blocks of 32, an f16 scale `d`
//! first:
//! - Q8_0 (34 bytes): 32 × i8, x = d·q;
//! - Q4_0 (18 bytes): 16 bytes of nibbles, x = d·(q − 8);
//! - Q4_1 (20 bytes): d, min m, nibbles, x = d·q + m;
//! - Q5_0 (22 bytes): d, 32 high bits (u32), nibbles, x = d·(q − 16);
//! - Q5_1 (24 bytes): d, m, high bits, nibbles, x = d·q + m.
//!
//! Byte j of the nibbles holds element j (low half) and element j + 16 (high
//! half); bit j of the high bits is element j's fifth bit.
//!
//! The K-quants, super-blocks of 256 in sub-blocks with their own scales:
//! - Q4_K (144 bytes): d, dmin (f16), 12 bytes of 6-bit scales and mins for 8
//!   sub-blocks of 32, 128 bytes of nibbles; x = d·sc·q − dmin·m;
//! - Q5_K (176 bytes): as Q4_K plus 32 bytes of fifth bits before the nibbles;
//! - Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit highs, 16 i8
//!   scales for sub-blocks of 16, d (f16) last; x = d·sc·(q − 32).
//!
//! In a K-quant, elements go in runs of 64 (Q4_K, Q5_K: run c uses
//! sub-blocks 2c and 2c + 1, the low then the high nibbles of bytes
//! 32c..32c + 32) or 128 (Q6_K: four quarters of 32 from the low and high
//! nibbles of two 32-byte halves).

use half::f16;

use crate::tensor::DType;

/// Elements per block of the 32-element formats.
pub const BLOCK: usize = 32;
/// Elements per super-block of the K-quants.
pub const QK_K: usize = 256;

/// (elements, bytes) of one block of a block format, `None` for other types.
pub fn block(d: DType) -> Option<(usize, usize)> {
    match d {
        DType::Q8_0 => Some((BLOCK, 34)),
        DType::Q4_0 => Some((BLOCK, 18)),
        DType::Q4_1 => Some((BLOCK, 20)),
        DType::Q5_0 => Some((BLOCK, 22)),
        DType::Q5_1 => Some((BLOCK, 24)),
        DType::Q4K => Some((QK_K, 144)),
        DType::Q5K => Some((QK_K, 176)),
        DType::Q6K => Some((QK_K, 210)),
        _ => None,
    }
}

/// Bytes of `numel` elements of a block format (the last block whole).
pub fn packed_bytes(d: DType, numel: usize) -> Option<usize> {
    let (n, b) = block(d)?;
    numel.div_ceil(n).checked_mul(b)
}

/// Bytes per block of a block format, `None` for other types.
pub fn block_bytes(d: DType) -> Option<usize> {
    block(d).map(|b| b.1)
}

/// Q4_K / Q5_K: the 6-bit scale and min of sub-block j (ggml's get_scale_min_k4).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Dequantizes one K-quant super-block into `out`.
fn dequantize_k(d: DType, blk: &[u8], out: &mut Vec<f32>) {
    match d {
        DType::Q6K => {
            let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let scale = f16_at(blk, 208);
            for e in 0..QK_K {
                let (n, r) = (e / 128, e % 128);
                let (k, l) = (r / 32, r % 32);
                let lo = ql[64 * n + l + (k & 1) * 32];
                let nib = if k < 2 { lo & 15 } else { lo >> 4 };
                let hi = (qh[32 * n + l] >> (2 * k)) & 3;
                let q = (nib | (hi << 4)) as i32 - 32;
                let s = sc[8 * n + l / 16 + 2 * k] as i8;
                out.push(scale * s as f32 * q as f32);
            }
        }
        _ => {
            let (dd, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let scales = &blk[4..16];
            let (qh, qs) = if d == DType::Q5K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for c in 0..4 {
                for h in 0..2 {
                    let (sc, m) = scale_min_k4(2 * c + h, scales);
                    let (d1, m1) = (dd * sc as f32, dmin * m as f32);
                    for l in 0..32 {
                        let byte = qs[32 * c + l];
                        let mut q = if h == 0 { byte & 15 } else { byte >> 4 };
                        if let Some(qh) = qh {
                            q += ((qh[l] >> (2 * c + h)) & 1) << 4;
                        }
                        out.push(d1 * q as f32 - m1);
                    }
                }
            }
        }
    }
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Dequantizes `numel` elements of block format `d` from `bytes` (which
/// must hold ⌈numel / block⌉ blocks); `None` when `d` is not a block format or
/// the bytes are too few.
pub fn dequantize(d: DType, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let (be, bb) = block(d)?;
    let blocks = numel.div_ceil(be);
    if bytes.len() < blocks.checked_mul(bb)? {
        return None;
    }
    let mut out = Vec::with_capacity(blocks * be);
    for blk in bytes.chunks_exact(bb).take(blocks) {
        let scale = f16_at(blk, 0);
        match d {
            DType::Q4K | DType::Q5K | DType::Q6K => dequantize_k(d, blk, &mut out),
            DType::Q8_0 => out.extend(blk[2..].iter().map(|&q| scale * (q as i8) as f32)),
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
                let (min, qh, qs) = match d {
                    DType::Q4_0 => (None, None, &blk[2..]),
                    DType::Q4_1 => (Some(f16_at(blk, 2)), None, &blk[4..]),
                    DType::Q5_0 => (
                        None,
                        Some(u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]])),
                        &blk[6..],
                    ),
                    _ => (
                        Some(f16_at(blk, 2)),
                        Some(u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]])),
                        &blk[8..],
                    ),
                };
                for j in 0..BLOCK {
                    let nib = if j < 16 { qs[j] & 15 } else { qs[j - 16] >> 4 } as i32;
                    let q = nib | qh.map_or(0, |h| (((h >> j) & 1) as i32) << 4);
                    out.push(match (min, qh) {
                        (Some(m), _) => scale * q as f32 + m,
                        (None, Some(_)) => scale * (q - 16) as f32,
                        (None, None) => scale * (q - 8) as f32,
                    });
                }
            }
            _ => return None,
        }
    }
    out.truncate(numel);
    Some(out)
}

/// Quantizes `data` to block format `d` (the last block padded with zeros):
/// the 32-element formats as ggml's reference quantizers do, the K-quants
/// with plain max-based scales (valid blocks, not ggml's search for the
/// best ones); `None` for other types.
pub fn quantize(d: DType, data: &[f32]) -> Option<Vec<u8>> {
    if matches!(d, DType::Q4K | DType::Q5K | DType::Q6K) {
        return Some(quantize_k(d, data));
    }
    let bb = block_bytes(d)?;
    let mut out = Vec::with_capacity(data.len().div_ceil(BLOCK) * bb);
    for chunk in data.chunks(BLOCK) {
        let mut x = [0f32; BLOCK];
        x[..chunk.len()].copy_from_slice(chunk);
        let start = out.len();
        match d {
            DType::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = amax / 127.0;
                let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                out.extend(f16::from_f32(scale).to_le_bytes());
                out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            }
            DType::Q4_0 | DType::Q5_0 => {
                // The value of largest magnitude maps to −8 (−16).
                let max = x
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let (levels, off) = if d == DType::Q4_0 {
                    (-8.0, 8.5)
                } else {
                    (-16.0, 16.5)
                };
                let scale = max / levels;
                let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                let top = if d == DType::Q4_0 { 15 } else { 31 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| ((v * id + off) as i32).clamp(0, top) as u8)
                    .collect();
                out.extend(f16::from_f32(scale).to_le_bytes());
                push_nibbles(&mut out, &q, d == DType::Q5_0);
            }
            _ => {
                // Q4_1 / Q5_1: d·q + min over [min, max].
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let top = if d == DType::Q4_1 { 15.0 } else { 31.0 };
                let scale = (max - min) / top;
                let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| (((v - min) * id + 0.5) as i32).clamp(0, top as i32) as u8)
                    .collect();
                out.extend(f16::from_f32(scale).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                push_nibbles(&mut out, &q, d == DType::Q5_1);
            }
        }
        debug_assert_eq!(out.len() - start, bb);
    }
    Some(out)
}

/// The high bits (5-bit formats) then the nibbles of 32 quants.
fn push_nibbles(out: &mut Vec<u8>, q: &[u8], five: bool) {
    if five {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (j, &v)| h | (((v >> 4) as u32 & 1) << j));
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 15) | ((q[j + 16] & 15) << 4)));
}

fn round_u8(v: f32, top: u8) -> u8 {
    v.round().clamp(0.0, top as f32) as u8
}

/// K-quant super-blocks with max-based scales.
fn quantize_k(d: DType, data: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks(QK_K) {
        let mut x = [0f32; QK_K];
        x[..chunk.len()].copy_from_slice(chunk);
        if d == DType::Q6K {
            // Sub-blocks of 16: scale = max|x| / 31, scales as i8 of d.
            let sub: Vec<f32> = x
                .chunks(16)
                .map(|s| s.iter().fold(0f32, |a, v| a.max(v.abs())) / 31.0)
                .collect();
            let smax = sub.iter().fold(0f32, |a, v| a.max(*v));
            let dd = f16::from_f32(smax / 127.0).to_f32();
            let sc: Vec<i8> = sub
                .iter()
                .map(|s| {
                    if dd > 0.0 {
                        (s / dd).round().clamp(-128.0, 127.0) as i8
                    } else {
                        0
                    }
                })
                .collect();
            let mut q = [0u8; QK_K];
            for (e, qe) in q.iter_mut().enumerate() {
                let step = dd * sc[e / 16] as f32;
                let v = if step != 0.0 { x[e] / step } else { 0.0 };
                *qe = round_u8(v + 32.0, 63);
            }
            let mut blk = vec![0u8; 210];
            for (e, &qe) in q.iter().enumerate() {
                let (n, r) = (e / 128, e % 128);
                let (k, l) = (r / 32, r % 32);
                let lo = &mut blk[64 * n + l + (k & 1) * 32];
                *lo |= if k < 2 { qe & 15 } else { (qe & 15) << 4 };
                blk[128 + 32 * n + l] |= ((qe >> 4) & 3) << (2 * k);
            }
            for (i, s) in sc.iter().enumerate() {
                blk[192 + i] = *s as u8;
            }
            blk[208..210].copy_from_slice(&f16::from_f32(dd).to_le_bytes());
            out.extend(blk);
            continue;
        }
        // Q4_K / Q5_K: sub-blocks of 32 with x ≈ scale·q − min (min ≥ 0).
        let top = if d == DType::Q4K { 15.0 } else { 31.0 };
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        for (j, s) in x.chunks(32).enumerate() {
            let lo = s.iter().copied().fold(0f32, f32::min);
            let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            scales[j] = (hi - lo) / top;
            mins[j] = -lo;
        }
        let dd = f16::from_f32(scales.iter().fold(0f32, |a, v| a.max(*v)) / 63.0).to_f32();
        let dmin = f16::from_f32(mins.iter().fold(0f32, |a, v| a.max(*v)) / 63.0).to_f32();
        let sc: Vec<u8> = scales
            .iter()
            .map(|s| if dd > 0.0 { round_u8(s / dd, 63) } else { 0 })
            .collect();
        let mn: Vec<u8> = mins
            .iter()
            .map(|m| {
                if dmin > 0.0 {
                    round_u8(m / dmin, 63)
                } else {
                    0
                }
            })
            .collect();
        let mut packed = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                packed[j] = sc[j];
                packed[j + 4] = mn[j];
            } else {
                packed[j + 4] = (sc[j] & 15) | ((mn[j] & 15) << 4);
                packed[j - 4] |= (sc[j] >> 4) << 6;
                packed[j] |= (mn[j] >> 4) << 6;
            }
        }
        let mut q = [0u8; QK_K];
        for (e, qe) in q.iter_mut().enumerate() {
            let j = e / 32;
            let step = dd * sc[j] as f32;
            let v = if step != 0.0 {
                (x[e] + dmin * mn[j] as f32) / step
            } else {
                0.0
            };
            *qe = round_u8(v, top as u8);
        }
        out.extend(f16::from_f32(dd).to_le_bytes());
        out.extend(f16::from_f32(dmin).to_le_bytes());
        out.extend(packed);
        if d == DType::Q5K {
            let mut qh = [0u8; 32];
            for (e, v) in q.iter().enumerate() {
                let (c, h, l) = (e / 64, (e % 64) / 32, e % 32);
                qh[l] |= ((v >> 4) & 1) << (2 * c + h);
            }
            out.extend(qh);
        }
        let mut qs = [0u8; 128];
        for (e, v) in q.iter().enumerate() {
            let (c, h, l) = (e / 64, (e % 64) / 32, e % 32);
            qs[32 * c + l] |= (v & 15) << (4 * h);
        }
        out.extend(qs);
    }
    out
}
