//! The SD3 / SD3.5 diffusion transformer (MMDiT).
//!
//! Fields are named as in Stability's checkpoints (`x_embedder`, `joint_blocks`,
//! `x_block`, `context_block`, `attn`, `mlp`, `final_layer`); the forward pass
//! records one line per layer. Activations are f32; matrices are f32 or f16.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::models::layers::{Linear, Mlp};
use crate::ops::attention::{self, AttentionOptions, Heads, HEAD_DIM};
use crate::ops::elementwise::{self, Act};
use crate::ops::norm::{self, ModChunk};
use crate::ops::{conv, layout};
use crate::tensor::{DType, Tensor};
use crate::weights::mmdit::{MmditConfig, MmditSource};
use crate::weights::TensorProvider;

const EPS: f32 = 1e-6;
/// Width of the sinusoidal timestep embedding.
pub const TIMESTEP_DIM: usize = 256;

/// Self-attention weights of one stream: fused qkv, optional per-head RMSNorm
/// of q and k, output projection (absent in the last block's context stream).
pub struct Attention {
    /// [3·hidden, hidden].
    pub qkv: Linear,
    /// Output projection.
    pub proj: Option<Linear>,
    /// RMSNorm weights [64] of q and k.
    pub ln_qk: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.qkv.tensors_mut();
        if let Some(p) = &mut self.proj {
            v.extend(p.tensors_mut());
        }
        if let Some((q, k)) = &mut self.ln_qk {
            v.push(q);
            v.push(k);
        }
        v
    }
}

/// The adaLN modulation vector of one stream, [batch, chunks·hidden], with the
/// chunks in Stability's order.
#[derive(Clone, Copy)]
struct Modulation(Value);

impl Modulation {
    fn chunk(self, index: usize) -> ModChunk {
        ModChunk { m: self.0, index }
    }
    fn shift_msa(self) -> ModChunk {
        self.chunk(0)
    }
    fn scale_msa(self) -> ModChunk {
        self.chunk(1)
    }
    fn gate_msa(self) -> ModChunk {
        self.chunk(2)
    }
    fn shift_mlp(self) -> ModChunk {
        self.chunk(3)
    }
    fn scale_mlp(self) -> ModChunk {
        self.chunk(4)
    }
    fn gate_mlp(self) -> ModChunk {
        self.chunk(5)
    }
    fn shift_msa2(self) -> ModChunk {
        self.chunk(6)
    }
    fn scale_msa2(self) -> ModChunk {
        self.chunk(7)
    }
    fn gate_msa2(self) -> ModChunk {
        self.chunk(8)
    }
}

/// One stream of a joint block. The last block's context stream is
/// "pre-only": 2-chunk modulation, no output projection, no MLP.
pub struct DitBlock {
    /// `adaLN_modulation.1`: [chunks·hidden, hidden].
    pub adaln_modulation: Linear,
    /// Joint attention weights.
    pub attn: Attention,
    /// SD3.5-medium image-only attention.
    pub attn2: Option<Attention>,
    /// The MLP (None when pre-only).
    pub mlp: Option<Mlp>,
}

/// A joint block: the image and context streams.
pub struct JointBlock {
    /// Image tokens.
    pub x_block: DitBlock,
    /// Text tokens.
    pub context_block: DitBlock,
}

impl DitBlock {
    fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.adaln_modulation.tensors_mut();
        v.extend(self.attn.tensors_mut());
        if let Some(a) = &mut self.attn2 {
            v.extend(a.tensors_mut());
        }
        if let Some(m) = &mut self.mlp {
            v.extend(m.tensors_mut());
        }
        v
    }
}

impl JointBlock {
    /// Every tensor of the block, in a fixed order (what streaming moves).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.x_block.tensors_mut();
        v.extend(self.context_block.tensors_mut());
        v
    }
}

/// Final adaLN (shift, scale) and projection to patches.
pub struct FinalLayer {
    /// [2·hidden, hidden], (shift, scale).
    pub adaln_modulation: Linear,
    /// [patch²·out_channels, hidden].
    pub linear: Linear,
}

