// Weight storage: f32, or f16 packed two to a u32 (unpacked with
// unpack2x16float, which needs no SHADER_F16 feature, so f16 weights work on
// every adapter). A file including this declares `w: array<WElem>`.

#if W_F16
alias WElem = u32;
fn load_w(i: u32) -> f32 {
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}
#else
alias WElem = f32;
fn load_w(i: u32) -> f32 {
    return w[i];
}
#endif
