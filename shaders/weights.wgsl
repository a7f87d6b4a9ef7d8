// Weight storage: f32, or packed into u32 words (W_F16 set) in the format
// W_FMT names — 0: f16, two per word (unpack2x16float, which needs no
// SHADER_F16 feature); 1: bf16, two per word (the high half of an f32);
// 2: float8 e4m3fn, four per word (bias 7, no infinities, S.1111.111 NaN);
// 3: float8 e5m2, four per word (the high byte of an f16); 4-8: GGML's
// blocks of 32 with an f16 scale d (src/quant.rs), packed back to back over
// the flattened tensor — 4 Q8_0 (34 bytes: d, 32 × i8; x = d·q), 5 Q4_0 (18:
// d, nibbles; d·(q − 8)), 6 Q4_1 (20: d, m, nibbles; d·q + m), 7 Q5_0 (22: d,
// 32 high bits, nibbles; d·(q − 16)), 8 Q5_1 (24: d, m, high bits, nibbles;
// d·q + m); nibble byte j holds elements j (low) and j + 16 (high); 9-11:
// the K-quants' super-blocks of 256 — 9 Q4_K (144 bytes: d, dmin, 6-bit
// scales and mins of 8 sub-blocks, nibbles), 10 Q5_K (176: Q4_K's with 32
// bytes of fifth bits before the nibbles), 11 Q6_K (210: low nibbles, 2-bit
// highs, 16 i8 scales, d last); see src/quant.rs for the element order. Weights
// stay in the file's encoding on the GPU and are decoded here, in the load
// stage. A file including this declares `w: array<WElem>`.

// Set from Rust per call (DType::packed_format); f16 unless told.
override W_FMT: u32 = 0u;

#if W_F16
alias WElem = u32;

fn f8e4m3(b: u32) -> f32 {
    let e = (b >> 3u) & 15u;
    let m = f32(b & 7u);
    var mag = ldexp(1.0 + m / 8.0, i32(e) - 7);
    if (e == 0u) {
        mag = m * (1.0 / 512.0);
    }
    if (e == 15u && (b & 7u) == 7u) {
        mag = bitcast<f32>(0x7fc00000u);
    }
    return select(mag, -mag, (b & 0x80u) != 0u);
}

// Byte o of the packed weights.
fn w_byte(o: u32) -> u32 {
    return (w[o >> 2u] >> (8u * (o & 3u))) & 0xffu;
}

// The f16 at byte o (any alignment).
fn w_half(o: u32) -> f32 {
    return unpack2x16float(w_byte(o) | (w_byte(o + 1u) << 8u)).x;
}

// Element i of a GGML block format (W_FMT 4-8).
fn load_block(i: u32) -> f32 {
    let j = i % 32u;
    var bytes = 34u;
    switch (W_FMT) {
        case 5u: { bytes = 18u; }
        case 6u: { bytes = 20u; }
        case 7u: { bytes = 22u; }
        case 8u: { bytes = 24u; }
        default: {}
    }
    let base = (i / 32u) * bytes;
    let d = w_half(base);
    if (W_FMT == 4u) {
        let q = w_byte(base + 2u + j);
        return d * f32(i32(q << 24u) >> 24u);
    }
    // Where the high bits and the nibbles start.
    var qh_at = 0u;
    var qs_at = base + 2u;
    if (W_FMT == 6u) {
        qs_at = base + 4u;
    } else if (W_FMT == 7u) {
        qh_at = base + 2u;
        qs_at = base + 6u;
    } else if (W_FMT == 8u) {
        qh_at = base + 4u;
        qs_at = base + 8u;
    }
    let byte = w_byte(qs_at + (j % 16u));
    var q = select(byte & 15u, byte >> 4u, j >= 16u);
    if (W_FMT == 7u || W_FMT == 8u) {
        q |= ((w_byte(qh_at + j / 8u) >> (j % 8u)) & 1u) << 4u;
    }
    switch (W_FMT) {
        case 5u: { return d * (f32(q) - 8.0); }
        case 7u: { return d * (f32(q) - 16.0); }
        default: { return d * f32(q) + w_half(base + 2u); }
    }
}

// Q4_K / Q5_K: sub-block j's 6-bit scale and min from the 12 bytes at s.
fn scale_min_k4(j: u32, s: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(w_byte(s + j) & 63u), f32(w_byte(s + j + 4u) & 63u));
    }
    let b = w_byte(s + j + 4u);
    let sc = (b & 15u) | ((w_byte(s + j - 4u) >> 6u) << 4u);
    let m = (b >> 4u) | ((w_byte(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(m));
}

// Element i of a K-quant (W_FMT 9-11).
fn load_k(i: u32) -> f32 {
    let e = i % 256u;
    if (W_FMT == 11u) {
        let base = (i / 256u) * 210u;
        let n = e / 128u;
        let r = e % 128u;
        let k = r / 32u;
        let l = r % 32u;
        let lo = w_byte(base + 64u * n + l + (k & 1u) * 32u);
        let nib = select(lo & 15u, lo >> 4u, k >= 2u);
        let hi = (w_byte(base + 128u + 32u * n + l) >> (2u * k)) & 3u;
        let sc = f32(i32(w_byte(base + 192u + 8u * n + l / 16u + 2u * k) << 24u) >> 24u);
        return w_half(base + 208u) * sc * f32(i32(nib | (hi << 4u)) - 32);
    }
    let five = W_FMT == 10u;
    let base = (i / 256u) * select(144u, 176u, five);
    let c = e / 64u;
    let h = (e % 64u) / 32u;
    let l = e % 32u;
    let sm = scale_min_k4(2u * c + h, base + 4u);
    let byte = w_byte(base + select(16u, 48u, five) + 32u * c + l);
    var q = select(byte & 15u, byte >> 4u, h == 1u);
    if (five) {
        q |= ((w_byte(base + 16u + l) >> (2u * c + h)) & 1u) << 4u;
    }
    return w_half(base) * sm.x * f32(q) - w_half(base + 2u) * sm.y;
}

fn load_w(i: u32) -> f32 {
    if (W_FMT >= 9u) {
        return load_k(i);
    }
    if (W_FMT >= 4u) {
        return load_block(i);
    }
    if (W_FMT == 0u) {
        let pair = unpack2x16float(w[i >> 1u]);
        return select(pair.x, pair.y, (i & 1u) == 1u);
    }
    if (W_FMT == 1u) {
        let word = w[i >> 1u];
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (i & 1u) == 1u));
    }
    let byte = (w[i >> 2u] >> (8u * (i & 3u))) & 0xffu;
    if (W_FMT == 2u) {
        return f8e4m3(byte);
    }
    return unpack2x16float(byte << 8u).x;
}
#else
alias WElem = f32;
fn load_w(i: u32) -> f32 {
    return w[i];
}
#endif
