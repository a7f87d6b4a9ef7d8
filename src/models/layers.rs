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

impl Linear {
    /// Records x · weightᵀ + bias.
    pub fn forward(&self, g: &mut Graph, x: Value) -> Result<Value> {
        let w = g.weight("weight", &self.weight);
        let b = self.bias.as_ref().map(|b| g.weight("bias", b));
        linear::linear(g, x, w, b)
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
    /// Records the normalisation of x's last axis.
    pub fn forward(&self, g: &mut Graph, x: Value, eps: f32) -> Result<Value> {
        let w = g.weight("weight", &self.weight);
        let b = g.weight("bias", &self.bias);
        norm::layer_norm(g, x, Some(w), Some(b), eps)
    }
}
