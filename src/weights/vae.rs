//! VAE checkpoints: Stability/LDM names (`first_stage_model.decoder.up.3.block.0…`)
//! mapped onto diffusers' (`decoder.up_blocks.0.resnets.0…`), which are canonical
//! here, and the architecture read from the tensors.

use std::path::{Path, PathBuf};

use super::recipe::Recipe;
use super::{Checkpoint, WeightsError};

/// SD3's latent scale (latents = (mean − shift) · scale).
pub const SD3_SCALING_FACTOR: f32 = 1.5305;
/// SD3's latent shift.
pub const SD3_SHIFT_FACTOR: f32 = 0.0609;

/// The autoencoder's architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    /// Latent channels (16 for SD3).
    pub latent_channels: usize,
    /// Image channels (3).
    pub image_channels: usize,
    /// Channels per resolution level, finest first ((128, 256, 512, 512) for SD3).
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    /// GroupNorm groups (32).
    pub norm_groups: usize,
    /// latents = (mean − shift) · scale.
    pub scaling_factor: f32,
    /// See `scaling_factor`.
    pub shift_factor: f32,
    /// Whether encoder tensors are present.
    pub has_encoder: bool,
}

impl VaeConfig {
    /// Image pixels per latent pixel along each axis (8 for SD3: one halving
    /// per level after the first).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Latent channels of SD3's VAE and transformer.
pub const LATENT_CHANNELS: usize = 16;

/// An opened VAE.
pub struct VaeSource {
    /// The tensors.
    pub ck: Checkpoint,
    /// Stability/LDM names with this prefix, or diffusers names when `None`.
    pub ldm_prefix: Option<String>,
    /// The architecture.
    pub config: VaeConfig,
    /// The path given.
    pub path: PathBuf,
}

/// The LDM name of a canonical (diffusers) VAE tensor.
fn ldm_name(canonical: &str, levels: usize) -> String {
    let parts: Vec<&str> = canonical.split('.').collect();
    let coder = parts[0];
    let rest = &parts[1..];
    let tail = |from: usize| rest[from..].join(".");
    let resnet_tail = |from: usize| tail(from).replace("conv_shortcut", "nin_shortcut");
    let mapped = match rest {
        ["conv_norm_out", ..] => format!("norm_out.{}", tail(1)),
        ["down_blocks", i, "resnets", j, ..] => format!("down.{i}.block.{j}.{}", resnet_tail(4)),
        ["down_blocks", i, "downsamplers", "0", ..] => format!("down.{i}.downsample.{}", tail(4)),
        ["up_blocks", i, "resnets", j, ..] => {
            let b = levels - 1 - i.parse::<usize>().unwrap_or(0);
            format!("up.{b}.block.{j}.{}", resnet_tail(4))
        }
        ["up_blocks", i, "upsamplers", "0", ..] => {
            let b = levels - 1 - i.parse::<usize>().unwrap_or(0);
            format!("up.{b}.upsample.{}", tail(4))
        }
        ["mid_block", "resnets", j, ..] => {
            format!(
                "mid.block_{}.{}",
                j.parse::<usize>().unwrap_or(0) + 1,
                resnet_tail(3)
            )
        }
        ["mid_block", "attentions", "0", what, ..] => {
            let ldm = match *what {
                "group_norm" => "norm",
                "to_q" => "q",
                "to_k" => "k",
                "to_v" => "v",
                _ => "proj_out",
            };
            let param = rest.last().copied().unwrap_or("");
            format!("mid.attn_1.{ldm}.{param}")
        }
        _ => tail(0),
    };
    format!("{coder}.{mapped}")
}

impl VaeSource {
    /// Opens a VAE: a single file (all-in-one with `first_stage_model.`, a bare
    /// LDM VAE, or a diffusers-named file), a diffusers model folder (its
    /// `vae/`) or a diffusers VAE folder.
    pub fn open(path: &Path) -> Result<VaeSource, WeightsError> {
        let (ck, json) = super::open_component(path, "vae", "diffusion_pytorch_model")?;
        let ldm_prefix = if ck.with_prefix("first_stage_model.").next().is_some() {
            Some("first_stage_model.".to_string())
        } else if ck.with_prefix("decoder.up_blocks.").next().is_some() {
            None
        } else if ck.with_prefix("decoder.up.").next().is_some() {
            Some(String::new())
        } else {
            return Err(WeightsError::Unsupported(format!(
                "{}: no VAE decoder found (expected 'first_stage_model.decoder.*' as in Stability files, \
                 or 'decoder.up_blocks.*' as in diffusers folders)",
                path.display()
            )));
        };
        let mut src = VaeSource {
            ck,
            ldm_prefix,
            config: VaeConfig {
                latent_channels: 0,
                image_channels: 0,
                block_out_channels: Vec::new(),
                layers_per_block: 0,
                norm_groups: 32,
                scaling_factor: SD3_SCALING_FACTOR,
                shift_factor: SD3_SHIFT_FACTOR,
                has_encoder: false,
            },
            path: path.to_path_buf(),
        };
        src.detect(json.as_ref())?;
        Ok(src)
    }

