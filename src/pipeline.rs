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

use crate::decode::{decode_auto, MAX_TILE, MIN_TILE};
use crate::denoise::{ControlSchedule, DenoiseOptions, Denoiser, SkipLayers};
use crate::error::{Error, Result};
use crate::gpu::profile::Profile;
use crate::gpu::{Gpu, GpuOptions};
use crate::graph::Graph;
use crate::image_io::{image_size, load_image, load_mask, to_rgb8, ImageSource};
use crate::lora::{Architectures, Component, LoraSpec, LoraSummary, Loras};
use crate::models::clip::ClipConfig;
use crate::models::controlnet::ControlNet;
use crate::models::mmdit::{Mmdit, TIMESTEP_DIM};
use crate::models::t5::{T5Config, T5};
use crate::models::vae::{latents_from_moments, Vae, VaeRun};
use crate::ops::elementwise::Act;
use crate::sampler::{FlowMatchEuler, NoiseStream, Rng};
use crate::tensor::DType;
use crate::text::{
    clip_graph, encode_prompts_kept, open_encoder, t5_graph, TextModels, TextPaths, Truncation,
};
use crate::tokenize::CLIP_TOKENS;
use crate::weights::controlnet::{ControlNetConfig, ControlNetSource, CONTROL_TYPE_CANNY};
use crate::weights::mmdit::{MmditConfig, MmditSource};
use crate::weights::text::TextSource;
use crate::weights::vae::VaeConfig;
use crate::weights::vae::{VaeSource, LATENT_CHANNELS};
use crate::weights::{config_f64, ShapeOnlyWeights, WeightsError};

/// Most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;
/// Most images one request may generate.
pub const MAX_BATCH: usize = 64;
/// Most T5 tokens (diffusers' limit for SD3's `max_sequence_length`).
pub const MAX_T5_TOKENS: usize = 512;
/// Largest guidance scale (CFG or skip-layer) accepted.
pub const MAX_GUIDANCE: f32 = 100.0;
/// Largest time shift accepted.
pub const MAX_SHIFT: f64 = 100.0;
/// Largest |ControlNet scale| accepted.
pub const MAX_CONTROL_SCALE: f64 = 100.0;
/// Largest mask blur radius accepted (pixels).
pub const MAX_MASK_BLUR: f64 = 256.0;
/// Longest prompt accepted, in bytes (the encoders keep 77 / 512 tokens).
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Defaults of a request and of loading (the CLI takes its defaults from here).
pub mod defaults {
    /// T5 tokens (diffusers' `max_sequence_length`).
    pub const MAX_T5_TOKENS: usize = 256;
    /// img2img strength.
    pub const STRENGTH: f64 = 0.6;
    /// Skip-layer guidance scale (diffusers' SD3 pipeline).
    pub const SLG_SCALE: f32 = 2.8;
    /// Skip-layer guidance start, as a fraction of the steps.
    pub const SLG_START: f32 = 0.01;
    /// Skip-layer guidance stop, as a fraction of the steps.
    pub const SLG_STOP: f32 = 0.2;
    /// VAE tile overlap in latent pixels.
    pub const TILE_OVERLAP: usize = 8;
    /// Image side when neither the request nor an init image gives one.
    pub const SIDE: usize = 1024;
}

/// Latents with their shape, e.g. the initial noise of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Latents {
    /// [batch, channels, height/8, width/8].
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

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
    /// Keep the text encoders on the GPU between generations too.
    pub keep_text: bool,
    /// GPU memory budget in bytes: MMDiT blocks that do not fit are
    /// streamed from host memory each step (see [`crate::stream`]).
    pub vram_budget: Option<u64>,
    /// VAE tile size in latent pixels (automatic when `None`).
    pub vae_tile: Option<usize>,
    /// VAE tile overlap in latent pixels.
    pub tile_overlap: usize,
    /// Tile the VAE when a full decode needs more bytes than this.
    pub vae_budget: Option<u64>,
    /// A distilled turbo model (few steps, no CFG): `None` recognises SD3.5
    /// large turbo from the model's name (see [`turbo_name_hint`]).
    pub turbo: Option<bool>,
    /// LoRAs merged into the weights at load, in order.
    pub loras: Vec<LoraSpec>,
    /// ControlNets (diffusers folders or safetensors files); each request
    /// gives one [`Control`] per ControlNet, in this order.
    pub controlnets: Vec<PathBuf>,
    /// The VAE from elsewhere (a file in Stability's or diffusers' names, or
    /// a diffusers `vae/` folder): a GGUF transformer holds none.
    pub vae: Option<PathBuf>,
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
            keep_text: false,
            vram_budget: None,
            vae_tile: None,
            tile_overlap: defaults::TILE_OVERLAP,
            vae_budget: None,
            turbo: None,
            loras: Vec::new(),
            controlnets: Vec::new(),
            vae: None,
        }
    }
}

/// Which latents of an img2img init image the noise is mixed into.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitMode {
    /// A sample of the encoder's latent distribution, drawn from the seed's
    /// generator before the noise (diffusers' StableDiffusion3Img2ImgPipeline;
    /// with `--rng torch` the same latents from the same seed).
    #[default]
    Sample,
    /// The distribution's mean: the image's latents without the encoder's
    /// own randomness.
    Mean,
}

/// What one ControlNet is given in a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    /// The control image (edges, depth, pose, …), the output's size.
    pub image: PathBuf,
    /// Scale of its residuals.
    pub scale: f32,
    /// First fraction of the steps it acts on.
    pub start: f32,
    /// Last fraction of the steps it acts on.
    pub stop: f32,
}

