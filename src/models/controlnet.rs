//! SD3 ControlNets (diffusers' `SD3ControlNetModel`): a copy of the first
//! blocks of an MMDiT that reads the control image's latents and returns, per
//! block, a zero-initialised projection of its image stream, which the MMDiT
//! adds to its own (see [`crate::models::mmdit::Mmdit::forward_controlled`]).

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::models::layers::{Linear, Mlp};
use crate::models::mmdit::{
    conv_forward, cropped_pos_embed, DitBlock, JointBlock, Loader, Mmdit, TIMESTEP_DIM,
};
use crate::ops::elementwise::{self, Act};
use crate::ops::layout;
use crate::tensor::{DType, Tensor};
use crate::weights::controlnet::{ControlNetConfig, ControlNetSource};
use crate::weights::TensorProvider;

/// The blocks of one ControlNet family.
pub enum Blocks {
    /// InstantX (SD3 medium): joint blocks, none of them pre-only.
    Joint(Vec<JointBlock>),
    /// Stability (SD3.5 large): image-only blocks.
    Single(Vec<DitBlock>),
}

/// A ControlNet's weights on the GPU.
pub struct ControlNet {
    /// Architecture.
    pub config: ControlNetConfig,
    /// Patchify conv and position table, when the ControlNet has its own.
    pub embedder: Option<(Linear, Tensor)>,
    /// Timestep MLP.
    pub t_embedder: Mlp,
    /// Pooled-text MLP.
    pub y_embedder: Mlp,
    /// Context projection (joint blocks only).
    pub context_embedder: Option<Linear>,
    /// The blocks.
    pub blocks: Blocks,
    /// Per block: [hidden, hidden] projection of the image stream.
    pub controlnet_blocks: Vec<Linear>,
    /// Patchify conv of the control latents [hidden, cond, p, p].
    pub pos_embed_input: Linear,
}

impl ControlNet {
    /// Uploads a ControlNet, matrices stored as `matrix`.
    pub fn load(gpu: &Gpu, src: &ControlNetSource, matrix: DType) -> Result<ControlNet> {
        Self::load_from(gpu, &src.config, src, matrix)
    }

    /// Builds a ControlNet of architecture `config` with tensors from `src`.
    pub fn load_from(
        gpu: &Gpu,
        config: &ControlNetConfig,
        src: &dyn TensorProvider,
        matrix: DType,
    ) -> Result<ControlNet> {
        let c = config.clone();
        let b = &c.blocks;
        let (h, p) = (b.hidden, b.patch);
        let l = Loader { gpu, src, matrix };
        let blocks = if c.joint {
            let mut v = Vec::with_capacity(b.depth);
            for i in 0..b.depth {
                let dual = b.dual_attention_layers.contains(&i);
                v.push(JointBlock::load(
                    &l,
                    &format!("joint_blocks.{i}"),
                    b,
                    dual,
                    false,
                )?);
            }
            Blocks::Joint(v)
        } else {
            let mut v = Vec::with_capacity(b.depth);
            for i in 0..b.depth {
                let dual = b.dual_attention_layers.contains(&i);
                v.push(DitBlock::load_image_stream(
                    &l,
                    &format!("joint_blocks.{i}.x_block"),
                    b,
                    dual,
                )?);
            }
            Blocks::Single(v)
        };
        let embedder = if c.own_pos_embed {
            Some((
                Linear {
                    weight: l.matrix("x_embedder.proj.weight", &[h, b.in_channels, p, p])?,
                    bias: Some(l.tensor("x_embedder.proj.bias", &[h], DType::F32)?),
                },
                l.tensor(
                    "pos_embed",
                    &[1, b.pos_embed_max * b.pos_embed_max, h],
                    l.table_dtype(),
                )?,
            ))
        } else {
            None
        };
        let controlnet_blocks = (0..b.depth)
            .map(|i| l.linear(&format!("controlnet_blocks.{i}"), h, h))
            .collect::<Result<Vec<_>>>()?;
        Ok(ControlNet {
            embedder,
            t_embedder: l.mlp("t_embedder", TIMESTEP_DIM, h, h, ("mlp.0", "mlp.2"))?,
            y_embedder: l.mlp("y_embedder", b.pooled_dim, h, h, ("mlp.0", "mlp.2"))?,
            context_embedder: if c.joint {
                Some(l.linear("context_embedder", h, b.context_dim)?)
            } else {
                None
            },
            blocks,
            controlnet_blocks,
            pos_embed_input: Linear {
                weight: l.matrix("pos_embed_input.proj.weight", &[h, c.cond_channels, p, p])?,
                bias: Some(l.tensor("pos_embed_input.proj.bias", &[h], DType::F32)?),
            },
            config: c,
        })
    }