/// The diffusion transformer.
pub struct Mmdit {
    /// Architecture.
    pub config: MmditConfig,
    /// Patchify conv [hidden, in, p, p] (`x_embedder.proj`).
    pub x_embedder: Linear,
    /// Stored 2-D sin-cos position embedding [1, max², hidden].
    pub pos_embed: Tensor,
    /// Timestep MLP.
    pub t_embedder: Mlp,
    /// Pooled-text MLP.
    pub y_embedder: Mlp,
    /// Context projection [hidden, context_dim].
    pub context_embedder: Linear,
    /// The blocks.
    pub joint_blocks: Vec<JointBlock>,
    /// Output layer.
    pub final_layer: FinalLayer,
}

/// Uploads an MMDiT-like model's tensors by their canonical names.
pub(crate) struct Loader<'a> {
    pub(crate) gpu: &'a Gpu,
    pub(crate) src: &'a dyn TensorProvider,
    pub(crate) matrix: DType,
}

impl Loader<'_> {
    pub(crate) fn tensor(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.src.tensor(self.gpu, name, shape, dtype)
    }
    /// A matrix in the loader's storage (a file's packed encoding kept).
    pub(crate) fn matrix(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.src.matrix(self.gpu, name, shape, self.matrix)
    }
    /// Storage of a lookup table (the position embedding): f16 with f16
    /// matrices, else f32.
    pub(crate) fn table_dtype(&self) -> DType {
        if self.matrix == DType::F32 {
            DType::F32
        } else {
            DType::F16
        }
    }
    pub(crate) fn linear(&self, prefix: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.matrix(&format!("{prefix}.weight"), &[out, inp])?,
            bias: Some(self.tensor(&format!("{prefix}.bias"), &[out], DType::F32)?),
        })
    }
    pub(crate) fn mlp(
        &self,
        prefix: &str,
        inp: usize,
        hidden: usize,
        out: usize,
        names: (&str, &str),
    ) -> Result<Mlp> {
        Ok(Mlp {
            fc1: self.linear(&format!("{prefix}.{}", names.0), hidden, inp)?,
            fc2: self.linear(&format!("{prefix}.{}", names.1), out, hidden)?,
        })
    }
    pub(crate) fn attention(
        &self,
        prefix: &str,
        h: usize,
        qk_norm: bool,
        proj: bool,
    ) -> Result<Attention> {
        Ok(Attention {
            qkv: self.linear(&format!("{prefix}.qkv"), 3 * h, h)?,
            proj: if proj {
                Some(self.linear(&format!("{prefix}.proj"), h, h)?)
            } else {
                None
            },
            ln_qk: if qk_norm {
                Some((
                    self.tensor(&format!("{prefix}.ln_q.weight"), &[HEAD_DIM], DType::F32)?,
                    self.tensor(&format!("{prefix}.ln_k.weight"), &[HEAD_DIM], DType::F32)?,
                ))
            } else {
                None
            },
        })
    }
}

impl Mmdit {
    /// Uploads every weight of `src`, matrices stored as `matrix` (f32 or f16).
    pub fn load(gpu: &Gpu, src: &MmditSource, matrix: DType) -> Result<Mmdit> {
        Self::load_from(gpu, &src.config, src, matrix)
    }

    /// Builds the model of architecture `config` with tensors from `src`.
    pub fn load_from(
        gpu: &Gpu,
        config: &MmditConfig,
        src: &dyn TensorProvider,
        matrix: DType,
    ) -> Result<Mmdit> {
        Self::load_budgeted(gpu, config, src, matrix, None)
    }

