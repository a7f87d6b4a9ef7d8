//! `torch.randn(n, generator=torch.Generator().manual_seed(seed))` on the CPU,
//! reproduced so that a diffusers image can be regenerated from its seed.
//!
//! torch draws from a 32-bit Mersenne Twister. Float tensors of 16 or more
//! elements are filled with 24-bit uniforms, then transformed 16 at a time by
//! Box–Muller (the first 8 values pair with the next 8), the tail redone with
//! fresh uniforms; smaller tensors use torch's scalar path, which draws 53-bit
//! double uniforms and keeps the second Box–Muller value for the next draw.

struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn uniform_f32(&mut self) -> f32 {
        ((self.next_u32() & ((1 << 24) - 1)) as f64 * 2f64.powi(-24)) as f32
    }

    fn uniform_f64(&mut self) -> f64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * 2f64.powi(-53)
    }
}

fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// torch's CPU generator (`torch.Generator().manual_seed(seed)`): successive
/// [`TorchGenerator::randn`] calls continue its stream as successive
/// `torch.randn(..., generator=g)` calls do (diffusers' img2img draws the
/// image latents' sample, then the noise, from one generator).
pub struct TorchGenerator {
    mt: Mt19937,
    /// The second Box–Muller value of the scalar path, kept for the next draw.
    cached: Option<f64>,
}

impl TorchGenerator {
    /// A generator seeded like `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> TorchGenerator {
        TorchGenerator {
            mt: Mt19937::new(seed),
            cached: None,
        }
    }

    /// `torch.randn(n, generator=self)`.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let g = &mut self.mt;
        if n >= 16 {
            let mut d: Vec<f32> = (0..n).map(|_| g.uniform_f32()).collect();
            let mut i = 0;
            while i + 16 <= n {
                box_muller_16(&mut d[i..i + 16]);
                i += 16;
            }
            if !n.is_multiple_of(16) {
                let tail = &mut d[n - 16..];
                for v in tail.iter_mut() {
                    *v = g.uniform_f32();
                }
                box_muller_16(tail);
            }
            d
        } else {
            let cached = &mut self.cached;
            (0..n)
                .map(|_| {
                    if let Some(v) = cached.take() {
                        return v as f32;
                    }
                    let u1 = g.uniform_f64();
                    let u2 = g.uniform_f64();
                    let r = (-2.0 * (1.0 - u2).ln()).sqrt();
                    let theta = 2.0 * std::f64::consts::PI * u1;
                    *cached = Some(r * theta.sin());
                    (r * theta.cos()) as f32
                })
                .collect()
        }
    }
}

/// `n` standard normal values as torch's CPU generator seeded with `seed` gives them.
pub fn randn(seed: u64, n: usize) -> Vec<f32> {
    TorchGenerator::new(seed).randn(n)
}
