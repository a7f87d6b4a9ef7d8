//! The denoising loop on the GPU, shared by `generate` and `bench --arch`.
//!
//! One planned graph per run: the latents (an input the graph writes back to
//! itself after every run, see [`Graph::feedback`]) are duplicated for
//! classifier-free guidance, go through the MMDiT, and the sampler op
//! combines the velocities and takes the Euler step. A second, smaller plan
//! runs the skip-layer pass when skip-layer guidance is on; its velocity is
//! copied into the main plan on the GPU. Per step the host writes only the
//! timestep embedding and (dt, skip weight); the latents are read back once,
//! after the last step.

use crate::error::{Error, Result};
use crate::gpu::profile::Profile;
use crate::gpu::Gpu;
use crate::graph::{Graph, Plan, Value};
use crate::models::controlnet::ControlNet;
use crate::models::mmdit::{timestep_embedding, Mmdit, TIMESTEP_DIM};
use crate::ops::{elementwise, layout, sampler};
use crate::sampler::FlowMatchEuler;
use crate::tensor::DType;

/// Skip-layer guidance (SD3.5 medium): an extra conditional pass with some
/// blocks skipped, pushing the prediction away from it.
#[derive(Clone, Debug, PartialEq)]
pub struct SkipLayers {
    /// Blocks skipped in the extra pass.
    pub layers: Vec<usize>,
    /// Weight of (cond − skipped) added to the prediction.
    pub scale: f32,
    /// Applies to steps i with start·steps < i < stop·steps (diffusers' rule).
    pub start: f32,
    /// See `start`.
    pub stop: f32,
}

/// The shapes and guidance of one denoising run.
#[derive(Clone, Debug)]
pub struct DenoiseOptions {
    /// Images.
    pub batch: usize,
    /// Latent height.
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Context tokens (77 + T5's).
    pub tokens: usize,
    /// Classifier-free guidance scale; ≤ 1 runs the conditional pass only.
    pub guidance: f32,
    /// Skip-layer guidance (with classifier-free guidance only).
    pub skip_layers: Option<SkipLayers>,
    /// Inpainting: after each step the known region is reset to the init
    /// image's latents noised to the next sigma (see [`Denoiser::set_inpaint`]).
    pub inpaint: bool,
    /// One entry per ControlNet given to [`Denoiser::with_control`].
    pub control: Vec<ControlSchedule>,
}

/// When and how strongly one ControlNet steers.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlSchedule {
    /// Its residuals' scale.
    pub scale: f32,
    /// Active on steps i with i/n ≥ start and (i+1)/n ≤ stop (diffusers' rule).
    pub start: f32,
    /// See `start`.
    pub stop: f32,
}

impl ControlSchedule {
    /// The scale on step `i` of `n`.
    pub fn scale_at(&self, i: usize, n: usize) -> f32 {
        let (fi, fnn) = (i as f32, n as f32);
        let off = fi / fnn < self.start || (fi + 1.0) / fnn > self.stop;
        if off {
            0.0
        } else {
            self.scale
        }
    }
}

/// A ControlNet's inputs in the step's plan.
struct ControlInputs {
    latents: Value,
    scale: Value,
    hidden: usize,
}

struct SkipPass {
    plan: Plan,
    latents: Value,
    context: Value,
    pooled: Value,
    t_emb: Value,
    out: Value,
}

/// A planned denoising step, replayed for every step of a run.
pub struct Denoiser {
    plan: Plan,
    latents: Value,
    context: Value,
    pooled: Value,
    t_emb: Value,
    step: Value,
    skip_in: Option<Value>,
    inpaint: Option<sampler::Inpaint>,
    control: Vec<ControlInputs>,
    /// The zeros some ControlNets take as pooled text, and their count.
    zero_pooled: Option<(Value, usize)>,
    skip: Option<SkipPass>,
    options: DenoiseOptions,
}

impl Denoiser {
    /// Plans the step for `model` (and the skip-layer pass, if asked for).
    pub fn new(gpu: &Gpu, model: &Mmdit, o: &DenoiseOptions) -> Result<Denoiser> {
        Self::with_control(gpu, model, o, &[])
    }

