//! CLIP text encoders (CLIP-L/14 with quick-GELU, OpenCLIP bigG/14 with GELU):
//! pre-LN transformer with a causal mask. SD3 takes the penultimate layer's
//! hidden states (no final LayerNorm) and, as the pooled vector, the final
//! LayerNorm of the last layer at the end-of-text token, projected.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::models::layers::{LayerNorm, Linear};
use crate::ops::attention::{self, AttentionOptions, Heads, HEAD_DIM};
use crate::ops::elementwise::{self, Act};
use crate::ops::layout;
use crate::tensor::{DType, Tensor};
use crate::weights::text::TextSource;
use crate::weights::{TensorProvider, WeightsError};

/// The architecture, from config.json or the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// Width.
    pub hidden: usize,
    /// Heads (64 wide).
    pub heads: usize,
    /// Layers.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Positions (77).
    pub positions: usize,
    /// Width of the projected pooled vector.
    pub projection: usize,
    /// MLP width.
    pub intermediate: usize,
    /// MLP activation.
    pub act: Act,
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Pool at the first occurrence of the highest id (configs with
    /// `eos_token_id` 2, as SD3's) rather than at the first `eos_token_id`.
    pub pool_at_max_id: bool,
    /// End-of-text id (when not pooling at the highest id).
    pub eos_token_id: u32,
}

/// One pre-LN transformer layer.
pub struct ClipLayer {
    /// Before attention.
    pub layer_norm1: LayerNorm,
    /// q, k, v projections fused.
    pub qkv: Linear,
    /// Output projection.
    pub out_proj: Linear,
    /// Before the MLP.
    pub layer_norm2: LayerNorm,
    /// MLP in.
    pub fc1: Linear,
    /// MLP out.
    pub fc2: Linear,
}

impl ClipLayer {
    /// Every tensor of the layer, in a fixed order (what streaming moves).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.layer_norm1.tensors_mut();
        v.extend(self.qkv.tensors_mut());
        v.extend(self.out_proj.tensors_mut());
        v.extend(self.layer_norm2.tensors_mut());
        v.extend(self.fc1.tensors_mut());
        v.extend(self.fc2.tensors_mut());
        v
    }
}

/// A CLIP text model with projection.
pub struct Clip {
    /// Architecture.
    pub config: ClipConfig,
    /// [vocab, hidden].
    pub token_embedding: Tensor,
    /// [positions, hidden].
    pub position_embedding: Tensor,
    /// Layers.
    pub layers: Vec<ClipLayer>,
    /// Final LayerNorm.
    pub final_layer_norm: LayerNorm,
    /// [projection, hidden], no bias.
    pub text_projection: Tensor,
}

const P: &str = "text_model.";

/// The architecture of a CLIP text encoder, from its tensors (and
/// config.json where there is one), every size checked against sane bounds.
pub fn detect(src: &TextSource, default_act: Act) -> Result<ClipConfig> {
    use crate::weights::{check_dim, config_f64, config_usize};
    let origin = src.path.as_path();
    let cfg = src.config.as_ref();
    let [vocab, hidden] = src.dims::<2>(
        &format!("{P}embeddings.token_embedding.weight"),
        "[vocab, hidden]",
    )?;
    let [positions, _] = src.dims::<2>(
        &format!("{P}embeddings.position_embedding.weight"),
        "[positions, hidden]",
    )?;
    let [projection, _] = src.dims::<2>("text_projection.weight", "[projection, hidden]")?;
    let [intermediate, _] = src.dims::<2>(
        &format!("{P}encoder.layers.0.mlp.fc1.weight"),
        "[intermediate, hidden]",
    )?;
    check_dim(origin, "the CLIP vocabulary", vocab, 1, 1 << 24)?;
    check_dim(origin, "the CLIP width", hidden, HEAD_DIM, 1 << 14)?;
    check_dim(
        origin,
        "the CLIP positions",
        positions,
        crate::tokenize::CLIP_TOKENS,
        1 << 16,
    )?;
    check_dim(origin, "the CLIP projection width", projection, 1, 1 << 14)?;
    check_dim(origin, "the CLIP MLP width", intermediate, 1, 1 << 18)?;
    if hidden % HEAD_DIM != 0 {
        return Err(Error::Weights(WeightsError::Unsupported(format!(
            "{}: CLIP width {hidden} is not a multiple of the head dim 64",
            origin.display()
        ))));
    }
    let heads =
        config_usize(cfg, origin, "num_attention_heads", 1, 1024)?.unwrap_or(hidden / HEAD_DIM);
    if heads * HEAD_DIM != hidden {
        return Err(Error::Weights(WeightsError::Unsupported(format!(
            "{}: {heads} heads of {hidden} give a head dim other than 64",
            origin.display()
        ))));
    }
    let layers = src.count_layers(&format!("{P}encoder.layers."));
    // SD3 reads the penultimate layer's states.
    check_dim(origin, "the number of CLIP layers", layers, 2, 1024)?;
    // Without a config the caller's role decides: CLIP-L uses quick-GELU, OpenCLIP bigG GELU.
    let act = match src.config_str("hidden_act").as_deref() {
        Some("quick_gelu") => Act::QuickGelu,
        Some("gelu") => Act::GeluErf,
        Some("gelu_new") | Some("gelu_pytorch_tanh") => Act::GeluTanh,
        Some(other) => {
            return Err(Error::Weights(WeightsError::Unsupported(format!(
                "{}: hidden_act '{other}' is not supported",
                origin.display()
            ))))
        }
        None => default_act,
    };
    let eos = config_usize(cfg, origin, "eos_token_id", 0, u32::MAX as usize)?.unwrap_or(2) as u32;
    let eps = config_f64(cfg, origin, "layer_norm_eps", 1e-12, 0.1)?.unwrap_or(1e-5) as f32;
    Ok(ClipConfig {
        hidden,
        heads,
        layers,
        vocab,
        positions,
        projection,
        intermediate,
        act,
        eps,
        pool_at_max_id: eos == 2,
        eos_token_id: eos,
    })
}

