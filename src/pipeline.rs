//! Text to image: load once, generate many.
//!
//! ```no_run
//! use sd3_wgpu::pipeline::{GenerateRequest, Pipeline, PipelineOptions};
//! let pipe = Pipeline::load("sd3.5_medium".as_ref(), PipelineOptions::default())?;
//! let out = pipe.generate(&GenerateRequest::new("a red fox in the snow"), &mut |_, _| {})?;
//! # Ok::<(), sd3_wgpu::Error>(())
//! ```

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::decode::decode_auto;
use crate::error::{Error, Result};
use crate::gpu::profile::Profile;
use crate::gpu::{Gpu, GpuOptions};
use crate::image_io::{load_image, to_rgb8};
use crate::models::mmdit::{Mmdit, MmditRun};
use crate::models::vae::{Vae, VaeRun};
use crate::sampler::{guide, noise, FlowMatchEuler, Rng};
use crate::tensor::DType;
use crate::text::{encode_prompts, TextPaths, Truncation};
use crate::weights::mmdit::{MmditConfig, MmditSource};
use crate::weights::text::TextSource;
use crate::weights::vae::VaeSource;

/// How to load a model.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// CLIP-L weights overriding the model's.
    pub clip_l: Option<PathBuf>,
    /// CLIP-G weights overriding the model's.
    pub clip_g: Option<PathBuf>,
    /// T5 weights overriding the model's.
    pub t5: Option<PathBuf>,
    /// Run without T5 even when the model has it.
    pub no_t5: bool,
    /// Folder with `tokenizer/`, `tokenizer_2/`, `tokenizer_3/` (single files carry none).
    pub tokenizers: Option<PathBuf>,
    /// Storage of the models' matrices.
    pub dtype: DType,
    /// Keep the MMDiT and VAE on the GPU between generations.
    pub keep_loaded: bool,
    /// VAE tile size in latent pixels (automatic when `None`).
    pub vae_tile: Option<usize>,
    /// VAE tile overlap in latent pixels.
    pub tile_overlap: usize,
    /// Tile the VAE when a full decode needs more bytes than this.
    pub vae_budget: Option<u64>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            gpu: GpuOptions::from_env(),
            clip_l: None,
            clip_g: None,
            t5: None,
            no_t5: false,
            tokenizers: None,
            dtype: DType::F16,
            keep_loaded: false,
            vae_tile: None,
            tile_overlap: 8,
            vae_budget: None,
        }
    }
}

/// One generation.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (used when CFG > 1).
    pub negative_prompt: String,
    /// Denoising steps (default per model).
    pub steps: Option<usize>,
    /// Guidance scale (default per model); ≤ 1 skips the unconditional pass.
    pub cfg: Option<f32>,
    /// Time shift (default from the scheduler config, else 3.0).
    pub shift: Option<f64>,
    /// Noise seed.
    pub seed: u64,
    /// Noise generator.
    pub rng: Rng,
    /// Image width (default 1024, or the init image's).
    pub width: Option<usize>,
    /// Image height.
    pub height: Option<usize>,
    /// T5 tokens.
    pub max_t5_tokens: usize,
    /// Images per prompt.
    pub batch: usize,
    /// img2img source image.
    pub init_image: Option<PathBuf>,
    /// img2img strength (1 = all noise).
    pub strength: f32,
    /// Initial noise [batch, 16, h/8, w/8] instead of the seeded noise.
    pub init_latents: Option<Vec<f32>>,
    /// Time the first MMDiT step per op.
    pub profile: bool,
    /// Skip-layer guidance: blocks skipped in the extra pass (off when empty,
    /// as in diffusers; SD3.5 medium's authors suggest 7, 8, 9).
    pub slg_layers: Vec<usize>,
    /// Skip-layer guidance scale.
    pub slg_scale: f32,
    /// Skip-layer guidance applies to steps i with start·steps < i < stop·steps.
    pub slg_start: f32,
    /// See `slg_start`.
    pub slg_stop: f32,
}

impl GenerateRequest {
    /// A request for `prompt` with every other setting at its default.
    pub fn new(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            steps: None,
            cfg: None,
            shift: None,
            seed: 0,
            rng: Rng::Native,
            width: None,
            height: None,
            max_t5_tokens: 256,
            batch: 1,
            init_image: None,
            strength: 0.6,
            init_latents: None,
            profile: false,
            slg_layers: Vec::new(),
            slg_scale: 2.8,
            slg_start: 0.01,
            slg_stop: 0.2,
        }
    }
}

