//! The T5 v1.1 encoder (T5-XXL in SD3): RMSNorm without mean or bias, no
//! 1/√d attention scale, a relative position bias computed once from layer 0's
//! table and shared by every layer, gated-GELU (tanh) feed-forward. The
//! residual stream stays f32 (T5's activations overflow f16).

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Graph, Value};
use crate::models::layers::Linear;
use crate::ops::attention::{self, AttentionOptions, Heads, HEAD_DIM};
use crate::ops::elementwise::{self, Act};
use crate::ops::{layout, norm};
use crate::tensor::{DType, Tensor};
use crate::weights::text::TextSource;
use crate::weights::{TensorProvider, WeightsError};

/// The architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    /// Model width.
    pub d_model: usize,
    /// Heads (64 wide).
    pub heads: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Layers.
    pub layers: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Relative-position buckets.
    pub buckets: usize,
    /// Distance beyond which positions share a bucket.
    pub max_distance: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
}

impl T5Block {
    /// Every tensor of the block, in a fixed order (what streaming moves).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.ln0];
        v.extend(self.qkv.tensors_mut());
        v.extend(self.o.tensors_mut());
        v.push(&mut self.ln1);
        v.extend(self.wi_0.tensors_mut());
        v.extend(self.wi_1.tensors_mut());
        v.extend(self.wo.tensors_mut());
        v
    }
}

/// One encoder block.
pub struct T5Block {
    /// RMSNorm before attention.
    pub ln0: Tensor,
    /// q, k, v fused (no bias).
    pub qkv: Linear,
    /// Output projection.
    pub o: Linear,
    /// RMSNorm before the feed-forward.
    pub ln1: Tensor,
    /// Gate branch (GELU).
    pub wi_0: Linear,
    /// Linear branch.
    pub wi_1: Linear,
    /// Output.
    pub wo: Linear,
}

/// The encoder.
pub struct T5 {
    /// Architecture.
    pub config: T5Config,
    /// [vocab, d_model].
    pub shared: Tensor,
    /// Blocks.
    pub blocks: Vec<T5Block>,
    /// Final RMSNorm.
    pub final_layer_norm: Tensor,
    /// Layer 0's relative attention bias table [buckets, heads], on the CPU.
    pub relative_attention_bias: Vec<f32>,
}