    /// [`Mmdit::load_from`] within a GPU memory budget: with `budget` =
    /// (bytes, activations), the blocks that do not fit beside everything
    /// already on the GPU, the model's other weights and `activations` bytes
    /// of a step are streamed (see [`crate::stream`]): each is uploaded,
    /// read back into host memory and leaves two slots per block layout;
    /// then as many leading blocks as fit get their own buffers again.
    pub fn load_budgeted(
        gpu: &Gpu,
        config: &MmditConfig,
        src: &dyn TensorProvider,
        matrix: DType,
        budget: Option<(u64, u64)>,
    ) -> Result<Mmdit> {
        let c = config.clone();
        let l = Loader { gpu, src, matrix };
        let h = c.hidden;
        let p = c.patch;
        // The parts outside the blocks first: they always stay.
        let x_embedder = Linear {
            weight: l.matrix("x_embedder.proj.weight", &[h, c.in_channels, p, p])?,
            bias: Some(l.tensor("x_embedder.proj.bias", &[h], DType::F32)?),
        };
        // f16 with f16 matrices (as PyTorch's fp16 pipelines hold it):
        // SD3.5 medium's 384² table is 0.9 GiB in f32.
        let pos_embed = l.tensor(
            "pos_embed",
            &[1, c.pos_embed_max * c.pos_embed_max, h],
            l.table_dtype(),
        )?;
        let t_embedder = l.mlp("t_embedder", TIMESTEP_DIM, h, h, ("mlp.0", "mlp.2"))?;
        let y_embedder = l.mlp("y_embedder", c.pooled_dim, h, h, ("mlp.0", "mlp.2"))?;
        let context_embedder = l.linear("context_embedder", h, c.context_dim)?;
        let final_layer = FinalLayer {
            adaln_modulation: l.linear("final_layer.adaLN_modulation.1", 2 * h, h)?,
            linear: l.linear("final_layer.linear", p * p * c.out_channels, h)?,
        };
        if let Some((bytes, activations)) = budget {
            crate::stream::check_room("mmdit", gpu.memory.current() + activations, bytes)?;
        }
        let mut stream = budget.map(|_| crate::stream::StreamBuilder::new("mmdit"));
        let mut joint_blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let dual = c.dual_attention_layers.contains(&i);
            let pre_only = i + 1 == c.depth;
            let mut block = JointBlock::load(&l, &format!("joint_blocks.{i}"), &c, dual, pre_only)?;
            if let Some(s) = &mut stream {
                s.add(gpu, i, block.tensors_mut())?;
            }
            joint_blocks.push(block);
        }
        if let (Some(s), Some(budget)) = (stream, budget) {
            crate::stream::settle(gpu, s, budget, &mut joint_blocks, |b| b.tensors_mut())?;
        }
        Ok(Mmdit {
            x_embedder,
            pos_embed,
            t_embedder,
            y_embedder,
            context_embedder,
            joint_blocks,
            final_layer,
            config: c,
        })
    }

    /// The streamed blocks' stream, when the model was loaded under a
    /// budget its blocks did not all fit.
    pub fn stream(&self) -> Option<std::sync::Arc<crate::stream::BlockStream>> {
        self.joint_blocks
            .iter()
            .rev()
            .find_map(|b| b.x_block.adaln_modulation.weight.stream.as_ref())
            .map(|r| r.stream.clone())
    }

    /// Records the forward pass: latents x [batch, in, H, W], context
    /// [batch, tokens, context_dim], pooled [batch, pooled_dim] and the
    /// timestep embedding [batch, 256] (see [`timestep_embedding`]) → the
    /// velocity [batch, out, H, W].
    pub fn forward(
        &self,
        g: &mut Graph,
        x: Value,
        context: Value,
        pooled: Value,
        t_emb: Value,
    ) -> Result<Value> {
        self.forward_skipping(g, x, context, pooled, t_emb, &[])
    }

    /// [`Mmdit::forward`] with the joint blocks in `skip` bypassed (both streams
    /// pass through unchanged), as skip-layer guidance needs.
    pub fn forward_skipping(
        &self,
        g: &mut Graph,
        x: Value,
        context: Value,
        pooled: Value,
        t_emb: Value,
        skip: &[usize],
    ) -> Result<Value> {
        if let Some(&bad) = skip.iter().find(|&&i| i >= self.config.depth) {
            return Err(g.shape_error(
                "mmdit",
                format!(
                    "cannot skip block {bad}: the model has {} blocks",
                    self.config.depth
                ),
            ));
        }
        g.scoped("mmdit", |g| {
            self.forward_inner(g, x, context, pooled, t_emb, skip, &[])
        })
    }

    /// [`Mmdit::forward`] with ControlNet residuals [batch, tokens, hidden]
    /// added to the image stream after every block but the last, block i
    /// taking residual ⌊i / (depth / n)⌋ of n (diffusers' rule).
    pub fn forward_controlled(
        &self,
        g: &mut Graph,
        x: Value,
        context: Value,
        pooled: Value,
        t_emb: Value,
        control: &[Value],
    ) -> Result<Value> {
        g.scoped("mmdit", |g| {
            self.forward_inner(g, x, context, pooled, t_emb, &[], control)
        })
    }

    /// Patch embedding plus the cropped position embedding: latents
    /// [batch, in, H, W] → tokens [batch, (H/p)·(W/p), hidden].
    pub(crate) fn embed_patches(&self, g: &mut Graph, x: Value) -> Result<Value> {
        let c = &self.config;
        let (h, w) = self.grid(g, x)?;
        let tokens = g.scoped("x_embedder", |g| {
            let patches = conv_forward(g, &self.x_embedder, x, c.patch)?;
            layout::nchw_to_tokens(g, patches)
        })?;
        g.scoped("pos_embed", |g| {
            let pos = cropped_pos_embed(g, &self.pos_embed, c.pos_embed_max, c.hidden, h, w)?;
            elementwise::add(g, tokens, pos)
        })
    }

    /// The patch grid of latents x, checked against the model.
    fn grid(&self, g: &Graph, x: Value) -> Result<(usize, usize)> {
        let c = &self.config;
        let xs = g.shape(x).to_vec();
        if xs.len() != 4
            || xs[1] != c.in_channels
            || !xs[2].is_multiple_of(c.patch)
            || !xs[3].is_multiple_of(c.patch)
        {
            return Err(g.shape_error(
                "input",
                format!(
                    "latents must be [batch, {}, H, W] with H, W multiples of {}, found {xs:?}",
                    c.in_channels, c.patch
                ),
            ));
        }
        let (h, w) = (xs[2] / c.patch, xs[3] / c.patch);
        if h > c.pos_embed_max || w > c.pos_embed_max {
            return Err(g.shape_error(
                "input",
                format!(
                    "a {}×{} latent needs a {h}×{w} patch grid, but the position embedding covers {}×{}",
                    xs[2], xs[3], c.pos_embed_max, c.pos_embed_max
                ),
            ));
        }
        Ok((h, w))
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_inner(
        &self,
        g: &mut Graph,
        x: Value,
        context: Value,
        pooled: Value,
        t_emb: Value,
        skip: &[usize],
        control: &[Value],
    ) -> Result<Value> {
        let c = &self.config;
        let (h, w) = self.grid(g, x)?;
        let mut x_tokens = self.embed_patches(g, x)?;
        let cond = g.scoped("t_embedder", |g| {
            self.t_embedder.forward(g, t_emb, Act::Silu)
        })?;
        let y = g.scoped("y_embedder", |g| {
            self.y_embedder.forward(g, pooled, Act::Silu)
        })?;
        let cond = elementwise::add(g, cond, y)?;
        // Every adaLN modulation is Linear(SiLU(c)): take SiLU once.
        let cond_act = elementwise::activation(g, cond, Act::Silu)?;
        let mut ctx = g.scoped("context_embedder", |g| {
            self.context_embedder.forward(g, context)
        })?;
        for (i, block) in self.joint_blocks.iter().enumerate() {
            if skip.contains(&i) {
                continue;
            }
            let (nx, nc) = g.scoped(&format!("block{i}"), |g| {
                block.forward(g, x_tokens, ctx, cond_act, c)
            })?;
            x_tokens = nx;
            if let Some(nc) = nc {
                ctx = nc;
                if !control.is_empty() {
                    // diffusers: interval = depth / n (a float), index ⌊i / interval⌋.
                    let interval = c.depth as f64 / control.len() as f64;
                    let k = (i as f64 / interval) as usize;
                    let r = *control.get(k).ok_or_else(|| {
                        g.shape_error("control", format!("no ControlNet residual {k}"))
                    })?;
                    x_tokens =
                        g.scoped(&format!("control{i}"), |g| elementwise::add(g, x_tokens, r))?;
                }
            }
        }
        g.scoped("final_layer", |g| {
            let m = Modulation(g.scoped("adaLN", |g| {
                self.final_layer.adaln_modulation.forward(g, cond_act)
            })?);
            let hx = norm::adaln_modulate(g, x_tokens, m.shift_msa(), m.scale_msa(), EPS)?;
            let patches = g.scoped("linear", |g| self.final_layer.linear.forward(g, hx))?;
            layout::unpatchify(g, patches, h, w, c.patch)
        })
    }
}

