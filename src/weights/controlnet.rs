//! SD3 ControlNet checkpoints (diffusers' `SD3ControlNetModel`): InstantX's
//! SD3-medium ControlNets (joint blocks with their own patch and position
//! embedding) and Stability's SD3.5-large ones (image-only blocks that take
//! the transformer's patch embedding), in a diffusers folder, a safetensors
//! file with diffusers' names (InstantX's, renamed), or Stability's single
//! files (`transformer_blocks.N.attn.qkv`, `.mlp.fc1`, `.adaLN_modulation.1`
//! inside the blocks, diffusers' names outside them, and a `control_type`).
//! The architecture is read from the tensors (config.json, where present,
//! only adds `force_zeros_for_pooled_projection`).
//!
//! The blocks are loaded through the MMDiT's canonical (Stability) names, so
//! the models share their block code; [`ControlNetSource::read`] maps them.

use std::path::{Path, PathBuf};

use super::mmdit::{diffusers_recipe, MmditConfig};
use super::recipe::Recipe;
use super::{check_dim, Checkpoint, WeightsError};
use crate::ops::attention::HEAD_DIM;

/// Most blocks accepted.
const MAX_LAYERS: usize = 256;

/// A ControlNet's architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlNetConfig {
    /// The blocks' shapes, as an MMDiT's (depth = the ControlNet's blocks).
    pub blocks: MmditConfig,
    /// Joint blocks with a context stream (InstantX); image-only otherwise.
    pub joint: bool,
    /// Its own patch and position embedding; otherwise the transformer's.
    pub own_pos_embed: bool,
    /// Channels of the control input (`pos_embed_input`).
    pub cond_channels: usize,
    /// The pipeline gives the ControlNet zeros as the pooled text and
    /// encodes the control image without the VAE's shift
    /// (`force_zeros_for_pooled_projection`, diffusers' default).
    pub zero_pooled: bool,
    /// Stability's `control_type` (0 blur, 1 canny, 2 depth), when the
    /// file has one.
    pub control_type: Option<u32>,
}

/// Stability's `control_type` of a canny ControlNet.
pub const CONTROL_TYPE_CANNY: u32 = 1;

/// An opened ControlNet checkpoint.
pub struct ControlNetSource {
    /// The tensors.
    pub ck: Checkpoint,
    /// The detected architecture.
    pub config: ControlNetConfig,
    /// The path the user gave.
    pub path: PathBuf,
    /// Stability's names inside the blocks.
    stability: bool,
}

impl ControlNetSource {
    /// Opens a diffusers ControlNet folder or a safetensors file.
    pub fn open(path: &Path) -> Result<ControlNetSource, WeightsError> {
        let (ck, json) = if path.is_dir() {
            let ck = Checkpoint::open_diffusers_component(path, "diffusion_pytorch_model")?;
            (ck, super::read_config(path)?)
        } else {
            (Checkpoint::open(&[path.to_path_buf()])?, None)
        };
        let stability = ck
            .tensors
            .contains_key("transformer_blocks.0.attn.qkv.weight");
        let config = detect(path, &ck, json.as_ref(), stability)?;
        Ok(ControlNetSource {
            ck,
            config,
            path: path.to_path_buf(),
            stability,
        })
    }

    fn recipe(&self, canonical: &str) -> Recipe {
        if self.stability {
            // joint_blocks.N.x_block.<module> → transformer_blocks.N.<module>
            if let Some(rest) = canonical.strip_prefix("joint_blocks.") {
                if let Some((i, module)) = rest.split_once(".x_block.") {
                    return Recipe::Direct(format!("transformer_blocks.{i}.{module}"));
                }
            }
        }
        // No block of a ControlNet is "pre-only": name them as an MMDiT one
        // block deeper would.
        diffusers_recipe(canonical, self.config.blocks.depth + 1)
    }

    /// Reads a canonical (Stability-style) tensor as f32, checking its shape.
    pub fn read(&self, canonical: &str, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        self.ck.read_recipe(&self.recipe(canonical), expected)
    }
}