/// T5's bidirectional relative-position bucket, reproducing transformers'
/// float32 arithmetic (which decides the bucket at exact boundaries).
pub fn relative_position_bucket(relative: i64, buckets: usize, max_distance: usize) -> usize {
    let half = (buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as i64;
    let max_exact = half / 2;
    if n < max_exact {
        return (bucket + n) as usize;
    }
    let ratio = (n as f32) / (max_exact as f32);
    let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = max_exact + ((ratio.ln() / scale) * ((half - max_exact) as f32)) as i64;
    bucket += large.min(half - 1);
    bucket as usize
}

impl T5 {
    /// Loads a T5 encoder; matrices stored as `matrix`.
    pub fn load(gpu: &Gpu, src: &TextSource, matrix: DType) -> Result<T5> {
        let (c, shared_name) = Self::detect(src)?;
        Self::load_from(gpu, &c, shared_name, src, matrix)
    }

    /// The architecture of a T5 encoder from its tensors (and config.json
    /// where there is one), every size checked against sane bounds; also the
    /// name of its embedding table.
    pub fn detect(src: &TextSource) -> Result<(T5Config, &'static str)> {
        use crate::weights::{check_dim, config_f64, config_usize};
        let origin = src.path.as_path();
        let cfg = src.config.as_ref();
        let shared_name = if src.has("shared.weight") {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let [vocab, d] = src.dims::<2>(shared_name, "[vocab, d_model]")?;
        let b0 = "encoder.block.0.layer.0.SelfAttention";
        let rel_name = format!("{b0}.relative_attention_bias.weight");
        let [buckets, heads] = src.dims::<2>(&rel_name, "[buckets, heads]")?;
        let [inner, _] = src.dims::<2>(&format!("{b0}.q.weight"), "[heads·64, d_model]")?;
        check_dim(origin, "the T5 vocabulary", vocab, 1, 1 << 24)?;
        check_dim(origin, "the T5 width", d, 1, 1 << 16)?;
        check_dim(origin, "the T5 heads", heads, 1, 1024)?;
        if inner != heads * HEAD_DIM {
            return Err(Error::Weights(WeightsError::Unsupported(format!(
                "{}: T5 attention of width {inner} in {heads} heads is not 64 per head",
                origin.display()
            ))));
        }
        let [d_ff, _] = src
            .dims::<2>(
                "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                "[d_ff, d_model]",
            )
            .map_err(|e| {
                Error::Weights(WeightsError::Unsupported(format!(
                    "{}: not a gated-GELU T5 v1.1 encoder ({e})",
                    origin.display()
                )))
            })?;
        check_dim(origin, "the T5 feed-forward width", d_ff, 1, 1 << 18)?;
        let layers = src.count_layers("encoder.block.");
        check_dim(origin, "the number of T5 layers", layers, 1, 1024)?;
        // The bucket arithmetic needs at least one exact bucket per direction.
        check_dim(origin, "the T5 relative-position buckets", buckets, 4, 4096)?;
        if let Some(n) = config_usize(cfg, origin, "relative_attention_num_buckets", 0, usize::MAX)?
        {
            if n != buckets {
                return Err(Error::Weights(WeightsError::Shape {
                    file: src.ck.file_of(&format!("{}{rel_name}", src.prefix)),
                    name: format!("{}{rel_name}", src.prefix),
                    expected: format!(
                        "{n} rows, as config.json's relative_attention_num_buckets says: [{n}, {heads}]"
                    ),
                    found: vec![buckets, heads],
                }));
            }
        }
        // Distances beyond the exact buckets are spread logarithmically up to
        // max_distance, which must therefore lie beyond them.
        let max_distance =
            config_usize(cfg, origin, "relative_attention_max_distance", 0, 1 << 20)?
                .unwrap_or(128);
        check_dim(
            origin,
            "relative_attention_max_distance (128 unless config.json says otherwise)",
            max_distance,
            buckets / 4 + 1,
            1 << 20,
        )?;
        let eps = config_f64(cfg, origin, "layer_norm_epsilon", 1e-12, 0.1)?.unwrap_or(1e-6) as f32;
        let c = T5Config {
            d_model: d,
            heads,
            d_ff,
            layers,
            vocab,
            buckets,
            max_distance,
            eps,
        };
        Ok((c, shared_name))
    }

    /// Builds the encoder of architecture `c` with tensors from `src`; the
    /// embedding is `shared_name` (`shared.weight` or `encoder.embed_tokens.weight`).
    pub fn load_from(
        gpu: &Gpu,
        c: &T5Config,
        shared_name: &str,
        src: &dyn TensorProvider,
        matrix: DType,
    ) -> Result<T5> {
        Self::load_budgeted(gpu, c, shared_name, src, matrix, None)
    }

    /// [`T5::load_from`] within a GPU memory budget (bytes, activations):
    /// the blocks that do not fit are streamed (see [`crate::stream`]).
    pub fn load_budgeted(
        gpu: &Gpu,
        c: &T5Config,
        shared_name: &str,
        src: &dyn TensorProvider,
        matrix: DType,
        budget: Option<(u64, u64)>,
    ) -> Result<T5> {
        let c = c.clone();
        let (vocab, d, d_ff, inner) = (c.vocab, c.d_model, c.d_ff, c.heads * HEAD_DIM);
        let b0 = "encoder.block.0.layer.0.SelfAttention";
        let t = |name: &str, shape: &[usize], dt: DType| -> Result<Tensor> {
            src.tensor(gpu, name, shape, dt)
        };
        let lin = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            Ok(Linear {
                weight: src.matrix(gpu, &format!("{name}.weight"), &[out, inp], matrix)?,
                bias: None,
            })
        };
        // Outside the blocks first: these always stay.
        let shared = src.matrix(gpu, shared_name, &[vocab, d], matrix)?;
        let final_layer_norm = t("encoder.final_layer_norm.weight", &[d], DType::F32)?;
        if let Some((bytes, activations)) = budget {
            crate::stream::check_room("t5", gpu.memory.current() + activations, bytes)?;
        }
        let mut stream = budget.map(|_| crate::stream::StreamBuilder::new("t5"));
        let mut blocks = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let a = format!("encoder.block.{i}.layer.0");
            let f = format!("encoder.block.{i}.layer.1");
            let names: Vec<String> = ["q", "k", "v"]
                .iter()
                .map(|x| format!("{a}.SelfAttention.{x}.weight"))
                .collect();
            blocks.push(T5Block {
                ln0: t(&format!("{a}.layer_norm.weight"), &[d], DType::F32)?,
                qkv: Linear {
                    weight: src.matrix_concat(gpu, &names, &[3 * inner, d], matrix)?,
                    bias: None,
                },
                o: lin(&format!("{a}.SelfAttention.o"), d, inner)?,
                ln1: t(&format!("{f}.layer_norm.weight"), &[d], DType::F32)?,
                wi_0: lin(&format!("{f}.DenseReluDense.wi_0"), d_ff, d)?,
                wi_1: lin(&format!("{f}.DenseReluDense.wi_1"), d_ff, d)?,
                wo: lin(&format!("{f}.DenseReluDense.wo"), d, d_ff)?,
            });
            if let (Some(s), Some(b)) = (&mut stream, blocks.last_mut()) {
                s.add(gpu, i, b.tensors_mut())?;
            }
        }
        if let (Some(s), Some(budget)) = (stream, budget) {
            crate::stream::settle(gpu, s, budget, &mut blocks, |b| b.tensors_mut())?;
        }
        Ok(T5 {
            shared,
            blocks,
            final_layer_norm,
            relative_attention_bias: src.host(
                &format!("{b0}.relative_attention_bias.weight"),
                &[c.buckets, c.heads],
            )?,
            config: c,
        })
    }

    /// The position bias [heads, tokens, tokens] for a sequence length.
    pub fn position_bias(&self, tokens: usize) -> Vec<f32> {
        let c = &self.config;
        let mut out = vec![0f32; c.heads * tokens * tokens];
        for i in 0..tokens {
            for j in 0..tokens {
                let b = relative_position_bucket(j as i64 - i as i64, c.buckets, c.max_distance);
                for h in 0..c.heads {
                    out[(h * tokens + i) * tokens + j] =
                        self.relative_attention_bias[b * c.heads + h];
                }
            }
        }
        out
    }

    /// Records the encoder: ids [batch·tokens] (u32), bias [heads, tokens,
    /// tokens] → hidden states [batch, tokens, d_model].
    pub fn forward(&self, g: &mut Graph, ids: Value, bias: Value, batch: usize) -> Result<Value> {
        let c = &self.config;
        let tokens = g.shape(ids)[0] / batch.max(1);
        g.scoped("t5", |g| {
            crate::models::layers::no_low_rank(g, &self.shared, "shared")?;
            let table = g.weight("shared", &self.shared);
            let x = g.with_activation(DType::F32, |g| layout::gather(g, table, ids))?;
            let mut x = g.reshape(x, &[batch, tokens, c.d_model])?;
            for (i, blk) in self.blocks.iter().enumerate() {
                x = g.scoped(&format!("block{i}"), |g| blk.forward(g, x, bias, c))?;
            }
            let w = g.weight("final_layer_norm", &self.final_layer_norm);
            norm::rms_norm(g, x, Some(w), c.eps)
        })
    }
}