/// The centred h × w crop of a stored max × max position-embedding table
/// [1, max², hidden] → [h·w, hidden].
pub(crate) fn cropped_pos_embed(
    g: &mut Graph,
    table: &Tensor,
    max: usize,
    hid: usize,
    h: usize,
    w: usize,
) -> Result<Value> {
    let (top, left) = ((max - h) / 2, (max - w) / 2);
    let table = g.weight("pos_embed", table);
    let crop = layout::strided_copy(
        g,
        "crop",
        table,
        (top * max + left) * hid,
        &[h, w, hid],
        &[max * hid, hid, 1],
    )?;
    g.reshape(crop, &[h * w, hid])
}

/// A patchify convolution (kernel = stride = `patch`).
pub(crate) fn conv_forward(g: &mut Graph, l: &Linear, x: Value, patch: usize) -> Result<Value> {
    crate::models::layers::no_low_rank(g, &l.weight, "conv")?;
    let w = g.weight("weight", &l.weight);
    let b = l.bias.as_ref().map(|b| g.weight("bias", b));
    conv::conv2d(g, x, w, b, patch, 0)
}

impl DitBlock {
    /// The image stream of `prefix` (`joint_blocks.N.x_block`): 6 modulation
    /// chunks (9 with `dual`), joint attention, the MLP.
    pub(crate) fn load_image_stream(
        l: &Loader,
        prefix: &str,
        c: &MmditConfig,
        dual: bool,
    ) -> Result<DitBlock> {
        let h = c.hidden;
        Ok(DitBlock {
            adaln_modulation: l.linear(
                &format!("{prefix}.adaLN_modulation.1"),
                if dual { 9 } else { 6 } * h,
                h,
            )?,
            attn: l.attention(&format!("{prefix}.attn"), h, c.qk_norm, true)?,
            attn2: if dual {
                Some(l.attention(&format!("{prefix}.attn2"), h, c.qk_norm, true)?)
            } else {
                None
            },
            mlp: Some(l.mlp(&format!("{prefix}.mlp"), h, 4 * h, h, ("fc1", "fc2"))?),
        })
    }