impl Control {
    /// `image` at scale 1 over all steps.
    pub fn new(image: &Path) -> Control {
        Control {
            image: image.to_path_buf(),
            scale: 1.0,
            start: 0.0,
            stop: 1.0,
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
    pub init_image: Option<ImageSource>,
    /// img2img strength (1 = all noise).
    pub strength: f64,
    /// img2img: which latents of the init image the noise is mixed into.
    pub init_mode: InitMode,
    /// Inpainting mask (white = repaint), the init image's size.
    pub mask: Option<ImageSource>,
    /// Pillow Gaussian blur radius applied to the mask before it is binarised.
    pub mask_blur: f32,
    /// Initial noise [batch, 16, h/8, w/8] instead of the seeded noise.
    pub init_latents: Option<Latents>,
    /// One per ControlNet of the pipeline, in the same order.
    pub controls: Vec<Control>,
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
            max_t5_tokens: defaults::MAX_T5_TOKENS,
            batch: 1,
            init_image: None,
            strength: defaults::STRENGTH,
            init_mode: InitMode::Sample,
            mask: None,
            mask_blur: 0.0,
            init_latents: None,
            controls: Vec::new(),
            profile: false,
            slg_layers: Vec::new(),
            slg_scale: defaults::SLG_SCALE,
            slg_start: defaults::SLG_START,
            slg_stop: defaults::SLG_STOP,
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
    /// The MMDiT blocks streamed from host memory under the memory budget.
    pub streamed_blocks: Vec<usize>,
}

/// A stage of a generation, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The text encoders (loaded, run, freed).
    Text,
    /// The VAE encoder on the init or control images.
    Encode,
    /// Uploading the MMDiT (and ControlNets) unless they are kept loaded.
    Load,
    /// The denoising loop.
    Denoise,
    /// The VAE decoder.
    Decode,
}

impl Stage {
    /// A short lower-case name: `text`, `encode`, `load`, `denoise`, `decode`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Text => "text",
            Stage::Encode => "encode",
            Stage::Load => "load",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
        }
    }
}

/// What [`Pipeline::generate_with`] reports as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A stage starts (the previous one has ended).
    Stage(Stage),
    /// Denoising step `step` of `total` is done (1-based); `profiled` when
    /// it was the step timed per op.
    Step {
        /// Steps done.
        step: usize,
        /// Steps this generation runs.
        total: usize,
        /// This step ran with per-op timestamps.
        profiled: bool,
    },
}

#[derive(Default)]
struct Loaded {
    text: TextModels,
    mmdit: Option<Mmdit>,
    vae: Option<Vae>,
    controlnets: Vec<ControlNet>,
}

/// A loaded SD3 / SD3.5 model.
pub struct Pipeline {
    /// The device.
    pub gpu: Gpu,
    mmdit: MmditSource,
    vae: VaeSource,
    text: TextPaths,
    encoders: EncoderConfigs,
    default_shift: f64,
    turbo: bool,
    loras: Loras,
    controlnets: Vec<ControlNetSource>,
    options: PipelineOptions,
    loaded: Mutex<Loaded>,
}

/// The text encoders' architectures, read from their files at load.
struct EncoderConfigs {
    clip_l: ClipConfig,
    clip_g: ClipConfig,
    t5: Option<T5Config>,
}

/// A request checked against the model and the adapter, with its inputs read.
struct Prepared {
    settings: Settings,
    /// Latent height and width.
    latent: (usize, usize),
    /// img2img source [1, 3, h, w].
    init_image: Option<Vec<f32>>,
    /// Inpainting mask on the latent grid [h, w] (1 = paint).
    mask: Option<Vec<f32>>,
    /// Control images [1, 3, h, w], one per ControlNet.
    controls: Vec<Vec<f32>>,
}

/// Steps and guidance the model's authors recommend; a turbo model (SD3.5
/// large turbo: Stability's card says 4 steps, guidance 0) runs 4 steps
/// without classifier-free guidance.
pub fn default_steps_cfg(c: &MmditConfig, turbo: bool) -> (usize, f32) {
    if turbo {
        return (4, 1.0);
    }
    match c.variant_name().as_str() {
        "SD3.5 medium" => (40, 4.5),
        "SD3.5 large" => (28, 3.5),
        _ => (28, 7.0),
    }
}

/// Whether a model's name says it is a turbo model: the file's or folder's
/// name, or for a Hugging Face cache snapshot (`models--org--name/snapshots/
/// <hash>`) the repository's, contains "turbo" (any case). SD3.5 large turbo
/// has SD3.5 large's architecture and configs to the byte, so the name is
/// all there is to go by.
pub fn turbo_name_hint(path: &Path) -> bool {
    // "." or "model/.." name nothing: look at the resolved path.
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let path = resolved.as_path();
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let mut names = vec![name(path)];
    let parent = path.parent();
    if let Some(repo) = parent
        .filter(|p| name(p) == "snapshots")
        .and_then(|p| p.parent())
    {
        names.push(name(repo));
    }
    names.iter().any(|n| n.contains("turbo"))
}

fn invalid(msg: String) -> Error {
    Error::Graph(msg)
}

/// `value` must be finite and within `lo..=hi`.
fn check_range(flag: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{flag} must be a number in [{lo}, {hi}], got {value}"
        )))
    }
}