impl Clip {
    /// Loads a CLIP text encoder; matrices stored as `matrix`. `default_act`
    /// applies when there is no config.json (quick-GELU for CLIP-L, GELU for CLIP-G).
    pub fn load(gpu: &Gpu, src: &TextSource, matrix: DType, default_act: Act) -> Result<Clip> {
        let c = detect(src, default_act)?;
        Self::load_from(gpu, &c, src, matrix)
    }

    /// Builds the encoder of architecture `c` with tensors from `src`.
    pub fn load_from(
        gpu: &Gpu,
        c: &ClipConfig,
        src: &dyn TensorProvider,
        matrix: DType,
    ) -> Result<Clip> {
        Self::load_budgeted(gpu, c, src, matrix, None)
    }

    /// [`Clip::load_from`] within a GPU memory budget (bytes, activations):
    /// the layers that do not fit are streamed (see [`crate::stream`]).
    pub fn load_budgeted(
        gpu: &Gpu,
        c: &ClipConfig,
        src: &dyn TensorProvider,
        matrix: DType,
        budget: Option<(u64, u64)>,
    ) -> Result<Clip> {
        let c = c.clone();
        let d = c.hidden;
        let t = |name: &str, shape: &[usize], dt: DType| -> Result<Tensor> {
            src.tensor(gpu, name, shape, dt)
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear {
                weight: src.matrix(gpu, &format!("{name}.weight"), &[out, inp], matrix)?,
                bias: Some(t(&format!("{name}.bias"), &[out], DType::F32)?),
            })
        };
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: t(&format!("{name}.weight"), &[d], DType::F32)?,
                bias: t(&format!("{name}.bias"), &[d], DType::F32)?,
            })
        };
        // Outside the layers first: these always stay.
        let token_embedding = src.matrix(
            gpu,
            &format!("{P}embeddings.token_embedding.weight"),
            &[c.vocab, d],
            matrix,
        )?;
        let position_embedding = t(
            &format!("{P}embeddings.position_embedding.weight"),
            &[c.positions, d],
            DType::F32,
        )?;
        let final_layer_norm = ln(&format!("{P}final_layer_norm"))?;
        let text_projection =
            src.matrix(gpu, "text_projection.weight", &[c.projection, d], matrix)?;
        if let Some((bytes, activations)) = budget {
            crate::stream::check_room("clip", gpu.memory.current() + activations, bytes)?;
        }
        let mut stream = budget.map(|_| crate::stream::StreamBuilder::new("clip"));
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let l = format!("{P}encoder.layers.{i}");
            let names = |p: &str| -> Vec<String> {
                ["q", "k", "v"]
                    .iter()
                    .map(|x| format!("{l}.self_attn.{x}_proj.{p}"))
                    .collect()
            };
            let qkv = Linear {
                weight: src.matrix_concat(gpu, &names("weight"), &[3 * d, d], matrix)?,
                bias: Some(src.tensor_concat(gpu, &names("bias"), &[3 * d], DType::F32)?),
            };
            let ff = c.intermediate;
            layers.push(ClipLayer {
                layer_norm1: ln(&format!("{l}.layer_norm1"))?,
                qkv,
                out_proj: lin(&format!("{l}.self_attn.out_proj"), d, d)?,
                layer_norm2: ln(&format!("{l}.layer_norm2"))?,
                fc1: lin(&format!("{l}.mlp.fc1"), ff, d)?,
                fc2: lin(&format!("{l}.mlp.fc2"), d, ff)?,
            });
            if let (Some(s), Some(b)) = (&mut stream, layers.last_mut()) {
                s.add(gpu, i, b.tensors_mut())?;
            }
        }
        if let (Some(s), Some(budget)) = (stream, budget) {
            crate::stream::settle(gpu, s, budget, &mut layers, |b| b.tensors_mut())?;
        }
        Ok(Clip {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: c,
        })
    }

    /// The row pooled for one prompt's ids, as transformers picks it.
    pub fn pool_index(&self, ids: &[u32]) -> usize {
        if self.config.pool_at_max_id {
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&i| i == self.config.eos_token_id)
                .unwrap_or(ids.len().saturating_sub(1))
        }
    }

    /// Records the encoder: ids [batch·tokens] (u32) and the pooled rows
    /// [batch] (b·tokens + pool index) → (penultimate hidden states
    /// [batch, tokens, hidden], projected pooled vector [batch, projection]).
    pub fn forward(
        &self,
        g: &mut Graph,
        ids: Value,
        pool_rows: Value,
        batch: usize,
    ) -> Result<(Value, Value)> {
        let c = &self.config;
        let n = g.shape(ids)[0];
        let tokens = n / batch.max(1);
        if tokens * batch != n || tokens > c.positions {
            return Err(g.shape_error(
                "clip",
                format!(
                    "{n} ids do not form {batch} prompts of at most {} tokens",
                    c.positions
                ),
            ));
        }
        g.scoped("clip", |g| {
            crate::models::layers::no_low_rank(g, &self.token_embedding, "token_embedding")?;
            let table = g.weight("token_embedding", &self.token_embedding);
            let x = layout::gather(g, table, ids)?;
            let x = g.reshape(x, &[batch, tokens, c.hidden])?;
            let pos_table = g.weight("position_embedding", &self.position_embedding);
            let pos = layout::slice(g, pos_table, 0, 0, tokens)?;
            let mut x = elementwise::add(g, x, pos)?;
            let mut penultimate = x;
            for (i, l) in self.layers.iter().enumerate() {
                if i + 1 == self.layers.len() {
                    penultimate = x;
                }
                x = g.scoped(&format!("layer{i}"), |g| l.forward(g, x, c))?;
            }
            let flat = g.reshape(x, &[batch * tokens, c.hidden])?;
            let pooled = layout::gather(g, flat, pool_rows)?;
            let pooled = self.final_layer_norm.forward(g, pooled, c.eps)?;
            let proj = g.weight("text_projection", &self.text_projection);
            let pooled = crate::ops::linear::linear(g, pooled, proj, None)?;
            Ok((penultimate, pooled))
        })
    }
}