    /// An image-only block (SD3.5 large ControlNets' `SD3SingleTransformerBlock`):
    /// adaLN-Zero, self-attention over the image tokens, the MLP.
    pub(crate) fn forward_alone(
        &self,
        g: &mut Graph,
        x: Value,
        cond_act: Value,
        heads: usize,
    ) -> Result<Value> {
        let hidden = heads * HEAD_DIM;
        let m = Modulation(g.scoped("adaLN", |g| self.adaln_modulation.forward(g, cond_act))?);
        let hx = g.scoped("norm1", |g| {
            norm::adaln_modulate(g, x, m.shift_msa(), m.scale_msa(), EPS)
        })?;
        let qkv = g.scoped("attn.qkv", |g| self.attn.qkv.forward(g, hx))?;
        let mut o = AttentionOptions::new(heads);
        if let Some((q, k)) = &self.attn.ln_qk {
            o.qk_norm = Some((g.weight("ln_q", q), g.weight("ln_k", k)));
        }
        let view = |col_offset| Heads {
            value: qkv,
            col_offset,
        };
        let a = g.scoped("attn", |g| {
            attention::attention(g, view(0), view(hidden), view(2 * hidden), &o)
        })?;
        let proj = self.attn.proj.as_ref().ok_or_else(|| {
            g.shape_error(
                "block",
                "an image-only block needs its attention projection",
            )
        })?;
        let out = g.scoped("attn.proj", |g| proj.forward(g, a))?;
        let mlp = self
            .mlp
            .as_ref()
            .ok_or_else(|| g.shape_error("block", "an image-only block needs its MLP"))?;
        g.scoped("mlp", |g| {
            residual_then_mlp(g, x, m.gate_msa(), out, m, mlp)
        })
    }
}