impl Pipeline {
    /// Opens a diffusers folder or a single file and prepares the device.
    /// Only headers and configs are read here (every component's architecture
    /// is checked, and that the components fit one another); weights are
    /// uploaded when a generation needs them.
    pub fn load(path: &Path, options: PipelineOptions) -> Result<Pipeline> {
        if !path.exists() {
            return Err(Error::Io(format!(
                "{}: no such model file or folder",
                path.display()
            )));
        }
        let mmdit = MmditSource::open(path)?;
        let vae = VaeSource::open(options.vae.as_deref().unwrap_or(path))?;
        if vae.config.latent_channels != mmdit.config.in_channels {
            return Err(Error::Weights(WeightsError::Unsupported(format!(
                "{}: the VAE makes {} latent channels but the transformer takes {}",
                path.display(),
                vae.config.latent_channels,
                mmdit.config.in_channels
            ))));
        }
        let text = text_paths(path, &options)?;
        let encoders = encoder_configs(&text, &mmdit.config)?;
        let scheduler = path.join("scheduler/scheduler_config.json");
        let shift = if path.is_dir() && scheduler.exists() {
            let json = crate::files::read_json(&scheduler)?;
            config_f64(
                Some(&json),
                &scheduler,
                "shift",
                f64::MIN_POSITIVE,
                MAX_SHIFT,
            )?
            .unwrap_or(3.0)
        } else {
            3.0
        };
        // --dtype f16: f16 matrices and, where the adapter has SHADER_F16, f16
        // activations; f32 keeps the exact path.
        let gpu = Gpu::new(&GpuOptions {
            f16_activations: options.dtype == DType::F16,
            ..options.gpu.clone()
        })?;
        let loras = Loras::load(
            &gpu,
            &options.loras,
            &Architectures {
                mmdit: &mmdit.config,
                clip_l: &encoders.clip_l,
                clip_g: &encoders.clip_g,
                t5: encoders.t5.as_ref(),
            },
            options.dtype,
        )?;
        let mut controlnets = Vec::new();
        for p in &options.controlnets {
            let src = ControlNetSource::open(p)?;
            ControlNet::check_fits(&src.config, &mmdit.config)
                .map_err(|e| Error::Graph(format!("{}: {e}", p.display())))?;
            if let Some(first) = controlnets.first() {
                let (a, b): (&ControlNetSource, &ControlNetSource) = (first, &src);
                if a.config.blocks.depth != b.config.blocks.depth {
                    return Err(Error::Graph(format!(
                        "{} has {} blocks and {} has {}: ControlNets used together need the same number",
                        a.path.display(),
                        a.config.blocks.depth,
                        b.path.display(),
                        b.config.blocks.depth
                    )));
                }
            }
            controlnets.push(src);
        }
        let turbo = options.turbo.unwrap_or_else(|| {
            // SD3.5 large's kind of MMDiT: qk-norm, no dual attention.
            let c = &mmdit.config;
            turbo_name_hint(path) && c.qk_norm && c.dual_attention_layers.is_empty()
        });
        Ok(Pipeline {
            gpu,
            mmdit,
            vae,
            text,
            encoders,
            default_shift: shift,
            turbo,
            loras,
            controlnets,
            options,
            loaded: Mutex::new(Loaded::default()),
        })
    }

    /// Whether the MMDiT, ControlNets and VAE stay loaded between
    /// generations: asked for, and no memory budget (under a budget each
    /// stage gets the whole budget in turn, which kept models would take).
    fn keeps_models(&self) -> bool {
        self.options.keep_loaded && self.options.vram_budget.is_none()
    }

    /// Whether the text encoders stay loaded (see [`Pipeline::keeps_models`]).
    fn keeps_text(&self) -> bool {
        self.options.keep_text && self.options.vram_budget.is_none()
    }

    /// The model path the pipeline was loaded from.
    pub fn model_path(&self) -> &Path {
        &self.mmdit.path
    }

    /// The detected transformer.
    pub fn config(&self) -> &MmditConfig {
        &self.mmdit.config
    }

    /// The LoRAs merged into the weights (files, strengths, hashes).
    pub fn loras(&self) -> &[LoraSummary] {
        &self.loras.summary
    }

    /// Whether the model runs with turbo defaults (4 steps, no CFG).
    pub fn is_turbo(&self) -> bool {
        self.turbo
    }

    /// Where the text encoders come from.
    pub fn text_paths(&self) -> &TextPaths {
        &self.text
    }