impl T5Block {
    fn forward(&self, g: &mut Graph, x: Value, bias: Value, c: &T5Config) -> Result<Value> {
        let inner = c.heads * HEAD_DIM;
        let w0 = g.weight("ln0", &self.ln0);
        let h = norm::rms_norm(g, x, Some(w0), c.eps)?;
        let qkv = g.scoped("qkv", |g| self.qkv.forward(g, h))?;
        let mut o = AttentionOptions::new(c.heads);
        o.scale = 1.0;
        o.bias = Some(bias);
        let view = |col_offset| Heads {
            value: qkv,
            col_offset,
        };
        let a = attention::attention(g, view(0), view(inner), view(2 * inner), &o)?;
        // T5's residual stream overflows f16: the projections into it (o, wo,
        // which transformers keeps in f32 too) and the stream itself stay f32.
        let x = g.with_activation(DType::F32, |g| {
            let a = g.scoped("o", |g| self.o.forward(g, a))?;
            elementwise::add(g, x, a)
        })?;
        let w1 = g.weight("ln1", &self.ln1);
        let h = norm::rms_norm(g, x, Some(w1), c.eps)?;
        let gate = g.scoped("wi_0", |g| self.wi_0.forward(g, h))?;
        let gate = elementwise::activation(g, gate, Act::GeluTanh)?;
        let lin = g.scoped("wi_1", |g| self.wi_1.forward(g, h))?;
        let h = elementwise::mul(g, gate, lin)?;
        g.with_activation(DType::F32, |g| {
            let h = g.scoped("wo", |g| self.wo.forward(g, h))?;
            elementwise::add(g, x, h)
        })
    }
}

/// Runs T5 over tokenized prompts (all the same length) → [batch, tokens, d_model].
pub fn encode(gpu: &Gpu, t5: &T5, prompts: &[Vec<u32>]) -> Result<Vec<f32>> {
    let (batch, tokens) = super::check_prompts("T5", prompts, t5.config.vocab)?;
    let mut g = Graph::new(gpu.target());
    let ids = g.input("ids", &[batch * tokens], DType::U32);
    let bias = g.input(
        "position_bias",
        &[t5.config.heads, tokens, tokens],
        DType::F32,
    );
    let out = t5.forward(&mut g, ids, bias, batch)?;
    g.keep(out);
    let plan = g.plan(gpu)?;
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    plan.write_u32(gpu, ids, &flat)?;
    plan.write(gpu, bias, &t5.position_bias(tokens))?;
    plan.run(gpu)?;
    plan.read(gpu, out)
}