    /// Whether this ControlNet fits `mmdit`: the same width, patch and text
    /// widths, no more blocks than the MMDiT, 16-channel control latents.
    pub fn check_fits(
        config: &ControlNetConfig,
        mmdit: &crate::weights::mmdit::MmditConfig,
    ) -> Result<()> {
        let b = &config.blocks;
        let mut wrong = Vec::new();
        if b.hidden != mmdit.hidden {
            wrong.push(format!(
                "width {} (the transformer's is {})",
                b.hidden, mmdit.hidden
            ));
        }
        if b.patch != mmdit.patch {
            wrong.push(format!(
                "patch {} (the transformer's is {})",
                b.patch, mmdit.patch
            ));
        }
        if b.depth > mmdit.depth {
            wrong.push(format!(
                "{} blocks for a transformer of {}",
                b.depth, mmdit.depth
            ));
        }
        if b.pooled_dim != mmdit.pooled_dim {
            wrong.push(format!(
                "pooled width {} (the transformer's is {})",
                b.pooled_dim, mmdit.pooled_dim
            ));
        }
        if config.joint && b.context_dim != mmdit.context_dim {
            wrong.push(format!(
                "context width {} (the transformer's is {})",
                b.context_dim, mmdit.context_dim
            ));
        }
        if config.own_pos_embed && b.in_channels != mmdit.in_channels {
            wrong.push(format!(
                "{} latent channels (the transformer's are {})",
                b.in_channels, mmdit.in_channels
            ));
        }
        if config.cond_channels != mmdit.in_channels {
            wrong.push(format!(
                "{} control channels where the control image's latents have {} (extra conditioning, as inpainting ControlNets use, is not supported)",
                config.cond_channels, mmdit.in_channels
            ));
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(Error::Graph(format!(
                "this ControlNet does not fit the model: {}",
                wrong.join("; ")
            )))
        }
    }

    /// Records the ControlNet: latents x [batch, 16, H, W] (embedded with
    /// the ControlNet's own patch and position embedding, or `mmdit`'s),
    /// the control latents [batch, 16, H, W], context, pooled text and the
    /// timestep embedding → one residual per block [batch, tokens, hidden]
    /// (unscaled).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        g: &mut Graph,
        mmdit: &Mmdit,
        x: Value,
        cond: Value,
        context: Value,
        pooled: Value,
        t_emb: Value,
    ) -> Result<Vec<Value>> {
        let b = &self.config.blocks;
        let tokens = match &self.embedder {
            Some((proj, table)) => g.scoped("x_embedder", |g| {
                let xs = g.shape(x).to_vec();
                let (h, w) = (xs[2] / b.patch, xs[3] / b.patch);
                if h > b.pos_embed_max || w > b.pos_embed_max || xs[1] != b.in_channels {
                    return Err(g.shape_error(
                        "controlnet",
                        format!(
                            "latents {xs:?} do not fit the ControlNet's {}×{} position grid",
                            b.pos_embed_max, b.pos_embed_max
                        ),
                    ));
                }
                let patches = conv_forward(g, proj, x, b.patch)?;
                let t = layout::nchw_to_tokens(g, patches)?;
                let pos = cropped_pos_embed(g, table, b.pos_embed_max, b.hidden, h, w)?;
                elementwise::add(g, t, pos)
            })?,
            None => mmdit.embed_patches(g, x)?,
        };
        let control = g.scoped("pos_embed_input", |g| {
            let patches = conv_forward(g, &self.pos_embed_input, cond, b.patch)?;
            layout::nchw_to_tokens(g, patches)
        })?;
        let mut x_tokens = elementwise::add(g, tokens, control)?;
        let t = g.scoped("t_embedder", |g| {
            self.t_embedder.forward(g, t_emb, Act::Silu)
        })?;
        let y = g.scoped("y_embedder", |g| {
            self.y_embedder.forward(g, pooled, Act::Silu)
        })?;
        let cond_emb = elementwise::add(g, t, y)?;
        let cond_act = elementwise::activation(g, cond_emb, Act::Silu)?;
        let mut ctx = match &self.context_embedder {
            Some(l) => Some(g.scoped("context_embedder", |g| l.forward(g, context))?),
            None => None,
        };
        let mut out = Vec::with_capacity(b.depth);
        for (i, proj) in self.controlnet_blocks.iter().enumerate() {
            x_tokens = g.scoped(&format!("block{i}"), |g| match (&self.blocks, ctx) {
                (Blocks::Joint(v), Some(c)) => {
                    let (nx, nc) = v[i].forward(g, x_tokens, c, cond_act, b)?;
                    ctx = nc;
                    Ok(nx)
                }
                (Blocks::Single(v), _) => v[i].forward_alone(g, x_tokens, cond_act, b.heads),
                _ => Err(g.shape_error("controlnet", "joint blocks without a context stream")),
            })?;
            out.push(g.scoped(&format!("controlnet_block{i}"), |g| {
                proj.forward(g, x_tokens)
            })?);
        }
        Ok(out)
    }
}