    /// Every file a generation reads: weights, configs and tokenizers (so a
    /// caller can make sure no output overwrites one).
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.mmdit.ck.files.clone();
        out.extend(self.vae.ck.files.iter().cloned());
        let t = &self.text;
        let mut roots = vec![t.clip_l.clone(), t.clip_g.clone()];
        roots.extend(t.tokenizer_l.iter().cloned());
        roots.extend(t.tokenizer_g.iter().cloned());
        roots.extend(t.t5.iter().cloned());
        roots.extend(t.tokenizer_t5.iter().cloned());
        for r in &roots {
            out.extend(crate::files::files_under(r, 1));
        }
        if self.mmdit.path.is_dir() {
            out.extend(crate::files::files_under(&self.mmdit.path, 2));
        }
        out.extend(self.loras.summary.iter().map(|l| l.path.clone()));
        for c in &self.controlnets {
            out.extend(c.ck.files.iter().cloned());
        }
        out.sort();
        out.dedup();
        out
    }

    /// Checks a request against the model and the adapter without running
    /// anything heavy: every value in range, the size against the model's
    /// position grid and every graph against the adapter's limits, the init
    /// image and latents readable and of the right shape. `generate` does the
    /// same first; call this to fail before other work of your own.
    pub fn check(&self, req: &GenerateRequest) -> Result<Settings> {
        Ok(self.prepare(req)?.settings)
    }

    fn prepare(&self, req: &GenerateRequest) -> Result<Prepared> {
        let c = &self.mmdit.config;
        for (flag, p) in [
            ("--prompt", &req.prompt),
            ("--negative-prompt", &req.negative_prompt),
        ] {
            if p.len() > MAX_PROMPT_BYTES {
                return Err(invalid(format!(
                    "{flag} is {} bytes long; at most {MAX_PROMPT_BYTES} are accepted",
                    p.len()
                )));
            }
        }
        let (steps, cfg) = default_steps_cfg(c, self.turbo);
        let steps = req.steps.unwrap_or(steps);
        if !(1..=MAX_STEPS).contains(&steps) {
            return Err(invalid(format!(
                "--steps must be in 1..={MAX_STEPS}, got {steps}"
            )));
        }
        if !(1..=MAX_BATCH).contains(&req.batch) {
            return Err(invalid(format!(
                "--batch must be in 1..={MAX_BATCH}, got {}",
                req.batch
            )));
        }
        if !(1..=MAX_T5_TOKENS).contains(&req.max_t5_tokens) {
            return Err(invalid(format!(
                "--max-t5-tokens must be in 1..={MAX_T5_TOKENS}, got {}",
                req.max_t5_tokens
            )));
        }
        let cfg = req.cfg.unwrap_or(cfg);
        check_range("--cfg", cfg as f64, 0.0, MAX_GUIDANCE as f64)?;
        let shift = req.shift.unwrap_or(self.default_shift);
        if !(shift.is_finite() && shift > 0.0 && shift <= MAX_SHIFT) {
            return Err(invalid(format!(
                "--shift must be a number in (0, {MAX_SHIFT}], got {shift}"
            )));
        }
        check_range("--strength", req.strength, 0.0, 1.0)?;
        check_range("--mask-blur", req.mask_blur as f64, 0.0, MAX_MASK_BLUR)?;
        if req.mask.is_some() && req.init_image.is_none() {
            return Err(invalid(
                "--mask needs --init-image: the mask says which part of it to repaint".into(),
            ));
        }
        if req.mask.is_some() && c.in_channels != LATENT_CHANNELS {
            return Err(invalid(format!(
                "inpainting needs a transformer with {LATENT_CHANNELS} input channels; this one has {}",
                c.in_channels
            )));
        }
        check_range(
            "--slg-scale",
            req.slg_scale as f64,
            0.0,
            MAX_GUIDANCE as f64,
        )?;
        check_range("--slg-start", req.slg_start as f64, 0.0, 1.0)?;
        check_range("--slg-stop", req.slg_stop as f64, 0.0, 1.0)?;
        if req.slg_start > req.slg_stop {
            return Err(invalid(format!(
                "--slg-start {} is after --slg-stop {}",
                req.slg_start, req.slg_stop
            )));
        }
        if let Some(&bad) = req.slg_layers.iter().find(|&&l| l >= c.depth) {
            return Err(invalid(format!(
                "--slg-layers {bad}: this model has blocks 0..={}",
                c.depth - 1
            )));
        }
        if let Some(t) = self.options.vae_tile {
            if !(MIN_TILE..=MAX_TILE).contains(&t) {
                return Err(invalid(format!(
                    "--vae-tile must be in {MIN_TILE}..={MAX_TILE} latent pixels, got {t}"
                )));
            }
        }
        if self.options.tile_overlap >= MAX_TILE {
            return Err(invalid(format!(
                "the tile overlap must be below {MAX_TILE} latent pixels, got {}",
                self.options.tile_overlap
            )));
        }
        // Image pixels per transformer token along each axis (16 for SD3).
        let scale = self.vae.config.scale_factor() * c.patch;
        let init_image = match &req.init_image {
            Some(p) => Some(load_image(p, scale)?),
            None => None,
        };
        if !req.controls.is_empty() && !req.slg_layers.is_empty() && cfg > 1.0 {
            return Err(invalid(
                "skip-layer guidance together with ControlNets is not supported: drop --slg-layers or the ControlNets".into(),
            ));
        }
        if req.mask.is_none() && req.mask_blur != 0.0 {
            return Err(invalid("--mask-blur needs --mask".into()));
        }
        if req.controls.len() != self.controlnets.len() {
            return Err(invalid(format!(
                "{} control image(s) for {} ControlNet(s): give one --control-image per --controlnet",
                req.controls.len(),
                self.controlnets.len()
            )));
        }
        let mut controls = Vec::new();
        for (k, ctl) in req.controls.iter().enumerate() {
            check_range(
                "--control-scale",
                ctl.scale as f64,
                -MAX_CONTROL_SCALE,
                MAX_CONTROL_SCALE,
            )?;
            check_range("--control-start", ctl.start as f64, 0.0, 1.0)?;
            check_range("--control-stop", ctl.stop as f64, 0.0, 1.0)?;
            if ctl.start >= ctl.stop {
                return Err(invalid(format!(
                    "ControlNet {k}: --control-start {} must be before --control-stop {}",
                    ctl.start, ctl.stop
                )));
            }
            controls.push(load_image(ctl.image.as_path(), scale)?);
        }
        let dims = init_image
            .as_ref()
            .or(controls.first())
            .map(|(_, h, w)| (*w, *h));
        let width = req.width.or(dims.map(|d| d.0)).unwrap_or(defaults::SIDE);
        let height = req.height.or(dims.map(|d| d.1)).unwrap_or(defaults::SIDE);
        for (flag, v) in [("--width", width), ("--height", height)] {
            if v == 0 || !v.is_multiple_of(scale) {
                return Err(invalid(format!(
                    "width and height must be positive multiples of {scale}: {flag} is {v}"
                )));
            }
            let grid = v / scale;
            if grid > c.pos_embed_max {
                return Err(invalid(format!(
                    "{flag} {v} needs a position grid of {grid}, but this model's grid is {} (at most {} pixels)",
                    c.pos_embed_max,
                    c.pos_embed_max * scale
                )));
            }
        }
        if init_image.is_some()
            && FlowMatchEuler::new(steps, shift).start_for_strength(req.strength) >= steps
        {
            return Err(invalid(format!(
                "--strength {} leaves no denoising step of {steps}",
                req.strength
            )));
        }
        if let Some((_, h, w)) = &init_image {
            if (*w, *h) != (width, height) {
                return Err(invalid(format!(
                    "the init image is {w}×{h} after cropping to multiples of {scale}, but {width}×{height} was asked for"
                )));
            }
        }
        for ((_, h, w), ctl) in controls.iter().zip(&req.controls) {
            if (*w, *h) != (width, height) {
                return Err(invalid(format!(
                    "the control image {} is {w}×{h} after cropping to multiples of {scale}, but the image is {width}×{height}",
                    ctl.image.display()
                )));
            }
        }
        let vae_scale = scale / c.patch;
        let (lh, lw) = (height / vae_scale, width / vae_scale);
        let mask = match (&req.mask, &req.init_image) {
            (Some(m), Some(i)) => {
                let (mask, mh, mw) = load_mask(m, scale, vae_scale, image_size(i)?, req.mask_blur)?;
                if (mh, mw) != (lh, lw) {
                    return Err(invalid(format!(
                        "the mask covers {mw}×{mh} latent pixels; this request needs {lw}×{lh}"
                    )));
                }
                Some(mask)
            }
            _ => None,
        };
        let want = [req.batch, c.in_channels, lh, lw];
        if let Some(l) = &req.init_latents {
            if l.shape != want || l.data.len() != want.iter().product::<usize>() {
                return Err(invalid(format!(
                    "the init latents are {:?} ({} values); this request needs {want:?}",
                    l.shape,
                    l.data.len()
                )));
            }
            if l.data.iter().any(|v| !v.is_finite()) {
                return Err(invalid(
                    "the init latents hold NaN or infinite values".into(),
                ));
            }
        }
        let settings = Settings {
            steps,
            cfg,
            shift,
            width,
            height,
        };
        self.check_limits(
            req,
            &settings,
            (lh, lw),
            init_image.is_some() || !controls.is_empty(),
        )?;
        Ok(Prepared {
            settings,
            latent: (lh, lw),
            init_image: init_image.map(|(img, _, _)| img),
            mask,
            controls: controls.into_iter().map(|(img, _, _)| img).collect(),
        })
    }

    /// The bytes one MMDiT step of `req` needs beside the weights
    /// (intermediates and inputs, as planned), what a memory budget keeps
    /// free for it.
    pub fn step_activation_bytes(&self, req: &GenerateRequest) -> Result<u64> {
        let s = self.check(req)?;
        let w = ShapeOnlyWeights::new(&self.gpu)?;
        let b = req.batch;
        let batch2 = if s.cfg > 1.0 { 2 * b } else { b };
        let scale = self.vae.config.scale_factor();
        let latent = (s.height / scale, s.width / scale);
        let g = self.mmdit_graph(&w, batch2, latent, req.max_t5_tokens)?;
        let mut bytes = g.pooled_bytes() + g.input_bytes();
        if s.cfg > 1.0 && !req.slg_layers.is_empty() {
            // The skip-layer pass is a second plan with its own buffers.
            let g = self.mmdit_graph(&w, b, latent, req.max_t5_tokens)?;
            bytes += g.pooled_bytes() + g.input_bytes();
        }
        Ok(bytes)
    }

    /// One MMDiT step's graph (with the ControlNets) on shape-only weights.
    fn mmdit_graph(
        &self,
        w: &ShapeOnlyWeights,
        batch2: usize,
        (lh, lw): (usize, usize),
        t5_tokens: usize,
    ) -> Result<Graph> {
        let gpu = &self.gpu;
        let dt = self.options.dtype;
        let c = &self.mmdit.config;
        let m = Mmdit::load_from(gpu, c, w, dt)?;
        let mut g = Graph::new(gpu.target());
        let x = g.input("latents", &[batch2, c.in_channels, lh, lw], DType::F32);
        let ctx = g.input(
            "context",
            &[batch2, CLIP_TOKENS + t5_tokens, c.context_dim],
            DType::F32,
        );
        let pooled = g.input("pooled", &[batch2, c.pooled_dim], DType::F32);
        let t = g.input("t_emb", &[batch2, TIMESTEP_DIM], DType::F32);
        let mut residuals = Vec::new();
        for (k, src) in self.controlnets.iter().enumerate() {
            let net = ControlNet::load_from(gpu, &src.config, w, dt)?;
            let cond = g.input(
                &format!("control{k}"),
                &[batch2, c.in_channels, lh, lw],
                DType::F32,
            );
            residuals = net.forward(&mut g, &m, x, cond, ctx, pooled, t)?;
        }
        m.forward_controlled(&mut g, x, ctx, pooled, t, &residuals)?;
        Ok(g)
    }

    /// Records every graph the request will run with shape-only weights and
    /// validates it against the adapter's limits (no GPU work).
    fn check_limits(
        &self,
        req: &GenerateRequest,
        s: &Settings,
        (lh, lw): (usize, usize),
        img2img: bool,
    ) -> Result<()> {
        let gpu = &self.gpu;
        let w = ShapeOnlyWeights::new(gpu)?;
        let dt = self.options.dtype;
        let b = req.batch;
        let batch2 = if s.cfg > 1.0 { 2 * b } else { b };
        let mut graphs = Vec::new();
        for cfg in [&self.encoders.clip_l, &self.encoders.clip_g] {
            graphs.push(clip_graph(gpu, &w, cfg, dt, batch2)?);
        }
        if let Some(cfg) = &self.encoders.t5 {
            graphs.push(t5_graph(gpu, &w, cfg, dt, batch2, req.max_t5_tokens)?);
        }
        graphs.push(self.mmdit_graph(&w, batch2, (lh, lw), req.max_t5_tokens)?);
        if img2img {
            let v = Vae::load_from(gpu, &self.vae.config, &w, dt)?;
            let mut g = Graph::new(gpu.target());
            let x = g.input("image", &[1, 3, s.height, s.width], DType::F32);
            v.encode(&mut g, x)?;
            graphs.push(g);
        }
        for g in &graphs {
            g.validate(gpu)?;
        }
        Ok(())
    }

    /// Generates `req.batch` images; `progress(step, total)` is called after each step.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        self.generate_with(req, &mut |e| {
            if let Progress::Step { step, total, .. } = e {
                progress(step, total);
            }
            Ok(())
        })
    }

    /// Generates `req.batch` images, telling `observe` as each stage starts
    /// and each step ends; an error from `observe` (e.g. [`Error::Cancelled`])
    /// stops the generation there and is returned.
    pub fn generate_with(
        &self,
        req: &GenerateRequest,
        observe: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<GenerateOutput> {
        let gpu = &self.gpu;
        gpu.memory.reset_peak();
        let prepared = self.prepare(req)?;
        let settings = prepared.settings;
        let c = &self.mmdit.config;
        let (b, (lh, lw)) = (req.batch, prepared.latent);
        let n = b * c.in_channels * lh * lw;
        // One generator, drawn from in diffusers' order: the init image's
        // latent sample, then the noise.
        let mut stream = NoiseStream::new(req.rng, req.seed);
        let image_eps = (prepared.init_image.is_some() && req.init_mode == InitMode::Sample)
            .then(|| stream.next(c.in_channels * lh * lw));
        let mut latents = match &req.init_latents {
            Some(l) => l.data.clone(),
            None => stream.next(n),
        };
        // Inpainting keeps the noise: the known region is re-noised from it
        // after every step. (diffusers' StableDiffusion3InpaintPipeline then
        // decodes without adding the VAE's shift factor back, unlike its
        // text-to-image and img2img pipelines; the final latents are the same,
        // and this decodes them as those do.)
        let noise = prepared.mask.as_ref().map(|_| latents.clone());
        let mut known = None;
        let do_cfg = settings.cfg > 1.0;
        let mut prompts = Vec::new();
        if do_cfg {
            prompts.extend(std::iter::repeat_n(req.negative_prompt.clone(), b));
        }
        prompts.extend(std::iter::repeat_n(req.prompt.clone(), b));
        // A generation that panicked (a bug) may have left models half
        // built: start over from nothing loaded.
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| {
            let mut l = p.into_inner();
            *l = Loaded::default();
            l
        });
        observe(Progress::Stage(Stage::Text))?;
        let emb = encode_prompts_kept(
            gpu,
            &self.text,
            &prompts,
            req.max_t5_tokens,
            c.context_dim,
            self.options.dtype,
            &self.loras,
            self.keeps_text().then_some(&mut loaded.text),
            self.options.vram_budget,
        )?;
        let schedule = FlowMatchEuler::new(settings.steps, settings.shift);
        let mut start = 0;
        let mut control_latents = Vec::new();
        if prepared.init_image.is_some() || !prepared.controls.is_empty() {
            observe(Progress::Stage(Stage::Encode))?;
        }
        for (img, src) in prepared.controls.iter().zip(&self.controlnets) {
            // diffusers samples the control image's latent distribution from
            // the global RNG (not the generator); its mean is reproducible.
            let vae = self.vae(&mut loaded)?;
            let canny;
            let img = if src.config.control_type == Some(CONTROL_TYPE_CANNY) {
                // Stability's canny ControlNet was trained on edges scaled as
                // 255·x·0.5 + 0.5 (x in [0, 1]) going into the VAE as they are
                // (sd3_infer.py; the SD3CannyImageProcessor of its model card).
                canny = img
                    .iter()
                    .map(|v| (v + 1.0) * 127.5 * 0.5 + 0.5)
                    .collect::<Vec<f32>>();
                &canny
            } else {
                img
            };
            let moments = encode_moments(gpu, vae, img, settings.height, settings.width)?;
            let config = VaeConfig {
                shift_factor: if src.config.zero_pooled {
                    0.0
                } else {
                    vae.config.shift_factor
                },
                ..vae.config.clone()
            };
            control_latents.push(latents_from_moments(&config, &moments, 1, None)?);
        }
        if let Some(img) = &prepared.init_image {
            let vae = self.vae(&mut loaded)?;
            let moments = encode_moments(gpu, vae, img, settings.height, settings.width)?;
            let image_latents =
                latents_from_moments(&vae.config, &moments, 1, image_eps.as_deref())?;
            start = schedule.start_for_strength(req.strength);
            let sigma = schedule.sigmas[start];
            let per = image_latents.len();
            for (i, v) in latents.iter_mut().enumerate() {
                *v = sigma * *v + (1.0 - sigma) * image_latents[i % per];
            }
            known = Some(image_latents);
        }
        observe(Progress::Stage(Stage::Load))?;
        if loaded.controlnets.len() != self.controlnets.len() {
            loaded.controlnets = self
                .controlnets
                .iter()
                .map(|src| ControlNet::load(gpu, src, self.options.dtype))
                .collect::<Result<_>>()?;
        }
        if loaded.mmdit.is_none() {
            let src = self.loras.provider(Component::Mmdit, &self.mmdit);
            // Under a budget: what one step's activations need beside the weights.
            let budget = match self.options.vram_budget {
                Some(bytes) => Some((bytes, self.step_activation_bytes(req)?)),
                None => None,
            };
            loaded.mmdit = Some(Mmdit::load_budgeted(
                gpu,
                &self.mmdit.config,
                &src,
                self.options.dtype,
                budget,
            )?);
        }
        let mut profile = None;
        {
            let model = loaded.mmdit.as_ref().expect("loaded above");
            let skip_layers = (do_cfg && !req.slg_layers.is_empty()).then(|| SkipLayers {
                layers: req.slg_layers.clone(),
                scale: req.slg_scale,
                start: req.slg_start,
                stop: req.slg_stop,
            });
            let nets: Vec<&ControlNet> = loaded.controlnets.iter().collect();
            let d = Denoiser::with_control(
                gpu,
                model,
                &DenoiseOptions {
                    batch: b,
                    height: lh,
                    width: lw,
                    tokens: emb.tokens,
                    guidance: settings.cfg,
                    skip_layers,
                    inpaint: prepared.mask.is_some(),
                    control: req
                        .controls
                        .iter()
                        .map(|c| ControlSchedule {
                            scale: c.scale,
                            start: c.start,
                            stop: c.stop,
                        })
                        .collect(),
                },
                &nets,
            )?;
            for (k, l) in control_latents.iter().enumerate() {
                d.set_control(gpu, k, l)?;
            }
            d.set_conditioning(gpu, &emb.context, &emb.pooled)?;
            d.set_latents(gpu, &latents)?;
            if let (Some(mask), Some(noise), Some(known)) = (&prepared.mask, &noise, &known) {
                d.set_inpaint(gpu, known, noise, mask)?;
            }
            let total = settings.steps - start;
            observe(Progress::Stage(Stage::Denoise))?;
            d.run(
                gpu,
                &schedule,
                start,
                &|i| req.profile && i == start,
                &mut |i, p| {
                    let profiled = p.is_some();
                    if profiled {
                        profile = p;
                    }
                    observe(Progress::Step {
                        step: i + 1 - start,
                        total,
                        profiled,
                    })
                },
            )?;
            latents = d.latents(gpu)?;
            if latents.iter().any(|v| !v.is_finite()) {
                return Err(Error::Graph(format!(
                    "after {} steps the latents hold NaN or infinite values (the model's numbers overflowed); no image is written",
                    settings.steps
                )));
            }
        }
        let streamed_blocks = loaded
            .mmdit
            .as_ref()
            .and_then(|m| m.stream())
            .map(|s| s.blocks())
            .unwrap_or_default();
        if !self.keeps_models() {
            loaded.mmdit = None;
            loaded.controlnets.clear();
        }
        let shape = [b, c.in_channels, lh, lw];
        observe(Progress::Stage(Stage::Decode))?;
        let image = {
            let vae = self.vae(&mut loaded)?;
            decode_auto(
                gpu,
                vae,
                shape,
                &latents,
                self.options.vae_tile,
                self.options.tile_overlap,
                // Under a memory budget the decode's intermediates get what
                // the VAE's weights leave of it (tiling when that is short).
                self.options.vae_budget.or_else(|| {
                    self.options
                        .vram_budget
                        .map(|b| b.saturating_sub(gpu.memory.current()))
                }),
            )?
        };
        if !self.keeps_models() {
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
            streamed_blocks,
        })
    }

    /// The PNG metadata of an image this pipeline made for `req` (see
    /// [`image_metadata`]).
    pub fn image_metadata(
        &self,
        req: &GenerateRequest,
        s: &Settings,
    ) -> Vec<(&'static str, String)> {
        let nets: Vec<PathBuf> = self.controlnets.iter().map(|c| c.path.clone()).collect();
        image_metadata(req, s, &self.mmdit.path, &self.loras.summary, &nets)
    }

    /// The ControlNets' architectures, in order.
    pub fn controlnets(&self) -> Vec<&ControlNetConfig> {
        self.controlnets.iter().map(|c| &c.config).collect()
    }

    fn vae<'a>(&self, loaded: &'a mut Loaded) -> Result<&'a Vae> {
        if loaded.vae.is_none() {
            loaded.vae = Some(Vae::load(&self.gpu, &self.vae, self.options.dtype)?);
        }
        Ok(loaded.vae.as_ref().expect("loaded above"))
    }
}