/// The settings a generation actually used.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Steps.
    pub steps: usize,
    /// Guidance scale.
    pub cfg: f32,
    /// Time shift.
    pub shift: f64,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
}

/// What a generation produced.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// RGB8 images (HWC), one per batch entry.
    pub images: Vec<Vec<u8>>,
    /// Final latents [batch, 16, h, w] before the VAE's scale and shift.
    pub latents: Vec<f32>,
    /// Their shape.
    pub latent_shape: [usize; 4],
    /// Settings used.
    pub settings: Settings,
    /// Prompts cut short by an encoder's limit.
    pub truncated: Vec<Truncation>,
    /// Per-op timings of the first MMDiT step (when asked for).
    pub profile: Option<Profile>,
    /// Peak GPU memory held in storage buffers during the generation.
    pub peak_memory: u64,
}

#[derive(Default)]
struct Loaded {
    mmdit: Option<Mmdit>,
    vae: Option<Vae>,
}

/// A loaded SD3 / SD3.5 model.
pub struct Pipeline {
    /// The device.
    pub gpu: Gpu,
    mmdit: MmditSource,
    vae: VaeSource,
    text: TextPaths,
    default_shift: f64,
    options: PipelineOptions,
    loaded: Mutex<Loaded>,
}

/// Steps and guidance the model's authors recommend.
pub fn default_steps_cfg(c: &MmditConfig) -> (usize, f32) {
    match c.variant_name().as_str() {
        "SD3.5 medium" => (40, 4.5),
        "SD3.5 large" => (28, 3.5),
        _ => (28, 7.0),
    }
}