impl JointBlock {
    /// Block `prefix` (`joint_blocks.N`); a `pre_only` block (the MMDiT's
    /// last) has a context stream without projection and MLP.
    pub(crate) fn load(
        l: &Loader,
        prefix: &str,
        c: &MmditConfig,
        dual: bool,
        pre_only: bool,
    ) -> Result<JointBlock> {
        let h = c.hidden;
        let x_block = DitBlock::load_image_stream(l, &format!("{prefix}.x_block"), c, dual)?;
        let cb = format!("{prefix}.context_block");
        let context_block = DitBlock {
            adaln_modulation: l.linear(
                &format!("{cb}.adaLN_modulation.1"),
                if pre_only { 2 } else { 6 } * h,
                h,
            )?,
            attn: l.attention(&format!("{cb}.attn"), h, c.qk_norm, !pre_only)?,
            attn2: None,
            mlp: if pre_only {
                None
            } else {
                Some(l.mlp(&format!("{cb}.mlp"), h, 4 * h, h, ("fc1", "fc2"))?)
            },
        };
        Ok(JointBlock {
            x_block,
            context_block,
        })
    }

    /// Returns the new image stream and, unless this is the last block, the new context stream.
    pub(crate) fn forward(
        &self,
        g: &mut Graph,
        x: Value,
        ctx: Value,
        cond_act: Value,
        c: &MmditConfig,
    ) -> Result<(Value, Option<Value>)> {
        let hidden = c.hidden;
        let mx = Modulation(g.scoped("x.adaLN", |g| {
            self.x_block.adaln_modulation.forward(g, cond_act)
        })?);
        let mc = Modulation(g.scoped("context.adaLN", |g| {
            self.context_block.adaln_modulation.forward(g, cond_act)
        })?);
        let hx = g.scoped("x.norm1", |g| {
            norm::adaln_modulate(g, x, mx.shift_msa(), mx.scale_msa(), EPS)
        })?;
        let hc = g.scoped("context.norm1", |g| {
            norm::adaln_modulate(g, ctx, mc.shift_msa(), mc.scale_msa(), EPS)
        })?;
        // The dual-attention input is taken from x before the joint residual.
        let hx2 = match self.x_block.attn2 {
            Some(_) => Some(g.scoped("x.norm1_2", |g| {
                norm::adaln_modulate(g, x, mx.shift_msa2(), mx.scale_msa2(), EPS)
            })?),
            None => None,
        };
        let qkv_x = g.scoped("x.attn.qkv", |g| self.x_block.attn.qkv.forward(g, hx))?;
        let qkv_c = g.scoped("context.attn.qkv", |g| {
            self.context_block.attn.qkv.forward(g, hc)
        })?;
        let joint = g.scoped("joint_attn", |g| {
            joint_attention(
                g,
                qkv_x,
                &self.x_block.attn,
                qkv_c,
                &self.context_block.attn,
                c.heads,
            )
        })?;
        let nx = g.shape(x)[1];
        let nc = g.shape(ctx)[1];
        let attn_x = layout::slice(g, joint, 1, 0, nx)?;
        let proj = self
            .x_block
            .attn
            .proj
            .as_ref()
            .expect("image stream has a projection");
        let out_x = g.scoped("x.attn.proj", |g| proj.forward(g, attn_x))?;
        let mlp_x = self.x_block.mlp.as_ref().expect("image stream has an MLP");
        // The last residual before the MLP is fused with the MLP's adaLN.
        let x = match (&self.x_block.attn2, hx2) {
            (Some(attn2), Some(hx2)) => {
                let x = elementwise::gated_residual(g, x, mx.gate_msa(), out_x)?;
                let out2 = g.scoped("x.attn2", |g| {
                    let qkv = g.scoped("qkv", |g| attn2.qkv.forward(g, hx2))?;
                    let mut o = AttentionOptions::new(c.heads);
                    if let Some((q, k)) = &attn2.ln_qk {
                        o.qk_norm = Some((g.weight("ln_q", q), g.weight("ln_k", k)));
                    }
                    let view = |col_offset| Heads {
                        value: qkv,
                        col_offset,
                    };
                    let a = attention::attention(g, view(0), view(hidden), view(2 * hidden), &o)?;
                    let p = attn2.proj.as_ref().expect("attn2 has a projection");
                    g.scoped("proj", |g| p.forward(g, a))
                })?;
                g.scoped("x.mlp", |g| {
                    residual_then_mlp(g, x, mx.gate_msa2(), out2, mx, mlp_x)
                })?
            }
            _ => g.scoped("x.mlp", |g| {
                residual_then_mlp(g, x, mx.gate_msa(), out_x, mx, mlp_x)
            })?,
        };
        let (Some(cproj), Some(mlp_c)) = (&self.context_block.attn.proj, &self.context_block.mlp)
        else {
            return Ok((x, None));
        };
        let attn_c = layout::slice(g, joint, 1, nx, nc)?;
        let out_c = g.scoped("context.attn.proj", |g| cproj.forward(g, attn_c))?;
        let ctx = g.scoped("context.mlp", |g| {
            residual_then_mlp(g, ctx, mc.gate_msa(), out_c, mc, mlp_c)
        })?;
        Ok((x, Some(ctx)))
    }
}

