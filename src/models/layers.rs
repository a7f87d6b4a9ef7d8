//! Layers shared by several models: linear, MLP, LayerNorm with affine weights.

use crate::error::Result;
use crate::graph::{Graph, Value};
use crate::ops::elementwise::{self, Act};
use crate::ops::{linear, norm};
use crate::tensor::Tensor;

/// A linear layer's weights on the GPU.
pub struct Linear {
    /// [out, in], f32 or f16.
    pub weight: Tensor,
    /// [out].
    pub bias: Option<Tensor>,
}

/// A low-rank update kept beside a block-quantized weight (LoRAs on GGUF
/// weights): y += (x · downᵀ) · upᵀ, never a dequantized copy of the weight.
#[derive(Clone, Debug)]
pub struct LowRank {
    /// [rank, in], f32: the LoRAs' down matrices stacked.
    pub down: Tensor,
    /// [out, rank], f32: their up matrices, scaled by strength · α / r.
    pub up: Tensor,
}

/// An error when `t` carries a low-rank update that `what` cannot apply
/// (only linear layers add it in their pass).
pub(crate) fn no_low_rank(g: &Graph, t: &Tensor, what: &str) -> Result<()> {
    if t.low_rank.is_some() {
        return Err(g.shape_error(
            what,
            "a LoRA on a block-quantized (GGUF) weight applies to linear layers only; this one is a convolution or an embedding table",
        ));
    }
    Ok(())
}

impl Linear {
    /// The weight and bias (not a low-rank update's factors), for streaming.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = vec![&mut self.weight];
        v.extend(self.bias.as_mut());
        v
    }

    /// Records x · weightᵀ + bias.
    pub fn forward(&self, g: &mut Graph, x: Value) -> Result<Value> {
        let w = g.weight("weight", &self.weight);
        let b = self.bias.as_ref().map(|b| g.weight("bias", b));
        let y = linear::linear(g, x, w, b)?;
        match self.weight.low_rank.as_deref() {
            None => Ok(y),
            Some(lr) => g.scoped("lora", |g| {
                let down = g.weight("down", &lr.down);
                let up = g.weight("up", &lr.up);
                let u = linear::linear(g, x, down, None)?;
                let v = linear::linear(g, u, up, None)?;
                elementwise::add(g, y, v)
            }),
        }
    }
}

/// Linear → activation → Linear.
pub struct Mlp {
    /// First layer (`mlp.0` / `fc1`).
    pub fc1: Linear,
    /// Second layer (`mlp.2` / `fc2`).
    pub fc2: Linear,
}

impl Mlp {
    /// Both layers' tensors, for streaming.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        let mut v = self.fc1.tensors_mut();
        v.extend(self.fc2.tensors_mut());
        v
    }
}

impl Mlp {
    /// Records fc2(act(fc1(x))) under the scopes `fc1`, `fc2`.
    pub fn forward(&self, g: &mut Graph, x: Value, act: Act) -> Result<Value> {
        let h = g.scoped("fc1", |g| self.fc1.forward(g, x))?;
        let h = elementwise::activation(g, h, act)?;
        g.scoped("fc2", |g| self.fc2.forward(g, h))
    }
}

/// A LayerNorm's weight and bias.
pub struct LayerNorm {
    /// [d].
    pub weight: Tensor,
    /// [d].
    pub bias: Tensor,
}

impl LayerNorm {
    /// Weight and bias, for streaming.
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        vec![&mut self.weight, &mut self.bias]
    }
}

impl LayerNorm {
    /// Records the normalisation of x's last axis.
    pub fn forward(&self, g: &mut Graph, x: Value, eps: f32) -> Result<Value> {
        let w = g.weight("weight", &self.weight);
        let b = g.weight("bias", &self.bias);
        norm::layer_norm(g, x, Some(w), Some(b), eps)
    }
}