fn detect(
    path: &Path,
    ck: &Checkpoint,
    json: Option<&serde_json::Value>,
    stability: bool,
) -> Result<ControlNetConfig, WeightsError> {
    let unsupported = |msg: String| WeightsError::Unsupported(format!("{}: {msg}", path.display()));
    let layers = ck.indices_under("transformer_blocks.");
    let depth = layers.len();
    if depth == 0 || ck.indices_under("controlnet_blocks.").len() != depth {
        return Err(unsupported(format!(
            "not an SD3 ControlNet: {depth} transformer_blocks and {} controlnet_blocks (diffusers' SD3ControlNetModel names were expected)",
            ck.indices_under("controlnet_blocks.").len()
        )));
    }
    if layers.iter().enumerate().any(|(i, &b)| i != b) {
        return Err(unsupported(format!(
            "transformer_blocks are not numbered 0..{depth}"
        )));
    }
    let dim = |what: &str, v: usize, lo: usize, hi: usize| check_dim(path, what, v, lo, hi);
    dim("the number of ControlNet blocks", depth, 1, MAX_LAYERS)?;
    let [hidden, h2] = ck.recipe_dims::<2>(
        &Recipe::Direct("controlnet_blocks.0.weight".into()),
        "[hidden, hidden]",
    )?;
    if hidden != h2 || !hidden.is_multiple_of(HEAD_DIM) {
        return Err(unsupported(format!(
            "controlnet_blocks.0.weight is {hidden}×{h2}; a square multiple of {HEAD_DIM} was expected"
        )));
    }
    dim("the hidden width", hidden, HEAD_DIM, 1 << 14)?;
    let [ph, cond_channels, p, p2] = ck.recipe_dims::<4>(
        &Recipe::Direct("pos_embed_input.proj.weight".into()),
        "[hidden, channels, patch, patch]",
    )?;
    if ph != hidden || p != p2 {
        return Err(unsupported(format!(
            "pos_embed_input.proj.weight is [{ph}, {cond_channels}, {p}, {p2}]; [{hidden}, channels, p, p] was expected"
        )));
    }
    dim("the patch size", p, 1, 16)?;
    dim("the control channels", cond_channels, 1, 1024)?;
    let has = |n: &str| ck.tensors.contains_key(n);
    let joint = has("context_embedder.weight");
    let own_pos_embed = has("pos_embed.proj.weight");
    let context_dim = if joint {
        ck.recipe_dims::<2>(
            &Recipe::Direct("context_embedder.weight".into()),
            "[hidden, context]",
        )?[1]
    } else {
        0
    };
    let [_, pooled_dim] = ck.recipe_dims::<2>(
        &Recipe::Direct("time_text_embed.text_embedder.linear_1.weight".into()),
        "[hidden, pooled]",
    )?;
    let (in_channels, pos_embed_max) = if own_pos_embed {
        let [_, cin, _, _] = ck.recipe_dims::<4>(
            &Recipe::Direct("pos_embed.proj.weight".into()),
            "[hidden, in, patch, patch]",
        )?;
        let [_, n, _] = ck.recipe_dims::<3>(
            &Recipe::Direct("pos_embed.pos_embed".into()),
            "[1, grid², hidden]",
        )?;
        let side = (n as f64).sqrt().round() as usize;
        if side * side != n {
            return Err(unsupported(format!(
                "pos_embed.pos_embed holds {n} positions, not a square grid"
            )));
        }
        (cin, side)
    } else {
        (cond_channels, 0)
    };
    let dual_attention_layers: Vec<usize> = (0..depth)
        .filter(|i| {
            has(&format!("transformer_blocks.{i}.attn2.to_q.weight"))
                || has(&format!("transformer_blocks.{i}.attn2.qkv.weight"))
        })
        .collect();
    // Without a config: InstantX's (joint blocks) zero the pooled text, as
    // diffusers' default; Stability's SD3.5 ones (image-only blocks) take it
    // (their diffusers configs say force_zeros_for_pooled_projection: false).
    let zero_pooled = json
        .and_then(|j| j.get("force_zeros_for_pooled_projection"))
        .and_then(|v| v.as_bool())
        .unwrap_or(!stability && joint);
    let control_type = match ck.tensors.get("control_type") {
        Some(e) => {
            use safetensors::Dtype;
            let bytes = ck.bytes(e)?;
            let value = match (e.dtype, bytes.as_slice()) {
                (Dtype::I32, [a, b, c, d]) => Some(i32::from_le_bytes([*a, *b, *c, *d]) as f64),
                (Dtype::I64, [a, b, c, d, e, f, g, h]) => {
                    Some(i64::from_le_bytes([*a, *b, *c, *d, *e, *f, *g, *h]) as f64)
                }
                (Dtype::U8, [a]) => Some(*a as f64),
                _ => super::to_f32("control_type", e.dtype, &bytes)
                    .ok()
                    .and_then(|v| (v.len() == 1).then(|| v[0] as f64)),
            };
            match value.map(f64::round) {
                Some(t) if (0.0..=2.0).contains(&t) => Some(t as u32),
                _ => {
                    return Err(unsupported(format!(
                        "control_type {value:?} ({:?}): one of 0 (blur), 1 (canny), 2 (depth) was expected",
                        e.dtype
                    )))
                }
            }
        }
        None => None,
    };
    Ok(ControlNetConfig {
        blocks: MmditConfig {
            depth,
            hidden,
            heads: hidden / HEAD_DIM,
            in_channels,
            out_channels: in_channels,
            patch: p,
            context_dim,
            pooled_dim,
            pos_embed_max,
            qk_norm: has("transformer_blocks.0.attn.norm_q.weight")
                || has("transformer_blocks.0.attn.ln_q.weight"),
            dual_attention_layers,
        },
        joint,
        own_pos_embed,
        cond_channels,
        zero_pooled,
        control_type,
    })
}

impl super::RecipeSource for ControlNetSource {
    fn checkpoint(&self) -> &Checkpoint {
        &self.ck
    }
    fn recipe_of(&self, name: &str) -> Recipe {
        self.recipe(name)
    }
}