impl Pipeline {
    /// Opens a diffusers folder or a single file and prepares the device.
    pub fn load(path: &Path, options: PipelineOptions) -> Result<Pipeline> {
        if !path.exists() {
            return Err(Error::Io(format!(
                "{}: no such model file or folder",
                path.display()
            )));
        }
        let mmdit = MmditSource::open(path)?;
        let vae = VaeSource::open(path)?;
        let text = text_paths(path, &options)?;
        let shift = std::fs::read_to_string(path.join("scheduler/scheduler_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|j| j.get("shift")?.as_f64())
            .unwrap_or(3.0);
        let gpu = Gpu::new(&options.gpu)?;
        Ok(Pipeline {
            gpu,
            mmdit,
            vae,
            text,
            default_shift: shift,
            options,
            loaded: Mutex::new(Loaded::default()),
        })
    }

    /// The detected transformer.
    pub fn config(&self) -> &MmditConfig {
        &self.mmdit.config
    }

    /// Where the text encoders come from.
    pub fn text_paths(&self) -> &TextPaths {
        &self.text
    }

    fn resolve(&self, req: &GenerateRequest) -> Result<(Settings, usize)> {
        let (steps, cfg) = default_steps_cfg(&self.mmdit.config);
        let scale =
            (1usize << (self.vae.config.block_out_channels.len() - 1)) * self.mmdit.config.patch;
        let s = Settings {
            steps: req.steps.unwrap_or(steps),
            cfg: req.cfg.unwrap_or(cfg),
            shift: req.shift.unwrap_or(self.default_shift),
            width: req.width.unwrap_or(1024),
            height: req.height.unwrap_or(1024),
        };
        if s.steps == 0 {
            return Err(Error::Graph("--steps must be at least 1".into()));
        }
        if req.batch == 0 {
            return Err(Error::Graph("--batch must be at least 1".into()));
        }
        if s.width == 0
            || s.height == 0
            || !s.width.is_multiple_of(scale)
            || !s.height.is_multiple_of(scale)
        {
            return Err(Error::Graph(format!(
                "width and height must be positive multiples of {scale}, got {}×{}",
                s.width, s.height
            )));
        }
        if !(0.0..=1.0).contains(&req.strength) {
            return Err(Error::Graph(format!(
                "--strength must be in [0, 1], got {}",
                req.strength
            )));
        }
        Ok((s, scale / self.mmdit.config.patch))
    }

    /// Generates `req.batch` images; `progress(step, total)` is called after each step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let gpu = &self.gpu;
        gpu.memory.reset_peak();
        let init_image = match &req.init_image {
            Some(p) => Some(load_image(p, 16)?),
            None => None,
        };
        let mut req = req.clone();
        if let Some((_, h, w)) = &init_image {
            req.width = req.width.or(Some(*w));
            req.height = req.height.or(Some(*h));
        }
        let (settings, vae_scale) = self.resolve(&req)?;
        if let Some((_, h, w)) = &init_image {
            if (*w, *h) != (settings.width, settings.height) {
                return Err(Error::Graph(format!(
                    "the init image is {w}×{h} after cropping to multiples of 16, but {}×{} was asked for",
                    settings.width, settings.height
                )));
            }
        }
        let c = &self.mmdit.config;
        let (b, lh, lw) = (
            req.batch,
            settings.height / vae_scale,
            settings.width / vae_scale,
        );
        let n = b * c.in_channels * lh * lw;
        let mut latents = match &req.init_latents {
            Some(l) if l.len() != n => {
                return Err(Error::Graph(format!(
                    "init latents hold {} values; [{b}, {}, {lh}, {lw}] needs {n}",
                    l.len(),
                    c.in_channels
                )))
            }
            Some(l) => l.clone(),
            None => noise(req.rng, req.seed, n),
        };
        let do_cfg = settings.cfg > 1.0;
        let mut prompts = Vec::new();
        if do_cfg {
            prompts.extend(std::iter::repeat_n(req.negative_prompt.clone(), b));
        }
        prompts.extend(std::iter::repeat_n(req.prompt.clone(), b));
        let emb = encode_prompts(
            gpu,
            &self.text,
            &prompts,
            req.max_t5_tokens,
            c.context_dim,
            self.options.dtype,
        )?;
        let schedule = FlowMatchEuler::new(settings.steps, settings.shift);
        let mut loaded = self
            .loaded
            .lock()
            .map_err(|_| Error::Graph("pipeline lock poisoned".into()))?;
        let mut start = 0;
        if let Some((img, h, w)) = &init_image {
            let vae = self.vae(&mut loaded)?;
            let enc = VaeRun::encoder(gpu, vae, 1, *h, *w)?;
            let image_latents = enc.run(gpu, img)?;
            start = schedule.start_for_strength(req.strength);
            if start >= settings.steps {
                return Err(Error::Graph(format!(
                    "--strength {} leaves no denoising step",
                    req.strength
                )));
            }
            let sigma = schedule.sigmas[start];
            let per = image_latents.len();
            for (i, v) in latents.iter_mut().enumerate() {
                *v = sigma * *v + (1.0 - sigma) * image_latents[i % per];
            }
        }
        if loaded.mmdit.is_none() {
            loaded.mmdit = Some(Mmdit::load(gpu, &self.mmdit, self.options.dtype)?);
        }
        let mut profile = None;
        {
            let model = loaded.mmdit.as_ref().expect("loaded above");
            let batch2 = if do_cfg { 2 * b } else { b };
            let run = MmditRun::new(gpu, model, batch2, lh, lw, emb.tokens)?;
            run.set_conditioning(gpu, &emb.context, &emb.pooled)?;
            // Skip-layer guidance: an extra conditional pass with blocks skipped.
            let slg = if do_cfg && !req.slg_layers.is_empty() {
                let r = MmditRun::new_skipping(gpu, model, b, lh, lw, emb.tokens, &req.slg_layers)?;
                let half = emb.context.len() / 2;
                let phalf = emb.pooled.len() / 2;
                r.set_conditioning(gpu, &emb.context[half..], &emb.pooled[phalf..])?;
                Some(r)
            } else {
                None
            };
            let total = settings.steps - start;
            for i in start..settings.steps {
                let input: Vec<f32> = if do_cfg {
                    [latents.as_slice(), latents.as_slice()].concat()
                } else {
                    latents.clone()
                };
                let t = vec![schedule.timesteps[i]; batch2];
                let v = if req.profile && profile.is_none() {
                    let (v, p) = run.step_profiled(gpu, &input, &t)?;
                    profile = Some(p);
                    v
                } else {
                    run.step(gpu, &input, &t)?
                };
                let mut pred = if do_cfg {
                    guide(&v[..n], &v[n..], settings.cfg)
                } else {
                    v.clone()
                };
                if let Some(r) = &slg {
                    // diffusers compares the integer step with fractions of the step count.
                    let (fi, steps_f) = (i as f32, settings.steps as f32);
                    if fi > steps_f * req.slg_start && fi < steps_f * req.slg_stop {
                        let skipped = r.step(gpu, &latents, &t[..b])?;
                        for ((p, c), s) in pred.iter_mut().zip(&v[n..]).zip(&skipped) {
                            *p += (c - s) * req.slg_scale;
                        }
                    }
                }
                schedule.step(i, &mut latents, &pred);
                progress(i + 1 - start, total);
            }
        }
        if !self.options.keep_loaded {
            loaded.mmdit = None;
        }
        let shape = [b, c.in_channels, lh, lw];
        let image = {
            let vae = self.vae(&mut loaded)?;
            decode_auto(
                gpu,
                vae,
                shape,
                &latents,
                self.options.vae_tile,
                self.options.tile_overlap,
                self.options.vae_budget,
            )?
        };
        if !self.options.keep_loaded {
            loaded.vae = None;
        }
        let images = to_rgb8(&image, [b, 3, settings.height, settings.width])?;
        Ok(GenerateOutput {
            images,
            latents,
            latent_shape: shape,
            settings,
            truncated: emb.truncated,
            profile,
            peak_memory: gpu.memory.peak(),
        })
    }

    fn vae<'a>(&self, loaded: &'a mut Loaded) -> Result<&'a Vae> {
        if loaded.vae.is_none() {
            loaded.vae = Some(Vae::load(&self.gpu, &self.vae, self.options.dtype)?);
        }
        Ok(loaded.vae.as_ref().expect("loaded above"))
    }
}

