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
fn diffusers_recipe(canonical: &str, depth: usize) -> Recipe {
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
        let shape = |c: &str| self.ck.recipe_shape(&tmp.recipe(c));
        let has = |c: &str| self.ck.has_recipe(&tmp.recipe(c));
        let proj = shape("x_embedder.proj.weight")?;
        if proj.len() != 4 || proj[2] != proj[3] {
            return Err(WeightsError::Shape {
                name: tmp.stored_name("x_embedder.proj.weight"),
                expected: vec![0, 16, 2, 2],
                found: proj,
            });
        }
        cfg.hidden = proj[0];
        cfg.in_channels = proj[1];
        cfg.patch = proj[2];
        if !cfg.hidden.is_multiple_of(64) || cfg.hidden == 0 {
            return Err(WeightsError::Unsupported(format!(
                "hidden width {} is not a multiple of the head dim 64",
                cfg.hidden
            )));
        }
        cfg.heads = cfg.hidden / 64;
        cfg.context_dim = *shape("context_embedder.weight")?.get(1).unwrap_or(&0);
        cfg.pooled_dim = *shape("y_embedder.mlp.0.weight")?.get(1).unwrap_or(&0);
        let out = shape("final_layer.linear.weight")?[0];
        cfg.out_channels = out / (cfg.patch * cfg.patch).max(1);
        let pe = shape("pos_embed")?;
        let n = pe.get(1).copied().unwrap_or(0);
        let side = (n as f64).sqrt().round() as usize;
        if pe.len() != 3 || side * side != n || pe[2] != cfg.hidden {
            return Err(WeightsError::Shape {
                name: tmp.stored_name("pos_embed"),
                expected: vec![1, side * side, cfg.hidden],
                found: pe,
            });
        }
        cfg.pos_embed_max = side;
        cfg.qk_norm = has("joint_blocks.0.x_block.attn.ln_q.weight");
        cfg.dual_attention_layers = (0..depth)
            .filter(|i| has(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
            .collect();
        if depth == 0 {
            return Err(WeightsError::Missing {
                name: format!("{block_prefix}0.*"),
                source: self.ck.describe(),
            });
        }
        if let Some(j) = config_json {
            check_config(&cfg, j, &self.path)?;
        }
        Ok(cfg)
    }
}

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

/// A diffusers config.json must describe the same architecture as the tensors.
fn check_config(cfg: &MmditConfig, j: &serde_json::Value, path: &Path) -> Result<(), WeightsError> {
    let num = |k: &str| j.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
    let mut checks: Vec<(&str, Option<usize>, usize)> = vec![
        ("num_layers", num("num_layers"), cfg.depth),
        ("patch_size", num("patch_size"), cfg.patch),
        ("in_channels", num("in_channels"), cfg.in_channels),
        (
            "joint_attention_dim",
            num("joint_attention_dim"),
            cfg.context_dim,
        ),
        (
            "pooled_projection_dim",
            num("pooled_projection_dim"),
            cfg.pooled_dim,
        ),
        (
            "pos_embed_max_size",
            num("pos_embed_max_size"),
            cfg.pos_embed_max,
        ),
    ];
    if let (Some(h), Some(d)) = (num("num_attention_heads"), num("attention_head_dim")) {
        checks.push((
            "num_attention_heads × attention_head_dim",
            Some(h * d),
            cfg.hidden,
        ));
        if d != 64 {
            return Err(WeightsError::Unsupported(format!(
                "{}: attention_head_dim {d} is not supported (SD3 uses 64)",
                path.display()
            )));
        }
    }
    for (k, said, found) in checks {
        if let Some(said) = said {
            if said != found {
                return Err(WeightsError::Unsupported(format!(
                    "{}: config.json says {k} = {said} but the tensors give {found}",
                    path.display()
                )));
            }
        }
    }
    let qk = j.get("qk_norm").and_then(|v| v.as_str());
    if let Some(q) = qk {
        if q != "rms_norm" {
            return Err(WeightsError::Unsupported(format!(
                "{}: qk_norm '{q}' is not supported",
                path.display()
            )));
        }
    }
    Ok(())
}
