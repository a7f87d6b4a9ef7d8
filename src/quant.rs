//! GGML's block-quantized weight formats on the CPU (the GPU decodes them in
//! `shaders/weights.wgsl`): dequantization as `ggml-quants.c` does it (for
//! reading back and as the tests' reference) and a quantizer (for the
//! engine's own quantized tensors: random benchmark weights, tests).
//!
//! Every format packs blocks of 32 consecutive elements of the flattened
//! tensor (a GGUF tensor's rows are whole blocks), an f16 scale `d` first:
//! - Q8_0 (34 bytes): 32 × i8, x = d·q;
//! - Q4_0 (18 bytes): 16 bytes of nibbles, x = d·(q − 8);
//! - Q4_1 (20 bytes): d, min m, nibbles, x = d·q + m;
//! - Q5_0 (22 bytes): d, 32 high bits (u32), nibbles, x = d·(q − 16);
//! - Q5_1 (24 bytes): d, m, high bits, nibbles, x = d·q + m.
//!
//! Byte j of the nibbles holds element j (low half) and element j + 16 (high
//! half); bit j of the high bits is element j's fifth bit.

use half::f16;

use crate::tensor::DType;

/// Elements per block.
pub const BLOCK: usize = 32;

/// Bytes per block of a block format, `None` for other types.
pub fn block_bytes(d: DType) -> Option<usize> {
    match d {
        DType::Q8_0 => Some(34),
        DType::Q4_0 => Some(18),
        DType::Q4_1 => Some(20),
        DType::Q5_0 => Some(22),
        DType::Q5_1 => Some(24),
        _ => None,
    }
}

fn f16_at(b: &[u8], o: usize) -> f32 {
    f16::from_le_bytes([b[o], b[o + 1]]).to_f32()
}

/// Dequantizes `numel` elements of block format `d` from `bytes` (which
/// must hold ⌈numel / 32⌉ blocks); `None` when `d` is not a block format or
/// the bytes are too few.
pub fn dequantize(d: DType, bytes: &[u8], numel: usize) -> Option<Vec<f32>> {
    let bb = block_bytes(d)?;
    let blocks = numel.div_ceil(BLOCK);
    if bytes.len() < blocks.checked_mul(bb)? {
        return None;
    }
    let mut out = Vec::with_capacity(blocks * BLOCK);
    for blk in bytes.chunks_exact(bb).take(blocks) {
        let scale = f16_at(blk, 0);
        match d {
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

/// Quantizes `data` to block format `d` as ggml's reference quantizers do
/// (the last block padded with zeros); `None` for other types.
pub fn quantize(d: DType, data: &[f32]) -> Option<Vec<u8>> {
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