/// Text encoders and tokenizers for a model path and the options' overrides.
fn text_paths(path: &Path, o: &PipelineOptions) -> Result<TextPaths> {
    let is_folder = path.is_dir();
    let tok_root = o
        .tokenizers
        .clone()
        .or_else(|| is_folder.then(|| path.to_path_buf()));
    let tok = |sub: &str| -> Result<PathBuf> {
        let root = tok_root.as_ref().ok_or_else(|| {
            Error::Io(format!(
                "{}: single-file checkpoints carry no tokenizers; pass --tokenizers with a folder holding \
                 tokenizer/, tokenizer_2/ and tokenizer_3/ (a diffusers SD3 folder)",
                path.display()
            ))
        })?;
        let p = root.join(sub);
        if p.is_dir() {
            Ok(p)
        } else {
            Err(Error::Io(format!(
                "{}: missing tokenizer folder",
                p.display()
            )))
        }
    };
    let weights =
        |over: &Option<PathBuf>, sub: &str, name: &str, flag: &str| -> Result<Option<PathBuf>> {
            if let Some(p) = over {
                if !p.exists() {
                    return Err(Error::Io(format!("{}: no such file ({flag})", p.display())));
                }
                return Ok(Some(p.clone()));
            }
            if is_folder {
                let d = path.join(sub);
                return Ok(d.is_dir().then_some(d));
            }
            Ok(TextSource::in_file(path, name).then(|| path.to_path_buf()))
        };
    let clip_l = weights(&o.clip_l, "text_encoder", "clip_l", "--clip-l")?.ok_or_else(|| {
        Error::Io(format!(
            "{}: no CLIP-L text encoder; pass --clip-l clip_l.safetensors",
            path.display()
        ))
    })?;
    let clip_g = weights(&o.clip_g, "text_encoder_2", "clip_g", "--clip-g")?.ok_or_else(|| {
        Error::Io(format!(
            "{}: no CLIP-G text encoder; pass --clip-g clip_g.safetensors",
            path.display()
        ))
    })?;
    let t5 = if o.no_t5 {
        None
    } else {
        weights(&o.t5, "text_encoder_3", "t5xxl", "--t5")?
    };
    Ok(TextPaths {
        tokenizer_l: tok("tokenizer")?,
        tokenizer_g: tok("tokenizer_2")?,
        tokenizer_t5: if t5.is_some() {
            Some(tok("tokenizer_3")?)
        } else {
            None
        },
        clip_l,
        clip_g,
        t5,
    })
}