    /// [`Denoiser::new`] with ControlNets steering the MMDiT (one per entry
    /// of `o.control`; their inputs are set with [`Denoiser::set_control`]).
    pub fn with_control(
        gpu: &Gpu,
        model: &Mmdit,
        o: &DenoiseOptions,
        nets: &[&ControlNet],
    ) -> Result<Denoiser> {
        let c = &model.config;
        let cfg = o.guidance > 1.0;
        if o.skip_layers.is_some() && !cfg {
            return Err(Error::Graph(
                "skip-layer guidance needs classifier-free guidance (a scale above 1)".into(),
            ));
        }
        if nets.len() != o.control.len() {
            return Err(Error::Graph(format!(
                "{} ControlNets for {} control schedules",
                nets.len(),
                o.control.len()
            )));
        }
        if !nets.is_empty() && o.skip_layers.is_some() {
            return Err(Error::Graph(
                "skip-layer guidance together with ControlNets is not supported".into(),
            ));
        }
        let b = o.batch;
        let b2 = if cfg { 2 * b } else { b };
        let latent_shape = [b, c.in_channels, o.height, o.width];
        let mut g = Graph::new(gpu.target());
        let latents = g.input("latents", &latent_shape, DType::F32);
        let context = g.input("context", &[b2, o.tokens, c.context_dim], DType::F32);
        let pooled = g.input("pooled", &[b2, c.pooled_dim], DType::F32);
        let t_emb = g.input("t_emb", &[b2, TIMESTEP_DIM], DType::F32);
        let step = g.input("step", &[3], DType::F32);
        let skip_in = o
            .skip_layers
            .is_some()
            .then(|| g.input("skip_velocity", &latent_shape, DType::F32));
        let inpaint = o.inpaint.then(|| {
            let mut known = vec![2];
            known.extend_from_slice(&latent_shape);
            sampler::Inpaint {
                known: g.input("inpaint_known", &known, DType::F32),
                mask: g.input("inpaint_mask", &[o.height, o.width], DType::F32),
            }
        });
        let x = if cfg {
            g.scoped("cfg", |g| layout::concat(g, latents, latents, 0))?
        } else {
            latents
        };
        let mut control = Vec::new();
        let mut zero_pooled = None;
        let mut residuals: Vec<Value> = Vec::new();
        for (k, net) in nets.iter().enumerate() {
            let hidden = net.config.blocks.hidden;
            let inputs = ControlInputs {
                latents: g.input(
                    &format!("control{k}_latents"),
                    &[b2, c.in_channels, o.height, o.width],
                    DType::F32,
                ),
                scale: g.input(&format!("control{k}_scale"), &[hidden], DType::F32),
                hidden,
            };
            let net_pooled = if net.config.zero_pooled {
                zero_pooled
                    .get_or_insert_with(|| {
                        let v = g.input("control_pooled_zero", &[b2, c.pooled_dim], DType::F32);
                        (v, b2 * c.pooled_dim)
                    })
                    .0
            } else {
                pooled
            };
            let out = g.scoped(&format!("controlnet{k}"), |g| {
                let r = net.forward(g, model, x, inputs.latents, context, net_pooled, t_emb)?;
                r.into_iter()
                    .map(|r| elementwise::mul(g, r, inputs.scale))
                    .collect::<Result<Vec<_>>>()
            })?;
            residuals = if residuals.is_empty() {
                out
            } else if residuals.len() == out.len() {
                g.scoped("controlnet_sum", |g| {
                    residuals
                        .iter()
                        .zip(&out)
                        .map(|(a, b)| elementwise::add(g, *a, *b))
                        .collect::<Result<Vec<_>>>()
                })?
            } else {
                return Err(Error::Graph(format!(
                    "ControlNets of {} and {} blocks cannot be combined",
                    residuals.len(),
                    out.len()
                )));
            };
            control.push(inputs);
        }
        let v = model.forward_controlled(&mut g, x, context, pooled, t_emb, &residuals)?;
        let out = g.scoped("sampler", |g| {
            sampler::guided_euler(
                g,
                latents,
                v,
                step,
                skip_in,
                cfg.then_some(o.guidance),
                inpaint,
            )
        })?;
        g.keep(out);
        g.feedback(out, latents)?;
        let skip = match &o.skip_layers {
            None => None,
            Some(s) => {
                let mut g = Graph::new(gpu.target());
                let latents = g.input("latents", &latent_shape, DType::F32);
                let context = g.input("context", &[b, o.tokens, c.context_dim], DType::F32);
                let pooled = g.input("pooled", &[b, c.pooled_dim], DType::F32);
                let t_emb = g.input("t_emb", &[b, TIMESTEP_DIM], DType::F32);
                let out = g.scoped("skip_layers", |g| {
                    let v =
                        model.forward_skipping(g, latents, context, pooled, t_emb, &s.layers)?;
                    // Copied byte for byte into the main plan's f32 input.
                    layout::cast(g, v, DType::F32)
                })?;
                g.keep(out);
                Some(SkipPass {
                    plan: g.plan(gpu)?,
                    latents,
                    context,
                    pooled,
                    t_emb,
                    out,
                })
            }
        };
        Ok(Denoiser {
            plan: g.plan(gpu)?,
            latents,
            context,
            pooled,
            t_emb,
            step,
            skip_in,
            inpaint,
            control,
            zero_pooled,
            skip,
            options: o.clone(),
        })
    }

