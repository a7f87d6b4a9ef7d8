//! How a model's canonical tensor is found in a checkpoint that names (or
//! splits) it differently.

use super::{Checkpoint, WeightsError};

/// Where the data of one canonical tensor comes from.
#[derive(Clone, Debug)]
pub enum Recipe {
    /// One stored tensor.
    Direct(String),
    /// Stored tensors whose rows are concatenated (q, k, v → qkv).
    Concat(Vec<String>),
    /// One stored tensor whose two halves of dim 0 are exchanged
    /// ((scale, shift) → (shift, scale)).
    SwapHalves(String),
}

impl Recipe {
    /// The (first) stored name, for messages.
    pub fn first(&self) -> &str {
        match self {
            Recipe::Direct(n) | Recipe::SwapHalves(n) => n,
            Recipe::Concat(v) => &v[0],
        }
    }

    fn names(&self) -> &[String] {
        match self {
            Recipe::Direct(n) | Recipe::SwapHalves(n) => std::slice::from_ref(n),
            Recipe::Concat(v) => v,
        }
    }
}

/// Drops trailing size-1 axes: a 1×1 conv [c, c, 1, 1] holds a linear [c, c].
fn squeezed(s: &[usize]) -> &[usize] {
    let mut n = s.len();
    while n > 2 && s[n - 1] == 1 {
        n -= 1;
    }
    &s[..n]
}

impl Checkpoint {
    fn missing(&self, name: &str) -> WeightsError {
        WeightsError::Missing {
            name: name.to_string(),
            source: self.describe(),
        }
    }

    /// Whether every stored part of `r` is present.
    pub fn has_recipe(&self, r: &Recipe) -> bool {
        r.names().iter().all(|n| self.tensors.contains_key(n))
    }

    /// The shape `r` yields.
    pub fn recipe_shape(&self, r: &Recipe) -> Result<Vec<usize>, WeightsError> {
        let mut shape: Option<Vec<usize>> = None;
        for n in r.names() {
            let s = self
                .tensors
                .get(n)
                .map(|e| e.shape.clone())
                .ok_or_else(|| self.missing(n))?;
            shape = Some(match shape {
                None => s,
                Some(mut acc) => {
                    acc[0] += s.first().copied().unwrap_or(0);
                    acc
                }
            });
        }
        shape.ok_or_else(|| self.missing("(empty recipe)"))
    }

    /// Reads `r` as f32, checking that it has shape `expected` (trailing size-1
    /// axes of the stored tensor aside).
    pub fn read_recipe(&self, r: &Recipe, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let found = self.recipe_shape(r)?;
        if found != expected && squeezed(&found) != squeezed(expected) {
            return Err(WeightsError::Shape {
                name: r.first().to_string(),
                expected: expected.to_vec(),
                found,
            });
        }
        let mut data = Vec::new();
        for n in r.names() {
            data.extend(self.read_f32(n)?.1);
        }
        if let Recipe::SwapHalves(_) = r {
            let half = data.len() / 2;
            data.rotate_left(half);
        }
        Ok(data)
    }
}