/// s' = s + gate · branch, then s' + gate_mlp · MLP(LN(s')·(1 + scale_mlp) + shift_mlp),
/// the residual and the MLP's adaLN fused into one kernel.
fn residual_then_mlp(
    g: &mut Graph,
    s: Value,
    gate: ModChunk,
    branch: Value,
    m: Modulation,
    mlp: &Mlp,
) -> Result<Value> {
    let (s, h) = norm::residual_adaln(g, s, gate, branch, m.shift_mlp(), m.scale_mlp(), EPS)?;
    let y = mlp.forward(g, h, Act::GeluTanh)?;
    elementwise::gated_residual(g, s, m.gate_mlp(), y)
}

/// The heads of one stream's q or k, RMS-normalised with that stream's weights.
fn normed(g: &mut Graph, qkv: Value, col: usize, heads: usize, w: &Tensor) -> Result<Value> {
    let s = g.shape(qkv).to_vec();
    let rows = layout::strided_copy(
        g,
        "heads",
        qkv,
        col,
        &[s[0] * s[1], heads, HEAD_DIM],
        &[s[2], HEAD_DIM, 1],
    )?;
    let wv = g.weight("ln", w);
    let n = norm::rms_norm(g, rows, Some(wv), EPS)?;
    g.reshape(n, &[s[0], s[1], heads * HEAD_DIM])
}

/// Attention over the image and context tokens together ([x ‖ context] on the
/// token axis, as diffusers orders them); returns [batch, nx + nc, hidden].
fn joint_attention(
    g: &mut Graph,
    qkv_x: Value,
    ax: &Attention,
    qkv_c: Value,
    ac: &Attention,
    heads: usize,
) -> Result<Value> {
    let w = heads * HEAD_DIM;
    let o = AttentionOptions::new(heads);
    match (&ax.ln_qk, &ac.ln_qk) {
        (None, None) => {
            let qkv = layout::concat(g, qkv_x, qkv_c, 1)?;
            let view = |col_offset| Heads {
                value: qkv,
                col_offset,
            };
            attention::attention(g, view(0), view(w), view(2 * w), &o)
        }
        (Some((qx, kx)), Some((qc, kc))) => {
            // Each stream has its own q/k norm weights: normalise before joining.
            let q = {
                let a = normed(g, qkv_x, 0, heads, qx)?;
                let b = normed(g, qkv_c, 0, heads, qc)?;
                layout::concat(g, a, b, 1)?
            };
            let k = {
                let a = normed(g, qkv_x, w, heads, kx)?;
                let b = normed(g, qkv_c, w, heads, kc)?;
                layout::concat(g, a, b, 1)?
            };
            let v = {
                let a = layout::slice(g, qkv_x, 2, 2 * w, w)?;
                let b = layout::slice(g, qkv_c, 2, 2 * w, w)?;
                layout::concat(g, a, b, 1)?
            };
            attention::attention(g, q.into(), k.into(), v.into(), &o)
        }
        _ => Err(g.shape_error("joint_attn", "q/k norm present in one stream only")),
    }
}