    fn cfg(&self) -> bool {
        self.options.guidance > 1.0
    }

    /// Writes the text conditioning (negative prompts first when guided),
    /// which stays the same for every step.
    pub fn set_conditioning(&self, gpu: &Gpu, context: &[f32], pooled: &[f32]) -> Result<()> {
        self.plan.write(gpu, self.context, context)?;
        self.plan.write(gpu, self.pooled, pooled)?;
        if let Some(s) = &self.skip {
            // The skip-layer pass sees the conditional (second) half.
            s.plan
                .write(gpu, s.context, &context[context.len() / 2..])?;
            s.plan.write(gpu, s.pooled, &pooled[pooled.len() / 2..])?;
        }
        Ok(())
    }

    /// Uploads the starting latents [batch, c, h, w].
    pub fn set_latents(&self, gpu: &Gpu, latents: &[f32]) -> Result<()> {
        self.plan.write(gpu, self.latents, latents)
    }

    /// Inpainting's fixed inputs: the init image's latents (one image's
    /// worth, used for every batch entry), the run's noise [batch, c, h, w]
    /// (the one the start was mixed from) and the latent mask [h, w] (1 =
    /// paint, 0 = keep).
    pub fn set_inpaint(
        &self,
        gpu: &Gpu,
        image_latents: &[f32],
        noise: &[f32],
        mask: &[f32],
    ) -> Result<()> {
        let ip = self
            .inpaint
            .ok_or_else(|| Error::Graph("inpainting was not planned for this run".into()))?;
        if image_latents.is_empty() || !noise.len().is_multiple_of(image_latents.len()) {
            return Err(Error::Graph(format!(
                "inpainting: {} noise values for {} image latents",
                noise.len(),
                image_latents.len()
            )));
        }
        let mut known = Vec::with_capacity(2 * noise.len());
        for _ in 0..noise.len() / image_latents.len() {
            known.extend_from_slice(image_latents);
        }
        known.extend_from_slice(noise);
        self.plan.write(gpu, ip.known, &known)?;
        self.plan.write(gpu, ip.mask, mask)
    }

    /// ControlNet `k`'s control latents [batch, c, h, w] (one image's worth,
    /// used for every batch entry and both halves of guidance).
    pub fn set_control(&self, gpu: &Gpu, k: usize, latents: &[f32]) -> Result<()> {
        let ci = self
            .control
            .get(k)
            .ok_or_else(|| Error::Graph(format!("no ControlNet {k} was planned")))?;
        let copies = if self.cfg() { 2 } else { 1 } * self.options.batch;
        let mut all = Vec::with_capacity(copies * latents.len());
        for _ in 0..copies {
            all.extend_from_slice(latents);
        }
        self.plan.write(gpu, ci.latents, &all)?;
        if let Some((z, n)) = self.zero_pooled {
            self.plan.write(gpu, z, &vec![0.0; n])?;
        }
        Ok(())
    }

