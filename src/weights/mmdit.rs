//! MMDiT checkpoints: the two naming schemes mapped onto one structure, and
//! the architecture detected from the tensors themselves.
//!
//! The canonical names are Stability's single-file names without the
//! `model.diffusion_model.` prefix (`joint_blocks.3.x_block.attn.qkv.weight`).
//! A diffusers folder stores q, k, v separately and the 2-chunk modulations
//! (final layer, the last block's context stream) as (scale, shift) rather than
//! (shift, scale); [`MmditSource::read`] hides both.

use std::path::{Path, PathBuf};

use super::recipe::Recipe;
use super::{Checkpoint, WeightsError};
use crate::ops::attention::HEAD_DIM;

/// Prefix of the diffusion model in Stability single files.
pub const SINGLE_FILE_PREFIX: &str = "model.diffusion_model.";

/// How the tensors are named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Stability single file; `prefix` is `model.diffusion_model.` or empty.
    SingleFile {
        /// Prefix before the canonical names.
        prefix: String,
    },
    /// diffusers `SD3Transformer2DModel` names.
    Diffusers,
}

/// The architecture, detected from tensor shapes (and a diffusers config.json
/// when present, which must agree).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmditConfig {
    /// Number of joint blocks.
    pub depth: usize,
    /// Hidden width (64 · heads).
    pub hidden: usize,
    /// Attention heads (head dim 64).
    pub heads: usize,
    /// Latent channels in.
    pub in_channels: usize,
    /// Latent channels out.
    pub out_channels: usize,
    /// Patch size.
    pub patch: usize,
    /// Width of the text context (4096 in the real models).
    pub context_dim: usize,
    /// Width of the pooled text vector (2048).
    pub pooled_dim: usize,
    /// Side of the stored position-embedding grid.
    pub pos_embed_max: usize,
    /// RMSNorm on q and k (SD3.5).
    pub qk_norm: bool,
    /// Blocks with a second, image-only attention (SD3.5 medium).
    pub dual_attention_layers: Vec<usize>,
}

impl MmditConfig {
    /// The product name of a recognised configuration.
    pub fn variant_name(&self) -> String {
        match (
            self.depth,
            self.hidden,
            self.qk_norm,
            self.dual_attention_layers.is_empty(),
        ) {
            (24, 1536, false, true) => "SD3 medium".into(),
            (24, 1536, true, false) => "SD3.5 medium".into(),
            (38, 2432, true, true) => "SD3.5 large".into(),
            _ => "custom MMDiT".into(),
        }
    }
}

/// An opened MMDiT checkpoint.
pub struct MmditSource {
    /// The tensors.
    pub ck: Checkpoint,
    /// Their naming scheme.
    pub layout: Layout,
    /// The detected architecture.
    pub config: MmditConfig,
    /// The path the user gave.
    pub path: PathBuf,
}