    fn recipe(&self, canonical: &str) -> Recipe {
        match &self.ldm_prefix {
            Some(p) => Recipe::Direct(format!(
                "{p}{}",
                ldm_name(canonical, self.config.block_out_channels.len())
            )),
            None => Recipe::Direct(canonical.to_string()),
        }
    }

    /// Whether the checkpoint holds a canonical tensor.
    pub fn has(&self, canonical: &str) -> bool {
        self.ck.has_recipe(&self.recipe(canonical))
    }

    /// Reads a canonical tensor as f32, checking its shape.
    pub fn read(&self, canonical: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        self.ck.read_recipe(&self.recipe(canonical), expected)
    }

    fn detect(&mut self, json: Option<&serde_json::Value>) -> Result<(), WeightsError> {
        let origin = self.path.clone();
        let dim =
            |what: &str, v: usize, lo: usize, hi: usize| super::check_dim(&origin, what, v, lo, hi);
        // The level count is needed to map LDM up-block indices: count first.
        let prefix = match &self.ldm_prefix {
            Some(p) => format!("{p}decoder.up."),
            None => "decoder.up_blocks.".to_string(),
        };
        let levels = self.ck.indices_under(&prefix).len();
        if levels == 0 {
            return Err(WeightsError::Missing {
                name: prefix + "0.*",
                source: self.ck.describe(),
            });
        }
        dim("the number of decoder levels", levels, 1, MAX_LEVELS)?;
        self.config.block_out_channels = vec![0; levels];
        let conv = "[out, in, 3, 3]";
        let [_, latent, _, _] = self
            .ck
            .recipe_dims::<4>(&self.recipe("decoder.conv_in.weight"), conv)?;
        self.config.latent_channels =
            dim("the latent channels (decoder.conv_in)", latent, 1, 1024)?;
        let [image, _, _, _] = self
            .ck
            .recipe_dims::<4>(&self.recipe("decoder.conv_out.weight"), conv)?;
        if image != 3 {
            return Err(WeightsError::Unsupported(format!(
                "{}: the decoder makes {image} image channels ('{}'); SD3's VAE makes RGB (3)",
                origin.display(),
                self.recipe("decoder.conv_out.weight").first()
            )));
        }
        self.config.image_channels = image;
        let resnets_prefix = match &self.ldm_prefix {
            Some(p) => format!("{p}decoder.up.{}.block.", levels - 1),
            None => "decoder.up_blocks.0.resnets.".to_string(),
        };
        let per_level = self.ck.indices_under(&resnets_prefix).len();
        if per_level < 1 {
            return Err(WeightsError::Missing {
                name: resnets_prefix + "0.*",
                source: self.ck.describe(),
            });
        }
        dim("the resnets per decoder level", per_level, 1, 16)?;
        self.config.layers_per_block = per_level - 1;
        for i in 0..levels {
            // Decoder up block i works at level levels-1-i.
            let name = format!("decoder.up_blocks.{i}.resnets.0.conv2.weight");
            let [c, _, _, _] = self.ck.recipe_dims::<4>(&self.recipe(&name), conv)?;
            self.config.block_out_channels[levels - 1 - i] = dim(
                &format!("the channels of '{}'", self.recipe(&name).first()),
                c,
                1,
                8192,
            )?;
        }
        self.config.has_encoder = self.has("encoder.conv_in.weight");
        let j = json;
        if let Some(v) = super::config_f64(j, &origin, "scaling_factor", 1e-6, 1e6)? {
            self.config.scaling_factor = v as f32;
        }
        if let Some(v) = super::config_f64(j, &origin, "shift_factor", -1e6, 1e6)? {
            self.config.shift_factor = v as f32;
        }
        if let Some(v) = super::config_usize(j, &origin, "norm_num_groups", 1, 1024)? {
            self.config.norm_groups = v;
        }
        for (i, &c) in self.config.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(self.config.norm_groups) {
                return Err(WeightsError::Unsupported(format!(
                    "{}: level {i} has {c} channels (from the decoder's conv weights), not a multiple of the {} GroupNorm groups",
                    origin.display(),
                    self.config.norm_groups
                )));
            }
        }
        let said = j
            .and_then(|j| j.get("block_out_channels"))
            .filter(|v| !v.is_null());
        if let Some(said) = said {
            let list: Option<Vec<usize>> = said.as_array().and_then(|a| {
                a.iter()
                    .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect()
            });
            if list.as_ref() != Some(&self.config.block_out_channels) {
                return Err(WeightsError::Unsupported(format!(
                    "{}: config.json says block_out_channels {said} but the tensors (each level's first decoder resnet, e.g. '{}') give {:?}",
                    self.path.display(),
                    self.recipe("decoder.up_blocks.0.resnets.0.conv2.weight").first(),
                    self.config.block_out_channels
                )));
            }
        }
        Ok(())
    }
}

/// Most resolution levels accepted (SD3: 4).
const MAX_LEVELS: usize = 8;

impl super::RecipeSource for VaeSource {
    fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }
    fn recipe_of(&self, name: &str) -> Recipe {
        self.recipe(name)
    }
}
