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

    pub(crate) fn names(&self) -> &[String] {
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

    /// The file holding `name` (or the checkpoint's description), for messages.
    pub fn file_of(&self, name: &str) -> String {
        self.tensors
            .get(name)
            .and_then(|e| self.files.get(e.file))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| self.describe())
    }

    /// Whether every stored part of `r` is present.
    pub fn has_recipe(&self, r: &Recipe) -> bool {
        r.names().iter().all(|n| self.tensors.contains_key(n))
    }

    /// The shape `r` yields. Concatenated parts must share their rank (≥ 1)
    /// and every axis but the first.
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
                    let fits = !s.is_empty() && s.len() == acc.len() && s[1..] == acc[1..];
                    let rows = acc
                        .first()
                        .zip(s.first())
                        .and_then(|(a, b)| a.checked_add(*b));
                    match (fits, rows) {
                        (true, Some(rows)) => {
                            acc[0] = rows;
                            acc
                        }
                        _ => {
                            return Err(WeightsError::Shape {
                                file: self.file_of(n),
                                name: n.clone(),
                                expected: format!(
                                    "[rows, {}] to stack under '{}'",
                                    acc.get(1..)
                                        .unwrap_or(&[])
                                        .iter()
                                        .map(|d| d.to_string())
                                        .collect::<Vec<_>>()
                                        .join(", "),
                                    r.first()
                                ),
                                found: s,
                            })
                        }
                    }
                }
            });
        }
        shape.ok_or_else(|| self.missing("(empty recipe)"))
    }

    /// The shape of `r` as exactly `N` positive dimensions; `layout` says
    /// what they are (e.g. `[out, in]`) for the error message.
    pub fn recipe_dims<const N: usize>(
        &self,
        r: &Recipe,
        layout: &str,
    ) -> Result<[usize; N], WeightsError> {
        let found = self.recipe_shape(r)?;
        match <[usize; N]>::try_from(found.as_slice()) {
            Ok(d) if d.iter().all(|&x| x > 0) => Ok(d),
            _ => Err(WeightsError::Shape {
                file: self.file_of(r.first()),
                name: r.first().to_string(),
                expected: format!("{N} positive dimensions {layout}"),
                found,
            }),
        }
    }

    /// Reads `r` as f32, checking that it has shape `expected` (trailing size-1
    /// axes of the stored tensor aside).
    pub fn read_recipe(&self, r: &Recipe, expected: &[usize]) -> Result<Vec<f32>, WeightsError> {
        let found = self.recipe_shape(r)?;
        if found != expected && squeezed(&found) != squeezed(expected) {
            return Err(WeightsError::Shape {
                file: self.file_of(r.first()),
                name: r.first().to_string(),
                expected: format!("{expected:?}"),
                found,
            });
        }
        let mut data = Vec::new();
        for n in r.names() {
            let mut part = self.read_f32(n)?.1;
            if let Some(s) = self.weight_scale(n)? {
                part.iter_mut().for_each(|v| *v *= s);
            }
            data.extend(part);
        }
        if let Recipe::SwapHalves(_) = r {
            let half = data.len() / 2;
            data.rotate_left(half);
        }
        Ok(data)
    }

    /// The per-tensor scale of a scaled-fp8 weight (`X.scale_weight` next
    /// to `X.weight`, as ComfyUI's `*_fp8_scaled` files store it), if any.
    pub fn weight_scale(&self, name: &str) -> Result<Option<f32>, WeightsError> {
        let Some(stem) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        let sname = format!("{stem}.scale_weight");
        if !self.tensors.contains_key(&sname) {
            return Ok(None);
        }
        let (_, v) = self.read_f32(&sname)?;
        match v.as_slice() {
            [s] if s.is_finite() => Ok(Some(*s)),
            _ => Err(WeightsError::Shape {
                file: self.file_of(&sname),
                name: sname,
                expected: "one finite number".into(),
                found: vec![v.len()],
            }),
        }
    }

    /// `r` in the file's own packed encoding (f16, bf16, fp8), when every
    /// stored part has that one encoding and no per-tensor scale: the bytes
    /// to keep on the GPU as they are. `None` when it must be widened.
    pub fn read_recipe_packed(
        &self,
        r: &Recipe,
        expected: &[usize],
    ) -> Result<Option<(crate::DType, Vec<u8>)>, WeightsError> {
        let found = self.recipe_shape(r)?;
        if found != expected && squeezed(&found) != squeezed(expected) {
            return Err(WeightsError::Shape {
                file: self.file_of(r.first()),
                name: r.first().to_string(),
                expected: format!("{expected:?}"),
                found,
            });
        }
        let mut dtype = None;
        for n in r.names() {
            let e = self.tensors.get(n).ok_or_else(|| self.missing(n))?;
            let d = e.quant.or(crate::DType::packed_from(e.dtype));
            if d.is_none() || (dtype.is_some() && dtype != d) || self.weight_scale(n)?.is_some() {
                return Ok(None);
            }
            dtype = d;
        }
        let Some(dtype) = dtype else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        for n in r.names() {
            let e = self.tensors.get(n).ok_or_else(|| self.missing(n))?;
            bytes.extend(self.bytes(e)?);
        }
        if let Recipe::SwapHalves(_) = r {
            let half = bytes.len() / 2;
            bytes.rotate_left(half);
        }
        Ok(Some((dtype, bytes)))
    }
}
