//! The rectified-flow sampler: diffusers' FlowMatchEulerDiscreteScheduler
//! (sigma schedule reproduced to the bit), classifier-free guidance, and the
//! initial noise.

/// Sigmas and model timesteps of one sampling run.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowMatchEuler {
    /// `steps + 1` sigmas, the last 0.
    pub sigmas: Vec<f32>,
    /// The transformer's t for each step (sigma · 1000).
    pub timesteps: Vec<f32>,
}

const TRAIN_STEPS: f32 = 1000.0;

fn shifted_f32(s: f32, shift: f32) -> f32 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

impl FlowMatchEuler {
    /// The schedule of `steps` steps with time shift `shift` (3.0 for SD3).
    ///
    /// As diffusers computes it: the scheduler's own sigma range comes from
    /// 1000 training steps shifted in f32; `set_timesteps` spaces t linearly
    /// (f64) between those ends, shifts again (f64), stores f32 and appends 0.
    pub fn new(steps: usize, shift: f64) -> FlowMatchEuler {
        // The first training timestep, 1000/1000.
        let sigma_max = shifted_f32(1.0, shift as f32) as f64;
        let sigma_min = shifted_f32(1.0 / TRAIN_STEPS, shift as f32) as f64;
        let (start, stop) = (sigma_max * 1000.0, sigma_min * 1000.0);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                // numpy.linspace: start + i·step, the last point exactly `stop`.
                let t = if steps > 1 && i == steps - 1 {
                    stop
                } else if steps > 1 {
                    start + i as f64 * ((stop - start) / (steps - 1) as f64)
                } else {
                    start
                };
                let s = t / 1000.0;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas.iter().map(|s| s * TRAIN_STEPS).collect();
        sigmas.push(0.0);
        FlowMatchEuler { sigmas, timesteps }
    }

    /// The tail of the schedule an img2img run of `strength` uses (as
    /// diffusers' `get_timesteps`): the index of its first step.
    pub fn start_for_strength(&self, strength: f64) -> usize {
        // diffusers' get_timesteps, in Python's f64:
        // t_start = int(max(n - min(n · strength, n), 0)).
        let n = self.timesteps.len() as f64;
        (n - (n * strength).min(n)).max(0.0) as usize
    }

    /// One Euler step in place: x ← x + (sigma_next − sigma) · v (the CPU
    /// reference of [`crate::ops::sampler`]).
    pub fn step(&self, i: usize, x: &mut [f32], v: &[f32]) {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        for (a, b) in x.iter_mut().zip(v) {
            *a += dt * b;
        }
    }
}

/// Classifier-free guidance: uncond + scale · (cond − uncond) (the CPU
/// reference of [`crate::ops::sampler`], which does it on the GPU).
pub fn guide(uncond: &[f32], cond: &[f32], scale: f32) -> Vec<f32> {
    uncond
        .iter()
        .zip(cond)
        .map(|(u, c)| u + scale * (c - u))
        .collect()
}

/// Which random numbers make the initial noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Rng {
    /// This engine's own generator: the same noise on every machine and device.
    #[default]
    Native,
    /// `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` on CPU,
    /// so a diffusers image can be reproduced from its seed.
    Torch,
}

/// Standard normal noise of `n` values from `seed`.
pub fn noise(rng: Rng, seed: u64, n: usize) -> Vec<f32> {
    NoiseStream::new(rng, seed).next(n)
}

/// Successive draws from one seeded generator (img2img takes the image
/// latents' sample, then the noise, from one stream, as diffusers does).
pub enum NoiseStream {
    /// This engine's generator: a SplitMix64 counter.
    Native(u64),
    /// torch's CPU generator.
    Torch(Box<crate::torch_rng::TorchGenerator>),
}

impl NoiseStream {
    /// The stream of `rng` seeded with `seed`.
    pub fn new(rng: Rng, seed: u64) -> NoiseStream {
        match rng {
            Rng::Native => NoiseStream::Native(seed ^ 0x5DEE_CE66_D1CE_4E5B),
            Rng::Torch => NoiseStream::Torch(Box::new(crate::torch_rng::TorchGenerator::new(seed))),
        }
    }

    /// The next `n` standard normal values.
    pub fn next(&mut self, n: usize) -> Vec<f32> {
        match self {
            NoiseStream::Native(state) => native_normal(state, n),
            NoiseStream::Torch(g) => g.randn(n),
        }
    }
}

fn native_normal(state: &mut u64, n: usize) -> Vec<f32> {
    let mut next = || {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box–Muller on two 53-bit uniforms in (0, 1].
        let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}