/// The sinusoidal timestep embedding [batch, 256] of t = sigma·1000, computed as
/// diffusers does (f32 arithmetic, cos half first).
pub fn timestep_embedding(t: &[f32]) -> Vec<f32> {
    let half = TIMESTEP_DIM / 2;
    let mut out = Vec::with_capacity(t.len() * TIMESTEP_DIM);
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln * i as f32 / half as f32).exp())
        .collect();
    for &ti in t {
        let args: Vec<f32> = freqs.iter().map(|f| ti * f).collect();
        out.extend(args.iter().map(|a| (*a as f64).cos() as f32));
        out.extend(args.iter().map(|a| (*a as f64).sin() as f32));
    }
    out
}

/// A planned MMDiT forward pass for one set of shapes, replayable per step.
pub struct MmditRun {
    plan: crate::graph::Plan,
    x: Value,
    context: Value,
    pooled: Value,
    t_emb: Value,
    out: Value,
    batch: usize,
}

impl MmditRun {
    /// Plans the forward pass for latents [batch, in, height, width] and `tokens` context tokens.
    pub fn new(
        gpu: &Gpu,
        model: &Mmdit,
        batch: usize,
        height: usize,
        width: usize,
        tokens: usize,
    ) -> Result<MmditRun> {
        Self::new_skipping(gpu, model, batch, height, width, tokens, &[])
    }

    /// [`MmditRun::new`] with the blocks in `skip` bypassed.
    pub fn new_skipping(
        gpu: &Gpu,
        model: &Mmdit,
        batch: usize,
        height: usize,
        width: usize,
        tokens: usize,
        skip: &[usize],
    ) -> Result<MmditRun> {
        let c = &model.config;
        let mut g = Graph::new(gpu.target());
        let x = g.input(
            "latents",
            &[batch, c.in_channels, height, width],
            DType::F32,
        );
        let context = g.input("context", &[batch, tokens, c.context_dim], DType::F32);
        let pooled = g.input("pooled", &[batch, c.pooled_dim], DType::F32);
        let t_emb = g.input("t_emb", &[batch, TIMESTEP_DIM], DType::F32);
        let out = model.forward_skipping(&mut g, x, context, pooled, t_emb, skip)?;
        g.keep(out);
        Ok(MmditRun {
            plan: g.plan(gpu)?,
            x,
            context,
            pooled,
            t_emb,
            out,
            batch,
        })
    }

    /// Writes the text conditioning, which stays the same for every step.
    pub fn set_conditioning(&self, gpu: &Gpu, context: &[f32], pooled: &[f32]) -> Result<()> {
        self.plan.write(gpu, self.context, context)?;
        self.plan.write(gpu, self.pooled, pooled)
    }

    fn set_step(&self, gpu: &Gpu, latents: &[f32], t: &[f32]) -> Result<()> {
        if t.len() != self.batch {
            return Err(crate::Error::Graph(format!(
                "{} timesteps for a batch of {}",
                t.len(),
                self.batch
            )));
        }
        self.plan.write(gpu, self.x, latents)?;
        self.plan.write(gpu, self.t_emb, &timestep_embedding(t))
    }

    /// One denoising evaluation (after [`MmditRun::set_conditioning`]):
    /// latents and timesteps t = sigma·1000, one per batch entry → velocity.
    pub fn step(&self, gpu: &Gpu, latents: &[f32], t: &[f32]) -> Result<Vec<f32>> {
        self.set_step(gpu, latents, t)?;
        self.plan.run(gpu)?;
        self.plan.read(gpu, self.out)
    }

    /// [`MmditRun::step`] with per-op GPU timings.
    pub fn step_profiled(
        &self,
        gpu: &Gpu,
        latents: &[f32],
        t: &[f32],
    ) -> Result<(Vec<f32>, crate::gpu::profile::Profile)> {
        self.set_step(gpu, latents, t)?;
        let prof = self.plan.run_profiled(gpu)?;
        Ok((self.plan.read(gpu, self.out)?, prof))
    }

    /// Runs once with these inputs (timesteps t = sigma·1000, one per batch entry).
    pub fn run(
        &self,
        gpu: &Gpu,
        latents: &[f32],
        context: &[f32],
        pooled: &[f32],
        t: &[f32],
    ) -> Result<Vec<f32>> {
        self.set_conditioning(gpu, context, pooled)?;
        self.step(gpu, latents, t)
    }

    /// The plan (for profiling).
    pub fn plan(&self) -> &crate::graph::Plan {
        &self.plan
    }
}