/// The VAE encoder's moments of an image [1, 3, h, w]; an f16 overflow
/// inside the encoder is retried in f32.
fn encode_moments(gpu: &Gpu, vae: &Vae, img: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
    let moments = VaeRun::encoder_moments(gpu, vae, 1, h, w)?.run(gpu, img)?;
    if moments.iter().all(|v| v.is_finite()) || vae.activation == DType::F32 {
        return Ok(moments);
    }
    let f32_vae = Vae {
        activation: DType::F32,
        ..vae.clone()
    };
    VaeRun::encoder_moments(gpu, &f32_vae, 1, h, w)?.run(gpu, img)
}

/// The text encoders' architectures, checked against one another and the
/// transformer as diffusers' `encode_prompt` combines them.
fn encoder_configs(t: &TextPaths, c: &MmditConfig) -> Result<EncoderConfigs> {
    let clip_l = crate::models::clip::detect(&open_encoder(&t.clip_l, "clip_l")?, Act::QuickGelu)?;
    let clip_g = crate::models::clip::detect(&open_encoder(&t.clip_g, "clip_g")?, Act::GeluErf)?;
    let t5 = match &t.t5 {
        Some(p) => Some(T5::detect(&open_encoder(p, "t5xxl")?)?.0),
        None => None,
    };
    let mismatch = |msg: String| Err(Error::Weights(WeightsError::Unsupported(msg)));
    if clip_l.hidden + clip_g.hidden > c.context_dim {
        return mismatch(format!(
            "the CLIP widths {} ({}) + {} ({}) exceed the transformer's context width {}: these encoders do not belong to this model",
            clip_l.hidden,
            t.clip_l.display(),
            clip_g.hidden,
            t.clip_g.display(),
            c.context_dim
        ));
    }
    if clip_l.projection + clip_g.projection != c.pooled_dim {
        return mismatch(format!(
            "the CLIP projections {} ({}) + {} ({}) do not make the transformer's pooled width {}",
            clip_l.projection,
            t.clip_l.display(),
            clip_g.projection,
            t.clip_g.display(),
            c.pooled_dim
        ));
    }
    if let (Some(t5), Some(p)) = (&t5, &t.t5) {
        if t5.d_model != c.context_dim {
            return mismatch(format!(
                "{}: T5 width {} differs from the transformer's context width {}",
                p.display(),
                t5.d_model,
                c.context_dim
            ));
        }
    }
    Ok(EncoderConfigs { clip_l, clip_g, t5 })
}