/// The diffusers name of a canonical tensor, for a model of `depth` blocks.
pub(crate) fn diffusers_recipe(canonical: &str, depth: usize) -> Recipe {
    use Recipe::*;
    let (stem, param) = canonical.rsplit_once('.').unwrap_or((canonical, ""));
    let d = |s: &str| Direct(format!("{s}.{param}"));
    match stem {
        "pos_embed" => return Direct("pos_embed.pos_embed".into()),
        "x_embedder.proj" => return d("pos_embed.proj"),
        "t_embedder.mlp.0" => return d("time_text_embed.timestep_embedder.linear_1"),
        "t_embedder.mlp.2" => return d("time_text_embed.timestep_embedder.linear_2"),
        "y_embedder.mlp.0" => return d("time_text_embed.text_embedder.linear_1"),
        "y_embedder.mlp.2" => return d("time_text_embed.text_embedder.linear_2"),
        "context_embedder" => return d("context_embedder"),
        "final_layer.linear" => return d("proj_out"),
        "final_layer.adaLN_modulation.1" => return SwapHalves(format!("norm_out.linear.{param}")),
        _ => {}
    }
    let Some(rest) = stem.strip_prefix("joint_blocks.") else {
        return Direct(canonical.to_string());
    };
    let (i, part) = rest.split_once('.').unwrap_or((rest, ""));
    let last = i.parse::<usize>().is_ok_and(|i| i + 1 == depth);
    let b = format!("transformer_blocks.{i}");
    let name = |s: &str| format!("{b}.{s}.{param}");
    let qkv = |prefix: &str, q: &str, k: &str, v: &str| {
        Concat(vec![
            format!("{b}.{prefix}.{q}.{param}"),
            format!("{b}.{prefix}.{k}.{param}"),
            format!("{b}.{prefix}.{v}.{param}"),
        ])
    };
    match part {
        "x_block.attn.qkv" => qkv("attn", "to_q", "to_k", "to_v"),
        "context_block.attn.qkv" => qkv("attn", "add_q_proj", "add_k_proj", "add_v_proj"),
        "x_block.attn2.qkv" => qkv("attn2", "to_q", "to_k", "to_v"),
        "x_block.attn.proj" => Direct(name("attn.to_out.0")),
        "context_block.attn.proj" => Direct(name("attn.to_add_out")),
        "x_block.attn2.proj" => Direct(name("attn2.to_out.0")),
        "x_block.attn.ln_q" => Direct(name("attn.norm_q")),
        "x_block.attn.ln_k" => Direct(name("attn.norm_k")),
        "context_block.attn.ln_q" => Direct(name("attn.norm_added_q")),
        "context_block.attn.ln_k" => Direct(name("attn.norm_added_k")),
        "x_block.attn2.ln_q" => Direct(name("attn2.norm_q")),
        "x_block.attn2.ln_k" => Direct(name("attn2.norm_k")),
        "x_block.adaLN_modulation.1" => Direct(name("norm1.linear")),
        "context_block.adaLN_modulation.1" if last => SwapHalves(name("norm1_context.linear")),
        "context_block.adaLN_modulation.1" => Direct(name("norm1_context.linear")),
        "x_block.mlp.fc1" => Direct(name("ff.net.0.proj")),
        "x_block.mlp.fc2" => Direct(name("ff.net.2")),
        "context_block.mlp.fc1" => Direct(name("ff_context.net.0.proj")),
        "context_block.mlp.fc2" => Direct(name("ff_context.net.2")),
        _ => Direct(canonical.to_string()),
    }
}

impl MmditSource {
    /// Opens a single `.safetensors` file (Stability layout, or a bare
    /// diffusers transformer file) or a diffusers folder (the model folder or
    /// its `transformer/` subfolder).
    pub fn open(path: &Path) -> Result<MmditSource, WeightsError> {
        let (ck, config_json) =
            super::open_component(path, "transformer", "diffusion_pytorch_model")?;
        let layout = if ck.with_prefix(SINGLE_FILE_PREFIX).next().is_some() {
            Layout::SingleFile {
                prefix: SINGLE_FILE_PREFIX.into(),
            }
        } else if ck.with_prefix("joint_blocks.").next().is_some() {
            Layout::SingleFile {
                prefix: String::new(),
            }
        } else if ck.with_prefix("transformer_blocks.").next().is_some() {
            Layout::Diffusers
        } else {
            return Err(WeightsError::Unsupported(format!(
                "{}: no MMDiT tensors found (expected '{SINGLE_FILE_PREFIX}joint_blocks.*' as in Stability files, \
                 or 'transformer_blocks.*' as in diffusers folders)",
                path.display()
            )));
        };
        let mut src = MmditSource {
            ck,
            layout,
            config: placeholder_config(),
            path: path.to_path_buf(),
        };
        src.config = src.detect(config_json.as_ref())?;
        Ok(src)
    }

    fn recipe(&self, canonical: &str) -> Recipe {
        match &self.layout {
            Layout::SingleFile { prefix } => Recipe::Direct(format!("{prefix}{canonical}")),
            Layout::Diffusers => diffusers_recipe(canonical, self.config.depth),
        }
    }

    /// The name a canonical tensor has in this checkpoint (the first part, for fused ones).
    pub fn stored_name(&self, canonical: &str) -> String {
        self.recipe(canonical).first().to_string()
    }

    /// Whether the checkpoint holds a canonical tensor.
    pub fn has(&self, canonical: &str) -> bool {
        self.ck.has_recipe(&self.recipe(canonical))
    }

    /// Shape of a canonical tensor.
    pub fn shape(&self, canonical: &str) -> Result<Vec<usize>, WeightsError> {
        self.ck.recipe_shape(&self.recipe(canonical))
    }

    /// Reads a canonical tensor as f32, checking its shape.
    pub fn read(&self, canonical: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        self.ck.read_recipe(&self.recipe(canonical), expected)
    }