    /// One step at timestep `t` (sigma · 1000) with Euler increment `dt`
    /// towards `sigma_next`; `skip_weight` runs the skip-layer pass and
    /// weights it (skip-layer guidance on this step). With `profile`, the
    /// main pass is timed per op.
    pub fn step(
        &self,
        gpu: &Gpu,
        t: f32,
        (dt, sigma_next): (f32, f32),
        skip_weight: Option<f32>,
        profile: bool,
    ) -> Result<Option<Profile>> {
        let b2 = if self.cfg() {
            2 * self.options.batch
        } else {
            self.options.batch
        };
        self.plan
            .write(gpu, self.t_emb, &timestep_embedding(&vec![t; b2]))?;
        let w = match (skip_weight, &self.skip) {
            (Some(w), Some(s)) => {
                s.plan.write(
                    gpu,
                    s.t_emb,
                    &timestep_embedding(&vec![t; self.options.batch]),
                )?;
                let skip_in = self
                    .skip_in
                    .ok_or_else(|| Error::Graph("skip pass without its input".into()))?;
                // Three submissions in queue order: the latents in, the pass
                // (several submissions when its weights are streamed), the
                // prediction out.
                let bytes = self.plan.buffer(self.latents)?.size();
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(
                    self.plan.buffer(self.latents)?,
                    0,
                    s.plan.buffer(s.latents)?,
                    0,
                    bytes,
                );
                gpu.guarded("the skip-layer pass", 0, || {
                    gpu.queue.submit([enc.finish()])
                })?;
                s.plan.submit(gpu)?;
                let mut enc = gpu.device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(
                    s.plan.buffer(s.out)?,
                    0,
                    self.plan.buffer(skip_in)?,
                    0,
                    bytes,
                );
                gpu.submit_and_wait("the skip-layer pass", enc.finish())?;
                w
            }
            (Some(_), None) => {
                return Err(Error::Graph(
                    "skip-layer guidance was not planned for this run".into(),
                ))
            }
            (None, _) => 0.0,
        };
        self.plan.write(gpu, self.step, &[dt, w, sigma_next])?;
        if profile {
            Ok(Some(self.plan.run_profiled(gpu)?))
        } else {
            self.plan.run(gpu)?;
            Ok(None)
        }
    }

    /// Runs steps `start..` of `schedule`, calling `each(i, profile)` after
    /// step i (with its per-op profile when `profile(i)` asked for one); an
    /// error from `each` stops the loop and is returned.
    pub fn run(
        &self,
        gpu: &Gpu,
        schedule: &FlowMatchEuler,
        start: usize,
        profile: &dyn Fn(usize) -> bool,
        each: &mut dyn FnMut(usize, Option<Profile>) -> Result<()>,
    ) -> Result<()> {
        let steps = schedule.timesteps.len();
        for i in start..steps {
            for (ci, s) in self.control.iter().zip(&self.options.control) {
                self.plan
                    // Fractions of the steps that run (img2img starts later),
                    // as diffusers' ControlNet pipelines with a strength count.
                    .write(
                        gpu,
                        ci.scale,
                        &vec![s.scale_at(i - start, steps - start); ci.hidden],
                    )?;
            }
            let skip_weight = self.options.skip_layers.as_ref().and_then(|s| {
                // diffusers compares the integer step with fractions of the step count.
                let (fi, n) = (i as f32, steps as f32);
                (fi > n * s.start && fi < n * s.stop).then_some(s.scale)
            });
            let next = schedule.sigmas[i + 1];
            let dt = next - schedule.sigmas[i];
            let p = self.step(
                gpu,
                schedule.timesteps[i],
                (dt, next),
                skip_weight,
                profile(i),
            )?;
            each(i, p)?;
        }
        Ok(())
    }

    /// The current latents (the one readback of a run).
    pub fn latents(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        self.plan.read(gpu, self.latents)
    }

    /// The main step's plan (memory figures, dispatch counts).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}