/// Text encoders and tokenizers for a model path and the options' overrides.
fn text_paths(path: &Path, o: &PipelineOptions) -> Result<TextPaths> {
    let is_folder = path.is_dir();
    // --tokenizers, else a model folder's own tokenizers, else the built-in
    // ones (single files carry none).
    let tok = |sub: &str| -> Result<Option<PathBuf>> {
        if let Some(root) = &o.tokenizers {
            let p = root.join(sub);
            return if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(Error::Io(format!(
                    "{}: missing tokenizer folder (--tokenizers)",
                    p.display()
                )))
            };
        }
        let p = path.join(sub);
        Ok((is_folder && p.is_dir()).then_some(p))
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
            tok("tokenizer_3")?
        } else {
            None
        },
        clip_l,
        clip_g,
        t5,
    })
}

/// A value in the A1111 `parameters` line: quoted (JSON-style, as the web UI
/// does) when it holds a separator.
fn a1111_value(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        serde_json::Value::String(v.to_string()).to_string()
    } else {
        v.to_string()
    }
}

/// A model's short name: a folder's name, or a file's without its extension
/// ("stable-diffusion-3.5-large", "sd3.5_large").
fn display_name(p: &Path) -> String {
    let name = if p.is_dir() {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_os_string()))
    } else {
        p.file_stem().map(|n| n.to_os_string())
    };
    name.unwrap_or_else(|| p.as_os_str().to_os_string())
        .to_string_lossy()
        .into_owned()
}