    fn detect(&self, config_json: Option<&serde_json::Value>) -> Result<MmditConfig, WeightsError> {
        let block_prefix = match &self.layout {
            Layout::SingleFile { prefix } => format!("{prefix}joint_blocks."),
            Layout::Diffusers => "transformer_blocks.".to_string(),
        };
        let blocks = self.ck.indices_under(&block_prefix);
        let depth = blocks.len();
        if blocks.iter().enumerate().any(|(i, &b)| i != b) {
            return Err(WeightsError::Unsupported(format!(
                "{}: joint blocks are not numbered 0..{depth}: {blocks:?}",
                self.path.display()
            )));
        }
        // Depth must be known before names can be mapped (the last block differs).
        let mut cfg = MmditConfig {
            depth,
            ..placeholder_config()
        };
        let tmp = MmditSource {
            ck: Checkpoint::empty(),
            layout: self.layout.clone(),
            config: cfg.clone(),
            path: self.path.clone(),
        };
        let has = |c: &str| self.ck.has_recipe(&tmp.recipe(c));
        let dims2 = |c: &str, layout: &str| self.ck.recipe_dims::<2>(&tmp.recipe(c), layout);
        let origin = self.path.as_path();
        let dim =
            |what: &str, v: usize, lo: usize, hi: usize| super::check_dim(origin, what, v, lo, hi);
        if depth == 0 {
            return Err(WeightsError::Missing {
                name: format!("{block_prefix}0.*"),
                source: self.ck.describe(),
            });
        }
        dim("the number of joint blocks", depth, 1, MAX_DEPTH)?;
        let proj_name = tmp.stored_name("x_embedder.proj.weight");
        let [hidden, in_channels, p, q] = self.ck.recipe_dims::<4>(
            &tmp.recipe("x_embedder.proj.weight"),
            "[hidden, in_channels, patch, patch]",
        )?;
        if p != q {
            return Err(WeightsError::Shape {
                file: self.ck.file_of(&proj_name),
                name: proj_name,
                expected: "a square patch [hidden, in_channels, patch, patch]".into(),
                found: vec![hidden, in_channels, p, q],
            });
        }
        cfg.hidden = dim("the hidden width (x_embedder)", hidden, 64, MAX_WIDTH)?;
        cfg.in_channels = dim(
            "the latent channels (x_embedder)",
            in_channels,
            1,
            MAX_CHANNELS,
        )?;
        cfg.patch = dim("the patch size (x_embedder)", p, 1, MAX_PATCH)?;
        if !cfg.hidden.is_multiple_of(HEAD_DIM) {
            return Err(WeightsError::Unsupported(format!(
                "{}: hidden width {} ({proj_name}) is not a multiple of the head dim 64",
                origin.display(),
                cfg.hidden
            )));
        }
        cfg.heads = cfg.hidden / HEAD_DIM;
        let [_, context_dim] = dims2("context_embedder.weight", "[hidden, context_dim]")?;
        cfg.context_dim = dim(
            "the context width (context_embedder)",
            context_dim,
            1,
            MAX_WIDTH,
        )?;
        let [_, pooled_dim] = dims2("y_embedder.mlp.0.weight", "[hidden, pooled_dim]")?;
        cfg.pooled_dim = dim("the pooled width (y_embedder)", pooled_dim, 1, MAX_WIDTH)?;
        let final_name = tmp.stored_name("final_layer.linear.weight");
        let [out, _] = dims2(
            "final_layer.linear.weight",
            "[patch·patch·out_channels, hidden]",
        )?;
        let pp = cfg.patch * cfg.patch;
        if !out.is_multiple_of(pp) || out / pp != cfg.in_channels {
            return Err(WeightsError::Shape {
                file: self.ck.file_of(&final_name),
                name: final_name,
                expected: format!(
                    "[{}, {}] (patch² · the {} latent channels in, as SD3 predicts a velocity of the latent's shape)",
                    pp * cfg.in_channels,
                    cfg.hidden,
                    cfg.in_channels
                ),
                found: self.ck.recipe_shape(&tmp.recipe("final_layer.linear.weight"))?,
            });
        }
        cfg.out_channels = out / pp;
        let pe_name = tmp.stored_name("pos_embed");
        let [one, n, pe_hidden] = self
            .ck
            .recipe_dims::<3>(&tmp.recipe("pos_embed"), "[1, grid², hidden]")?;
        let side = (n as f64).sqrt().round() as usize;
        if one != 1 || side.checked_mul(side) != Some(n) || pe_hidden != cfg.hidden {
            return Err(WeightsError::Shape {
                file: self.ck.file_of(&pe_name),
                name: pe_name,
                expected: format!("[1, grid², {}] with a square grid", cfg.hidden),
                found: vec![one, n, pe_hidden],
            });
        }
        cfg.pos_embed_max = dim("the position grid side (pos_embed)", side, 1, MAX_GRID)?;
        cfg.qk_norm = has("joint_blocks.0.x_block.attn.ln_q.weight");
        cfg.dual_attention_layers = (0..depth)
            .filter(|i| has(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
            .collect();
        if let Some(j) = config_json {
            check_config(&cfg, j, &self.path, &format!("{block_prefix}N.*"), &|c| {
                tmp.stored_name(c)
            })?;
        }
        Ok(cfg)
    }
}

/// Most joint blocks accepted (SD3.5 large has 38).
const MAX_DEPTH: usize = 256;
/// Widest hidden, context or pooled width accepted (SD3.5 large: 2432, 4096, 2048).
const MAX_WIDTH: usize = 1 << 16;
/// Most latent channels accepted (SD3: 16).
const MAX_CHANNELS: usize = 1024;
/// Largest patch accepted (SD3: 2).
const MAX_PATCH: usize = 16;
/// Largest position grid side accepted (SD3.5 medium: 384).
const MAX_GRID: usize = 4096;

fn placeholder_config() -> MmditConfig {
    MmditConfig {
        depth: 0,
        hidden: 0,
        heads: 0,
        in_channels: 0,
        out_channels: 0,
        patch: 0,
        context_dim: 0,
        pooled_dim: 0,
        pos_embed_max: 0,
        qk_norm: false,
        dual_attention_layers: Vec::new(),
    }
}

/// A diffusers config.json must describe the same architecture as the
/// tensors; a disagreement names the key and the tensor it was compared with.
fn check_config(
    cfg: &MmditConfig,
    j: &serde_json::Value,
    path: &Path,
    blocks: &str,
    stored: &dyn Fn(&str) -> String,
) -> Result<(), WeightsError> {
    let num = |k: &str| super::config_usize(Some(j), path, k, 0, usize::MAX);
    let proj = stored("x_embedder.proj.weight");
    let mut checks: Vec<(&str, Option<usize>, usize, String)> = vec![
        (
            "num_layers",
            num("num_layers")?,
            cfg.depth,
            blocks.to_string(),
        ),
        ("patch_size", num("patch_size")?, cfg.patch, proj.clone()),
        (
            "in_channels",
            num("in_channels")?,
            cfg.in_channels,
            proj.clone(),
        ),
        (
            "out_channels",
            num("out_channels")?,
            cfg.out_channels,
            stored("final_layer.linear.weight"),
        ),
        (
            "joint_attention_dim",
            num("joint_attention_dim")?,
            cfg.context_dim,
            stored("context_embedder.weight"),
        ),
        (
            "pooled_projection_dim",
            num("pooled_projection_dim")?,
            cfg.pooled_dim,
            stored("y_embedder.mlp.0.weight"),
        ),
        (
            "pos_embed_max_size",
            num("pos_embed_max_size")?,
            cfg.pos_embed_max,
            stored("pos_embed"),
        ),
    ];
    if let (Some(h), Some(d)) = (num("num_attention_heads")?, num("attention_head_dim")?) {
        if d != HEAD_DIM {
            return Err(WeightsError::Unsupported(format!(
                "{}: config.json's attention_head_dim {d} is not supported (SD3 uses 64)",
                path.display()
            )));
        }
        checks.push((
            "num_attention_heads × attention_head_dim",
            Some(h.saturating_mul(d)),
            cfg.hidden,
            proj,
        ));
    }
    for (k, said, found, tensor) in checks {
        if let Some(said) = said {
            if said != found {
                return Err(WeightsError::Unsupported(format!(
                    "{}: config.json says {k} = {said} but the tensors give {found} (from '{tensor}')",
                    path.display()
                )));
            }
        }
    }
    match j.get("qk_norm") {
        None | Some(serde_json::Value::Null) => {}
        Some(q) if q.as_str() == Some("rms_norm") => {}
        Some(q) => {
            return Err(WeightsError::Unsupported(format!(
                "{}: config.json's qk_norm {q} is not supported (SD3.5 uses \"rms_norm\")",
                path.display()
            )))
        }
    }
    Ok(())
}

impl super::RecipeSource for MmditSource {
    fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }
    fn recipe_of(&self, name: &str) -> Recipe {
        self.recipe(name)
    }
}
