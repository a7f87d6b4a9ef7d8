// Weight storage: f32, or packed into u32 words (W_F16 set) in the format
// W_FMT names — 0: f16, two per word (unpack2x16float, which needs no
// SHADER_F16 feature); 1: bf16, two per word (the high half of an f32);
// 2: float8 e4m3fn, four per word (bias 7, no infinities, S.1111.111 NaN);
// 3: float8 e5m2, four per word (the high byte of an f16). Weights stay in
// the file's encoding on the GPU and are decoded here, in the load stage.
// A file including this declares `w: array<WElem>`.

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

fn load_w(i: u32) -> f32 {
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