/// The PNG metadata of a generated image: our own keys (`prompt`, `seed`, …)
/// and `parameters` in the A1111 web UI's format, which image browsers and
/// other UIs read.
pub fn image_metadata(
    req: &GenerateRequest,
    s: &Settings,
    model: &Path,
    loras: &[LoraSummary],
    controlnets: &[PathBuf],
) -> Vec<(&'static str, String)> {
    let version = format!("sd3-wgpu {}", env!("CARGO_PKG_VERSION"));
    let rng = format!("{:?}", req.rng).to_lowercase();
    let model_name = display_name(model);
    let mut parameters = req.prompt.clone();
    if !req.negative_prompt.is_empty() {
        parameters.push_str("\nNegative prompt: ");
        parameters.push_str(&req.negative_prompt);
    }
    parameters.push_str(&format!(
        "\nSteps: {}, Sampler: Euler, Schedule type: Flow-match shift {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, RNG: {rng}, Version: {}",
        s.steps,
        s.shift,
        s.cfg,
        req.seed,
        s.width,
        s.height,
        a1111_value(&model_name),
        a1111_value(&version)
    ));
    let init = req.init_image.as_ref().map(|p| {
        let mode = format!("{:?}", req.init_mode).to_lowercase();
        (p.to_string(), mode)
    });
    if let Some((_, mode)) = &init {
        parameters.push_str(&format!(
            ", Denoising strength: {}, Init mode: {mode}",
            req.strength
        ));
        if req.mask.is_some() {
            parameters.push_str(&format!(", Mask blur: {}", req.mask_blur));
        }
    }
    let stem = display_name;
    if !loras.is_empty() {
        // A1111's form: short (12-digit) SHA-256 per LoRA name.
        let hashes: Vec<String> = loras
            .iter()
            .map(|l| format!("{}: {}", stem(&l.path), &l.sha256[..l.sha256.len().min(12)]))
            .collect();
        parameters.push_str(&format!(
            ", Lora hashes: {}",
            a1111_value(&hashes.join(", "))
        ));
    }
    for (k, (net, c)) in controlnets.iter().zip(&req.controls).enumerate() {
        // A1111's ControlNet extension writes one entry per unit like this.
        let unit = format!(
            "Model: {}, Image: {}, Weight: {}, Guidance Start: {}, Guidance End: {}",
            stem(net),
            c.image.display(),
            c.scale,
            c.start,
            c.stop
        );
        parameters.push_str(&format!(", ControlNet {k}: {}", a1111_value(&unit)));
    }
    let mut entries = vec![
        ("parameters", parameters),
        ("Software", version),
        ("prompt", req.prompt.clone()),
        ("negative_prompt", req.negative_prompt.clone()),
        ("seed", req.seed.to_string()),
        ("rng", rng),
        ("steps", s.steps.to_string()),
        ("cfg", s.cfg.to_string()),
        ("shift", s.shift.to_string()),
        ("model", model.display().to_string()),
        ("size", format!("{}x{}", s.width, s.height)),
    ];
    if let Some((image, mode)) = init {
        entries.push(("init_image", image));
        entries.push(("strength", req.strength.to_string()));
        entries.push(("init_mode", mode));
        if let Some(m) = &req.mask {
            entries.push(("mask", m.to_string()));
            entries.push(("mask_blur", req.mask_blur.to_string()));
        }
    }
    if !loras.is_empty() {
        // One line per LoRA: `--lora` as given (file:strength), then its hash.
        let lines: Vec<String> = loras
            .iter()
            .map(|l| format!("{}:{} sha256={}", l.path.display(), l.strength, l.sha256))
            .collect();
        entries.push(("loras", lines.join("\n")));
    }
    if !controlnets.is_empty() {
        let lines: Vec<String> = controlnets
            .iter()
            .zip(&req.controls)
            .map(|(net, c)| {
                format!(
                    "{} image={} scale={} start={} stop={}",
                    net.display(),
                    c.image.display(),
                    c.scale,
                    c.start,
                    c.stop
                )
            })
            .collect();
        entries.push(("controlnets", lines.join("\n")));
    }
    entries
}