impl ClipLayer {
    fn forward(&self, g: &mut Graph, x: Value, c: &ClipConfig) -> Result<Value> {
        let h = self.layer_norm1.forward(g, x, c.eps)?;
        let qkv = g.scoped("qkv", |g| self.qkv.forward(g, h))?;
        let mut o = AttentionOptions::new(c.heads);
        o.causal = true;
        let view = |col_offset| Heads {
            value: qkv,
            col_offset,
        };
        let a = attention::attention(g, view(0), view(c.hidden), view(2 * c.hidden), &o)?;
        let a = g.scoped("out_proj", |g| self.out_proj.forward(g, a))?;
        let x = elementwise::add(g, x, a)?;
        let h = self.layer_norm2.forward(g, x, c.eps)?;
        let h = g.scoped("fc1", |g| self.fc1.forward(g, h))?;
        let h = elementwise::activation(g, h, c.act)?;
        let h = g.scoped("fc2", |g| self.fc2.forward(g, h))?;
        elementwise::add(g, x, h)
    }
}

/// Runs a CLIP encoder over tokenized prompts (each `positions` long):
/// (penultimate hidden states [batch, tokens, hidden], pooled [batch, projection]).
pub fn encode(gpu: &Gpu, clip: &Clip, prompts: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<f32>)> {
    let (batch, tokens) = super::check_prompts("CLIP", prompts, clip.config.vocab)?;
    let mut g = Graph::new(gpu.target());
    let ids = g.input("ids", &[batch * tokens], DType::U32);
    let rows = g.input("pool_rows", &[batch], DType::U32);
    let (seq, pooled) = clip.forward(&mut g, ids, rows, batch)?;
    g.keep(seq);
    g.keep(pooled);
    let plan = g.plan(gpu)?;
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let pool: Vec<u32> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| (b * tokens + clip.pool_index(p)) as u32)
        .collect();
    plan.write_u32(gpu, ids, &flat)?;
    plan.write_u32(gpu, rows, &pool)?;
    plan.run(gpu)?;
    Ok((plan.read(gpu, seq)?, plan.read(gpu, pooled)?))
}
